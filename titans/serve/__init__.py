"""Serve an exported cascade on Ray Serve: the student answers, the teacher is summoned only when in doubt.

    titans-serve --export=exports/fmnist_cascade [--host=127.0.0.1] [--port=8000]
    curl -s -X POST http://127.0.0.1:8000/ -H 'Content-Type: application/json' \
        -d '{"images": [[[[0], [0], ...]]]}'           # uint8 values, shape (N, H, W, C)
    curl -s -X POST http://127.0.0.1:8000/ -H 'Content-Type: application/x-npy' \
        --data-binary @images.npy                      # the same as a .npy file (np.save), uint8

Two deployments (one Ray Serve application):
  CascadeIngress  the HTTP ingress: validates each request (JSON or .npy, shape, dtype, size; a bad one gets a
                  400 with the reason and never takes the replica down), batches requests across
                  callers (`serve.batch`), runs every stage but the last with their gates, and sends
                  only the rows they defer to the teacher, in one call per batch (a request with no
                  deferred row is answered without waiting for it);
  Teacher         the export's last stage, in its own deployment whose replicas autoscale on their own
                  load (`autoscaling_config`); a call that fails because a replica died is retried, so a
                  lost replica costs latency, not answers.
Answers: {"classes": [...], "probabilities": [[...]], "answered_by": [...], "class_names": [...]}.
The HTTP proxy binds 127.0.0.1 unless --host says otherwise; the local Ray cluster binds loopback only
(titans.teachers.service.connect).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging

import numpy as np
from ray import serve
from starlette.requests import Request
from starlette.responses import JSONResponse

from titans.export import standalone

MAX_IMAGES = 256  # per request
# Requests per ingress batch and row sets per teacher batch (`serve.batch`). A replica holds at most
# `max_ongoing_requests` requests at once (Ray's default is 5), so each deployment admits 4 batches' worth:
# with the default, no batch could ever grow past 5 and a loaded service queued in the proxy instead.
INGRESS_BATCH, TEACHER_BATCH = 16, 8
MODES = ("cascade", "student", "teacher")
TEACHER_RETRIES = 3


class BadRequest(ValueError):
    """A request the service answers with 400 and a reason."""


NPY_TYPE = "application/x-npy"


def parse_npy(body: bytes, input_shape, max_images: int) -> np.ndarray:
    """A binary request: one uint8 array of shape (N, H, W, C) in .npy format (no pickled objects)."""
    try:
        x = np.load(io.BytesIO(body), allow_pickle=False)
    except (ValueError, OSError, EOFError):
        raise BadRequest(f"the body is not a .npy array ({NPY_TYPE}); write it with numpy.save") from None
    if not isinstance(x, np.ndarray) or x.dtype != np.uint8:
        raise BadRequest(f"a .npy body must hold uint8 pixels; got dtype {getattr(x, 'dtype', type(x).__name__)}")
    want = tuple(input_shape)
    if x.ndim != 1 + len(want) or tuple(x.shape[1:]) != want:
        raise BadRequest(f'"images" must have shape (N, {", ".join(map(str, want))}); got {x.shape}')
    if not 1 <= len(x) <= max_images:
        raise BadRequest(f"a request holds 1 to {max_images} images; got {len(x)}")
    return np.ascontiguousarray(x)


def parse_images(body: bytes, input_shape, max_images: int, content_type: str = "application/json") -> np.ndarray:
    """The request's images as uint8 (N, H, W, C), or BadRequest saying what is wrong. A body sent as
    `application/x-npy` is a .npy array; anything else is read as JSON {"images": [...]}."""
    if content_type.split(";")[0].strip().lower() == NPY_TYPE:
        return parse_npy(body, input_shape, max_images)
    try:
        payload = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadRequest('the body is not JSON; send {"images": [...]} with uint8 values') from None
    if not isinstance(payload, dict) or "images" not in payload:
        raise BadRequest('expected a JSON object with an "images" field')
    try:
        x = np.asarray(payload["images"], dtype=np.float64)
    except (ValueError, TypeError):
        raise BadRequest('"images" must be a rectangular array of numbers') from None
    want = tuple(input_shape)
    if x.ndim != 1 + len(want) or tuple(x.shape[1:]) != want:
        raise BadRequest(f'"images" must have shape (N, {", ".join(map(str, want))}); got {x.shape}')
    if not 1 <= len(x) <= max_images:
        raise BadRequest(f"a request holds 1 to {max_images} images; got {len(x)}")
    if not np.all(np.isfinite(x)) or np.any(x != np.round(x)) or x.min() < 0 or x.max() > 255:
        raise BadRequest('"images" must hold integers in [0, 255] (uint8 pixels)')
    return x.astype(np.uint8)


def num_cheap_stages(cascade, mode: str) -> int:
    """How many stages the ingress runs itself in `mode`; the rows they leave go to the teacher deployment."""
    return {"cascade": cascade.num_stages - 1, "student": 1, "teacher": 0}[mode]


def cheap_stages(cascade, mode: str, x: np.ndarray):
    """Every stage the ingress runs itself (all but the last in "cascade" mode; the first in "student";
    none in "teacher") on the batch's rows: (logits, answered_by, the indices of the rows left for the
    teacher). Pure numpy/JAX work, run off the event loop."""
    n = len(x)
    logits = np.zeros((n, cascade.manifest["num_classes"]), np.float32)
    answered = np.full(n, -1, np.int32)
    reach = np.arange(n)
    for i in range(num_cheap_stages(cascade, mode)):
        if not len(reach):
            break
        stage_logits, scores = cascade.stage_outputs(i, x[reach])
        keep = scores <= cascade.thresholds[i] if mode == "cascade" else np.ones(len(reach), bool)
        logits[reach[keep]], answered[reach[keep]] = stage_logits[keep], i
        reach = reach[~keep]
    return logits, answered, reach


def share_teacher_call(sizes, x, logits, answered, reach, call_teacher) -> list[tuple]:
    """ONE teacher call (`call_teacher(rows)`, a coroutine) for all the rows a batch defers, started here
    and shared. Per request: (logits, answered_by, its deferred rows, the shared call or None, the mask of
    its rows in that call's output). A request with nothing deferred is answered at once."""
    shared = asyncio.ensure_future(call_teacher(x[reach])) if len(reach) else None
    out, start = [], 0
    for size in sizes:
        mine = (reach >= start) & (reach < start + size)
        rows = reach[mine] - start
        out.append(
            (logits[start : start + size], answered[start : start + size], rows, shared if len(rows) else None, mine)
        )
        start += size
    return out


async def run_batch(cascade, mode: str, image_sets: list[np.ndarray], call_teacher) -> list[tuple]:
    """One batch of requests: `cheap_stages` in a worker thread (XLA releases the GIL, so the event loop
    keeps taking requests and teacher answers meanwhile), then `share_teacher_call` back in the loop.
    Modes "student" (the first stage answers every row) and "teacher" (every row deferred) take the same
    path as "cascade", so that the three are served the same way."""
    x = np.concatenate(image_sets)
    found = await asyncio.to_thread(cheap_stages, cascade, mode, x)
    return share_teacher_call([len(s) for s in image_sets], x, *found, call_teacher)


@serve.deployment(
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4},
    max_ongoing_requests=4 * TEACHER_BATCH,
    ray_actor_options={"num_cpus": 0.5},
)
class Teacher:
    """The export's last stage; called with the deferred rows only."""

    def __init__(self, export_dir: str):
        self.cascade = standalone.load(export_dir)
        self.stage = self.cascade.num_stages - 1
        self.cascade.warm_up([self.stage])  # every batch size it will run at, compiled before it serves

    @serve.batch(max_batch_size=TEACHER_BATCH, batch_wait_timeout_s=0.002)
    async def __call__(self, row_sets: list[np.ndarray]) -> list[np.ndarray]:
        sizes = [len(r) for r in row_sets]
        logits, _ = self.cascade.stage_outputs(self.stage, np.concatenate(row_sets))
        return np.split(logits, np.cumsum(sizes)[:-1])


@serve.deployment(max_ongoing_requests=4 * INGRESS_BATCH, ray_actor_options={"num_cpus": 0.5})
class CascadeIngress:
    """HTTP ingress: validation, the cheap stages, and the teacher for the deferred rows."""

    def __init__(self, export_dir: str, teacher, max_images: int = MAX_IMAGES, mode: str = "cascade"):
        self.cascade = standalone.load(export_dir)
        self.teacher = teacher
        self.max_images = int(max_images)
        self.shape = self.cascade.input_shape
        # "cascade"; or, served the same way for benchmarks: "student" (the first stage answers every
        # row) and "teacher" (every row goes to the teacher deployment).
        if mode not in MODES:
            raise ValueError(f"mode={mode!r} is not one of {MODES}")
        self.mode = mode
        self.cascade.warm_up(range(num_cheap_stages(self.cascade, mode)))

    @serve.batch(max_batch_size=INGRESS_BATCH, batch_wait_timeout_s=0.002)
    async def _cheap_stages(self, image_sets: list[np.ndarray]) -> list[tuple]:
        return await run_batch(self.cascade, self.mode, image_sets, self._teacher)

    async def _teacher(self, rows: np.ndarray) -> np.ndarray:
        for attempt in range(TEACHER_RETRIES):
            try:
                return await self.teacher.remote(rows)
            except Exception as e:
                if attempt == TEACHER_RETRIES - 1:
                    raise
                logging.warning("teacher call failed (%s: %s); retrying", type(e).__name__, e)
                await asyncio.sleep(0.2 * (attempt + 1))

    async def __call__(self, request: Request):
        try:
            images = parse_images(
                await request.body(), self.shape, self.max_images, request.headers.get("content-type", "")
            )
        except BadRequest as e:
            return JSONResponse({"error": str(e)}, status_code=400)
        logits, answered, deferred, shared, positions = await self._cheap_stages(images)
        logits, answered = logits.copy(), answered.copy()
        if shared is not None:
            logits[deferred] = (await shared)[positions]
            answered[deferred] = self.cascade.num_stages - 1
        z = logits - logits.max(-1, keepdims=True)
        probs = np.exp(z) / np.exp(z).sum(-1, keepdims=True)
        return JSONResponse(
            {
                "classes": logits.argmax(-1).tolist(),
                "probabilities": probs.round(6).tolist(),
                "answered_by": answered.tolist(),
                "class_names": self.cascade.manifest["class_names"],
            }
        )


def build_app(
    export_dir: str,
    *,
    max_images: int = MAX_IMAGES,
    teacher_max_replicas: int = 2,
    mode: str = "cascade",
    name: str = "",
):
    """The application: an ingress (in `mode`) and its teacher deployment (`name` keeps several apps apart)."""
    teacher = Teacher.options(
        name=f"Teacher{name}",
        autoscaling_config={"min_replicas": 1, "max_replicas": int(teacher_max_replicas), "target_ongoing_requests": 4},
    ).bind(export_dir)
    return CascadeIngress.options(name=f"CascadeIngress{name}").bind(export_dir, teacher, max_images, mode)
