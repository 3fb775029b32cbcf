"""var-rt benchmark: backends against the official-style baseline and DiT-XL/2.

    python -m benchmarks.bench --model d16 --batch-sizes 1 16 64 --backends torch cudagraph \
        --baselines official,dit --out-dir out/bench --time-budget-s 480

What is measured, per (model, backend, batch):
- ``model_load_s``: building the model on the host (random init or reading checkpoints), once per model;
  ``setup_s``: moving it to the device and building the backend's pipeline.
- ``first_call_ms``: the first ``generate`` at this batch size (buffer allocation, CUDA-graph capture,
  lazy initialisation), host clock with a device synchronize before and after.
- steady state after ``--warmup`` calls: ``median_ms`` / ``p90_ms`` of ``VARPipeline.generate`` (what a
  user calls: request copies in, images and tokens copied back to the host), timed with CUDA events
  (start/end recorded on the stream, then synchronize); ``loop_median_ms``: the device loop alone
  (ScaleLoop / CudaGraphLoop run, images left on the device) when that API is reachable.
- ``per_scale_ms`` / ``decoder_ms``: from a separate instrumented EAGER run of the same engine (no CUDA
  graph): the engine is wrapped so that an event is recorded before and after every graph it runs
  (condition, step_k, transition_k, decode); a scale's time is from the start of its step to the end
  of its transition (sampling included). Launch overheads that a CUDA graph removes are included, so
  these show where the time goes, not the graph's total.
- ``peak_mem_gib``: torch.cuda.max_memory_allocated after reset_peak_memory_stats, over the steady-state
  calls (``peak_mem_first_gib``: over setup + first call).

Baselines: "official-code" is the official code itself (FoundationVision/VAR's ``autoregressive_infer_cfg``,
benchmarks/official_code.py), imported from a checkout given with ``--official-src`` and run on the same
weights in this process; "official-style" is OUR RE-IMPLEMENTATION of the official algorithm
(benchmarks/official_style.py), which needs no checkout; the official code's numbers measured on an H100
(benchmarks/reference_baselines.json) are printed beside them.
DiT-XL/2 runs through diffusers with random weights (benchmarks/dit.py) when diffusers is importable.
"""
from __future__ import annotations

import argparse
import copy
import datetime
import gc
import inspect
import json
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
import traceback
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from benchmarks import dit as dit_mod
from benchmarks import floors as floors_mod
from benchmarks import official_code
from benchmarks.official_style import OfficialStyle
from var_rt.precision import DTYPES

ALL_BACKENDS = ("torch", "cudagraph", "onnxruntime", "tensorrt")
BASELINES = ("official", "official-code", "dit")
PRESET_NAMES = ("d16", "d20", "d24", "d30", "d36")
REF_PATH = Path(__file__).with_name("reference_baselines.json")
REPO = Path(__file__).resolve().parents[1]


def repo_relative(path) -> str:
    """A path inside this checkout as written relative to it (reports do not name the machine's folders)."""
    try:
        return Path(path).resolve().relative_to(REPO).as_posix()
    except (ValueError, OSError, TypeError):  # outside the checkout, or None
        return str(path)


def timing_text(cuda: bool) -> Dict[str, str]:
    """How this run timed its calls, in the words the report uses."""
    if cuda:
        return {"clock": "CUDA events",
                "timing": "steady state: CUDA events around each call, synchronize before reading; first call "
                          "and setup: host clock between synchronizes; peak memory: max_memory_allocated after "
                          "reset_peak_memory_stats"}
    return {"clock": "host clock, time.perf_counter",
            "timing": "steady state, first call and setup: host clock (time.perf_counter) around each call; "
                      "no GPU, so no peak memory"}


def autocast_text(dtype: str) -> str:
    """What the official-style baseline runs in for --dtype (see run_official_model)."""
    return {"float16": "FP16 autocast", "bfloat16": "BF16 autocast"}.get(dtype, "float32, no autocast")


def autocast_dtype(dtype: str) -> Optional[torch.dtype]:
    """The autocast the official code and the official-style baseline run under for --dtype (None: float32)."""
    return None if dtype == "float32" else DTYPES[dtype]


# ---- timing ------------------------------------------------------------------------------------
class Clock:
    """CUDA events on a GPU (synchronize before reading), perf_counter on the CPU."""

    def __init__(self, device: torch.device):
        self.device = device
        self.cuda = device.type == "cuda"

    def sync(self):
        if self.cuda:
            torch.cuda.synchronize(self.device)

    def wall(self, fn: Callable[[], object]) -> float:
        """Host wall time of fn in ms, device synchronized before and after (first calls, setup)."""
        self.sync()
        t0 = time.perf_counter()
        fn()
        self.sync()
        return (time.perf_counter() - t0) * 1e3

    def events(self, fn: Callable[[], object]) -> float:
        """Device time of fn in ms (CUDA events around it on the current stream)."""
        if not self.cuda:
            t0 = time.perf_counter()
            fn()
            return (time.perf_counter() - t0) * 1e3
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize(self.device)
        return start.elapsed_time(end)

    def marks(self) -> "Marks":
        return Marks(self)


class Marks:
    """Named time stamps inside one run (events on a GPU: no sync until ``read``)."""

    def __init__(self, clock: Clock):
        self.clock, self.names, self.stamps = clock, [], []

    def mark(self, name: str):
        if self.clock.cuda:
            e = torch.cuda.Event(enable_timing=True)
            e.record()
            self.stamps.append(e)
        else:
            self.stamps.append(time.perf_counter())
        self.names.append(name)

    def read(self) -> Dict[str, float]:
        """name -> ms since the first mark."""
        self.clock.sync()
        if self.clock.cuda:
            return {n: self.stamps[0].elapsed_time(e) for n, e in zip(self.names, self.stamps)}
        return {n: (t - self.stamps[0]) * 1e3 for n, t in zip(self.names, self.stamps)}


def stats(ms: List[float]) -> Dict[str, float]:
    s = sorted(ms)
    p90 = s[min(len(s) - 1, math.ceil(0.9 * len(s)) - 1)]
    return {"median_ms": statistics.median(s), "p90_ms": p90, "mean_ms": statistics.fmean(s), "min_ms": s[0],
            "max_ms": s[-1], "iters": len(s)}


class Budget:
    def __init__(self, seconds: Optional[float]):
        self.t0, self.seconds = time.perf_counter(), seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def exceeded(self) -> bool:
        return self.seconds is not None and self.elapsed() > self.seconds


MAX_CASE_S = [60.0]  # set from --max-case-s: a timed loop stops after this much (min_iters done)


def timed_loop(clock: Clock, fn, iters: int, budget: Budget, min_iters: int = 3) -> List[float]:
    out = []
    for i in range(iters):
        if i >= min_iters and (budget.exceeded() or sum(out) > MAX_CASE_S[0] * 1e3):
            break
        out.append(clock.events(fn))
    return out


def warm(fn, n: int, first_ms: float):
    """n warm-up calls, fewer when the first call shows they would take over a quarter of the case cap."""
    for i in range(n):
        if i >= 1 and (i + 1) * first_ms > MAX_CASE_S[0] * 250:
            break
        fn(i)


def gib(nbytes: float) -> float:
    return round(nbytes / 2 ** 30, 3)


def reset_peak(clock: Clock):
    if clock.cuda:
        torch.cuda.synchronize(clock.device)
        torch.cuda.reset_peak_memory_stats(clock.device)


def peak(clock: Clock) -> Optional[float]:
    return gib(torch.cuda.max_memory_allocated(clock.device)) if clock.cuda else None


def free_memory(clock: Clock):
    gc.collect()
    if clock.cuda:
        torch.cuda.synchronize(clock.device)
        torch.cuda.empty_cache()


# ---- instrumented session ----------------------------------------------------------------------
class TimedGraphs:
    """Wraps a session's ``run_graph`` (the one place its graphs run): a mark before and after each."""

    def __init__(self, session):
        self.session, self.inner, self.marks_ = session, session.run_graph, None

    def __call__(self, graph):
        self.marks_.mark(f"{graph}:begin")
        self.inner(graph)
        self.marks_.mark(f"{graph}:end")


def phase_breakdown(stamps: Dict[str, float], K: int) -> Dict[str, object]:
    d = lambda a, b: stamps[b] - stamps[a]  # noqa: E731
    per_scale = [d(f"step_{si}:begin", f"transition_{si}:end") for si in range(K)]
    step = [d(f"step_{si}:begin", f"step_{si}:end") for si in range(K)]
    trans = [d(f"transition_{si}:begin", f"transition_{si}:end") for si in range(K)]
    return {"condition_ms": d("condition:begin", "condition:end"), "per_scale_ms": per_scale, "step_ms": step,
            "transition_ms": trans, "sampling_ms": [p - s - t for p, s, t in zip(per_scale, step, trans)],
            "decoder_ms": d("decode:begin", "decode:end"),
            "instrumented_total_ms": d("condition:begin", "decode:end")}


def median_breakdown(runs: List[Dict[str, object]]) -> Dict[str, object]:
    out = {}
    for k, v in runs[0].items():
        if isinstance(v, list):
            out[k] = [round(statistics.median(r[k][i] for r in runs), 4) for i in range(len(v))]
        else:
            out[k] = round(statistics.median(r[k] for r in runs), 4)
    return out


def instrumented_backend(pipe, B: int, params, labels, seeds, clock: Clock, runs: int) -> Dict[str, object]:
    """Eager runs of the pipeline's own ScaleLoop for batch B (its buffers and its engine, whatever the
    backend) with its session's graphs bracketed by events."""
    loop, _ = pipe._loop(B)  # built and warmed by the timed calls
    timed = TimedGraphs(loop.session)
    loop.session.run_graph = timed  # an instance attribute: this session only
    out = []
    try:
        loop.set_request(labels, seeds, params)
        for _ in range(runs):
            timed.marks_ = clock.marks()
            loop.run(params)
            out.append(phase_breakdown(timed.marks_.read(), pipe.cfg.num_scales))
    finally:
        del loop.session.run_graph
    return median_breakdown(out)


def instrumented_official(off: OfficialStyle, labels, clock: Clock, runs: int, sp: dict) -> Dict[str, object]:
    K = off.cfg.num_scales
    out = []
    for r in range(runs):  # already warm: runs after the timed calls
        m = clock.marks()
        off.generate(labels, seed=r, mark=m.mark, **sp)
        st = m.read()
        prev = ["start"] + [f"scale_{si}" for si in range(K)]
        per = [st[f"scale_{si}"] - st[prev[si]] for si in range(K)]
        out.append({"per_scale_ms": per, "decoder_ms": st["decode"] - st[f"scale_{K - 1}"],
                    "instrumented_total_ms": st["decode"]})
    return median_breakdown(out)


# ---- cases -------------------------------------------------------------------------------------
def labels_for(B: int, num_classes: int) -> torch.Tensor:
    return torch.tensor([(i * 97) % num_classes for i in range(B)], dtype=torch.int64)


def new_case(kind: str, model: str, backend: str, batch: int, **kw) -> Dict[str, object]:
    c = {"kind": kind, "model": model, "backend": backend, "batch": batch, "status": "not_run", "reason": None}
    c.update(kw)
    return c


def finish_case(c: Dict[str, object], ms: List[float], batch: int):
    c.update({k: round(v, 4) if isinstance(v, float) else v for k, v in stats(ms).items()})
    c["img_per_s"] = round(batch / (c["median_ms"] / 1e3), 3)
    c["status"] = "ok"


def measure(c: Dict[str, object], clock: Clock, budget: Budget, call, batch: int, warmup: int, iters: int,
            min_iters: int = 3) -> None:
    """Into case c: the first call of call(seed) (reported apart), warm-up calls, then the timed calls,
    with the peak memory of the first call and of the timed ones."""
    reset_peak(clock)
    c["first_call_ms"] = round(clock.wall(lambda: call(0)), 3)
    c["peak_mem_first_gib"] = peak(clock)
    warm(lambda i: call(1 + i), warmup, c["first_call_ms"])
    reset_peak(clock)
    finish_case(c, timed_loop(clock, lambda: call(batch), iters, budget, min_iters), batch)
    c["peak_mem_gib"] = peak(clock)


def run_cases(cases: List[dict], args, clock: Clock, budget: Budget, save, setup, body,
              setup_failure: str = "error") -> None:
    """One pipeline or baseline set up once, then each of its cases in turn. ``setup()`` returns (the thing,
    fields recorded in every case); ``body(thing, c)`` measures case c. A failed setup gives every case the
    status ``setup_failure`` with the reason, a failed case marks only itself; the results file is written
    after each case."""
    if budget.exceeded():
        for c in cases:
            c["reason"] = "time budget exceeded before this case"
        save()
        return
    try:
        free_memory(clock)
        reset_peak(clock)
        thing, common = setup()
    except Exception as e:  # a backend or baseline that cannot start here: every case says why
        for c in cases:
            c.update(status=setup_failure, reason=f"{type(e).__name__}: {e}".strip()[:500])
        save()
        return
    for c in cases:
        c.update(common)
        if budget.exceeded():
            c["reason"] = "time budget exceeded before this case"
            continue
        try:
            body(thing, c)
        except Exception as e:
            record_failure(c, e, args.verbose)
        log_case(c)
        save()
        free_memory(clock)
    thing = None
    free_memory(clock)


def timed_setup(clock: Clock, make) -> tuple:
    """(make(), its wall time in ms)."""
    holder = {}
    ms = clock.wall(lambda: holder.update(x=make()))
    return holder["x"], ms


def run_backend_model(args, mc, cpu_models, backend: str, clock: Clock, budget: Budget, results, save):
    """All batch sizes of one backend on one model (one pipeline, reused across batch sizes)."""
    from var_rt import pipeline as pl
    from var_rt.validation import Sampling
    cases = [new_case("backend", mc.name, backend, B) for B in args.batch_sizes]
    results["cases"].extend(cases)
    avail = getattr(pl, "BACKENDS", ())
    if backend not in avail:
        for c in cases:
            c.update(status="skipped", reason=f"backend {backend!r} is not in this var_rt build "
                                              f"(var_rt.pipeline.BACKENDS = {tuple(avail)})")
        save()
        return

    def setup():
        var, vae = copy.deepcopy(cpu_models[0]), copy.deepcopy(cpu_models[1])
        extra = dict(args.backend_arg)
        pipe, ms = timed_setup(clock, lambda: pl.VARPipeline(mc, var, vae, clock.device, DTYPES[args.dtype],
                                                            backend=backend, progress=False, **extra))
        del var, vae
        weights_gib = gib(torch.cuda.memory_allocated(clock.device)) if clock.cuda else None
        return pipe, dict(setup_s=round(ms / 1e3, 3), model_load_s=cpu_models[2], weights_gib=weights_gib)

    sp = dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p)
    params = Sampling(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p)

    def body(pipe, c):
        B = c["batch"]
        labels = labels_for(B, mc.var.num_classes).tolist()
        measure(c, clock, budget, lambda seed: pipe.generate(class_labels=labels, seed=seed, batch_size=B,
                                                              progress=False, **sp), B, args.warmup, args.iters)
        # The device loop alone (no request copies, images stay on the device): private API, optional.
        try:
            loop, runner = pipe._loop(B)
            lms = timed_loop(clock, lambda: runner.run(params), args.iters, budget)
            c["loop_median_ms"] = round(statistics.median(lms), 4)
        except Exception as e:
            c["loop_note"] = f"device-loop timing unavailable: {type(e).__name__}: {e}"[:300]
        if args.instrument_runs > 0 and not budget.exceeded():
            try:
                c.update(instrumented_backend(pipe, B, params, torch.tensor(labels),
                                              torch.arange(B, dtype=torch.int64), clock, args.instrument_runs))
            except Exception as e:
                c["instrument_note"] = f"instrumented run failed: {type(e).__name__}: {e}"[:300]

    run_cases(cases, args, clock, budget, save, setup, body, setup_failure="skipped")  # e.g. not installed here


def record_failure(c: dict, e: Exception, verbose: bool) -> None:
    """Mark a case as failed with a short reason (out of GPU memory said plainly)."""
    if isinstance(e, torch.cuda.OutOfMemoryError):
        c.update(status="error", reason=f"out of GPU memory: {str(e)[:200]}")
    else:
        c.update(status="error", reason=f"{type(e).__name__}: {e}"[:500])
        if verbose:
            traceback.print_exc()


def run_official_model(args, mc, cpu_models, clock: Clock, budget: Budget, results, save):
    cases = [new_case("official_style", mc.name, "official-style", B) for B in args.batch_sizes]
    results["cases"].extend(cases)
    ac = autocast_dtype(args.dtype)
    sp = dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p)

    def setup():
        var, vae = copy.deepcopy(cpu_models[0]), copy.deepcopy(cpu_models[1])
        off, ms = timed_setup(clock, lambda: OfficialStyle(var, vae, clock.device, ac))
        return off, dict(setup_s=round(ms / 1e3, 3), model_load_s=cpu_models[2],
                         autocast=str(ac) if ac is not None else "off (float32)")

    def body(off, c):
        B = c["batch"]
        labels = labels_for(B, mc.var.num_classes)
        measure(c, clock, budget, lambda seed: off.generate(labels, seed=seed, **sp), B, args.warmup, args.iters)
        if args.instrument_runs > 0 and not budget.exceeded():
            c.update(instrumented_official(off, labels, clock, args.instrument_runs, sp))

    run_cases(cases, args, clock, budget, save, setup, body)


def run_official_code_model(args, mc, cpu_models, clock: Clock, budget: Budget, results, save):
    """The official code on this model's weights, every batch size (skipped, with the reason, where it
    cannot run: no checkout given, a package it needs missing, a config it cannot express)."""
    cases = [new_case("official_code", mc.name, "official-code", B) for B in args.batch_sizes]
    results["cases"].extend(cases)
    ac = autocast_dtype(args.dtype)
    sp = dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p)

    def setup():
        src = official_code.source_dir(args.official_src)
        off, ms = timed_setup(clock, lambda: official_code.OfficialCode(
            src, mc, cpu_models[0].state_dict(), cpu_models[1].state_dict(), clock.device, ac))
        results["meta"]["official_code"] = {"source": repo_relative(src),
                                            "sha256_16": official_code.fingerprint(src)}
        return off, dict(setup_s=round(ms / 1e3, 3), model_load_s=cpu_models[2],
                         autocast=str(ac) if ac is not None else "off (float32)")

    def body(off, c):
        labels = labels_for(c["batch"], mc.var.num_classes)
        measure(c, clock, budget, lambda seed: off.generate(labels, seed=seed, **sp), c["batch"], args.warmup,
                args.iters)

    run_cases(cases, args, clock, budget, save, setup, body, setup_failure="skipped")


def run_dit(args, clock: Clock, budget: Budget, results, save):
    cases = [new_case("dit", "DiT-XL/2" + (" (tiny)" if args.dit_tiny else ""), f"diffusers-ddim{steps}", B,
                      steps=steps)
             for steps in args.dit_steps for B in args.dit_batch_sizes]
    results["cases"].extend(cases)
    ok, why = dit_mod.available()
    if not ok:
        for c in cases:
            c.update(status="skipped", reason=why)
        save()
        return
    results["meta"]["diffusers"] = why
    dt = DTYPES[args.dtype]

    def setup():
        pipe, ms = timed_setup(clock, lambda: dit_mod.build_pipeline(clock.device, dt, tiny=args.dit_tiny))
        return pipe, dict(setup_s=round(ms / 1e3, 3), dtype=str(dt), guidance=1.5,
                          dit_params=dit_mod.param_count(pipe))

    def body(pipe, c):
        labels = labels_for(c["batch"], 1000).tolist()
        measure(c, clock, budget, lambda seed: dit_mod.generate(pipe, labels, c["steps"], 1.5, seed), c["batch"],
                args.dit_warmup, args.dit_iters, min_iters=1)

    run_cases(cases, args, clock, budget, save, setup, body)


def log_case(c):
    if c["status"] == "ok":
        print(f"[bench] {c['model']:>10} {c['backend']:>16} B={c['batch']:<3} median {c['median_ms']:10.2f} ms  "
              f"p90 {c['p90_ms']:10.2f} ms  {c['img_per_s']:9.2f} img/s  first {c.get('first_call_ms', 0):10.1f} ms",
              flush=True)
    else:
        print(f"[bench] {c['model']:>10} {c['backend']:>16} B={c['batch']:<3} {c['status']}: {c['reason']}", flush=True)


# ---- ratios ------------------------------------------------------------------------------------
def load_reference() -> dict:
    try:
        return json.loads(REF_PATH.read_text())
    except Exception:
        return {}


def same_kind_as_reference(results: dict) -> bool:
    """Reference numbers were measured on an H100: ratios against them only make sense on one."""
    return "H100" in results["meta"]["device"]


def add_ratios(results: dict) -> None:
    """Speed-ups of every ok backend case: latency ratio at the same batch, throughput ratio vs DiT."""
    ref = results.get("reference", {}) if same_kind_as_reference(results) else {}
    ok = [c for c in results["cases"] if c["status"] == "ok"]
    official = {(c["model"], c["batch"]): c for c in ok if c["kind"] == "official_style"}
    code = {(c["model"], c["batch"]): c for c in ok if c["kind"] == "official_code"}
    dit = {}
    for c in ok:
        if c["kind"] == "dit":
            dit.setdefault(c["steps"], {})[c["batch"]] = ("this run", c["img_per_s"])
    for steps, per in ref.get("dit_xl2", {}).get("s_per_batch", {}).items():
        for b, s in per.items():
            dit.setdefault(int(steps), {}).setdefault(int(b), ("reference 2026-11-22", int(b) / s))
    ref_off = ref.get("official", {}).get("s_per_batch", {})
    for c in ok:
        if c["kind"] == "dit":
            continue
        o = official.get((c["model"], c["batch"]))
        if c["kind"] == "backend" and o is not None:
            c["x_vs_official_style"] = round(o["median_ms"] / c["median_ms"], 3)
        oc = code.get((c["model"], c["batch"]))
        if c["kind"] in ("backend", "official_style") and oc is not None:
            c["x_vs_official_code"] = round(oc["median_ms"] / c["median_ms"], 3)
        r = ref_off.get(c["model"], {}).get(str(c["batch"]))
        if r is not None:
            c["x_vs_official_measured"] = round(r * 1e3 / c["median_ms"], 3)
        for steps in sorted(dit):
            per = dit[steps]
            b = c["batch"] if c["batch"] in per else (max(per) if per else None)
            if b is None:
                continue
            src, ips = per[b]
            c[f"x_vs_dit{steps}"] = round(c["img_per_s"] / ips, 3)
            c[f"x_vs_dit{steps}_basis"] = f"DiT B={b} ({src})"


# ---- outputs -----------------------------------------------------------------------------------
def fmt(v, nd=1):
    if v is None:
        return "–"
    if isinstance(v, float):
        return f"{v:.{nd}f}"
    return str(v)


def write_markdown(results: dict, path: Path) -> None:
    m = results["meta"]
    clock = m.get("clock") or timing_text(not m["device"].startswith("CPU"))["clock"]  # older results.json
    L = [f"# var-rt benchmark", "",
         f"- device: {m['device']}", f"- date: {m['date']}", f"- torch: {m['torch']}",
         f"- command: `{m['command']}`",
         f"- sampling: cfg {m['args']['cfg']}, top-k {m['args']['top_k']}, top-p {m['args']['top_p']}; "
         f"dtype {m['args']['dtype']}; weights: {m['weights']}",
         f"- steady state: median / p90 of {m['args']['iters']} timed calls after {m['args']['warmup']} warm-up "
         f"calls ({clock}); first call reported apart.", "",
         f"**official-code** is the official code itself (FoundationVision/VAR, `autoregressive_infer_cfg`, "
         f"{autocast_text(m['args']['dtype'])}, decode included) on the same weights in this run"
         + (f" (checkout `{m['official_code']['source']}`, files sha256 {m['official_code']['sha256_16']})"
            if m.get("official_code") else "") + "; "
         f"**official-style** is our re-implementation of the official algorithm (eager, "
         f"{autocast_text(m['args']['dtype'])}, KV cache by "
         "concatenation, AdaLN recomputed per scale, torch.multinomial sampling, decode included); the official "
         "code's numbers measured on an H100 are in the reference table below. `x official code` / "
         "`x official-style` / `x official (ref)`: baseline latency / our latency at the same batch; "
         "`x DiT-50/250`: our img/s / DiT's img/s (same batch when measured, else the basis named in "
         "results.json).", "",
         "| model | backend | batch | status | first call ms | median ms | p90 ms | img/s | loop ms | peak GiB "
         "| x official code | x official-style | x official (ref) | x DiT-50 | x DiT-250 |",
         "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for c in results["cases"]:
        status = c["status"] if c["status"] == "ok" else f"{c['status']}: {c.get('reason') or ''}"
        L.append(f"| {c['model']} | {c['backend']} | {c['batch']} | {status} | {fmt(c.get('first_call_ms'))} | "
                 f"{fmt(c.get('median_ms'), 2)} | {fmt(c.get('p90_ms'), 2)} | {fmt(c.get('img_per_s'), 2)} | "
                 f"{fmt(c.get('loop_median_ms'), 2)} | {fmt(c.get('peak_mem_gib'), 2)} | "
                 f"{fmt(c.get('x_vs_official_code'), 2)} | {fmt(c.get('x_vs_official_style'), 2)} | {fmt(c.get('x_vs_official_measured'), 2)} | "
                 f"{fmt(c.get('x_vs_dit50'), 1)} | {fmt(c.get('x_vs_dit250'), 1)} |")
    inst = [c for c in results["cases"] if c.get("per_scale_ms")]
    if inst:
        K = max(len(c["per_scale_ms"]) for c in inst)
        L += ["", "## Where the time goes (instrumented eager run, ms; scale = step + sampling + transition)", "",
              "| model | backend | batch | " + " | ".join(f"s{k}" for k in range(K)) + " | decoder | total |",
              "|---|---|---|" + "---|" * (K + 2)]
        for c in inst:
            L.append(f"| {c['model']} | {c['backend']} | {c['batch']} | "
                     + " | ".join(fmt(v, 2) for v in c["per_scale_ms"])
                     + f" | {fmt(c.get('decoder_ms'), 2)} | {fmt(c.get('instrumented_total_ms'), 2)} |")
    setup = {}
    for c in results["cases"]:
        if c.get("setup_s") is not None:
            setup[(c["model"], c["backend"])] = (c.get("model_load_s"), c.get("setup_s"))
    if setup:
        L += ["", "## Load cost (s): model built on the host once per model; setup = to device + backend", "",
              "| model | backend | model load s | setup s |", "|---|---|---|---|"]
        L += [f"| {k[0]} | {k[1]} | {fmt(v[0], 2)} | {fmt(v[1], 2)} |" for k, v in setup.items()]
    ref = results.get("reference", {})
    if ref:
        # The recorded source names files of the machine it was measured on: keep their names, not its folders.
        source = re.sub(r"(?<!\S)/\S*/", "", str(ref.get("source", "")))
        L += ["", f"## Reference: measured on {ref.get('device')} ({ref.get('date')}, torch {ref.get('torch')})", "",
              f"Source: {repo_relative(REF_PATH)} (from {source}). "
              f"Official code: {ref.get('official', {}).get('what', '')}", "",
              "| what | batch 1 ms | batch 16 ms | batch 64 ms |", "|---|---|---|---|"]
        for name, per in ref.get("official", {}).get("s_per_batch", {}).items():
            L.append(f"| VAR-{name} official | " + " | ".join(fmt(per[b] * 1e3 if b in per else None)
                                                            for b in ("1", "16", "64")) + " |")
        for steps, per in ref.get("dit_xl2", {}).get("s_per_batch", {}).items():
            L.append(f"| DiT-XL/2 {steps} steps | " + " | ".join(fmt(per[b] * 1e3 if b in per else None)
                                                               for b in ("1", "16", "64")) + " |")
        for name, per in ref.get("static_probe", {}).get("graph_ms", {}).items():
            L.append(f"| {name} static-KV probe, one CUDA graph | " + " | ".join(fmt(per.get(b)) for b in ("1", "16", "64")) + " |")
    fl = results.get("floors")
    if fl:
        L += ["", "## Floors (benchmarks/floors.py: H100 3.0 TB/s, 790 TFLOP/s)", "",
              "| model | batch | floor ms | floor img/s | transformer ms | decoder ms |", "|---|---|---|---|---|---|"]
        for name, per in fl.items():
            for b, f in per.items():
                L.append(f"| {name} | {b} | {f['total_s'] * 1e3:.2f} | {f['img_per_s']:.0f} | "
                         f"{f['transformer_s'] * 1e3:.2f} | {f['decoder_s'] * 1e3:.2f} |")
    if results.get("notes"):
        L += ["", "## Notes", ""] + [f"- {n}" for n in results["notes"]]
    path.write_text("\n".join(L) + "\n")


def write_plot(results: dict, path: Path) -> Optional[str]:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception as e:
        return (f"plot.png skipped: matplotlib is not importable ({type(e).__name__}); "
                f"pip install -e '.[bench]' adds it")
    series = {}
    for c in results["cases"]:
        if c["status"] == "ok":
            series.setdefault(f"{c['model']} {c['backend']}", []).append((c["batch"], c["img_per_s"]))
    if not series:
        return "plot skipped: no successful case"
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=90)
    for name, pts in sorted(series.items()):
        pts.sort()
        ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_yscale("log")
    ax.set_xlabel("batch size")
    ax.set_ylabel("images / s")
    ax.set_title(f"var-rt: {results['meta']['device']}", fontsize=9)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return None


# ---- main --------------------------------------------------------------------------------------
def parse_args(argv=None):
    from var_rt.sampling import DEFAULTS
    p = argparse.ArgumentParser(prog="python -m benchmarks.bench", description=__doc__.split("\n")[0])
    p.add_argument("--model", nargs="+", choices=PRESET_NAMES, help="presets (several allowed)")
    p.add_argument("--config", nargs="+", help="model JSON config(s) instead of presets")
    p.add_argument("--batch-sizes", nargs="+", type=int, default=[1, 16, 64])
    p.add_argument("--backends", nargs="+", default=["torch", "cudagraph"],
                   help=f"any of {', '.join(ALL_BACKENDS)} (comma or space separated)")
    p.add_argument("--baselines", default="official",
                   help="comma list of: official (official-style, our re-implementation), official-code (the "
                        "official code itself, needs --official-src), dit, none")
    p.add_argument("--official-src", default=None,
                   help=f"a checkout of {official_code.REPO_URL} for the official-code baseline "
                        f"(default: ${official_code.ENV})")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16", choices=["float16", "float32", "bfloat16"])
    p.add_argument("--random-weights", action="store_true", default=None,
                   help="random weights (the default when no checkpoint is given)")
    p.add_argument("--var-ckpt")
    p.add_argument("--vae-ckpt")
    p.add_argument("--cfg", type=float, default=DEFAULTS.cfg)
    p.add_argument("--top-k", type=int, default=DEFAULTS.top_k)
    p.add_argument("--top-p", type=float, default=DEFAULTS.top_p)
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--max-case-s", type=float, default=60.0,
                   help="a timed loop stops after this many seconds (at least 3 calls): bounds slow cases")
    p.add_argument("--instrument-runs", type=int, default=2, help="instrumented eager runs per case (0: none)")
    p.add_argument("--dit-steps", nargs="+", type=int, default=[50, 250])
    p.add_argument("--dit-batch-sizes", nargs="+", type=int, default=[1, 16])
    p.add_argument("--dit-iters", type=int, default=3)
    p.add_argument("--dit-warmup", type=int, default=0, help="extra DiT warm-up calls after the first call")
    p.add_argument("--dit-tiny", action="store_true", help=argparse.SUPPRESS)  # tests: a tiny DiT on the CPU
    p.add_argument("--backend-arg", nargs="*", default=[], metavar="KEY=VALUE",
                   help="extra keyword arguments for VARPipeline(...) of the exported backends (e.g. engine_dir=...)")
    p.add_argument("--out-dir", required=True)
    p.add_argument("--time-budget-s", type=float, default=None,
                   help="start no new case after this many seconds; the rest are reported as not run")
    p.add_argument("--seed", type=int, default=0, help="weight seed for --random-weights")
    p.add_argument("--verbose", action="store_true")
    a = p.parse_args(argv)
    if (a.model is None) == (a.config is None):
        p.error("give --model PRESET... or --config JSON... (one of them)")
    a.backends = [b for x in a.backends for b in x.split(",") if b]
    bad = [b for b in a.backends if b not in ALL_BACKENDS]
    if bad:
        p.error(f"unknown backend(s) {bad}: use {', '.join(ALL_BACKENDS)}")
    a.baselines = [b for b in a.baselines.split(",") if b and b != "none"]
    bad = [b for b in a.baselines if b not in BASELINES]
    if bad:
        p.error(f"unknown baseline(s) {bad}: use {', '.join(BASELINES)} or none")
    if (a.var_ckpt or a.vae_ckpt) and a.random_weights:
        p.error("--random-weights cannot be combined with --var-ckpt/--vae-ckpt")
    n_models = len(a.model or a.config)
    if a.var_ckpt and n_models != 1:
        p.error("--var-ckpt needs exactly one model")
    a.random_weights = not a.var_ckpt
    if any("=" not in kv for kv in a.backend_arg):
        p.error("--backend-arg takes KEY=VALUE items")
    from var_rt.pipeline import VARPipeline
    known = [k for k in inspect.signature(VARPipeline.__init__).parameters
             if k not in ("self", "cfg", "var", "vae", "device", "dtype", "backend", "progress")]
    a.backend_arg = [(k, backend_arg_value(v)) for k, v in (kv.split("=", 1) for kv in a.backend_arg)]
    bad = [k for k, _ in a.backend_arg if k not in known]
    if bad:
        p.error(f"--backend-arg {', '.join(bad)}: VARPipeline takes {', '.join(known)}")
    return a


def backend_arg_value(text: str):
    """true/false/none, integers and floats as such, a JSON object (``{"cuda_graph": true}``) as a dict;
    anything else (paths) as text."""
    if text.startswith("{"):
        return json.loads(text)
    low = text.lower()
    if low in ("true", "false", "none"):
        return {"true": True, "false": False, "none": None}[low]
    for kind in (int, float):
        try:
            return kind(text)
        except ValueError:
            pass
    return text


def device_name(dev: torch.device) -> str:
    if dev.type == "cuda":
        return f"{torch.cuda.get_device_name(dev)} (CUDA {torch.version.cuda})"
    return f"CPU {platform.processor() or platform.machine()} ({os.cpu_count()} cores, {torch.get_num_threads()} threads)"


def build_cpu_models(args, model: Optional[str], config: Optional[str]):
    """(var, vae, seconds) on the host: random weights or the checkpoints."""
    from var_rt.checkpoint import load_vae_checkpoint, load_var_checkpoint
    from var_rt.models.var import VAR
    from var_rt.models.vqvae import VQVAE
    from var_rt.pipeline import init_random_weights, resolve_config
    t0 = time.perf_counter()
    mc = resolve_config(model, config)
    with torch.device("cpu"):
        var, vae = VAR(mc), VQVAE(mc.vae)
    if args.random_weights:
        init_random_weights(var, vae, args.seed)
    else:
        load_var_checkpoint(var, args.var_ckpt)
        load_vae_checkpoint(vae, args.vae_ckpt or mc.vae_checkpoint)
    return mc, (var, vae, round(time.perf_counter() - t0, 3))


def render(json_path: str, out_dir: str) -> None:
    """Re-make results.md and plot.png from a results.json (e.g. here, where matplotlib is installed)."""
    results = json.loads(Path(json_path).read_text())
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    add_ratios(results)
    note = write_plot(results, out / "plot.png")
    if note:
        print(note)
    write_markdown(results, out / "results.md")


def main(argv=None) -> dict:
    argv_chk = sys.argv[1:] if argv is None else list(argv)
    if argv_chk[:1] == ["--render"]:  # python -m benchmarks.bench --render results.json OUT_DIR
        render(argv_chk[1], argv_chk[2] if len(argv_chk) > 2 else str(Path(argv_chk[1]).parent))
        return {}
    args = parse_args(argv)
    MAX_CASE_S[0] = args.max_case_s
    budget = Budget(args.time_budget_s)
    from var_rt.pipeline import resolve_device
    dev = resolve_device(args.device)
    clock = Clock(dev)
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    argv_list = sys.argv[1:] if argv is None else list(argv)
    shown = [repo_relative(a) if os.path.exists(a) else a for a in argv_list]  # paths in the checkout: relative
    results = {
        "meta": {"device": device_name(dev), "torch": torch.__version__, "python": platform.python_version(),
                 "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                 "command": "python -m benchmarks.bench " + " ".join(shlex.quote(a) for a in shown),
                 "argv": argv_list, "args": {k: v for k, v in vars(args).items()},
                 "weights": "random (--random-weights)" if args.random_weights else
                            f"{repo_relative(args.var_ckpt)}, {repo_relative(args.vae_ckpt)}",
                 **timing_text(clock.cuda)},
        "reference": load_reference(), "cases": [], "floors": {}, "notes": [],
    }
    results["notes"].append("official-style = our re-implementation of the official VAR algorithm "
                            "(benchmarks/official_style.py), not the official code; the official code's measured "
                            "numbers are the 'reference' entries (benchmarks/reference_baselines.json).")
    if not same_kind_as_reference(results):
        results["notes"].append("this device is not the reference's (an H100): no ratios against the reference "
                                "numbers; ratios vs DiT only where DiT ran in this run.")
    results["notes"].append("per-scale / decoder ms come from an instrumented eager run of the same engine (events "
                            "around every engine.run call; no CUDA graph), so they include launch gaps that a graph "
                            "removes.")

    def save():
        add_ratios(results)
        (out / "results.json").write_text(json.dumps(results, indent=1, default=str))

    models = [(m, None) for m in args.model] if args.model else [(None, c) for c in args.config]
    for model, config in models:
        if budget.exceeded():
            name = model or Path(config).stem
            kinds = {"official-code": "official_code", "official-style": "official_style"}
            names = ((["official-code"] if "official-code" in args.baselines else [])
                     + (["official-style"] if "official" in args.baselines else []) + args.backends)
            for b in names:
                for B in args.batch_sizes:
                    results["cases"].append(new_case(kinds.get(b, "backend"), name, b, B,
                                                     reason="time budget exceeded before this case"))
            save()
            continue
        mc, cpu_models = build_cpu_models(args, model, config)
        sh = floors_mod.shape_from_config(mc)
        results["floors"][mc.name] = {B: {k: v for k, v in floors_mod.floors(sh, B).items() if k != "per_scale"}
                                      for B in args.batch_sizes}
        if "official-code" in args.baselines:
            run_official_code_model(args, mc, cpu_models, clock, budget, results, save)
        if "official" in args.baselines:
            run_official_model(args, mc, cpu_models, clock, budget, results, save)
        for backend in args.backends:
            run_backend_model(args, mc, cpu_models, backend, clock, budget, results, save)
        del cpu_models
        gc.collect()
    if "dit" in args.baselines:
        run_dit(args, clock, budget, results, save)
    results["meta"]["elapsed_s"] = round(budget.elapsed(), 1)
    note = write_plot(results, out / "plot.png")
    if note:
        results["notes"].append(note)
        print(note)
    save()
    write_markdown(results, out / "results.md")
    print_summary(results)
    return results


def print_summary(results: dict) -> None:
    print(f"\n# {results['meta']['device']}  torch {results['meta']['torch']}  ({results['meta']['elapsed_s']} s)")
    print(f"{'model':>10} {'backend':>16} {'B':>3} {'median ms':>10} {'p90 ms':>9} {'img/s':>8} {'peak GiB':>8} "
          f"{'x off-code':>10} {'x off-st':>8} {'x off-ref':>9} {'x DiT50':>8} {'x DiT250':>8}")
    for c in results["cases"]:
        if c["status"] != "ok":
            print(f"{c['model']:>10} {c['backend']:>16} {c['batch']:>3} {c['status']}: {(c.get('reason') or '')[:90]}")
            continue
        print(f"{c['model']:>10} {c['backend']:>16} {c['batch']:>3} {c['median_ms']:10.2f} {c['p90_ms']:9.2f} "
              f"{c['img_per_s']:8.2f} {fmt(c.get('peak_mem_gib'), 2):>8} {fmt(c.get('x_vs_official_code'), 2):>10} "
              f"{fmt(c.get('x_vs_official_style'), 2):>8} "
              f"{fmt(c.get('x_vs_official_measured'), 2):>9} {fmt(c.get('x_vs_dit50'), 1):>8} "
              f"{fmt(c.get('x_vs_dit250'), 1):>8}")


if __name__ == "__main__":
    main()
