"""Pre-training stages: masked-LM runs (`mlm.enabled`) and runs that start from another (`init_from`).

A masked-LM run is an ordinary run of the trainer with the `Method` below: its model is a
`models.MaskedLM` (the text Transformer the later run fine-tunes, plus a vocabulary head), its loss the
cross-entropy of the original ids at the corrupted positions (each row's mean, rows weighted alike), its
training metrics and its evaluation the masked tokens' accuracy and loss (`mlm_accuracy`, `mlm_loss`) on the
evaluation split under a fixed corruption. Labels are never read.

`init_from` names a finished run; `initial_params` copies each of its parameters (its backbone's, for a
masked-LM run) into the new model where the path and the shape agree, the classifier excepted, and refuses
a run of another dataset or tokenizer, an unfinished run, and a model whose other parameters would be left
at their initial values.
"""

from __future__ import annotations

import logging

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from titans import checkpoint as ckpt_lib
from titans import losses, models, paths, runs
from titans.train.method import Method

HEAD = "classifier"  # the fine-tuned model's own head: never copied


class InitFromError(ValueError):
    """`init_from` names a run this one cannot start from."""


def _build(config, info, seed, dtype, outputs):
    del outputs  # the vocabulary is the MaskedLM's output
    return models.build_masked_lm(config.model, info, seed=seed, rate=config.mlm.mask_rate, dtype=dtype)


def _forward(model, tokens, frozen, train: bool):
    del frozen
    logits, targets, chosen = model(tokens, train=train)
    return logits, {"targets": targets, "chosen": chosen}


def _token_losses(logits, aux):
    return losses.cross_entropy(logits, aux["targets"]), aux["chosen"].astype(jnp.float32)


def _loss(logits, aux, teacher_logits, batch, frozen, step):
    """Each row's mean cross-entropy over its chosen tokens; rows without tokens weigh 0."""
    del teacher_logits, batch, frozen, step
    ce, w = _token_losses(logits, aux)
    n = w.sum(axis=1)
    return (ce * w).sum(axis=1) / jnp.maximum(n, 1.0), (n > 0).astype(jnp.float32)


def _metrics(logits, aux, batch):
    del batch
    w = aux["chosen"].astype(jnp.float32)
    right = (jnp.argmax(logits, -1) == aux["targets"]).astype(jnp.float32)
    return {"mlm_accuracy": (right * w).sum() / jnp.maximum(w.sum(), 1.0)}


def _eval_sums(model, tokens, batch, frozen):
    """Sums over the batch's real rows of the chosen tokens' count, correct predictions and cross-entropy."""
    logits, aux = _forward(model, tokens, frozen, False)
    ce, w = _token_losses(logits, aux)
    w = w * batch["mask"].astype(jnp.float32)[:, None]
    right = (jnp.argmax(logits, -1) == aux["targets"]).astype(jnp.float32)
    return {
        "count": batch["mask"].astype(jnp.float32).sum(),
        "tokens": w.sum(),
        "correct": (right * w).sum(),
        "loss": (ce * w).sum(),
    }


def _eval_summary(totals) -> dict:
    tokens = max(float(totals["tokens"]), 1.0)
    return {
        "num_examples": int(totals["count"]),
        "masked_tokens": int(totals["tokens"]),
        "mlm_accuracy": float(totals["correct"]) / tokens,
        "mlm_loss": float(totals["loss"]) / tokens,
    }


def mlm_method() -> Method:
    """The Method of a masked-LM pre-training run (see the module docstring)."""
    return Method(
        build_model=_build,
        forward=_forward,
        loss=_loss,
        metrics=_metrics,
        eval_sums=_eval_sums,
        eval_summary=_eval_summary,
    )


# ------------------------------------------------------------------------------------------ init_from


def _flat(tree: dict) -> dict[tuple, np.ndarray]:
    """A pure-dict parameter tree as {path: array} (list indices stay ints, as `nnx.to_pure_dict` gives them)."""
    return traverse_util.flatten_dict(tree)


def source_params(config, info) -> tuple[dict, dict]:
    """(the parameters `config.init_from` copies, as a flat {path: array}, and the source's identity) of the
    finished run it names; refuses another dataset or tokenizer and an unfinished run. The checkpoint itself is
    checked against the source's config (`RunDir.load_model`)."""
    workdir = config.init_from
    run = runs.RunDir(workdir)
    if not run.exists:
        raise InitFromError(f"init_from={workdir!r} is not a Titans run (no config.json); train it there first.")
    if not run.finished:
        raise InitFromError(f"init_from={workdir!r} has not finished (no results.json); run it to its end first.")
    if run.config.dataset.name != info.name:
        raise InitFromError(
            f"init_from={workdir!r} was trained on {run.config.dataset.name!r}, this run reads {info.name!r}."
        )
    theirs = ckpt_lib.meta_for(run.config, run.info)["fields"].get("tokenizer.sha256")
    ours = ckpt_lib.meta_for(config, info)["fields"].get("tokenizer.sha256")
    if theirs != ours:
        raise InitFromError(
            f"init_from={workdir!r} reads tokenizer {theirs!r}, this run's data has {ours!r}: its token ids mean "
            f"other words."
        )
    step = run.resolve_step(-1)
    tree = nnx.to_pure_dict(run.load_model(step=step).params)
    if run.config.get("mlm") and run.config.mlm.enabled:
        tree = tree["backbone"]
    return _flat(jax.device_get(tree)), {"workdir": paths.text(workdir), "step": int(step)}


def initial_params(model: nnx.Module, config, info) -> dict | None:
    """Copies `config.init_from`'s parameters into `model` in place (see the module docstring); returns
    the source's identity, or None when `init_from` is empty."""
    if not config.get("init_from"):
        return None
    source, identity = source_params(config, info)
    params = nnx.state(model, nnx.Param)
    target = _flat(nnx.to_pure_dict(params))
    copied, missing = {}, []
    for path, value in target.items():
        if path[0] == HEAD:
            continue
        got = source.get(path)
        if got is None or tuple(np.shape(got)) != tuple(np.shape(value)):
            name = ".".join(map(str, path))
            missing.append(name + ("" if got is None else f" (shape {np.shape(got)} vs {np.shape(value)})"))
        else:
            copied[path] = jnp.asarray(got, jnp.asarray(value).dtype)
    if missing:
        raise InitFromError(
            f"init_from={config.init_from!r} does not hold this model's parameters: {', '.join(missing[:5])}"
            f"{' ...' if len(missing) > 5 else ''}; use a run of the same model.name and model.kwargs."
        )
    nnx.replace_by_pure_dict(params, traverse_util.unflatten_dict({**target, **copied}))
    nnx.update(model, params)
    logging.info("init_from: %d parameter arrays from %s (step %d)", len(copied), identity["workdir"], identity["step"])
    return {**identity, "arrays": len(copied)}
