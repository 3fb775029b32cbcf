"""Sample quality (issue 24): the metric math against direct computations, `python -m var_rt fid` on every input
kind with the extractor's weights given as a file (random weights made here: the plumbing, not the numbers), one
error line and exit status 2 for each bad input, and `sample --fid-ref`."""
import contextlib
import hashlib
import importlib.util
import io
import json
from unittest import mock

import numpy as np
import pytest
from scipy import linalg

if importlib.util.find_spec("torch_fidelity") is None:  # not importorskip: its package imports torchvision
    pytest.skip("the [fid] extra (torch-fidelity) is not installed", allow_module_level=True)

import torch  # noqa: E402

from var_rt import fid, quality  # noqa: E402
from var_rt.cli import main  # noqa: E402
from var_rt.errors import InputError  # noqa: E402
from conftest import png_header  # noqa: E402

N_IMAGES = 4  # the fewest precision/recall accept (k = 3); each InceptionV3 forward costs ~0.3 s on a CPU


# ---- the math ---------------------------------------------------------------------------------------------
def _spd(rng, d):
    a = rng.standard_normal((d, d))
    return a @ a.T / d + 0.1 * np.eye(d)


def test_frechet_distance_is_the_closed_form():
    """Random SPD covariances: equal to |mu1 - mu2|^2 + tr(S1 + S2 - 2 sqrtm(S1 S2)) with scipy's sqrtm."""
    rng = np.random.default_rng(0)
    for d in (2, 16, 64):
        mu1, mu2, s1, s2 = rng.standard_normal(d), rng.standard_normal(d), _spd(rng, d), _spd(rng, d)
        want = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))
        assert fid.frechet_distance(mu1, s1, mu2, s2) == pytest.approx(want, rel=1e-6)
        assert fid.frechet_distance(mu1, s1, mu1, s1) == pytest.approx(0, abs=1e-9 * np.trace(s1))


def test_frechet_distance_from_a_small_sets_factor():
    """sigma1 = A.T A from N < D features: the N x N route equals the D x D one (and the closed form at full rank)."""
    rng = np.random.default_rng(9)
    for n, d in ((5, 64), (40, 16)):
        feats = rng.standard_normal((n, d))
        mu1, s1 = fid.feature_stats(feats)
        mu2, s2 = rng.standard_normal(d), _spd(rng, d)
        a = fid.centred_factor(feats)
        assert np.allclose(a.T @ a, s1)
        want = fid.frechet_distance(mu1, s1, mu2, s2)
        assert fid.frechet_distance(mu1, s1, mu2, s2, factor1=a) == pytest.approx(want, rel=1e-6)
        if n > d:
            closed = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))
            assert want == pytest.approx(closed, rel=1e-6)
        assert fid.frechet_distance(mu1, s1, mu1, s1, factor1=a) == pytest.approx(0, abs=1e-9 * np.trace(s1))


def test_inception_score_is_the_direct_computation():
    """exp(mean KL(p(y|x) || p(y))) per split, averaged; 7 images in splits of 3 (3 + 3 + 1)."""
    rng = np.random.default_rng(1)
    logits = rng.standard_normal((7, 10)) * 3

    def direct(part):
        p = np.exp(part) / np.exp(part).sum(1, keepdims=True)
        py = p.mean(0)
        return np.exp(np.mean([sum(pi[c] * np.log(pi[c] / py[c]) for c in range(10)) for pi in p]))

    want = np.mean([direct(logits[0:3]), direct(logits[3:6]), direct(logits[6:7])])
    assert fid.inception_score(logits, split_size=3) == pytest.approx(want, rel=1e-9)
    assert fid.inception_score(logits) == pytest.approx(direct(logits), rel=1e-9)  # one split of 5,000
    assert fid.inception_score(np.zeros((5, 10))) == pytest.approx(1.0)  # uniform predictions: 1


def _direct_pr(ref, smp, k):
    def radii(x):
        return [sorted(np.sum((a - b) ** 2) for b in x)[k] for a in x]
    r_ref, r_smp = radii(ref), radii(smp)
    precision = np.mean([any(np.sum((s - r) ** 2) <= rr for r, rr in zip(ref, r_ref)) for s in smp])
    recall = np.mean([any(np.sum((r - s) ** 2) <= rs for s, rs in zip(smp, r_smp)) for r in ref])
    return precision, recall


def test_precision_recall_is_the_direct_computation():
    """Small-integer features (float16 distances are then exact): k-NN radii and the <= test, block by block."""
    rng = np.random.default_rng(2)
    ref = rng.integers(0, 5, (23, 6)).astype(np.float32)
    smp = (rng.integers(0, 5, (17, 6)) + np.array([2, 0, 0, 0, 0, 0])).astype(np.float32)  # shifted: P != R
    want = _direct_pr(ref, smp, 3)
    assert 0 < want[0] < 1 and 0 < want[1] < 1 and want[0] != want[1]
    assert fid.precision_recall(ref, smp) == pytest.approx(want)
    assert fid.precision_recall(ref, smp, block=5) == pytest.approx(want)  # blocks change nothing
    assert fid.precision_recall(ref, ref) == (1.0, 1.0)
    # A tie counts as inside: 6 lies exactly on the radius of 3 (its 3rd neighbour, 0, is 9 away, squared).
    line = np.array([[0], [1], [2], [3]], np.float32)
    far = np.array([[6], [10], [20], [30]], np.float32)
    assert fid.precision_recall(line, far) == pytest.approx(_direct_pr(line, far, 3)) == (0.25, 1.0)


def test_distances_in_float16_with_the_float32_fallback():
    """As OpenAI's evaluator: float16 (rounded) where it fits, float32 for a block where float16 overflows."""
    rng = np.random.default_rng(3)
    u, v = rng.random((5, 40), np.float32), rng.random((6, 40), np.float32)
    exact = ((u[:, None].astype(np.float64) - v[None]) ** 2).sum(-1)
    d = fid.pairwise_sq_distances(u, v)
    assert d.dtype == np.float32 and np.array_equal(d, d.astype(np.float16).astype(np.float32))  # float16 values
    assert np.abs(d - exact).max() < 0.05 and not np.array_equal(d, exact.astype(np.float32))
    big = fid.pairwise_sq_distances(u * 100, v * 100)  # |u|^2 ~ 1.3e5: over float16's 65504
    assert np.isfinite(big).all() and np.allclose(big, exact * 1e4, rtol=1e-4)


def test_bad_statistics_are_refused():
    rng = np.random.default_rng(4)
    s = _spd(rng, 8)
    mu = np.zeros(8)
    assert fid.check_stats(mu, s, "x")[1].dtype == np.float64
    for sigma, msg in ((s[:7, :7], "shape"), (np.where(np.eye(8) > 0, np.nan, s), "NaN"),
                       (s - 2 * np.abs(s).max() * np.eye(8), "not positive semi-definite"),
                       (s + np.triu(np.ones((8, 8)), 1), "not symmetric")):
        with pytest.raises(InputError, match=msg):
            fid.check_stats(mu, sigma, "x")
    with pytest.raises(InputError, match="more than k = 3"):
        fid.precision_recall(np.zeros((3, 4)), np.zeros((9, 4)))


# ---- the command --------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def weights(tmp_path_factory):
    """A random-weights state dict for torch-fidelity's InceptionV3, saved as a file like the real one."""
    from benchmarks.inception import random_inception_weights
    return random_inception_weights(tmp_path_factory.mktemp("w") / "inception-random.pth")


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    """N_IMAGES random 16 px images as a PNG folder and as an npz (arr_0), the same pixels."""
    from PIL import Image
    d = tmp_path_factory.mktemp("imgs")
    arr = np.random.default_rng(5).integers(0, 256, (N_IMAGES, 16, 16, 3), dtype=np.uint8)
    (d / "folder").mkdir()
    for i, a in enumerate(arr):
        Image.fromarray(a).save(d / "folder" / f"{i:03d}.png")
    np.savez(d / "images.npz", arr_0=arr)
    return d, arr


def _run(capsys, *args):
    rc = main(["fid", *map(str, args), "--no-progress"])
    out, err = capsys.readouterr()
    return rc, out, err


@pytest.fixture(scope="module")
def folder_vs_npz(images, weights, tmp_path_factory):
    """SAMPLES = the folder, REF = the npz of the same images, with --json and --save-stats."""
    d, _ = images
    out = tmp_path_factory.mktemp("out")
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):  # capsys is per test; this runs once for the module
        rc = main(["fid", str(d / "folder"), str(d / "images.npz"), "--inception-weights", str(weights),
                   "--json", str(out / "m.json"), "--save-stats", str(out / "s.npz"), "--no-progress"])
    return rc, buf.getvalue(), out


def test_folder_against_npz_of_the_same_images(folder_vs_npz, images, weights):
    """A set against itself: FID 0, precision = recall = 1; the JSON says what was compared and with what."""
    rc, out, d = folder_vs_npz
    assert rc == 0, out
    rep = json.loads((d / "m.json").read_text())
    m = rep["metrics"]
    stats = np.load(d / "s.npz")
    assert sorted(stats.files) == ["mu", "sigma"] and stats["mu"].shape == (2048,) and stats["sigma"].shape == (2048, 2048)
    assert m["fid"] == pytest.approx(0, abs=1e-6 * np.trace(stats["sigma"]))
    assert m["precision"] == 1.0 and m["recall"] == 1.0 and m["inception_score"] >= 1.0
    assert rep["not_computed"] == {}
    assert rep["samples"]["kind"] == "folder" and rep["samples"]["num_images"] == N_IMAGES
    assert rep["ref"]["kind"] == "npz" and rep["ref"]["image_size"] == [16, 16]
    ex = rep["feature_extractor"]
    assert ex["weights_sha256"] == hashlib.sha256(weights.read_bytes()).hexdigest()
    assert ex["name"].startswith("inception-v3-compat") and "torch-fidelity" in ex["library"]
    assert f"FID: {m['fid']:.4f}" in out and "Precision: 1.0000" in out and "Inception Score:" in out


def test_stored_statistics_are_used_as_they_are(folder_vs_npz, images, weights, tmp_path, capsys):
    """REF like OpenAI's reference batches: arr_0 images (for precision/recall) and mu/sigma (for FID, used as
    stored). Stored mu shifted by delta: FID = |delta|^2 exactly as computed from the samples' statistics."""
    d, arr = images
    s = np.load(folder_vs_npz[2] / "s.npz")
    delta = np.zeros(2048)
    delta[:3] = [0.5, -1.0, 2.0]
    np.savez(tmp_path / "ref.npz", arr_0=arr, mu=s["mu"] + delta, sigma=s["sigma"])
    rc, out, err = _run(capsys, d / "images.npz", tmp_path / "ref.npz", "--inception-weights", weights,
                        "--json", tmp_path / "m.json")
    assert rc == 0, err
    m = json.loads((tmp_path / "m.json").read_text())["metrics"]
    assert m["fid"] == pytest.approx(5.25, rel=1e-6)  # 0.25 + 1 + 4
    assert m["precision"] == 1.0 and m["recall"] == 1.0


def test_statistics_files_of_any_size(tmp_path, capsys):
    """Two stats files (D = 16): the closed form; --json without images has no extractor."""
    rng = np.random.default_rng(6)
    mu1, mu2, s1, s2 = rng.standard_normal(16), rng.standard_normal(16), _spd(rng, 16), _spd(rng, 16)
    np.savez(tmp_path / "a.npz", mu=mu1, sigma=s1)
    np.savez(tmp_path / "b.npz", mu=mu2, sigma=s2)
    rc, out, err = _run(capsys, tmp_path / "a.npz", tmp_path / "b.npz", "--json", tmp_path / "m.json")
    assert rc == 0, err
    rep = json.loads((tmp_path / "m.json").read_text())
    want = float(np.sum((mu1 - mu2) ** 2) + np.trace(s1 + s2 - 2 * linalg.sqrtm(s1 @ s2).real))
    assert rep["metrics"]["fid"] == pytest.approx(want, rel=1e-6) and rep["feature_extractor"] is None
    assert "Inception Score: not computed (SAMPLES" in out and "statistics only" in out  # and why
    assert "Precision: not computed" in out and "Recall: not computed" in out


def _bad(capsys, tmp_path, *args):
    rc, out, err = _run(capsys, *args, "--json", tmp_path / "never.json", "--save-stats", tmp_path / "never.npz")
    lines = [ln for ln in err.strip().splitlines() if ln.strip()]
    assert rc == 2 and len(lines) == 1 and lines[0].startswith("error: "), (rc, err)
    assert not (tmp_path / "never.json").exists() and not (tmp_path / "never.npz").exists()
    return lines[0]


def test_bad_inputs_give_one_error_and_write_nothing(images, weights, tmp_path, capsys):
    from PIL import Image
    d, arr = images
    w = ["--inception-weights", weights]
    assert "does not exist" in _bad(capsys, tmp_path, tmp_path / "nothing", d / "images.npz", *w)
    (tmp_path / "empty").mkdir()
    assert "empty folder" in _bad(capsys, tmp_path, tmp_path / "empty", d / "images.npz", *w)
    mixed = tmp_path / "mixed"
    mixed.mkdir()
    Image.fromarray(arr[0]).save(mixed / "a.png")
    Image.fromarray(np.zeros((20, 16, 3), np.uint8)).save(mixed / "b.png")
    assert "different sizes" in _bad(capsys, tmp_path, mixed, d / "images.npz", *w)
    few = tmp_path / "few"
    few.mkdir()
    for i in range(3):
        Image.fromarray(arr[i]).save(few / f"{i}.png")
    assert "more than k = 3" in _bad(capsys, tmp_path, few, d / "images.npz", *w)
    rng = np.random.default_rng(7)
    s = _spd(rng, 8)
    cases = {"nostats.npz": (dict(foo=np.zeros(3)), "neither images (arr_0) nor statistics"),
             "muonly.npz": (dict(mu=np.zeros(8)), "mu without sigma"),
             "mismatch.npz": (dict(mu=np.zeros(8), sigma=s[:7, :7]), "shape"),
             "small.npz": (dict(mu=np.zeros(8), sigma=s), "different sizes"),  # 8 vs the images' 2048
             "nan.npz": (dict(mu=np.zeros(8), sigma=np.where(np.eye(8) > 0, np.inf, s)), "infinite"),
             "notpsd.npz": (dict(mu=np.zeros(8), sigma=s - 3 * np.abs(s).max() * np.eye(8)), "positive semi-definite"),
             "float.npz": (dict(arr_0=arr.astype(np.float32) / 255), "uint8")}
    for name, (keys, msg) in cases.items():
        np.savez(tmp_path / name, **keys)
        assert msg in _bad(capsys, tmp_path, d / "images.npz", tmp_path / name, *w), name
    (tmp_path / "x.png").write_bytes(b"\x89PNG not really")
    assert "not an .npz" in _bad(capsys, tmp_path, tmp_path / "x.png", d / "images.npz", *w)
    huge = tmp_path / "huge"  # a header of 20000 x 20000 px: PIL's own bomb error was a traceback here
    huge.mkdir()
    png_header(huge / "a.png", 20000, 20000)
    assert "400,000,000 pixels: the limit is" in _bad(capsys, tmp_path, huge, d / "images.npz", *w)
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "a.png").write_bytes(b"\x89PNG not really")
    assert "cannot be read as an image" in _bad(capsys, tmp_path, broken, d / "images.npz", *w)


def test_weights_missing_offline_or_not_a_state_dict(images, tmp_path, capsys, monkeypatch):
    """No --inception-weights, nothing cached, no network: one error naming both ways. Weights that are not
    a state dict, or pickled objects: refused before torch-fidelity unpickles them."""
    import urllib.error
    import urllib.request
    d, _ = images
    monkeypatch.setenv("TORCH_HOME", str(tmp_path / "torch-home"))

    def offline(*a, **k):
        raise urllib.error.URLError("no network here")
    monkeypatch.setattr(urllib.request, "urlopen", offline)
    msg = _bad(capsys, tmp_path, d / "folder", d / "images.npz")
    assert "could not be downloaded" in msg and "no network here" in msg and "--inception-weights FILE" in msg
    assert "run where that address can be reached" in msg
    assert not list(tmp_path.rglob("*.pth")) and not list(tmp_path.rglob("*.tmp"))  # no partial download
    (tmp_path / "junk.pth").write_bytes(b"not a checkpoint")
    assert "not a PyTorch state dict" in _bad(capsys, tmp_path, d / "folder", d / "images.npz",
                                              "--inception-weights", tmp_path / "junk.pth")
    torch.save({"conv": mock.Mock}, tmp_path / "pickled.pth")
    assert "never unpickled" in _bad(capsys, tmp_path, d / "folder", d / "images.npz",
                                     "--inception-weights", tmp_path / "pickled.pth")
    torch.save({"fc.weight": torch.zeros(3)}, tmp_path / "other.pth")
    assert "does not fit" in _bad(capsys, tmp_path, d / "folder", d / "images.npz",
                                  "--inception-weights", tmp_path / "other.pth")


def test_sample_fid_ref_writes_metrics_beside_the_npz_and_again_after_a_resume(weights, tmp_path, capsys):
    """`sample --fid-ref` on the tiny fixture (2 images, one worker, no Ray): metrics beside the npz; running the
    same command again (a resume with every shard done) evaluates again."""
    from conftest import get_fixture
    fx = get_fixture("var_tiny_256")
    rng = np.random.default_rng(8)
    np.savez(tmp_path / "ref.npz", mu=rng.random(2048), sigma=np.eye(2048))
    args = ["sample", "--config", fx.config_path, "--var-ckpt", fx.var_ckpt, "--vae-ckpt", fx.vae_ckpt, "--device",
            "cpu", "--classes", "3", "--per-class", "2", "--num-workers", "1", "--output-dir", tmp_path / "o",
            "--no-progress", "--fid-ref", tmp_path / "ref.npz", "--inception-weights", weights]
    assert main(list(map(str, args))) == 0
    out = capsys.readouterr().out
    metrics = tmp_path / "o" / "samples.fid.json"
    rep = json.loads(metrics.read_text())
    assert rep["samples"]["path"] == str(tmp_path / "o" / "samples.npz") and rep["samples"]["num_images"] == 2
    assert rep["metrics"]["fid"] > 0 and rep["metrics"]["inception_score"] >= 1.0
    assert "REF" in rep["not_computed"]["precision"] and "FID:" in out
    metrics.unlink()
    assert main(list(map(str, args))) == 0  # resume: nothing to sample, evaluated again
    assert json.loads(metrics.read_text())["metrics"] == rep["metrics"]
    bad = list(map(str, args[:-4])) + ["--fid-ref", str(tmp_path / "missing.npz")]
    assert main(bad) == 2 and "does not exist" in capsys.readouterr().err


def test_save_stats_over_an_input_or_an_unusable_device_is_refused(images, weights, tmp_path, capsys):
    """--save-stats naming SAMPLES or REF replaced the user's images with statistics; --device meta was a
    NotImplementedError traceback after the extractor loaded."""
    d, arr = images
    src = tmp_path / "samples.npz"
    np.savez(src, arr_0=arr)
    before = src.read_bytes()
    for args in ([src, d / "images.npz", "--save-stats", src], [d / "folder", src, "--save-stats", src],
                 [src, "--save-stats", str(src).replace("samples.npz", "./samples.npz")]):
        rc, out, err = _run(capsys, *args, "--inception-weights", weights, "--device", "cpu")
        assert rc == 2 and err.startswith("error: --save-stats") and err.count("\n") == 1, err
        assert src.read_bytes() == before
    rc, out, err = _run(capsys, src, d / "images.npz", "--inception-weights", weights, "--device", "meta")
    assert rc == 2 and err.startswith("error: ") and err.count("\n") == 1 and "meta" in err, err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["samples.npz"]
