"""Issue 25 (part A): sizes and counts bounded before any work, and the last tracebacks, as one clear error.

In-process (``cli.main`` with capsys, ``VARPipeline``) rather than subprocesses, and on the tiny fixtures:
the huge sizes must fail in well under a second, so nothing here allocates them.
"""
import json
import re
import time

import numpy as np
import pytest
import torch

from conftest import get_fixture
from var_rt import cli, validation
from var_rt.errors import CheckpointError, ConfigError, InputError
from var_rt.pipeline import VARPipeline

FAST_S = 3.0  # a refusal is a check, not work: seconds at most even on a loaded 2-core machine


@pytest.fixture(scope="module")
def pipe():
    fx = get_fixture("var_tiny_256")
    return VARPipeline(fx.cfg, fx.var, fx.vae, torch.device("cpu"), torch.float32, progress=False)


def _config(tmp_path, section=None, **values):
    """The 256 px fixture's config with ``values`` set in ``section`` (None: as it is), written to tmp_path."""
    fx = get_fixture("var_tiny_256")
    raw = json.loads(fx.config_path.read_text())
    raw["vae_checkpoint"] = str(fx.vae_ckpt)
    if section:
        raw[section].update(values)
    p = tmp_path / "c.json"
    p.write_text(json.dumps(raw))
    return p


def _cli(capsys, *args):
    """Run ``python -m var_rt`` in-process: (exit status, the lines it printed on stderr, seconds)."""
    t0 = time.monotonic()
    try:
        rc = cli.main([str(a) for a in args])
    except SystemExit as e:  # argparse
        rc = e.code
    lines = [l for l in capsys.readouterr().err.splitlines() if l.strip()]
    return rc, lines, time.monotonic() - t0


def _refused(capsys, tmp_path, *args, fast=True):
    """Exit status 2, one `error:` line, nothing written (fast: in seconds); returns the line."""
    out = tmp_path / "never"
    rc, lines, dt = _cli(capsys, "generate", *args, "--output-dir", out, "--device", "cpu", "--no-progress")
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), lines
    assert not out.exists()
    assert dt < FAST_S or not fast, f"took {dt:.1f} s"
    return lines[0]


# ---- items 1 and 2: sizes bounded by the checkpoint, or by memory with random weights ---------------------

HUGE = [("var", dict(depth=10 ** 12), "var.depth is 1000000000000 in the config but 2 in the file"),
        ("var", dict(embed_dim=10 ** 9), "var.embed_dim is 1000000000 in the config but 128 in the file"),
        ("vae", dict(v_patch_nums=[1, 2, 3, 4, 5, 6, 8, 10, 13, 100000]),
         "gives 10000000424 tokens in the config but the file holds 680 (pos_1LC)"),
        ("var", dict(mlp_ratio=1e6), "var.mlp_ratio gives 128000000 hidden units in the config but the file holds 512"),
        ("vae", dict(ch=32 * 10 ** 6), "vae.ch is 32000000 in the config but 32 in the file")]


@pytest.mark.parametrize("section, values, needle", HUGE)
def test_huge_sizes_are_compared_with_the_checkpoint_before_building(tmp_path, capsys, section, values, needle):
    """Was: the model built block by block (7.7 GB after 45 s), or a DefaultCPUAllocator traceback."""
    fx = get_fixture("var_tiny_256")
    msg = _refused(capsys, tmp_path, "--config", _config(tmp_path, section, **values), "--var-ckpt", fx.var_ckpt)
    assert needle in msg and "does not match the model config" in msg


@pytest.mark.parametrize("section, values, needle", HUGE[:3])
def test_huge_sizes_with_random_weights_are_bounded_by_memory(tmp_path, capsys, section, values, needle):
    msg = _refused(capsys, tmp_path, "--config", _config(tmp_path, section, **values), "--random-weights")
    assert "of memory available: check the sizes in the config" in msg


def test_memory_bound_reads_the_machine(monkeypatch):
    """The estimate is the exact parameter count (x 4 bytes) against MemAvailable; unknown memory refuses nothing."""
    import var_rt.pipeline as pl
    from var_rt.config import get_preset, parameter_counts
    assert pl.available_memory() > 0
    d16 = get_preset("d16")
    need = 4 * sum(parameter_counts(d16))
    monkeypatch.setattr(pl, "available_memory", lambda: need - 1)
    with pytest.raises(ConfigError, match="more than the 1.6 GiB of memory available"):
        pl.check_fits_memory(d16)
    monkeypatch.setattr(pl, "available_memory", lambda: need)
    pl.check_fits_memory(d16)
    monkeypatch.setattr(pl, "available_memory", lambda: None)
    pl.check_fits_memory(d16)


def test_parameter_counts_are_exact():
    """config.parameter_counts (what bounds the sizes) equals the modules' own count, for every preset layout."""
    import dataclasses
    from var_rt.config import get_preset, parameter_counts
    from var_rt.models.var import VAR
    from var_rt.models.vqvae import VQVAE
    tiny = get_fixture("var_tiny_256").cfg
    cfgs = [get_preset("d16"), get_preset("d36"), tiny, get_fixture("var_tiny_512_saln").cfg,
            dataclasses.replace(tiny, var=dataclasses.replace(tiny.var, attn_l2_norm=False, mlp_ratio=2.5),
                                vae=dataclasses.replace(tiny.vae, share_quant_resi=0, num_res_blocks=1, ch_mult=(1, 2))),
            dataclasses.replace(tiny, vae=dataclasses.replace(tiny.vae, share_quant_resi=1, quant_resi=0.0))]
    for cfg in cfgs:
        with torch.device("meta"):
            var, vae = VAR(cfg), VQVAE(cfg.vae)
        count = lambda m: sum(p.numel() for p in m.parameters())  # noqa: E731
        assert parameter_counts(cfg) == (count(var), count(vae)), cfg


def test_serve_precheck_bounds_sizes_too(tmp_path):
    """`serve` checks the model files before Ray starts; it built the config on the meta device first (a hang)."""
    from var_rt.serve import check_model_files
    fx = get_fixture("var_tiny_256")
    cfg = _config(tmp_path, "var", depth=10 ** 12)
    t0 = time.monotonic()
    with pytest.raises(CheckpointError, match="var.depth is 1000000000000 in the config but 2 in the file"):
        check_model_files(dict(config=str(cfg), var_ckpt=str(fx.var_ckpt), vae_ckpt=str(fx.vae_ckpt)))
    with pytest.raises(ConfigError, match="of memory available"):
        check_model_files(dict(config=str(cfg), random_weights=True))
    assert time.monotonic() - t0 < FAST_S


def test_missing_size_field_is_refused(tmp_path):
    """Was: a config without var.depth took d16's 16 silently (with --random-weights nothing else said so)."""
    from var_rt.config import load_config
    raw = json.loads(_config(tmp_path).read_text())
    del raw["var"]["depth"], raw["var"]["num_heads"]
    (tmp_path / "m.json").write_text(json.dumps(raw))
    with pytest.raises(ConfigError, match=r"var\.depth, var\.num_heads missing: a config gives the transformer's size"):
        load_config(tmp_path / "m.json")


# ---- item 3: --num-images bounded, before seed lists are built --------------------------------------------

def test_num_images_has_a_documented_maximum(tmp_path, capsys, pipe):
    fx = get_fixture("var_tiny_256")
    msg = _refused(capsys, tmp_path, "--config", fx.config_path, "--var-ckpt", fx.var_ckpt, "--vae-ckpt", fx.vae_ckpt,
                   "--num-images", 100_000_000)
    assert f"--num-images must be <= {validation.MAX_IMAGES}" in msg and "sample" in msg
    t0 = time.monotonic()
    for kwargs in (dict(num_images=100_000_000), dict(class_labels=[1] * (validation.MAX_IMAGES + 1)),
                   dict(seed=list(range(validation.MAX_IMAGES + 1)))):
        with pytest.raises(InputError, match=f"at most {validation.MAX_IMAGES} per run|must be <= "):
            pipe.generate(**kwargs)
    assert time.monotonic() - t0 < FAST_S


# ---- item 4: cfg and schedule values in a documented range ------------------------------------------------

@pytest.mark.parametrize("kwargs, needle", [
    (dict(cfg=1e39), "cfg must be in [0, 100] (guidance strength), got 1e+39"),
    (dict(cfg=1e308), "cfg must be in [0, 100]"),
    (dict(cfg=-1e308), "cfg must be in [0, 100]"),
    (dict(cfg=-0.5), "cfg must be in [0, 100]"),
    (dict(cfg_schedule=[1.0] * 9 + [1e308]), "cfg-schedule: 1e+308 is out of range: each value must be in [0, 100]"),
    (dict(cfg_schedule=[-1.0] + [1.0] * 9), "cfg-schedule: -1 is out of range"),
])
def test_cfg_outside_its_range_is_refused_everywhere(pipe, kwargs, needle):
    """Was: exit 0 (HTTP 200) with one token at every scale. Python API, HTTP parser and CLI share the check."""
    from var_rt.serve import parse_request
    with pytest.raises(InputError, match=re.escape(needle)):
        pipe.generate(class_labels=[1], **kwargs)
    with pytest.raises(InputError, match=re.escape(needle)):
        parse_request({"class_label": 1, **kwargs}, pipe, 16)


def test_cfg_range_edges_run(pipe):
    lo, hi = validation.CFG_RANGE
    pipe.generate(class_labels=[1], cfg=hi, top_k=1)
    pipe.generate(class_labels=[1], cfg_schedule=[lo] * 9 + [hi], top_k=1)


@pytest.mark.parametrize("args, needle", [
    (["--cfg", "1e39"], "--cfg must be in [0, 100]"),
    (["--cfg-schedule", "1,1,1,1,1,1,1,1,1,1e308"], "--cfg-schedule: 1e+308 is out of range"),
])
def test_cfg_range_on_the_command_line(tmp_path, capsys, args, needle):
    fx = get_fixture("var_tiny_256")
    assert needle in _refused(capsys, tmp_path, "--config", fx.config_path, "--random-weights", *args)


# ---- item 5: 16-bit grayscale inputs scaled, not clipped --------------------------------------------------

@pytest.mark.parametrize("mode, suffix", [("I;16", ".png"), ("I", ".tif")])
def test_16_bit_grayscale_is_scaled(tmp_path, mode, suffix):
    """Was: a 0..65535 gradient loaded as 0, 255, 255, ... (PIL's convert clips 16-bit values)."""
    from PIL import Image
    from var_rt.images import load_image
    ramp = (np.arange(256, dtype=np.int64) * 257).reshape(1, 256).repeat(4, 0)  # 0, 257, ..., 65535
    im = Image.fromarray(ramp.astype(np.uint16 if mode == "I;16" else np.int32))
    assert im.mode == mode
    im.save(tmp_path / f"g{suffix}")
    want = np.arange(256, dtype=np.uint8)
    assert np.array_equal(load_image(tmp_path / f"g{suffix}", "L")[0], want)
    rgb = load_image(tmp_path / f"g{suffix}", "RGB")
    assert rgb.shape == (4, 256, 3) and np.array_equal(rgb[0, :, 1], want)


# ---- item 6 and the smaller checkpoint items ---------------------------------------------------------------

def test_non_floating_tensor_is_refused_by_key(tmp_path):
    """Was: pos_start saved as int64 loaded, truncated to whole numbers."""
    from var_rt.checkpoint import load_var_checkpoint
    from var_rt.models.var import VAR
    fx = get_fixture("var_tiny_256")
    sd = torch.load(fx.var_ckpt, weights_only=True)
    sd["pos_start"] = (sd["pos_start"] * 100).long()
    torch.save(sd, tmp_path / "v.pth")
    with pytest.raises(CheckpointError, match=r"non-floating tensors where the model has floating weights "
                                              r"\(pos_start is int64\)"):
        load_var_checkpoint(VAR(fx.cfg), tmp_path / "v.pth")


def test_random_bytes_are_not_a_checkpoint(tmp_path):
    """Was: 'holds Python objects besides tensors' for a file of random bytes."""
    from var_rt.checkpoint import read_state_dict
    (tmp_path / "r.pth").write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    with pytest.raises(CheckpointError, match="is not a PyTorch checkpoint") as e:
        read_state_dict(tmp_path / "r.pth", "VAR")
    assert "Python object" not in str(e.value)


# ---- smaller items: argparse errors, flags named as typed -------------------------------------------------

@pytest.mark.parametrize("args, needle", [
    (["generate", "--model", "d16", "--num-images", "x"], "argument --num-images: invalid int value: 'x'"),
    (["generate", "--model", "d16", "--cfg", "strong"], "argument --cfg: invalid float value: 'strong'"),
    (["generate", "--model", "d16", "--bogus"], "unrecognized arguments: --bogus"),
    (["nocommand"], "invalid choice: 'nocommand'"),
])
def test_argparse_errors_are_one_line(capsys, args, needle):
    """Was: the 13-line usage text before the error."""
    rc, lines, _ = _cli(capsys, *args)
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: ") and needle in lines[0], lines
    assert "--help" in lines[0]


def test_messages_name_flags_as_typed(tmp_path, capsys):
    """Was: "leave num-images out" and "cfg-schedule: ..." on the command line."""
    fx = get_fixture("var_tiny_256")
    common = ["--config", fx.config_path, "--var-ckpt", fx.var_ckpt, "--vae-ckpt", fx.vae_ckpt]
    assert "leave --num-images out" in _refused(capsys, tmp_path, *common, "--class-labels", 1, 2, "--num-images", 3,
                                                fast=False)
    assert "--cfg-schedule: an explicit guidance schedule needs one value per scale (10), got 2" in _refused(
        capsys, tmp_path, *common, "--cfg-schedule", "1,2", fast=False)


@pytest.mark.parametrize("kwargs,needle", [({"config": 123}, "config must be the path"),
                                           ({"model": 16}, "model must be a preset name")])
def test_load_names_a_wrongly_typed_model_or_config(kwargs, needle):
    from var_rt.errors import ConfigError
    from var_rt.pipeline import VARPipeline
    with pytest.raises(ConfigError, match=needle):
        VARPipeline.load(random_weights=True, device="cpu", **kwargs)
