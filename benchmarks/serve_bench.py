"""Served throughput: Ray Serve under concurrent HTTP clients against direct batched pipeline calls.

    python -m benchmarks.serve_bench --model d16 --random-weights --backend cudagraph --dtype float16 \
        --max-batch-size 16 --clients 64 --images 512 --out-dir out/serve

Both measurements are taken in one run on the same GPU(s), one after the other:
- ``direct``: ``VARPipeline.generate`` called back to back with full batches of ``--max-batch-size``
  images (what a batch job gets; images returned to the host as arrays, no PNG encoding);
  ``--images`` images in all after one warm-up call.
- ``served``: the ``var_rt.serve`` deployment (its Batcher forms a batch when the pipeline is free) with
  each of ``--num-replicas`` replica counts in turn (one GPU each when the device is CUDA) behind Ray
  Serve's HTTP proxy; ``--clients`` threads each POST one-image requests (``format: png``) back to back until ``--images`` requests have been answered. Reported: images/s
  over the wall time of all requests, per-request latency median / p90, and every non-200 answer
  (a 503 is retried after its Retry-After, at most 1 s, and counted), the number of replicas that answered, and the batches
  the images ran in (each answer's ``X-Batch-Images`` header) with the mean batch size.
Writes ``serve.json`` and ``serve.md`` into ``--out-dir``.
"""
from __future__ import annotations

import argparse
import datetime
import gc
import json
import shlex
import socket
import statistics
import sys
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sync(pipe) -> None:
    import torch
    if pipe.device.type == "cuda":
        torch.cuda.synchronize(pipe.device)


def run_direct(load_kwargs: dict, args) -> dict:
    """Full batches of max_batch_size through VARPipeline.generate, back to back."""
    from var_rt.pipeline import VARPipeline
    pipe = VARPipeline.load(**load_kwargs, progress=False)
    bs = args.max_batch_size
    n_calls = max(1, args.images // bs)
    kw = dict(cfg=args.cfg, top_k=args.top_k, top_p=args.top_p, batch_size=bs, progress=False)
    labels = [i % pipe.cfg.var.num_classes for i in range(bs)]
    pipe.generate(class_labels=labels, seed=list(range(bs)), **kw)  # warm-up (capture for cudagraph)
    _sync(pipe)
    times = []
    t_all = time.perf_counter()
    for c in range(n_calls):
        t0 = time.perf_counter()
        pipe.generate(class_labels=labels, seed=[c * bs + i for i in range(bs)], **kw).numpy()
        times.append(time.perf_counter() - t0)
    wall = time.perf_counter() - t_all
    del pipe
    gc.collect()
    try:
        import torch
        torch.cuda.empty_cache()
    except Exception:  # pragma: no cover - CPU torch
        pass
    return {"batch_size": bs, "calls": n_calls, "images": n_calls * bs, "wall_s": round(wall, 3),
            "images_per_s": round(n_calls * bs / wall, 2),
            "call_median_ms": round(1e3 * statistics.median(times), 2)}


CLIENT_TIMEOUT_S = 600.0


def _post(url: str, body: dict, timeout: float):
    req = urllib.request.Request(url, data=json.dumps(body).encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read(), r.headers
    except urllib.error.HTTPError as e:
        return e.code, e.read(), e.headers


def run_served(load_kwargs: dict, args, num_replicas: int) -> dict:
    import ray
    from ray import serve

    from var_rt.serve import build_app

    ray.init(include_dashboard=False, log_to_driver=False)
    port = _free_port()
    try:
        serve.start(http_options={"host": "127.0.0.1", "port": port})
        t0 = time.perf_counter()
        # The benchmark measures throughput, not the server's deadline: requests may wait as long as the client.
        app = build_app(load_kwargs, num_replicas=num_replicas, max_batch_size=args.max_batch_size,
                        batch_wait_timeout_s=args.batch_wait_s, request_timeout_s=CLIENT_TIMEOUT_S)
        serve.run(app, name="bench", route_prefix="/")  # returns when every replica is ready (warm-up done)
        start_s = time.perf_counter() - t0
        url = f"http://127.0.0.1:{port}/generate"

        with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=60) as r:
            n_classes = json.loads(r.read())["num_classes"]
        settings = {"cfg": args.cfg, "top_k": args.top_k, "top_p": args.top_p, "format": "png"}
        errors = []
        counter = iter(range(args.images))
        lock = threading.Lock()
        lat, codes, retries, replicas, batch_of = [], {}, [0], set(), []

        def client():
            while True:
                with lock:
                    i = next(counter, None)
                if i is None:
                    return
                body = {"class_label": i % n_classes, "seed": i, **settings}
                t = time.perf_counter()
                while True:
                    code, answer, headers = _post(url, body, timeout=CLIENT_TIMEOUT_S)
                    if code != 503:
                        break
                    with lock:
                        retries[0] += 1
                    # As a client should: wait what the server asks (Retry-After), at most a second here.
                    time.sleep(min(1.0, float(headers.get("Retry-After", 0.05) or 0.05)))
                with lock:
                    lat.append(time.perf_counter() - t)
                    codes[code] = codes.get(code, 0) + 1
                    if code == 200:
                        replicas.add(headers.get("X-Replica"))
                        batch_of.append(int(headers.get("X-Batch-Images", "0")))
                    if code != 200 and len(errors) < 3:
                        errors.append(f"{code}: {answer[:300].decode(errors='replace')}")

        # warm the HTTP path (proxy, router) with one request per client and the timed settings
        with ThreadPoolExecutor(args.clients) as ex:
            list(ex.map(lambda i: _post(url, {"class_label": 0, "seed": i, **settings}, 600), range(args.clients)))
        t_all = time.perf_counter()
        with ThreadPoolExecutor(args.clients) as ex:
            for f in [ex.submit(client) for _ in range(args.clients)]:
                f.result()
        wall = time.perf_counter() - t_all
    finally:
        serve.shutdown()
        ray.shutdown()
    lat.sort()
    ok = codes.get(200, 0)
    return {"replicas": num_replicas, "clients": args.clients, "requests": args.images,
            "status_codes": {str(k): v for k, v in sorted(codes.items())}, "retried_503": retries[0],
            "first_errors": errors, "replicas_answering": len(replicas),
            # each image's answer says how many images its batch had: n images in batches of b count n / b
            "batches": round(sum(1 / b for b in batch_of if b)),
            "mean_batch": round(len(batch_of) / sum(1 / b for b in batch_of if b), 2) if any(batch_of) else None,
            "wall_s": round(wall, 3), "images_per_s": round(ok / wall, 2), "startup_s": round(start_s, 1),
            "latency_median_ms": round(1e3 * statistics.median(lat), 1),
            "latency_p90_ms": round(1e3 * lat[int(0.9 * (len(lat) - 1))], 1)}


def parser() -> argparse.ArgumentParser:
    from var_rt.sampling import DEFAULTS
    p = argparse.ArgumentParser(prog="python -m benchmarks.serve_bench", description=__doc__.splitlines()[0])
    p.add_argument("--model", default="d16")
    p.add_argument("--config")
    p.add_argument("--random-weights", action="store_true")
    p.add_argument("--var-ckpt")
    p.add_argument("--vae-ckpt")
    p.add_argument("--backend", default="cudagraph")
    p.add_argument("--engine-dir")
    p.add_argument("--device", default="cuda")
    p.add_argument("--dtype", default="float16")
    p.add_argument("--max-batch-size", type=int, default=16)
    p.add_argument("--batch-wait-s", type=float, default=0.01)
    p.add_argument("--num-replicas", type=int, nargs="+", default=[1],
                   help="replica counts to measure one after the other, e.g. 1 2 (one GPU each on CUDA)")
    p.add_argument("--clients", type=int, default=64)
    p.add_argument("--images", type=int, default=512)
    p.add_argument("--cfg", type=float, default=DEFAULTS.cfg)
    p.add_argument("--top-k", type=int, default=DEFAULTS.top_k)
    p.add_argument("--top-p", type=float, default=DEFAULTS.top_p)
    p.add_argument("--no-compile", action="store_true", help="no block kernels or compiled decoder (faster start, slower calls)")
    p.add_argument("--skip-direct", action="store_true")
    p.add_argument("--out-dir", required=True)
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    load_kwargs = {k: v for k, v in dict(
        model=None if args.config else args.model, config=args.config, var_ckpt=args.var_ckpt,
        vae_ckpt=args.vae_ckpt, random_weights=args.random_weights or None, backend=args.backend,
        engine_dir=args.engine_dir, device=args.device, dtype=args.dtype,
        compile=False if args.no_compile else None).items() if v is not None}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    res = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "command": "python -m benchmarks.serve_bench " + shlex.join(argv if argv is not None else sys.argv[1:]),
           "load": load_kwargs}
    try:
        import torch
        if torch.cuda.is_available():
            res["device"] = f"{torch.cuda.get_device_name(0)} x{torch.cuda.device_count()}"
    except Exception:  # pragma: no cover
        pass
    if not args.skip_direct:
        print("direct batched calls ...", file=sys.stderr, flush=True)
        res["direct"] = run_direct(load_kwargs, args)
        print(json.dumps(res["direct"]), file=sys.stderr, flush=True)
        (out / "serve.json").write_text(json.dumps(res, indent=1))  # kept if the served part fails
    res["served"] = []
    for n in args.num_replicas:
        print(f"served ({n} replica(s), {args.clients} clients) ...", file=sys.stderr, flush=True)
        res["served"].append(run_served(load_kwargs, args, n))
        print(json.dumps(res["served"][-1]), file=sys.stderr, flush=True)
        (out / "serve.json").write_text(json.dumps(res, indent=1))
    d = res.get("direct")
    lines = [f"# served vs direct ({res.get('device', 'cpu')}, {res['date']})", "", f"`{res['command']}`", "",
             "| what | images | img/s | latency median ms | latency p90 ms | mean batch | notes |",
             "|---|---|---|---|---|---|---|"]
    if d:
        lines.append(f"| direct `generate`, batch {d['batch_size']}, one GPU | {d['images']} | {d['images_per_s']} | "
                     f"{d['call_median_ms']} (per call) | – | {d['batch_size']} | back-to-back full batches |")
    for s in res["served"]:
        lines.append(f"| served, {s['replicas']} replica(s), {s['clients']} clients | {s['requests']} | "
                     f"{s['images_per_s']} | {s['latency_median_ms']} | {s['latency_p90_ms']} | {s['mean_batch']} | "
                     f"codes {s['status_codes']}, 503 retried {s['retried_503']}, PNG encoding included |")
    if d:
        lines.append("")
        lines += [f"served ({s['replicas']} replica(s)) / direct: {s['images_per_s'] / d['images_per_s']:.2f}"
                  for s in res["served"]]
    (out / "serve.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    sys.exit(main())
