"""Image transforms on uint8 numpy batches (host side) and `normalize` (device side).

Random transforms take their random numbers as arguments, drawn by the caller for the whole
*global* batch, so an example's augmentation depends only on (seed, step, global row) and not
on how many processes share the batch.

- 'crop_flip' (CIFAR): zero-pad 4 pixels on each side (as in the ResNet paper and
  torchvision's `RandomCrop(32, padding=4)`), take a random crop of the original size, flip
  horizontally with probability 1/2. Random draws are vectorised; the copy is a slice per image.
- 'imagenet': training = Inception-style random-resized-crop (area 8%-100%, aspect 3/4-4/3,
  10 attempts, then a centre crop) resized to 224 + flip; evaluation = resize the shorter
  side to 256 + centre crop 224. Done per image with pillow (images have different sizes).
"""

from __future__ import annotations

import math

import jax.numpy as jnp
import numpy as np
from PIL import Image

CROP_PAD = 4
IMAGENET_SIZE = 224
IMAGENET_RESIZE = 256
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3.0 / 4.0, 4.0 / 3.0)
RRC_ATTEMPTS = 10


# ---------------------------------------------------------------- crop + flip (fixed-size images)


def crop_flip_params(rng: np.random.Generator, n: int, pad: int = CROP_PAD) -> dict:
    return {
        "dy": rng.integers(0, 2 * pad + 1, size=n),
        "dx": rng.integers(0, 2 * pad + 1, size=n),
        "flip": rng.random(n) < 0.5,
    }


def crop_flip(images: np.ndarray, params: dict, pad: int = CROP_PAD) -> np.ndarray:
    """Zero-pad by `pad`, crop back to (H, W) at offsets (dy, dx), flip columns where `flip`."""
    b, h, w, c = images.shape
    padded = np.zeros((b, h + 2 * pad, w + 2 * pad, c), images.dtype)
    padded[:, pad : pad + h, pad : pad + w] = images
    out = np.empty_like(images)
    # One slice copy per image: measured 0.55 ms per 128 CIFAR images, against 3.4 ms for a
    # single fancy-indexed gather over the batch (numpy's gather is slow on uint8 pixels).
    for i, (dy, dx, flip) in enumerate(zip(params["dy"].tolist(), params["dx"].tolist(), params["flip"].tolist())):
        window = padded[i, dy : dy + h, dx : dx + w]
        out[i] = window[:, ::-1] if flip else window
    return out


# ------------------------------------------------------------------- ImageNet (variable size)


def _as_rgb(image: np.ndarray) -> np.ndarray:
    image = np.asarray(image)
    if image.ndim == 2:
        image = image[..., None]
    if image.shape[-1] == 1:
        image = np.repeat(image, 3, axis=-1)
    return np.ascontiguousarray(image[..., :3], dtype=np.uint8)


def random_resized_crop_params(rng: np.random.Generator, n: int) -> dict:
    k = RRC_ATTEMPTS
    log_lo, log_hi = math.log(RRC_RATIO[0]), math.log(RRC_RATIO[1])
    return {
        "scale": rng.uniform(*RRC_SCALE, size=(n, k)),
        "log_ratio": rng.uniform(log_lo, log_hi, size=(n, k)),
        "uy": rng.random((n, k)),
        "ux": rng.random((n, k)),
        "flip": rng.random(n) < 0.5,
    }


def _rrc_box(h: int, w: int, scale, log_ratio, uy, ux) -> tuple[int, int, int, int]:
    """(top, left, height, width) of the crop, torchvision's RandomResizedCrop rule."""
    area = h * w
    for s, lr, fy, fx in zip(scale, log_ratio, uy, ux):
        ratio = math.exp(lr)
        cw = int(round(math.sqrt(area * s * ratio)))
        ch = int(round(math.sqrt(area * s / ratio)))
        if 0 < cw <= w and 0 < ch <= h:
            return int(fy * (h - ch + 1)), int(fx * (w - cw + 1)), ch, cw
    # No attempt fitted: centre crop with the aspect ratio clamped into range.
    in_ratio = w / h
    if in_ratio < RRC_RATIO[0]:
        cw, ch = w, int(round(w / RRC_RATIO[0]))
    elif in_ratio > RRC_RATIO[1]:
        ch, cw = h, int(round(h * RRC_RATIO[1]))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


def imagenet_train_one(image: np.ndarray, params: dict, i: int, size: int = IMAGENET_SIZE) -> np.ndarray:
    """Random-resized-crop + flip of one image with row `i` of `params`."""
    image = _as_rgb(image)
    h, w = image.shape[:2]
    top, left, ch, cw = _rrc_box(h, w, params["scale"][i], params["log_ratio"][i], params["uy"][i], params["ux"][i])
    out = Image.fromarray(image).resize((size, size), Image.BILINEAR, box=(left, top, left + cw, top + ch))
    out = np.asarray(out)
    return out[:, ::-1] if params["flip"][i] else out


def imagenet_eval_one(image: np.ndarray, size: int = IMAGENET_SIZE, resize: int = IMAGENET_RESIZE) -> np.ndarray:
    """Resize the shorter side to `resize`, then take the centre `size` x `size` crop."""
    image = _as_rgb(image)
    h, w = image.shape[:2]
    s = resize / min(h, w)
    nh, nw = max(size, int(round(h * s))), max(size, int(round(w * s)))
    resized = np.asarray(Image.fromarray(image).resize((nw, nh), Image.BILINEAR))
    top, left = (nh - size) // 2, (nw - size) // 2
    return resized[top : top + size, left : left + size]


# ------------------------------------------------------------------------------ device side


def normalize(images, info, dtype=None):
    """(images - mean) / std per channel, mean/std on the [0, 255] scale; jit-friendly."""
    if getattr(info, "modality", "image") == "text":  # int32 token ids pass through unchanged
        return jnp.asarray(images)
    dtype = dtype or jnp.float32
    mean = np.asarray(info.mean, dtype=np.float32)
    inv_std = 1.0 / np.asarray(info.std, dtype=np.float32)
    return ((jnp.asarray(images).astype(jnp.float32) - mean) * inv_std).astype(dtype)
