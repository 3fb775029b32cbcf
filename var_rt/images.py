"""Image output: float tensors to uint8, PNG files whose sorted names follow batch order, and grids."""
from __future__ import annotations

import io
import math
from pathlib import Path
from typing import List, Sequence

import numpy as np
import torch


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


def save_png(array_HW3: np.ndarray, path: str | Path) -> Path:
    from PIL import Image
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(array_HW3).save(path)
    return path


def png_bytes(array_HW3: np.ndarray) -> bytes:
    """One uint8 (H, W, 3) image as PNG file bytes."""
    from PIL import Image
    buf = io.BytesIO()
    Image.fromarray(array_HW3).save(buf, format="PNG")
    return buf.getvalue()


def save_pngs(images_BHW3: np.ndarray, out_dir: str | Path, names: Sequence[str]) -> List[Path]:
    return [save_png(im, Path(out_dir) / name) for im, name in zip(images_BHW3, names)]


def load_image(path: str | Path) -> np.ndarray:
    """PNG/JPEG -> (H, W, 3) uint8."""
    from PIL import Image
    with Image.open(path) as im:
        return np.asarray(im.convert("RGB"))


def save_results(images_BHW3: np.ndarray, labels: Sequence[int], seeds: Sequence[int], out_dir: str | Path,
                 start: int = 0) -> List[Path]:
    """One PNG per image named ``{index}_class{c}_seed{s}.png``: sorting the names gives batch order."""
    width = max(5, len(str(start + len(images_BHW3) - 1)))
    names = [f"{start + i:0{width}d}_class{c}_seed{s}.png" for i, (c, s) in enumerate(zip(labels, seeds))]
    paths = save_pngs(images_BHW3, out_dir, names)
    print(f"wrote {len(paths)} PNG(s) to {out_dir}")
    return paths
