"""Sampling: guidance schedule, top-k / top-p, and per-image counter-based random numbers.

Randomness is a pure function of (image seed, scale, stream, token position,
vocabulary id), computed with integer hashing on whatever device holds the
logits. So an image depends only on its own seed and class, never on the rest
of the batch or on the device, and sampling needs no generator state and no
host round trip (it can be captured in a CUDA graph).

Which tokens can be drawn (the candidates) is a threshold on the float32 logits:
the kept set of a row is ``{logit >= tau}``, tau = max(t_k, t_p).

- Top-k, the official rule (VAR's ``sample_with_top_k_top_p_``): t_k is the k-th
  largest logit of the row and every logit >= t_k stays, so ties at the k-th value
  all stay and more than k tokens can be candidates (common with FP16 logits).
  t_k = -inf when top_k is 0 (off) or >= V.
- Top-p, tie-symmetric: with p the softmax over the top-k-kept logits (all tied
  logits included in the normalisation), a logit v stays iff the mass of kept
  logits strictly greater than v is < top_p; the largest always stays. t_p is the
  smallest logit that stays. Without ties this is exactly the official rule
  (ascending cumulative mass <= 1 - top_p removed). With ties the official code
  keeps some of a group of equal logits and drops others in whatever order its
  sort leaves them; equal logits are the same candidate in every respect, so ours
  keeps or drops the whole group together, which also makes the kept set a
  threshold that a fused kernel can find without sorting.

top_k and top_p are numbers, or 1-element tensors: the scale loop passes the
values of its request buffer (var_rt.runtime.RequestBuffer), so one captured CUDA
graph serves every request whatever its filters. Tensors in CPU memory are read
(free) and the values used as numbers, bit for bit the same results. With numbers
the thresholds come from the sorted top-k values plus a count of the tied logits
beyond k (a full sort when top-k is off); from tensors on a GPU, which cannot be
read without waiting for the device, from a full sort and the k-th value gathered
on the device (``_device_threshold``: same rule, no host read, fixed shapes).

Sampling itself is the Gumbel-max trick: argmax(logits + Gumbel noise) over the
kept ids is a draw from their softmax, the same distribution the official
``torch.multinomial`` draws from. The noise of a vocabulary id comes from the
counter position * 2^20 + id whenever a filter is on (position * V + id when both
are off), so it is tied to the token, not to its rank, and does not depend on top_k.
``var_rt/kernels/sampler.py`` is a fused Triton version of the same draw.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple, Union

import numpy as np
import torch

from var_rt import validation
from var_rt.validation import DEFAULTS, Sampling  # noqa: F401 (defined beside their checks, torch-free)

_M32 = 0xFFFFFFFF
STREAM_TOKENS, STREAM_SMOOTH, STREAM_LABELS = 1, 2, 3


def _fmix32(h: torch.Tensor) -> torch.Tensor:
    """MurmurHash3's 32-bit finaliser on int64 tensors holding values in [0, 2^32)."""
    h = h ^ (h >> 16)
    h = (h * 0x85EBCA6B) & _M32
    h = h ^ (h >> 13)
    h = (h * 0xC2B2AE35) & _M32
    return h ^ (h >> 16)


def stream_keys(seeds_B: torch.Tensor, scale, stream: int) -> torch.Tensor:
    """(B,) int64 keys in [0, 2^32) for one image seed, scale and purpose (``scale`` may be a tensor that
    broadcasts against the seeds)."""
    lo, hi = seeds_B & _M32, (seeds_B >> 32) & _M32
    k = _fmix32(lo ^ _fmix32((hi + 0x9E3779B9) & _M32))
    return _fmix32((k + scale * 0x632BE5AB + stream * 0x7FEB352D) & _M32)


def request_keys(seeds_B: torch.Tensor, num_scales: int) -> torch.Tensor:
    """(B, K) int64 token-draw keys of every scale, derived once per request (column k: scale k).

    All scales in one broadcast pass (a few dozen integer ops whatever B and K). ``seeds_B`` may be a
    torch tensor or a numpy int64 array (the same arithmetic: the scale loop derives the keys on the host
    with numpy, microseconds per request; var_rt.runtime.RequestBuffer).
    """
    if isinstance(seeds_B, np.ndarray):
        scales = np.arange(num_scales, dtype=np.int64).reshape(1, -1)
    else:
        scales = torch.arange(num_scales, dtype=torch.int64, device=seeds_B.device).view(1, -1)
    with np.errstate(over="ignore"):  # products wrap in int64 like torch's; only the low 32 bits are kept
        return stream_keys(seeds_B.reshape(-1, 1), scales, STREAM_TOKENS)


# The largest float32 below 1. The midpoint of the top bin, 1 - 2^-25, rounds to 1.0 in float32, which
# would make the Gumbel noise +inf (a NaN on a removed logit, a NaN Gumbel-softmax on a kept one).
U_MAX = 1.0 - 2.0 ** -24


def uniform(keys_B: torch.Tensor, counters: torch.Tensor) -> torch.Tensor:
    """Uniform floats in (0, 1), shape (B, *counters.shape[1:]) from keys (B,) and int64 counters.

    The midpoints ((h >> 8) + 0.5) / 2^24 of 2^24 equal bins, in float32; the top bin gives U_MAX.
    """
    k = keys_B.view(-1, *([1] * (counters.dim() - 1)))
    h = _fmix32(_fmix32(counters ^ k) ^ ((k * 0x27D4EB2F) & _M32))
    return (((h >> 8).to(torch.float32) + 0.5) * (1.0 / (1 << 24))).clamp_(max=U_MAX)


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


COUNTER_STRIDE = 1 << 20  # counters per position when a filter is on: any bound above the vocabulary

Filter = Union[int, float, torch.Tensor]  # a number, or a 1-element tensor (int64 top_k, float32 top_p)


def _host_filters(top_k: Filter, top_p: Filter) -> Optional[Tuple[int, float]]:
    """(top_k, top_p) as numbers; None when either is a tensor on a GPU (read there: ``_device_threshold``).

    A tensor in CPU memory is read for nothing, so on the CPU the reference runs on the values as numbers.
    A GPU tensor is not read: that would wait for the device, and in a CUDA graph capture it would fail
    (or freeze the first request's values into the graph).
    """
    if any(torch.is_tensor(v) and v.device.type != "cpu" for v in (top_k, top_p)):
        return None
    return int(top_k), float(top_p)


def _threshold(logits_BlV: torch.Tensor, top_k: int, top_p: float) -> Optional[torch.Tensor]:
    """tau (B, l, 1) float32 from numbers: a row's candidates are its logits >= tau. None: no filter.

    No host sync (the shapes follow top_k). Top-k: t_k = the k-th of the sorted top-k values; ``beyond``
    counts the logits tied with it that topk left out, so they still count in the top-p normalisation.
    """
    V = logits_BlV.shape[-1]
    if 0 < top_k < V:
        vals = logits_BlV.topk(top_k, dim=-1, sorted=True).values  # (B, l, k), descending
        t_k = vals[..., -1:]
        if top_p <= 0:
            return t_k
        beyond = (logits_BlV >= t_k).sum(dim=-1, keepdim=True) - top_k
    elif top_p > 0:
        vals, beyond = logits_BlV.sort(dim=-1, descending=True).values, 0
    else:
        return None
    e = (vals - vals[..., :1]).exp()
    probs = e / (e.sum(dim=-1, keepdim=True) + beyond * e[..., -1:])
    ahead = probs.cumsum(dim=-1) - probs  # mass of the entries before each one in sorted order
    # At the first entry of a group of equal values, `ahead` is the mass strictly above the group, so
    # the group stays iff that entry passes (ahead < top_p; the largest always does). Later entries
    # of the group may fail, but t_p = the smallest passing value, and logits >= t_p keeps them all.
    return vals.masked_fill(ahead >= top_p, float("inf")).amin(dim=-1, keepdim=True)


def _device_threshold(logits_BlV: torch.Tensor, top_k: torch.Tensor, top_p: torch.Tensor
                      ) -> Tuple[torch.Tensor, torch.Tensor]:
    """(tau (B, l, 1), filtered (1, 1, 1) bool) from 1-element tensors, read on the device: fixed shapes, no
    host synchronisation, so it runs inside a CUDA graph whatever values the request buffer holds.

    The rule of ``_threshold`` over the full sorted row (top-k's size changes per request, so ``topk``
    cannot be used): t_k = the k-th sorted value, the top-p mass normalised over every logit >= t_k (ties
    at the k-th value included), t_p = the smallest value whose mass ahead is < top_p. tau = -inf where
    both filters are off. The same candidates as from numbers up to float rounding of the mass sums (the
    normaliser is summed in another order), i.e. except where a mass lies within an ulp of top_p.
    """
    V, dev = logits_BlV.shape[-1], logits_BlV.device
    k = torch.as_tensor(top_k, device=dev).reshape(1, 1, 1).long()  # no copy for the loop's device tensors
    p = torch.as_tensor(top_p, device=dev).reshape(1, 1, 1).float()
    k_on, p_on = (k > 0) & (k < V), p > 0
    vals = logits_BlV.sort(dim=-1, descending=True).values  # (B, l, V)
    kth = vals.gather(-1, (k.clamp(1, V) - 1).expand(*vals.shape[:-1], 1))
    t_k = kth.masked_fill(~k_on, float("-inf"))
    e = (vals - vals[..., :1]).exp().masked_fill(vals < t_k, 0.0)  # the logits top-k keeps
    probs = e / e.sum(dim=-1, keepdim=True)
    ahead = probs.cumsum(dim=-1) - probs
    t_p = vals.masked_fill(ahead >= p, float("inf")).amin(dim=-1, keepdim=True).masked_fill(~p_on, float("-inf"))
    return torch.maximum(t_k, t_p), k_on | p_on


def _candidates(logits_BlV: torch.Tensor, top_k: Filter, top_p: Filter):
    """(keep (B, l, V) bool or None when every id is a candidate, filtered: bool or (1, 1, 1) bool tensor)."""
    host = _host_filters(top_k, top_p)
    if host is None:
        tau, filtered = _device_threshold(logits_BlV, top_k, top_p)
        return (logits_BlV >= tau) | ~filtered, filtered
    tau = _threshold(logits_BlV, *host)
    return (None, False) if tau is None else (logits_BlV >= tau, True)


def candidate_mask(logits_BlV: torch.Tensor, top_k: Filter, top_p: Filter) -> Optional[torch.Tensor]:
    """(B, l, V) bool, True for the candidates; None when both filters are off (every id is one)."""
    return _candidates(logits_BlV, top_k, top_p)[0]


def _noise(keys_B: torch.Tensor, logits_BlV: torch.Tensor, filtered) -> torch.Tensor:
    """(B, l, V) Gumbel noise from the counter position * stride + vocabulary id.

    stride = COUNTER_STRIDE when a filter is on, so the noise of a token does not depend on top_k;
    V when both are off. ``filtered``: a bool, or a bool tensor read on the device.
    """
    l, V = logits_BlV.shape[-2:]
    dev = logits_BlV.device
    if torch.is_tensor(filtered):
        stride = torch.where(filtered, COUNTER_STRIDE, V)
    else:
        stride = COUNTER_STRIDE if filtered else V
    counters = (torch.arange(l, device=dev, dtype=torch.int64).view(1, l, 1) * stride
                + torch.arange(V, device=dev, dtype=torch.int64).view(1, 1, V))
    return gumbel(keys_B, counters)


def _perturbed(logits_BlV: torch.Tensor, keys_B: torch.Tensor, top_k: Filter, top_p: Filter,
               mul: float = 1.0) -> torch.Tensor:
    """logits * mul + Gumbel noise on the candidates, -inf elsewhere (B, l, V).

    A fill rather than adding -inf logits, so a removed id can never come out as NaN.
    """
    keep, filtered = _candidates(logits_BlV, top_k, top_p)
    scores = (logits_BlV * mul if mul != 1.0 else logits_BlV) + _noise(keys_B, logits_BlV, filtered)
    return scores if keep is None else scores.masked_fill(~keep, float("-inf"))


def draw_tokens(logits_BlV: torch.Tensor, keys_B: torch.Tensor, top_k: Filter, top_p: Filter) -> torch.Tensor:
    """One token per position, (B, l) int64, from this scale's keys (B,) (a column of request_keys).

    The PyTorch reference of ``var_rt.kernels.sampler.sample_fused``.
    """
    return _perturbed(logits_BlV, keys_B, top_k, top_p).argmax(dim=-1)


def sample_tokens(logits_BlV: torch.Tensor, seeds_B: torch.Tensor, scale: int,
                  top_k: int, top_p: float) -> torch.Tensor:
    """One token per position, (B, l) int64. Logits are float32."""
    return draw_tokens(logits_BlV, stream_keys(seeds_B, scale, STREAM_TOKENS), top_k, top_p)


def smooth_codes(logits_BlV: torch.Tensor, seeds_B: torch.Tensor, scale: int, ratio: float,
                 top_k: Filter, top_p: Filter, codebook_VC: torch.Tensor) -> torch.Tensor:
    """``more_smooth``: Gumbel-softmax mix of codebook vectors instead of a hard token, (B, l, Cvae).

    tau = max(0.27 * (1 - 0.95 ratio), 0.005) on logits * (1 + ratio), over the same candidates as
    the token draw (removed ids get weight 0), as upstream.
    """
    tau = max(0.27 * (1 - ratio * 0.95), 0.005)
    keys = stream_keys(seeds_B, scale, STREAM_SMOOTH)
    w = (_perturbed(logits_BlV, keys, top_k, top_p, mul=1 + ratio) / tau).softmax(dim=-1)  # (B, l, V)
    return w @ codebook_VC.float()


def random_labels(seeds_B: torch.Tensor, num_classes: int) -> torch.Tensor:
    """A class per image drawn from its own seed (used when no labels are given)."""
    return uniform(stream_keys(seeds_B, 0, STREAM_LABELS), torch.zeros(1, dtype=torch.int64)) \
        .mul(num_classes).long().clamp_(max=num_classes - 1).view(-1)
