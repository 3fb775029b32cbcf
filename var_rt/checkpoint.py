"""Loading official checkpoints with errors a user can act on.

Official files are plain ``state_dict``s. They carry a few buffers our modules
do not keep (the training mask, level ids, a zero bias, codebook usage
statistics); those are accepted whether present or absent. Anything else that
differs is reported by key and shape, with the preset that would fit.
"""
from __future__ import annotations

import hashlib
import math
import pickle
import re
import warnings
from pathlib import Path
from typing import Dict

import torch
from torch import nn

from var_rt.config import PRESETS
from var_rt.errors import CheckpointError, one_line

# Buffers of the official modules that inference does not need.
_TOLERATED = re.compile(r"^(attn_bias_for_masking|lvl_1L|blocks\.\d+\.attn\.zero_k_bias|quantize\.ema_vocab_hit_SV)$")
_MAX_LISTED = 8


def _first_sentence(text: str) -> str:
    """The first sentence of a library's error message, without terminal escapes (the rest is advice for
    developers, sometimes unsafe advice for users)."""
    text = one_line(text)
    return re.split(r"(?<=[.!?])\s", text, maxsplit=1)[0].rstrip(".") if text else ""


def _load_error(e: Exception, what: str, path: Path) -> CheckpointError:
    """torch.load's failure as one message a user can act on."""
    text = str(e)
    if isinstance(e, pickle.UnpicklingError) and "weights only" in text.lower() and "GLOBAL" not in text:
        # The weights-only unpickler stopped at a byte that is no pickle instruction it knows (e.g.
        # "Unsupported operand 33"): random or foreign bytes, not a file that pickles Python objects.
        return CheckpointError(
            f"{what} checkpoint {str(path)!r} is not a PyTorch checkpoint (its bytes are not a saved state_dict): "
            f"give the official .pth file, or download it again")
    if isinstance(e, pickle.UnpicklingError) and "weights only" in text.lower():
        # The file pickles Python objects besides tensors. Loading it anyway (weights_only=False) would run
        # code from the file, so the message names what is inside and never suggests that.
        found = re.search(r"GLOBAL ([\w.]+)", text)
        inside = f"a Python object ({found.group(1)})" if found else "Python objects"
        return CheckpointError(
            f"{what} checkpoint {str(path)!r} holds {inside} besides tensors; var-rt only loads plain state_dicts "
            f"of tensors, because unpickling other objects can run code from the file: use the official "
            f".pth file (or save model.state_dict() with torch.save)")
    return CheckpointError(
        f"{what} checkpoint {str(path)!r} could not be read ({type(e).__name__}: "
        f"{_first_sentence(text) or 'no details'}); the file is truncated, corrupt or not a PyTorch state_dict: "
        f"download it again")


def read_state_dict(path: str | Path, what: str, mmap: bool = False) -> Dict[str, torch.Tensor]:
    """``torch.load(path, weights_only=True)`` with a clear error for missing, truncated or foreign files.
    ``mmap``: the tensors memory-map the file instead of being read (zip-format checkpoints only)."""
    path = Path(path)
    if path.is_dir():
        raise CheckpointError(f"{what} checkpoint {str(path)!r} is a folder: give the checkpoint file (.pth)")
    if not path.is_file():
        raise CheckpointError(f"{what} checkpoint {str(path)!r} does not exist")
    try:
        sd = torch.load(path, map_location="cpu", weights_only=True, mmap=mmap)
    except Exception as e:  # zip, pickle, EOF and unpickler errors: the file is not a loadable state_dict
        raise _load_error(e, what, path) from None
    if isinstance(sd, dict) and "model" in sd and isinstance(sd["model"], dict):
        sd = sd["model"]  # some trainers wrap the weights
    if not isinstance(sd, dict) or not all(isinstance(v, torch.Tensor) for v in sd.values()):
        raise CheckpointError(f"{what} checkpoint {str(path)!r} does not hold a state_dict of tensors")
    return sd


def _count(sd: Dict[str, torch.Tensor], pattern: str) -> int:
    """Number of distinct indices N in keys matching ``pattern`` (a regex with one group for N)."""
    return len({m.group(1) for k in sd for m in [re.match(pattern, k)] if m})


def var_fields(sd: Dict[str, torch.Tensor]) -> Dict[str, object]:
    """The config fields a VAR state_dict determines (by their JSON names), where it holds the keys."""
    out: Dict[str, object] = {"var.depth": _count(sd, r"blocks\.(\d+)\.")}
    if "class_emb.weight" in sd:
        out["var.num_classes"] = sd["class_emb.weight"].shape[0] - 1  # the last row is the null class
        out["var.embed_dim"] = sd["class_emb.weight"].shape[1]
    if "blocks.0.attn.scale_mul_1H11" in sd:
        out["var.num_heads"] = sd["blocks.0.attn.scale_mul_1H11"].shape[1]
    out["var.shared_aln"] = "shared_ada_lin.1.weight" in sd
    if "head.weight" in sd:
        out["vae.vocab_size"] = sd["head.weight"].shape[0]
    if "word_embed.weight" in sd:
        out["vae.z_channels"] = sd["word_embed.weight"].shape[1]
    return out


def vae_fields(sd: Dict[str, torch.Tensor]) -> Dict[str, object]:
    """The config fields a VQVAE state_dict determines (by their JSON names), where it holds the keys."""
    out: Dict[str, object] = {}
    if "quantize.embedding.weight" in sd:
        out["vae.vocab_size"], out["vae.z_channels"] = tuple(sd["quantize.embedding.weight"].shape)
    if "encoder.conv_in.weight" in sd:
        ch = out["vae.ch"] = sd["encoder.conv_in.weight"].shape[0]
        levels = _count(sd, r"encoder\.down\.(\d+)\.")
        firsts = [sd.get(f"encoder.down.{i}.block.0.conv1.weight") for i in range(levels)]
        if levels and all(w is not None for w in firsts):
            out["vae.ch_mult"] = [w.shape[0] // ch for w in firsts]
        out["vae.num_res_blocks"] = _count(sd, r"encoder\.down\.0\.block\.(\d+)\.")
    return out


def config_differences(found: Dict[str, object], cfg) -> str:
    """'field: N in the config, M in the file' for each field the file determines and the config sets otherwise.

    cfg: a ModelConfig (for VAR files) or a VQVAEConfig (VQVAE files).
    """
    sections = {"var": getattr(cfg, "var", None), "vae": getattr(cfg, "vae", cfg)}
    diffs = []
    for field, value in found.items():
        section, name = field.split(".")
        have = getattr(sections[section], name, None)
        have = list(have) if isinstance(have, tuple) else have
        if have is not None and have != value:
            diffs.append(f"{field} is {have} in the config but {value} in the file")
    return "; ".join(diffs)


def describe_var_state_dict(sd: Dict[str, torch.Tensor]) -> str:
    """A short description of the VAR model a state_dict belongs to, and the preset that fits it."""
    if "class_emb.weight" not in sd:
        if any(k.startswith(("encoder.", "decoder.", "quantize.")) for k in sd):
            return "it looks like a VQVAE checkpoint, not a VAR transformer (swap --var-ckpt and --vae-ckpt?)"
        return "it does not look like a VAR checkpoint (no class_emb.weight)"
    f = var_fields(sd)
    depth, width, shared = f["var.depth"], f["var.embed_dim"], f["var.shared_aln"]
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


def load_into(model: nn.Module, sd: Dict[str, torch.Tensor], what: str, path: str, hint: str = "",
              fields: str = "") -> None:
    """Strict load of an official state_dict into ``model``; mismatches become one CheckpointError.

    fields: the config fields that differ from the file (config_differences), named first in the message.
    Weights that are NaN or infinite are refused too: they load fine and give flat images.
    """
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
        parts = [fields] if fields else []
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
    # load_state_dict copies into the model's tensors, casting silently: an int64 pos_start would load
    # truncated to whole numbers. Floating weights must come from floating tensors.
    expected = model.state_dict()
    kinds = [f"{k} is {str(v.dtype).replace('torch.', '')}" for k, v in sd.items()
             if k in expected and expected[k].is_floating_point() and not v.is_floating_point()]
    if kinds:
        raise CheckpointError(f"{what} checkpoint {path!r} holds non-floating tensors where the model has floating "
                              f"weights ({_fmt(kinds, str)}): the file is corrupt or was not saved from this model; "
                              f"download it again")
    bad = [k for k, v in sd.items() if v.is_floating_point() and not bool(torch.isfinite(v).all())]
    if bad:
        raise CheckpointError(f"{what} checkpoint {path!r} holds NaN or infinite values (in {_fmt(bad, str)}): the "
                              f"file is corrupt or comes from a diverged training run; download it again")
    model.load_state_dict(sd, strict=False)  # every model key is present and shaped right (checked above)


def _shape(sd: Dict[str, torch.Tensor], key: str, dim: int):
    t = sd.get(key)
    return t.shape[dim] if t is not None and t.dim() > dim else None


def _held(sd: Dict[str, torch.Tensor]) -> int:
    """Numbers a state_dict holds, without the buffers inference does not use."""
    return sum(v.numel() for k, v in sd.items() if not _TOLERATED.match(k))


def _var_hint(sd: Dict[str, torch.Tensor]) -> str:
    try:
        return describe_var_state_dict(sd)
    except Exception:  # description is best effort; the checks are the real ones
        return ""


def read_var_checkpoint(path: str | Path, cfg, mmap: bool = False) -> Dict[str, torch.Tensor]:
    """A VAR state_dict, compared with ``cfg`` (a ModelConfig) before any module is built.

    Every size the config gives is bounded by what the file holds: the fields the file determines
    (var_fields), the token schedule (pos_1LC, lvl_embed, pos_start), the FFN width, and in the end the
    config's parameter count (config.parameter_counts) against the numbers in the file. So a config that
    asks for 10^12 blocks, or 10^9 channels, is one error here instead of a model built until memory runs out.
    """
    from var_rt.config import parameter_counts
    sd = read_state_dict(path, "VAR", mmap)
    hint = _var_hint(sd)
    if "class_emb.weight" not in sd:
        raise CheckpointError(f"VAR checkpoint {str(path)!r}: {hint}")
    diffs = [d for d in [config_differences(var_fields(sd), cfg)] if d]
    pns = list(cfg.patch_nums)
    for what, have, got in (
            (f"vae.v_patch_nums {pns} gives {{}} tokens in the config but the file holds {{}} (pos_1LC)",
             cfg.num_tokens, _shape(sd, "pos_1LC", 1)),
            (f"vae.v_patch_nums {pns} gives {{}} scales in the config but the file holds {{}} (lvl_embed.weight)",
             cfg.num_scales, _shape(sd, "lvl_embed.weight", 0)),
            (f"vae.v_patch_nums {pns} gives {{}} first-scale tokens in the config but the file holds {{}} (pos_start)",
             cfg.patch_nums[0] ** 2, _shape(sd, "pos_start", 1)),
            ("var.mlp_ratio gives {} hidden units in the config but the file holds {} (blocks.0.ffn.fc1.weight)",
             round(cfg.var.embed_dim * cfg.var.mlp_ratio), _shape(sd, "blocks.0.ffn.fc1.weight", 0))):
        if got is not None and got != have:
            diffs.append(what.format(have, got))
    if not diffs:
        # The last bound, for any size the checks above do not see: the model cannot have more parameters
        # than the file holds (old files may lack the attention temperatures: one number per head).
        want, held = parameter_counts(cfg)[0], _held(sd)
        if want > held + cfg.var.depth * cfg.var.num_heads:
            diffs.append(f"the config describes {want:,} parameters, the file holds {held:,}")
    if diffs:
        raise CheckpointError(f"VAR checkpoint {str(path)!r} does not match the model config: {'; '.join(diffs)}"
                              + (f". {hint}" if hint else ""))
    return sd


def _phi_layout(sd: Dict[str, torch.Tensor]) -> tuple:
    """(share_quant_resi kind, number of phi convolutions) of a VQVAE state_dict."""
    if "quantize.quant_resi.qresi.weight" in sd:
        return 1, 1
    shared = _count(sd, r"quantize\.quant_resi\.qresi_ls\.(\d+)\.")
    return (2, shared) if shared else (0, _count(sd, r"quantize\.quant_resi\.(\d+)\."))


def read_vae_checkpoint(path: str | Path, cfg, mmap: bool = False) -> Dict[str, torch.Tensor]:
    """A VQVAE state_dict, compared with ``cfg`` (a VQVAEConfig) before any module is built (see
    read_var_checkpoint)."""
    from var_rt.config import ModelConfig, VARConfig, parameter_counts
    sd = read_state_dict(path, "VQVAE", mmap)
    if not any(k.startswith("decoder.") for k in sd):
        hint = describe_var_state_dict(sd) if "class_emb.weight" in sd else ""
        raise CheckpointError(f"VQVAE checkpoint {str(path)!r} has no decoder weights"
                              + ("; it looks like a VAR transformer checkpoint (swap --var-ckpt and --vae-ckpt?)"
                                 if hint else ""))
    diffs = [d for d in [config_differences(vae_fields(sd), cfg)] if d]
    if abs(cfg.quant_resi) > 1e-6:
        kind, phis = _phi_layout(sd)
        share = cfg.share_quant_resi
        want = (0, cfg.default_qresi_counts or len(cfg.patch_nums)) if share == 0 else (min(share, 2), share)
        if phis and (kind, phis) != want:
            diffs.append(f"vae.share_quant_resi {share} (with vae.v_patch_nums, vae.default_qresi_counts) gives "
                         f"{want[1]} phi convolutions in the config but the file holds {phis}")
    if not diffs:
        want, held = parameter_counts(ModelConfig("vae", VARConfig(), cfg))[1], _held(sd)
        if want > held:
            diffs.append(f"the config describes {want:,} parameters, the file holds {held:,}")
    if diffs:
        raise CheckpointError(f"VQVAE checkpoint {str(path)!r} does not match the model config: {'; '.join(diffs)}")
    return sd


def load_var_checkpoint(model: nn.Module, path: str | Path, sd: Dict[str, torch.Tensor] | None = None) -> None:
    """Load a VAR checkpoint into ``model``; sd: the file as read_var_checkpoint returned it (not read again)."""
    sd = read_var_checkpoint(path, model.cfg) if sd is None else sd
    load_into(model, sd, "VAR", str(path), _var_hint(sd), _differences(var_fields, sd, model))


def load_vae_checkpoint(model: nn.Module, path: str | Path, sd: Dict[str, torch.Tensor] | None = None) -> None:
    """Load a VQVAE checkpoint into ``model``; sd: the file as read_vae_checkpoint returned it."""
    sd = read_vae_checkpoint(path, model.cfg) if sd is None else sd
    load_into(model, sd, "VQVAE", str(path), fields=_differences(vae_fields, sd, model))


def _differences(fields_of, sd: Dict[str, torch.Tensor], model: nn.Module) -> str:
    """config_differences for a model built from a config; best effort (the key diff is the real check)."""
    try:
        return config_differences(fields_of(sd), model.cfg)
    except Exception:
        return ""


def weights_hash(*modules: nn.Module) -> str:
    """SHA-256 over parameter names and bytes: identifies the weights an export was built from."""
    h = hashlib.sha256()
    for m in modules:
        for k, v in sorted(m.state_dict().items()):
            h.update(k.encode())
            h.update(v.detach().cpu().contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
