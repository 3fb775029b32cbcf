"""The fused Triton sampler draws the same tokens as the PyTorch reference (var_rt.sampling).

Without a GPU the kernel runs on CPU tensors under TRITON_INTERPRET=1 (set here before the kernel
module imports triton). Token ids are compared for exact equality: the random bits are integer
hashes (identical by construction), the uniforms are exact float32 operations, and the only
possible difference is an ulp of log() between torch and Triton, which could flip an argmax only
where the two best perturbed logits of a row are within ~1e-6 of each other; none of these rows
are, so a mismatch here is a real difference in candidates or noise.
"""
import os

import pytest
import torch

DEV = torch.device("cuda" if torch.cuda.is_available() else "cpu")
if DEV.type == "cpu":
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton", reason="triton is not installed (pip install triton): fused kernels untested")

from var_rt import sampling  # noqa: E402
from var_rt.kernels import sampler  # noqa: E402

if not sampler.available(torch.zeros(1, device=DEV)):
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set: the kernel cannot run on CPU",
                allow_module_level=True)

SCALE, NUM_SCALES = 3, 6


def _run(logits, seeds, top_k, top_p, codebook, guidance=None):
    """sample_fused into views of larger buffers (as the scale loop's), returns (ids, h, ids buffer)."""
    B, l = seeds.shape[0], logits.shape[1]
    keys = sampling.request_keys(seeds, NUM_SCALES)[:, SCALE]  # a column: strided
    ids_buf = torch.full((B, l + 3), -1, dtype=torch.int64, device=DEV)
    h = torch.full((B, l, codebook.shape[1]), float("nan"), device=DEV)
    sampler.sample_fused(logits, keys, top_k, top_p, codebook, ids_buf[:, 2:2 + l], h, guidance)
    return ids_buf[:, 2:2 + l], h, ids_buf


def _reference(logits, seeds, top_k, top_p):
    return sampling.sample_tokens(logits, seeds, SCALE, top_k, top_p)


@pytest.mark.parametrize("B,l,V,Cv", [(2, 5, 64, 4), (3, 4, 100, 5), (1, 3, 4096, 8)])
@pytest.mark.parametrize("top_k,top_p", [(0, 0.0), (1, 0.0), (7, 0.0), (0, 0.7), (10, 0.5), (40, 0.95),
                                         (10 ** 6, 0.9), (0, 1.0)])
def test_same_tokens_as_reference(B, l, V, Cv, top_k, top_p):
    g = torch.Generator().manual_seed(V + top_k)
    logits = (torch.randn(B, l, V, generator=g) * 3).to(DEV)
    codebook = torch.randn(V, Cv, generator=g).to(DEV)
    seeds = torch.arange(B, device=DEV) * 1000 + 17
    ids, h, ids_buf = _run(logits, seeds, top_k, top_p, codebook)
    assert torch.equal(ids, _reference(logits, seeds, top_k, top_p))
    assert torch.equal(h, codebook[ids])
    assert (ids_buf[:, :2] == -1).all() and (ids_buf[:, 2 + l:] == -1).all()  # only the view is written


@pytest.mark.parametrize("top_k,top_p", [(2, 0.0), (2, 0.6), (0, 0.6)])
def test_ties_at_the_thresholds(top_k, top_p):
    """Every tied logit at the k-th value (and a whole tied group at the top-p boundary) is drawn,
    exactly as by the reference. (2, 0.6): the mass above the 3s is .475 over all of them, .73
    over the top 2 alone, so the tied ones beyond k must count in the normalisation."""
    row = [4.0, 3.0, 3.0, 3.0, 0.0] if top_k else [2.0, 1.0, 1.0, 0.0, -1.0]
    logits = torch.tensor(row, device=DEV).expand(2, 40, len(row)).contiguous()
    codebook = torch.randn(len(row), 3).to(DEV)
    seeds = torch.tensor([1, 2], device=DEV)
    ids, _, _ = _run(logits, seeds, top_k, top_p, codebook)
    assert torch.equal(ids, _reference(logits, seeds, top_k, top_p))
    kept = sampling.candidate_mask(logits[:1, :1], top_k, top_p).view(-1)
    assert kept.sum() == (4 if top_k else 3)  # ties beyond k, or a two-member group, are candidates
    assert torch.equal(torch.bincount(ids.reshape(-1), minlength=len(row)) > 0, kept)


def test_fp16_ties():
    g = torch.Generator().manual_seed(5)
    logits = (torch.randn(2, 6, 512, generator=g) * 3).half().float().to(DEV)
    codebook = torch.randn(512, 4, generator=g).to(DEV)
    seeds = torch.tensor([8, 9], device=DEV)
    for top_k, top_p in [(50, 0.0), (50, 0.9), (0, 0.8)]:
        ids, _, _ = _run(logits, seeds, top_k, top_p, codebook)
        assert torch.equal(ids, _reference(logits, seeds, top_k, top_p)), (top_k, top_p)


def test_guidance_mixed_in_the_kernel():
    """The (2B, l, V) variant mixes (1 + t) cond - t uncond itself: same tokens as mixing first."""
    g = torch.Generator().manual_seed(6)
    B, l, V = 2, 4, 256
    both = torch.randn(2 * B, l, V, generator=g).to(DEV)
    codebook = torch.randn(V, 4, generator=g).to(DEV)
    seeds = torch.tensor([3, 4], device=DEV)
    t = torch.tensor([1.7], device=DEV)
    mixed = (1 + t) * both[:B] - t * both[B:]
    for top_k, top_p in [(0, 0.0), (20, 0.9)]:
        ids, h, _ = _run(both, seeds, top_k, top_p, codebook, guidance=(1 + t, t))
        assert torch.equal(ids, _reference(mixed, seeds, top_k, top_p))
        assert torch.equal(h, codebook[ids])


def test_bad_buffers_are_refused():
    logits = torch.randn(2, 3, 64, device=DEV)
    codebook = torch.randn(64, 4, device=DEV)
    keys = sampling.request_keys(torch.tensor([1, 2], device=DEV), 2)[:, 0]
    h = torch.empty(2, 3, 4, device=DEV)
    with pytest.raises(ValueError, match="ids_out must be torch.int64"):
        sampler.sample_fused(logits, keys, 5, 0.0, codebook, torch.empty(2, 3, dtype=torch.int32, device=DEV), h)
    with pytest.raises(ValueError, match="logits must be a contiguous float32"):
        sampler.sample_fused(logits.half(), keys, 5, 0.0, codebook, torch.empty(2, 3, dtype=torch.int64,
                                                                                device=DEV), h)


def test_filters_read_from_device_tensors():
    """top_k / top_p as the scale loop passes them: 1-element views of a packed buffer, refilled between
    launches (as between replays of a captured loop). Each launch draws with the values the buffer holds
    then, the reference's tokens for them; off filters (0, or top_k >= V) included."""
    g = torch.Generator().manual_seed(7)
    B, l, V = 2, 3, 64
    logits = (torch.randn(B, l, V, generator=g) * 3).to(DEV)
    codebook = torch.randn(V, 4, generator=g).to(DEV)
    seeds = torch.tensor([21, 22], device=DEV)
    buf = torch.zeros(128, dtype=torch.uint8, device=DEV)
    k_buf, p_buf = buf[:8].view(torch.int64), buf[64:68].view(torch.float32)
    for top_k, top_p in [(0, 0.0), (5, 0.0), (0, 0.6), (12, 0.9), (64, 0.3), (1, 1.0), (3, 0.5)]:
        k_buf.fill_(top_k)
        p_buf.fill_(top_p)
        ids, h, _ = _run(logits, seeds, k_buf, p_buf, codebook)
        assert torch.equal(ids, _reference(logits, seeds, top_k, top_p)), (top_k, top_p)
        assert torch.equal(h, codebook[ids])


def test_bad_filter_tensors_are_refused():
    logits = torch.randn(2, 3, 64, device=DEV)
    codebook = torch.randn(64, 4, device=DEV)
    keys = sampling.request_keys(torch.tensor([1, 2], device=DEV), 2)[:, 0]
    ids, h = torch.empty(2, 3, dtype=torch.int64, device=DEV), torch.empty(2, 3, 4, device=DEV)
    p = torch.tensor([0.5], device=DEV)
    with pytest.raises(ValueError, match="top_k must be a number or a 1-element torch.int64"):
        sampler.sample_fused(logits, keys, torch.tensor([5], dtype=torch.int32, device=DEV), p, codebook, ids, h)
    with pytest.raises(ValueError, match="top_p must be a number or a 1-element torch.float32"):
        sampler.sample_fused(logits, keys, 5, torch.tensor([0.5, 0.5], device=DEV), codebook, ids, h)
