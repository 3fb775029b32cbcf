"""Sampling: guidance schedule, top-k / top-p, and per-image counter-based random numbers.

Randomness is a pure function of (image seed, scale, stream, token position,
vocabulary id), computed with integer hashing on whatever device holds the
logits. So an image depends only on its own seed and class, never on the rest
of the batch or on the device, and sampling needs no generator state and no
host round trip (it can be captured in a CUDA graph).

Sampling itself is the Gumbel-max trick: argmax(logits + Gumbel noise) over the
candidates kept by top-k and top-p is a draw from their softmax, the same
distribution the official ``torch.multinomial`` draws from.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Union

import torch

from var_rt import validation

_M32 = 0xFFFFFFFF
STREAM_TOKENS, STREAM_SMOOTH, STREAM_LABELS = 1, 2, 3


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values in [0, 2^32)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def stream_keys(seeds_B: torch.Tensor, scale: int, stream: int) -> torch.Tensor:
    """(B,) int64 keys in [0, 2^32) for one image seed, scale and purpose."""
    lo, hi = seeds_B & _M32, (seeds_B >> 32) & _M32
    k = _fmix32(lo ^ _fmix32((hi + 0x9E3779B9) & _M32))
    return _fmix32((k + scale * 0x632BE5AB + stream * 0x7FEB352D) & _M32)


def uniform(keys_B: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Uniform floats in (0, 1), shape (B, *counters.shape[1:]) from keys (B,) and int64 counters."""
    k = keys_B.view(-1, *([1] * (counters.dim() - 1)))
    h = _fmix32(_fmix32(counters ^ k) ^ ((k * 0x27D4EB2F) & _M32))
    return ((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))


def gumbel(keys_B: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(uniform(keys_B, counters)))


def guidance_schedule(cfg: float, schedule: Union[str, Sequence[float]], num_scales: int) -> List[float]:
    """Guidance strength t per scale; logits = (1 + t) * cond - t * uncond.

    ``linear`` (official): t = cfg * k / (K - 1), so 0 at the first scale and cfg at the last.
    ``constant``: t = cfg at every scale. A list gives t for each scale explicitly.
    """
    cfg, schedule = validation.number(cfg, "cfg"), validation.check_schedule(schedule, num_scales)
    if isinstance(schedule, str):
        if schedule == "linear":
            return [cfg * k / (num_scales - 1) for k in range(num_scales)]
        if schedule == "constant":
            return [cfg] * num_scales
    return list(schedule)


def validate_sampling(top_k: int, top_p: float, vocab: int) -> None:
    """The checks live in var_rt.validation (one validation for every entry point)."""
    validation.filters(top_k, top_p)


def candidates(logits_BlV: torch.Tensor, top_k: int, top_p: float):
    """Filter to the top-k / top-p candidates.

    Returns (values (B, l, k) with -inf where top-p removed a candidate, vocabulary ids (B, l, k) or None
    when every id is a candidate in natural order).
    """
    V = logits_BlV.shape[-1]
    if 0 < top_k < V:
        vals, ids = logits_BlV.topk(top_k, dim=-1, sorted=True)
    elif top_p > 0:
        vals, ids = logits_BlV.sort(dim=-1, descending=True)
    else:
        return logits_BlV, None
    if top_p > 0:
        probs = vals.softmax(dim=-1)
        # Official rule: drop tokens whose ascending cumulative mass is <= 1 - top_p, i.e. keep a
        # token while the mass of strictly more likely ones is < top_p. The most likely always stays.
        before = probs.cumsum(dim=-1) - probs
        vals = vals.masked_fill(before >= top_p, float("-inf"))
    return vals, ids


def _counters(vals: torch.Tensor, ids: Optional[torch.Tensor]) -> torch.Tensor:
    """Counter of each candidate: position * V + vocabulary id, so noise is tied to the token, not its rank."""
    l, k = vals.shape[-2], vals.shape[-1]
    pos = torch.arange(l, device=vals.device, dtype=torch.int64).view(1, l, 1)
    if ids is None:
        return pos * k + torch.arange(k, device=vals.device, dtype=torch.int64).view(1, 1, k)
    V = 1 << 20  # any bound above the vocabulary; fixed so counters do not depend on top_k
    return pos * V + ids


def sample_tokens(logits_BlV: torch.Tensor, seeds_B: torch.Tensor, scale: int,
                  top_k: int, top_p: float) -> torch.Tensor:
    """One token per position, (B, l) int64. Logits are float32."""
    vals, ids = candidates(logits_BlV, top_k, top_p)
    if vals.shape[-1] == 1:
        choice = torch.zeros(vals.shape[:-1] + (1,), dtype=torch.int64, device=vals.device)
    else:
        noise = gumbel(stream_keys(seeds_B, scale, STREAM_TOKENS), _counters(vals, ids))
        choice = (vals + noise).argmax(dim=-1, keepdim=True)
    return (choice if ids is None else ids.gather(-1, choice)).squeeze(-1)


def smooth_codes(logits_BlV: torch.Tensor, seeds_B: torch.Tensor, scale: int, ratio: float,
                 top_k: int, top_p: float, codebook_VC: torch.Tensor) -> torch.Tensor:
    """``more_smooth``: Gumbel-softmax mix of codebook vectors instead of a hard token, (B, l, Cvae).

    tau = max(0.27 * (1 - 0.95 ratio), 0.005) on logits * (1 + ratio), after top-k / top-p, as upstream.
    """
    vals, ids = candidates(logits_BlV, top_k, top_p)
    tau = max(0.27 * (1 - ratio * 0.95), 0.005)
    noise = gumbel(stream_keys(seeds_B, scale, STREAM_SMOOTH), _counters(vals, ids))
    w = ((vals * (1 + ratio) + noise) / tau).softmax(dim=-1)  # (B, l, k)
    if ids is None:
        return w @ codebook_VC.float()
    return (w.unsqueeze(-2) @ codebook_VC.float()[ids]).squeeze(-2)


def random_labels(seeds_B: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A class per image drawn from its own seed (used when no labels are given)."""
    return uniform(stream_keys(seeds_B, 0, STREAM_LABELS), torch.zeros(1, dtype=torch.int64)) \
        .mul(num_classes).long().clamp_(max=num_classes - 1).view(-1)
