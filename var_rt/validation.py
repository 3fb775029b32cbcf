"""One validation of request values for every entry point: the CLI, VARPipeline and the HTTP server.

The CLI, the Python API and ``parse_request`` in var_rt/serve.py all call these functions, so a value
is accepted or refused the same way wherever it comes from, with the same message. Each check returns
the value in its plain Python type (numpy integers become ``int``, a schedule becomes a tuple of
floats), so callers never convert again.

Rules: integers are ``int`` or numpy integers, never ``bool``, ``str`` or ``float`` (``3.0`` is refused
rather than silently truncated, ``'7'`` rather than parsed); numbers are also finite (NaN and infinity
give degenerate images instead of an error further down).

Names in messages: each function takes the name the user typed, a CLI flag (``--top-k``) or a field of
the Python API / HTTP body; :func:`field_name` spells a field either way.

Depends only on var_rt.errors, the standard library and numpy, so any module can use it.
"""
from __future__ import annotations

import dataclasses
import math
import reprlib
from typing import List, Optional, Tuple, Union

import numpy as np

from var_rt.errors import InputError

MAX_SEED = 2 ** 63  # seeds are int64 on the device
SCHEDULES = ("linear", "constant")
# Guidance strength (cfg) and every explicit per-scale schedule value. The official code samples with 1.5 to
# 4; 0 turns guidance off. Logits are mixed as (1 + t) cond - t uncond in float32, so a huge t overflows to
# inf/NaN and gives one token at every scale (a degenerate image, not an error): 100 is far beyond any useful
# guidance and far inside float32, so every value in the range gives an image.
CFG_RANGE = (0, 100)
# Images of one generate / edit call. They are held in memory until the call returns (float32, 0.8 MB each at
# 256 px, 3 MB at 512 px: 3.2 / 12.9 GB at the maximum) and the CLI writes them all at the end; larger sets
# belong to `python -m var_rt sample`, which writes shards as it goes and resumes.
MAX_IMAGES = 4096

_short = reprlib.Repr()
_short.maxstring, _short.maxother, _short.maxlist = 40, 40, 6


def show(value) -> str:
    """A short repr of a user's value for a message."""
    return _short.repr(value)


def field_name(field: str, cli: bool = False) -> str:
    """``top_k`` -> ``top-k`` (Python / HTTP messages) or ``--top-k`` (CLI messages)."""
    name = field.replace("_", "-")
    return f"--{name}" if cli else name


def is_integer(value) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def is_number(value) -> bool:
    return isinstance(value, (int, float, np.integer, np.floating)) and not isinstance(value, (bool, np.bool_))


def _range_text(minimum, maximum) -> str:
    if minimum is not None and maximum is not None:
        return f"in [{minimum}, {maximum}]"
    if minimum is not None:
        return f">= {minimum}"
    return f"<= {maximum}"


def integer(value, name: str, minimum: Optional[int] = None, maximum: Optional[int] = None,
            hint: str = "") -> int:
    """``value`` as an int, refusing non-integers (bool, str, float) and values outside [minimum, maximum]."""
    hint = f" ({hint})" if hint else ""
    if not is_integer(value):
        raise InputError(f"{name} must be an integer{hint}, got {show(value)}")
    value = int(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise InputError(f"{name} must be {_range_text(minimum, maximum)}{hint}, got {value}")
    return value


def number(value, name: str, minimum: Optional[float] = None, maximum: Optional[float] = None,
           hint: str = "") -> float:
    """``value`` as a finite float in [minimum, maximum]; bool and str are refused."""
    hint = f" ({hint})" if hint else ""
    if not is_number(value) or not math.isfinite(float(value)):
        raise InputError(f"{name} must be a finite number{hint}, got {show(value)}")
    value = float(value)
    if (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise InputError(f"{name} must be {_range_text(minimum, maximum)}{hint}, got {value:g}")
    return value


def flag(value, name: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise InputError(f"{name} must be true or false, got {show(value)}")
    return bool(value)


def count(value, name: str) -> Optional[int]:
    """An optional count of images (num_images, batch_size): None, or an integer >= 1."""
    return None if value is None else integer(value, name, minimum=1)


def image_count(value, name: str) -> Optional[int]:
    """An optional number of images of one call: None, or an integer in [1, MAX_IMAGES]."""
    n = count(value, name)
    if n is not None and n > MAX_IMAGES:
        raise InputError(f"{name} must be <= {MAX_IMAGES} (the images of one run are held in memory until they "
                         f"are written): split the run, or use `python -m var_rt sample` for larger sets, got {n}")
    return n


def _check_total(n: int, what: str) -> None:
    if n > MAX_IMAGES:
        raise InputError(f"{what} give {n} images: at most {MAX_IMAGES} per run (they are held in memory until "
                         f"written); split the run, or use `python -m var_rt sample` for larger sets")


def _as_list(values, name: str, what: str) -> list:
    """A list/tuple, or a numpy array / tensor (through ``tolist``), as a flat list; strings are refused."""
    if hasattr(values, "tolist") and not isinstance(values, (list, tuple)):
        values = values.tolist()
    if not isinstance(values, (list, tuple)) or any(isinstance(v, (list, tuple)) for v in values):
        raise InputError(f"{name} must be a list of {what}, got {show(values)}")
    return list(values)


def class_ids(labels, num_classes: int, name: str = "class id") -> List[int]:
    """Class ids 0..num_classes (num_classes = the null class, i.e. unconditional)."""
    n = num_classes
    out = []
    for c in _as_list(labels, "class labels", "class ids"):
        if not is_integer(c):
            raise InputError(f"{name} {show(c)} is not an integer: class ids are whole numbers 0..{n - 1} "
                             f"({n} = the null class, i.e. unconditional)")
        if not 0 <= int(c) <= n:
            raise InputError(f"{name} {show(int(c))} is out of range for this model: use 0..{n - 1} "
                             f"({n} = the null class, i.e. unconditional)")
        out.append(int(c))
    if not out:
        raise InputError("class labels must not be empty: give at least one class id (or leave them out)")
    return out


def seeds(seed, n: int, name: str = "seed") -> List[int]:
    """One seed per image: ``seed + i`` from a first seed, or a list of n seeds; all in [0, 2^63)."""
    if is_integer(seed):
        out = [int(seed) + i for i in range(n)]
    elif isinstance(seed, (list, tuple)) or hasattr(seed, "tolist"):
        out = _as_list(seed, name, "integer seeds")
        if not all(is_integer(s) for s in out):
            raise InputError(f"{name} must be an integer or a list of integers, got {show(seed)}")
        out = [int(s) for s in out]
        if len(out) != n:
            raise InputError(f"{len(out)} seeds for {n} images")
    else:
        raise InputError(f"{name} must be an integer or a list of integers, got {show(seed)}")
    if any(not 0 <= s < MAX_SEED for s in out):
        raise InputError(f"{name} must be in [0, 2^63), got {show(out if len(out) > 1 else out[0])}")
    return out


def image_plan(class_labels, num_images, seed, num_classes: int, cli: bool = False
               ) -> Tuple[Optional[List[int]], List[int]]:
    """Labels (None where they are to be drawn from the seeds) and one seed per image.

    One label is repeated for every image; otherwise there is one label per image.
    """
    num_images = image_count(num_images, field_name("num_images", cli))
    if class_labels is not None and hasattr(class_labels, "__len__"):
        _check_total(len(class_labels), f"{len(class_labels)} class labels")
    if isinstance(seed, (list, tuple)) or hasattr(seed, "tolist"):
        _check_total(len(seed), f"{len(seed)} seeds")
    labels = None if class_labels is None else class_ids(class_labels, num_classes)
    if labels is not None:
        if num_images is not None and len(labels) not in (1, num_images):
            raise InputError(f"{len(labels)} class labels for {num_images} images: give one label, "
                             f"one per image, or leave {field_name('num_images', cli)} out")
        n = num_images or len(labels)
        labels = labels * n if len(labels) == 1 else labels
    else:
        n = 1 if num_images is None else num_images
    return labels, seeds(seed, n, field_name("seed", cli))


def check_schedule(schedule, num_scales: Optional[int], name: str = "cfg-schedule"
                 ) -> Union[str, Tuple[float, ...]]:
    """'linear', 'constant', or one finite guidance value per scale (length checked when num_scales is known)."""
    per_scale = f"{num_scales} " if num_scales else ""
    usage = f"use 'linear', 'constant' or {per_scale}comma-separated numbers, one per scale"
    if isinstance(schedule, str):
        if schedule not in SCHEDULES:
            raise InputError(f"{name} {show(schedule)} is unknown: {usage}")
        return schedule
    values = _as_list(schedule, name, "numbers")
    bad = [v for v in values if not is_number(v) or not math.isfinite(float(v))]
    if bad:
        raise InputError(f"{name}: {show(bad[0])} is not a finite number: {usage}")
    lo, hi = CFG_RANGE
    out = [v for v in values if not lo <= float(v) <= hi]
    if out:
        raise InputError(f"{name}: {float(out[0]):g} is out of range: each value must be in [{lo:g}, {hi:g}] "
                         f"(guidance strength; 0 turns it off)")
    if num_scales is not None and len(values) != num_scales:
        raise InputError(f"{name}: an explicit guidance schedule needs one value per scale ({num_scales}), "
                         f"got {len(values)}")
    return tuple(float(v) for v in values)


def filters(top_k, top_p, cli: bool = False) -> Tuple[int, float]:
    """top-k: an integer >= 0; top-p: a number in [0, 1] (0 turns either off)."""
    return (integer(top_k, field_name("top_k", cli), minimum=0, hint="0 turns it off"),
            number(top_p, field_name("top_p", cli), 0, 1, hint="0 turns it off"))


def _checked_sampling(cfg, cfg_schedule, top_k, top_p, more_smooth, num_scales: Optional[int], cli: bool) -> dict:
    name = lambda f: field_name(f, cli)  # noqa: E731
    top_k, top_p = filters(top_k, top_p, cli)
    return dict(cfg=number(cfg, name("cfg"), *CFG_RANGE, hint="guidance strength"),
                cfg_schedule=check_schedule(cfg_schedule, num_scales, name("cfg_schedule")),
                top_k=top_k, top_p=top_p, more_smooth=flag(more_smooth, name("more_smooth")))


@dataclasses.dataclass(frozen=True)
class Sampling:
    """A request's sampling settings, the one form every layer uses: VARPipeline.generate, the scale loop
    (var_rt.runtime), the CLI flags (var_rt.options), the HTTP
    fields (var_rt.serve) and ``sample``'s job (var_rt.sample).

    Always valid: construction runs the checks of this module (messages name the Python / HTTP fields) and
    stores each value in its plain type, the schedule as a tuple, so an instance is hashable. ``check``
    builds one naming the CLI flags instead and, once the model is known, checks the schedule's length.

    The defaults are the settings every entry point defaults to (``DEFAULTS``, also exported as
    ``var_rt.sampling.DEFAULTS``): the CLI builds its flags' defaults and help from them before torch is
    loaded, which is why they live here (this module imports no torch). They are the settings the official
    code samples its FID images with, so a default run is comparable with published numbers.
    """

    cfg: float = 1.5
    cfg_schedule: Union[str, Tuple[float, ...]] = "linear"
    top_k: int = 900
    top_p: float = 0.96
    more_smooth: bool = False

    def __post_init__(self):
        values = _checked_sampling(self.cfg, self.cfg_schedule, self.top_k, self.top_p, self.more_smooth, None, False)
        for k, v in values.items():
            object.__setattr__(self, k, v)

    @classmethod
    def check(cls, cfg, cfg_schedule, top_k, top_p, more_smooth, num_scales: Optional[int] = None,
              cli: bool = False) -> "Sampling":
        """Validate every setting; ``num_scales`` None (the model is not loaded yet) skips the schedule length.

        cli: name the values by their CLI flags in messages.
        """
        return cls(**_checked_sampling(cfg, cfg_schedule, top_k, top_p, more_smooth, num_scales, cli))

    def asdict(self) -> dict:
        """The settings as keyword arguments of VARPipeline.generate."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}

    def astuple(self) -> tuple:
        """The values in field order (hashable: var_rt.serve groups requests by it); ``Sampling(*t)`` rebuilds."""
        return tuple(getattr(self, f.name) for f in dataclasses.fields(self))


DEFAULTS = Sampling()
