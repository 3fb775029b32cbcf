"""The benchmark (python -m benchmarks.bench) on the tiny fixture config on the CPU, and the floor analysis."""
from __future__ import annotations

import json
import os

import pytest
import torch

from benchmarks import bench, floors, official_code
from conftest import fixtures_dir


@pytest.fixture(scope="module")
def tiny_config():
    return str(fixtures_dir() / "var_tiny_256" / "config.json")


@pytest.fixture(scope="module")
def bench_run(tiny_config, tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    res = bench.main(["--config", tiny_config, "--random-weights", "--device", "cpu", "--dtype", "float32",
                      "--batch-sizes", "1", "--backends", "torch,onnxruntime", "--baselines", "official,official-code",
                      "--official-src", str(out),  # not a checkout of the official code: that baseline is skipped
                      "--iters", "2", "--warmup", "0", "--instrument-runs", "1", "--out-dir", str(out)])
    return out, res


def test_bench_outputs(bench_run):
    out, res = bench_run
    data = json.loads((out / "results.json").read_text())
    for key in ("device", "torch", "date", "command"):
        assert data["meta"][key]
    assert "benchmarks.bench" in data["meta"]["command"]
    cases = {(c["backend"], c["batch"]): c for c in data["cases"]}
    for name in ("torch", "official-style"):
        c = cases[(name, 1)]
        assert c["status"] == "ok", c
        for k in ("median_ms", "p90_ms", "img_per_s", "first_call_ms", "decoder_ms", "instrumented_total_ms"):
            assert c[k] > 0, (name, k, c[k])
        assert c["p90_ms"] >= c["median_ms"] > 0
        assert len(c["per_scale_ms"]) == 10 and all(v > 0 for v in c["per_scale_ms"])
        assert c["setup_s"] >= 0 and c["model_load_s"] > 0
    assert cases[("torch", 1)]["x_vs_official_style"] > 0
    assert cases[("torch", 1)]["step_ms"] and cases[("torch", 1)]["condition_ms"] > 0
    # a backend this build does not have is skipped with a reason, not a crash
    sk = cases[("onnxruntime", 1)]
    assert sk["status"] == "skipped" and sk["reason"]
    oc = cases[("official-code", 1)]  # so is the official code without a checkout, saying what to give
    assert oc["status"] == "skipped" and "is not a checkout of https://github.com/FoundationVision/VAR" in oc["reason"]
    assert "x_vs_official_code" not in cases[("torch", 1)]
    md = (out / "results.md").read_text()
    assert "| model | backend | batch |" in md and "official-style" in md and "re-implementation" in md
    assert "| x official code | x official-style |" in md
    assert "Reference" in md and "227.3" in md  # the official code's measured numbers are printed
    assert "Where the time goes" in md
    assert data["floors"]
    # the report says what this CPU float32 run did, and names no folder of the machine the reference came from
    assert "CUDA events" not in md and "(eager, FP16 autocast" not in md, md  # (the H100 reference did use it)
    assert "(host clock, time.perf_counter)" in md and "eager, float32, no autocast" in md
    assert "Source: benchmarks/reference_baselines.json (from h100-2026-11-22.json" in md
    assert "/shared/baselines/" not in md
    assert bench.repo_relative(bench.REF_PATH) == "benchmarks/reference_baselines.json"
    assert bench.repo_relative("/nonexistent/x.json") == "/nonexistent/x.json"
    if (out / "plot.png").is_file():
        assert not any("plot.png skipped" in n for n in data["notes"])
    else:  # matplotlib comes with the [bench] extra
        assert any("plot.png skipped" in n and ".[bench]" in n for n in data["notes"]) and "plot.png skipped" in md


def test_bench_time_budget(tiny_config, tmp_path):
    res = bench.main(["--config", tiny_config, "--device", "cpu", "--dtype", "float32", "--batch-sizes", "1", "2",
                      "--backends", "torch", "--baselines", "official,official-code", "--iters", "1", "--warmup", "0",
                      "--time-budget-s", "0", "--out-dir", str(tmp_path)])
    assert res["cases"] and all(c["status"] == "not_run" and "budget" in c["reason"] for c in res["cases"])
    assert sorted({c["kind"] for c in res["cases"]}) == ["backend", "official_code", "official_style"]
    assert (tmp_path / "results.md").is_file()


@pytest.mark.slow
def test_bench_dit_tiny(tmp_path, tiny_config):
    ok, why = bench.dit_mod.available()
    res = bench.main(["--config", tiny_config, "--device", "cpu", "--dtype", "float32", "--batch-sizes", "1",
                      "--backends", "torch", "--baselines", "dit", "--dit-tiny", "--dit-steps", "1",
                      "--dit-batch-sizes", "1", "--dit-iters", "1", "--iters", "1", "--warmup", "0",
                      "--instrument-runs", "0", "--out-dir", str(tmp_path)])
    d = [c for c in res["cases"] if c["kind"] == "dit"]
    assert len(d) == 1
    if not ok:
        assert d[0]["status"] == "skipped" and "diffusers" in d[0]["reason"]
        return
    assert d[0]["status"] == "ok" and d[0]["median_ms"] > 0
    t = [c for c in res["cases"] if c["backend"] == "torch"][0]
    assert t["x_vs_dit1"] > 0 and "this run" in t["x_vs_dit1_basis"]


@pytest.mark.skipif(not os.environ.get(official_code.ENV),
                    reason=f"needs a checkout of {official_code.REPO_URL} named by {official_code.ENV} (no network here)")
def test_official_code_computes_what_var_rt_computes(tmp_path):
    """The official-code baseline runs the official code on the benchmark's weights: with top-k 1 (no
    randomness) its images are var-rt's, on both fixtures (256 px, and 512 px with shared AdaLN); and the
    benchmark times it."""
    from conftest import get_fixture
    from var_rt.pipeline import VARPipeline
    src = official_code.source_dir()
    for name in ("var_tiny_256", "var_tiny_512_saln"):
        fx = get_fixture(name)
        off = official_code.OfficialCode(src, fx.cfg, fx.var.state_dict(), fx.vae.state_dict(),
                                         torch.device("cpu"), None)
        img = off.generate(torch.tensor([3, 7]), seed=0, cfg=1.5, top_k=1, top_p=0.0)
        ours = VARPipeline(fx.cfg, fx.var, fx.vae, torch.device("cpu"), torch.float32, progress=False).generate(
            class_labels=[3, 7], seed=0, cfg=1.5, top_k=1, top_p=0.0).images
        assert (img - ours).abs().max() < 1e-4, name
    res = bench.main(["--config", str(fixtures_dir() / "var_tiny_256" / "config.json"), "--device", "cpu",
                      "--dtype", "float32", "--batch-sizes", "1", "--backends", "torch", "--baselines",
                      "official-code", "--iters", "1", "--warmup", "0", "--instrument-runs", "0",
                      "--out-dir", str(tmp_path)])
    cases = {c["backend"]: c for c in res["cases"]}
    assert cases["official-code"]["status"] == "ok" and cases["torch"]["x_vs_official_code"] > 0
    assert len(res["meta"]["official_code"]["sha256_16"]) == 16


def test_official_code_source_is_checked(tmp_path, monkeypatch):
    monkeypatch.delenv(official_code.ENV, raising=False)
    with pytest.raises(official_code.Unavailable, match="give --official-src DIR"):
        official_code.source_dir(None)
    with pytest.raises(official_code.Unavailable, match="dist.py, models/var.py, models/vqvae.py missing"):
        official_code.source_dir(str(tmp_path))


def test_bench_cli_errors(tmp_path):
    with pytest.raises(SystemExit):
        bench.parse_args(["--out-dir", str(tmp_path)])  # no model
    with pytest.raises(SystemExit):
        bench.parse_args(["--model", "d16", "--backends", "foo", "--out-dir", str(tmp_path)])
    a = bench.parse_args(["--model", "d16", "d30", "--backends", "torch,cudagraph", "tensorrt",
                          "--baselines", "official,dit", "--out-dir", str(tmp_path)])
    assert a.backends == ["torch", "cudagraph", "tensorrt"] and a.baselines == ["official", "dit"]
    assert a.random_weights and (a.cfg, a.top_k, a.top_p) == (1.5, 900, 0.96)
    a = bench.parse_args(["--model", "d16", "--backend-arg", "engine_dir=/tmp/x=1", "compile=false",
                          "--out-dir", str(tmp_path)])
    assert a.backend_arg == [("engine_dir", "/tmp/x=1"), ("compile", False)]  # typed, not the text "false"
    with pytest.raises(SystemExit):  # a typo is refused, not dropped
        bench.parse_args(["--model", "d16", "--backend-arg", "engine_dri=/tmp/x", "--out-dir", str(tmp_path)])


# ---- floors ------------------------------------------------------------------------------------
def test_floor_flops_match_facts():
    # VAR_FACTS.md: with CFG d16 about 0.6 TFLOP/image, d30 about 3.8; decoder about 0.4;
    # the last two scales carry about 64% of the transformer FLOPs.
    d16, d30 = floors.PRESETS["d16"], floors.PRESETS["d30"]
    assert 0.55e12 < floors.transformer_flops(d16) < 0.65e12
    assert 3.6e12 < floors.transformer_flops(d30) < 4.0e12
    assert 0.33e12 < floors.decoder_flops(d16) < 0.45e12
    per = floors.transformer_flops_per_scale(d16)
    share = (per[-1]["total"] + per[-2]["total"]) / sum(x["total"] for x in per)
    assert 0.60 < share < 0.68


def test_floor_weight_bytes_match_facts():
    # about 0.4 GB (d16) / 2.65 GB (d30) of fp16 block weights per scale
    assert abs(floors.weight_bytes_per_scale(floors.PRESETS["d16"])["blocks"] / 1e9 - 0.40) < 0.02
    assert abs(floors.weight_bytes_per_scale(floors.PRESETS["d30"])["blocks"] / 1e9 - 2.65) < 0.05


def test_floor_regimes():
    d16 = floors.PRESETS["d16"]
    f1, f64 = floors.floors(d16, 1), floors.floors(d16, 64)
    assert all(x["bound"] == "bytes" for x in f1["per_scale"][:7])  # batch 1: reading weights (small scales)
    assert f1["per_scale"][-1]["bound"] == "flops"                   # 256 tokens x 2 rows: already arithmetic
    assert f64["per_scale"][-1]["bound"] == "flops"                  # batch 64, last scale: arithmetic
    assert f64["img_per_s"] > f1["img_per_s"] and f64["total_s"] > f1["total_s"] > 0
    # The floors from VAR_FACTS.md's numbers, worked by hand (3.0 TB/s, 790 TFLOP/s): batch 1 reads the
    # ~0.42 GB of weights at each of the 10 scales (1.4 ms; the last two scales are FLOP-bound, +0.16 ms) and
    # decodes (0.4 TFLOP: 0.5 ms) = 2.1 ms; batch 64 is FLOP-bound: 64 x (0.6 + 0.4) TFLOP / 790 TFLOP/s = 81 ms.
    # A floor that forgot the decoder, the per-scale weight reads, CFG's doubled rows, the batch or a unit is
    # outside these bounds (the H100's measured 24.8 ms / 376 ms were 11x / 4.7x too loose to catch any).
    assert 1.9e-3 < f1["total_s"] < 2.5e-3, f1["total_s"]
    assert 0.075 < f64["total_s"] < 0.090, f64["total_s"]


def test_floor_decoder_walk_matches_model(tiny_config):
    """The decoder layer walk counts exactly the conv weights of var_rt's Decoder (+ post_quant_conv)."""
    from var_rt.config import load_config
    from var_rt.models.vqvae import VQVAE
    for cfg in (load_config(tiny_config), load_config(str(fixtures_dir() / "var_tiny_512_saln" / "config.json"))):
        vae = VQVAE(cfg.vae)
        n = sum(m.weight.numel() for m in list(vae.decoder.modules()) + [vae.post_quant_conv]
                if isinstance(m, torch.nn.Conv2d))
        assert floors.decoder_weight_params(floors.shape_from_config(cfg)) == n


def test_serve_bench_cpu(tmp_path):
    """benchmarks.serve_bench on the fixture: direct and served numbers, every request answered, and the
    replica's Batcher ran batches of more than one image under 8 concurrent clients; with two replicas both
    answered."""
    pytest.importorskip("ray", reason="pip install -e '.[serve]' for the serving benchmark")
    from benchmarks import serve_bench
    fx = fixtures_dir() / "var_tiny_256"
    assert serve_bench.main(["--config", str(fx / "config.json"), "--var-ckpt", str(fx / "var.pth"),
                             "--vae-ckpt", str(fx / "vae.pth"), "--backend", "torch", "--device", "cpu",
                             "--dtype", "float32", "--max-batch-size", "4", "--clients", "8", "--images", "16",
                             "--num-replicas", "1", "2", "--out-dir", str(tmp_path)]) == 0
    res = json.loads((tmp_path / "serve.json").read_text())
    assert res["direct"]["images"] == 16 and res["direct"]["images_per_s"] > 0
    s = res["served"][0]
    assert s["status_codes"] == {"200": 16} and s["images_per_s"] > 0
    assert s["latency_p90_ms"] >= s["latency_median_ms"] > 0
    assert s["mean_batch"] > 1.5 and s["replicas_answering"] == 1, s
    two = res["served"][1]
    assert two["status_codes"] == {"200": 16} and two["replicas_answering"] == 2, two
    md = (tmp_path / "serve.md").read_text()
    assert "served (1 replica(s)) / direct" in md and "served (2 replica(s)) / direct" in md


def test_agreement_compare_counts_per_scale():
    """benchmarks.agreement: per-scale shares of equal tokens, the first scale that differs, image difference."""
    from benchmarks import agreement
    ref = {"tokens": [torch.tensor([[1]]), torch.tensor([[1, 2, 3, 4]])], "images": torch.zeros(1, 3, 2, 2)}
    got = {"tokens": [torch.tensor([[1]]), torch.tensor([[1, 2, 0, 4]])], "images": torch.full((1, 3, 2, 2), 0.25)}
    r = agreement.compare(ref, got)
    assert r["per_scale"] == [1.0, 0.75] and r["overall"] == 0.8 and r["first_differing_scale"] == 1
    assert r["image_max_abs_diff"] == 0.25
    assert agreement.compare(ref, ref)["first_differing_scale"] is None


def test_agreement_cli_same_backend_agrees(tmp_path):
    """Two runs of the PyTorch backend on a fixture's config (random weights) sample the same tokens."""
    from benchmarks import agreement
    out = tmp_path / "agree.json"
    cfg = fixtures_dir() / "var_tiny_256" / "config.json"
    assert agreement.main(["--config", str(cfg), "--backends", "torch", "torch", "--dtype", "float32",
                           "--device", "cpu", "--batch", "2", "--out", str(out)]) == 0
    ref, other = json.loads(out.read_text())["models"][0]["runs"]
    assert ref["reference"] and not other["reference"] and other["status"] == "ok"
    assert other["per_scale"] == [1.0] * 10 and other["image_max_abs_diff"] == 0.0


def test_agreement_against_the_official_code(tmp_path, monkeypatch):
    """``official-code`` as the reference of benchmarks.agreement: with a checkout its greedy tokens are var-rt's
    at every scale (float32); without one that run says what to give and the others still run."""
    from benchmarks import agreement
    cfg, out = fixtures_dir() / "var_tiny_256" / "config.json", tmp_path / "agree.json"
    src = os.environ.get(official_code.ENV)
    args = ["--config", str(cfg), "--backends", "official-code", "torch", "--dtype", "float32", "--device", "cpu",
            "--batch", "2", "--out", str(out)]
    if src is None:
        assert agreement.main(args + ["--official-src", str(tmp_path)]) == 1
        off, torch_run = json.loads(out.read_text())["models"][0]["runs"]
        assert off["status"] == "error" and "is not a checkout of" in off["reason"] and torch_run["status"] == "ok"
        return
    assert agreement.main(args) == 0
    ref, ours = json.loads(out.read_text())["models"][0]["runs"]
    assert ref["backend"] == "official-code" and ref["reference"]
    assert ours["per_scale"] == [1.0] * 10 and ours["image_max_abs_diff"] < 1e-4


def test_backend_arg_values():
    """--backend-arg values: booleans, numbers, JSON objects (engine_options) and paths."""
    v = bench.backend_arg_value
    assert v("true") is True and v("none") is None and v("16") == 16 and v("0.5") == 0.5
    assert v('{"cuda_graph": true}') == {"cuda_graph": True} and v("build/d16") == "build/d16"


@pytest.mark.parametrize("name,fam", [
    # names from the H200 profiles of 2026-12-03 (benchmarks/results/h200-2026-12-03/profile-d16.json)
    ("cudnn_generated_fort_native_sdpa_sm90_flash_fprop_wgmma_f16_knob_7_64x128x64_4x1x1_cga1x1x1_kernel0_0",
     "attention"),
    ("fmha_cutlassF_f16_aligned_32x128_gmem_sm80(PyTorchMemEffAttention::AttentionKernel<cutlass::half_t,",
     "attention"),
    ("sm90_xmma_fprop_implicit_gemm_f16f16_f16f32_f32_nhwckrsc_nhwc_tilesize256x96x32_warpgroupsize2x1x1_g1",
     "conv"),
    ("nvjet_sm90_hsh_256x128_64x4_1x2_h_bz_coopA_gelubias_TNT", "gemm"),
    ("void cublasLt::splitKreduce_kernel<32, 16, int, float, __half, float, __half, false>", "gemm"),
    ("triton_red_fused__to_copy__unsafe_index_add_arange_clone_convolution_mul_native_group_norm_silu_47",
     "norm"),
    ("triton_poi_fused__to_copy__unsafe_index_add_arange_clone_convolution_mul_silu_unsqueeze_51",
     "triton_fused"),
    ("_modulated_ln_kernel", "norm"),
    ("_gn_apply_kernel", "norm"),
    ("_sample_kernel", "sampler"),
    ("void var_rt::scale_transition_kernel<1, 1>(var_rt::TransitionParams)", "transition"),
    ("Memset (Unknown)", "memset_memcpy"),
])
def test_profile_kernel_families(name, fam):
    """Convolutions are not GEMMs, Inductor's fused norms are norms, SDPA is attention."""
    from benchmarks.profile import family
    assert family(name) == fam
