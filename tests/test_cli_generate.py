"""`python -m var_rt generate`: output files, parity of the PNGs, and one clear error per bad input."""
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import REPO, get_fixture
from var_rt.images import load_image, to_uint8


def run_cli(*args, cwd=None):
    return subprocess.run([sys.executable, "-m", "var_rt", *map(str, args)], capture_output=True, text=True,
                          cwd=cwd or REPO, timeout=300)


def fixture_args(fx):
    return ["--config", fx.config_path, "--var-ckpt", fx.var_ckpt, "--vae-ckpt", fx.vae_ckpt]


@pytest.mark.parametrize("name", ["var_tiny_256", "var_tiny_512_saln"])
def test_generate_matches_greedy_fixture(tmp_path, name):
    fx = get_fixture(name)
    labels = fx.cases["labels"].tolist()
    r = run_cli("generate", *fixture_args(fx), "--class-labels", *labels, "--cfg", 1.5, "--top-k", 1, "--seed", 0,
                "--device", "cpu", "--dtype", "float32", "--output-dir", tmp_path / "out",
                "--grid", tmp_path / "grid.png", "--no-progress")
    assert r.returncode == 0, r.stderr
    files = sorted((tmp_path / "out").glob("*.png"))
    assert len(files) == len(labels)
    want = to_uint8(fx.cases["greedy_image"])
    for i, f in enumerate(files):
        got = load_image(f)
        diff = np.abs(got.astype(int) - want[i].astype(int))
        assert diff.max() <= 1, f"{f.name}: max difference {diff.max()} levels"
        assert (diff > 0).mean() < 0.01
    g = load_image(tmp_path / "grid.png")
    H = fx.cfg.image_size
    assert g.shape[0] >= H and g.shape[1] >= len(labels) * H


def test_random_labels_and_batches_follow_seeds(tmp_path):
    """Random labels come from the seeds; splitting into batches changes nothing."""
    fx = get_fixture("var_tiny_256")
    common = [*fixture_args(fx), "--num-images", 3, "--seed", 5, "--device", "cpu", "--no-progress"]
    r1 = run_cli("generate", *common, "--output-dir", tmp_path / "a")
    r2 = run_cli("generate", *common, "--batch-size", 2, "--output-dir", tmp_path / "b")
    assert r1.returncode == 0 and r2.returncode == 0, r1.stderr + r2.stderr
    a, b = sorted((tmp_path / "a").iterdir()), sorted((tmp_path / "b").iterdir())
    assert [f.name for f in a] == [f.name for f in b]
    assert [f.name.split("_")[2] for f in a] == ["seed5.png", "seed6.png", "seed7.png"]
    for fa, fb in zip(a, b):  # equal up to float rounding of different batch shapes
        assert np.abs(load_image(fa).astype(int) - load_image(fb).astype(int)).max() <= 1


def _bad(tmp_path, *args):
    out = tmp_path / "never"
    r = run_cli("generate", *args, "--output-dir", out, "--no-progress")
    assert r.returncode != 0
    assert not out.exists(), "a failed run must write nothing"
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "Traceback" not in r.stderr
    return lines[0]


def test_error_depth_mismatch(tmp_path):
    fx = get_fixture("var_tiny_256")
    msg = _bad(tmp_path, "--model", "d16", "--var-ckpt", fx.var_ckpt, "--vae-ckpt", fx.vae_ckpt, "--device", "cpu")
    # compared before anything is built (issue 25): the fields, not a d16 model's key shapes
    assert "does not match" in msg and "var.depth is 16 in the config but 2 in the file" in msg and "depth 2" in msg


def test_error_preset_suggested_for_real_layout(tmp_path):
    """A d16-shaped file loaded as d20 names d16 as the preset that fits (built on the meta device: no RAM)."""
    from var_rt.checkpoint import describe_var_state_dict
    from var_rt.config import get_preset
    from var_rt.models.var import VAR
    with torch.device("meta"):
        sd = VAR(get_preset("d16")).state_dict()
    assert "'d16'" in describe_var_state_dict(sd)


def test_error_wrong_schedule(tmp_path):
    fx = get_fixture("var_tiny_256")
    other = get_fixture("var_tiny_512_saln")
    msg = _bad(tmp_path, "--config", fx.config_path, "--var-ckpt", other.var_ckpt, "--vae-ckpt", fx.vae_ckpt,
               "--device", "cpu")
    assert "pos_1LC" in msg or "shared_ada_lin" in msg


def test_error_swapped_checkpoints(tmp_path):
    fx = get_fixture("var_tiny_256")
    msg = _bad(tmp_path, "--config", fx.config_path, "--var-ckpt", fx.vae_ckpt, "--vae-ckpt", fx.var_ckpt,
               "--device", "cpu")
    assert "VQVAE checkpoint" in msg or "swap" in msg


def test_error_truncated_checkpoint(tmp_path):
    fx = get_fixture("var_tiny_256")
    cut = tmp_path / "cut.pth"
    data = Path(fx.var_ckpt).read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    msg = _bad(tmp_path, "--config", fx.config_path, "--var-ckpt", cut, "--vae-ckpt", fx.vae_ckpt, "--device", "cpu")
    assert "truncated" in msg


def test_error_corrupt_checkpoint(tmp_path):
    fx = get_fixture("var_tiny_256")
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"this is not a checkpoint" * 100)
    msg = _bad(tmp_path, "--config", fx.config_path, "--var-ckpt", bad, "--vae-ckpt", fx.vae_ckpt, "--device", "cpu")
    assert "could not be read" in msg


def test_error_missing_checkpoint_file(tmp_path):
    fx = get_fixture("var_tiny_256")
    msg = _bad(tmp_path, "--config", fx.config_path, "--var-ckpt", tmp_path / "nope.pth", "--device", "cpu")
    assert "does not exist" in msg


def test_error_no_checkpoint(tmp_path):
    msg = _bad(tmp_path, "--model", "d16", "--device", "cpu")
    assert "--random-weights" in msg and "download" in msg


def test_error_class_out_of_range(tmp_path):
    fx = get_fixture("var_tiny_256")
    msg = _bad(tmp_path, *fixture_args(fx), "--class-labels", 3, 11, "--device", "cpu")
    assert "11" in msg and "0..9" in msg


def test_error_bad_sampling_options(tmp_path):
    fx = get_fixture("var_tiny_256")
    assert "top-p" in _bad(tmp_path, *fixture_args(fx), "--top-p", 1.5, "--device", "cpu")
    assert "one value per scale" in _bad(tmp_path, *fixture_args(fx), "--cfg-schedule", "1,2", "--device", "cpu")
    assert "batch-size" in _bad(tmp_path, *fixture_args(fx), "--batch-size", 0, "--device", "cpu")


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without a GPU")
def test_error_missing_gpu(tmp_path):
    fx = get_fixture("var_tiny_256")
    msg = _bad(tmp_path, *fixture_args(fx), "--device", "cuda")
    assert "no CUDA GPU" in msg


def test_error_unknown_backend(tmp_path):
    fx = get_fixture("var_tiny_256")
    msg = _bad(tmp_path, *fixture_args(fx), "--backend", "nope", "--device", "cpu")
    assert "backend" in msg


def test_error_bad_config_json(tmp_path):
    p = tmp_path / "c.json"
    p.write_text('{"var": {"depth": 2, "bogus": 1}, "vae": {}}')
    msg = _bad(tmp_path, "--config", p, "--random-weights", "--device", "cpu")
    assert "bogus" in msg


def test_random_weights_run(tmp_path):
    fx = get_fixture("var_tiny_256")
    r = run_cli("generate", "--config", fx.config_path, "--random-weights", "--num-images", 2, "--device", "cpu",
                "--grid", tmp_path / "g.png", "--no-progress")
    assert r.returncode == 0, r.stderr
    assert "random weights" in r.stderr
    assert load_image(tmp_path / "g.png").shape[2] == 3


# ---- issue 13: every bad input one clear error, nothing written ----------------------------------------

def _refused(r, *never):
    """Exit status 2, one `error:` line (no traceback, no warnings before it) and none of ``never`` written."""
    assert r.returncode == 2, r.stderr
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    assert "\x1b" not in r.stderr
    for p in never:
        assert not Path(p).exists(), f"a refused run wrote {p}"
    return lines[0]


@pytest.mark.parametrize("case", ["proc_dir", "dir_under_file", "proc_grid"])
def test_error_unwritable_outputs(tmp_path, case):
    """Checked before any model work: nothing written, not even the images when only the grid is impossible."""
    fx = get_fixture("var_tiny_256")
    (tmp_path / "afile").write_text("x")
    out = tmp_path / "o"
    args = {"proc_dir": ["--output-dir", "/proc/var-rt-x"],
            "dir_under_file": ["--output-dir", tmp_path / "afile" / "sub"],
            "proc_grid": ["--output-dir", out, "--grid", "/proc/var-rt-g.png"]}[case]
    r = run_cli("generate", *fixture_args(fx), "--device", "cpu", "--no-progress", *args)
    msg = _refused(r, out, "/proc/var-rt-x", "/proc/var-rt-g.png", tmp_path / "afile" / "sub")
    assert {"proc_dir": "cannot write in '/proc'", "dir_under_file": "is a file",
            "proc_grid": "--grid"}[case] in msg
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


def test_existing_outputs_refused_unless_overwrite(tmp_path):
    fx = get_fixture("var_tiny_256")
    out, grid = tmp_path / "o", tmp_path / "o" / "grid.png"
    common = [*fixture_args(fx), "--class-labels", 1, "--seed", 0, "--device", "cpu", "--no-progress",
              "--output-dir", out, "--grid", grid]
    assert run_cli("generate", *common).returncode == 0
    first = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(first) == ["00000_class1_seed0.png", "grid.png"]
    msg = _refused(run_cli("generate", *common, "--cfg", 4, "--top-k", 1))
    assert "00000_class1_seed0.png" in msg and "grid.png" in msg and "--overwrite" in msg
    assert {p.name: p.read_bytes() for p in out.iterdir()} == first, "a refused run changed the outputs"
    r = run_cli("generate", *common, "--cfg", 4, "--top-k", 1, "--overwrite")
    assert r.returncode == 0, r.stderr
    now = {p.name: p.read_bytes() for p in out.iterdir()}
    assert sorted(now) == sorted(first) and now != first  # replaced in place, no temporary files left


@pytest.mark.parametrize("args, needle", [
    (["--cfg", "nan"], "--cfg must be a finite number"),
    (["--cfg", "inf"], "--cfg must be a finite number"),
    (["--cfg-schedule", "1,1,1,1,1,1,1,1,1,nan"], "--cfg-schedule: nan is not a finite number"),
    (["--top-p", "nan"], "--top-p must be a finite number"),
    (["--num-images", 0], "--num-images must be >= 1"),
    (["--seed", -3], "--seed"),
])
def test_error_non_finite_and_out_of_range_sampling(tmp_path, args, needle):
    fx = get_fixture("var_tiny_256")
    assert needle in _bad(tmp_path, *fixture_args(fx), "--device", "cpu", *args)


@pytest.mark.parametrize("value", [float("nan"), float("inf")])
def test_error_non_finite_weights(tmp_path, value):
    fx = get_fixture("var_tiny_256")
    sd = torch.load(fx.vae_ckpt, weights_only=True)
    sd["decoder.conv_out.weight"][0, 0, 0, 0] = value
    torch.save(sd, tmp_path / "vae.pth")
    msg = _bad(tmp_path, "--config", fx.config_path, "--var-ckpt", fx.var_ckpt, "--vae-ckpt", tmp_path / "vae.pth",
               "--device", "cpu")
    assert "NaN or infinite" in msg and "decoder.conv_out.weight" in msg


def test_error_bad_config_value_names_field(tmp_path):
    import json
    fx = get_fixture("var_tiny_256")
    raw = json.loads(fx.config_path.read_text())
    raw["var"]["depth"] = "x"
    raw["vae_checkpoint"] = str(fx.vae_ckpt)
    (tmp_path / "c.json").write_text(json.dumps(raw))
    msg = _bad(tmp_path, "--config", tmp_path / "c.json", "--var-ckpt", fx.var_ckpt, "--device", "cpu")
    assert "var.depth must be an integer, got 'x'" in msg


def test_error_pickled_objects_refused_safely(tmp_path):
    """A checkpoint with Python objects: named, refused, and no advice to load it with weights_only=False."""
    import argparse
    fx = get_fixture("var_tiny_256")
    sd = torch.load(fx.var_ckpt, weights_only=True)
    torch.save({**sd, "args": argparse.Namespace(lr=1)}, tmp_path / "pickled.pth")
    msg = _bad(tmp_path, "--config", fx.config_path, "--var-ckpt", tmp_path / "pickled.pth", "--vae-ckpt",
               fx.vae_ckpt, "--device", "cpu")
    assert "argparse.Namespace" in msg and "weights_only" not in msg and "trust" not in msg


def test_error_truncated_checkpoint_message_is_whole(tmp_path):
    fx = get_fixture("var_tiny_256")
    data = Path(fx.var_ckpt).read_bytes()
    (tmp_path / "cut.pth").write_bytes(data[: len(data) // 2])
    msg = _bad(tmp_path, "--config", fx.config_path, "--var-ckpt", tmp_path / "cut.pth", "--vae-ckpt", fx.vae_ckpt,
               "--device", "cpu")
    assert "failed finding central directory); the file is truncated" in msg, msg


def test_warnings_held_back_on_error_and_printed_on_success(tmp_path):
    """An old VAR file (no attention temperature) warns; with a wrong VQVAE file the error line stands alone."""
    fx = get_fixture("var_tiny_256")
    sd = torch.load(fx.var_ckpt, weights_only=True)
    torch.save({k: v for k, v in sd.items() if "scale_mul" not in k}, tmp_path / "old.pth")
    msg = _bad(tmp_path, "--config", fx.config_path, "--var-ckpt", tmp_path / "old.pth", "--vae-ckpt", fx.var_ckpt,
               "--device", "cpu")
    assert "VQVAE" in msg
    r = run_cli("generate", "--config", fx.config_path, "--var-ckpt", tmp_path / "old.pth", "--vae-ckpt",
                fx.vae_ckpt, "--device", "cpu", "--no-progress", "--grid", tmp_path / "g.png")
    assert r.returncode == 0, r.stderr
    assert [l for l in r.stderr.splitlines() if "scale_mul_1H11" in l] == [
        f"warning: {tmp_path / 'old.pth'}: no attn.scale_mul_1H11 in the checkpoint; using the official initial "
        f"value log(4)"]


def test_error_missing_engine_dir(tmp_path):
    fx = get_fixture("var_tiny_256")
    msg = _bad(tmp_path, *fixture_args(fx), "--device", "cpu", "--backend", "onnxruntime",
               "--engine-dir", tmp_path / "no-export")
    assert "does not exist" in msg and "manifest.json" in msg


def test_download_without_its_extra_says_how_to_install_it(tmp_path, capsys, monkeypatch):
    """The README's install line has no [download] extra: `download` says how to install huggingface_hub with
    a command that works from a checkout (var-rt is not on PyPI), in one line, writing nothing."""
    from var_rt.cli import main
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)  # import fails, as when it is not installed
    assert main(["download", "--model", "d16", "--dir", str(tmp_path / "ck")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: downloading needs huggingface_hub") and err.count("\n") == 1, err
    assert "python -m pip install 'huggingface_hub" in err and "-e '.[download]'" in err
    assert not (tmp_path / "ck").exists()


# What the command line must answer before torch is imported (issue 22): help, argparse errors, and the
# checks that run before any model work. Each runs main() in a fresh interpreter and reports the exit
# status and which heavy modules were imported.
_NO_TORCH_PROBE = """
import json, sys
from var_rt.cli import main
try:
    rc = main(sys.argv[1:])
except SystemExit as e:
    rc = e.code
print(json.dumps({"rc": rc, "torch": "torch" in sys.modules, "pipeline": "var_rt.pipeline" in sys.modules}),
      file=sys.stderr)
"""


@pytest.mark.parametrize("args, rc", [
    (["--help"], 0),
    (["generate", "--help"], 0),
    (["edit", "--help"], 0),
    (["sample", "--help"], 0),
    (["serve", "--help"], 0),
    (["fid", "--help"], 0),
    (["generate", "--cfg", "x"], 2),  # argparse type error
    (["nonsense"], 2),  # unknown command
    # the checks that run before any model work
    (["generate", "--model", "d16", "--random-weights", "--top-k", "-5", "--grid", "{tmp}/g.png"], 2),
    (["edit", "--model", "d16", "--random-weights", "--image", "{tmp}/in.png", "--grid", "{tmp}/g.png"], 2),
    (["sample", "--model", "d16", "--random-weights", "--var-ckpt", "v.pth", "--output-dir", "{tmp}/s"], 2),
    (["serve", "--model", "d16", "--random-weights", "--num-replicas", "0"], 2),
    (["fid", "{tmp}/samples.npz"], 2),
])
def test_cli_answers_without_importing_torch(tmp_path, args, rc):
    import json
    args = [a.format(tmp=tmp_path) for a in args]
    r = subprocess.run([sys.executable, "-c", _NO_TORCH_PROBE, *args], capture_output=True, text=True,
                       cwd=REPO, timeout=120)
    report = json.loads(r.stderr.strip().splitlines()[-1])
    assert report["rc"] == rc, r.stdout + r.stderr
    assert not report["torch"], f"{args}: torch was imported"
    assert not report["pipeline"], f"{args}: var_rt.pipeline was imported"


def test_import_var_rt_is_lazy():
    """``import var_rt`` does not load torch; ``var_rt.VARPipeline`` loads it on first use."""
    code = ("import sys, var_rt; assert 'torch' not in sys.modules, 'eager'; "
            "from var_rt import VARPipeline, GenerationResult; import var_rt.pipeline as p; "
            "assert VARPipeline is p.VARPipeline and var_rt.GenerationResult is p.GenerationResult; "
            "assert 'torch' in sys.modules; assert set(var_rt.__all__) <= set(dir(var_rt)); print('ok')")
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert r.returncode == 0 and r.stdout.strip() == "ok", r.stderr


@pytest.mark.parametrize("device", ["meta", "mps", "xpu:0"])
def test_error_device_of_another_kind(tmp_path, device):
    fx = get_fixture("var_tiny_256")
    out = tmp_path / "never"
    r = run_cli("generate", *fixture_args(fx), "--device", device, "--output-dir", out, "--no-progress")
    assert r.returncode == 2 and not out.exists(), r.stderr
    assert r.stderr.count("\n") == 1 and "Traceback" not in r.stderr
    assert device in r.stderr and "cpu" in r.stderr and "cuda" in r.stderr


def test_error_engine_dir_without_an_exported_backend(tmp_path, capsys):
    """--engine-dir with --backend torch was silently ignored (the run used the checkpoints, not the export)."""
    from var_rt.cli import main
    fx = get_fixture("var_tiny_256")
    out = tmp_path / "never"
    rc = main(["generate", *map(str, fixture_args(fx)), "--device", "cpu", "--engine-dir", str(tmp_path),
               "--output-dir", str(out), "--no-progress"])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert "--engine-dir" in err and "onnxruntime" in err and not out.exists()


@pytest.mark.parametrize("case", ["grid is an image's name", "a folder has an image's name"])
def test_error_outputs_that_clash_are_refused_before_generation(tmp_path, capsys, case):
    """--grid naming one of the PNGs (the grid silently replaced the image) or a folder where a PNG is to go
    with --overwrite (it failed after generating and left a temporary file): refused before any model work."""
    from var_rt.cli import main
    fx = get_fixture("var_tiny_256")
    out = tmp_path / "out"
    name = "00000_class3_seed0.png"
    extra = ["--grid", str(out / name)] if case.startswith("grid") else ["--overwrite"]
    if case.startswith("a folder"):
        (out / name).mkdir(parents=True)
    rc = main(["generate", *map(str, fixture_args(fx)), "--device", "cpu", "--class-labels", "3",
               "--output-dir", str(out), "--no-progress", *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    assert name in err
    assert [p.name for p in out.rglob("*")] == ([name] if case.startswith("a folder") else [])


def test_download_into_a_file_is_refused_before_downloading(tmp_path, capsys, monkeypatch):
    """--dir naming a file: was reported (with huggingface_hub) as 'could not download ... needs internet'."""
    from var_rt.cli import main
    monkeypatch.setitem(sys.modules, "huggingface_hub", None)
    (tmp_path / "f").write_text("a file")
    assert main(["download", "--model", "d16", "--dir", str(tmp_path / "f")]) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: --dir") and "is a file" in err and err.count("\n") == 1, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["f"]
