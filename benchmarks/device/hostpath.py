"""Where ScaleLoop.output's host time goes (session 15): d16 and d30 at batch 1 and 64 in one process.

    python benchmarks/device/hostpath.py cudagraph     # writes $OUT/hostpath.json

Per case, after one generation: ``whole_ms`` (``loop.output`` to the host), its parts done by hand (``alloc_ms``:
the page-locked result tensors, ``enqueue_ms``: the copies, ``sync_ms``: the wait), the same copies into buffers
allocated once, and ``generate_ms`` (host wall time, 20 calls). Medians, the first 10 of 60 discarded. Run as is
on the H200 (results/h200-2026-12-04g/hostpath/).
"""
import statistics, time, json, os, sys
import torch
from var_rt import pipeline as pl
from var_rt.config import get_preset
from var_rt.models.var import VAR
from var_rt.models.vqvae import VQVAE

res = {}
for M in ("d16", "d30"):
    cfg = get_preset(M)
    with torch.device("cpu"):
        var, vae = VAR(cfg), VQVAE(cfg.vae)
    pl.init_random_weights(var, vae, 0)
    pipe = pl.VARPipeline(cfg, var, vae, torch.device("cuda"), torch.float16, backend=sys.argv[1], progress=False)
    for B in (1, 64):
        pipe.generate(class_labels=[1] * B, seed=0, batch_size=B, progress=False)
        loop, runner = pipe._loop(B)
        srcs = (loop.image, loop.tokens_BL, loop.sampled_BL)
        r = {"image": [str(loop.image.dtype), tuple(loop.image.shape)]}
        parts = {"whole": [], "alloc": [], "enqueue": [], "sync": []}
        for i in range(60):
            torch.cuda.synchronize()
            t = time.perf_counter(); loop.output(rows=B, device="cpu"); parts["whole"].append(time.perf_counter() - t)
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            outs = [torch.empty((B,) + tuple(s.shape[1:]), dtype=s.dtype, pin_memory=True) for s in srcs]
            t1 = time.perf_counter()
            for h, s in zip(outs, srcs):
                h.copy_(s[:B], non_blocking=True)
            t2 = time.perf_counter()
            torch.cuda.current_stream().synchronize()
            t3 = time.perf_counter()
            parts["alloc"].append(t1 - t0); parts["enqueue"].append(t2 - t1); parts["sync"].append(t3 - t2)
        for k, v in parts.items():
            r[k + "_ms"] = round(statistics.median(v[10:]) * 1e3, 4)
        # the same copies into buffers allocated once
        keep = [torch.empty((B,) + tuple(s.shape[1:]), dtype=s.dtype, pin_memory=True) for s in srcs]
        w = []
        for i in range(60):
            torch.cuda.synchronize(); t = time.perf_counter()
            for h, s in zip(keep, srcs):
                h.copy_(s[:B], non_blocking=True)
            torch.cuda.current_stream().synchronize(); w.append(time.perf_counter() - t)
        r["copies_into_kept_buffers_ms"] = round(statistics.median(w[10:]) * 1e3, 4)
        # generate minus its parts: python request path
        g = []
        for i in range(20):
            torch.cuda.synchronize(); t = time.perf_counter()
            pipe.generate(class_labels=[1] * B, seed=0, batch_size=B, progress=False)
            g.append(time.perf_counter() - t)
        r["generate_ms"] = round(statistics.median(g) * 1e3, 3)
        res[f"{M}-B{B}"] = r
        print(M, B, r, flush=True)
    del pipe, var, vae, loop, runner
    torch.cuda.empty_cache()
json.dump(res, open(os.environ.get("OUT", "out") + "/hostpath.json", "w"), indent=1)
