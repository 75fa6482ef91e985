"""The committed encoding of a cascade study's logits: results/<study>/seed*/cascade_logits.npz.

A cascade run writes every stage's logits as float16 (titans/cascade/evaluate.py, about 2 bytes a logit);
`titans-results collect` stores them in 8 bits a logit instead, and `load` decodes either form:

  format                   0-d string array, FORMAT
  step                     0-d float32, STEP: the logit step of one code
  {split}/label            int16 (N,), as written by the run
  {split}/{stage}.top      float16 (N,): the row's largest logit (exact: the run wrote float16)
  {split}/{stage}.q8       uint8 (N, K): round((top - logit) / step), clipped to [0, 255], raised by a
                           step or two where the largest or second largest logit would share its code with
                           a smaller one: the argmax of a row, and of a row without one column (a defer
                           student's C classes), decodes as written, ties included

Decoded logit = top - step * q8 (float32). A logit within 255 * step (31.9) of its row's top is off by at
most step / 2 (2 steps where raised); one further below decodes as top - 31.875, whose softmax weight is
under 1.5e-14 of the top's. Every gate of titans/cascade/gates.py reads softmax quantities and the top logit, so decoded
logits recompute the offline sweeps to within a few test images (tests/test_results.py measures it).
Keys in DROPPED (read by nothing: the teacher's threshold-split logits) are not stored.
"""

from __future__ import annotations

import io
import os
from collections.abc import Mapping

import numpy as np

FORMAT = "titans-q8-logits-v1"
STEP = 0.125
DROPPED = ("val/teacher",)
_CODES = 255


def encode(arrays: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
    """{split/stage: float logits (N, K), split/label: (N,)} -> the stored arrays of the format above."""
    out = {"format": np.array(FORMAT), "step": np.array(STEP, np.float32)}
    for key, value in arrays.items():
        value = np.asarray(value)
        if key in DROPPED or key in ("format", "step"):
            continue
        if key.endswith("/label"):
            out[key] = value.astype(np.int16)
            continue
        if value.ndim != 2 or not np.issubdtype(value.dtype, np.floating):
            raise ValueError(f"{key}: expected float logits of shape (N, K), got {value.dtype} {value.shape}")
        top = value.max(-1).astype(np.float16)
        out[f"{key}.q8"] = _codes(top.astype(np.float32)[:, None] - value.astype(np.float32))
        out[f"{key}.top"] = top
    return out


def _codes(below: np.ndarray) -> np.ndarray:
    """Rounded steps below the row's top, raised where needed so that the largest logit has a smaller code
    than every other, and the second largest than every other but the top (ties keep equal codes): the
    argmax of the row, and of the row without any one column, decodes as written."""
    order = np.argsort(below, axis=-1, kind="stable")  # the top first; tied logits by index, as argmax
    b = np.take_along_axis(below, order, -1)
    q = np.rint(b / STEP)
    for i in range(1, q.shape[-1]):
        j = min(i - 1, 1)  # the first compares with the top, the rest with the second largest
        q[:, i] = np.where(b[:, i] > b[:, j], np.maximum(q[:, i], q[:, j] + 1), q[:, j])
    codes = np.empty_like(q)
    np.put_along_axis(codes, order, np.clip(q, 0, _CODES), -1)
    return codes.astype(np.uint8)


def decode(stored: Mapping[str, np.ndarray], where: str = "logits") -> dict[str, np.ndarray]:
    """The stored arrays -> {split/stage: float32 logits, split/label: labels}. Arrays without the format
    marker (a run's own float16 file) are returned as they are; `where` names the source in errors."""
    if "format" not in stored:
        return {k: np.asarray(stored[k]) for k in stored}
    fmt = str(np.asarray(stored["format"]))
    if fmt != FORMAT:
        raise ValueError(f"{where}: unknown logits format {fmt!r} (this Titans reads {FORMAT!r})")
    step = np.float32(np.asarray(stored["step"]))
    out = {}
    for key in stored:
        if key.endswith("/label"):
            out[key] = np.asarray(stored[key])
        elif key.endswith(".q8"):
            name = key[: -len(".q8")]
            if f"{name}.top" not in stored:
                raise ValueError(f"{where}: {key} has no {name}.top")
            top = np.asarray(stored[f"{name}.top"]).astype(np.float32)
            out[name] = top[:, None] - step * np.asarray(stored[key]).astype(np.float32)
    return out


def load(path: str) -> dict[str, np.ndarray]:
    """A local cascade_logits.npz, committed (8-bit) or a run's own (float16), as {key: array}."""
    with open(path, "rb") as f:
        return loads(f.read(), where=path)


def loads(data: bytes, where: str = "logits") -> dict[str, np.ndarray]:
    """The bytes of a cascade_logits.npz (from any storage) as {key: array}; `where` names it in errors."""
    with np.load(io.BytesIO(data), allow_pickle=False) as stored:
        return decode({k: stored[k] for k in stored.files}, where=where)


def save(path: str, arrays: Mapping[str, np.ndarray]) -> None:
    """Writes `arrays` (float logits and labels) encoded, compressed, through a temp file and a rename."""
    tmp = path + ".tmp.npz"
    np.savez_compressed(tmp, **encode(arrays))
    os.replace(tmp, path)
