"""ONNX Runtime engine: a full greedy generation driven by the exported graphs reproduces the fixtures.

The loop is written out here (condition -> per scale: step, argmax, codebook lookup, transition ->
decode) so the test depends only on the engine protocol and the fixtures, not on the runtime's loop.
"""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from conftest import FIXTURE_NAMES, REPO, get_fixture, token_mismatch
from var_rt.errors import EngineMismatchError, InputError

pytest.importorskip("onnxruntime")

from test_export import damaged_copy, exported  # noqa: E402  (module-scoped export cache)
from var_rt.engines.onnxruntime import OnnxRuntimeEngine  # noqa: E402


def alloc(spec: dict, act_dtype: torch.dtype) -> dict:
    return {n: torch.empty(io["shape"], dtype=getattr(torch, io["dtype"])) for n, io in spec.items()}


def greedy_generate(engine: OnnxRuntimeEngine, fx, labels: torch.Tensor, cfg: float):
    """Greedy (top-k 1) generation with the linear guidance schedule, as in the fixtures."""
    B, K = labels.shape[0], fx.cfg.num_scales
    files = engine.manifest["onnx"]["files"]
    spec = lambda g: files[f"onnx/{g}.b{B}.onnx"]  # noqa: E731
    cond = alloc(spec("condition")["outputs"], engine.act_dtype)
    engine.run("condition", {"labels": labels.contiguous()}, cond)
    x = cond["x"]
    pk = pv = None
    f_hat = torch.zeros(spec("transition_0")["inputs"]["f_hat"]["shape"])
    codebook = fx.vae.quantize.embedding.weight.detach().float()
    tokens = []
    for si in range(K):
        ins = {"x": x, "ada_blocks": cond["ada_blocks"], "ada_head": cond["ada_head"],
               "cfg_t": torch.tensor([1 + cfg * si / (K - 1), cfg * si / (K - 1)], dtype=torch.float32)}
        if si:
            ins.update(past_k=pk, past_v=pv)
        out = alloc(spec(f"step_{si}")["outputs"], engine.act_dtype)
        engine.run(f"step_{si}", ins, out)
        idx = out["logits"].argmax(-1)
        tokens.append(idx)
        pk = out["present_k"] if pk is None else torch.cat((pk, out["present_k"]), 3).contiguous()
        pv = out["present_v"] if pv is None else torch.cat((pv, out["present_v"]), 3).contiguous()
        t_out = alloc(spec(f"transition_{si}")["outputs"], engine.act_dtype)
        engine.run(f"transition_{si}", {"f_hat": f_hat, "h": codebook[idx].contiguous()}, t_out)
        f_hat, x = t_out["f_hat_out"], t_out.get("x")
    image = torch.empty(spec("decode")["outputs"]["image"]["shape"])
    engine.run("decode", {"f_hat": f_hat}, {"image": image})
    return tokens, image


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_greedy_generation_matches_fixture(name):
    fx = get_fixture(name)
    out_dir = exported(name, "fp32")
    B = fx.cases["labels"].shape[0]
    engine = OnnxRuntimeEngine.from_dir(out_dir, "cpu", batch=B, precision="fp32")
    assert engine.act_dtype == torch.float32 and engine.batch_sizes == (B,)
    assert "step_9" in engine.graph_names() and "decode" in engine.graph_names()
    tokens, image = greedy_generate(engine, fx, fx.cases["labels"], float(fx.cases["greedy_cfg"]))
    bad, total = token_mismatch(tokens, fx.cases["greedy_tokens"])
    assert bad <= max(2, total // 500), f"{bad}/{total} tokens differ"
    if bad == 0:
        assert (image - fx.cases["greedy_image"]).abs().max() < 1e-4


def test_dynamic_graphs_match_fixed(fx256):
    """The dynamic graphs (what TensorRT builds, and what ORT runs on CUDA) give the fixed graphs' numbers."""
    out_dir = exported(fx256.name, "fp32")
    fixed = OnnxRuntimeEngine.from_dir(out_dir, "cpu", batch=2)
    dyn = OnnxRuntimeEngine.from_dir(out_dir, "cpu", batch=2, dynamic=True)
    labels = fx256.cases["labels"]
    t1, img1 = greedy_generate(fixed, fx256, labels, 1.5)
    t2, img2 = greedy_generate(dyn, fx256, labels, 1.5)
    assert all(torch.equal(a, b) for a, b in zip(t1, t2))
    assert (img1 - img2).abs().max() < 1e-5


def test_bad_inputs_and_stale_manifest(fx256):
    out_dir = exported(fx256.name, "fp32")
    engine = OnnxRuntimeEngine.from_dir(out_dir, "cpu", batch=2)
    with pytest.raises(InputError, match="shape"):
        engine.run("condition", {"labels": torch.zeros(3, dtype=torch.long)}, {})
    with pytest.raises(InputError, match="not in this export"):
        engine.run("step_42", {}, {})
    with pytest.raises(InputError, match="'labels' missing"):
        engine.run("condition", {}, {})
    with pytest.raises(InputError, match="int64 tensor of shape .* got float32"):
        engine.run("condition", {"labels": torch.zeros(2)}, {})
    with pytest.raises(InputError, match="not contiguous"):
        engine.run("condition", {"labels": torch.zeros(2, 2, dtype=torch.long)[:, 0]}, {})
    with pytest.raises(EngineMismatchError, match="batch size 3 was not built"):
        OnnxRuntimeEngine.from_dir(out_dir, "cpu", batch=3)
    with pytest.raises(EngineMismatchError, match="weights differ"):
        OnnxRuntimeEngine.from_dir(out_dir, "cpu", batch=2, expected_weights_hash="0" * 64)
    with pytest.raises(EngineMismatchError, match="precision"):
        OnnxRuntimeEngine.from_dir(out_dir, "cpu", batch=2, precision="fp16")
    other = get_fixture("var_tiny_512_saln").cfg
    with pytest.raises(EngineMismatchError, match="shared_aln"):
        OnnxRuntimeEngine.from_dir(out_dir, "cpu", batch=2, expected_cfg=other)


def test_damaged_weights_file_is_refused_before_running(fx256, tmp_path):
    """A weights.bin with flipped bytes, or cut short, is reported instead of giving wrong images or a crash."""
    src = exported(fx256.name, "fp32")
    with pytest.raises(EngineMismatchError, match="weights.bin does not match its recorded SHA-256"):
        OnnxRuntimeEngine.from_dir(damaged_copy(src, tmp_path / "flip", "flip"), "cpu", batch=2)
    with pytest.raises(EngineMismatchError, match="weights.bin is [0-9]+ bytes, the manifest records"):
        OnnxRuntimeEngine.from_dir(damaged_copy(src, tmp_path / "cut", "cut"), "cpu", batch=2)


def _generate(fx, engine_dir, out, *extra) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "var_rt", "generate", "--config", str(fx.config_path), "--var-ckpt",
                           str(fx.var_ckpt), "--vae-ckpt", str(fx.vae_ckpt), "--backend", "onnxruntime",
                           "--engine-dir", str(engine_dir), "--class-labels", "3", "7", "--device", "cpu",
                           "--output-dir", str(out), "--no-progress", *extra],
                          capture_output=True, text=True, cwd=REPO, timeout=300)


def test_cli_engine_dir_errors(fx256, tmp_path):
    """One `error:` line, exit 2, no images: a missing directory, an FP16 export under the default dtype,
    a corrupted weights.bin."""
    cases = [(tmp_path / "nowhere", "does not exist"),
             (exported(fx256.name, "fp16"), "run with --dtype float16"),
             (damaged_copy(exported(fx256.name, "fp32"), tmp_path / "flip", "flip"), "SHA-256")]
    for engine_dir, want in cases:
        r = _generate(fx256, engine_dir, tmp_path / "o")
        assert r.returncode == 2, (engine_dir, r.stderr)
        lines = [ln for ln in r.stderr.splitlines() if not ln.startswith("note:")]
        assert len(lines) == 1 and lines[0].startswith("error: ") and want in lines[0], r.stderr
        assert "stale" not in lines[0]
        assert not (tmp_path / "o").exists()


def test_one_engine_serves_every_batch_size_with_the_weights_once(tmp_path):
    """An export of batch sizes 1 and 2 opened once: a session at the second size makes no new copy of the
    weights (fixed graphs: the same OrtValues over weights.bin; dynamic graphs, ORT's CUDA form: no new ORT
    session), and each size gives what an engine opened for that size alone gives."""
    from export import build as build_mod
    from test_export import other_config
    from var_rt.pipeline import VARPipeline
    out = tmp_path / "b12"
    assert build_mod.main(["--config", str(other_config()), "--random-weights", "--batch-size", "1", "2",
                           "--out-dir", str(out), "--onnx-only", "--no-progress"]) == 0
    for dynamic in (False, True):
        engine = OnnxRuntimeEngine.from_dir(out, "cpu", dynamic=dynamic)
        assert engine.batch_sizes == (1, 2)
        engine.session(1)
        shared, sessions = dict(engine._shared), dict(engine._by_file)
        engine.session(2)
        if dynamic:  # one ORT session per graph file for every batch size
            assert engine._by_file.keys() == sessions.keys() and not engine._shared
            continue
        nbytes = lambda names: sum(engine._shared[n].numpy().nbytes for n in names)  # noqa: E731
        assert all(engine._shared[n] is v for n, v in shared.items())  # every tensor given again, not re-read
        added = engine._shared.keys() - shared.keys()  # constants folded at batch 2 (expanded inputs), no weights
        assert nbytes(added) < 0.05 * nbytes(shared), f"batch 2 added {nbytes(added)} bytes: {sorted(added)}"
        assert len(engine._by_file) == 2 * len(sessions)  # the fixed graphs of size 2
        with pytest.raises(InputError, match=r"serves batch sizes \[1, 2\], not 3"):
            engine.session(3)
    pipe = VARPipeline.load(config=other_config(), backend="onnxruntime", engine_dir=out, device="cpu",
                            progress=False)
    both = pipe.generate(class_labels=[1, 2], seed=0, top_k=1, top_p=0.0, batch_size=2)
    one = pipe.generate(class_labels=[1], seed=0, top_k=1, top_p=0.0, batch_size=1)
    assert len({id(loop.engine) for loop, _ in pipe._loops.values()}) == 1  # both loops on the one engine
    assert all(torch.equal(a[:1], b) for a, b in zip(both.tokens, one.tokens))


def test_disabled_optimizers_reach_the_sessions(fx256, tmp_path):
    """``disabled_optimizers`` (["MatMulAddFusion"] by default with ORT CUDA graphs, measured faster on the H200) names an
    optimiser ORT knows: with MatMulAddFusion off, a fixed step graph keeps its MatMul + Add instead of Gemms;
    the engine passes the list to its sessions and still reproduces the fixed graphs' generation. Without ORT
    CUDA graphs (the CPU here) every optimiser stays on unless asked."""
    import onnx
    import onnxruntime as ort

    out_dir = exported(fx256.name, "fp32")
    f = str(out_dir / "onnx" / "step_3.b2.onnx")
    gemms = []
    for disabled in (None, ["MatMulAddFusion"]):
        so = ort.SessionOptions()
        so.optimized_model_filepath = str(tmp_path / "opt.onnx")
        ort.InferenceSession(f, so, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)
        gemms.append(sum(n.op_type == "Gemm" for n in onnx.load(so.optimized_model_filepath,
                                                                 load_external_data=False).graph.node))
    assert gemms[0] > 0 and gemms[1] == 0, gemms
    plain = OnnxRuntimeEngine.from_dir(out_dir, "cpu", batch=2)
    split = OnnxRuntimeEngine.from_dir(out_dir, "cpu", batch=2, disabled_optimizers=["MatMulAddFusion"])
    assert plain._disabled == [] and split._disabled == ["MatMulAddFusion"]
    labels = fx256.cases["labels"]
    t1, img1 = greedy_generate(plain, fx256, labels, 1.5)
    t2, img2 = greedy_generate(split, fx256, labels, 1.5)
    assert all(torch.equal(a, b) for a, b in zip(t1, t2))
    assert (img1 - img2).abs().max() < 1e-4
