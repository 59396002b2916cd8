"""Per-block rematerialisation of every backbone: same params, same numbers.

For each kind at a tiny size, `remat` "full" and "dots" must leave the
parameter tree (names, shapes, logical axes) unchanged, give the same
features and parameter gradients as "none", and really checkpoint: the
traced program holds one checkpoint per block, with the named policy.
"""

import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from divita_jax.models import r2plus1d, resnet, shufflenet, swin, vit, vivit
from divita_jax.models.remat import POLICIES, remat_block

# Absolute, scaled by the reference's largest magnitude when above 1: the
# recomputed forward is fused differently, so float32 sums round differently
# (here up to 1.2e-6 at |grad| 7.9, ResNet; full Swin-tiny 1.9e-5 at 47,
# 3e-14 in float64). Plain forward passes are bitwise equal.
TOL = 1e-6
# Both sides compile alike; skipping LLVM's costly passes halves the time.
FAST_COMPILE = {
  "xla_backend_optimization_level": 0,
  "xla_llvm_disable_expensive_passes": True,
}
# Fewer blocks than the named tiny variants (compiling three gradients per
# kind dominates the time), yet each block kind: with and without a strided
# or projected shortcut, Swin with and without a shifted window.
SHORT = dict(depths=(2, 1))
ONE_STAGE = dict(depths=(2,), num_heads=(1,))
# kind -> (module, fields, input shape, number of remat'd blocks).
CASES = {
  "vit": (vit.ViT, vit.decode_variant("tiny/8"), (1, 16, 16, 3), 2),
  "vivit": (vivit.ViViT, vit.decode_variant("tiny/8"), (1, 4, 16, 16, 3), 2),
  "swin": (
    swin.Swin,
    dict(swin.decode_variant("tiny"), **ONE_STAGE),
    (1, 32, 32, 3),
    2,
  ),
  "swin3d": (
    swin.Swin3D,
    dict(swin.decode_variant("tiny", True), **ONE_STAGE),
    (1, 4, 32, 32, 3),
    2,
  ),
  "resnet": (
    resnet.ResNet,
    dict(resnet.decode_variant("resnet18"), **SHORT),
    (1, 32, 32, 3),
    3,
  ),
  "shufflenet": (
    shufflenet.ShuffleNetV2,
    dict(shufflenet.decode_variant(0.5, dims=2), repeats=(2,)),
    (1, 32, 32, 3),
    2,
  ),
  "shufflenet3d": (
    shufflenet.ShuffleNetV2,
    dict(shufflenet.decode_variant(0.25, dims=3), repeats=(2,)),
    (1, 4, 32, 32, 3),
    2,
  ),
  "r2plus1d": (
    r2plus1d.R2Plus1D,
    dict(r2plus1d.decode_variant("r2plus1d_18"), **SHORT),
    (1, 4, 16, 16, 3),
    3,
  ),
}
REMATS = ("full", "dots")


def sub_jaxprs(value):
  """Jaxprs held in an equation parameter (possibly in a tuple)."""
  if isinstance(value, jax.extend.core.ClosedJaxpr):
    yield value.jaxpr
  elif isinstance(value, jax.extend.core.Jaxpr):
    yield value
  elif isinstance(value, (tuple, list)):
    for v in value:
      yield from sub_jaxprs(v)


def checkpoint_policies(jaxpr):
  """Policies of the checkpoint equations anywhere in `jaxpr`."""
  found = []
  for eqn in jaxpr.eqns:
    # jax.checkpoint's primitive: `remat2` in jax 0.10, `checkpoint` in
    # its printed form and older releases.
    if eqn.primitive.name in ("checkpoint", "remat", "remat2"):
      found.append(eqn.params["policy"])
    for value in eqn.params.values():
      for sub in sub_jaxprs(value):
        found += checkpoint_policies(sub)
  return found


def loss_and_grads(module, variables, x):
  """(pooled features, d sum(features * w) / d params)."""

  def loss(params):
    pooled, _ = module.apply({**variables, "params": params}, x)
    w = jnp.linspace(-1.0, 1.0, pooled.size).reshape(pooled.shape)
    return jnp.sum(pooled * w), pooled

  grad = jax.jit(jax.grad(loss, has_aux=True), compiler_options=FAST_COMPILE)
  return grad(variables["params"])


def random_variables(abstract, seed=0):
  """Random values for an abstract variable tree, no compilation (the
  init's would cost as much as the gradients'): unit-scale activations."""
  rng = np.random.default_rng(seed)

  def fill(path, leaf):
    name, shape = jax.tree_util.keystr(path[-1:]), leaf.shape
    if "var" in name:  # BatchNorm running variance
      return rng.uniform(0.5, 1.5, shape).astype(np.float32)
    if "scale" in name:
      return (1 + 0.1 * rng.normal(size=shape)).astype(np.float32)
    if len(shape) < 2:  # biases, BatchNorm running mean
      return (0.1 * rng.normal(size=shape)).astype(np.float32)
    fan_in = np.prod(shape[:-1])
    return (rng.normal(size=shape) / np.sqrt(fan_in)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(fill, nn.meta.unbox(abstract))


@pytest.fixture(scope="module", params=CASES)
def case(request):
  cls, fields, shape, blocks = CASES[request.param]
  module = cls(**fields)
  x = jax.random.normal(jax.random.key(1), shape)
  variables = random_variables(
    jax.eval_shape(module.init, jax.random.key(0), x)
  )
  grads, pooled = loss_and_grads(module, variables, x)
  return module, variables, x, blocks, (pooled, grads)


@pytest.mark.parametrize("remat", REMATS)
def test_same_tree_features_and_grads(case, remat):
  module, variables, x, blocks, (pooled, grads) = case
  rematted = module.clone(remat=remat)
  assert module.remat == "none"

  def abstract(m):  # boxed: shapes, dtypes and logical axis names
    return jax.eval_shape(m.init, jax.random.key(0), x)

  plain, remat_tree = abstract(module), abstract(rematted)
  assert jax.tree.structure(remat_tree) == jax.tree.structure(plain)
  assert jax.tree.leaves(remat_tree) == jax.tree.leaves(plain)
  assert nn.get_partition_spec(remat_tree) == nn.get_partition_spec(plain)

  jaxpr = jax.make_jaxpr(rematted.apply)(variables, x).jaxpr
  assert checkpoint_policies(jaxpr) == [POLICIES[remat]] * blocks
  assert not checkpoint_policies(
    jax.make_jaxpr(module.apply)(variables, x).jaxpr
  )

  if remat == "dots" and type(module).__name__ not in ("ViT", "Swin3D"):
    # The policy only changes what is saved: its placement is checked on
    # every kind, its gradients on two (compiles dominate the suite).
    return
  grads_r, pooled_r = loss_and_grads(rematted, variables, x)
  scale = max(1.0, float(jnp.abs(pooled).max()))
  np.testing.assert_allclose(pooled_r, pooled, rtol=0, atol=TOL * scale)
  assert jax.tree.structure(grads_r) == jax.tree.structure(grads)
  scale = max(1.0, *(float(jnp.abs(g).max()) for g in jax.tree.leaves(grads)))
  for g_r, g in zip(jax.tree.leaves(grads_r), jax.tree.leaves(grads)):
    np.testing.assert_allclose(g_r, g, rtol=0, atol=TOL * scale)


def test_unknown_policy_is_rejected():
  module = vit.ViT(**vit.decode_variant("tiny/8"), remat="everything")
  with pytest.raises(ValueError, match=re.escape("none | full | dots")):
    jax.eval_shape(module.init, jax.random.key(0), jnp.zeros((1, 8, 8, 3)))


class DropoutBlock(nn.Module):
  @nn.compact
  def __call__(self, x, deterministic):
    return nn.Dropout(0.5)(nn.Dense(4)(x), deterministic=deterministic)


def test_static_flag_argument():
  """A boolean `__call__` flag is static (self is argnum 0): no tracer."""
  block = remat_block(DropoutBlock, "full", static_argnums=(2,))
  x = jnp.ones((2, 3))
  variables = block().init(jax.random.key(0), x, True)
  y = block().apply(variables, x, True)
  y_train = block().apply(
    variables, x, False, rngs={"dropout": jax.random.key(1)}
  )
  np.testing.assert_array_equal(y, DropoutBlock().apply(variables, x, True))
  assert (np.asarray(y_train) == 0).any()
