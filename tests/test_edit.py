"""Zero-shot editing (var_rt.edit): the official demo's case from the fixtures, edge cases, CLI and its errors."""
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import REPO, get_fixture, png_header, token_mismatch
from var_rt.edit import Box, edit, grid_keep, prepare, scale_keep_masks, to_region
from var_rt.errors import InputError
from var_rt.images import load_image, save_png, to_uint8
from var_rt.pipeline import VARPipeline

GREEDY = dict(cfg=1.5, top_k=1, top_p=0.0)


@pytest.fixture(scope="module")
def fx():
    return get_fixture("var_tiny_256")


@pytest.fixture(scope="module")
def pipe(fx):
    return VARPipeline.load(config=fx.config_path, var_ckpt=str(fx.var_ckpt), vae_ckpt=str(fx.vae_ckpt),
                            device="cpu", dtype="float32", progress=False)


def fixture_image(fx, b):
    """The fixture's encoder input (in [-1, 1]) as a [0, 1] image (1, 3, 256, 256)."""
    return (fx.cases["encoder_input_image"][b:b + 1] + 1) / 2


# ---- the official case -------------------------------------------------------------------------------

@pytest.mark.parametrize("b", [0, 1])
def test_fixture_edit_reproduced(fx, pipe, b):
    c = fx.cases
    r = edit(pipe, fixture_image(fx, b), keep=c["edit_mask"], class_label=int(c["labels"][b]), **GREEDY)
    assert all(torch.equal(s[0], e[b]) for s, e in zip(r.source_tokens, c["encoder_idx"]))
    bad, total = token_mismatch([t[0] for t in r.sampled], [t[b] for t in c["edit_sampled_tokens"]])
    assert bad <= 3 * total // 1000, f"{bad} of {total} sampled tokens differ"
    assert (r.images[0] - c["edit_image"][b]).abs().max() < 1e-4


def test_box_gives_the_fixture_mask(fx, pipe):
    """The fixture keeps everything outside the centre square 0.25..0.75: a box inpaints exactly that."""
    want = fx.cases["edit_mask"].bool()
    box = Box(0.25, 0.25, 0.75, 0.75)
    assert torch.equal(grid_keep(box.raster(256), "inpaint", 16), want)
    assert torch.equal(grid_keep(box.raster(256), "outpaint", 16), ~want)
    # The same region as a white-on-black PNG-like array, at image and at token-grid size.
    png = np.where(box.raster(256).numpy(), 255, 0).astype(np.uint8)
    _, keep = prepare(pipe, fixture_image(fx, 0), png)
    assert torch.equal(keep, want)
    _, keep = prepare(pipe, fixture_image(fx, 0), ~want.numpy())
    assert torch.equal(keep, want)


def test_any_touched_token_is_regenerated():
    region = torch.zeros(256, 256, dtype=torch.bool)
    region[100, 37] = True  # one pixel in token (6, 2)
    keep = grid_keep(region, "inpaint", 16)
    assert int((~keep).sum()) == 1 and not keep[6, 2]
    keep = grid_keep(~region, "outpaint", 16)  # keep all but that pixel: its token is regenerated
    assert int((~keep).sum()) == 1 and not keep[6, 2]


def test_scale_masks_follow_the_official_rule(fx):
    keep = fx.cases["edit_mask"].bool()
    masks = scale_keep_masks(keep, fx.cfg.patch_nums)
    assert masks[0].all()  # one token: always the image's
    assert torch.equal(masks[-1].reshape(16, 16), keep)
    for pn, m in zip(fx.cfg.patch_nums, masks):
        want = torch.nn.functional.interpolate(keep.float()[None, None], size=(pn, pn), mode="bilinear",
                                               align_corners=False)[0, 0] > 0.5
        if pn * pn > 3:
            assert torch.equal(m.reshape(pn, pn), want)


# ---- edge cases --------------------------------------------------------------------------------------

def test_all_kept_gives_back_the_encoders_tokens(fx, pipe):
    r = edit(pipe, fixture_image(fx, 0), keep=torch.ones(16, 16, dtype=torch.bool), seed=3)
    for t, e in zip(r.tokens, fx.cases["encoder_idx"]):
        assert torch.equal(t[0], e[0])


def test_keeping_nothing_is_plain_generation(fx, pipe):
    nothing = [torch.zeros(pn * pn, dtype=torch.bool) for pn in fx.cfg.patch_nums]
    kw = dict(seed=7, cfg=2.0, top_k=50, top_p=0.9)
    r = edit(pipe, fixture_image(fx, 0), keep=nothing, class_label=3, num_images=2, **kw)
    g = pipe.generate(class_labels=[3], num_images=2, **kw)
    assert torch.equal(r.images, g.images)
    assert all(torch.equal(a, b) for a, b in zip(r.tokens, g.tokens))
    # A keep grid of all zeros still keeps the first scale's single token (official rule); what was
    # sampled there is what plain generation samples.
    r0 = edit(pipe, fixture_image(fx, 0), keep=torch.zeros(16, 16), class_label=3, num_images=2, **kw)
    assert torch.equal(r0.tokens[0], fx.cases["encoder_idx"][0][:1].expand(2, -1))
    assert torch.equal(r0.sampled[0], g.tokens[0])


def test_kept_tokens_survive_class_conditional_edit(fx, pipe):
    img = fixture_image(fx, 1)
    a = edit(pipe, img, Box(0.25, 0.25, 0.75, 0.75), class_label=1, seed=0)
    b = edit(pipe, img, Box(0.25, 0.25, 0.75, 0.75), class_label=5, seed=0)
    keep = a.keep.reshape(-1)
    for r in (a, b):
        assert torch.equal(r.tokens[-1][0][keep], r.source_tokens[-1][0][keep])
    assert not torch.equal(a.tokens[-1][0][~keep], b.tokens[-1][0][~keep])  # the class steers the region


def test_canvas_placement_outpaints_around_the_image(fx, pipe):
    small = torch.rand(3, 128, 128, generator=torch.Generator().manual_seed(0))
    r = edit(pipe, small, canvas_place="center", seed=1)
    want = torch.zeros(16, 16, dtype=torch.bool)
    want[4:12, 4:12] = True
    assert torch.equal(r.keep, want)
    assert torch.equal(r.input[0, :, 64:192, 64:192], small)
    assert (r.input[0, :, :64] == 0.5).all()
    assert torch.equal(r.tokens[-1][0][want.reshape(-1)], r.source_tokens[-1][0][want.reshape(-1)])


def test_api_inputs_and_errors(fx, pipe):
    img = fixture_image(fx, 0)
    u8 = to_uint8(img)[0]
    from PIL import Image
    for x in (u8, Image.fromarray(u8), img[0]):
        _, keep = prepare(pipe, x, Box(0, 0, 0.5, 0.5))
        assert int((~keep).sum()) == 64
    with pytest.raises(InputError, match="256x256.*resize"):
        prepare(pipe, u8[:200], Box(0, 0, 0.5, 0.5))
    with pytest.raises(InputError, match="not binary"):
        to_region(np.full((256, 256), 128, np.uint8))
    with pytest.raises(InputError, match="nothing to edit"):
        prepare(pipe, img, np.zeros((256, 256), np.uint8))
    with pytest.raises(InputError, match="use `generate`"):
        prepare(pipe, img, Box(0, 0, 1, 1))


# ---- command line ------------------------------------------------------------------------------------

def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "var_rt", "edit", *map(str, args)], capture_output=True, text=True,
                          cwd=REPO, timeout=300)


def model_args(fx):
    return ["--config", fx.config_path, "--var-ckpt", fx.var_ckpt, "--vae-ckpt", fx.vae_ckpt,
            "--device", "cpu", "--dtype", "float32", "--no-progress"]


@pytest.fixture(scope="module")
def files(fx, tmp_path_factory):
    d = tmp_path_factory.mktemp("edit_inputs")
    img = to_uint8(fixture_image(fx, 0))[0]
    centre = np.zeros((256, 256), np.uint8)
    centre[64:192, 64:192] = 255
    paths = dict(image=d / "in.png", mask=d / "mask.png", small=d / "small.png", wide=d / "wide.png",
                 grid_mask=d / "mask16.png", grey=d / "grey.png", black=d / "black.png", white=d / "white.png")
    save_png(img, paths["image"])
    from PIL import Image
    Image.fromarray(centre).save(paths["mask"])
    Image.fromarray(centre[::16, ::16]).save(paths["grid_mask"])
    Image.fromarray(np.full((256, 256), 128, np.uint8)).save(paths["grey"])
    Image.fromarray(np.zeros((256, 256), np.uint8)).save(paths["black"])
    Image.fromarray(np.full((256, 256), 255, np.uint8)).save(paths["white"])
    Image.fromarray(centre[:100]).save(d / "short_mask.png")
    paths["short_mask"] = d / "short_mask.png"
    save_png(img[64:192, 64:192], paths["small"])
    save_png(np.concatenate([img, img[:, :44]], axis=1)[:200], paths["wide"])  # 300 x 200
    return paths


def test_cli_end_to_end(fx, pipe, files, tmp_path):
    label = int(fx.cases["labels"][0])
    r = run_cli(*model_args(fx), "--image", files["image"], "--mask", files["mask"], "--class-label", label,
                "--cfg", 1.5, "--top-k", 1, "--top-p", 0, "--num-images", 2,
                "--output-dir", tmp_path / "out", "--grid", tmp_path / "grid.png")
    assert r.returncode == 0, r.stderr
    out = sorted((tmp_path / "out").glob("*.png"))
    assert [f.name for f in out] == [f"00000_class{label}_seed0.png", f"00001_class{label}_seed1.png"]
    want = edit(pipe, load_image(files["image"]), Box(0.25, 0.25, 0.75, 0.75), class_label=label, **GREEDY)
    for f in out:  # greedy: both variations are the same edit
        assert np.abs(load_image(f).astype(int) - want.numpy()[0].astype(int)).max() <= 1
    g = load_image(tmp_path / "grid.png")
    assert g.shape[1] >= 4 * 256 and g.shape[0] < 2 * 256  # input, mask, 2 results in one row


@pytest.mark.parametrize("how", ["box", "resize", "grid_mask", "canvas"])
def test_cli_other_regions(fx, files, tmp_path, how):
    args = {"box": ["--image", files["image"], "--box", 0.1, 0.2, 0.6, 0.9, "--mode", "outpaint"],
            "resize": ["--image", files["wide"], "--resize", "--box", 0.25, 0.25, 0.75, 0.75],
            "grid_mask": ["--image", files["image"], "--mask", files["grid_mask"]],
            "canvas": ["--image", files["small"], "--canvas-place", "center"]}[how]
    r = run_cli(*model_args(fx), *args, "--grid", tmp_path / "g.png")
    assert r.returncode == 0, r.stderr
    assert load_image(tmp_path / "g.png").shape[1] >= 3 * 256


def _bad(fx, tmp_path, *args):
    out = tmp_path / "never"
    r = run_cli(*model_args(fx), *args, "--output-dir", out, "--grid", tmp_path / "never.png")
    assert r.returncode == 2, r.stderr
    assert not out.exists() and not (tmp_path / "never.png").exists(), "a failed run must write nothing"
    lines = [l for l in r.stderr.strip().splitlines() if l.strip()]
    assert len(lines) == 1 and lines[0].startswith("error: "), r.stderr
    return lines[0]


def test_cli_error_image_size(fx, files, tmp_path):
    msg = _bad(fx, tmp_path, "--image", files["wide"], "--box", 0.25, 0.25, 0.75, 0.75)
    assert "300x200" in msg and "256x256" in msg and "--resize" in msg


def test_cli_error_mask_size(fx, files, tmp_path):
    msg = _bad(fx, tmp_path, "--image", files["image"], "--mask", files["short_mask"])
    assert "256x100" in msg and "256x256" in msg and "16x16" in msg


def test_cli_error_mask_not_binary(fx, files, tmp_path):
    assert "not binary" in _bad(fx, tmp_path, "--image", files["image"], "--mask", files["grey"])


def test_cli_error_empty_mask(fx, files, tmp_path):
    assert "nothing to edit" in _bad(fx, tmp_path, "--image", files["image"], "--mask", files["black"])


def test_cli_error_everything_regenerated(fx, files, tmp_path):
    assert "use `generate`" in _bad(fx, tmp_path, "--image", files["image"], "--mask", files["white"])
    assert "use `generate`" in _bad(fx, tmp_path, "--image", files["image"], "--mask", files["black"],
                                    "--mode", "outpaint")


@pytest.mark.parametrize("box", [(0.2, 0.2, 1.5, 0.8), (-0.1, 0, 0.5, 0.5), (0.6, 0.2, 0.4, 0.8)])
def test_cli_error_box(fx, files, tmp_path, box):
    msg = _bad(fx, tmp_path, "--image", files["image"], "--box", *box)
    assert "box" in msg and ("out of range" in msg or "empty" in msg)


def test_cli_error_region_options(fx, files, tmp_path):
    assert "exactly one of" in _bad(fx, tmp_path, "--image", files["image"])
    assert "exactly one of" in _bad(fx, tmp_path, "--image", files["small"], "--canvas-place", "center",
                                    "--mask", files["mask"])
    assert "class id" in _bad(fx, tmp_path, "--image", files["image"], "--mask", files["mask"],
                              "--class-label", 99999)


# ---- issue 13: input files ------------------------------------------------------------------------------

def test_cli_error_huge_image(fx, tmp_path):
    """20000 x 20000: PIL's own decompression-bomb error becomes one line with our limit."""
    msg = _bad(fx, tmp_path, "--image", png_header(tmp_path / "huge.png", 20000, 20000), "--box", 0, 0, .5, .5)
    assert "400,000,000 pixels" in msg and "limit is 67,108,864 pixels (8192x8192)" in msg


def test_large_image_refused_before_decoding(tmp_path):
    from var_rt.images import load_image
    with pytest.raises(InputError, match=r"9000x9000 px: the limit is 67,108,864 pixels \(8192x8192\)"):
        load_image(png_header(tmp_path / "big.png", 9000, 9000))


def test_cli_error_image_is_a_folder(fx, files, tmp_path):
    (tmp_path / "folder").mkdir()
    msg = _bad(fx, tmp_path, "--image", tmp_path / "folder", "--box", 0, 0, .5, .5)
    assert "is a folder, not an image file" in msg
    assert "no such file" in _bad(fx, tmp_path, "--image", tmp_path / "nope.png", "--box", 0, 0, .5, .5)


def test_cli_edit_outputs_checked_and_not_overwritten(fx, files, tmp_path):
    """edit shares generate's output checks: impossible locations and existing files are refused."""
    (tmp_path / "afile").write_text("x")
    r = run_cli(*model_args(fx), "--image", files["image"], "--mask", files["mask"], "--output-dir",
                tmp_path / "afile" / "sub")
    assert r.returncode == 2 and r.stderr.startswith("error: ") and "is a file" in r.stderr, r.stderr
    args = [*model_args(fx), "--image", files["image"], "--mask", files["mask"], "--top-k", 1]
    assert run_cli(*args, "--grid", tmp_path / "g.png").returncode == 0
    before = (tmp_path / "g.png").read_bytes()
    r = run_cli(*args, "--grid", tmp_path / "g.png", "--seed", 3)
    assert r.returncode == 2 and "g.png" in r.stderr and "--overwrite" in r.stderr, r.stderr
    assert (tmp_path / "g.png").read_bytes() == before
    assert run_cli(*args, "--grid", tmp_path / "g.png", "--overwrite").returncode == 0


def test_canvas_placement_errors_say_what_is_wrong(fx, pipe):
    """--resize with --canvas-place was silently ignored; an image too small to keep one whole token was told
    'the mask regenerates the whole image ... check --mode' (there is no mask and no mode)."""
    u8 = to_uint8(fixture_image(fx, 0))[0]
    for side in (16, 100):
        with pytest.raises(InputError, match="--resize"):
            prepare(pipe, u8[:side, :side], canvas_place="center", resize=True)
    with pytest.raises(InputError, match=r"16x16 px.*no whole token.*larger image") as e:
        prepare(pipe, u8[:16, :16], canvas_place="center")
    assert "mask" not in str(e.value) and "--mode" not in str(e.value)
