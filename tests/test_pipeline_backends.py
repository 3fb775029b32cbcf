"""The pipeline over exported graphs: `--backend onnxruntime` reproduces the fixtures (CPU here, CUDA EP on a GPU)."""
import copy
import subprocess
import sys

import pytest
import torch

from conftest import REPO, get_fixture, token_mismatch
from var_rt.errors import ConfigError, EngineMismatchError, InputError
from var_rt.pipeline import VARPipeline

ort = pytest.importorskip("onnxruntime", reason="onnxruntime not installed (pip install 'var-rt[onnx]')")
from test_export import exported  # noqa: E402  (module-scoped export cache)


def _pipe(fx, engine_dir, device="cpu", dtype="float32"):
    return VARPipeline.load(config=fx.config_path, var_ckpt=fx.var_ckpt, vae_ckpt=fx.vae_ckpt, device=device,
                            dtype=dtype, backend="onnxruntime", engine_dir=engine_dir, progress=False)


def _check_greedy(pipe, fx):
    c = fx.cases
    res = pipe.generate(class_labels=c["labels"].tolist(), seed=0, cfg=float(c["greedy_cfg"]), top_k=1, top_p=0.0)
    bad, total = token_mismatch(res.tokens, c["greedy_tokens"])
    assert bad <= total * 0.003, f"{bad}/{total} tokens differ"
    assert (res.images - c["greedy_image"]).abs().max() < 1e-3
    return res


@pytest.mark.parametrize("name", ["var_tiny_256", "var_tiny_512_saln"])
def test_onnxruntime_backend_greedy_cpu(name):
    fx = get_fixture(name)
    _check_greedy(_pipe(fx, exported(name, "fp32")), fx)


@pytest.mark.skipif(not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="needs a CUDA GPU and onnxruntime-gpu")
@pytest.mark.parametrize("name", ["var_tiny_256", "var_tiny_512_saln"])
def test_onnxruntime_backend_greedy_cuda(name):
    fx = get_fixture(name)
    pipe = _pipe(fx, exported(name, "fp32"), device="cuda")
    res = _check_greedy(pipe, fx)
    assert pipe.engine.device.type == "cuda"
    # the options measured faster with ORT CUDA graphs (session 11) are not applied where they were not measured
    assert pipe.engine._disabled == [] and "prefer_nhwc" not in pipe.engine._providers[0][1]


def test_exported_backend_errors(tmp_path):
    fx = get_fixture("var_tiny_256")
    d = exported("var_tiny_256", "fp32")
    with pytest.raises(ConfigError, match="--engine-dir"):
        VARPipeline.load(config=fx.config_path, var_ckpt=fx.var_ckpt, vae_ckpt=fx.vae_ckpt, device="cpu",
                         backend="onnxruntime")
    pipe = VARPipeline.load(config=fx.config_path, random_weights=True, device="cpu", dtype="float32",
                            backend="onnxruntime", engine_dir=d, progress=False)
    with pytest.raises(EngineMismatchError, match="stale"):  # other weights than the export's
        pipe.generate(class_labels=[1, 2])
    with pytest.raises(EngineMismatchError, match="precision"):
        _pipe(fx, d, dtype="float16").generate(class_labels=[1, 2])
    with pytest.raises(InputError, match="not one the engines were built for"):
        _pipe(fx, d).generate(class_labels=[1, 2, 3], batch_size=3)


def test_cli_onnxruntime_backend(tmp_path):
    fx = get_fixture("var_tiny_256")
    d = exported("var_tiny_256", "fp32")
    r = subprocess.run([sys.executable, "-m", "var_rt", "generate", "--config", str(fx.config_path), "--var-ckpt",
                        str(fx.var_ckpt), "--vae-ckpt", str(fx.vae_ckpt), "--backend", "onnxruntime",
                        "--engine-dir", str(d), "--class-labels", "3", "7", "1", "--device", "cpu", "--dtype",
                        "float32", "--top-k", "1", "--output-dir", str(tmp_path / "o"), "--no-progress"],
                       capture_output=True, text=True, cwd=REPO, timeout=300)
    assert r.returncode == 0, r.stderr
    assert len(list((tmp_path / "o").glob("*.png"))) == 3  # 3 images on batch-2 engines: padded last chunk


def test_export_runs_alone_without_checkpoints(tmp_path, capsys):
    """The export holds the weights (and, since issue 25, the codebook): `--backend onnxruntime --engine-dir`
    needs no checkpoint; the manifest still checks config and precision. Without an export, the missing
    checkpoint's hint names real commands (no `download --model var_tiny_256`)."""
    from var_rt.cli import main
    fx = get_fixture("var_tiny_256")
    d = exported("var_tiny_256", "fp32")
    pipe = VARPipeline.load(config=fx.config_path, device="cpu", dtype="float32", backend="onnxruntime",
                            engine_dir=d, progress=False)
    assert pipe.var is None and pipe.vae is None
    _check_greedy(pipe, fx)
    with pytest.raises(EngineMismatchError, match="precision"):
        VARPipeline.load(config=fx.config_path, device="cpu", dtype="float16", backend="onnxruntime", engine_dir=d)
    assert main(["generate", "--config", str(fx.config_path), "--backend", "onnxruntime", "--engine-dir", str(d),
                 "--class-labels", "3", "--device", "cpu", "--dtype", "float32", "--output-dir",
                 str(tmp_path / "o"), "--no-progress"]) == 0
    assert len(list((tmp_path / "o").glob("*.png"))) == 1
    capsys.readouterr()
    assert main(["generate", "--config", str(fx.config_path), "--device", "cpu", "--output-dir",
                 str(tmp_path / "never"), "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no checkpoint given (--var-ckpt)") and "var_tiny_256" not in err, err
    assert "--engine-dir" in err and not (tmp_path / "never").exists()


def test_generation_records_no_autograd_graph():
    """The scale loop runs under no_grad: its buffers never require grad (the codebook is a Parameter)."""
    fx = get_fixture("var_tiny_256")
    pipe = VARPipeline.load(config=str(fx.config_path), var_ckpt=str(fx.var_ckpt), vae_ckpt=str(fx.vae_ckpt),
                            device="cpu", dtype="float32", progress=False)
    res = pipe.generate(class_labels=[1, 2], seed=[0, 1], top_k=1, progress=False)
    loop, _ = pipe._loops[2]
    assert not res.images.requires_grad
    assert not any(t.requires_grad for t in [*loop.h, *loop.f_hat])


def test_served_groups_are_padded_to_a_built_batch_size():
    """var_rt.serve on an exported backend: replicas warm every built size up to the maximum, and a group
    smaller than a built size is padded up to it (one call), giving the images a direct call gives."""
    from var_rt.serve import SAMPLING_DEFAULTS, run_groups, serving_buckets
    fx = get_fixture("var_tiny_256")
    pipe = _pipe(fx, exported("var_tiny_256", "fp32"))
    built = sorted(pipe.built_batch_sizes)
    assert serving_buckets(pipe, 64) == built and serving_buckets(pipe, 1) == [min(built)]
    n = max(built) - 1 if max(built) > 1 else 1
    settings = (1.5, "linear", SAMPLING_DEFAULTS["top_k"], SAMPLING_DEFAULTS["top_p"], False)
    items = [(settings, c % 10, 100 + c) for c in range(n)]
    got = run_groups(pipe, items, serving_buckets(pipe, 64))
    want = pipe.generate(class_labels=[c for _, c, _ in items], seed=[s for _, _, s in items],
                         batch_size=next(b for b in built if b >= n)).numpy()
    assert all(not isinstance(g, Exception) for g in got), got
    for g, w in zip(got, want):
        assert abs(g.astype(int) - w.astype(int)).max() <= 1


@pytest.mark.skipif(not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="needs a CUDA GPU and onnxruntime-gpu")
def test_onnxruntime_cuda_is_ordered_with_the_callers_stream():
    """ORT runs on its own stream: a graph must see inputs the caller's stream wrote just before (here after
    a ~50 ms GPU spin) and the caller must see its outputs, with no host synchronisation in between."""
    fx = get_fixture("var_tiny_256")
    pipe = _pipe(fx, exported("var_tiny_256", "fp32"), device="cuda")
    B = len(fx.cases["labels"])
    pipe.generate(class_labels=fx.cases["labels"].tolist(), seed=0, batch_size=B)
    loop = pipe._loop(B)[0]
    K = pipe.cfg.num_scales
    f_hat = loop.f_hat[K % 2].clone()
    torch.cuda.synchronize()
    want = loop.image.clone()
    x = torch.zeros_like(f_hat)
    out = torch.full_like(loop.image, float("nan"))
    torch.cuda._sleep(100_000_000)  # the caller's stream is busy for tens of ms ...
    x.copy_(f_hat)  # ... before it writes the input
    loop.engine.run("decode", {"f_hat": x}, {"image": out})
    got = out.clone()  # read on the caller's stream right after the run
    torch.cuda.synchronize()
    assert torch.equal(got, want), float((got - want).abs().nan_to_num(9.0).max())


@pytest.mark.skipif(not torch.cuda.is_available() or "CUDAExecutionProvider" not in ort.get_available_providers(),
                    reason="needs a CUDA GPU and onnxruntime-gpu (ORT CUDA graphs; not run on a CPU)")
def test_onnxruntime_cuda_graphs_give_the_same_tokens():
    fx = get_fixture("var_tiny_256")
    out = exported(fx.name, "fp32")
    kw = dict(class_labels=fx.cases["labels"].tolist(), seed=0, cfg=1.5, top_k=50, top_p=0.9)
    plain = _pipe(fx, out, device="cuda")
    graphed = VARPipeline.load(config=fx.config_path, var_ckpt=fx.var_ckpt, vae_ckpt=fx.vae_ckpt, device="cuda",
                               dtype="float32", backend="onnxruntime", engine_dir=out, progress=False,
                               engine_options={"cuda_graph": True})
    a = plain.generate(**kw)
    for _ in range(3):  # ORT captures after its first runs, then replays
        b = graphed.generate(**kw)
        assert token_mismatch(a.tokens, b.tokens)[0] == 0
    # with ORT CUDA graphs, the options measured faster there (benchmarks/NOTES.md, session 11)
    assert graphed.engine._disabled == ["MatMulAddFusion"]
    assert graphed.engine._providers[0][1]["prefer_nhwc"] == "1"


def test_loops_are_bounded(fx256):
    """Fifty batch sizes leave at most MAX_LOOPS scale loops alive (least recently used go first); the loop
    in use survives, and a server can ask to keep all of its buckets."""
    from var_rt import pipeline as pl
    pipe = pl.VARPipeline(fx256.cfg, copy.deepcopy(fx256.var), copy.deepcopy(fx256.vae), torch.device("cpu"),
                          torch.float32, progress=False)
    first = pipe._loop(1)
    for B in range(2, 52):
        pipe._loop(B)
        pipe._loop(1)  # kept busy: never the least recently used
        assert len(pipe._loops) <= pl.MAX_LOOPS
    assert pipe._loop(1) is first and 2 not in pipe._loops
    pipe.keep_loops(pl.MAX_LOOPS + 3)
    for B in range(60, 60 + pl.MAX_LOOPS + 3):
        pipe._loop(B)
    assert len(pipe._loops) == pl.MAX_LOOPS + 3


def test_lru_keeps_the_most_recently_used():
    from var_rt.runtime import LRU
    c = LRU(2)
    c.put("a", 1)
    c.put("b", 2)
    assert c.get("a") == 1  # a is now the most recent
    c.put("c", 3)
    assert list(c) == ["a", "c"] and c.get("b") is None


def test_precision_names_bfloat16_and_exports_refuse_it(tmp_path):
    """VARPipeline.precision names the compute dtype (bfloat16 is "bf16", not "fp32"); exports hold fp16 or fp32
    graphs only, so asking an export for bf16 is an error that says so, never a silent fp32 run."""
    import json
    from var_rt.manifest import FORMAT_VERSION, load_manifest
    fx = get_fixture("var_tiny_256")
    for dtype, name in (("float32", "fp32"), ("bfloat16", "bf16")):
        pipe = VARPipeline.load(config=fx.config_path, var_ckpt=fx.var_ckpt, vae_ckpt=fx.vae_ckpt, device="cpu",
                                dtype=dtype, progress=False)
        assert pipe.precision == name
    (tmp_path / "manifest.json").write_text(json.dumps({
        "format_version": FORMAT_VERSION, "precision": "fp32", "batch_sizes": [1],
        "onnx": {"weights_file": "weights.bin", "files": {"onnx/decode.b1.onnx": {"graph": "decode", "batch": 1}}}}))
    assert load_manifest(tmp_path, None, None, "fp32", None)["precision"] == "fp32"
    with pytest.raises(EngineMismatchError, match=r"exports hold fp16 or fp32 graphs.*bfloat16.*torch"):
        load_manifest(tmp_path, None, None, "bf16", None)


def test_unknown_engine_option_is_one_clear_error(fx256):
    """A misspelt engine option fails when the pipeline is made, naming the engine's options (not a TypeError
    at the first generation)."""
    fx = fx256
    with pytest.raises(ConfigError, match=r"no option 'use_op'.*use_ops.*norm_kernels"):
        VARPipeline(fx.cfg, copy.deepcopy(fx.var), copy.deepcopy(fx.vae), torch.device("cpu"), torch.float32,
                    progress=False, engine_options={"use_op": False})
    with pytest.raises(ConfigError, match=r"no option 'cuda_graphs'.*cuda_graph"):
        VARPipeline(fx.cfg, None, None, torch.device("cpu"), torch.float32, backend="onnxruntime",
                    engine_dir=".", progress=False, engine_options={"cuda_graphs": True})
    pipe = VARPipeline(fx.cfg, copy.deepcopy(fx.var), copy.deepcopy(fx.vae), torch.device("cpu"), torch.float32,
                       progress=False, engine_options={"use_ops": False})
    assert pipe.engine.use_ops is False


def test_capture_is_a_pipeline_option(fx256):
    """Capture is chosen per pipeline, not by the backend's name: off for the eager reference and ONNX Runtime
    by default, refused without a GPU; on a GPU the torch backend captured gives the eager run's tokens."""
    fx = fx256
    assert not VARPipeline(fx.cfg, copy.deepcopy(fx.var), copy.deepcopy(fx.vae), torch.device("cpu"), torch.float32,
                           progress=False).capture
    with pytest.raises(ConfigError, match="capture needs a CUDA GPU"):
        VARPipeline(fx.cfg, copy.deepcopy(fx.var), copy.deepcopy(fx.vae), torch.device("cpu"), torch.float32,
                    progress=False, capture=True)
    if not torch.cuda.is_available():
        pytest.skip("the captured run needs a CUDA GPU")
    from var_rt.runtime import CudaGraphLoop
    runs = {}
    for capture in (False, True):
        pipe = VARPipeline(fx.cfg, copy.deepcopy(fx.var), copy.deepcopy(fx.vae), torch.device("cuda"), torch.float32,
                           progress=False, capture=capture)
        runs[capture] = pipe.generate(class_labels=[1, 2], seed=0, top_k=1, top_p=0.0, batch_size=2)
        assert isinstance(pipe._loop(2)[1], CudaGraphLoop) == capture
    assert all(torch.equal(a, b) for a, b in zip(runs[False].tokens, runs[True].tokens))
