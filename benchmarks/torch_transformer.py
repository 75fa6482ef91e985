"""The PyTorch twin of Titans' text Transformer (titans/models/transformer.py, `transformer` and
`transformer_small`), for benchmarks/transformer_step.py.

The same computation, written plainly: a token embedding plus learned positions, pre-LayerNorm blocks
(``x + Attention(LN(x))``, then ``x + MLP(LN(x))`` with tanh-approximated GELU, as ``jax.nn.gelu``), one
(width -> 3 * width) projection split as (3, heads, head_dim), ``F.scaled_dot_product_attention`` with the key
mask ``tokens != 0``, a final LayerNorm (epsilon 1e-6), the masked mean over real tokens, the classifier.
`load_flax_weights` copies a Flax model's parameters in, so both start from the same numbers; `build` takes the
structure `transformer_step.model_desc` reads from the Flax model. Only ``pool="mean"`` and ``dropout=0``
are written (what the benchmark times); `build` refuses the rest.

Importing this module imports torch (the `bench` extra): transformer_step.py imports it only where a
PyTorch side is built.
"""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

LN_EPS = 1e-6  # titans.models.transformer._layer_norm


class Attention(nn.Module):
    def __init__(self, width: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(width, 3 * width)
        self.out = nn.Linear(width, width)

    def forward(self, x, key_mask):
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).unbind(2)  # each (B, T, H, D/H)
        y = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=key_mask)
        return self.out(y.transpose(1, 2).reshape(b, t, d))


class EncoderBlock(nn.Module):
    def __init__(self, width: int, heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = nn.LayerNorm(width, eps=LN_EPS)
        self.attn = Attention(width, heads)
        self.norm2 = nn.LayerNorm(width, eps=LN_EPS)
        self.fc1 = nn.Linear(width, mlp_dim)
        self.fc2 = nn.Linear(mlp_dim, width)

    def forward(self, x, key_mask):
        x = x + self.attn(self.norm1(x), key_mask)
        return x + self.fc2(F.gelu(self.fc1(self.norm2(x)), approximate="tanh"))


class Encoder(nn.Module):
    def __init__(self, positions: int, depth: int, width: int, heads: int, mlp_dim: int):
        super().__init__()
        self.pos = nn.Parameter(torch.zeros(positions, width))
        self.blocks = nn.ModuleList(EncoderBlock(width, heads, mlp_dim) for _ in range(depth))
        self.norm = nn.LayerNorm(width, eps=LN_EPS)


class TextTransformer(nn.Module):
    """tokens (B, T) int, 0 = padding -> logits (B, classes) float32."""

    def __init__(self, vocab_size, width, positions, depth, heads, mlp_dim, num_classes):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.encoder = Encoder(positions, depth, width, heads, mlp_dim)
        self.classifier = nn.Linear(width, num_classes)

    def forward(self, tokens):
        mask = tokens != 0
        key_mask = mask[:, None, None, :]  # (B, 1, 1, T): every query attends to the real tokens only
        x = self.embed(tokens).float() + self.encoder.pos[: tokens.shape[1]]
        for block in self.encoder.blocks:
            x = block(x, key_mask)
        x = self.encoder.norm(x).float()
        m = mask[..., None].float()
        pooled = (x * m).sum(1) / m.sum(1).clamp_min(1.0)
        return self.classifier(pooled).float()


def build(desc: dict) -> TextTransformer:
    """The twin of the Flax model `desc` describes (`transformer_step.model_desc`)."""
    if desc["pool"] != "mean" or desc["dropout"] != 0.0:
        raise NotImplementedError(
            f"the PyTorch twin has mean pooling without dropout only; this model has pool={desc['pool']!r}, "
            f"dropout={desc['dropout']} (benchmarks/torch_transformer.py)"
        )
    fields = ("vocab_size", "width", "positions", "depth", "heads", "mlp_dim", "num_classes")
    return TextTransformer(**{k: desc[k] for k in fields})


def _target(module: nn.Module, name: str, arr: np.ndarray):
    """(torch tensor, array in its layout) for Flax variable `name` of `module`."""
    if name == "kernel":  # nnx.Linear (in, out) -> nn.Linear (out, in)
        return module.weight, arr.T
    if name in ("scale", "embedding"):
        return module.weight, arr
    return getattr(module, name), arr  # bias, pos


def load_flax_weights(tmodel: TextTransformer, params: dict) -> int:
    """Copies a Flax model's parameters (`nnx.to_pure_dict` of its `nnx.Param` state, numpy leaves) into the
    twin; every torch parameter must be written exactly once, with its shape. Returns the count."""
    written = {}

    def walk(tree, path):
        for key, value in tree.items():
            if isinstance(value, dict):
                walk(value, (*path, str(key)))
                continue
            module = tmodel
            for part in path:
                module = getattr(module, part) if not isinstance(module, nn.ModuleList) else module[int(part)]
            target, arr = _target(module, str(key), np.asarray(value, np.float32))
            where = ".".join((*path, str(key)))
            if tuple(target.shape) != arr.shape:
                raise ValueError(f"{where}: torch {tuple(target.shape)} vs Flax {arr.shape}")
            with torch.no_grad():
                target.copy_(torch.from_numpy(np.array(arr, np.float32, order="C")))  # a writable copy
            written[id(target)] = where

    walk(params, ())
    missing = [n for n, p in tmodel.named_parameters() if id(p) not in written]
    if missing:
        raise ValueError(f"torch parameters not loaded from the Flax model: {missing}")
    return len(written)
