"""Dataset-scale sampling: files independent of the number of workers, resume after partial shards and crashes."""
import pytest

ray = pytest.importorskip("ray", reason="the [serve] extra (ray[serve]) is not installed")

import json  # noqa: E402
import shutil  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

from conftest import get_fixture  # noqa: E402
from var_rt.errors import ConfigError  # noqa: E402
from var_rt.images import load_image  # noqa: E402
from var_rt.pipeline import VARPipeline  # noqa: E402
from var_rt.sample import MARKER_DIR, run_sample  # noqa: E402

# 3 classes x 4 = 12 images, shards of 4 (3 shards), pipeline calls of 2 (2 per shard)
JOB = dict(num_classes=3, per_class=4, seed=100, shard_size=4, batch_size=2, cfg=1.5, top_k=900, top_p=0.96)
NAMES = [f"{i:06d}_class{i // 4}_seed{100 + i}.png" for i in range(12)]


def _kwargs():
    fx = get_fixture("var_tiny_256")
    return dict(config=str(fx.config_path), var_ckpt=str(fx.var_ckpt), vae_ckpt=str(fx.vae_ckpt),
                device="cpu", dtype="float32")


@pytest.fixture(scope="module", autouse=True)
def ray_session():
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield
    ray.shutdown()


def _one_thread(fn):
    """Ray workers run PyTorch on one thread (num_cpus=1); do the same here, so float rounding matches."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return fn()
    finally:
        torch.set_num_threads(n)


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "out"
    npz = _one_thread(lambda: run_sample(_kwargs(), out, num_workers=1, progress=False, **JOB))
    return out, npz


def _files(d):
    return {p.name: p.read_bytes() for p in d.iterdir() if p.is_file() and p.suffix == ".png"}


def _assert_same_output(a, b):
    fa, fb = _files(a), _files(b)
    assert sorted(fb) == NAMES, "missing or extra files"
    assert fa == fb, [n for n in fa if fa[n] != fb.get(n)]
    assert sorted(p.name for p in (b / MARKER_DIR).iterdir()) == [f"{k:06d}.done" for k in range(3)]
    assert not list(b.glob("*.tmp"))
    na, nb = np.load(a / "samples.npz")["arr_0"], np.load(b / "samples.npz")["arr_0"]
    assert np.array_equal(na, nb)


def test_one_worker_layout_npz_and_parity(reference):
    out, npz = reference
    assert npz == out / "samples.npz"
    assert sorted(_files(out)) == NAMES
    arr = np.load(npz)["arr_0"]
    assert arr.dtype == np.uint8 and arr.shape == (12, 256, 256, 3)
    for i, name in enumerate(NAMES):
        assert np.array_equal(arr[i], load_image(out / name))
    pipe = VARPipeline.load(**_kwargs(), progress=False)  # same batch (images 4, 5) -> the same bytes
    want = _one_thread(lambda: pipe.generate(class_labels=[1, 1], seed=[104, 105]).numpy())
    assert np.array_equal(arr[4:6], want)


def test_two_workers_give_the_same_files(reference, tmp_path):
    run_sample(_kwargs(), tmp_path / "out", num_workers=2, progress=False, **JOB)
    _assert_same_output(reference[0], tmp_path / "out")


def test_worker_killed_mid_job_is_replaced(reference, tmp_path, monkeypatch):
    """A worker dies (os._exit) halfway through shard 1, leaving a broken PNG: its work is redone elsewhere."""
    import var_rt.sample
    flag = tmp_path / "crashed"
    monkeypatch.setattr(var_rt.sample, "_crash", (6, str(flag)))  # the test hook: image 6's worker dies once
    run_sample(_kwargs(), tmp_path / "out", num_workers=2, progress=False, **JOB)
    assert flag.exists(), "the test hook did not fire"
    _assert_same_output(reference[0], tmp_path / "out")


def test_public_signatures_hold_no_test_hooks():
    """The crash hook is a module global the tests set, not a parameter of run_sample (or of the CLI's helpers)."""
    import inspect
    import var_rt.sample
    for fn in (run_sample, var_rt.sample._run_local, var_rt.sample._run_ray):
        hooks = [n for n in inspect.signature(fn).parameters if "crash" in n]
        assert not hooks, f"{fn.__name__} takes test hooks {hooks}"


def test_resume_redoes_partial_shards_only(reference, tmp_path):
    """A crash left shard 1 without its marker, one PNG missing, one truncated and a temporary file."""
    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    (out / "samples.npz").unlink()
    (out / MARKER_DIR / "000001.done").unlink()
    (out / NAMES[5]).unlink()
    (out / NAMES[6]).write_bytes((out / NAMES[6]).read_bytes()[:100])
    (out / (NAMES[7] + ".123.tmp")).write_bytes(b"partial")
    (out / MARKER_DIR / "000002.done").unlink()  # marker gone but files complete: redone, same bytes
    untouched = {n: (out / n).stat().st_mtime_ns for n in NAMES[:4]}
    _one_thread(lambda: run_sample(_kwargs(), out, num_workers=1, progress=False, **JOB))
    _assert_same_output(reference[0], out)
    assert {n: (out / n).stat().st_mtime_ns for n in NAMES[:4]} == untouched, "a done shard was regenerated"


def test_resume_redoes_a_finished_shard_with_a_truncated_png(reference, tmp_path):
    """Shard 0 has its marker but one PNG lost its end (a disk or copy problem): the sizes in the marker
    show it, the shard is redone, and the .npz is packed instead of failing on the broken file."""
    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    (out / "samples.npz").unlink()
    (out / NAMES[1]).write_bytes((out / NAMES[1]).read_bytes()[:-200])
    untouched = {n: (out / n).stat().st_mtime_ns for n in NAMES[4:]}
    _one_thread(lambda: run_sample(_kwargs(), out, num_workers=1, progress=False, **JOB))
    _assert_same_output(reference[0], out)
    assert {n: (out / n).stat().st_mtime_ns for n in NAMES[4:]} == untouched, "a verified shard was regenerated"


def test_npz_of_an_unreadable_png_is_one_error(reference, tmp_path):
    """A PNG broken after the resume check: one error naming it, its shard unmarked, no half-written .npz."""
    from var_rt.errors import VarRtError
    from var_rt.sample import SampleJob, model_identity, write_npz
    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    job = SampleJob(**json.loads((out / "job.json").read_text()))
    assert job.model == model_identity(_kwargs())
    (out / NAMES[9]).write_bytes((out / NAMES[9]).read_bytes()[:300])
    with pytest.raises(VarRtError, match=f"{NAMES[9]} cannot be read.*run the same command again"):
        write_npz(out, job, tmp_path / "x.npz")
    assert not (out / MARKER_DIR / "000002.done").exists() and (out / MARKER_DIR / "000001.done").exists()
    assert not list(tmp_path.glob("x.npz*"))


def test_resume_with_other_options_is_refused(reference, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(reference[0], out)
    with pytest.raises(ConfigError, match="another sampling job.*seed"):
        run_sample(_kwargs(), out, num_workers=1, progress=False, **dict(JOB, seed=7))
    assert json.loads((out / "job.json").read_text())["seed"] == 100
    with pytest.raises(ConfigError, match="another sampling job.*batch_size"):  # pixels depend on the batch
        run_sample(_kwargs(), out, num_workers=1, progress=False, **dict(JOB, batch_size=4))
    with pytest.raises(ConfigError, match="another sampling job.*model"):  # so does the device
        run_sample(dict(_kwargs(), device="cuda"), out, num_workers=1, progress=False, **JOB)


def test_cli_sample_records_batch_size():
    """`sample --help` states the default --batch-size the code uses; job.json records the one used, and a
    resume with another is one error line, exit 2."""
    import subprocess
    import sys
    import tempfile
    from conftest import REPO
    from var_rt.sample import DEFAULT_CHUNK
    h = subprocess.run([sys.executable, "-m", "var_rt", "sample", "--help"], capture_output=True, text=True, cwd=REPO)
    text = " ".join(h.stdout.split())
    assert h.returncode == 0 and f"images per pipeline call (default {DEFAULT_CHUNK})" in text, h.stdout
    assert "forward pass (default: all)" not in text
    fx = get_fixture("var_tiny_256")
    with tempfile.TemporaryDirectory() as d:
        base = [sys.executable, "-m", "var_rt", "sample", "--config", str(fx.config_path), "--var-ckpt",
                str(fx.var_ckpt), "--vae-ckpt", str(fx.vae_ckpt), "--device", "cpu", "--classes", "7",
                "--per-class", "1", "--num-workers", "1", "--no-npz", "--output-dir", d, "--no-progress"]
        r = subprocess.run(base + ["--batch-size", "1"], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert r.returncode == 0, r.stderr
        job = json.loads((Path(d) / "job.json").read_text())
        assert job["batch_size"] == 1 and job["model"]["device"] == "cpu" and job["model"]["backend"] == "torch"
        r = subprocess.run(base + ["--batch-size", "2"], capture_output=True, text=True, cwd=REPO, timeout=300)
        assert r.returncode == 2 and r.stderr.startswith("error: ") and r.stderr.count("\n") == 1, r.stderr
        assert "batch_size" in r.stderr


def test_cli_sample_and_core_without_ray(tmp_path):
    """`sample` through its argparse registration; importing the core runtime does not import Ray."""
    import argparse
    import subprocess
    import sys
    from var_rt.sample import add_sample_parser
    from var_rt.serve import add_serve_parser
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    add_sample_parser(sub)
    add_serve_parser(sub)
    fx = get_fixture("var_tiny_256")
    a = p.parse_args(["sample", "--config", str(fx.config_path), "--var-ckpt", str(fx.var_ckpt), "--vae-ckpt",
                      str(fx.vae_ckpt), "--device", "cpu", "--classes", "7", "--per-class", "2", "--seed", "3",
                      "--num-workers", "1", "--output-dir", str(tmp_path / "o"), "--no-progress"])
    assert a.func(a) == 0
    assert sorted(f.name for f in (tmp_path / "o").glob("*.png")) == ["000000_class7_seed3.png",
                                                                      "000001_class7_seed4.png"]
    assert np.load(tmp_path / "o" / "samples.npz")["arr_0"].shape == (2, 256, 256, 3)
    s = p.parse_args(["serve", "--model", "d16", "--random-weights", "--num-replicas", "2", "--port", "8001"])
    assert s.num_replicas == 2 and s.port == 8001
    code = "import sys, var_rt, var_rt.cli, var_rt.pipeline, var_rt.sample, var_rt.serve; " \
           "assert 'ray' not in sys.modules, 'the core runtime imported ray'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_default_workers_count_gpus_without_starting_ray():
    """No --num-workers: one per GPU; on the CPU (or with no GPU) one worker, and Ray is not started."""
    import torch

    from var_rt.sample import default_num_workers
    import subprocess
    import sys
    assert default_num_workers(ray, "cpu") == 1 and default_num_workers(None, "cpu") == 1
    code = "import ray; from var_rt.sample import default_num_workers; n = default_num_workers(ray, 'auto'); " \
           "assert not ray.is_initialized(), 'Ray was started'; print(n)"  # a process without this module's Ray
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert int(r.stdout.strip()) == max(1, torch.cuda.device_count())


def _cli_sample(out, *extra):
    fx = get_fixture("var_tiny_256")
    return ["sample", "--config", str(fx.config_path), "--var-ckpt", str(fx.var_ckpt), "--vae-ckpt", str(fx.vae_ckpt),
            "--device", "cpu", "--classes", "7", "--per-class", "1", "--num-workers", "1", "--output-dir", str(out),
            "--no-progress", *extra]


@pytest.fixture
def no_model_work(monkeypatch):
    """Bad outputs must be refused before any model is loaded."""
    def load(*a, **k):
        raise AssertionError("a model was loaded before the outputs were checked")
    monkeypatch.setattr(VARPipeline, "load", load)


def _one_error(capsys, rc) -> str:
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1, err
    return err


@pytest.mark.parametrize("where", ["/proc/var-rt-x.npz", "a folder"])
def test_npz_target_is_checked_before_any_work(tmp_path, capsys, no_model_work, where):
    """`--npz` under /proc or naming a folder: one error line before the model is loaded, nothing written
    (no output folder, no .tmp beside the folder)."""
    from var_rt.cli import main
    folder = tmp_path / "folder"
    folder.mkdir()
    npz = str(folder) if where == "a folder" else where
    err = _one_error(capsys, main(_cli_sample(tmp_path / "out", "--npz", npz)))
    assert err.startswith(f"error: --npz {npz!r}"), err
    assert sorted(p.name for p in tmp_path.rglob("*")) == ["folder"]


def test_unreadable_job_file_is_one_error(tmp_path, capsys, no_model_work):
    """A corrupt job.json: one error naming the file and what to do; the folder is left as it was."""
    from var_rt.cli import main
    out = tmp_path / "out"
    out.mkdir()
    (out / "job.json").write_text('{"classes": [7], "per_cl')
    err = _one_error(capsys, main(_cli_sample(out)))
    assert "job.json is unreadable" in err and "Delete it and run the command that started the job again" in err
    assert sorted(p.name for p in out.iterdir()) == ["job.json"]


def test_sample_refuses_to_overwrite_files_it_did_not_write(tmp_path, capsys, no_model_work):
    """A folder with PNGs (or an .npz) the job would replace but no job.json is refused, like `generate`
    without --overwrite; sample's own folder (its .shards/ markers) without job.json is taken as its own."""
    from var_rt.cli import main
    from var_rt.sample import SampleJob, prepare_output
    out = tmp_path / "out"
    out.mkdir()
    (out / "000000_class7_seed0.png").write_bytes(b"the user's picture")
    (out / "keep.tmp").write_bytes(b"the user's temporary file")
    err = _one_error(capsys, main(_cli_sample(out)))
    assert "000000_class7_seed0.png" in err and "holds no job.json" in err and "new or empty --output-dir" in err
    assert (out / "000000_class7_seed0.png").read_bytes() == b"the user's picture"
    assert sorted(p.name for p in out.iterdir()) == ["000000_class7_seed0.png", "keep.tmp"]
    (out / "000000_class7_seed0.png").unlink()
    (tmp_path / "mine.npz").write_bytes(b"npz")
    err = _one_error(capsys, main(_cli_sample(out, "--npz", str(tmp_path / "mine.npz"))))
    assert "mine.npz" in err and "another --npz" in err
    job = SampleJob(model={}, classes=[7], per_class=1, seed=0, cfg=1.5, cfg_schedule="linear", top_k=900,
                    top_p=0.96, more_smooth=False, shard_size=1000, batch_size=None)
    (out / "000000_class7_seed0.png").write_bytes(b"left by sample")
    (out / MARKER_DIR).mkdir()
    assert prepare_output(out, job, out / "samples.npz") == [0]  # its own: the shard is redone
    assert (out / "job.json").is_file() and (out / "keep.tmp").is_file()


def test_address_with_one_in_process_worker_is_one_error(tmp_path, capsys, no_model_work):
    """--address (a Ray cluster) with --num-workers 1 (this process) was silently ignored."""
    from var_rt.cli import main
    err = _one_error(capsys, main(_cli_sample(tmp_path / "out", "--address", "10.0.0.1:6379")))
    assert "--address" in err and "--num-workers 1" in err and "drop one" in err
    assert not (tmp_path / "out").exists()


def test_a_folder_at_an_image_name_is_one_error(tmp_path, capsys, no_model_work):
    """A folder where the job writes a PNG (seen on resume: a traceback from the atomic rename after the
    shard was generated): one error naming it, before any model work; nothing written."""
    from var_rt.cli import main
    out = tmp_path / "out"
    (out / MARKER_DIR).mkdir(parents=True)
    (out / "000000_class7_seed0.png").mkdir()
    err = _one_error(capsys, main(_cli_sample(out)))
    assert "000000_class7_seed0.png is a folder where this job writes an image" in err
    assert sorted(p.name for p in out.iterdir()) == sorted(["000000_class7_seed0.png", MARKER_DIR])


@pytest.mark.parametrize("extra, needle", [
    (("--per-class", str(10 ** 11)), "--per-class"),             # 10^11 images: listing its shards hung
    (("--per-class", str(10 ** 6), "--classes", "1", "2"), "--per-class"),
    (("--npz", "x.npz", "--no-npz"), "--no-npz"),                 # conflicting: the --npz was silently dropped
])
def test_job_too_large_or_conflicting_is_one_error(tmp_path, capsys, no_model_work, extra, needle):
    from var_rt.cli import main
    try:
        rc = main(_cli_sample(tmp_path / "out", *extra))
    except SystemExit as e:  # argparse's usage errors
        rc = e.code
    err = _one_error(capsys, rc)
    assert needle in err
    assert list(tmp_path.iterdir()) == []


def test_npz_target_must_be_an_npz_name(tmp_path, capsys, no_model_work):
    """--npz out/000000_class7_seed0.png (or x.txt) was accepted: the .npz was written over that file at the end."""
    from var_rt.cli import main
    out = tmp_path / "out"
    for npz in (str(out / "000000_class7_seed0.png"), str(tmp_path / "x.txt")):
        err = _one_error(capsys, main(_cli_sample(out, "--npz", npz)))
        assert err.startswith(f"error: --npz {npz!r}") and ".npz" in err, err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("extra, needle", [
    (("--device", "meta"), "meta"),
    (("--backend", "cudagraph"), "cudagraph"),
    (("--var-ckpt", "GARBAGE"), "not a PyTorch checkpoint"),
])
def test_model_errors_come_before_the_output_folder_is_made(tmp_path, capsys, extra, needle):
    """A model that cannot load was found only by the worker, after job.json and .shards/ were written."""
    from var_rt.cli import main
    if "GARBAGE" in extra:
        (tmp_path / "garbage.pth").write_bytes(b"not a checkpoint")
        extra = ("--var-ckpt", str(tmp_path / "garbage.pth"))
    err = _one_error(capsys, main(_cli_sample(tmp_path / "out", *extra)))
    assert needle in err
    assert not (tmp_path / "out").exists()
