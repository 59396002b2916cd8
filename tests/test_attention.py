"""Every attention implementation equals plain softmax attention (CPU)."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from divita_jax.models import attention as attn
from divita_jax.models import backbone


def reference(q, k, v):
  """Textbook softmax attention, float32 at the highest matmul precision."""
  q, k, v = (jnp.asarray(a, jnp.float32) for a in (q, k, v))
  hi = jax.lax.Precision.HIGHEST
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, precision=hi)
  weights = jax.nn.softmax(logits / np.sqrt(q.shape[-1]), axis=-1)
  return jnp.einsum("bhqk,bkhd->bqhd", weights, v, precision=hi)


def qkv(batch, tokens, heads, head_dim, dtype=jnp.float32):
  keys = jax.random.split(jax.random.key(0), 3)
  return [
    jax.random.normal(key, (batch, tokens, heads, head_dim), dtype)
    for key in keys
  ]


def test_block_shape():
  # Everything fits: one block of all heads and queries.
  assert attn.block_shape(2, 12, 197, 8 << 20) == (12, 197)
  # Maps of <= 512 tokens: one block whatever the budget.
  assert attn.block_shape(64, 12, 197, 1 << 20) == (12, 197)
  # 4 heads of 2x785x785 float32 logits fit 20 MB, 6 (a divisor) do not.
  assert attn.block_shape(2, 12, 785, 20_000_000) == (4, 785)
  # One head of ViViT-B/16x2 at 32 frames is 39 MB: query chunks of 664.
  assert attn.block_shape(1, 12, 3137, 8 << 20) == (1, 632)


@pytest.mark.parametrize(
  "block_bytes",
  [
    1 << 30,  # one block
    3 * 2 * 515 * 515 * 4,  # 3 of 6 heads per block
    2 * 515 * 104 * 4,  # one head, 104 queries per block: 5 * 104 = 515 + 5
  ],
)
def test_matches_reference(block_bytes):
  q, k, v = qkv(2, 515, 6, 8)
  want = reference(q, k, v)
  got = attn.attention(q, k, v, block_bytes=block_bytes)
  np.testing.assert_allclose(got, want, atol=2e-6)
  # Gradients (fine-tuning) too.
  loss = lambda f: lambda q, k, v: (f(q, k, v) ** 2).sum()  # noqa: E731
  blocked = lambda q, k, v: attn.attention(q, k, v, block_bytes)  # noqa: E731
  g_want = jax.grad(loss(reference), argnums=(0, 1, 2))(q, k, v)
  g_got = jax.grad(loss(blocked), argnums=(0, 1, 2))(q, k, v)
  for a, b in zip(g_got, g_want):
    np.testing.assert_allclose(a, b, atol=1e-5)


def test_bfloat16_keeps_float32_softmax():
  q, k, v = qkv(1, 520, 2, 16, jnp.bfloat16)
  got = attn.attention(q, k, v, block_bytes=1 * 520 * 64 * 4)
  assert got.dtype == jnp.bfloat16
  f32 = [a.astype(jnp.float32) for a in (q, k, v)]
  np.testing.assert_allclose(
    got.astype(jnp.float32), reference(*f32), atol=2e-2
  )


def test_batch_sharded_stays_sharded_and_equal():
  mesh = Mesh(np.array(jax.devices()[:4]), ("data",))
  spec = NamedSharding(mesh, PartitionSpec("data"))
  q, k, v = qkv(4, 515, 6, 8)
  f = jax.jit(lambda q, k, v: attn.attention(q, k, v, 4 * 515 * 104 * 4))
  got = f(*(jax.device_put(a, spec) for a in (q, k, v)))
  assert got.sharding.is_equivalent_to(spec, got.ndim)
  np.testing.assert_allclose(got, reference(q, k, v), atol=2e-6)
  # No collective: each device attends over its own rows only.
  hlo = f.lower(*(jax.device_put(a, spec) for a in (q, k, v))).compile()
  assert "all-gather" not in hlo.as_text()


@pytest.mark.parametrize("implementation", attn.IMPLEMENTATIONS)
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_each_implementation_matches_reference(implementation, dtype):
  q, k, v = qkv(2, 515, 4, 16, dtype)  # 515 tokens: blocked loops.
  got = jax.jit(
    lambda q, k, v: attn.attention(q, k, v, implementation=implementation)
  )(q, k, v)
  assert got.dtype == dtype
  atol = 2e-6 if dtype == jnp.float32 else 2e-2
  np.testing.assert_allclose(
    got.astype(jnp.float32), reference(q, k, v), atol=atol
  )


def _has_loop(fn, *args) -> bool:
  jaxpr = str(jax.make_jaxpr(fn)(*args))  # lax.map traces to a scan.
  return "scan[" in jaxpr or "while[" in jaxpr


def test_chosen_by_backend_or_forced():
  assert attn.default_implementation("cpu") == "blocked"
  assert attn.default_implementation("gpu") == "dot_product"
  assert attn.default_implementation("tpu") == "dot_product"
  assert attn.default_implementation() == "blocked"  # This CPU.
  q, k, v = qkv(1, 600, 2, 8)

  def small_blocks(q, k, v):  # A new function each time: traced afresh.
    return attn.attention(q, k, v, 600 * 64 * 4)

  assert _has_loop(small_blocks, q, k, v)  # The CPU default loops.
  # Layers call attention() without arguments: the context reaches them
  # when they are traced inside it.
  for impl, loops in [("one_block", False), ("dot_product", False)]:
    with attn.use(impl):
      assert _has_loop(lambda *a: small_blocks(*a), q, k, v) is loops
  with pytest.raises(ValueError, match="Unknown attention"):
    attn.attention(q, k, v, implementation="flash")


def test_model_features_equal_across_implementations():
  module, params, spec = backbone.create_backbone(
    "vivit", "tiny/8", resolution=48, num_frames=4
  )  # 2 x 36 + 1 tokens.
  params = params["params"]
  x = jax.random.normal(jax.random.key(1), (2, 4, 48, 48, 3))
  out = {}
  for impl in attn.IMPLEMENTATIONS:
    with attn.use(impl):  # Traced inside: a fresh jit per implementation.
      out[impl] = jax.jit(lambda p, x: module.apply({"params": p}, x)[0])(
        params, x
      )
  for impl in attn.IMPLEMENTATIONS:
    np.testing.assert_allclose(out[impl], out["blocked"], atol=1e-5)
