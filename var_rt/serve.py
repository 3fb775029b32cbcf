"""HTTP serving on Ray Serve: ``python -m var_rt serve`` (needs the ``[serve]`` extra).

One replica holds one loaded :class:`~var_rt.pipeline.VARPipeline` (one GPU each, or CPU replicas).
Requests are split into single images and collected by a :class:`Batcher` into batches of up to
``max_batch_size`` images (a batch is taken when the pipeline is free, so under load it is full); inside
a batch, images are grouped by their sampling settings (cfg, schedule, top-k, top-p, smoothing) and each
group is one pipeline call. Seeds and classes may differ freely within a
call: an image depends only on its own seed and class, so a served image is exactly the image that
``pipe.generate(class_labels=[c], seed=s, ...)`` gives.

API (JSON in, PNG or JSON out)::

    POST /generate  {"class_label": 207, "seed": 0, "cfg": 1.5, "top_k": 900, "top_p": 0.96}
                    -> image/png (one image; headers X-Class-Label, X-Seed)
    POST /generate  {"class_labels": [207, 360], "seed": 0, "format": "base64"}
                    -> {"images": [{"class_label": 207, "seed": 0, "png_base64": "..."}, ...]}
    GET  /health    -> {"status": "ok", "model": ..., "max_batch_size": ...}

Image i of a request uses seed + i (or give "seeds": [...]). Every refusal is JSON {"error": message}:
400 for a bad request (invalid JSON of any shape included; a cfg outside var_rt.validation.CFG_RANGE too), 404 /
405 for another path or method, 408 for a body that does not arrive within BODY_TIMEOUT_S (e.g. a Content-Length
larger than what is sent), 413 for a body over ``max_body_bytes``, 503 with
Retry-After when the replica already holds ``max_ongoing_requests`` requests, when a request is not done
within ``request_timeout_s`` and when a batch ran out of GPU memory; any other failure during generation is
a 500. Only Ray Serve's own backstops answer in plain text: a request stuck at the proxy past the deadline
(408), and, when ``max_queued_requests`` is set, more than that many waiting at the proxy (503).

Ray is imported only here (and in var_rt.sample): the core runtime does not need it.
"""

import argparse
import asyncio
import base64
import json
import secrets
import sys
import time
import uuid
from typing import Any, Callable, Dict, List, Optional

from var_rt.errors import BackendUnavailableError, ConfigError, EngineMismatchError, GpuMemoryError, InputError
from var_rt.options import ModelOptions, add_model_args, ray_placement
from var_rt.validation import DEFAULTS

DEFAULT_MAX_BATCH_SIZE = 16
# A valid request is well under 1 KiB per image (labels, seeds, a cfg schedule): 64 KiB leaves room for any of
# them and refuses a multi-GB upload before it is read.
DEFAULT_MAX_BODY_BYTES = 64 * 1024
DEFAULT_REQUEST_TIMEOUT_S = 30.0
# A whole body (at most max_body_bytes, 64 KiB) arrives in milliseconds; one that has not within this is a
# client error (a Content-Length larger than what is sent, a stalled upload): 408 at once, not a 503 later.
BODY_TIMEOUT_S = 5.0
RETRY_AFTER_S = 1  # what a 503 tells clients to wait before retrying
# Requests a replica can be answering 503 at once beyond those it holds: Ray Serve sends a replica at most
# max_ongoing_requests + this many, so a burst reaches the replica and is refused there as JSON rather than
# by the proxy in plain text. A refusal takes milliseconds, so these slots free again at once.
REFUSAL_HEADROOM = 64
PROXY_TIMEOUT_GRACE_S = 10.0  # the proxy's own timeout, a backstop for requests that never reach a replica
REQUEST_KEYS = {"class_label", "class_labels", "seed", "seeds", "cfg", "cfg_schedule", "top_k", "top_p",
                "more_smooth", "format"}
SAMPLING_DEFAULTS = DEFAULTS.asdict()  # the sampling fields a request may leave out


def import_ray():
    try:
        import ray  # noqa: F401
        from ray import serve
    except ImportError:
        raise BackendUnavailableError("serving needs Ray Serve: pip install 'var-rt[serve]' "
                                      "(or pip install 'ray[serve]>=2.9')") from None
    return ray, serve


def exported_batch_sizes(engine_dir) -> Optional[List[int]]:
    """The batch sizes in an export's manifest.json, or None where it cannot be read here."""
    from var_rt.manifest import read_manifest
    try:
        return [int(b) for b in read_manifest(engine_dir)["batch_sizes"]]
    except (EngineMismatchError, OSError, ValueError, KeyError, TypeError):
        return None


# ---- request parsing (no Ray needed: unit-testable) -------------------------------------------------
def parse_request(body: Any, pipe, max_images: int) -> Dict[str, Any]:
    """A JSON body -> {labels, seeds, settings, format}; InputError with a message otherwise. ``settings``: the
    validated sampling settings as ``validation.Sampling.astuple()`` (hashable: run_groups groups by it).

    The values are checked by var_rt.validation, as for the CLI and VARPipeline.generate; this function
    only adds what belongs to the HTTP format (field names, lists, the response format).
    """
    from var_rt import validation
    if not isinstance(body, dict):
        raise InputError("the request body must be a JSON object, e.g. {\"class_label\": 207, \"seed\": 0}")
    unknown = sorted(set(body) - REQUEST_KEYS)
    if unknown:
        shown = ", ".join(map(validation.show, unknown[:3])) + (f" and {len(unknown) - 3} more" if len(unknown) > 3 else "")
        raise InputError(f"unknown field(s) {shown}: use {', '.join(sorted(REQUEST_KEYS))}")
    if "class_label" in body and "class_labels" in body:
        raise InputError("give class_label or class_labels, not both")
    if "class_labels" in body:
        labels = body["class_labels"]
        if not isinstance(labels, list) or not labels:
            raise InputError("class_labels must be a non-empty list of class ids")
    elif "class_label" in body:
        labels = [body["class_label"]]
    else:
        raise InputError(f"class_label is required (0..{pipe.cfg.var.num_classes - 1}, "
                         f"{pipe.cfg.var.num_classes} = unconditional)")
    if len(labels) > max_images:
        raise InputError(f"{len(labels)} images in one request: at most {max_images} (the batch size); "
                         f"split it into several requests")
    labels = pipe.check_labels(labels)
    if "seed" in body and "seeds" in body:
        raise InputError("give seed or seeds, not both")
    if "seeds" in body:
        if not isinstance(body["seeds"], list):
            raise InputError(f"seeds must be a list of integers, got {validation.show(body['seeds'])}")
        seeds = validation.seeds(body["seeds"], len(labels), "seeds")
    else:
        seed = body.get("seed")
        seed = secrets.randbelow(2 ** 62) if seed is None else validation.integer(seed, "seed")
        seeds = validation.seeds(seed, len(labels))
    s = {k: body.get(k, default) for k, default in SAMPLING_DEFAULTS.items()}
    if not isinstance(s["cfg_schedule"], (str, list)):
        raise InputError("cfg_schedule must be 'linear', 'constant' or a list of numbers (one per scale)")
    v = validation.Sampling.check(**s, num_scales=pipe.cfg.num_scales)
    fmt = body.get("format", "png" if len(labels) == 1 else "base64")
    if fmt not in ("png", "base64"):
        raise InputError(f"format must be 'png' or 'base64', got {validation.show(fmt)}")
    if fmt == "png" and len(labels) != 1:
        raise InputError("format 'png' returns one image: use format 'base64' for several")
    return {"labels": labels, "seeds": seeds, "settings": v.astuple(), "format": fmt}


class Batcher:
    """Dynamic batching that forms a batch when the pipeline is free, not on a timer.

    Ray Serve's ``@serve.batch`` forms a batch every ``batch_wait_timeout_s`` and queues it behind the
    running one, so under load it runs many small batches (on the CPU with 32 clients and the fixture
    model: mean batch 4.6 images, against 14.2 with this class). Here one worker takes everything that
    arrived while the previous batch ran (up to ``max_batch_size``), and waits at most ``wait_s`` for more only when
    fewer arrived. ``fn`` gets a list of items and returns one result (or an Exception) per item;
    ``submit`` returns (that result, the number of images in the batch it ran in).
    """

    def __init__(self, fn: Callable[[list], list], max_batch_size: int, wait_s: float):
        self.fn, self.max_batch_size, self.wait_s = fn, max_batch_size, wait_s
        self.queue: Optional[asyncio.Queue] = None
        self.worker: Optional[asyncio.Task] = None
        self.stats = {"batches": 0, "images": 0, "generate_s": 0.0}

    async def submit(self, item):
        if self.worker is None or self.worker.done():
            self.queue = self.queue or asyncio.Queue()
            self.worker = asyncio.get_running_loop().create_task(self._work())
        fut = asyncio.get_running_loop().create_future()
        await self.queue.put((item, fut))
        return await fut

    async def _take(self) -> list:
        batch = [await self.queue.get()]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.wait_s
        while len(batch) < self.max_batch_size:
            if not self.queue.empty():
                batch.append(self.queue.get_nowait())
                continue
            left = deadline - loop.time()
            if left <= 0:
                break
            try:
                batch.append(await asyncio.wait_for(self.queue.get(), left))
            except asyncio.TimeoutError:
                break
        return batch

    async def _work(self) -> None:
        while True:
            batch = [(i, f) for i, f in await self._take() if not f.cancelled()]  # client gone: skip it
            if not batch:
                continue
            t0 = time.perf_counter()
            try:
                results = await asyncio.to_thread(self.fn, [i for i, _ in batch])
                if len(results) != len(batch):
                    raise RuntimeError(f"{len(results)} results for a batch of {len(batch)}")
            except Exception as e:  # noqa: BLE001 - every waiting request gets the error
                results = [e] * len(batch)
            except BaseException:  # the worker is cancelled (replica shutting down): release the waiters
                for _, f in batch:
                    if not f.done():
                        f.cancel()
                raise
            self.stats["batches"] += 1
            self.stats["images"] += len(batch)
            self.stats["generate_s"] += time.perf_counter() - t0
            for (_, f), r in zip(batch, results):
                if not f.done():
                    f.set_result((r, len(batch)))


def cudagraph_buckets(max_batch_size: int) -> List[int]:
    """Batch sizes the cudagraph backend is captured for when serving: powers of two, then the maximum."""
    return [1 << i for i in range(max_batch_size.bit_length()) if 1 << i < max_batch_size] + [max_batch_size]


def serving_buckets(pipe, max_batch_size: int) -> Optional[List[int]]:
    """The batch sizes a replica runs (a group is padded up to the next one, VARPipeline.chunk_size) and
    warms at start: the cudagraph buckets, or the exported engines' built sizes up to max_batch_size; None
    for eager torch (any size runs without warm-up)."""
    if pipe.backend == "cudagraph":
        return cudagraph_buckets(max_batch_size)
    return pipe.batch_sizes_up_to(max_batch_size)


def run_groups(pipe, items: List[tuple], buckets: Optional[List[int]]) -> list:
    """One batch of (settings, label, seed) -> uint8 images (H, W, 3), one pipeline call per settings group
    (settings: ``validation.Sampling.astuple()``, as parse_request gives them)."""
    from var_rt.validation import Sampling
    groups: Dict[tuple, List[int]] = {}
    for i, (settings, _, _) in enumerate(items):
        groups.setdefault(settings, []).append(i)
    out: list = [None] * len(items)
    for settings, idx in groups.items():
        try:
            # padded to a bucket: one captured graph / built engine per bucket, not per group size
            bs = pipe.chunk_size(len(idx), buckets=buckets)
            res = pipe.generate(class_labels=[items[i][1] for i in idx], seed=[items[i][2] for i in idx],
                                **Sampling(*settings).asdict(), batch_size=bs, progress=False)
            arr = res.numpy()
            for j, i in enumerate(idx):
                out[i] = arr[j]
        except Exception as e:  # every image of the failed group gets the error, the other groups still run
            for i in idx:
                out[i] = e
    return out


class Refusal(Exception):
    """A request answered with an HTTP error before or instead of its images: ``response()`` is
    (status, JSON body, headers); every 503 carries Retry-After, as clients are told to retry it."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status

    def response(self) -> tuple:
        headers = {"Retry-After": str(RETRY_AFTER_S)} if self.status == 503 else {}
        return self.status, {"error": str(self)}, headers


def failure_response(exc: Exception) -> tuple:
    """(status, JSON body, headers) for an error raised while generating a request that parsed: the request
    was valid, so it is the server's failure: 503 (retry) for GPU memory, 500 otherwise."""
    if isinstance(exc, GpuMemoryError):
        return Refusal(503, f"{exc} (server busy: retry later or with fewer images)").response()
    return Refusal(500, f"generation failed: {exc.__class__.__name__}: {exc}").response()


async def read_body(request, limit: int) -> bytes:
    """The request body, refused (413) as soon as it is known to exceed ``limit`` bytes: from its
    Content-Length before anything is read, else (chunked uploads) while it streams in."""
    declared = request.headers.get("content-length")
    too_large = f"the request body is over {limit} bytes: a request for up to max_batch_size images is far smaller"
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise Refusal(413, too_large)
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise Refusal(413, too_large)
        chunks.append(chunk)
    return b"".join(chunks)


def _object_without_duplicates(pairs: list) -> dict:
    """A JSON object as a dict; a name given twice (json.loads would keep the last silently) is a ValueError."""
    out = dict(pairs)
    if len(out) < len(pairs):
        from var_rt.validation import show
        seen: set = set()
        twice = next(k for k, _ in pairs if k in seen or seen.add(k))
        raise ValueError(f"duplicate field {show(twice)}: give each field once")
    return out


def decode_json(raw: bytes) -> Any:
    """json.loads with every failure a 400: syntax, encoding and over-long integers raise ValueError, and
    deep nesting (``[[[[...``) raises RecursionError, which would otherwise be a 500."""
    try:
        return json.loads(raw, object_pairs_hook=_object_without_duplicates)
    except ValueError as e:
        raise Refusal(400, f"the request body is not valid JSON ({e})") from None
    except RecursionError:
        raise Refusal(400, "the request body is not valid JSON (nested too deeply): send a flat JSON object "
                           "such as {\"class_label\": 207, \"seed\": 0}") from None


def check_max_batch_size(max_batch_size: int) -> None:
    """ConfigError unless one batch is a size one pipeline call takes (1..validation.MAX_IMAGES)."""
    from var_rt.validation import MAX_IMAGES
    if not 1 <= max_batch_size <= MAX_IMAGES:
        raise ConfigError(f"--max-batch-size must be in 1..{MAX_IMAGES} (the images of one pipeline call), "
                          f"got {max_batch_size}")


def check_limits(request_timeout_s: float, max_body_bytes: int) -> None:
    """ConfigError for a deadline or body limit that would refuse every request."""
    if not 0 < request_timeout_s < float("inf"):  # also refuses NaN
        raise ConfigError(f"--request-timeout-s must be a number of seconds > 0, got {request_timeout_s}")
    if max_body_bytes < 1:
        raise ConfigError(f"--max-body-bytes must be >= 1, got {max_body_bytes}")


def check_port(host: str, port: int, check_free: bool = True) -> None:
    """ConfigError for a port out of range or, when ``check_free``, one that cannot be bound on ``host`` (in use,
    privileged, or a host that is not this machine's): found here in a second, not as a Ray traceback after
    Ray has started. The socket is bound as the HTTP server binds it (SO_REUSEADDR: a port in TIME_WAIT is free)
    and closed at once."""
    import errno
    import socket
    if not 1 <= port <= 65535:
        raise ConfigError(f"--port {port} is out of range: use 1..65535 (default 8000)")
    if not check_free:
        return
    try:
        family, kind, proto, _, addr = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0]
    except (socket.gaierror, UnicodeError) as e:
        raise ConfigError(f"--host {host!r} cannot be resolved ({e}): give an address of this machine, e.g. "
                          f"127.0.0.1 or 0.0.0.0") from None
    with socket.socket(family, kind, proto) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(addr)
        except OSError as e:
            if e.errno == errno.EADDRINUSE:
                raise ConfigError(f"--port {port} is in use on {host}: stop the program that listens there or "
                                  f"choose another --port") from None
            if e.errno == errno.EACCES:
                raise ConfigError(f"--port {port} on {host} needs privileges this user lacks: choose a port "
                                  f"above 1023") from None
            raise ConfigError(f"--host {host} --port {port} cannot be listened on ({e.strerror}): give an "
                              f"address of this machine and a free port") from None


def check_model_files(pipeline_kwargs: Dict[str, Any], check_device: bool = True) -> None:
    """Check the config and checkpoints here, before Ray starts, with the same errors VARPipeline.load gives.

    A replica that cannot load its model fails only after Ray and Serve have started (tens of seconds) and is
    reported as pages of Ray tracebacks with the CheckpointError buried inside. The models are built on the
    meta device with the checkpoints read memory-mapped where they can be (pipeline.build_models), so this
    allocates no weights and reads little more than the files' headers. check_device: the replicas run on this
    machine (not on a Ray cluster given by --address), so its devices are theirs.
    """
    from var_rt.pipeline import check_load
    check_load(pipeline_kwargs, check_device)


# ---- the deployment ---------------------------------------------------------------------------------
def build_app(pipeline_kwargs: Dict[str, Any], *, num_replicas: int = 1, use_gpu: Optional[bool] = None,
              max_batch_size: Optional[int] = None, batch_wait_timeout_s: float = 0.02,
              max_ongoing_requests: Optional[int] = None, max_queued_requests: Optional[int] = None,
              request_timeout_s: float = DEFAULT_REQUEST_TIMEOUT_S, max_body_bytes: int = DEFAULT_MAX_BODY_BYTES,
              num_cpus: Optional[float] = None, name: str = "VARServer"):
    """A Ray Serve application: ``serve.run(build_app({...}), route_prefix="/")``.

    pipeline_kwargs go to VARPipeline.load (model/config, checkpoints, device, dtype, backend, engine_dir).
    use_gpu: one GPU per replica (default: when the device is CUDA, or 'auto' and the cluster has GPUs).
    max_batch_size: images per pipeline call; for exported backends the engines' largest built batch size.
    max_ongoing_requests (per replica, default 8 x max_batch_size): requests a replica holds, running or
    waiting in its Batcher; beyond them the replica answers 503 JSON with Retry-After at once. Ray Serve may
    send a replica REFUSAL_HEADROOM more, so that a burst is refused by the replica, not by the proxy.
    max_queued_requests: a bound on requests waiting at Ray's proxy (default none); beyond it Ray Serve
    answers a plain-text 503 (with Retry-After where this Ray has BackpressureConfig). Those waiting include
    requests arriving together while the proxy routes them, so a small bound refuses part of any burst.
    request_timeout_s: a request not done within it (reading, waiting for a batch, generating) gets 503 JSON
    with Retry-After; its images are dropped from the queue. max_body_bytes: larger bodies get 413 unread.
    Requests should wait at the replica, in its Batcher, rather than at the proxy: measured on an H200 (d16
    cudagraph, 64 clients), a replica holding at most 2 x 16 requests ran batches of 4.6 images on average
    and served 14 img/s, because the proxy hands a freed slot to a queued request only after a back-off.
    """
    ray, serve = import_ray()
    from fastapi import FastAPI, Request
    from fastapi.responses import JSONResponse, Response

    kwargs = dict(pipeline_kwargs)
    kwargs["progress"] = False
    backend = kwargs.get("backend", "torch")
    built = exported_batch_sizes(kwargs["engine_dir"]) if backend in ("onnxruntime", "tensorrt") \
        and kwargs.get("engine_dir") else None
    if built:
        max_batch_size = max(built) if max_batch_size is None else min(max_batch_size, max(built))
    max_batch_size = max_batch_size or DEFAULT_MAX_BATCH_SIZE
    check_max_batch_size(max_batch_size)
    check_limits(request_timeout_s, max_body_bytes)
    if max_ongoing_requests is None:
        max_ongoing_requests = 8 * max_batch_size
    if max_queued_requests is None:
        max_queued_requests = -1  # Ray's "no bound": the replicas refuse overload, the deadline bounds waiting
    use_gpu, kwargs = ray_placement(ray, kwargs, use_gpu)
    actor_options: Dict[str, Any] = {"num_gpus": 1} if use_gpu else {}
    if num_cpus is not None:
        actor_options["num_cpus"] = num_cpus

    api = FastAPI(title="var-rt", description="VAR class-conditional image generation")

    from starlette.exceptions import HTTPException

    @api.exception_handler(HTTPException)
    async def _json_error(request, exc):  # 404 (no such path), 405 (GET /generate): {"error"} like the rest
        return JSONResponse({"error": f"{exc.detail}: the API is POST /generate and GET /health"},
                            status_code=exc.status_code, headers=getattr(exc, "headers", None))

    deployment_options: Dict[str, Any] = {}
    try:  # newer Ray Serve: its own plain-text 503 (proxy queue full) then says when to retry
        from ray.serve.config import BackpressureConfig
        deployment_options["backpressure_config"] = BackpressureConfig(retry_after_s=RETRY_AFTER_S)
    except ImportError:
        pass
    limits = {"max_ongoing_requests": max_ongoing_requests, "request_timeout_s": request_timeout_s,
              "max_body_bytes": max_body_bytes}

    @serve.deployment(name=name, num_replicas=num_replicas, ray_actor_options=actor_options,
                      max_ongoing_requests=max_ongoing_requests + REFUSAL_HEADROOM,
                      max_queued_requests=max_queued_requests, **deployment_options)
    @serve.ingress(api)
    class VARServer:
        def __init__(self, load_kwargs: Dict[str, Any], batch_size: int, wait_s: float, limits: Dict[str, Any]):
            from var_rt.pipeline import VARPipeline
            self.limits = limits
            self.held = 0  # requests this replica holds now: reading, waiting for a batch or generating
            self.pipe = VARPipeline.load(**load_kwargs)
            self.buckets = serving_buckets(self.pipe, batch_size)
            self.pipe.keep_loops(len(self.buckets or ()))
            self.max_batch_size = min(batch_size, max(self.buckets)) if self.buckets else batch_size
            self.batcher = Batcher(lambda items: run_groups(self.pipe, items, self.buckets),
                                   self.max_batch_size, wait_s)
            self.encode_s = 0.0
            self.replica_id = uuid.uuid4().hex[:8]
            # Capture / load every bucket before traffic, with the default sampling settings: a first call at
            # a new bucket costs seconds (capture, engine load), which would stall every request behind it.
            for bs in self.buckets or []:
                self.pipe.warmup(bs, **SAMPLING_DEFAULTS)

        @api.get("/health")
        async def health(self):
            c = self.pipe.cfg
            return {"status": "ok", "model": c.name, "image_size": c.image_size, "num_classes": c.var.num_classes,
                    "backend": self.pipe.backend, "device": str(self.pipe.device),
                    "dtype": str(self.pipe.dtype).replace("torch.", ""), "max_batch_size": self.max_batch_size,
                    "batch_sizes": self.buckets, "replica": self.replica_id, "limits": self.limits,
                    "stats": {**{k: round(v, 3) for k, v in self.batcher.stats.items()},
                              "encode_s": round(self.encode_s, 3)}}  # this replica, since start

        async def _read_and_run(self, request: Request) -> tuple:
            """Read, parse and generate one request: (parsed request, [(image or Exception, batch images)])."""
            try:
                raw = await asyncio.wait_for(read_body(request, self.limits["max_body_bytes"]), BODY_TIMEOUT_S)
            except asyncio.TimeoutError:
                declared = request.headers.get("content-length")
                raise Refusal(408, f"the request body did not arrive within {BODY_TIMEOUT_S:g} s"
                              + (f" (Content-Length says {declared} bytes: send that many, or correct the header)"
                                 if declared else "")) from None
            body = decode_json(raw)
            try:
                req = parse_request(body, self.pipe, self.max_batch_size)
            except InputError as e:
                raise Refusal(400, str(e)) from None
            return req, await asyncio.gather(*(self.batcher.submit((req["settings"], c, s))
                                               for c, s in zip(req["labels"], req["seeds"])))

        async def _admit(self, request: Request) -> tuple:
            """_read_and_run within the replica's limits: at most max_ongoing_requests at once, each within
            request_timeout_s. On timeout the waiting images are cancelled, so the Batcher skips them."""
            if self.held >= self.limits["max_ongoing_requests"]:
                raise Refusal(503, f"server busy: this replica already holds {self.held} requests "
                                   f"(max_ongoing_requests): retry later")
            self.held += 1
            try:
                return await asyncio.wait_for(self._read_and_run(request), self.limits["request_timeout_s"])
            except asyncio.TimeoutError:
                raise Refusal(503, f"not done within the server's deadline of {self.limits['request_timeout_s']:g} s "
                                   f"(request_timeout_s): the server is busy, retry later or with fewer "
                                   f"images") from None
            finally:
                self.held -= 1

        @api.post("/generate")
        async def generate(self, request: Request):
            try:
                req, done = await self._admit(request)
            except Refusal as e:
                status, body, headers = e.response()
                return JSONResponse(body, status_code=status, headers=headers)
            results = [r for r, _ in done]
            for r in results:
                if isinstance(r, Exception):
                    status, body, headers = failure_response(r)
                    return JSONResponse(body, status_code=status, headers=headers)
            from var_rt.images import png_bytes
            t0 = time.perf_counter()
            pngs = await asyncio.to_thread(lambda: [png_bytes(a) for a in results])
            self.encode_s += time.perf_counter() - t0
            # which replica answered and how many images shared each image's batch (for load tests)
            meta = {"X-Replica": self.replica_id, "X-Batch-Images": ",".join(str(n) for _, n in done)}
            if req["format"] == "png":
                return Response(pngs[0], media_type="image/png",
                                headers={"X-Class-Label": str(req["labels"][0]), "X-Seed": str(req["seeds"][0]),
                                         **meta})
            return JSONResponse({"images": [{"class_label": c, "seed": s,
                                             "png_base64": base64.b64encode(p).decode("ascii")}
                                            for c, s, p in zip(req["labels"], req["seeds"], pngs)]}, headers=meta)

    return VARServer.bind(kwargs, max_batch_size, batch_wait_timeout_s, limits)


# ---- command line -----------------------------------------------------------------------------------
def http_options(host: str, port: int, request_timeout_s: float) -> Dict[str, Any]:
    """Ray Serve's HTTP proxy options: it listens on ``host`` only, and its own end-to-end timeout is a
    backstop a little past the replicas' deadline, for requests that never got to a replica (its answer
    is Ray's plain-text 408). The gRPC proxy is not started (no grpc_options)."""
    return {"host": host, "port": port, "request_timeout_s": request_timeout_s + PROXY_TIMEOUT_GRACE_S}


def add_serve_parser(subparsers) -> argparse.ArgumentParser:
    """Register ``python -m var_rt serve`` on the CLI's subparsers."""
    p = subparsers.add_parser(
        "serve", help="HTTP server on Ray Serve (POST /generate, GET /health); needs the [serve] extra",
        description="Serve the model over HTTP with Ray Serve: one replica per GPU, dynamic batching, "
                    "503 when the queue is full. See docs/serving.md.")
    add_model_args(p)
    g = p.add_argument_group("serving")
    g.add_argument("--num-replicas", type=int, default=1, help="replicas (one GPU each on CUDA; default 1)")
    g.add_argument("--host", default="127.0.0.1", help="HTTP host (default 127.0.0.1; 0.0.0.0 to expose)")
    g.add_argument("--port", type=int, default=8000, help="HTTP port (default 8000)")
    g.add_argument("--max-batch-size", type=int, default=None,
                   help=f"images per pipeline call (default {DEFAULT_MAX_BATCH_SIZE}; exported backends: the "
                        f"engines' largest built batch size)")
    g.add_argument("--batch-wait-ms", type=float, default=20.0,
                   help="how long a batch waits to fill before it runs (default 20 ms)")
    g.add_argument("--max-ongoing-requests", type=int, default=None,
                   help="requests a replica holds, running or queued in its batcher (default 8 x max batch size)")
    g.add_argument("--max-queued-requests", type=int, default=None,
                   help="bound on requests waiting at Ray's proxy, beyond which Ray answers a plain-text 503 "
                        "(default: none; replicas refuse overload themselves, as JSON)")
    g.add_argument("--request-timeout-s", type=float, default=DEFAULT_REQUEST_TIMEOUT_S,
                   help=f"deadline of a request at its replica; later it gets 503 with Retry-After "
                        f"(default {DEFAULT_REQUEST_TIMEOUT_S:g} s)")
    g.add_argument("--max-body-bytes", type=int, default=DEFAULT_MAX_BODY_BYTES,
                   help=f"larger request bodies get 413 before they are read (default {DEFAULT_MAX_BODY_BYTES})")
    g.add_argument("--address", default=None, help="Ray cluster address (default: start a local Ray)")
    p.set_defaults(func=cmd_serve)
    return p


def cmd_serve(a: argparse.Namespace) -> int:
    for flag, v in (("--num-replicas", a.num_replicas), ("--max-ongoing-requests", a.max_ongoing_requests)):
        if v is not None and v < 1:
            raise ConfigError(f"{flag} must be >= 1, got {v}")
    if a.max_batch_size is not None:
        check_max_batch_size(a.max_batch_size)
    if not 0 <= a.batch_wait_ms < float("inf"):  # also refuses NaN
        raise ConfigError(f"--batch-wait-ms must be a number of milliseconds >= 0, got {a.batch_wait_ms}")
    check_port(a.host, a.port, check_free=a.address is None)  # with --address the proxy may run elsewhere
    if a.max_queued_requests is not None and a.max_queued_requests < 0:
        raise ConfigError(f"--max-queued-requests must be >= 0, got {a.max_queued_requests}")
    check_limits(a.request_timeout_s, a.max_body_bytes)
    kwargs = ModelOptions.from_args(a).pipeline_kwargs(absolute_paths=True)
    check_model_files(kwargs, check_device=a.address is None)
    ray, serve = import_ray()
    ray.init(address=a.address) if a.address else ray.init()
    serve.start(http_options=http_options(a.host, a.port, a.request_timeout_s))
    app = build_app(kwargs, num_replicas=a.num_replicas, max_batch_size=a.max_batch_size,
                    batch_wait_timeout_s=a.batch_wait_ms / 1000, max_ongoing_requests=a.max_ongoing_requests,
                    max_queued_requests=a.max_queued_requests, request_timeout_s=a.request_timeout_s,
                    max_body_bytes=a.max_body_bytes)
    serve.run(app, name="var-rt", route_prefix="/")
    print(f"serving on http://{a.host}:{a.port}  (POST /generate, GET /health; Ctrl-C stops)", file=sys.stderr)
    import signal

    def _stop(signum, frame):  # SIGTERM (containers, process managers) stops like Ctrl-C
        raise KeyboardInterrupt
    signal.signal(signal.SIGTERM, _stop)
    try:
        while True:
            time.sleep(3600)
    except KeyboardInterrupt:
        pass
    finally:
        serve.shutdown()
    return 0
