"""The train state of one model and how it maps onto a checkpoint's items."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
from flax import nnx


@flax.struct.dataclass
class TrainState:
    step: jax.Array
    params: Any  # nnx.State of the model's nnx.Param variables
    model_state: Any  # everything else of the model (BatchNorm statistics, RNG streams)
    opt_state: Any
    # First step whose loss or gradient norm was not finite (-1: none). From that step on the step
    # function leaves params and optimizer state as they were, so nothing bad reaches a checkpoint.
    nonfinite_step: jax.Array

    @classmethod
    def create(cls, model: nnx.Module, tx) -> tuple[Any, TrainState]:
        """(graphdef, state at step 0) of a freshly built model and optimizer."""
        graphdef, params, model_state = nnx.split(model, nnx.Param, ...)
        state = cls(
            step=jnp.zeros((), jnp.int32),
            params=params,
            model_state=model_state,
            opt_state=tx.init(params),
            nonfinite_step=jnp.full((), -1, jnp.int32),
        )
        return graphdef, state

    def model_vars(self) -> dict:
        """The checkpoint's `model` item: what a frozen copy of the model needs."""
        return {"params": nnx.to_pure_dict(self.params), "rest": nnx.to_pure_dict(self.model_state)}

    def train_vars(self) -> dict:
        """The checkpoint's `train` item: what resuming needs beyond the model."""
        return {"step": self.step, "opt_state": self.opt_state, "nonfinite_step": self.nonfinite_step}

    def with_vars(self, model_vars: dict, train_vars: dict) -> TrainState:
        params = jax.tree.map(lambda x: x, self.params)
        rest = jax.tree.map(lambda x: x, self.model_state)
        nnx.replace_by_pure_dict(params, model_vars["params"])
        nnx.replace_by_pure_dict(rest, model_vars["rest"])
        return self.replace(
            params=params,
            model_state=rest,
            step=train_vars["step"],
            opt_state=train_vars["opt_state"],
            nonfinite_step=train_vars["nonfinite_step"],
        )
