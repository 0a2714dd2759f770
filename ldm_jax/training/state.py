"""The train state: a plain pytree of arrays (a flax struct dataclass)."""

from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


@flax.struct.dataclass
class TrainState:
  """Step counter, trainable params, optimiser state and (optional) EMA params."""

  step: jax.Array
  params: Any
  opt_state: Any
  ema_params: Any = None

  @classmethod
  def create(cls, params: Any, tx: optax.GradientTransformation, *, ema: bool = False) -> "TrainState":
    return cls(
        step=jnp.zeros((), jnp.int32),
        params=params,
        opt_state=tx.init(params),
        ema_params=jax.tree.map(jnp.copy, params) if ema else None,
    )
