"""Greedy-token agreement between backends, per scale: how much a fast path changes what is sampled.

    python -m benchmarks.agreement --model d16 d30 --backends torch cudagraph --dtype float16 --out agree.json
    python -m benchmarks.agreement --model d16 --backends torch onnxruntime --engine-dir exports/d16-fp16 ...

Every backend of one model gets the same weights (random with ``--weight-seed``, as the benchmark's, or
the checkpoints), the same labels and seeds, and greedy sampling (top-k 1: no random draw, so a token
differs only where the logits' order differs). The first backend is the reference: per scale, the share
of its tokens that each other backend samples too, and the largest image difference. A flip at one scale
changes the next scale's input, so later scales disagree more than the arithmetic alone would.

``official-code`` in ``--backends`` is the official code itself (benchmarks/official_code.py, from the checkout
``--official-src`` names) on the same weights, in float32 weights under ``--dtype`` autocast, as the official
demo runs it: ``--backends official-code torch cudagraph`` measures how much of the official run's greedy
tokens each backend keeps.
"""
from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path
from typing import Dict, List, Optional

import torch

from benchmarks.bench import autocast_dtype, labels_for  # the benchmark's labels, so the two runs compare
from var_rt.validation import DEFAULTS


def generate_tokens(pipe, B: int, cfg: float, seed: int) -> Dict[str, object]:
    """Greedy generation of B images: per-scale tokens (B, pn^2) on the host, and the images."""
    out = pipe.generate(class_labels=labels_for(B, pipe.cfg.var.num_classes).tolist(), seed=seed, cfg=cfg, top_k=1,
                        top_p=0.0, batch_size=B, progress=False)
    return {"tokens": [t.cpu() for t in out.tokens], "images": out.images.float().cpu()}


def official_tokens(args, model: Optional[str], B: int, cfg: float, seed: int) -> Dict[str, object]:
    """``generate_tokens`` for the official code: its greedy tokens and images for the same labels and weights."""
    from benchmarks import official_code
    from var_rt.pipeline import build_models, resolve_config, resolve_device
    mc = resolve_config(model, args.config)
    var, vae = build_models(mc, args.var_ckpt, args.vae_ckpt, args.var_ckpt is None, args.weight_seed)
    off = official_code.OfficialCode(official_code.source_dir(args.official_src), mc, var.state_dict(),
                                     vae.state_dict(), resolve_device(args.device), autocast_dtype(args.dtype))
    del var, vae
    images, tokens = off.generate_with_tokens(labels_for(B, mc.var.num_classes), seed=seed, cfg=cfg, top_k=1,
                                              top_p=0.0)
    return {"tokens": [t.cpu() for t in tokens], "images": images.float().cpu()}


def compare(ref: Dict[str, object], got: Dict[str, object]) -> Dict[str, object]:
    per_scale = [float((a == b).double().mean()) for a, b in zip(ref["tokens"], got["tokens"])]
    n = [a.numel() for a in ref["tokens"]]
    total = sum(p * k for p, k in zip(per_scale, n)) / sum(n)
    return {"per_scale": [round(p, 5) for p in per_scale], "overall": round(total, 5),
            "first_differing_scale": next((i for i, p in enumerate(per_scale) if p < 1.0), None),
            "image_max_abs_diff": float((ref["images"] - got["images"]).abs().max())}


def run(args) -> Dict[str, object]:
    from var_rt.pipeline import VARPipeline

    result = {"date": time.strftime("%Y-%m-%d %H:%M:%S"), "command": " ".join(sys.argv),
              "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else platform.processor() or "cpu",
              "torch": torch.__version__, "dtype": args.dtype, "batch": args.batch, "cfg": args.cfg,
              "seed": args.seed, "weights": "checkpoints" if args.var_ckpt else f"random (seed {args.weight_seed})",
              "models": []}
    for model in ([None] if args.config else args.model):
        entry = {"model": model or args.config, "reference": args.backends[0], "runs": []}
        result["models"].append(entry)
        ref, earlier = None, {}
        for backend in args.backends:
            t0 = time.perf_counter()
            try:
                if backend == "official-code":
                    got = official_tokens(args, model, args.batch, args.cfg, args.seed)
                else:
                    pipe = VARPipeline.load(model, config=args.config, var_ckpt=args.var_ckpt, vae_ckpt=args.vae_ckpt,
                                            random_weights=args.var_ckpt is None, weight_seed=args.weight_seed,
                                            device=args.device, dtype=args.dtype, backend=backend, progress=False,
                                            engine_dir=args.engine_dir if backend in ("onnxruntime", "tensorrt")
                                            else None)
                    got = generate_tokens(pipe, args.batch, args.cfg, args.seed)
            except Exception as e:  # a backend that cannot run here says why, the others still run
                entry["runs"].append({"backend": backend, "status": "error", "reason": f"{type(e).__name__}: {e}"[:400]})
                print(f"[agreement] {entry['model']} {backend}: {type(e).__name__}: {e}", file=sys.stderr)
                continue
            finally:
                pipe = None
            run = {"backend": backend, "status": "ok", "reference": ref is None}
            if ref is None:
                ref = got
            else:
                run.update(compare(ref, got))
            others = {b: compare(e, got) for b, e in earlier.items() if e is not ref}
            if others:  # a later backend also against each earlier one but the reference (onnxruntime vs cudagraph)
                run["against"] = others
            earlier[backend] = got
            run["seconds"] = round(time.perf_counter() - t0, 1)
            entry["runs"].append(run)
            print(f"[agreement] {entry['model']} {json.dumps(run)}", flush=True)
    return result


def main(argv: Optional[List[str]] = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.agreement", description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="+", default=["d16"], help="presets (d16 ... d36)")
    p.add_argument("--config", help="a model config JSON instead of --model")
    p.add_argument("--backends", nargs="+", default=["torch", "cudagraph"],
                   help="the first is the reference; official-code is the official code itself (--official-src)")
    p.add_argument("--dtype", default="float16", choices=["float16", "bfloat16", "float32"])
    p.add_argument("--device", default=None)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--cfg", type=float, default=DEFAULTS.cfg)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--weight-seed", type=int, default=0)
    p.add_argument("--var-ckpt")
    p.add_argument("--vae-ckpt")
    p.add_argument("--engine-dir", help="export folder for the onnxruntime/tensorrt backends")
    p.add_argument("--official-src", help="a checkout of the official code, for the backend name official-code "
                                           "(default: $VAR_OFFICIAL_SRC)")
    p.add_argument("--out", required=True, help="JSON file to write")
    args = p.parse_args(argv)
    if len(args.backends) < 2:
        p.error("--backends needs two or more: the reference first")
    if args.batch < 1:
        p.error("--batch must be at least 1")
    result = run(args)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    bad = [r for m in result["models"] for r in m["runs"] if r["status"] != "ok"]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
