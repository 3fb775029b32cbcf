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
    if top_k > 0:  # top_k > V, an error upstream, keeps everything here as in var_rt
        k = min(top_k, logits.shape[-1])
        kth = logits.topk(k, largest=True, sorted=False, dim=-1)[0].amin(dim=-1, keepdim=True)
        logits.masked_fill_(logits < kth, -math.inf)
    if top_p > 0:
        s, idx = logits.sort(dim=-1, descending=False)
        remove = s.softmax(dim=-1).cumsum(dim=-1) <= (1 - top_p)
        remove[..., -1:] = False
        logits.masked_fill_(remove.scatter(idx.ndim - 1, idx, remove), -math.inf)
    return logits


def _kept(logits, top_k, top_p):
    mask = sampling.candidate_mask(logits, top_k, top_p)
    return torch.ones_like(logits, dtype=torch.bool) if mask is None else mask


FILTERS = [(0, 0.0), (1, 0.0), (50, 0.0), (0, 0.9), (40, 0.8), (900, 0.96), (3000, 0.5)]


@pytest.mark.parametrize("top_k,top_p", FILTERS)
def test_candidates_match_official(top_k, top_p):
    """Untied float32 rows: exactly the official kept set."""
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(3, 7, 2048, generator=g) * 3
    want = torch.isfinite(official_filter(logits, top_k, top_p))
    assert torch.equal(_kept(logits, top_k, top_p), want)


@pytest.mark.parametrize("top_k,top_p", FILTERS)
def test_candidates_with_fp16_ties(top_k, top_p):
    """FP16-rounded rows (many ties): top-k alone is exactly the official rule; with top-p, ours is
    the official set completed to whole groups of equal values, i.e. every logit >= the smallest
    logit the official code keeps."""
    g = torch.Generator().manual_seed(1)
    logits = (torch.randn(3, 7, 2048, generator=g) * 3).half().float()
    if 1 < top_k < 2048:  # the rows do tie at the k-th value, so the tie rule is exercised
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        assert ((logits >= kth).sum(-1) > top_k).any()
    official = torch.isfinite(official_filter(logits, top_k, top_p))
    got = _kept(logits, top_k, top_p)
    if top_p == 0:
        assert torch.equal(got, official)
    else:
        lowest = logits.masked_fill(~official, math.inf).amin(dim=-1, keepdim=True)
        assert torch.equal(got, logits >= lowest)


def _draw_counts(values, top_k, top_p, n=4000):
    """How often each id is drawn from the row ``values`` over n positions x 2 seeds."""
    logits = torch.tensor(values, dtype=torch.float32).expand(2, n, len(values)).contiguous()
    idx = sampling.sample_tokens(logits, torch.tensor([5, 6]), scale=4, top_k=top_k, top_p=top_p)
    return torch.bincount(idx.view(-1), minlength=len(values))


def test_top_k_keeps_every_tie_at_the_kth_value():
    values = [5.0, 4.0, 3.0, 3.0, 3.0, 1.0]
    logits = torch.tensor(values).view(1, 1, -1)
    assert _kept(logits, 3, 0.0).view(-1).tolist() == [True] * 5 + [False]
    counts = _draw_counts(values, 3, 0.0)
    p = torch.tensor(values[:5]).softmax(-1)  # the three 3s: 7.6% each
    assert counts[5] == 0 and (counts[:5] > 0).all(), counts
    freq = counts[:5].float() / counts.sum()
    assert ((freq - p).abs() < 5 * (p * (1 - p) / counts.sum()).sqrt()).all(), (freq, p)


def test_top_p_keeps_or_drops_a_tied_group_together():
    # p = softmax([2, 1, 1, 0]) = [.534, .197, .197, .072]: the mass above the 1s is .534.
    values = [2.0, 1.0, 1.0, 0.0]
    logits = torch.tensor(values).view(1, 1, -1)
    assert _kept(logits, 0, 0.6).view(-1).tolist() == [True, True, True, False]  # official: one of the 1s
    assert _kept(logits, 0, 0.5).view(-1).tolist() == [True, False, False, False]
    counts = _draw_counts(values, 0, 0.6)
    assert counts[3] == 0 and (counts[:3] > 0).all(), counts
    # Top-p normalises over every logit top-k kept, ties beyond the k-th included: over {5, 4, 3, 3, 3}
    # the mass above the 3s is .771 < .8, so they stay (normalising over 5, 4 and one 3 gives .91).
    logits = torch.tensor([5.0, 4.0, 3.0, 3.0, 3.0, 1.0]).view(1, 1, -1)
    assert _kept(logits, 3, 0.8).view(-1).tolist() == [True] * 5 + [False]
    assert _kept(logits, 3, 0.75).view(-1).tolist() == [True, True, False, False, False, False]


def _counters(l, V, stride=1 << 20):
    """Counters as sampling._noise makes them, written out: position * stride + vocabulary id."""
    return torch.arange(l).view(1, l, 1) * stride + torch.arange(V).view(1, 1, V)


def test_untied_tokens_do_not_depend_on_the_filter_form():
    """The noise of a token is its own (counter position * 2^20 + id): a top-k draw equals the
    draw over the full vocabulary with the removed logits set to -inf (no ties here)."""
    g = torch.Generator().manual_seed(2)
    logits = torch.randn(2, 9, 512, generator=g) * 2
    seeds = torch.tensor([3, 4])
    got = sampling.sample_tokens(logits, seeds, 6, 20, 0.0)
    noise = sampling.gumbel(sampling.stream_keys(seeds, 6, sampling.STREAM_TOKENS), _counters(9, 512))
    want = (official_filter(logits, 20, 0.0) + noise).argmax(-1)
    assert torch.equal(got, want)


def test_uniform_stays_below_one():
    """The top bin's midpoint rounds to 1.0 in float32; found by search: this counter hits it."""
    key = sampling.stream_keys(torch.tensor([0]), 0, sampling.STREAM_TOKENS)
    u = sampling.uniform(key, torch.tensor([[3107359]]))
    assert u.item() == sampling.U_MAX < 1.0
    assert torch.isfinite(sampling.gumbel(key, torch.tensor([[3107359]]))).all()


def test_request_keys_are_the_per_scale_stream_keys():
    seeds = torch.tensor([0, 1, 2 ** 40 + 5])
    keys = sampling.request_keys(seeds, 4)
    assert keys.shape == (3, 4)
    for k in range(4):
        assert torch.equal(keys[:, k], sampling.stream_keys(seeds, k, sampling.STREAM_TOKENS))


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


@pytest.mark.parametrize("top_k,top_p", [(0, 0.0), (6, 0.0), (0, 0.8), (12, 0.9)])
@pytest.mark.parametrize("ratio", [0.0, 4 / 9, 1.0])
def test_more_smooth_matches_official_formula(top_k, top_p, ratio):
    """Official Gumbel-softmax, written out from the same noise: tau = max(0.27 (1 - 0.95 ratio), 0.005),
    weights = softmax((filtered logits * (1 + ratio) + gumbel) / tau), codes = weights @ codebook."""
    g = torch.Generator().manual_seed(3)
    B, l, V, C = 2, 5, 64, 4
    logits = torch.randn(B, l, V, generator=g) * 2
    codebook = torch.randn(V, C, generator=g)
    seeds, scale = torch.tensor([9, 10]), 4
    filtered = 0 < top_k < V or top_p > 0
    noise = sampling.gumbel(sampling.stream_keys(seeds, scale, sampling.STREAM_SMOOTH),
                            _counters(l, V, stride=(1 << 20) if filtered else V))
    tau = max(0.27 * (1 - 0.95 * ratio), 0.005)
    weights = ((official_filter(logits, top_k, top_p) * (1 + ratio) + noise) / tau).softmax(dim=-1)
    want = weights @ codebook
    got = sampling.smooth_codes(logits, seeds, scale, ratio, top_k, top_p, codebook)
    assert got.shape == (B, l, C)
    assert torch.allclose(got, want, rtol=1e-5, atol=1e-5), (got - want).abs().max()


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


def test_request_buffer_packs_one_request(fx256):
    """The loop's request inputs are views of one packed buffer (one host -> device copy on a GPU): labels
    and guidance rows are the session's own input buffers, keys equal request_keys, edit tokens in place."""
    from var_rt.engines.torch_engine import TorchEngine
    from var_rt.runtime import EditSpec, ScaleLoop
    from var_rt.validation import Sampling

    cfg = fx256.cfg
    B, K = 3, cfg.num_scales
    loop = ScaleLoop(TorchEngine(fx256.var, fx256.vae), cfg, B, fx256.vae.quantize.embedding.weight)
    req = loop.request
    seeds = torch.tensor([5, 2 ** 33 + 1, 7])
    idx = [torch.randint(0, cfg.vae.vocab_size, (B, pn * pn)) for pn in cfg.patch_nums]
    keep = [torch.rand(1, pn * pn) < 0.5 for pn in cfg.patch_nums]
    params = Sampling(cfg=2.5, cfg_schedule="linear", top_k=37, top_p=0.83)
    loop.set_request(torch.tensor([1, 0, 3]), seeds, params, EditSpec(idx, keep))

    base = req._dev.data_ptr()
    for name, t in req.dev.items():  # every field inside the one buffer
        assert base <= t.data_ptr() < base + req._dev.numel(), name
    assert loop.session.buffers.labels.data_ptr() == req.dev["labels"].data_ptr()
    for si in range(K):
        assert loop.session.buffers.cfg_t[si].data_ptr() == req.dev["cfg_t"][si].data_ptr()
    assert loop.labels.tolist() == [1, 0, 3]
    assert torch.equal(loop.keys, torch.stack([sampling.stream_keys(seeds, k, sampling.STREAM_TOKENS)
                                               for k in range(K)], dim=1))
    t = sampling.guidance_schedule(2.5, "linear", K)
    assert torch.equal(loop.cfg_t[K - 1], torch.tensor([1 + t[-1], t[-1]], dtype=torch.float64).float())
    for si in range(K):
        assert torch.equal(loop.edit_idx[si], idx[si]) and torch.equal(loop.edit_keep[si], keep[si].expand(B, -1))
    # The filters: in the part sent with every request (before the edit tokens), read by the sampler from there.
    for name in ("top_k", "top_p"):
        assert req.dev[name].data_ptr() + req.dev[name].nbytes <= base + req.base_bytes, name
    assert loop.top_k.data_ptr() == req.dev["top_k"].data_ptr() and loop.top_p.data_ptr() == req.dev["top_p"].data_ptr()
    assert loop.top_k.tolist() == [37] and loop.top_p.dtype == torch.float32
    assert loop.top_p.item() == torch.tensor(0.83, dtype=torch.float32).item()
    # A top_k past the vocabulary (valid: it keeps every id) is stored as the vocabulary size.
    loop.set_request(torch.tensor([1, 0, 3]), seeds, Sampling(top_k=10 ** 30, top_p=0.0))
    assert loop.top_k.tolist() == [cfg.vae.vocab_size] and loop.top_p.tolist() == [0.0]


def test_request_keys_numpy_equal_torch():
    """The host derives keys with numpy (var_rt.runtime.RequestBuffer): the same values as on torch."""
    import numpy as np
    seeds = torch.tensor([0, 1, 3, 2 ** 40 + 5, 2 ** 62 + 12345])
    assert np.array_equal(sampling.request_keys(seeds.numpy(), 10), sampling.request_keys(seeds, 10).numpy())


FILTER_CASES = FILTERS + [(512, 0.9), (10 ** 6, 0.0), (0, 1.0), (2, 0.6)]


@pytest.mark.parametrize("fp16", [False, True], ids=["float32", "fp16-ties"])
def test_filters_read_on_the_device_give_the_same_draw(monkeypatch, fp16):
    """From tensors on a GPU (the scale loop's request buffer under a CUDA graph) the filters are read on the
    device: sampling._device_threshold, a full sort and fixed shapes. Forced here on CPU tensors (which are
    otherwise read as numbers), one pair of buffers refilled per setting as the loop does: the same candidates,
    tokens and smooth codes as from numbers."""
    g = torch.Generator().manual_seed(4)
    logits = torch.randn(2, 6, 512, generator=g) * 3
    if fp16:
        logits = logits.half().float()
    codebook = torch.randn(512, 4, generator=g)
    seeds = torch.tensor([5, 6])
    want = {(k, p): (_kept(logits, k, p), sampling.sample_tokens(logits, seeds, 3, k, p),
                     sampling.smooth_codes(logits, seeds, 3, 0.5, k, p, codebook)) for k, p in FILTER_CASES}
    monkeypatch.setattr(sampling, "_host_filters", lambda top_k, top_p: None)
    k_buf, p_buf = torch.zeros(1, dtype=torch.int64), torch.zeros(1, dtype=torch.float32)
    for (k, p), (kept, tokens, codes) in want.items():
        k_buf.fill_(k)
        p_buf.fill_(p)
        assert torch.equal(_kept(logits, k_buf, p_buf), kept), (k, p)
        assert torch.equal(sampling.sample_tokens(logits, seeds, 3, k_buf, p_buf), tokens), (k, p)
        assert torch.equal(sampling.smooth_codes(logits, seeds, 3, 0.5, k_buf, p_buf, codebook), codes), (k, p)


def test_filter_buffers_on_the_cpu_are_read_as_numbers():
    """CPU tensors (the loop's request buffer on the CPU) are read: the reference runs on numbers, bit for bit."""
    assert sampling._host_filters(torch.tensor([900]), torch.tensor([0.96], dtype=torch.float32)) == \
        (900, torch.tensor(0.96, dtype=torch.float32).item())
    assert sampling._host_filters(50, 0.9) == (50, 0.9)
    if torch.cuda.is_available():
        assert sampling._host_filters(torch.tensor([900], device="cuda"), 0.5) is None


class _CaptureStandIn:
    """Makes a CudaGraphLoop whose one CUDA-only step, ``capture``, is replaced by what a CUDA graph keeps of a
    run: the work ``ScaleLoop.run`` does for the arguments of the capture-time call, replayed on whatever the
    buffers hold at replay. As in a real graph, Python values taken from those arguments stay frozen: a loop
    that read top_k / top_p from ``params`` instead of its request buffer would replay the first request's."""

    @staticmethod
    def make(loop):
        import functools
        import types
        from var_rt.runtime import CudaGraphLoop

        class StandIn(CudaGraphLoop):
            def capture(self, params, edit):
                self.captures.append(self.loop.structure(params, edit))
                return types.SimpleNamespace(replay=functools.partial(self.loop.run, params, edit))

        loop.session.capturable = True  # the CPU session's steps compute eagerly: the stand-in calls them again
        runner = StandIn(loop)
        runner.captures = []
        return runner


def test_one_capture_serves_every_filter():
    """20 requests with different top_k / top_p at one batch size through the capturing runner: one capture (its
    key is the loop's structure: more_smooth and edit), and every replay draws that request's own tokens, the
    eager torch backend's."""
    from var_rt.runtime import ScaleLoop
    pipe, ref = _pipe(), _pipe()
    B = 1
    loop, ref_loop = (ScaleLoop(p.engine, p.cfg, B, p.codebook) for p in (pipe, ref))
    for lp in (loop, ref_loop):
        lp.session.decode = lambda: None  # tokens only: the decoder (most of a CPU call) is not what is tested
    runner = _CaptureStandIn.make(loop)
    pipe._loops.put(B, (loop, runner))
    ref._loops.put(B, (ref_loop, ref_loop))  # the eager loop, as the torch backend runs it
    settings = [(k, p) for k in (0, 1, 5, 40, 900) for p in (0.0, 0.3, 0.9, 0.96)]
    seen = set()
    for k, p in settings:
        got = pipe.generate(class_labels=[3], seed=11, top_k=k, top_p=p)
        want = ref.generate(class_labels=[3], seed=11, top_k=k, top_p=p)
        assert all(torch.equal(a, b) for a, b in zip(got.tokens, want.tokens)), (k, p)
        seen.add(tuple(torch.cat(got.tokens, dim=1).view(-1).tolist()))
    assert len(seen) > len(settings) // 2  # the settings do change the tokens, so a frozen filter would show
    assert runner.captures == [(False, False)] and list(runner.graphs) == [(False, False)]
    pipe.generate(class_labels=[3], seed=11, top_k=3, more_smooth=True)
    assert runner.captures == [(False, False), (True, False)]
