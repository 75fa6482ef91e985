"""Ensemble members: the connection between adjacent members, the frozen prefix that earlier
members form while a new one trains, loading members back, and their logits over a split.

A member is any Titans classifier (``titans.models``), called as
``model(x, train=..., capture=True) -> (logits, acts)``. With a connection, member w is a
:class:`ConnectedMember`: its own backbone's ``features`` joined with the previous member's
activation ``acts[layer]`` (through a learned projection) before its own classifier.

What the next member reads of that activation is :func:`connection_input`: for an image member the
activation flattened; for a text member (int32 token ids (B, L), 0 = padding) a pooled vector, so that
it does not depend on how much padding follows a sequence (the loaders and ``runs.predict`` cut batches
to length buckets). A text model's ``features`` is already pooled (the masked-pooled representation its
classifier reads); a per-token activation (``stage1`` of ``text_cnn``, ``block1`` of a Transformer:
(B, L, D)) is averaged over the real tokens only.
The previous member is frozen (it enters through ``stop_gradient``, is never trained, never saved
with the new member), so adjacent members can run as a pair: member w-1 computes its
activations once, and member w consumes them.
"""

from __future__ import annotations

import functools
from collections import OrderedDict

import flax.struct
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from titans import data as data_lib
from titans import models, runs
from titans.models.text import masked_mean

JOINS = ("concat", "add")


class ConnectedMember(nnx.Module):
    """A classifier whose head also sees the previous member's activations.

    join="concat": head(concat[features, relu(proj(prev))]) with proj: prev_dim -> width.
    join="add":    head(features + proj(prev)) with proj: prev_dim -> feature width.
    The backbone's own classifier is not used. ``prev=None`` stands for zero activations (a
    member called alone, e.g. to check shapes).
    """

    def __init__(self, base: nnx.Module, prev_dim: int, *, join: str, width: int, num_classes: int, rngs: nnx.Rngs):
        if join not in JOINS:
            raise ValueError(f"Unknown connection join {join!r}; expected one of {JOINS}.")
        if prev_dim < 1 or (join == "concat" and width < 1):
            raise ValueError(f"connection needs prev_dim >= 1 and width >= 1, got {prev_dim}, {width}")
        self.base = base
        self.join = join
        self.prev_dim = int(prev_dim)
        feat = int(base.classifier.in_features)
        out = int(width) if join == "concat" else feat
        self.proj = nnx.Linear(self.prev_dim, out, param_dtype=jnp.float32, rngs=rngs)
        self.head = nnx.Linear(
            feat + out if join == "concat" else feat, int(num_classes), param_dtype=jnp.float32, rngs=rngs
        )
        self.input_shape = base.input_shape
        self.num_classes = int(num_classes)
        self.modality = getattr(base, "modality", "image")  # what flops_per_example feeds it

    def __call__(self, x, train: bool = False, capture: bool = False, prev=None):
        _, acts = self.base(x, train=train, capture=True)
        own = acts["features"].astype(jnp.float32)
        if prev is None:
            prev = jnp.zeros((own.shape[0], self.prev_dim), jnp.float32)
        prev = prev.reshape(prev.shape[0], -1).astype(jnp.float32)
        if prev.shape[1] != self.prev_dim:
            raise ValueError(
                f"the connection expects {self.prev_dim} previous activations per example, got {prev.shape[1]}"
            )
        p = self.proj(prev)
        joined = jnp.concatenate([own, jax.nn.relu(p)], -1) if self.join == "concat" else own + p
        logits = self.head(joined)
        acts = OrderedDict(acts)
        acts["features"] = joined
        return (logits, acts) if capture else logits


def connection_input(act, inputs) -> jax.Array:
    """What the next member reads of an earlier member's activation ``act`` (B, ...) on ``inputs``, float32
    (B, D). With int token ids (B, L) as ``inputs`` (text, 0 = padding), a per-token activation (B, L, ...)
    is averaged over the real tokens (``inputs != 0``): padding positions never reach the next member, and
    the vector is the same whatever padding follows a sequence. Anything else is flattened (an image
    member's feature map; a text member's pooled ``features``)."""
    act = act.astype(jnp.float32)
    text = jnp.issubdtype(jnp.asarray(inputs).dtype, jnp.integer) and inputs.ndim == 2
    if text and act.ndim >= 3:
        if act.shape[1] != inputs.shape[1]:
            raise ValueError(
                f"the connection pools a per-token activation over the {inputs.shape[1]} token positions, but it "
                f"has {act.shape[1]} (a CLS token?): connect a pooled layer such as `features` instead"
            )
        act = masked_mean(act.reshape(*act.shape[:2], -1), inputs != 0)
    return act.reshape(act.shape[0], -1)


@flax.struct.dataclass
class FrozenMembers:
    """Members 1..w, frozen: static graphs, array variables (jit arguments), and how they chain."""

    graphdefs: tuple = flax.struct.field(pytree_node=False)
    params: tuple
    states: tuple
    connected: tuple = flax.struct.field(pytree_node=False)  # member i takes member i-1's acts[layer]
    layer: str = flax.struct.field(pytree_node=False, default="")

    def __len__(self) -> int:
        return len(self.graphdefs)

    def apply(self, images):
        """(per-member logits (W, B, K), the last member's acts[layer] or None), all stop_gradient."""
        outs, prev = [], None
        for g, p, s, conn in zip(self.graphdefs, self.params, self.states, self.connected):
            model = nnx.merge(g, p, jax.tree.map(lambda x: x, s))
            if conn:
                logits, acts = model(images, train=False, capture=True, prev=prev)
            else:
                logits, acts = model(images, train=False, capture=True)
            outs.append(logits.astype(jnp.float32))
            prev = jax.lax.stop_gradient(connection_input(acts[self.layer], images)) if self.layer else None
        return jax.lax.stop_gradient(jnp.stack(outs)), prev


def activation_dim(members: FrozenMembers, input_shape, modality: str = "image") -> int:
    """Size of what the next member reads of the last member's acts[layer] (`connection_input`), from shapes
    only; `modality` "text" for members over int32 token ids."""
    x = jax.ShapeDtypeStruct((1, *tuple(input_shape)), jnp.int32 if modality == "text" else jnp.float32)
    _, prev = jax.eval_shape(members.apply, x)
    if prev is None:
        raise ValueError("these members have no connection layer")
    return int(np.prod(prev.shape[1:]))


def build_member(spec: dict, info, *, seed: int, dtype) -> nnx.Module:
    """A member from its spec {"model": {"name", "kwargs"}, "connected", "prev_dim", "join", "width"}."""
    model_cfg = ml_collections.ConfigDict(spec["model"])
    base = models.build_model(model_cfg, info, seed=seed, dtype=dtype)
    if not spec.get("connected"):
        return base
    return ConnectedMember(
        base,
        spec["prev_dim"],
        join=spec["join"],
        width=spec["width"],
        num_classes=info.num_classes,
        rngs=nnx.Rngs(seed + 7919),
    )


def load_member(spec: dict, info, *, dtype=jnp.float32):
    """(graphdef, params, state) of a finished member run in spec["workdir"]."""
    run = runs.RunDir(spec["workdir"])
    if not run.checkpoint_steps():
        raise FileNotFoundError(f"The member run {spec['workdir']} has no checkpoint.")
    frozen = run.load_model(module=build_member(spec, info, seed=0, dtype=dtype))
    return frozen.graphdef, frozen.params, frozen.model_state


def _members_logits(members: FrozenMembers, images, info):
    """(B, W, K): every member's own logits of raw images."""
    return jnp.transpose(members.apply(data_lib.normalize(images, info, jnp.float32))[0], (1, 0, 2))


def member_logits(members: FrozenMembers, src, info, *, batch_size: int, mesh=None) -> tuple[np.ndarray, np.ndarray]:
    """Every member's own logits over a whole split, in order: ((N, W, K) float32, labels (N,))."""
    fn = functools.partial(_members_logits, info=info)
    return runs.predict_split(fn, members, src, info, batch_size=batch_size, mesh=mesh)


class Ensemble(nnx.Module):
    """A loaded ensemble as one module: ``ens(x)`` is F_k = f_1 + ... + f_k for k = ``ens.active``
    (all members by default), ``ens.member_logits(x)`` every member's logits (W, B, K).

    Members run in order, member i fed member i-1's ``acts[layer]`` where it is connected. Being
    a module, it is what ``titans.models.flops_per_example`` measures (set ``active`` first).
    """

    def __init__(self, modules: list, connected: tuple, layer: str):
        self.members = nnx.List(modules)
        self.connected = tuple(bool(c) for c in connected)
        self.layer = layer
        self.active = len(modules)
        self.modality = getattr(modules[0], "modality", "image") if modules else "image"

    def __len__(self) -> int:
        return len(self.members)

    def member_logits(self, x, upto: int | None = None):
        outs, prev = [], None
        for i, (m, conn) in enumerate(zip(self.members, self.connected)):
            if upto is not None and i >= upto:
                break
            logits, acts = m(x, train=False, capture=True, prev=prev) if conn else m(x, train=False, capture=True)
            outs.append(logits.astype(jnp.float32))
            prev = connection_input(acts[self.layer], x) if self.layer else None
        return jnp.stack(outs)

    def __call__(self, x, train: bool = False):
        del train  # members are always evaluated frozen
        return jnp.sum(self.member_logits(x, upto=self.active), axis=0)

    def frozen(self) -> FrozenMembers:
        split = [nnx.split(m, nnx.Param, ...) for m in self.members]
        return FrozenMembers(
            tuple(g for g, _, _ in split),
            tuple(p for _, p, _ in split),
            tuple(r for _, _, r in split),
            self.connected,
            self.layer,
        )


def load_ensemble(specs: list[dict], info, *, layer: str, dtype=jnp.float32) -> Ensemble:
    mods = [nnx.merge(*load_member(s, info, dtype=dtype)) for s in specs]
    return Ensemble(mods, tuple(bool(s.get("connected")) for s in specs), layer)


length_buckets = runs.length_buckets  # {bucket length: rows} of token ids, where text FLOPs are measured


def flops_per_example(module: nnx.Module, input_shape, buckets: dict | None = None) -> float:
    """XLA-measured FLOPs per example of `module` at `input_shape`; with `buckets` ({length: rows}, text), the
    mean over those rows of its FLOPs at each row's length (`runs.bucket_flops`)."""
    if not buckets:
        return models.flops_per_example(module, tuple(input_shape))
    return runs.bucket_flops(module, buckets)


def cumulative_flops(ensemble: Ensemble, input_shape, buckets: dict | None = None) -> list[float]:
    """XLA-measured FLOPs per example of F_1, F_2, ..., F_W (each prefix compiled as one program); with
    `buckets`, averaged over rows at their length buckets (`flops_per_example`)."""
    out = []
    try:
        for k in range(1, len(ensemble) + 1):
            ensemble.active = k
            out.append(flops_per_example(ensemble, input_shape, buckets))
    finally:
        ensemble.active = len(ensemble)
    return out
