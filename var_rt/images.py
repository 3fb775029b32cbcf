"""Image files: float tensors to uint8, PNG files (all or none, whose sorted names follow batch order), grids,
and reading input images (with a size limit)."""
from __future__ import annotations

import io
import math
import re
import warnings
from pathlib import Path
from typing import Dict, List, Sequence

import numpy as np
import torch

from var_rt.errors import InputError
from var_rt.files import write_files

# Input images (edit --image / --mask) larger than this are refused before they are decoded.
MAX_INPUT_SIDE = 8192
MAX_INPUT_PIXELS = MAX_INPUT_SIDE * MAX_INPUT_SIDE


def to_uint8(images_B3HW: torch.Tensor) -> np.ndarray:
    """(B, 3, H, W) floats in [0, 1] -> (B, H, W, 3) uint8, rounded to nearest."""
    x = images_B3HW.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8)
    return x.permute(0, 2, 3, 1).cpu().numpy()


def to_pil(images_B3HW: torch.Tensor) -> list:
    from PIL import Image
    return [Image.fromarray(a) for a in to_uint8(images_B3HW)]


def grid(images_BHW3: np.ndarray, ncols: int | None = None, pad: int = 2) -> np.ndarray:
    """Tile uint8 images (B, H, W, 3) into one (rows*(H+pad)+pad, cols*(W+pad)+pad, 3) image on white."""
    B, H, W, _ = images_BHW3.shape
    ncols = ncols or min(B, max(1, math.ceil(math.sqrt(B))))
    nrows = math.ceil(B / ncols)
    out = np.full((nrows * (H + pad) + pad, ncols * (W + pad) + pad, 3), 255, np.uint8)
    for i, im in enumerate(images_BHW3):
        r, c = divmod(i, ncols)
        y, x = pad + r * (H + pad), pad + c * (W + pad)
        out[y:y + H, x:x + W] = im
    return out


def write_pngs(files: Dict[Path, np.ndarray]) -> List[Path]:
    """Write uint8 (H, W, 3) images as PNG files, all or none (var_rt.files.write_files: temporary names, then
    renames; on any failure nothing is left, not even the folders made for them)."""
    from PIL import Image
    files = {Path(p): a for p, a in files.items()}
    write_files({p: (lambda f, a=a: Image.fromarray(a).save(f, format="PNG")) for p, a in files.items()})
    return list(files)


def save_png(array_HW3: np.ndarray, path: str | Path) -> Path:
    """One PNG file (written under a temporary name and renamed, see write_pngs)."""
    return write_pngs({Path(path): array_HW3})[0]


def png_bytes(array_HW3: np.ndarray) -> bytes:
    """One uint8 (H, W, 3) image as PNG file bytes."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(array_HW3).save(buf, format="PNG")
    return buf.getvalue()


def open_image(path: str | Path, what: str = "image"):
    """An image file opened by PIL with only its header read, after the checks every input image gets; use it
    as ``with open_image(p) as im``. InputError if it is a folder, missing, not an image, or larger than
    MAX_INPUT_PIXELS: refused from the header, before decoding (the models work at 256 or 512 px, and
    decoding a huge, or maliciously small-on-disk, file would take gigabytes).
    """
    from PIL import Image, UnidentifiedImageError
    path = Path(path)
    if path.is_dir():
        raise InputError(f"{what} {str(path)!r} is a folder, not an image file")
    if not path.exists():
        raise InputError(f"{what} {str(path)!r}: no such file")
    with warnings.catch_warnings():  # PIL warns (and above 2x its own limit raises) about large images
        warnings.simplefilter("ignore", Image.DecompressionBombWarning)
        try:
            im = Image.open(path)
        except Image.DecompressionBombError as e:  # PIL's limit is process-wide: not ours to change
            found = re.search(r"\((\d+) pixels\)", str(e))
            size = f"{int(found.group(1)):,} pixels" if found else f"more than {MAX_INPUT_PIXELS:,} pixels"
        except (UnidentifiedImageError, OSError) as e:
            raise InputError(f"{what} {str(path)!r} cannot be read as an image ({type(e).__name__}): "
                             f"give a PNG or JPEG file") from None
        else:
            if im.size[0] * im.size[1] <= MAX_INPUT_PIXELS:
                return im
            size = f"{im.size[0]}x{im.size[1]} px"
            im.close()
    raise InputError(f"{what} {str(path)!r} is {size}: the limit is {MAX_INPUT_PIXELS:,} pixels "
                     f"({MAX_INPUT_SIDE}x{MAX_INPUT_SIDE}); shrink it first (the model works at "
                     f"256 or 512 px)")


def load_image(path: str | Path, mode: str = "RGB", what: str = "image") -> np.ndarray:
    """An image file (PNG, JPEG, ...) -> (H, W, 3) uint8 (mode "L": (H, W)); InputError if it cannot be used
    (``open_image``'s checks, or a file that fails to decode)."""
    from PIL import UnidentifiedImageError
    with open_image(path, what) as im:
        try:
            return _to_8bit(im, mode)
        except (UnidentifiedImageError, OSError) as e:  # a valid header over truncated or corrupt data
            raise InputError(f"{what} {str(path)!r} cannot be read as an image ({type(e).__name__}): "
                             f"give a PNG or JPEG file") from None


def _to_8bit(im, mode: str) -> np.ndarray:
    """``im.convert(mode)`` as uint8, with 16-bit grayscale scaled to 8 bits.

    PIL opens 16-bit grayscale PNGs (and TIFFs) as mode ``I;16`` (``I;16B``, ...) or ``I`` (32-bit integers
    holding 0..65535), and its ``convert`` clips those values to 255 instead of scaling them: a 0..65535
    gradient would become 0, 255, 255, ... Here they are scaled (65535 -> 255, rounded) before converting.
    """
    from PIL import Image
    if im.mode.startswith("I"):  # I;16, I;16B, I;16L, I;16N, I
        v = np.asarray(im).astype(np.float64).clip(0, 65535)
        im = Image.fromarray(np.rint(v * (255 / 65535)).astype(np.uint8), "L")
    return np.asarray(im.convert(mode))


def result_names(labels: Sequence[int], seeds: Sequence[int], start: int = 0) -> List[str]:
    """``{index}_class{c}_seed{s}.png`` per image: sorting the names gives batch order."""
    width = max(5, len(str(start + len(labels) - 1)))
    return [f"{start + i:0{width}d}_class{c}_seed{s}.png" for i, (c, s) in enumerate(zip(labels, seeds))]
