"""Custom ops of var-rt: the fused scale transition and KV-cache copies.

The op schemas live here (namespace ``var_rt``, via ``torch.library``). Each op has

* a pure-PyTorch implementation, registered for every backend (``CompositeExplicitAutograd``):
  it runs on CPU, and on CUDA when the extension is not built;
* a fake (meta) implementation, so the ops trace under ``torch.compile`` / ``torch.export``;
* a CUDA implementation in the optional extension (``csrc/``), registered from C++ with
  ``TORCH_LIBRARY_IMPL(var_rt, CUDA, m)``; being a backend kernel, it takes precedence over the
  PyTorch one for CUDA tensors once loaded.

The extension is a shared library built by CMake (see ``csrc/README.md``) and installed as
``var_rt/_var_rt_ops*.so``; ``$VAR_RT_EXT`` names another path, ``VAR_RT_EXT=0`` disables it.
A CPU-only install needs none of it.
"""
from __future__ import annotations

import glob
import math
import os
import warnings
from pathlib import Path
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "scale_transition", "kv_write", "kv_append", "transition_params",
    "scale_transition_reference", "extension_loaded", "extension_error", "load_extension",
]

# ----------------------------------------------------------------------------------------------
# Schemas
# ----------------------------------------------------------------------------------------------

_lib = torch.library.Library("var_rt", "DEF")  # noqa: the library object must stay alive
_lib.define(
    "scale_transition(Tensor(a!) f_hat, Tensor h, Tensor phi_w, Tensor phi_b, float ratio, int pn_next, "
    "Tensor(b!) next_tokens) -> ()"
)
_lib.define("kv_write(Tensor(a!) cache_k, Tensor(b!) cache_v, Tensor k_new, Tensor v_new, int begin) -> ()")
_lib.define("kv_append(Tensor(a!) dst, Tensor past, Tensor present) -> ()")


# ----------------------------------------------------------------------------------------------
# PyTorch implementations (the reference arithmetic)
# ----------------------------------------------------------------------------------------------

def _grid_side(n_tokens: int) -> int:
    pn = math.isqrt(n_tokens)
    torch._check(pn * pn == n_tokens, lambda: f"h has {n_tokens} tokens, not a square number")
    return pn


def _check_transition(f_hat, h, phi_w, phi_b, pn_next, next_tokens) -> int:
    """Shape checks shared by the PyTorch and fake implementations; returns pn."""
    torch._check(f_hat.dim() == 4 and f_hat.dtype == torch.float32, lambda: "f_hat must be float32 (B, Cv, P, P)")
    B, Cv, P, P2 = f_hat.shape
    torch._check(P == P2, lambda: "f_hat must be square")
    torch._check(h.dim() == 3 and h.shape[0] == B and h.shape[2] == Cv, lambda: f"h must be (B, pn*pn, Cv), got {tuple(h.shape)}")
    pn = _grid_side(h.shape[1])
    torch._check(pn <= P, lambda: f"h's grid {pn} exceeds f_hat's {P}")
    torch._check(tuple(phi_w.shape) == (Cv, Cv, 3, 3) and phi_b.numel() == Cv, lambda: "phi_w must be (Cv, Cv, 3, 3), phi_b (Cv,)")
    torch._check(0 <= pn_next <= P, lambda: f"pn_next must be in [0, {P}]")
    if pn_next > 0:
        torch._check(tuple(next_tokens.shape) == (B, pn_next * pn_next, Cv),
                     lambda: f"next_tokens must be (B, pn_next^2, Cv), got {tuple(next_tokens.shape)}")
    return pn


def scale_transition_reference(f_hat_BChw: torch.Tensor, h_BlC: torch.Tensor, phi_w: torch.Tensor,
                               phi_b: torch.Tensor, ratio: float, pn_next: int
                               ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Out-of-place reference: (f_hat + phi(upsample(h)), area(f_hat_new) as (B, pn_next^2, Cv) or None),
    from raw phi weights, with the model's own upsample (var_rt.models.vqvae).

    phi in the compute dtype (phi_w's dtype, var_rt.precision) as PyTorch's convolution computes it there on
    CUDA: operands (upsampled h, phi_w, phi_b) of the compute dtype, float32 sums, the conv's result rounded
    to the compute dtype, the bias added and rounded, ``* r`` rounded; then ``(1 - r) u + y`` and f_hat in
    f_hat's dtype (float32; pass float64 tensors for a tighter reference of the sums). With float32 weights
    nothing is rounded: ``f_hat + (1 - r) u + r (conv(u) + b)``.
    """
    from var_rt.models.traceable import area_downsample
    from var_rt.models.vqvae import upsample_codes  # the one definition of the upsample

    B, l, Cv = h_BlC.shape
    P = f_hat_BChw.shape[-1]
    pn = _grid_side(l)
    wide, cd = f_hat_BChw.dtype, phi_w.dtype

    def rnd(x):  # a value of the compute dtype, held in the wide dtype
        return x.to(cd).to(wide)

    u = upsample_codes(h_BlC.to(wide).transpose(1, 2).reshape(B, Cv, pn, pn), P)
    conv = rnd(F.conv2d(rnd(u), phi_w.to(wide), None, padding=1))
    y = rnd(rnd(conv + phi_b.to(wide).view(1, Cv, 1, 1)) * ratio)
    f_new = f_hat_BChw + (u * (1 - ratio) + y)
    if pn_next == 0:
        return f_new, None
    return f_new, area_downsample(f_new, pn_next).flatten(2).transpose(1, 2)


def _scale_transition_torch(f_hat, h, phi_w, phi_b, ratio, pn_next, next_tokens):
    _check_transition(f_hat, h, phi_w, phi_b, pn_next, next_tokens)
    f_new, nxt = scale_transition_reference(f_hat, h, phi_w, phi_b, ratio, pn_next)
    f_hat.copy_(f_new)
    if nxt is not None:
        next_tokens.copy_(nxt)


def _scale_transition_fake(f_hat, h, phi_w, phi_b, ratio, pn_next, next_tokens):
    _check_transition(f_hat, h, phi_w, phi_b, pn_next, next_tokens)


def _check_kv(cache, x, name):
    torch._check(cache.dim() == 5 and x.dim() == 5, lambda: f"{name}: tensors must be (depth, R, H, L, c)")
    torch._check(cache.dtype == x.dtype, lambda: f"{name}: dtypes differ ({cache.dtype} vs {x.dtype})")
    for d in (0, 1, 2, 4):
        torch._check(cache.shape[d] == x.shape[d], lambda: f"{name}: shapes {tuple(cache.shape)} and {tuple(x.shape)} differ at dim {d}")


def _kv_write_torch(cache_k, cache_v, k_new, v_new, begin):
    _kv_write_fake(cache_k, cache_v, k_new, v_new, begin)
    end = begin + k_new.shape[3]
    cache_k[:, :, :, begin:end].copy_(k_new)
    cache_v[:, :, :, begin:end].copy_(v_new)


def _kv_write_fake(cache_k, cache_v, k_new, v_new, begin):
    _check_kv(cache_k, k_new, "kv_write")
    _check_kv(cache_v, v_new, "kv_write")
    torch._check(0 <= begin and begin + k_new.shape[3] <= cache_k.shape[3],
                 lambda: f"kv_write: [{begin}, {begin + k_new.shape[3]}) out of the cache's {cache_k.shape[3]} tokens")


def _kv_append_torch(dst, past, present):
    _kv_append_fake(dst, past, present)
    b = past.shape[3]
    dst[:, :, :, :b].copy_(past)
    dst[:, :, :, b:].copy_(present)


def _kv_append_fake(dst, past, present):
    _check_kv(dst, past, "kv_append")
    _check_kv(dst, present, "kv_append")
    torch._check(dst.shape[3] == past.shape[3] + present.shape[3],
                 lambda: f"kv_append: dst has {dst.shape[3]} tokens, past + present {past.shape[3] + present.shape[3]}")


# Every backend gets the PyTorch version; a CUDA kernel registered by the extension overrides it for CUDA.
_lib.impl("scale_transition", _scale_transition_torch, "CompositeExplicitAutograd")
_lib.impl("kv_write", _kv_write_torch, "CompositeExplicitAutograd")
_lib.impl("kv_append", _kv_append_torch, "CompositeExplicitAutograd")
torch.library.register_fake("var_rt::scale_transition", _scale_transition_fake, lib=_lib)
torch.library.register_fake("var_rt::kv_write", _kv_write_fake, lib=_lib)
torch.library.register_fake("var_rt::kv_append", _kv_append_fake, lib=_lib)


# ----------------------------------------------------------------------------------------------
# Extension loading
# ----------------------------------------------------------------------------------------------

_ext_path: Optional[str] = None
_ext_error: Optional[str] = None


def _candidates() -> list:
    env = os.environ.get("VAR_RT_EXT")
    if env is not None:
        return [] if env in ("", "0") else [env]
    here = Path(__file__).resolve().parent
    return sorted(glob.glob(str(here / "_var_rt_ops*.so")) + glob.glob(str(here / "_var_rt_ops*.pyd")))


def load_extension(path: Optional[str] = None) -> bool:
    """Load the CUDA extension (``path``, else $VAR_RT_EXT, else var_rt/_var_rt_ops*.so). True if loaded.

    Called on import. A missing library is not an error (the PyTorch implementations remain);
    one that fails to load leaves a warning and its reason in ``extension_error()``.
    """
    global _ext_path, _ext_error
    if _ext_path is not None:
        return True
    for cand in ([path] if path else _candidates()):
        try:
            torch.ops.load_library(cand)
        except (OSError, RuntimeError) as e:
            _ext_error = f"{cand}: {e}"
            warnings.warn(f"var_rt: CUDA extension not loaded, using the PyTorch ops ({_ext_error})", stacklevel=2)
            continue
        _ext_path, _ext_error = cand, None
        return True
    return False


def extension_loaded() -> bool:
    """True when the CUDA kernels of the extension are registered (the ops then run them on CUDA tensors)."""
    return _ext_path is not None and torch._C._dispatch_has_kernel_for_dispatch_key("var_rt::scale_transition", "CUDA")


def runs_on(device) -> bool:
    """Whether the extension's kernels run on ``device`` (a torch.device or a tensor's): built, loaded, CUDA.
    The one test of the CUDA fast paths (the fused transition, the KV writes); var_rt.kernels.runs_on is the
    one test of the Triton ones."""
    return torch.device(device).type == "cuda" and extension_loaded()


def extension_error() -> Optional[str]:
    """Why the last extension load failed, or None."""
    return _ext_error


load_extension()


# ----------------------------------------------------------------------------------------------
# Typed wrappers
# ----------------------------------------------------------------------------------------------

def scale_transition(f_hat: torch.Tensor, h: torch.Tensor, phi_w: torch.Tensor, phi_b: torch.Tensor,
                     ratio: float, pn_next: int, next_tokens: Optional[torch.Tensor] = None) -> None:
    """One scale transition, in place: ``f_hat += phi(bicubic_up(h))``; ``next_tokens = area(f_hat, pn_next)``.

    Args:
        f_hat: (B, Cv, P, P) float32, contiguous; updated in place.
        h: (B, pn*pn, Cv) code vectors of this scale (float32, float16 or bfloat16), contiguous; pn <= P.
            pn == P (the last scale) skips the upsample.
        phi_w: (Cv, Cv, 3, 3) phi conv weight; phi_b: (Cv,) bias, both in the compute dtype (float32,
            float16 or bfloat16; see ``transition_params``): the conv's operands are rounded to it, its
            products and sums, the blend and f_hat are float32 (var_rt.precision).
        ratio: phi's r in ``(1 - r) u + r conv(u)``.
        pn_next: next scale's grid side; 0 for the last scale.
        next_tokens: (B, pn_next^2, Cv), written in its own dtype (token-major, channel-last).
            Ignored (may be None) when pn_next == 0.
    """
    if next_tokens is None:
        if pn_next != 0:
            raise ValueError("scale_transition: next_tokens is required when pn_next > 0")
        next_tokens = f_hat.new_empty(0)
    torch.ops.var_rt.scale_transition(f_hat, h, phi_w, phi_b, float(ratio), int(pn_next), next_tokens)


def kv_write(cache_k: torch.Tensor, cache_v: torch.Tensor, k_new: torch.Tensor, v_new: torch.Tensor,
             begin: int) -> None:
    """``cache_{k,v}[:, :, :, begin:begin+l] = {k,v}_new`` in one launch.

    Args:
        cache_k, cache_v: (depth, R, H, L, c), contiguous (float16, bfloat16 or float32).
        k_new, v_new: (depth, R, H, l, c) of the same dtype; any strides with a unit channel stride.
        begin: first token position written.
    """
    torch.ops.var_rt.kv_write(cache_k, cache_v, k_new, v_new, int(begin))


def kv_append(dst: torch.Tensor, past: torch.Tensor, present: torch.Tensor) -> None:
    """``dst = cat(past, present, dim=3)`` into a preallocated ``dst``; all three contiguous, not overlapping.

    Args:
        dst: (depth, R, H, b + l, c).
        past: (depth, R, H, b, c) (b may be 0).
        present: (depth, R, H, l, c).
    """
    torch.ops.var_rt.kv_append(dst, past, present)


def transition_params(vae_quantizer: nn.Module, si: int) -> Tuple[torch.Tensor, torch.Tensor, float]:
    """(phi_w, phi_b, ratio) of scale ``si`` for ``scale_transition``: in phi's own dtype (the compute dtype),
    contiguous, on the model's device.

    A quantiser without phi (``nn.Identity``, |quant_resi| ~ 0) gives zero weights and ratio 0,
    which the op computes as the identity.
    """
    phi = vae_quantizer.phi(si)
    emb = vae_quantizer.embedding.weight
    if isinstance(phi, nn.Conv2d):
        w = phi.weight.detach().contiguous()
        b = phi.bias.detach().contiguous()
        return w, b, float(getattr(phi, "ratio"))
    if isinstance(phi, nn.Identity):
        Cv = emb.shape[1]
        return (torch.zeros(Cv, Cv, 3, 3, dtype=torch.float32, device=emb.device),
                torch.zeros(Cv, dtype=torch.float32, device=emb.device), 0.0)
    raise TypeError(f"transition_params: unsupported phi module {type(phi).__name__}")
