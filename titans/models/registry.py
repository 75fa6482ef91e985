"""Name -> model registry behind :func:`titans.models.create_model`.

Each name maps to a model class plus the keyword arguments the name fixes (``resnet20`` is
``CifarResNet`` with ``depth=20``). Keyword arguments are checked against the class before
construction, so a misspelt or alias-fixed argument fails loudly instead of being ignored.
"""

from __future__ import annotations

import difflib
import inspect
from typing import Any, NamedTuple

import jax
import jax.extend
import jax.numpy as jnp
from flax import nnx

from titans.models.audio import Conv1DNet
from titans.models.mobilenet import MobileNetV2
from titans.models.resnet_cifar import CifarResNet
from titans.models.resnet_imagenet import ImageNetResNet
from titans.models.simple import CNN, MLP
from titans.models.text import TextBag, TextCNN
from titans.models.transformer import TextTransformer, ViT
from titans.models.wide_resnet import WideResNet


class _Entry(NamedTuple):
    cls: type
    fixed: dict[str, Any]


_CRD_X4 = {"widths": (64, 128, 256), "stem_width": 32}

_REGISTRY: dict[str, _Entry] = {
    "mlp": _Entry(MLP, {}),
    "conv1d": _Entry(Conv1DNet, {}),  # 1-D over time, for (frames, mel bands, 1) speech inputs
    "cnn": _Entry(CNN, {}),
    "cifar_resnet": _Entry(CifarResNet, {}),
    **{f"resnet{d}": _Entry(CifarResNet, {"depth": d}) for d in (8, 14, 20, 32, 44, 56, 110)},
    "resnet8x4": _Entry(CifarResNet, {"depth": 8, **_CRD_X4}),
    "resnet32x4": _Entry(CifarResNet, {"depth": 32, **_CRD_X4}),
    "wide_resnet": _Entry(WideResNet, {}),
    **{
        f"wrn_{d}_{k}": _Entry(WideResNet, {"depth": d, "widen": k})
        for d, k in ((16, 1), (16, 2), (16, 4), (28, 10), (40, 1), (40, 2), (40, 4))
    },
    "mobilenet_v2": _Entry(MobileNetV2, {}),
    **{a: _Entry(ImageNetResNet, {"arch": a}) for a in ("resnet18", "resnet34", "resnet50")},
    "vit": _Entry(ViT, {}),
    # Text models: int32 token ids (B, L), input_shape (max_tokens,), vocab_size from the dataset.
    "text_bag": _Entry(TextBag, {}),
    "text_cnn": _Entry(TextCNN, {}),
    "transformer": _Entry(TextTransformer, {}),
    "transformer_small": _Entry(TextTransformer, {"depth": 2, "width": 64, "heads": 2}),
}

MODEL_NAMES: list[str] = sorted(_REGISTRY)

# Arguments every model takes from create_model itself rather than from **kwargs (vocab_size: text models).
_COMMON = ("num_classes", "input_shape", "rngs", "dtype", "vocab_size")


def modality(name: str) -> str:
    """What model ``name`` reads: ``"image"`` (float (B, H, W, C)) or ``"text"`` (int32 token ids (B, L))."""
    return getattr(_lookup(name).cls, "modality", "image")


def model_kwargs(name: str) -> dict[str, Any]:
    """The optional keyword arguments of ``name`` and their defaults."""
    entry = _lookup(name)
    params = inspect.signature(entry.cls.__init__).parameters
    return {k: p.default for k, p in params.items() if k != "self" and k not in _COMMON and k not in entry.fixed}


def _lookup(name: str) -> _Entry:
    try:
        return _REGISTRY[name]
    except (KeyError, TypeError):
        close = difflib.get_close_matches(str(name), MODEL_NAMES, n=5, cutoff=0.5)
        hint = f" Did you mean {', '.join(map(repr, close))}?" if close else ""
        raise ValueError(f"Unknown model name {name!r}.{hint} Known models: {', '.join(MODEL_NAMES)}") from None


def create_model(
    name: str,
    *,
    num_classes: int,
    input_shape: tuple[int, int, int],
    rngs: nnx.Rngs,
    dtype=jnp.float32,
    vocab_size: int = 0,
    **kwargs,
) -> nnx.Module:
    """Build a registered model. ``dtype`` is the compute dtype; parameters are float32. ``vocab_size``
    (the dataset's) goes to text models, which need it; image models ignore it."""
    entry = _lookup(name)
    accepted = model_kwargs(name)
    fixed = sorted(set(kwargs) & set(entry.fixed))
    if fixed:
        bases = [n for n, e in _REGISTRY.items() if e.cls is entry.cls and not e.fixed]
        where = f"use {bases[0]!r} to set them" if bases else "they cannot be changed"
        raise TypeError(f"model {name!r} fixes {', '.join(fixed)}; {where}")
    unknown = sorted(set(kwargs) - set(accepted))
    if unknown:
        raise TypeError(
            f"model {name!r} got unexpected keyword argument(s) {', '.join(map(repr, unknown))}; "
            f"it accepts: {', '.join(accepted) or 'none'}"
        )
    dtype = jnp.dtype(dtype)
    if not jnp.issubdtype(dtype, jnp.floating):
        raise ValueError(f"dtype must be a floating dtype, got {dtype}")
    if int(num_classes) < 1:
        raise ValueError(f"num_classes must be >= 1, got {num_classes}")
    if modality(name) == "text":
        kwargs["vocab_size"] = int(vocab_size)
    return entry.cls(
        num_classes=int(num_classes),
        input_shape=tuple(input_shape),
        rngs=rngs,
        dtype=dtype,
        **entry.fixed,
        **kwargs,
    )


def build_model(model_cfg, info, *, seed: int, dtype=jnp.float32, outputs: int | None = None) -> nnx.Module:
    """The model a config's `model` section names, for dataset `info`, with `outputs` logits
    (default: the dataset's classes). Parameters are initialised from `seed`, by `initialise`."""
    return initialise(lambda: create_from_config(model_cfg, info, rngs=nnx.Rngs(seed), dtype=dtype, outputs=outputs))


def create_from_config(model_cfg, info, *, rngs: nnx.Rngs, dtype=jnp.float32, outputs: int | None = None):
    """``create_model`` for a config's `model` section and dataset `info` (its input shape, vocabulary and
    classes), refusing a model of the other modality; eager (``build_model`` wraps it in ``initialise``)."""
    kwargs = model_cfg.kwargs.to_dict() if hasattr(model_cfg.kwargs, "to_dict") else dict(model_cfg.kwargs)
    data_modality = getattr(info, "modality", "image")
    if modality(model_cfg.name) != data_modality:
        raise ValueError(
            f"model.name {model_cfg.name!r} reads {modality(model_cfg.name)} inputs, but dataset {info.name!r} "
            f"holds {data_modality} (DatasetInfo.modality)"
        )
    return create_model(
        model_cfg.name,
        num_classes=outputs or info.num_classes,
        input_shape=tuple(info.image_shape),
        rngs=rngs,
        dtype=dtype,
        vocab_size=getattr(info, "vocab_size", 0),
        **kwargs,
    )


# XLA options of `initialise`'s one program on CPU: LLVM's optimisation level 0. The initialisers' random
# normals (threefry + an inverse-erf polynomial) took XLA:CPU 0.3-1.5 s to compile each at the default level;
# in a fresh process the CNN teacher's whole initialiser compiles and runs in 0.80 s at level 0, against 2.17 s
# at the default level and 2.97 s op by op (medians of 5, the one-off benchmarks/init_speed.py,
# in git before b2b70dd). It runs once per model.
INIT_COMPILER_OPTIONS_CPU = {"xla_backend_optimization_level": 0}
_TOP_LEVEL_TRACE = jax.extend.core.get_opaque_trace_state()  # no jit, eval_shape, grad or vmap tracing


def initialise(make) -> nnx.Module:
    """``make()`` (a model constructor without arguments), its initialisers run as one jitted program.

    Built eagerly, every initialiser is its own small XLA program, each compiled on first use (a cold
    quickstart spent 6.1 of its 14.1 s of compilation on the random normals' 8 programs). Here the
    constructor runs once abstractly (`nnx.eval_shape`, which also raises its argument errors) and once
    under ``jax.jit``. The values come from the same random streams as the eager construction; the normal
    transform's float rounding may differ in the last bit (the program is fused differently), so a model
    built here and one built eagerly from the same seed agree to 1 ulp, not bit for bit. Two builds here
    are bit-identical. Called while a jit or eval_shape traces (a model built inside a traced function), it
    is ``make()``: the initialisers join the caller's program, which a nested jit's options could not."""
    if jax.extend.core.get_opaque_trace_state() != _TOP_LEVEL_TRACE:
        return make()
    graphdef, _ = nnx.split(nnx.eval_shape(make))
    options = INIT_COMPILER_OPTIONS_CPU if jax.default_backend() == "cpu" else None
    state = jax.jit(lambda: nnx.split(make())[1], compiler_options=options)()
    return nnx.merge(graphdef, state)
