"""Sampling: same candidate sets as the official filter, correct distribution, per-image seeds."""
import math

import pytest
import torch

from conftest import get_fixture
from var_rt import sampling
from var_rt.errors import GpuMemoryError, InputError
from var_rt.pipeline import VARPipeline


def official_filter(logits_BlV, top_k, top_p):
    """The official top-k / top-p masking (sample_with_top_k_top_p_ before multinomial), written out."""
    logits = logits_BlV.clone()
    if top_k > 0:
        kth = logits.topk(top_k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, -math.inf)
    if top_p > 0:
        s, idx = logits.sort(dim=-1, descending=False)
        remove = s.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits.masked_fill_(remove.scatter(idx.ndim - 1, idx, remove), -math.inf)
    return logits


@pytest.mark.parametrize("top_k,top_p", [(0, 0.0), (1, 0.0), (50, 0.0), (0, 0.9), (40, 0.8), (900, 0.96)])
def test_candidates_match_official(top_k, top_p):
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 2048, generator=g) * 3
    want = torch.isfinite(official_filter(logits, top_k, top_p))
    vals, ids = sampling.candidates(logits, top_k, top_p)
    got = torch.zeros_like(want)
    keep = torch.isfinite(vals)
    if ids is None:
        got = keep
    else:
        got.scatter_(-1, ids, keep)
    assert torch.equal(got, want)


def test_sampling_distribution_matches_softmax():
    """Frequencies of 20k draws (different positions, same logits) follow the filtered softmax."""
    V, n = 16, 20000
    logits = torch.linspace(-2, 2, V).expand(1, n, V).contiguous()
    idx = sampling.sample_tokens(logits, torch.tensor([123]), scale=3, top_k=0, top_p=0.0)
    freq = torch.bincount(idx.view(-1), minlength=V).float() / n
    p = logits[0, 0].softmax(-1)
    # 5 sigma of a binomial proportion
    assert ((freq - p).abs() <= 5 * (p * (1 - p) / n).sqrt() + 1e-4).all(), (freq, p)
    idx_k = sampling.sample_tokens(logits, torch.tensor([123]), scale=3, top_k=4, top_p=0.0)
    assert set(idx_k.unique().tolist()) == {12, 13, 14, 15}


def test_noise_depends_only_on_own_seed():
    logits = torch.randn(1, 5, 64).expand(3, 5, 64).contiguous()
    a = sampling.sample_tokens(logits, torch.tensor([7, 8, 9]), 2, 0, 0.0)
    b = sampling.sample_tokens(logits[:1], torch.tensor([8]), 2, 0, 0.0)
    assert torch.equal(a[1:2], b)
    assert not torch.equal(a[0], a[1]) or not torch.equal(a[1], a[2])


def test_guidance_schedules():
    assert sampling.guidance_schedule(1.5, "linear", 10)[0] == 0
    assert sampling.guidance_schedule(1.5, "linear", 10)[-1] == pytest.approx(1.5)
    assert sampling.guidance_schedule(2.0, "constant", 3) == [2.0, 2.0, 2.0]
    assert sampling.guidance_schedule(0, [1, 2, 3], 3) == [1, 2, 3]
    with pytest.raises(InputError):
        sampling.guidance_schedule(1, "cosine", 10)


def _pipe():
    fx = get_fixture("var_tiny_256")
    return VARPipeline(fx.cfg, fx.var, fx.vae, torch.device("cpu"), torch.float32, progress=False)


def test_image_depends_only_on_seed_and_class():
    pipe = _pipe()
    alone = pipe.generate(class_labels=[4], seed=[11], top_k=50, top_p=0.9)
    mixed = pipe.generate(class_labels=[1, 4, 9], seed=[3, 11, 5], top_k=50, top_p=0.9)
    for t_alone, t_mixed in zip(alone.tokens, mixed.tokens):
        assert torch.equal(t_alone[0], t_mixed[1])
    assert (alone.images[0] - mixed.images[1]).abs().max() < 1e-4
    other = pipe.generate(class_labels=[4], seed=[12], top_k=50, top_p=0.9)
    assert not all(torch.equal(a, b) for a, b in zip(alone.tokens, other.tokens))


def test_more_smooth_runs_and_differs():
    pipe = _pipe()
    hard = pipe.generate(class_labels=[2], seed=1)
    smooth = pipe.generate(class_labels=[2], seed=1, more_smooth=True)
    assert smooth.images.shape == hard.images.shape
    assert torch.isfinite(smooth.images).all()
    assert (smooth.images - hard.images).abs().max() > 1e-3


def test_outputs_as_numpy_and_pil():
    res = _pipe().generate(class_labels=[0, 1], seed=0)
    arr = res.numpy()
    assert arr.shape == (2, 256, 256, 3) and arr.dtype.name == "uint8"
    assert res.pil()[0].size == (256, 256)
    assert res.labels == [0, 1] and res.seeds == [0, 1]


def test_class_ids_checked():
    pipe = _pipe()
    with pytest.raises(InputError, match="out of range"):
        pipe.generate(class_labels=[-1])
    pipe.generate(class_labels=[10], top_k=1)  # 10 = the null class of this 10-class model


def test_out_of_memory_is_reported_and_pipeline_recovers(monkeypatch):
    """An OOM inside the loop becomes one clear error naming the batch size; the next call works."""
    from var_rt.runtime import ScaleLoop
    pipe = _pipe()
    real_run = ScaleLoop.run
    calls = {"n": 0}

    def run_once_oom(self, *args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 GiB")
        return real_run(self, *args, **kwargs)

    monkeypatch.setattr(ScaleLoop, "run", run_once_oom)
    with pytest.raises(GpuMemoryError, match="out of GPU memory at batch size 2"):
        pipe.generate(class_labels=[1, 2], top_k=1)
    assert pipe.generate(class_labels=[1, 2], top_k=1).images.shape[0] == 2
