"""Zero-shot editing: inpainting, outpainting and class-conditional editing (the official demo's method).

The image is encoded to its token maps, one per scale. An edit mask on the last scale's
token grid (pn_last x pn_last, True = keep the image's token, False = generate) is resized
to every scale, and the scale loop puts the image's tokens back at the kept positions after
each scale is sampled, so later scales (and the KV cache) see them (var_rt.runtime.EditSpec).

Convention for the user-facing region (a mask PNG or ``--box``):
    * the mask PNG's **white** pixels (or the box) mark **the region**;
    * ``mode="inpaint"`` regenerates inside the region and keeps the rest;
    * ``mode="outpaint"`` keeps the region and regenerates everything outside it.
A token is kept only if every pixel of its patch is on the kept side: a token the region
touches at all is regenerated in inpainting, one that reaches outside it in outpainting.

Placing an image on a larger canvas (``canvas_place``): the image keeps its pixel size, the
rest of the canvas is grey (0.5) before encoding, and everything outside the image is
regenerated (outpainting whose region is the image's footprint).

Per-scale masks follow the official method: the keep grid is resized bilinearly
(align_corners=False) to pn x pn and thresholded at > 0.5; scales with at most 3 tokens keep
all of the image's tokens.
"""
from __future__ import annotations

import argparse
import dataclasses
import time
from pathlib import Path
from typing import TYPE_CHECKING, List, Optional, Sequence, Tuple, Union

import numpy as np

from var_rt import validation
from var_rt.errors import ConfigError, InputError
from var_rt.options import (ModelOptions, Outputs, SamplingOptions, add_model_args, add_overwrite_arg,
                            add_sampling_args, load_pipeline)
from var_rt.validation import DEFAULTS

if TYPE_CHECKING:  # torch is imported where it is used: `python -m var_rt edit --help` runs without it
    import torch

MODES = ("inpaint", "outpaint")
GREY = 0.5  # canvas fill in [0, 1]: 0 in the VQVAE's [-1, 1] input range

ImageLike = Union["torch.Tensor", np.ndarray, "PIL.Image.Image"]  # noqa: F821


@dataclasses.dataclass(frozen=True)
class Box:
    """A rectangle in fractions of the image: rows [y0, y1), columns [x0, x1), each in [0, 1]."""

    y0: float
    x0: float
    y1: float
    x1: float

    def validate(self) -> "Box":
        vals = (self.y0, self.x0, self.y1, self.x1)
        if any(not np.isfinite(v) or v < 0 or v > 1 for v in vals):
            raise InputError(f"box {list(vals)} is out of range: give y0 x0 y1 x1 as fractions of the image in [0, 1]")
        if not (self.y0 < self.y1 and self.x0 < self.x1):
            raise InputError(f"box {list(vals)} is empty: need y0 < y1 and x0 < x1 (fractions of the image)")
        return self

    def raster(self, size: int) -> torch.Tensor:
        """(size, size) bool, True inside the box (a pixel counts if the box covers its centre)."""
        import torch
        c = (torch.arange(size, dtype=torch.float64) + 0.5) / size
        rows = (c >= self.y0) & (c < self.y1)
        cols = (c >= self.x0) & (c < self.x1)
        return rows[:, None] & cols[None, :]


# ---- images ----------------------------------------------------------------------------------

def to_image_tensor(image: ImageLike) -> torch.Tensor:
    """PIL image, numpy array or tensor -> (1, 3, H, W) float32 in [0, 1].

    numpy arrays are (H, W, 3) or (H, W) (uint8 in 0..255 or float in [0, 1]); tensors are
    (3, H, W) or (1, 3, H, W) floats in [0, 1].
    """
    import torch
    if hasattr(image, "convert") and hasattr(image, "size"):  # PIL
        image = np.asarray(image.convert("RGB"))
    if isinstance(image, np.ndarray):
        a = image
        if a.ndim == 2:
            a = np.repeat(a[:, :, None], 3, axis=2)
        if a.ndim != 3 or a.shape[2] not in (3, 4):
            raise InputError(f"image array must be (H, W, 3), got shape {a.shape}")
        a = a[:, :, :3]
        t = torch.from_numpy(np.array(a)).permute(2, 0, 1)[None]
        t = t.float().div(255) if a.dtype == np.uint8 else t.float()
    elif isinstance(image, torch.Tensor):
        t = image.detach().float().cpu()
        if t.dim() == 3:
            t = t[None]
        if t.dim() != 4 or t.shape[0] != 1 or t.shape[1] != 3:
            raise InputError(f"image tensor must be (3, H, W) or (1, 3, H, W), got {tuple(image.shape)}")
    else:
        raise InputError(f"unsupported image type {type(image).__name__}: use a PIL image, numpy array or tensor")
    if not torch.isfinite(t).all() or t.min() < -1e-6 or t.max() > 1 + 1e-6:
        raise InputError("image values must be in [0, 1] (floats) or 0..255 (uint8)")
    return t.clamp(0, 1).contiguous()


def resize_to(image_13HW: torch.Tensor, size: int) -> torch.Tensor:
    """Scale the shorter side to ``size`` and centre-crop to a square (the aspect ratio is kept)."""
    import torch.nn.functional as F
    _, _, H, W = image_13HW.shape
    s = size / min(H, W)
    h, w = max(size, round(H * s)), max(size, round(W * s))
    x = F.interpolate(image_13HW, size=(h, w), mode="bicubic", align_corners=False, antialias=True).clamp(0, 1)
    top, left = (h - size) // 2, (w - size) // 2
    return x[:, :, top:top + size, left:left + size].contiguous()


def _resize_region(region_HW: torch.Tensor, size: int) -> torch.Tensor:
    """A bool region transformed like ``resize_to`` transforms its image (threshold 0.5 after resizing)."""
    import torch.nn.functional as F
    H, W = region_HW.shape
    s = size / min(H, W)
    h, w = max(size, round(H * s)), max(size, round(W * s))
    x = F.interpolate(region_HW[None, None].float(), size=(h, w), mode="bilinear", align_corners=False,
                      antialias=True)[0, 0]
    top, left = (h - size) // 2, (w - size) // 2
    return x[top:top + size, left:left + size] > 0.5


def parse_canvas_place(place: Union[str, Sequence[float]]) -> Union[str, Tuple[float, float]]:
    if isinstance(place, str):
        place = [place]
    place = list(place)
    if len(place) == 1 and str(place[0]).lower() == "center":
        return "center"
    try:
        y, x = (float(v) for v in place)
    except (TypeError, ValueError):
        raise InputError(f"canvas placement {place}: use 'center' or two fractions Y X (the image's top-left "
                         f"corner on the canvas)") from None
    if not (0 <= y <= 1 and 0 <= x <= 1):
        raise InputError(f"canvas placement {place}: Y and X are fractions of the canvas in [0, 1]")
    return y, x


def place_on_canvas(image_13HW: torch.Tensor, size: int, place="center") -> Tuple[torch.Tensor, torch.Tensor]:
    """Put an image at its pixel size on a grey size x size canvas.

    Returns:
        canvas (1, 3, size, size) in [0, 1] and the image's footprint (size, size) bool.
    """
    import torch
    _, _, h, w = image_13HW.shape
    if h > size or w > size:
        raise InputError(f"image is {w}x{h} px, larger than the {size}x{size} canvas: shrink it first "
                         f"(canvas placement keeps the image's pixel size)")
    if h == size and w == size:
        raise InputError(f"image already fills the {size}x{size} canvas: nothing to outpaint; "
                         f"use --mask/--box with --mode outpaint instead")
    place = parse_canvas_place(place)
    if place == "center":
        top, left = (size - h) // 2, (size - w) // 2
    else:
        top, left = round(place[0] * size), round(place[1] * size)
        if top + h > size or left + w > size:
            raise InputError(f"image of {w}x{h} px at ({top}, {left}) does not fit on the {size}x{size} canvas")
    canvas = torch.full((1, 3, size, size), GREY)
    canvas[:, :, top:top + h, left:left + w] = image_13HW
    footprint = torch.zeros(size, size, dtype=torch.bool)
    footprint[top:top + h, left:left + w] = True
    return canvas, footprint


# ---- masks -----------------------------------------------------------------------------------

def to_region(mask: ImageLike) -> torch.Tensor:
    """A binary mask (PIL image, array or tensor; white / 1 / True = the region) -> (H, W) bool."""
    import torch
    if hasattr(mask, "convert") and hasattr(mask, "size"):  # PIL
        mask = np.asarray(mask.convert("L"))
    if isinstance(mask, torch.Tensor):
        mask = mask.detach().cpu().numpy()
    if not isinstance(mask, np.ndarray):
        raise InputError(f"unsupported mask type {type(mask).__name__}: use a PIL image, numpy array or tensor")
    a = mask
    if a.ndim == 3 and a.shape[2] in (3, 4):  # RGB(A) array: all channels must agree
        if not (a[:, :, :3] == a[:, :, :1]).all():
            raise InputError("mask is not binary: its colour channels differ (use pure black and white)")
        a = a[:, :, 0]
    if a.ndim != 2:
        raise InputError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    if a.dtype == np.bool_:
        return torch.from_numpy(a.copy())
    high = 255 if a.dtype == np.uint8 else 1
    values = np.unique(a)
    if not np.isin(values, [0, high]).all():
        raise InputError(f"mask is not binary: it has {len(values)} distinct values, not only 0 and {high} "
                         f"(use pure black = keep and white = the region; no anti-aliasing)")
    return torch.from_numpy(a == high)


def grid_keep(region_HW: torch.Tensor, mode: str, grid: int) -> torch.Tensor:
    """Pixel region -> keep mask on the last scale's token grid (grid, grid) bool.

    A token is kept only if its whole patch is on the kept side of the region.
    """
    import torch.nn.functional as F
    if mode not in MODES:
        raise InputError(f"unknown edit mode {mode!r}: use {' or '.join(MODES)}")
    regenerate = region_HW if mode == "inpaint" else ~region_HW
    H, W = regenerate.shape
    if H % grid or W % grid:
        raise InputError(f"mask of {W}x{H} px does not divide into the {grid}x{grid} token grid")
    touched = F.adaptive_max_pool2d(regenerate[None, None].float(), grid)[0, 0] > 0
    return ~touched


def scale_keep_masks(keep_PP: torch.Tensor, patch_nums: Sequence[int]) -> List[torch.Tensor]:
    """The official per-scale masks: bilinear (align_corners=False) resize, > 0.5; <= 3 tokens keep all.

    Returns:
        per scale (1, pn*pn) bool.
    """
    import torch
    import torch.nn.functional as F
    m = keep_PP.float()[None, None]
    out = []
    for pn in patch_nums:
        if pn * pn <= 3:
            k = torch.ones(pn, pn, dtype=torch.bool)
        else:
            k = F.interpolate(m, size=(pn, pn), mode="bilinear", align_corners=False)[0, 0] > 0.5
        out.append(k.reshape(1, pn * pn))
    return out


def check_keep(keep_PP: torch.Tensor) -> None:
    """Reject edits that edit nothing or everything (both are almost always a mistake)."""
    if bool(keep_PP.all()):
        raise InputError("the mask leaves nothing to edit: no token is regenerated (mark the region to change in "
                         "white, or check --mode)")
    if not bool(keep_PP.any()):
        raise InputError("the mask regenerates the whole image: nothing of the input is kept; use `generate` "
                         "for a new image (or check --mode)")


# ---- the edit ----------------------------------------------------------------------------------

@dataclasses.dataclass
class EditResult:
    """Edited images and what made them (everything on the CPU)."""

    images: torch.Tensor                # (N, 3, S, S) float32 in [0, 1]
    input: torch.Tensor                 # (1, 3, S, S) the image that was encoded (resized / on its canvas)
    keep: torch.Tensor                  # (P, P) bool, the last scale's keep mask (True = image's token)
    keep_scales: List[torch.Tensor]     # per scale (1, pn*pn) bool
    source_tokens: List[torch.Tensor]   # per scale (1, pn*pn): the image's tokens
    tokens: List[torch.Tensor]          # per scale (N, pn*pn): the tokens behind each result
    sampled: List[torch.Tensor]         # per scale (N, pn*pn): as sampled, before kept tokens were put back
    labels: List[int]
    seeds: List[int]

    def numpy(self) -> np.ndarray:
        from var_rt.images import to_uint8
        return to_uint8(self.images)

    def pil(self) -> list:
        from var_rt.images import to_pil
        return to_pil(self.images)

    def mask_visual(self) -> np.ndarray:
        """(S, S, 3) uint8: the input, with the regenerated tokens tinted magenta."""
        import torch
        import torch.nn.functional as F
        from var_rt.images import to_uint8
        S = self.input.shape[-1]
        regen = (~self.keep).float()[None, None]
        regen = F.interpolate(regen, size=(S, S), mode="nearest")[0]
        tint = torch.tensor([1.0, 0.0, 1.0])[:, None, None]
        vis = self.input[0] * (1 - 0.6 * regen) + tint * 0.6 * regen
        return to_uint8(vis[None])[0]

    def grid(self) -> np.ndarray:
        """One row: input, mask visualisation, then every result."""
        from var_rt.images import grid, to_uint8
        tiles = np.concatenate([to_uint8(self.input), self.mask_visual()[None], self.numpy()])
        return grid(tiles, ncols=len(tiles))


def prepare(pipe, image: ImageLike, region=None, mode: Optional[str] = None, resize: bool = False,
            canvas_place=None, strict: bool = True) -> Tuple[torch.Tensor, torch.Tensor]:
    """The image to encode (1, 3, S, S) in [0, 1] and its keep grid (P, P) bool.

    Args:
        image: the input picture.
        region: a Box, or a binary mask (white / True = the region) of the input image's size, the
            model's image size or the token-grid size. None with ``canvas_place``.
        mode: "inpaint" (regenerate inside the region; the default) or "outpaint" (regenerate outside;
            the default with ``canvas_place``).
        resize: scale the image's shorter side to the model's size and centre-crop (masks of the
            input's size follow the same transform). Without it a size mismatch is an error.
        canvas_place: "center" or (y, x) fractions: put the image on a grey canvas and outpaint.
        strict: reject masks that keep everything or nothing.
    """
    S, P = pipe.cfg.image_size, pipe.cfg.patch_nums[-1]
    img = to_image_tensor(image)
    h, w = img.shape[-2:]
    if canvas_place is not None:
        if region is not None:
            raise InputError("canvas placement sets the region itself (the image's footprint): leave out the mask/box")
        if mode not in (None, "outpaint"):
            raise InputError("canvas placement is outpainting: leave out --mode or use --mode outpaint")
        if resize:
            raise InputError("canvas placement keeps the image's pixel size and --resize scales it to the whole "
                             "canvas: give one of them")
        img, footprint = place_on_canvas(img, S, canvas_place)
        keep = grid_keep(footprint, "outpaint", P)
        if strict and not bool(keep.any()):
            raise InputError(f"the image ({w}x{h} px) covers no whole token ({S // P}x{S // P} px squares) of the "
                             f"canvas, so none of it would be kept: give a larger image")
        return img, keep
    mode = mode or "inpaint"
    if mode not in MODES:
        raise InputError(f"unknown edit mode {mode!r}: use {' or '.join(MODES)}")
    if region is None:
        raise InputError("nothing marks the region to edit: give a mask (--mask) or a box (--box)")
    if (h, w) != (S, S):
        if not resize:
            raise InputError(f"image is {w}x{h} px; this model needs {S}x{S}: pass --resize to scale and "
                             f"centre-crop it (or place it on a canvas with --canvas-place)")
        img = resize_to(img, S)
    if isinstance(region, Box):
        reg = region.validate().raster(S)
    else:
        reg = to_region(region)
        shape = tuple(reg.shape)
        if shape == (S, S) or shape == (P, P):
            pass
        elif shape == (h, w) and resize:
            reg = _resize_region(reg, S)
        else:
            sizes = f"{S}x{S} (the model's image), {P}x{P} (its token grid)"
            if resize:
                sizes += f" or {w}x{h} (the input image)"
            raise InputError(f"mask is {shape[1]}x{shape[0]} px: it must be {sizes}")
    keep = grid_keep(reg, mode, P)
    if strict:
        check_keep(keep)
    return img, keep


def edit(pipe, image: ImageLike, region=None, *, mode: Optional[str] = None, keep=None,
         class_label: Optional[int] = None, num_images: int = 1, seed: Union[int, Sequence[int]] = 0,
         cfg: float = DEFAULTS.cfg, cfg_schedule=DEFAULTS.cfg_schedule, top_k: int = DEFAULTS.top_k,
         top_p: float = DEFAULTS.top_p, more_smooth: bool = DEFAULTS.more_smooth, resize: bool = False,
         canvas_place=None, batch_size: Optional[int] = None, progress: Optional[bool] = None) -> EditResult:
    """Zero-shot edit of one image with a loaded VARPipeline.

    Give the region either as ``region`` (a Box or a mask: white = the region) with ``mode``, or
    place the image on a canvas with ``canvas_place``, or pass ``keep`` directly: a (P, P) keep grid
    on the last scale (True = keep the image's token; per-scale masks follow the official rule) or a
    list of per-scale (pn*pn,) / (pn, pn) masks used as they are. ``keep`` is not checked for
    trivial masks: all-True gives back the image's tokens, all-False per-scale masks plain generation.

    Args:
        pipe: a var_rt.pipeline.VARPipeline.
        image: PIL image, numpy array ((H, W, 3) uint8 or float in [0, 1]) or tensor ((1,) 3, H, W in [0, 1]).
        class_label: the class to steer towards (class-conditional editing); None = the null class
            (unconditional inpainting, as the official demo does).
        num_images: variations of the same edit; image i uses seed + i.
        cfg, cfg_schedule, top_k, top_p, more_smooth, batch_size, progress: as VARPipeline.generate.

    Returns:
        EditResult.
    """
    from var_rt.runtime import EditSpec
    cfgm = pipe.cfg
    S, P, pns = cfgm.image_size, cfgm.patch_nums[-1], cfgm.patch_nums
    if keep is not None:
        if region is not None or canvas_place is not None:
            raise InputError("give either keep or a region / canvas placement, not both")
        img = to_image_tensor(image)
        if tuple(img.shape[-2:]) != (S, S):
            if not resize:
                raise InputError(f"image is {img.shape[-1]}x{img.shape[-2]} px; this model needs {S}x{S}: "
                                 f"pass resize=True to scale and centre-crop it")
            img = resize_to(img, S)
        keep_grid, keep_scales = _keep_from_arg(keep, pns)
    else:
        img, keep_grid = prepare(pipe, image, region, mode, resize, canvas_place)
        keep_scales = scale_keep_masks(keep_grid, pns)
    label = edit_label(pipe, class_label)
    validation.image_count(num_images, "num-images")
    pipe.check_labels([label])
    src = [t[:1].cpu() for t in pipe.encode_tokens(img)]
    spec = EditSpec(idx=[t.to(pipe.device) for t in src], keep=[k.to(pipe.device) for k in keep_scales])
    res = pipe.generate(class_labels=[label], num_images=num_images, seed=seed, cfg=cfg, cfg_schedule=cfg_schedule,
                        top_k=top_k, top_p=top_p, more_smooth=more_smooth, batch_size=batch_size,
                        progress=progress, edit=spec)
    return EditResult(images=res.images, input=img, keep=keep_grid, keep_scales=[k.cpu() for k in keep_scales],
                      source_tokens=src, tokens=res.tokens, sampled=res.sampled, labels=res.labels, seeds=res.seeds)


def edit_label(pipe, class_label: Optional[int]) -> int:
    """The class an edit is steered towards: the null class (unconditional) unless one is given."""
    return pipe.cfg.var.num_classes if class_label is None else class_label


def _keep_from_arg(keep, patch_nums: Sequence[int]) -> Tuple[torch.Tensor, List[torch.Tensor]]:
    import torch
    P = patch_nums[-1]
    if isinstance(keep, (list, tuple)):
        if len(keep) != len(patch_nums):
            raise InputError(f"per-scale keep masks: got {len(keep)}, the model has {len(patch_nums)} scales")
        scales = []
        for k, pn in zip(keep, patch_nums):
            k = torch.as_tensor(k).bool().cpu()
            if k.numel() != pn * pn:
                raise InputError(f"keep mask of scale {pn}x{pn} has {k.numel()} entries, needs {pn * pn}")
            scales.append(k.reshape(1, pn * pn))
        return scales[-1].reshape(P, P), scales
    k = torch.as_tensor(np.asarray(keep) if not isinstance(keep, torch.Tensor) else keep).cpu()
    if tuple(k.shape) != (P, P):
        raise InputError(f"keep grid must be {P}x{P} (the last scale's tokens), got {tuple(k.shape)}")
    k = k.bool() if k.dtype == torch.bool else k > 0.5
    return k, scale_keep_masks(k, patch_nums)


# ---- command line --------------------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class EditRequest:
    model: ModelOptions
    sampling: SamplingOptions
    image: Path
    mask: Optional[Path]
    box: Optional[Box]
    mode: Optional[str]
    canvas_place: object
    class_label: Optional[int]
    num_images: int
    resize: bool
    outputs: Outputs


def validate_edit(a: argparse.Namespace) -> EditRequest:
    """Check the options that need no model; the image and mask are checked against the model later."""
    outputs = Outputs.check(a.output_dir, a.grid, a.overwrite)
    given = [n for n, v in (("--mask", a.mask), ("--box", a.box), ("--canvas-place", a.canvas_place)) if v is not None]
    if len(given) != 1:
        raise ConfigError("give exactly one of --mask MASK.png, --box Y0 X0 Y1 X1 or --canvas-place"
                          + (f" (got {' and '.join(given)})" if given else ""))
    box = Box(*a.box).validate() if a.box is not None else None
    place = parse_canvas_place(a.canvas_place) if a.canvas_place is not None else None
    if place is not None and a.mode == "inpaint":
        raise ConfigError("--canvas-place is outpainting: leave out --mode or use --mode outpaint")
    return EditRequest(
        model=ModelOptions.from_args(a), sampling=SamplingOptions.from_args(a),
        image=Path(a.image), mask=Path(a.mask) if a.mask else None, box=box, mode=a.mode, canvas_place=place,
        class_label=a.class_label, num_images=validation.image_count(a.num_images, "--num-images"), resize=a.resize,
        outputs=outputs)


def cmd_edit(a: argparse.Namespace) -> int:
    req = validate_edit(a)  # before any import of torch: a bad request answers at once
    from var_rt.images import load_image
    image = load_image(req.image, "RGB", "--image")
    mask = load_image(req.mask, "L", "--mask") if req.mask is not None else None
    pipe = load_pipeline(req.model)
    region = req.box if req.box is not None else mask
    labels, seeds = pipe.plan([edit_label(pipe, req.class_label)], req.num_images, req.sampling.seed, cli=True)
    req.outputs.refuse_existing(labels, seeds)
    # edit() checks image, region and class before any model work, and nothing is written unless it succeeds
    t0 = time.perf_counter()
    res = edit(pipe, image, region, mode=req.mode, class_label=req.class_label, num_images=req.num_images,
               resize=req.resize, canvas_place=req.canvas_place, **req.sampling.kwargs())
    dt = time.perf_counter() - t0
    arr = res.numpy()
    req.outputs.write(arr, res.labels, res.seeds, res.grid(), " (input, mask, results)")
    kept = int(res.keep.sum())
    print(f"{len(arr)} edit(s) in {dt:.2f} s on {pipe.device}: {res.keep.numel() - kept} of {res.keep.numel()} "
          f"last-scale tokens regenerated")
    return 0


def add_edit_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``python -m var_rt edit`` on the CLI's subparsers."""
    e = subparsers.add_parser(
        "edit", help="zero-shot inpainting / outpainting / class-conditional editing of an image",
        description="Zero-shot editing (the official VAR demo's method). The mask's white pixels (or the box) "
                    "mark the region: --mode inpaint regenerates inside it, --mode outpaint outside it.")
    add_model_args(e)
    add_sampling_args(e)
    g = e.add_argument_group("edit")
    g.add_argument("--image", required=True, help="input image (PNG/JPEG) at the model's size (or use --resize)")
    g.add_argument("--mask", help="binary PNG: white = the region, black = the rest; the input's size, the "
                                  "model's size or the token grid's size")
    g.add_argument("--box", type=float, nargs=4, metavar=("Y0", "X0", "Y1", "X1"),
                   help="the region as a rectangle in fractions of the image, e.g. 0.25 0.25 0.75 0.75")
    g.add_argument("--mode", choices=MODES, default=None,
                   help="inpaint: regenerate inside the region (default); outpaint: regenerate outside it")
    g.add_argument("--canvas-place", nargs="+", metavar="WHERE",
                   help="outpaint onto a canvas of the model's size: 'center' or Y X (fractions, the image's "
                        "top-left corner); the image keeps its pixel size, the rest is generated")
    g.add_argument("--class-label", type=int, default=None,
                   help="class to steer the edit towards (default: the null class, unconditional)")
    g.add_argument("--num-images", type=int, default=1, help="variations of the edit; image i uses seed+i")
    g.add_argument("--resize", action="store_true",
                   help="scale the image's shorter side to the model's size and centre-crop it")
    g.add_argument("--output-dir", help="one PNG per result")
    g.add_argument("--grid", help="one PNG: input, mask visualisation, results side by side")
    add_overwrite_arg(g)
    e.set_defaults(func=cmd_edit, hold_warnings=True)
    return e
