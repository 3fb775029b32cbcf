"""GPU checks of the runtime (skipped without CUDA): CUDA-graph parity with the fixtures, FP16 accuracy.

Run on a GPU machine with `python -m pytest -q tests/test_cuda_backends.py -rs`.
"""
import pytest
import torch

from conftest import get_fixture, token_mismatch
from var_rt.config import get_preset
from var_rt.models.var import VAR
from var_rt.models.vqvae import VQVAE
from var_rt.pipeline import VARPipeline, init_random_weights
from var_rt.runtime import EditSpec, ScaleLoop
from var_rt.validation import Sampling

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


@pytest.fixture(autouse=True)
def exact_fp32():
    # Float32 parity: no TF32 in matmuls or convolutions.
    old = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = old


@pytest.mark.parametrize("backend", ["torch", "cudagraph"])
@pytest.mark.parametrize("name", ["var_tiny_256", "var_tiny_512_saln"])
def test_greedy_fixture_fp32(backend, name):
    fx = get_fixture(name)
    c = fx.cases
    pipe = VARPipeline(fx.cfg, VAR(fx.cfg), VQVAE(fx.cfg.vae), torch.device("cuda"), torch.float32,
                       backend=backend, progress=False)
    pipe.var.load_state_dict(fx.var.state_dict())
    pipe.vae.load_state_dict(fx.vae.state_dict())
    labels = c["labels"].tolist()
    for _ in range(2):  # the second call replays the captured graph
        res = pipe.generate(class_labels=labels, seed=0, cfg=float(c["greedy_cfg"]), top_k=1, top_p=0.0)
        bad, total = token_mismatch(res.tokens, c["greedy_tokens"])
        assert bad <= total * 0.003, f"{bad}/{total} tokens differ"
        assert (res.images - c["greedy_image"]).abs().max() < 2e-3


def _peaked_d16(seed=0):
    """d16-size random weights with peaked logits.

    The official initialisation gives near-flat logits (every token about equally likely), where
    greedy tokens flip on rounding noise. Scaling the head's weights to N(0, 0.16^2) gives logits with
    a standard deviation of about 5 over the 4096 tokens, like a trained model's peaked predictions.
    """
    cfg = get_preset("d16")
    var, vae = VAR(cfg), VQVAE(cfg.vae)
    init_random_weights(var, vae, seed)
    with torch.no_grad():
        var.head.weight.mul_(8.0)
    return cfg, var, vae


def _teacher_forced_logits(cfg, var, vae, dtype, backend, idx, labels):
    """Logits of every scale when the given tokens are forced (an all-keep edit), cfg 1.5."""
    pipe = VARPipeline(cfg, var, vae, torch.device("cuda"), dtype, backend=backend, progress=False)
    B = labels.shape[0]
    loop = ScaleLoop(pipe.engine, cfg, B, pipe.vae.quantize.embedding.weight)
    keep = [torch.ones(1, pn * pn, dtype=torch.bool) for pn in cfg.patch_nums]
    params = Sampling(cfg=1.5, top_k=1, top_p=0.0)
    loop.set_request(labels, torch.arange(B), params, EditSpec(idx, keep))
    loop.run(params, edit=True)
    torch.cuda.synchronize()
    return [l.float().cpu() for l in loop.logits]


def test_fp16_teacher_forced_logits_d16():
    cfg, var, vae = _peaked_d16()
    g = torch.Generator().manual_seed(1)
    B = 2
    idx = [torch.randint(0, cfg.vae.vocab_size, (B, pn * pn), generator=g) for pn in cfg.patch_nums]
    labels = torch.tensor([207, 980])
    ref = _teacher_forced_logits(cfg, var, vae, torch.float32, "torch", idx, labels)
    var16, vae16 = VAR(cfg), VQVAE(cfg.vae)
    var16.load_state_dict(var.state_dict())
    vae16.load_state_dict(vae.state_dict())
    got = _teacher_forced_logits(cfg, var16, vae16, torch.float16, "cudagraph", idx, labels)
    ref_all, got_all = torch.cat([r.flatten() for r in ref]), torch.cat([x.flatten() for x in got])
    rel = ((got_all - ref_all).norm() / ref_all.norm()).item()
    print(f"FP16 vs FP32 teacher-forced logits: relative L2 {rel:.2e}; logit std {ref_all.std():.2f}")
    assert rel < 2e-2
    # Greedy tokens agree wherever FP32's top-2 margin is clear of the FP16 error.
    err = (got_all - ref_all).pow(2).mean().sqrt().item()
    clear = agree = 0
    for r, x in zip(ref, got):
        top2 = r.topk(2, dim=-1).values
        mask = (top2[..., 0] - top2[..., 1]) > 6 * err
        clear += int(mask.sum())
        agree += int((r.argmax(-1) == x.argmax(-1))[mask].sum())
    print(f"clear-margin positions {clear}/{sum(r[..., 0].numel() for r in ref)}, argmax agree {agree}")
    assert clear > 0.3 * sum(r[..., 0].numel() for r in ref)
    assert agree == clear




@pytest.mark.parametrize("name", ["var_tiny_256", "var_tiny_512_saln"])
def test_fused_transition_fp16_follows_the_pytorch_transition(name):
    """FP16 `cudagraph` with the CUDA extension's fused transition (the default on CUDA) against the PyTorch
    transition: with every scale's tokens forced (an all-keep edit, so no flip can cascade), each scale's
    guided logits and the image agree within FP16 tolerance; free-running greedy tokens mostly agree."""
    from var_rt import ops
    if not ops.extension_loaded():
        pytest.skip("CUDA extension not built (csrc/build.sh)")
    fx = get_fixture(name)
    c, cfg, B = fx.cases, fx.cfg, 2
    g = torch.Generator().manual_seed(3)
    idx = [torch.randint(0, cfg.vae.vocab_size, (B, pn * pn), generator=g) for pn in cfg.patch_nums]
    keep = [torch.ones(1, pn * pn, dtype=torch.bool) for pn in cfg.patch_nums]
    params = Sampling(cfg=1.5, top_k=1, top_p=0.0)
    forced, free = {}, {}
    for use_ops in (False, True):
        pipe = VARPipeline(cfg, VAR(cfg), VQVAE(cfg.vae), torch.device("cuda"), torch.float16,
                           backend="cudagraph", progress=False, engine_options={"use_ops": use_ops})
        pipe.var.load_state_dict(fx.var.state_dict())
        pipe.vae.load_state_dict(fx.vae.state_dict())
        assert pipe.engine.use_ops == use_ops
        loop = ScaleLoop(pipe.engine, cfg, B, pipe.vae.quantize.embedding.weight)
        loop.set_request(c["labels"][:B], torch.arange(B), params, EditSpec(idx, keep))
        loop.run(params, edit=True)
        torch.cuda.synchronize()
        forced[use_ops] = ([t.clone() for t in loop.logits], loop.image.clone())
        free[use_ops] = pipe.generate(class_labels=c["labels"].tolist(), seed=0, cfg=float(c["greedy_cfg"]),
                                      top_k=1, top_p=0.0)
    for si, (a, b) in enumerate(zip(forced[False][0], forced[True][0])):
        rel = ((a - b).norm() / a.norm()).item()
        assert rel < 1e-2, f"scale {si}: logits differ by {rel:.2e} (relative)"
    assert (forced[False][1] - forced[True][1]).abs().max() < 2e-2
    per_scale = [(x == y).float().mean().item() for x, y in zip(free[False].tokens, free[True].tokens)]
    print(f"{name}: greedy tokens, fused vs PyTorch transition, per scale:", [f"{p:.3f}" for p in per_scale])
    # Free-running, a single one-ulp difference (the kernel's float32 sums are in another order than
    # cuDNN's, so a rare conv result rounds the other way) changes the next scale's input, and the tiny
    # fixtures' near-tied logits amplify it: seen on the H200 with the kernel rounding as PyTorch does,
    # var_tiny_256 1.0 at scales 0-1 and 0.83 at scale 9, var_tiny_512_saln 0.994 at scale 9 (d16/d30 with
    # random weights: 99.9 %, benchmarks.agreement). A wrong transition falls far below.
    assert per_scale[0] == 1.0 and min(per_scale) >= 0.75, per_scale


@pytest.mark.parametrize("more_smooth", [False, True])
def test_one_capture_serves_every_filter_on_the_gpu(more_smooth):
    """The cudagraph backend captures once per batch size (and more_smooth / edit): 20 requests with different
    top_k / top_p replay that one graph, and each draws the tokens of an eager (uncaptured) run of the same
    loop code with its filters. The fused sampler reads the filters on the device; with more_smooth the
    reference sampler does (var_rt.sampling._device_threshold)."""
    fx = get_fixture("var_tiny_256")
    pipe = VARPipeline(fx.cfg, VAR(fx.cfg), VQVAE(fx.cfg.vae), torch.device("cuda"), torch.float32,
                       backend="cudagraph", progress=False, compile=False)
    pipe.var.load_state_dict(fx.var.state_dict())
    pipe.vae.load_state_dict(fx.vae.state_dict())
    B = 2
    loop, runner = pipe._loop(B)
    eager = ScaleLoop(pipe.engine, fx.cfg, B, pipe.codebook)
    labels, seeds = torch.tensor([3, 5]), torch.tensor([11, 12])
    seen = set()
    for k in (0, 1, 5, 40, 900):
        for p in (0.0, 0.3, 0.9, 0.96):
            params = Sampling(cfg=1.5, top_k=k, top_p=p, more_smooth=more_smooth)
            for lp, run in ((loop, runner), (eager, eager)):
                lp.set_request(labels, seeds, params)
                run.run(params)
            torch.cuda.synchronize()
            assert torch.equal(loop.tokens_BL, eager.tokens_BL), (k, p)
            seen.add(tuple(loop.tokens_BL.view(-1).tolist()))
    assert len(seen) > 10  # the filters change the tokens: a frozen filter would show
    assert list(runner.graphs) == [(more_smooth, False)]
