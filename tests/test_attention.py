"""Blocked attention equals plain softmax attention, sharded or not."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from divita_jax.models import attention as attn


def reference(q, k, v):
  return jax.nn.dot_product_attention(q, k, v, implementation="xla")


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
