"""Command line: ``python -m var_rt generate|edit|sample|serve|fid|download``.

Each command parses with argparse (kebab-case flags), validates once into a frozen
dataclass, and only then touches models or files: a bad request writes nothing.
This module holds generate and download and registers the other commands' parsers; the
flag groups and checks they share are in var_rt.options. Only ``__main__`` and the
``var-rt`` entry point import this module.
"""
from __future__ import annotations

import argparse
import dataclasses
import sys
import time
import warnings
from typing import List, Optional, Sequence

from var_rt import validation
from var_rt.edit import add_edit_parser
from var_rt.errors import VarRtError, one_line
from var_rt.options import (ArgumentParser, ModelOptions, Outputs, SamplingOptions, add_model_args,
                            add_overwrite_arg, add_sampling_args, load_pipeline)
from var_rt.quality import add_fid_parser
from var_rt.sample import add_sample_parser
from var_rt.serve import add_serve_parser


@dataclasses.dataclass(frozen=True)
class GenerateRequest:
    model: ModelOptions
    sampling: SamplingOptions
    class_labels: Optional[List[int]]
    num_images: Optional[int]
    outputs: Outputs


def validate_generate(a: argparse.Namespace) -> GenerateRequest:
    outputs = Outputs.check(a.output_dir, a.grid, a.overwrite)
    return GenerateRequest(
        model=ModelOptions.from_args(a), sampling=SamplingOptions.from_args(a), class_labels=a.class_labels,
        num_images=validation.image_count(a.num_images, "--num-images"), outputs=outputs)


def cmd_generate(a: argparse.Namespace) -> int:
    req = validate_generate(a)  # before any import of torch: a bad request answers at once
    from var_rt.images import grid
    pipe = load_pipeline(req.model)
    labels, seeds = pipe.plan(req.class_labels, req.num_images, req.sampling.seed, cli=True)
    validation.check_schedule(req.sampling.settings.cfg_schedule, pipe.cfg.num_scales, "--cfg-schedule")
    req.outputs.refuse_existing(labels, seeds)
    t0 = time.perf_counter()
    res = pipe.generate(class_labels=labels, **dict(req.sampling.kwargs(), seed=seeds))
    dt = time.perf_counter() - t0
    arr = res.numpy()
    req.outputs.write(arr, res.labels, res.seeds, grid(arr))
    print(f"{len(arr)} image(s) in {dt:.2f} s on {pipe.device} ({str(pipe.dtype).replace('torch.', '')}, "
          f"backend {pipe.backend})")
    return 0


def cmd_download(a: argparse.Namespace) -> int:
    from var_rt.download import download
    for path in download(a.model, a.dir):
        print(path)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = ArgumentParser(prog="python -m var_rt", description="var-rt: fast VAR image generation")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="class-conditional image generation")
    add_model_args(g)
    add_sampling_args(g)
    g.add_argument("--class-labels", type=int, nargs="+", help="class ids (random per seed if omitted)")
    g.add_argument("--num-images", type=int, help="number of images (default: one per label, or 1)")
    g.add_argument("--output-dir", help="one PNG per image; sorted names follow batch order")
    g.add_argument("--grid", help="also write all images tiled into one PNG")
    add_overwrite_arg(g)
    g.set_defaults(func=cmd_generate, hold_warnings=True)

    add_edit_parser(sub)
    add_serve_parser(sub)
    add_sample_parser(sub)
    add_fid_parser(sub)

    d = sub.add_parser("download", help="fetch official checkpoints (needs internet)")
    d.add_argument("--model", required=True, help="d16, d20, d24, d30 or d36")
    d.add_argument("--dir", default="checkpoints", help="where to put them (default ./checkpoints)")
    d.set_defaults(func=cmd_download)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run a command; a VarRtError becomes one ``error:`` line and exit status 2.

    Commands that set ``hold_warnings`` (generate, edit) keep Python warnings back until they succeed,
    then print each once as a ``warning:`` line: a failed run prints its error line alone.
    """
    args = build_parser().parse_args(argv)
    hold = getattr(args, "hold_warnings", False)
    with warnings.catch_warnings(record=hold) as held:
        try:
            rc = args.func(args)
        except VarRtError as e:
            print(f"error: {one_line(e)}", file=sys.stderr)
            return 2
        except KeyboardInterrupt:
            print("interrupted", file=sys.stderr)
            return 130
    for message in dict.fromkeys(one_line(w.message) for w in held or []):
        print(f"warning: {message}", file=sys.stderr)
    return rc
