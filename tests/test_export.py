"""ONNX export and TensorRT build (python -m export.build) on the golden fixtures' models.

Every exported graph, run by ONNX Runtime on the CPU, is compared with the PyTorch graph module on the
same inputs: float32 within 1e-4; FP16 graphs (256 px fixture) against the float32 module within 1% of
the output's largest magnitude (measured about 0.1%, 0.3% for the decoder). TensorRT-RTX builds real
engines from the fixture models on the CPU; running them needs a GPU it supports (skipped here).
"""
from __future__ import annotations

import atexit
import copy
import errno
import json
import re
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import REPO, get_fixture
from export import build as build_mod
from var_rt.manifest import load_manifest
from export.onnx_export import sample_inputs
from var_rt.checkpoint import weights_hash
from var_rt.errors import BackendUnavailableError, ConfigError, EngineMismatchError, VarRtError
from var_rt.graphs import all_graphs

ort = pytest.importorskip("onnxruntime")

_ROOT = Path(tempfile.mkdtemp(prefix="var-rt-export-"))
atexit.register(shutil.rmtree, _ROOT, True)
_done: dict = {}


def build_args(name: str, out: Path, *extra: str) -> list:
    fx = get_fixture(name)
    return ["--config", str(fx.config_path), "--var-ckpt", str(fx.var_ckpt), "--vae-ckpt", str(fx.vae_ckpt),
            "--batch-size", str(fx.cases["labels"].shape[0]), "--out-dir", str(out), "--no-progress", *extra]


def exported(name: str, precision: str) -> Path:
    """ONNX export of a fixture (its own batch size), made once per test session."""
    key = (name, precision)
    if key not in _done:
        out = _ROOT / f"{name}-{precision}"
        extra = ["--onnx-only"] + (["--fp16"] if precision == "fp16" else [])
        assert build_mod.main(build_args(name, out, *extra)) == 0
        _done[key] = out
    return _done[key]


# A third model, different from both fixtures in every size we can vary (7 classes, vocabulary 96, Cvae 8,
# depth 3, 3 heads, no L2-normalised attention, shared AdaLN, 5 scales, a 2-level VQVAE), random weights.
OTHER = {"vae": {"vocab_size": 96, "z_channels": 8, "ch": 32, "ch_mult": [1, 2], "num_res_blocks": 1,
                 "share_quant_resi": 0, "v_patch_nums": [1, 2, 3, 5, 8]},
         "var": {"num_classes": 7, "depth": 3, "embed_dim": 96, "num_heads": 3, "shared_aln": True,
                 "attn_l2_norm": False, "norm_eps": 1e-6, "mlp_ratio": 2.0}}


def other_config() -> Path:
    path = _ROOT / "other" / "config.json"
    if not path.is_file():
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(OTHER))
    return path


def exported_other(precision: str) -> Path:
    """ONNX export of ``OTHER`` (random weights, batch 2), made once per test session."""
    key = ("other", precision)
    if key not in _done:
        out = _ROOT / f"other-{precision}"
        args = ["--config", str(other_config()), "--random-weights", "--batch-size", "2", "--out-dir", str(out),
                "--onnx-only", "--no-progress"] + (["--fp16"] if precision == "fp16" else [])
        assert build_mod.main(args) == 0
        _done[key] = out
    return _done[key]


def run_ort(path: Path, inputs: dict) -> list:
    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    return [torch.from_numpy(o) for o in sess.run(None, {k: v.numpy() for k, v in inputs.items()})]


def reference(module, inputs: dict) -> list:
    with torch.no_grad():
        out = module(*(v.float() if v.is_floating_point() else v for v in inputs.values()))
    return list(out) if isinstance(out, tuple) else [out]


@pytest.mark.parametrize("name", ["var_tiny_256", "var_tiny_512_saln"])
def test_every_graph_matches_pytorch_fp32(name):
    fx = get_fixture(name)
    out = exported(name, "fp32")
    B = fx.cases["labels"].shape[0]
    graphs = all_graphs(fx.var, fx.vae)
    for g, module in graphs.items():
        ins = sample_inputs(module, B, torch.float32, seed=1)
        if g == "encode":
            ins["image"] = fx.cases.get("encoder_input_image", ins["image"] * 2 - 1)[:B].add(1).mul(0.5)
        got, want = run_ort(out / "onnx" / f"{g}.b{B}.onnx", ins), reference(module, ins)
        assert len(got) == len(want), g
        for o, w in zip(got, want):
            assert o.shape == w.shape and o.dtype == w.dtype, g
            if o.dtype == torch.int64:
                assert (o != w).float().mean() < 0.01, g
            else:
                assert (o - w).abs().max() < 1e-4, (g, float((o - w).abs().max()))


def test_dynamic_step_graph_all_scales(fx256):
    """step.dyn.onnx (what TensorRT builds) computes every scale, including scale 0 with an empty past."""
    out = exported(fx256.name, "fp32")
    graphs = all_graphs(fx256.var, fx256.vae)
    for si in (0, 1, 9):
        module = graphs[f"step_{si}"]
        ins = sample_inputs(module, 2, torch.float32, seed=si)
        if si == 0:
            depth, n, H, _, c = module.io_spec(2)[1]["present_k"][0]
            ins["past_k"] = ins["past_v"] = torch.zeros(depth, n, H, 0, c)
        got = run_ort(out / "onnx" / "step.dyn.onnx", ins)
        want = reference(module, {k: v for k, v in ins.items() if not (si == 0 and k.startswith("past"))})
        assert max(float((o - w).abs().max()) for o, w in zip(got, want)) < 1e-4


def test_fp16_graphs(fx256):
    out = exported(fx256.name, "fp16")
    graphs = all_graphs(fx256.var, fx256.vae)
    for g, module in graphs.items():
        ins = sample_inputs(module, 2, torch.float16, seed=1)
        if g == "encode":
            ins["image"] = fx256.cases["encoder_input_image"].add(1).mul(0.5)
        got, want = run_ort(out / "onnx" / f"{g}.b2.onnx", ins), reference(module, ins)
        for o, w in zip(got, want):
            if o.dtype == torch.int64:  # nearest-code search: a few ties flip in FP16
                assert (o == w).float().mean() > 0.9, g
            else:
                assert o.dtype in (torch.float16, torch.float32)
                err = float((o.float() - w).abs().max() / w.abs().max().clamp_min(1e-6))
                assert err < 1e-2, (g, err)


def test_weights_stored_once(fx256):
    import onnx

    out = exported(fx256.name, "fp32")
    m = load_manifest(out, fx256.cfg, weights_hash(fx256.var, fx256.vae), "fp32", 2)
    params = sum(p.numel() * 4 for mod in (fx256.var, fx256.vae) for p in mod.parameters())
    assert m["onnx"]["weights_bytes"] < 1.5 * params  # one copy (+ a few folded constants), not 20

    def refs(f):
        model = onnx.load(str(out / "onnx" / f), load_external_data=False)
        return {(t.name, tuple(kv.value for kv in t.external_data)) for t in model.graph.initializer
                if t.data_location == onnx.TensorProto.EXTERNAL}

    a, b, d = refs("step_3.b2.onnx"), refs("step_8.b2.onnx"), refs("step.dyn.onnx")
    assert a and a == b == d  # the same blocks, the same offsets in weights.bin


def test_manifest(fx256):
    out = exported(fx256.name, "fp32")
    m = json.loads((out / "manifest.json").read_text())
    assert m["precision"] == "fp32" and m["batch_sizes"] == [2] and m["opset"] == 17
    assert m["model"]["var"]["depth"] == 2 and m["tensorrt"] is None
    assert m["weights_hash"] == weights_hash(fx256.var, fx256.vae)
    step = m["onnx"]["files"]["onnx/step_4.b2.onnx"]
    assert step["inputs"]["past_k"]["shape"] == [2, 4, 2, 30, 64]
    assert step["outputs"]["logits"] == {"shape": [2, 25, 512], "dtype": "float32"}
    assert m["onnx"]["files"]["onnx/step.dyn.onnx"]["inputs"]["past_k"]["shape"] == [2, "2B", 2, "past", 64]
    assert all((out / f).is_file() for f in m["onnx"]["files"])


def test_argument_errors_are_one_line(capsys):
    """A bad flag value is one `error:` line and exit 2, not the whole usage text (--help still shows it)."""
    with pytest.raises(SystemExit) as e:
        build_mod.main(["--model", "d16", "--random-weights", "--batch-size", "x", "--out-dir", "/tmp/never"])
    err = capsys.readouterr().err
    assert e.value.code == 2 and err.startswith("error: ") and len(err.strip().splitlines()) == 1, err


def test_cli_errors(tmp_path, capsys, monkeypatch):
    out = exported("var_tiny_256", "fp32")
    assert build_mod.main(build_args("var_tiny_256", out, "--onnx-only")) == 2
    assert "already holds an export" in capsys.readouterr().err
    assert build_mod.main(build_args("var_tiny_256", tmp_path / "a", "--batch-size", "0")) == 2
    assert "unsupported batch size 0" in capsys.readouterr().err

    def full(*a, **k):
        raise OSError(errno.ENOSPC, "No space left on device", "weights.bin")

    monkeypatch.setattr(build_mod, "export_all", full)
    # --onnx-only: the ONNX export is the step that writes; without it a machine with no TensorRT (the H200
    # here) stops earlier, at the TensorRT check, and never reaches the disk-full path (seen failing there)
    assert build_mod.main(build_args("var_tiny_256", tmp_path / "b", "--onnx-only")) == 2
    assert "disk full" in capsys.readouterr().err
    assert not (tmp_path / "b").exists()  # an unfinished export is not left behind


def test_no_tensorrt_fails_before_any_work(tmp_path, capsys, monkeypatch):
    """Without TensorRT (and without --onnx-only) the build stops before loading the model: one error line
    that says how to install it or to pass --onnx-only, nothing written."""
    import export.trt_build as trt_build
    from var_rt.pipeline import VARPipeline

    def missing(flavor="auto"):
        raise BackendUnavailableError(f"no TensorRT package found: {trt_build.INSTALL_HINT}")

    def no_load(*a, **k):
        raise AssertionError("the model was loaded before TensorRT was checked")

    monkeypatch.setattr(trt_build, "import_trt", missing)
    monkeypatch.setattr(VARPipeline, "load", no_load)
    assert build_mod.main(build_args("var_tiny_512_saln", tmp_path / "x")) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: no TensorRT package found") and err.count("\n") == 1, err
    assert "pip install" in err and "--onnx-only" in err
    assert not (tmp_path / "x").exists()


def _fake_export(d: Path, manifest: bool = True) -> Path:
    """A folder shaped like a previous export (a finished one's manifest, or an unfinished one's marker)."""
    (d / "onnx").mkdir(parents=True)
    (d / "onnx" / "weights.bin").write_bytes(b"w" * 16)
    if manifest:
        (d / "manifest.json").write_text(json.dumps({"format_version": 2, "onnx": {"files": {}}}))
    else:
        (d / build_mod.MARKER).write_text("unfinished")
    return d


def test_force_replaces_only_a_previous_export(tmp_path, capsys):
    """--force never deletes a user's files (think --out-dir ~ --force): a folder with other files, or a
    manifest.json that var-rt did not write, is refused with or without it; a previous export (finished, or
    unfinished with its marker) is replaced with --force only."""
    user = tmp_path / "home"
    user.mkdir()
    (user / "important.txt").write_text("keep me")
    web = tmp_path / "web"
    web.mkdir()
    (web / "manifest.json").write_text(json.dumps({"name": "my app", "icons": []}))
    mixed = _fake_export(tmp_path / "mixed")
    (mixed / "notes.txt").write_text("mine")
    for d in (user, web, mixed):
        before = sorted(p.name for p in d.rglob("*"))
        for force in (["--force"], []):
            assert build_mod.main(build_args("var_tiny_256", d, "--onnx-only", *force)) == 2
            err = capsys.readouterr().err
            assert err.startswith(f"error: --out-dir '{d}' already holds files that are not a var-rt export"), err
            assert err.count("\n") == 1 and "--force replaces only a previous export" in err
            assert d != user or "(important.txt)" in err
        assert sorted(p.name for p in d.rglob("*")) == before, "--force deleted a user's files"
    for d in (_fake_export(tmp_path / "done"), _fake_export(tmp_path / "partial", manifest=False)):
        a = build_mod.parser().parse_args(build_args("var_tiny_256", d, "--onnx-only"))
        with pytest.raises(ConfigError, match="already holds an export .*pass --force"):
            build_mod.validate(a)
        a.force = True
        assert build_mod.validate(a).force
        build_mod.clear_export(d)
        assert d.is_dir() and not any(d.iterdir())


def test_ctrl_c_during_export_is_one_line_and_130(tmp_path, capsys, monkeypatch):
    """Ctrl-C while exporting: `interrupted`, exit 130, no traceback, the unfinished export removed."""
    def interrupted(*a, **k):
        raise KeyboardInterrupt

    monkeypatch.setattr(build_mod, "export_all", interrupted)
    try:
        rc = build_mod.main(build_args("var_tiny_256", tmp_path / "x", "--onnx-only"))
    except KeyboardInterrupt:
        pytest.fail("KeyboardInterrupt escaped export.build's main (a traceback for the user)")
    assert rc == 130 and capsys.readouterr().err == "interrupted\n"
    assert not (tmp_path / "x").exists()


def test_stale_manifest(fx256, tmp_path):
    out = tmp_path / "copy"
    shutil.copytree(exported(fx256.name, "fp32"), out)
    with pytest.raises(EngineMismatchError, match="weights differ"):
        load_manifest(out, fx256.cfg, "f" * 64, "fp32", 2)
    m = json.loads((out / "manifest.json").read_text())
    m["model"]["var"]["depth"] = 16
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineMismatchError, match="var.depth is 16 in the export, 2 expected"):
        load_manifest(out, fx256.cfg, None, None, None)
    del m["model"]["vae"]  # one line for a missing section, not one per field
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineMismatchError, match="has no model.vae section") as e:
        load_manifest(out, fx256.cfg, None, None, None)
    assert "vae.ch " not in str(e.value)
    (out / "manifest.json").unlink()
    with pytest.raises(EngineMismatchError, match="no manifest.json"):
        load_manifest(out, None, None, None, None)
    with pytest.raises(EngineMismatchError, match="'.*nowhere' does not exist"):
        load_manifest(tmp_path / "nowhere", None, None, None, None)


def test_fp16_export_under_float32_names_the_dtype_flag(fx256):
    """The weight hashes of FP16 and FP32 weights never match: the fix is --dtype float16, not a new export."""
    out = exported(fx256.name, "fp16")
    with pytest.raises(EngineMismatchError) as e:
        load_manifest(out, fx256.cfg, weights_hash(fx256.var, fx256.vae), "fp32", 2)
    assert "--dtype float16" in str(e.value) and "stale" not in str(e.value)


def damaged_copy(src: Path, dst: Path, how: str) -> Path:
    """A copy of an export whose weights.bin has one byte flipped every 4 KiB ("flip") or lost its end ("cut")."""
    shutil.copytree(src, dst)
    w = dst / "onnx" / "weights.bin"
    data = bytearray(w.read_bytes())
    if how == "flip":
        data[::4096] = bytes(b ^ 0xFF for b in data[::4096])
    else:
        del data[len(data) // 2:]
    w.write_bytes(bytes(data))
    return dst


def test_damaged_weights_are_refused(fx256, tmp_path, capsys):
    """Flipped bytes: the SHA-256 differs; a truncated file: its size differs; --verify reports both."""
    src = exported(fx256.name, "fp32")
    m = json.loads((src / "manifest.json").read_text())
    assert m["digests"]["onnx/weights.bin"]["bytes"] == (src / "onnx" / "weights.bin").stat().st_size
    assert set(m["digests"]) == set(m["onnx"]["files"]) | {"onnx/weights.bin", "codebook.npy"}
    assert build_mod.main(["--verify", "--out-dir", str(src)]) == 0
    from var_rt.manifest import check_engine_files
    for how, why in (("flip", "does not match its recorded SHA-256"), ("cut", "weights.bin is .* bytes, the manifest")):
        out = damaged_copy(src, tmp_path / how, how)
        with pytest.raises(EngineMismatchError, match=why):
            check_engine_files(out, m, ["onnx/weights.bin"])
        capsys.readouterr()
        assert build_mod.main(["--verify", "--out-dir", str(out)]) == 2
        err = capsys.readouterr().err
        assert err.startswith("error: ") and err.count("\n") == 1 and "weights.bin" in err
    check_engine_files(tmp_path / "flip", m, ["onnx/weights.bin"], content=False)  # sizes only: not seen


def _onnx_pipeline(fx, out):
    from var_rt.pipeline import VARPipeline
    return VARPipeline(fx.cfg, fx.var, fx.vae, torch.device("cpu"), torch.float32, backend="onnxruntime",
                       engine_dir=out, progress=False)


def test_manifest_batch_size_without_graphs_is_one_error(fx256, tmp_path):
    """Issue 25, item 7: a manifest listing batch size 4 with no graphs for it was a KeyError
    ('onnx/condition.b4.onnx') while opening sessions."""
    out = tmp_path / "copy"
    shutil.copytree(exported(fx256.name, "fp32"), out)
    m = json.loads((out / "manifest.json").read_text())
    m["batch_sizes"] = [2, 4]
    (out / "manifest.json").write_text(json.dumps(m))
    with pytest.raises(EngineMismatchError, match=r"batch size 4 is listed but its graphs are not "
                                                  r"\(onnx/condition.b4.onnx, onnx/decode.b4.onnx"):
        _onnx_pipeline(fx256, out).generate(class_labels=[1] * 4, batch_size=4)


def test_weights_bin_is_tied_to_the_checkpoint(fx256, tmp_path, capsys):
    """Issue 25, item 14: part of weights.bin replaced and its digest updated in manifest.json ran with 99 % of
    the pixels wrong while --verify said ok. --verify with the checkpoints, and loading, compare the tensors."""
    from export.manifest import write_manifest
    src = exported(fx256.name, "fp32")
    args = ["--verify", "--out-dir", str(src), "--config", str(fx256.config_path), "--var-ckpt", str(fx256.var_ckpt),
            "--vae-ckpt", str(fx256.vae_ckpt)]
    assert build_mod.main(args) == 0
    assert "weights.bin holds the given weights" in capsys.readouterr().err
    out = tmp_path / "replaced"
    shutil.copytree(src, out)
    w = out / "onnx" / "weights.bin"
    data = bytearray(w.read_bytes())
    mid = len(data) // 2
    data[mid:mid + 4096] = bytes(reversed(data[mid:mid + 4096]))
    w.write_bytes(bytes(data))
    write_manifest(out, json.loads((out / "manifest.json").read_text()))  # the digests updated too
    assert build_mod.main(["--verify", "--out-dir", str(out)]) == 0  # the files match their own digests
    capsys.readouterr()
    assert build_mod.main([*args[:2], str(out), *args[3:]]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and err.count("\n") == 1 and "weights.bin does not hold" in err, err
    with pytest.raises(EngineMismatchError, match="weights.bin does not hold these weights"):
        _onnx_pipeline(fx256, out).generate(class_labels=[1, 2])


def test_cli_unwritable_out_dir_fails_before_model_work(tmp_path):
    """`--out-dir /proc/x` (and a path under a file): one error line, exit 2, no traceback, nothing written."""
    afile = tmp_path / "afile"
    afile.write_text("x")
    for out in ("/proc/var-rt-x", str(afile / "sub")):
        r = subprocess.run([sys.executable, "-m", "export.build", *build_args("var_tiny_256", Path(out))],
                           capture_output=True, text=True, cwd=REPO, timeout=300)
        assert r.returncode == 2, r.stderr
        assert r.stderr.startswith("error: --out-dir") and r.stderr.count("\n") == 1, r.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_rtx_compute_capability_targets():
    from export.trt_build import rtx_targets
    assert rtx_targets(["12.0", "8.9", "8.9"], "9.0") == ["8.9", "12.0"]
    assert rtx_targets([], None) is None and rtx_targets([], "8.6") == ["8.6"]
    with pytest.raises(ConfigError, match="TensorRT-RTX cannot build engines for this GPU .compute capability 9.0"):
        rtx_targets([], "9.0")
    with pytest.raises(ConfigError, match="--compute-capability 9.0: TensorRT-RTX builds for 8.0 8.6 8.9 12.0"):
        rtx_targets(["9.0"], None)


def test_tensorrt_rtx_builds_engines(fx256):
    trt = pytest.importorskip("tensorrt_rtx_bindings", reason="pip install tensorrt-rtx-cu13-libs "
                                                               "tensorrt-rtx-cu13-bindings to test engine builds")
    from export.manifest import write_manifest
    from export.trt_build import build_engines

    out = _ROOT / "trt-rtx"
    shutil.copytree(exported(fx256.name, "fp32"), out)
    m = json.loads((out / "manifest.json").read_text())
    files = {k[len("onnx/"):]: v for k, v in m["onnx"]["files"].items()}
    info = build_engines(out / "onnx", out / "engines", files, fx256.cfg.scale_ranges(), [2],
                         flavor="tensorrt-rtx", optimization_level=0, workspace_gb=1.0,
                         timing_cache=None, compute_capabilities=["8.9", "8.0"])
    m["tensorrt"] = info
    write_manifest(out, {k: v for k, v in m.items() if k != "format_version"})
    m = load_manifest(out, fx256.cfg, weights_hash(fx256.var, fx256.vae), "fp32", 2)
    assert m["tensorrt"]["flavor"] == "tensorrt-rtx" and m["tensorrt"]["version"] == trt.__version__
    assert m["tensorrt"]["compute_capability"] is None  # built on a machine without a GPU
    assert m["tensorrt"]["target_compute_capabilities"] == ["8.0", "8.9"]
    engines = m["tensorrt"]["engines"]
    assert set(engines) == {"condition.engine", "step.engine", "decode.engine", "encode.engine"} | {
        f"transition_{si}.engine" for si in range(10)}
    step = engines["step.engine"]["profiles"]
    assert [p["graph"] for p in step] == [f"step_{si}" for si in range(10)]
    assert step[0]["input_shapes"]["past_k"] == [2, 4, 2, 0, 64] and step[9]["input_shapes"]["x"] == [4, 256, 128]
    for e in engines:
        assert (out / "engines" / e).stat().st_size > 0
    # Deserialising needs a CUDA device for TensorRT-RTX; on a CPU machine it must fail cleanly.
    if torch.cuda.is_available():
        pytest.skip("deserialisation on a GPU is covered by test_tensorrt_engine_runs")
    from var_rt.engines.tensorrt import TensorRTEngine
    with pytest.raises(BackendUnavailableError, match="CUDA GPU"):
        TensorRTEngine.from_dir(out, "cuda", batch=2)


def test_engines_only_builds_for_an_existing_export(fx256, capsys):
    pytest.importorskip("tensorrt_rtx_bindings", reason="pip install tensorrt-rtx-cu13-libs "
                                                        "tensorrt-rtx-cu13-bindings to test engine builds")
    out = _ROOT / "engines-only"
    shutil.copytree(exported(fx256.name, "fp32"), out)
    before = json.loads((out / "manifest.json").read_text())
    assert build_mod.main(["--engines-only", "--out-dir", str(out), "--trt-flavor", "tensorrt-rtx",
                           "--optimization-level", "0", "--compute-capability", "12.0", "--no-progress"]) == 0
    m = load_manifest(out, fx256.cfg, weights_hash(fx256.var, fx256.vae), "fp32", 2)
    assert m["onnx"] == before["onnx"] and m["tensorrt"]["target_compute_capabilities"] == ["12.0"]
    assert (out / "engines" / "step.engine").stat().st_size > 0
    assert build_mod.main(["--engines-only", "--out-dir", str(_ROOT / "nothing-here")]) == 2
    assert "has no finished export (manifest.json)" in capsys.readouterr().err


@pytest.mark.skipif(not torch.cuda.is_available(), reason="TensorRT engines run only on a CUDA GPU")
def test_tensorrt_engine_runs(fx256):  # pragma: no cover - needs a GPU TensorRT supports
    pytest.importorskip("tensorrt", reason="full TensorRT (pip install tensorrt-cu13) is needed on this GPU")
    from var_rt.engines.tensorrt import TensorRTEngine

    out = _ROOT / "trt-gpu"
    assert build_mod.main(build_args(fx256.name, out, "--trt-flavor", "tensorrt")) == 0
    engine = TensorRTEngine.from_dir(out, "cuda", batch=2)
    module = all_graphs(copy.deepcopy(fx256.var).cuda(), copy.deepcopy(fx256.vae).cuda())["step_3"]
    ins = {k: v.cuda() for k, v in sample_inputs(module, 2, torch.float32).items()}
    outs = {n: torch.empty(s, dtype=torch.float32, device="cuda") for n, (s, _) in module.io_spec(2)[1].items()}
    engine.run("step_3", ins, outs)
    torch.cuda.synchronize()
    want = reference(module, ins)
    assert (outs["logits"] - want[0]).abs().max() < 1e-3


def test_externalize_inlines_external_constant_nodes(tmp_path):
    """Over 2 GB the exporter writes Constant-node tensors to their own files (seen on d30): they are inlined."""
    import numpy as np
    import onnx
    from onnx import external_data_helper, helper, numpy_helper

    from export.onnx_export import WeightStore

    src = tmp_path / "src"
    src.mkdir()
    const = numpy_helper.from_array(np.arange(6, dtype=np.float32).reshape(2, 3), "c")
    external_data_helper.set_external_data(const, location="c_value")
    (src / "c_value").write_bytes(np.arange(6, dtype=np.float32).tobytes())
    const.ClearField("raw_data")
    weight = numpy_helper.from_array(np.ones((64, 64), np.float32), "w")
    node = helper.make_node("Constant", [], ["c"], value=const)
    add = helper.make_node("Add", ["c", "w"], ["y"])
    graph = helper.make_graph([node, add], "g", [], [helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, None)],
                              [weight])
    model = helper.make_model(graph)
    out = tmp_path / "out"
    out.mkdir()
    store = WeightStore(out)
    store.externalize(model, src)
    store.close()
    t = model.graph.node[0].attribute[0].t
    assert t.data_location == onnx.TensorProto.DEFAULT
    assert np.array_equal(numpy_helper.to_array(t), np.arange(6, dtype=np.float32).reshape(2, 3))
    assert model.graph.initializer[0].data_location == onnx.TensorProto.EXTERNAL


@pytest.mark.parametrize("n_in,n_out", [(16, 8), (16, 13), (32, 24), (13, 5)])
def test_area_downsample_as_matmul_is_area_interpolation(n_in, n_out):
    """The export form of area downsampling (two constant averaging matrices) computes F.interpolate's
    averages, also for sizes that do not divide, and on a non-square input."""
    import torch.nn.functional as F

    from var_rt.models.traceable import area_downsample

    x = torch.randn(2, 3, n_in, n_in + 3, dtype=torch.float64)
    want = F.interpolate(x, size=(n_out, n_out - 1), mode="area")
    assert torch.equal(area_downsample(x, (n_out, n_out - 1)), want)  # the eager form is interpolate itself
    got = area_downsample(x, (n_out, n_out - 1), as_matmul=True)
    assert got.shape == want.shape and (got - want).abs().max() < 1e-12
    x32 = x[..., :n_in].float()
    assert (area_downsample(x32, n_out, as_matmul=True) - F.interpolate(x32, size=n_out, mode="area")).abs().max() < 1e-6


def test_specialised_graphs_equal_traced_ones(fx256, tmp_path):
    """A fixed-shape file (the dynamic graph specialised by export.onnx_export.specialize) gives what the
    graph traced directly at that shape gives, under ONNX Runtime CPU: step_0 (its empty past), a step
    with a past, and a transition with a 16 -> 13 area downsample (measured: bit-identical)."""
    from export.onnx_export import export_one

    out = exported(fx256.name, "fp32")
    graphs = all_graphs(fx256.var, fx256.vae, export=True)
    for g in ("step_0", "step_4", "transition_7"):
        ins = sample_inputs(graphs[g], 2, torch.float32, seed=3)
        traced = export_one(graphs[g], g, 2, torch.float32, 17, tmp_path)
        for a, b in zip(run_ort(out / "onnx" / f"{g}.b2.onnx", ins), run_ort(traced, ins)):
            assert a.shape == b.shape and (a - b).abs().max() < 1e-6, (g, float((a - b).abs().max()))


def test_export_graphs_share_the_model_and_leave_it_alone(fx256):
    """all_graphs(export=True) holds the model's own tensors; only its copy of the VQVAE modules traces FP16
    convolutions in float32, so the model passed in keeps PyTorch's kernels."""
    from var_rt.models.traceable import Conv2d

    ref, exp = all_graphs(fx256.var, fx256.vae), all_graphs(fx256.var, fx256.vae, export=True)
    for g in ("decode", "encode", "transition_3", "step_3"):
        a, b = dict(ref[g].named_parameters()), dict(exp[g].named_parameters())
        assert a.keys() == b.keys() and all(a[k] is b[k] for k in a), g
    convs = lambda m: [c for c in m.modules() if isinstance(c, Conv2d)]  # noqa: E731
    assert convs(fx256.vae) and not any(c.trace_fp16_in_fp32 for c in convs(fx256.vae))
    assert len(convs(exp["decode"])) == len(convs(fx256.vae))  # every VQVAE convolution is one
    assert all(c.trace_fp16_in_fp32 for c in convs(exp["decode"]) + convs(exp["transition_3"]))


def test_fp16_convolutions_export_as_fp16_conv_nodes(fx256):
    """Traced in float32 on the CPU, every FP16 convolution of the decoder and encoder is still one Conv
    node on FP16 tensors in the exported graph (no casts to float32 around it)."""
    import onnx

    out = exported(fx256.name, "fp16")
    for g in ("decode", "encode", "transition_3"):
        model = onnx.shape_inference.infer_shapes(onnx.load(str(out / "onnx" / f"{g}.b2.onnx"),
                                                            load_external_data=False))
        types = {vi.name: vi.type.tensor_type.elem_type
                 for vi in list(model.graph.value_info) + list(model.graph.input) + list(model.graph.output)}
        types.update({t.name: t.data_type for t in model.graph.initializer})
        convs = [n for n in model.graph.node if n.op_type == "Conv"]
        assert convs, g
        for n in convs:
            assert {types[i] for i in n.input} == {onnx.TensorProto.FLOAT16}, (g, n.name, [types[i] for i in n.input])


@pytest.mark.parametrize("extra, needle", [
    (("--workspace-gb", "nan"), "--workspace-gb"),   # was accepted (nan <= 0 is False)
    (("--workspace-gb", "inf"), "--workspace-gb"),
    (("--timing-cache", "."), "--timing-cache"),     # a folder: found only when TensorRT writes the cache
])
def test_bad_tensorrt_options_are_refused_before_any_work(tmp_path, capsys, extra, needle):
    out = tmp_path / "x"
    args = build_mod.parser().parse_args(build_args("var_tiny_256", out, *extra))
    with pytest.raises(VarRtError, match=re.escape(needle)):
        build_mod.validate(args)
    assert not out.exists()


@pytest.mark.parametrize("manifest", [{"model": "x"}, {"model": {"var": 5}}, {"onnx": []}, {"batch_sizes": 8}])
def test_manifest_of_the_wrong_shape_is_one_error(fx256, tmp_path, manifest):
    """A damaged or foreign manifest.json with the right version: an AttributeError / TypeError traceback."""
    (tmp_path / "manifest.json").write_text(json.dumps({"format_version": 2, **manifest}))
    with pytest.raises(EngineMismatchError, match="manifest.json.*export again"):
        load_manifest(tmp_path, fx256.cfg, None, "fp32", 1)


@pytest.mark.parametrize("exc", [RuntimeError("[TRT] parse failed:\n  node 7\tunsupported"),
                                 ConfigError("bad\nconfig")])
def test_build_errors_print_one_line(monkeypatch, capsys, exc):
    """Library messages (TensorRT's span lines) still give one ``error:`` line and exit status 2."""
    def fail(args):
        raise exc
    monkeypatch.setattr(build_mod, "build", fail)
    monkeypatch.setattr(build_mod, "validate", lambda a: a)
    assert build_mod.main(["--model", "d16", "--random-weights", "--out-dir", "never-made"]) == 2
    lines = [ln for ln in capsys.readouterr().err.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), lines
