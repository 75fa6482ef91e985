"""Serve an exported cascade on Ray Serve: the student answers, the teacher is summoned only when in doubt.

    titans-serve --export=exports/fmnist_cascade [--host=127.0.0.1] [--port=8000]
    curl -s -X POST http://127.0.0.1:8000/ -H 'Content-Type: application/json' \
        -d '{"images": [[[[0], [0], ...]]]}'           # uint8 values, shape (N, H, W, C)
    curl -s -X POST http://127.0.0.1:8000/ -H 'Content-Type: application/x-npy' \
        --data-binary @images.npy                      # the same as a .npy file (np.save), uint8

Two deployments (one Ray Serve application):
  CascadeIngress  the HTTP ingress: bounds each request before it parses it (at most `max_body_bytes`, read
                  no further; the image count from the .npy header or from the JSON's brackets), validates
                  it (JSON or .npy, shape, dtype, values; a bad one gets a 400, a body over the limit a
                  413, both with the reason, and never takes the replica down), batches requests across
                  callers (`serve.batch`), runs every stage but the last with their gates, and sends
                  only the rows they defer to the teacher, in one call per batch (a request with no
                  deferred row is answered without waiting for it);
  Teacher         the export's last stage, in its own deployment whose replicas autoscale on their own
                  load (`autoscaling_config`); a call that fails because a replica died is retried, all
                  within `teacher_timeout_s`, after which the request gets a 503 with Retry-After.
Answers: {"classes": [...], "probabilities": [[...]], "answered_by": [...], "class_names": [...]}.

A text export (titans-export of a wordnet cascade) is served the same way, its requests JSON only:

    curl -s -X POST http://127.0.0.1:8000/ -H 'Content-Type: application/json' \
        -d '{"texts": ["dog, domestic dog : a member of the genus Canis"]}'

Its ingress bounds the body (`max_body_bytes`), counts the texts and the nesting before it parses the
body (`text_json_structure`, which skips brackets and quotes inside strings), then refuses with a 400
naming the fault: another key than "texts", an empty list, more than `max_images` texts, anything but a
string (numbers, null, lists), a text over `max_text_chars` characters, a lone surrogate, the literal
"[PAD]"; it tokenizes with the export's own tokenizer (`TextCascade.encode`, as Titans' dataset does)
and runs the stages on the token ids as on images.
The HTTP proxy binds 127.0.0.1 unless --host says otherwise; the local Ray cluster binds loopback only
(titans.teachers.service.connect), and so does each replica's gRPC server (`replica_grpc_on_loopback`).
"""

from __future__ import annotations

import asyncio
import io
import json
import logging
import re

import numpy as np
from ray import serve
from ray.serve._private import replica as serve_replica  # where a replica binds its gRPC port
from starlette.requests import Request
from starlette.responses import JSONResponse

from titans.export import standalone

MAX_IMAGES = 256  # per request
# Bytes per request body. 8 MiB holds 256 CIFAR-sized images as JSON twice over (a .npy body is 5-7x
# smaller); a replica holds at most `max_ongoing_requests` bodies at once, so on a 2-core host the ingress
# buffers at most 64 x 8 MiB and parses one body at a time (its event loop).
MAX_BODY_BYTES = 8 << 20
# Seconds a request waits for the teacher deployment (retries included) before it is answered 503 with
# Retry-After: a healthy teacher answers in milliseconds, a replaced replica takes seconds to start, and
# a teacher that cannot start (a missing stage file) would otherwise hold every deferred request forever.
TEACHER_TIMEOUT_S = 10.0
RETRY_AFTER_S = 5
# Requests per ingress batch and row sets per teacher batch (`serve.batch`). A replica holds at most
# `max_ongoing_requests` requests at once (Ray's default is 5), so each deployment admits 4 batches' worth:
# with the default, no batch could ever grow past 5 and a loaded service queued in the proxy instead.
INGRESS_BATCH, TEACHER_BATCH = 16, 8
MODES = ("cascade", "student", "teacher")
# Characters per text of a text export's request. Titans keeps the first 128 tokens of a text (a few
# hundred characters: WordNet's longest gloss has about 1,500); the rest would be cut off anyway.
MAX_TEXT_CHARS = 4096
TEACHER_RETRIES = 3


class BadRequest(ValueError):
    """A request the service answers with `status` (400 unless said otherwise) and a reason."""

    status = 400


class TooLarge(BadRequest):
    status = 413


class TeacherUnavailable(RuntimeError):
    """The teacher deployment did not answer in time (or kept failing): the request gets a 503."""


NPY_TYPE = "application/x-npy"
JSON_TYPE = "application/json"


async def read_body(request: Request, max_bytes: int) -> bytes:
    """The request's body, or TooLarge without reading past `max_bytes`: a declared Content-Length over the
    limit is refused before any of the body is read; without one, the chunks are counted as they arrive
    and the read stops at the first that passes the limit."""
    declared = request.headers.get("content-length")
    if declared is not None:
        if not declared.strip().isdigit():
            raise BadRequest(f"Content-Length is not a byte count: {declared[:40]!r}")
        if int(declared) > max_bytes:
            raise TooLarge(f"the body has {int(declared)} bytes; this service takes at most {max_bytes}")
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > max_bytes:
            raise TooLarge(f"the body passed {max_bytes} bytes, the most this service takes")
        chunks.append(chunk)
    return b"".join(chunks)


def _check_rows(shape, input_shape, max_images: int) -> None:
    want = tuple(input_shape)
    if len(shape) != 1 + len(want) or tuple(shape[1:]) != want:
        raise BadRequest(f'"images" must have shape (N, {", ".join(map(str, want))}); got {tuple(shape)}')
    if not 1 <= shape[0] <= max_images:
        raise BadRequest(f"a request holds 1 to {max_images} images; got {shape[0]}")


def parse_npy(body: bytes, input_shape, max_images: int) -> np.ndarray:
    """A binary request: one uint8 array of shape (N, H, W, C) in .npy format. Only its header is parsed
    (dtype, shape and row count are checked there, before any pixel is read; nothing is ever unpickled),
    and the body must hold exactly the pixels the header declares."""
    f = io.BytesIO(body)
    try:
        version = np.lib.format.read_magic(f)
        if version not in ((1, 0), (2, 0)):
            raise ValueError(version)
        read = np.lib.format.read_array_header_1_0 if version == (1, 0) else np.lib.format.read_array_header_2_0
        shape, fortran, dtype = read(f)
    except Exception:  # a malformed header is the client's error, whatever numpy raises for it
        raise BadRequest(f"the body is not a .npy array ({NPY_TYPE}); write it with numpy.save") from None
    if dtype != np.uint8:
        raise BadRequest(f"a .npy body must hold uint8 pixels; got dtype {dtype}")
    _check_rows(shape, input_shape, max_images)
    pixels = body[f.tell() :]
    if len(pixels) != int(np.prod(shape)):
        raise BadRequest(f"the .npy header declares {int(np.prod(shape))} pixels; the body holds {len(pixels)} bytes")
    return np.frombuffer(pixels, np.uint8).reshape(shape, order="F" if fortran else "C").copy()


def json_structure(body: bytes, input_shape, max_images: int) -> None:
    """Checks, before the body is parsed, what a parse would cost: the nesting depth and the number of
    images (the arrays one level inside "images"), from the brackets' running depth over the raw bytes.
    (Brackets inside strings are counted too: a request whose only string is the key "images" is exact.)"""
    first = body.lstrip()[:1]
    if first != b"{":
        raise BadRequest(
            'expected a JSON object {"images": [...]}'
            if first in (b"[", b'"') or first.isdigit()
            else 'the body is not JSON; send {"images": [...]} with uint8 values'
        )
    raw = np.frombuffer(body, np.uint8)
    opens = (raw == ord("[")) | (raw == ord("{"))
    closes = (raw == ord("]")) | (raw == ord("}"))
    depth = np.cumsum(opens.view(np.int8) - closes.view(np.int8), dtype=np.int32)
    most = 2 + len(input_shape)  # the object, "images", then one level per image axis
    if depth.max() > most:
        raise BadRequest(f"the JSON is nested {int(depth.max())} levels deep; a request needs {most}")
    rows = int(np.count_nonzero(opens & (depth == 3)))
    if rows > max_images:
        raise BadRequest(f"a request holds 1 to {max_images} images; got {rows}")


def _small_int(text: str) -> int:
    if len(text.lstrip("-")) > 6:
        raise BadRequest(f"a pixel value has {len(text)} digits: {text[:12]}...; pixels are uint8")
    return int(text)


def _no_constant(text: str):
    raise BadRequest(f'"images" must hold integers in [0, 255] (uint8 pixels); got {text}')


def parse_json(body: bytes, input_shape, max_images: int) -> np.ndarray:
    json_structure(body, input_shape, max_images)
    literal = re.search(rb"true|false|null", body)  # numpy would read true as 1 and null as nan
    if literal:
        raise BadRequest(f'"images" must be a rectangular array of numbers; got {literal.group().decode()}')
    try:
        payload = json.loads(body, parse_int=_small_int, parse_constant=_no_constant)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        if isinstance(e, BadRequest):
            raise
        raise BadRequest('the body is not JSON; send {"images": [...]} with uint8 values') from None
    if not isinstance(payload, dict) or "images" not in payload:
        raise BadRequest('expected a JSON object with an "images" field')
    try:
        x = np.asarray(payload["images"])
    except (ValueError, TypeError, OverflowError):
        raise BadRequest('"images" must be a rectangular array of numbers') from None
    if x.dtype.kind not in "iuf":
        raise BadRequest(f'"images" must be a rectangular array of numbers; got {x.dtype.kind!r} values')
    _check_rows(x.shape, input_shape, max_images)
    if not np.all(np.isfinite(x)) or np.any(x != np.round(x)) or x.min() < 0 or x.max() > 255:
        raise BadRequest('"images" must hold integers in [0, 255] (uint8 pixels)')
    return x.astype(np.uint8)


def parse_images(body: bytes, input_shape, max_images: int, content_type: str = JSON_TYPE) -> np.ndarray:
    """The request's images as uint8 (N, H, W, C), or BadRequest saying what is wrong. A body sent as
    `application/x-npy` is a .npy array; `application/json` (or no content type) is JSON {"images": [...]};
    any other content type is refused."""
    kind = content_type.split(";")[0].strip().lower()
    if kind == NPY_TYPE:
        return parse_npy(body, input_shape, max_images)
    if kind not in (JSON_TYPE, ""):
        raise BadRequest(f"Content-Type must be {JSON_TYPE} or {NPY_TYPE}; got {kind}")
    return parse_json(body, input_shape, max_images)


def text_json_structure(body: bytes, max_texts: int) -> None:
    """Checks, before a text request is parsed, its nesting depth (at most 2: the object, its "texts" list)
    and its number of texts (the strings inside that list), from the raw bytes: a quote counts unless an
    odd number of backslashes precede it, and brackets inside strings do not count."""
    first = body.lstrip()[:1]
    if first != b"{":
        raise BadRequest(
            'expected a JSON object {"texts": [...]}'
            if first in (b"[", b'"') or first.isdigit()
            else 'the body is not JSON; send {"texts": [...]} with strings'
        )
    raw = np.frombuffer(body, np.uint8)
    index = np.arange(len(raw))
    other = np.maximum.accumulate(np.where(raw == ord("\\"), -1, index))  # the last non-backslash so far
    backslashes = index - 1 - np.concatenate([[-1], other[:-1]])  # right before each byte
    quote = (raw == ord('"')) & (backslashes % 2 == 0)
    inside = np.cumsum(quote) % 2 == 1  # an opening quote and the string after it, up to its closing quote
    opens = ((raw == ord("[")) | (raw == ord("{"))) & ~inside
    closes = ((raw == ord("]")) | (raw == ord("}"))) & ~inside
    depth = np.cumsum(opens.view(np.int8) - closes.view(np.int8), dtype=np.int32)
    if depth.max() > 2:
        raise BadRequest(f'the JSON is nested {int(depth.max())} levels deep; a request needs 2 {{"texts": [...]}}')
    texts = int(np.count_nonzero(quote & inside & (depth == 2)))
    if texts > max_texts:
        raise BadRequest(f"a request holds 1 to {max_texts} texts; got {texts}")


_JSON_TYPES = {
    bool: "a boolean",
    type(None): "null",
    int: "a number",
    float: "a number",
    list: "a list",
    dict: "an object",
}


def _no_number(text: str):
    raise BadRequest(f"a text request holds strings only; got the number {text[:12]}")


def _check_texts(texts, max_texts: int, max_chars: int) -> list[str]:
    if not isinstance(texts, list):
        raise BadRequest(f'"texts" must be a list of strings; got {_JSON_TYPES.get(type(texts), "a string")}')
    if not 1 <= len(texts) <= max_texts:
        raise BadRequest(f"a request holds 1 to {max_texts} texts; got {len(texts)}")
    for i, t in enumerate(texts):
        if not isinstance(t, str):
            raise BadRequest(f'"texts" must hold strings; text {i} is {_JSON_TYPES.get(type(t), type(t).__name__)}')
        if len(t) > max_chars:
            raise BadRequest(f"text {i} has {len(t)} characters; this service takes at most {max_chars} a text")
        try:
            t.encode("utf-8")
        except UnicodeEncodeError:
            raise BadRequest(f"text {i} is not valid Unicode (it holds a lone surrogate escape)") from None
    return texts


def parse_texts(body: bytes, max_texts: int, max_chars: int, content_type: str = JSON_TYPE) -> list[str]:
    """A text export's request: JSON {"texts": [1 to `max_texts` strings of at most `max_chars` characters
    each]}, or BadRequest saying what is wrong. Its structure is checked before it is parsed
    (`text_json_structure`); no number is ever converted."""
    kind = content_type.split(";")[0].strip().lower()
    if kind == NPY_TYPE:
        raise BadRequest(f'this service serves a text cascade: send {JSON_TYPE} {{"texts": [...]}}, not {NPY_TYPE}')
    if kind not in (JSON_TYPE, ""):
        raise BadRequest(f"Content-Type must be {JSON_TYPE}; got {kind}")
    text_json_structure(body, max_texts)
    try:
        payload = json.loads(body, parse_int=_no_number, parse_float=_no_number, parse_constant=_no_number)
    except (ValueError, UnicodeDecodeError, RecursionError) as e:
        if isinstance(e, BadRequest):
            raise
        raise BadRequest('the body is not JSON; send {"texts": [...]} with strings') from None
    if not isinstance(payload, dict) or "texts" not in payload:
        hint = " (this service serves a text cascade)" if isinstance(payload, dict) and "images" in payload else ""
        raise BadRequest(f'expected a JSON object with a "texts" field{hint}')
    return _check_texts(payload["texts"], max_texts, max_chars)


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


def replica_grpc_on_loopback() -> None:
    """Binds this replica's inter-deployment gRPC server to 127.0.0.1. Ray Serve 2.60 binds it to "[::]:0",
    every interface, with no setting to change that; titans-serve runs a one-node cluster whose node address
    is 127.0.0.1, so nothing outside the machine needs it. Called in each deployment's constructor, which
    runs before the replica starts that server (tests/test_serving.py checks every listening socket)."""
    add = getattr(serve_replica, "add_port_to_grpc_server", None)
    if add is None:
        raise RuntimeError(
            "this Ray Serve version has no ray.serve._private.replica.add_port_to_grpc_server, so its replicas "
            "cannot be bound to loopback; titans-serve needs ray[serve]==2.60.0 (pyproject.toml)"
        )
    if getattr(add, "loopback", False):
        return

    def loopback(server, address: str):
        return add(server, address.replace("[::]:", "127.0.0.1:", 1))

    loopback.loopback = True
    serve_replica.add_port_to_grpc_server = loopback


@serve.deployment(
    autoscaling_config={"min_replicas": 1, "max_replicas": 2, "target_ongoing_requests": 4},
    max_ongoing_requests=4 * TEACHER_BATCH,
    ray_actor_options={"num_cpus": 0.5},
)
class Teacher:
    """The export's last stage; called with the deferred rows only."""

    def __init__(self, export_dir: str):
        replica_grpc_on_loopback()
        self.cascade = standalone.load(export_dir)
        self.stage = self.cascade.num_stages - 1
        self.cascade.warm_up([self.stage])  # every batch size it will run at, compiled before it serves

    @serve.batch(max_batch_size=TEACHER_BATCH, batch_wait_timeout_s=0.002)
    async def __call__(self, row_sets: list[np.ndarray]) -> list[np.ndarray]:
        sizes = [len(r) for r in row_sets]
        logits, _ = self.cascade.stage_outputs(self.stage, np.concatenate(row_sets))
        return np.split(logits, np.cumsum(sizes)[:-1])


async def call_with_deadline(call, rows: np.ndarray, timeout_s: float, retries: int = TEACHER_RETRIES):
    """`call(rows)` (a Serve handle's `remote`), retried after a failure (a replica that died), all within
    `timeout_s`; past it, or after `retries` failures, TeacherUnavailable. A call cut off by the deadline
    is cancelled, so that it does not stay queued for a teacher that never comes."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    for attempt in range(retries):
        response = call(rows)
        try:
            return await asyncio.wait_for(_result(response), max(deadline - loop.time(), 0.0))
        except TimeoutError:
            response.cancel()
            raise TeacherUnavailable(f"the teacher did not answer within {timeout_s:g} s") from None
        except Exception as e:
            logging.warning("teacher call failed (%s: %s)", type(e).__name__, e)
            if attempt == retries - 1 or loop.time() + 0.2 * (attempt + 1) >= deadline:
                raise TeacherUnavailable(f"the teacher failed: {type(e).__name__}: {e}") from e
            await asyncio.sleep(0.2 * (attempt + 1))
    raise AssertionError("unreachable")


async def _result(response):
    return await response


def error_response(e: Exception) -> JSONResponse:
    """A 4xx for a bad request, a 503 with Retry-After for an unavailable teacher."""
    if isinstance(e, TeacherUnavailable):
        return JSONResponse(
            {"error": f"{e}; retry after {RETRY_AFTER_S} s"},
            status_code=503,
            headers={"Retry-After": str(RETRY_AFTER_S)},
        )
    return JSONResponse({"error": str(e)}, status_code=getattr(e, "status", 400))


@serve.deployment(max_ongoing_requests=4 * INGRESS_BATCH, ray_actor_options={"num_cpus": 0.5})
class CascadeIngress:
    """HTTP ingress: validation, the cheap stages, and the teacher for the deferred rows."""

    def __init__(
        self,
        export_dir: str,
        teacher,
        max_images: int = MAX_IMAGES,
        mode: str = "cascade",
        max_body_bytes: int = MAX_BODY_BYTES,
        teacher_timeout_s: float = TEACHER_TIMEOUT_S,
        max_text_chars: int = MAX_TEXT_CHARS,
    ):
        replica_grpc_on_loopback()
        self.cascade = standalone.load(export_dir)
        self.teacher = teacher
        self.max_images, self.max_body_bytes = int(max_images), int(max_body_bytes)
        self.max_text_chars = int(max_text_chars)
        self.teacher_timeout_s = float(teacher_timeout_s)
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
        return await call_with_deadline(self.teacher.remote, rows, self.teacher_timeout_s)

    async def _inputs(self, request: Request) -> np.ndarray:
        """The request's rows as the stages take them: uint8 images, or a text export's token ids (its texts
        tokenized with the export's tokenizer, in a worker thread); BadRequest for a malformed request."""
        body = await read_body(request, self.max_body_bytes)
        content_type = request.headers.get("content-type", "")
        if self.cascade.modality != "text":
            return parse_images(body, self.shape, self.max_images, content_type)
        texts = parse_texts(body, self.max_images, self.max_text_chars, content_type)
        try:
            return await asyncio.to_thread(self.cascade.encode, texts)
        except (TypeError, ValueError) as e:  # the literal [PAD], as Titans' dataset refuses it
            raise BadRequest(str(e)) from None

    async def __call__(self, request: Request):
        try:
            images = await self._inputs(request)
            logits, answered, deferred, shared, positions = await self._cheap_stages(images)
            logits, answered = logits.copy(), answered.copy()
            if shared is not None:
                logits[deferred] = (await shared)[positions]
                answered[deferred] = self.cascade.num_stages - 1
        except (BadRequest, TeacherUnavailable) as e:
            return error_response(e)
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
    max_body_bytes: int = MAX_BODY_BYTES,
    teacher_timeout_s: float = TEACHER_TIMEOUT_S,
    max_text_chars: int = MAX_TEXT_CHARS,
):
    """The application: an ingress (in `mode`) and its teacher deployment (`name` keeps several apps apart).
    `max_body_bytes` and `max_images` (images, or a text export's texts) bound a request, `max_text_chars`
    each text; `teacher_timeout_s` bounds its wait for the teacher."""
    if min(int(max_images), int(max_body_bytes), int(max_text_chars)) < 1 or not float(teacher_timeout_s) > 0:
        raise ValueError(
            f"max_images, max_body_bytes, max_text_chars and teacher_timeout_s must be positive; got {max_images}, "
            f"{max_body_bytes}, {max_text_chars}, {teacher_timeout_s}"
        )
    teacher = Teacher.options(
        name=f"Teacher{name}",
        autoscaling_config={"min_replicas": 1, "max_replicas": int(teacher_max_replicas), "target_ongoing_requests": 4},
    ).bind(export_dir)
    return CascadeIngress.options(name=f"CascadeIngress{name}").bind(
        export_dir, teacher, max_images, mode, max_body_bytes, teacher_timeout_s, max_text_chars
    )
