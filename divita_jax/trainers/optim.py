"""The reference's optimizer and schedules, with PyTorch's semantics.

AdamW (decoupled weight decay) with AMSGrad as PyTorch computes it; the
learning rate is injected (`optax.inject_hyperparams`) so that the host-side
reduce-on-plateau sets it as an argument of the jitted step, with no
recompilation when it changes. (`optax.contrib.reduce_on_plateau` reacts to
the loss it is given at every update, not to an epoch's validation loss.)
Reduce-on-plateau (mode min, relative threshold, no cooldown) and early
stopping (min delta 0) are plain host-side state updated once per epoch.
"""

import math
from typing import Any

import flax
import jax
import jax.numpy as jnp
import optax


class AmsgradState(flax.struct.PyTreeNode):
  count: jax.Array
  mu: Any
  nu: Any
  nu_max: Any


def scale_by_adam_torch(b1, b2, eps, amsgrad) -> optax.GradientTransformation:
  """PyTorch Adam(W) moments: AMSGrad keeps the max of the raw second moment
  and bias-corrects it afterwards (optax's `scale_by_amsgrad` corrects first).
  """

  def init(params):
    zeros = lambda: jax.tree.map(jnp.zeros_like, params)
    return AmsgradState(jnp.zeros([], jnp.int32), zeros(), zeros(), zeros())

  def update(grads, state, params=None):
    del params
    count = state.count + 1
    mu = jax.tree.map(lambda m, g: b1 * m + (1 - b1) * g, state.mu, grads)
    nu = jax.tree.map(lambda v, g: b2 * v + (1 - b2) * g * g, state.nu, grads)
    nu_max = jax.tree.map(jnp.maximum, state.nu_max, nu) if amsgrad else nu
    c1 = 1 - b1 ** count.astype(jnp.float32)
    c2 = jnp.sqrt(1 - b2 ** count.astype(jnp.float32))
    updates = jax.tree.map(
      lambda m, v: (m / c1) / (jnp.sqrt(v) / c2 + eps), mu, nu_max
    )
    return updates, AmsgradState(count, mu, nu, nu_max)

  return optax.GradientTransformation(init, update)


def plateau_update(state: dict, val_loss: float, tc) -> dict:
  """PyTorch ReduceLROnPlateau (min, rel threshold, cooldown 0, eps 1e-8)."""
  best, bad, lr = state["best"], state["bad"], state["lr"]
  if best is None or val_loss < best * (1 - tc.plateau_threshold):
    best, bad = val_loss, 0
  else:
    bad += 1
  if bad > tc.plateau_patience:
    new_lr = lr * tc.plateau_factor
    if lr - new_lr > 1e-8:
      lr = new_lr
    bad = 0
  return {"best": best, "bad": bad, "lr": lr}


def early_stop_update(state: dict, val_loss: float) -> dict:
  """Early stopping with min delta 0; `improved` marks a new best epoch."""
  best, wait = state["best"], state["wait"]
  improved = best is None or val_loss < best
  if improved:
    best, wait = val_loss, 0
  else:
    wait += 1
  return {"best": best, "wait": wait, "improved": improved}


def warmup_cosine(base: float, warmup: int, total: int, step: int) -> float:
  """Learning rate of `step` (0-based): linear warmup over `warmup` steps,
  then cosine decay to 0 at step `total`."""
  if step < warmup:
    return base * (step + 1) / warmup
  t = (step - warmup) / max(total - warmup, 1)
  return base * 0.5 * (1 + math.cos(math.pi * t))
