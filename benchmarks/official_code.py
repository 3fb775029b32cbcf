"""The official code as a baseline: FoundationVision/VAR's own ``autoregressive_infer_cfg``, run in the same
process as var-rt's backends, on the same weights.

var-rt holds none of that code. It is imported at run time from a checkout the user names
(``python -m benchmarks.bench --baselines official-code --official-src DIR``, or ``VAR_OFFICIAL_SRC``): a clone
of https://github.com/FoundationVision/VAR, of which ``dist.py`` and ``models/`` are used (they need torch and
huggingface_hub). The models are built with the official classes and the arguments of ``build_vae_var``
for the config (drop rates have no effect in eval mode), then loaded with the benchmark's weights (the
official checkpoint format is var-rt's), so both sides compute from the same parameters. A generation is
what the official demo runs: ``autoregressive_infer_cfg`` under ``torch.inference_mode`` and FP16 (BF16)
autocast, decode included, images left on the device in [0, 1].
"""
from __future__ import annotations

import contextlib
import hashlib
import os
import sys
from pathlib import Path
from typing import List, Optional, Tuple

import torch

from var_rt.sampling import DEFAULTS

REPO_URL = "https://github.com/FoundationVision/VAR"
ENV = "VAR_OFFICIAL_SRC"
# Buffers the official constructors compute (causal mask, level ids, zero key bias, codebook-usage statistics):
# a checkpoint may omit them, and var-rt's modules do not keep them.
COMPUTED_BUFFERS = ("attn_bias_for_masking", "lvl_1L", "zero_k_bias", "ema_vocab_hit_SV")
OFFICIAL_CH_MULT, OFFICIAL_RES_BLOCKS = (1, 1, 2, 2, 4), 2  # fixed inside the official VQVAE


class Unavailable(RuntimeError):
    """The official code cannot run here (no checkout, a missing package, a config it cannot express)."""


def source_dir(given: Optional[str] = None) -> Path:
    """The checkout of the official code: ``given``, else $VAR_OFFICIAL_SRC; Unavailable if neither names one."""
    text = given or os.environ.get(ENV)
    if not text:
        raise Unavailable(f"no checkout of the official code: give --official-src DIR (or set {ENV}), a clone of "
                          f"{REPO_URL}")
    src = Path(text).expanduser()
    missing = [p for p in ("dist.py", "models/var.py", "models/vqvae.py") if not (src / p).is_file()]
    if missing:
        raise Unavailable(f"{src} is not a checkout of {REPO_URL}: {', '.join(missing)} missing")
    return src.resolve()


def fingerprint(src: Path) -> str:
    """A short SHA-256 over the checkout's files that run (``dist.py``, ``models/*.py``): which version ran."""
    h = hashlib.sha256()
    for f in [src / "dist.py"] + sorted((src / "models").glob("*.py")):
        h.update(f.relative_to(src).as_posix().encode() + b"\0" + f.read_bytes())
    return h.hexdigest()[:16]


def import_classes(src: Path) -> Tuple[type, type]:
    """(VAR, VQVAE) of the checkout. Its top-level modules ``models`` and ``dist`` are imported from it, so
    modules of those names imported from elsewhere first are refused (run the benchmark in a fresh process)."""
    for name in ("models", "dist"):
        mod = sys.modules.get(name)
        where = getattr(mod, "__file__", None) if mod is not None else None
        if mod is not None and (where is None or not Path(where).resolve().is_relative_to(src)):
            raise Unavailable(f"a module named {name!r} ({where}) is already imported, not the official code's: "
                              f"run the benchmark in a fresh process")
    sys.path.insert(0, str(src))
    try:
        from models.var import VAR
        from models.vqvae import VQVAE
    except ImportError as e:
        raise Unavailable(f"the official code in {src} does not import here: {e} (it needs torch and "
                          f"huggingface_hub)") from None
    finally:
        sys.path.remove(str(src))
    return VAR, VQVAE


def _load(module: torch.nn.Module, state: dict, what: str) -> None:
    """Load var-rt's state dict into an official module: every parameter, none left over."""
    res = module.load_state_dict(state, strict=False)
    missing = [k for k in res.missing_keys if k.rsplit(".", 1)[-1] not in COMPUTED_BUFFERS]
    if missing or res.unexpected_keys:
        raise Unavailable(f"the official {what} does not take these weights: missing {missing[:5]}, "
                          f"unexpected {res.unexpected_keys[:5]}")


class OfficialCode:
    """The official VAR and VQVAE on ``device`` with the given weights; ``generate`` is one official batch."""

    def __init__(self, src: Path, mc, var_state: dict, vae_state: dict, device: torch.device,
                 autocast_dtype: Optional[torch.dtype]):
        VAR, VQVAE = import_classes(src)
        q, v = mc.vae, mc.var
        if tuple(q.ch_mult) != OFFICIAL_CH_MULT or q.num_res_blocks != OFFICIAL_RES_BLOCKS:
            raise Unavailable(f"the official VQVAE has ch_mult {OFFICIAL_CH_MULT} and {OFFICIAL_RES_BLOCKS} res "
                              f"blocks; this config has {tuple(q.ch_mult)} and {q.num_res_blocks}")
        # Built on the device (the default initialisation of a d30 on the host would take longer than its
        # timed calls); the constructors print their configuration, which is not this report's.
        with open(os.devnull, "w") as sink, contextlib.redirect_stdout(sink), torch.device(device):
            vae = VQVAE(vocab_size=q.vocab_size, z_channels=q.z_channels, ch=q.ch, test_mode=True,
                        quant_resi=q.quant_resi, share_quant_resi=q.share_quant_resi,
                        default_qresi_counts=q.default_qresi_counts, v_patch_nums=tuple(q.patch_nums))
            var = VAR(vae_local=vae, num_classes=v.num_classes, depth=v.depth, embed_dim=v.embed_dim,
                      num_heads=v.num_heads, mlp_ratio=v.mlp_ratio, drop_rate=0., attn_drop_rate=0.,
                      drop_path_rate=0.1 * v.depth / 24, norm_eps=v.norm_eps, shared_aln=v.shared_aln,
                      cond_drop_rate=0.1, attn_l2_norm=v.attn_l2_norm, patch_nums=tuple(q.patch_nums),
                      flash_if_available=True, fused_if_available=True)
        _load(vae, vae_state, "VQVAE")
        _load(var, var_state, "VAR")
        self.vae, self.var = vae.eval(), var.eval()
        # The official sampler's generator lives on its own device choice ('cuda' when there is one).
        gen_dev = self.var.rng.device
        if torch.device(device).type != gen_dev.type:
            raise Unavailable(f"the official code draws on {gen_dev} (its dist.get_device()), the benchmark runs on "
                              f"{device}")
        self.device, self.autocast_dtype = torch.device(device), autocast_dtype

    def generate_with_tokens(self, labels_B: torch.Tensor, **kw) -> Tuple[torch.Tensor, List[torch.Tensor]]:
        """``generate``'s images and the tokens sampled at each scale, (B, pn^2) each. The tokens are read by a
        forward hook on the codebook embedding that ``autoregressive_infer_cfg`` looks them up in, once per scale
        (without more_smooth, which this baseline never sets)."""
        tokens: List[torch.Tensor] = []
        emb = self.var.vae_quant_proxy[0].embedding
        hook = emb.register_forward_hook(lambda mod, args, out: tokens.append(args[0].detach().clone()))
        try:
            images = self.generate(labels_B, **kw)
        finally:
            hook.remove()
        if len(tokens) != len(self.var.patch_nums):
            raise RuntimeError(f"the official code looked up the codebook {len(tokens)} times for "
                               f"{len(self.var.patch_nums)} scales: this checkout samples differently")
        return images, tokens

    def generate(self, labels_B: torch.Tensor, seed: int = 0, cfg: float = DEFAULTS.cfg, top_k: int = DEFAULTS.top_k,
                 top_p: float = DEFAULTS.top_p) -> torch.Tensor:
        """Images (B, 3, H, W) in [0, 1] on the device, as ``autoregressive_infer_cfg`` returns them. A top-k of
        the vocabulary size or more keeps every token, as in var-rt (the official filter would fail on it)."""
        top_k = top_k if top_k < self.var.V else 0
        amp = (torch.autocast(self.device.type, dtype=self.autocast_dtype, cache_enabled=True)
               if self.autocast_dtype is not None else contextlib.nullcontext())
        with torch.inference_mode(), amp:
            return self.var.autoregressive_infer_cfg(B=labels_B.shape[0], label_B=labels_B.to(self.device),
                                                     g_seed=seed, cfg=cfg, top_k=top_k, top_p=top_p,
                                                     more_smooth=False)
