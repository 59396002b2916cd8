"""Rematerialisation (gradient checkpointing) of backbone blocks.

Every backbone has a field `remat` (a POLICIES name) and wraps each
transformer block or residual block/unit with `remat_block`. The wrapped
class keeps its explicit `name=`, so the parameter tree, its logical axis
annotations and converted checkpoints are the same with or without remat;
only what the backward pass keeps in memory changes.
"""

import functools

import flax.linen as nn
import jax

# name -> jax.checkpoint policy (which intermediates a block saves for the
# backward pass; everything else is recomputed).
POLICIES = {
  "none": None,  # no remat: the block saves what autodiff needs
  "full": jax.checkpoint_policies.nothing_saveable,  # only the block input
  # Matmul outputs without batch dims (Dense / DenseGeneral projections).
  "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
}


@functools.cache  # one wrapped class per (cls, remat), not per trace
def remat_block(cls, remat: str, static_argnums: tuple[int, ...] = ()):
  """`cls` wrapped in `nn.remat` under the POLICIES entry `remat`.

  static_argnums: positions of non-array `__call__` arguments (booleans
  such as `deterministic`), counting `self` as 0, as `nn.remat` does; such
  arguments must then be passed positionally.
  """
  if remat not in POLICIES:
    raise ValueError(f"Unknown remat {remat!r}; one of {' | '.join(POLICIES)}.")
  if remat == "none":
    return cls
  return nn.remat(
    cls,
    policy=POLICIES[remat],
    prevent_cse=True,  # blocks run in Python loops, not under scan
    static_argnums=static_argnums,
  )
