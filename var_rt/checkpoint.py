"""Loading official checkpoints with errors a user can act on.

Official files are plain ``state_dict``s. They carry a few buffers our modules
do not keep (the training mask, level ids, a zero bias, codebook usage
statistics); those are accepted whether present or absent. Anything else that
differs is reported by key and shape, with the preset that would fit.
"""
from __future__ import annotations

import hashlib
import math
import re
import warnings
from pathlib import Path
from typing import Dict

import torch
from torch import nn

from var_rt.config import PRESETS
from var_rt.errors import CheckpointError

# Buffers of the official modules that inference does not need.
_TOLERATED = re.compile(r"^(attn_bias_for_masking|lvl_1L|blocks\.\d+\.attn\.zero_k_bias|quantize\.ema_vocab_hit_SV)$")
_MAX_LISTED = 8


def read_state_dict(path: str | Path, what: str) -> Dict[str, torch.Tensor]:
    """``torch.load(path, weights_only=True)`` with a clear error for missing, truncated or foreign files."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"{what} checkpoint {str(path)!r} does not exist")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # zip, pickle, EOF and unpickler errors: the file is not a loadable state_dict
        first = str(e).strip().splitlines()[0][:200] if str(e).strip() else type(e).__name__
        raise CheckpointError(
            f"{what} checkpoint {str(path)!r} could not be read ({type(e).__name__}: {first}); the file is "
            f"truncated, corrupt or not a PyTorch state_dict: download it again") from None
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]  # some trainers wrap the weights
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{what} checkpoint {str(path)!r} does not hold a state_dict of tensors")
    return sd


def describe_var_state_dict(sd: Dict[str, torch.Tensor]) -> str:
    """A short description of the VAR model a state_dict belongs to, and the preset that fits it."""
    if "class_emb.weight" not in sd:
        if any(k.startswith(("encoder.", "decoder.", "quantize.")) for k in sd):
            return "it looks like a VQVAE checkpoint, not a VAR transformer (swap --var-ckpt and --vae-ckpt?)"
        return "it does not look like a VAR checkpoint (no class_emb.weight)"
    depth = len({int(m.group(1)) for k in sd for m in [re.match(r"blocks\.(\d+)\.", k)] if m})
    width = sd["class_emb.weight"].shape[1]
    shared = "shared_ada_lin.1.weight" in sd
    tokens = sd["pos_1LC"].shape[1] if "pos_1LC" in sd else None
    fits = [name for name, p in PRESETS.items()
            if p.var.depth == depth and p.var.embed_dim == width and p.var.shared_aln == shared
            and (tokens is None or p.num_tokens == tokens)]
    desc = f"the file holds depth {depth}, width {width}, {tokens} tokens, shared AdaLN {shared}"
    if fits:
        desc += f"; preset {fits[0]!r} fits it (--model {fits[0]})"
    else:
        desc += "; no preset fits it: pass a JSON config (--config) with these values"
    return desc


def _diff(model: nn.Module, sd: Dict[str, torch.Tensor]):
    expected = model.state_dict()
    missing = [k for k in expected if k not in sd]
    unexpected = [k for k in sd if k not in expected and not _TOLERATED.match(k)]
    shapes = [(k, tuple(sd[k].shape), tuple(v.shape)) for k, v in expected.items()
              if k in sd and tuple(sd[k].shape) != tuple(v.shape)]
    return missing, unexpected, shapes


def _fmt(items, fmt) -> str:
    shown = ", ".join(fmt(i) for i in items[:_MAX_LISTED])
    more = f" and {len(items) - _MAX_LISTED} more" if len(items) > _MAX_LISTED else ""
    return shown + more


def load_into(model: nn.Module, sd: Dict[str, torch.Tensor], what: str, path: str, hint: str = "") -> None:
    """Strict load of an official state_dict into ``model``; mismatches become one CheckpointError."""
    sd = dict(sd)
    missing, unexpected, shapes = _diff(model, sd)
    # Older VAR checkpoints lack the attention temperature: keep the official initial value.
    old_scale = [k for k in missing if k.endswith("attn.scale_mul_1H11")]
    if old_scale and len(old_scale) == len(missing):
        warnings.warn(f"{path}: no attn.scale_mul_1H11 in the checkpoint; using the official initial value log(4)")
        for k in old_scale:
            sd[k] = torch.full_like(model.state_dict()[k], math.log(4.0))
        missing = []
    if missing or unexpected or shapes:
        parts = []
        if shapes:
            parts.append("shapes differ: " + _fmt(shapes, lambda s: f"{s[0]} file {list(s[1])} vs model {list(s[2])}"))
        if missing:
            parts.append("missing from the file: " + _fmt(missing, str))
        if unexpected:
            parts.append("not in the model: " + _fmt(unexpected, str))
        msg = f"{what} checkpoint {path!r} does not match the model config: " + "; ".join(parts)
        if hint:
            msg += f". {hint}"
        raise CheckpointError(msg)
    sd = {k: v for k, v in sd.items() if not _TOLERATED.match(k)}
    model.load_state_dict(sd, strict=False)  # every model key is present and shaped right (checked above)


def load_var_checkpoint(model: nn.Module, path: str | Path) -> None:
    sd = read_state_dict(path, "VAR")
    try:
        hint = describe_var_state_dict(sd)
    except Exception:  # description is best effort; the diff below is the real check
        hint = ""
    if "class_emb.weight" not in sd:
        raise CheckpointError(f"VAR checkpoint {str(path)!r}: {hint}")
    load_into(model, sd, "VAR", str(path), hint)


def load_vae_checkpoint(model: nn.Module, path: str | Path) -> None:
    sd = read_state_dict(path, "VQVAE")
    if not any(k.startswith("decoder.") for k in sd):
        hint = describe_var_state_dict(sd) if "class_emb.weight" in sd else ""
        raise CheckpointError(f"VQVAE checkpoint {str(path)!r} has no decoder weights"
                              + ("; it looks like a VAR transformer checkpoint (swap --var-ckpt and --vae-ckpt?)"
                                 if hint else ""))
    load_into(model, sd, "VQVAE", str(path))


def weights_hash(*modules: nn.Module) -> str:
    """SHA-256 over parameter names and bytes: identifies the weights an export was built from."""
    h = hashlib.sha256()
    for m in modules:
        for k, v in sorted(m.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
