"""Shared test fixtures: the golden fixtures from the official implementation, loaded once."""
from __future__ import annotations

import os
from pathlib import Path

import pytest
import torch

# Without a GPU, Triton kernels are tested under the interpreter, which Triton reads when it is first
# imported: before var_rt is (the scale loop imports the fused sampler). The loop itself uses the fused
# kernels on CUDA tensors only, so this changes no other test.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

from var_rt.checkpoint import load_vae_checkpoint, load_var_checkpoint
from var_rt.config import load_config
from var_rt.models.var import VAR
from var_rt.models.vqvae import VQVAE

REPO = Path(__file__).resolve().parents[1]
DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")  # where the Triton kernel tests run


def require_kernel(runs) -> None:
    """Skip the calling test module unless its Triton kernel runs on DEV (``runs(device)``): Triton installed,
    compiled on CUDA or interpreted on the CPU (TRITON_INTERPRET, set above before triton's first import)."""
    pytest.importorskip("triton", reason="triton is not installed (pip install triton): the kernel is untested")
    if not runs(DEV):
        pytest.skip("triton was imported before TRITON_INTERPRET=1 was set (tests/conftest.py sets it first)",
                    allow_module_level=True)


def fixtures_dir() -> Path:
    """The golden fixtures: $VAR_RT_FIXTURES, else ../shared/fixtures beside the checkout."""
    env = os.environ.get("VAR_RT_FIXTURES")
    for cand in ([Path(env)] if env else []) + [REPO.parent / "shared" / "fixtures", REPO / "shared" / "fixtures"]:
        if (cand / "var_tiny_256" / "cases.pt").is_file():
            return cand
    raise RuntimeError("golden fixtures not found: set VAR_RT_FIXTURES or put shared/fixtures beside the checkout")


FIXTURE_NAMES = ["var_tiny_256", "var_tiny_512_saln"]


class Fixture:
    def __init__(self, name: str):
        self.name = name
        self.dir = fixtures_dir() / name
        self.config_path = self.dir / "config.json"
        self.cfg = load_config(self.config_path)
        self.var_ckpt = self.dir / "var.pth"
        self.vae_ckpt = Path(self.cfg.vae_checkpoint)
        self.cases = torch.load(self.dir / "cases.pt", weights_only=True)
        self.var, self.vae = VAR(self.cfg).eval(), VQVAE(self.cfg.vae).eval()
        load_var_checkpoint(self.var, self.var_ckpt)
        load_vae_checkpoint(self.vae, self.vae_ckpt)


_cache: dict = {}


def get_fixture(name: str) -> Fixture:
    if name not in _cache:
        _cache[name] = Fixture(name)
    return _cache[name]


@pytest.fixture(params=FIXTURE_NAMES)
def fx(request) -> Fixture:
    return get_fixture(request.param)


@pytest.fixture
def fx256() -> Fixture:
    return get_fixture("var_tiny_256")


def token_mismatch(a_list, b_list) -> tuple[int, int]:
    bad = sum(int((a != b).sum()) for a, b in zip(a_list, b_list))
    return bad, sum(a.numel() for a in a_list)


def png_header(path, width, height):
    """A PNG whose header declares width x height and holds no pixel data (enough for the size checks, a
    few bytes on disk)."""
    import struct
    import zlib
    chunk = lambda kind, data: (struct.pack(">I", len(data)) + kind + data  # noqa: E731
                                + struct.pack(">I", zlib.crc32(kind + data)))
    ihdr = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    path.write_bytes(b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IEND", b""))
    return path
