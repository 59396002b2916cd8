"""Self-attention for the ViT / ViViT encoders, chosen by the backend.

CPU: cache-blocked softmax attention. ViViT-B/16x2 on a 32-frame clip
attends over 3137 tokens: one head's logits are 39 MB, all twelve 472 MB.
XLA on CPU writes the logits, reads them for the max, again for exp and
sum, and again for the second matmul; at that size every pass goes to
DRAM. We loop (lax.map, sequential) over blocks of heads and, when one head
is still too big, over query chunks, so each block's logits stay in cache.
Softmax normalization is applied after the second matmul ([q, head_dim]
divides instead of [q, keys]). Same result as plain softmax attention to
float rounding; on a 2-core EPYC it is 2.1x faster than one block at 785
and 3137 tokens (benchmarks/attention.py). Maps of at most 512 tokens take
one block.

GPU / TPU: that loop would be hundreds of small sequential kernels per
layer, so `jax.nn.dot_product_attention` runs instead: cuDNN's fused
(flash) attention for bf16/fp16 on GPUs where cuDNN supports the shape,
XLA's fused softmax attention otherwise (float32 logits either way).

The choice is made at trace time from `jax.default_backend()`; the
`implementation` argument or the `use(...)` context (whole models, whose
layers call `attention` without arguments) forces one. The loop runs over
heads and query positions, never the batch, so a batch sharded over the
mesh's data axis stays sharded inside it.
"""

import contextlib
import contextvars

import jax
import jax.numpy as jnp

# Logits bytes per block. 8 MiB measured best (2-16 MiB within noise) from
# 785 to 3137 tokens; larger blocks fall out of cache.
BLOCK_BYTES = 8 << 20
# Below this many bytes per attention map (tokens <= 512) one block is
# faster at any batch: 8.3 vs 14.2 ms at 8 x 197 tokens, 44 vs 63 ms at 32.
SMALL_MAP_BYTES = 1 << 20
# blocked: the loop above; one_block: the same math in one block (what XLA
# gets from plain einsum + softmax); dot_product: jax.nn's (cuDNN or XLA).
IMPLEMENTATIONS = ("blocked", "one_block", "dot_product")
_FORCED = contextvars.ContextVar("attention_implementation", default=None)


def default_implementation(backend: str | None = None) -> str:
  """'blocked' on CPU, 'dot_product' on GPU / TPU (default: this process's
  default backend)."""
  backend = backend or jax.default_backend()
  return "blocked" if backend == "cpu" else "dot_product"


@contextlib.contextmanager
def use(implementation: str):
  """Forces an implementation for calls traced inside the context (the
  choice is part of the trace: a function jit already traced keeps its
  own; jit a new one inside the context)."""
  _check(implementation)
  token = _FORCED.set(implementation)
  try:
    yield
  finally:
    _FORCED.reset(token)


def _check(implementation: str) -> None:
  if implementation not in IMPLEMENTATIONS:
    raise ValueError(
      f"Unknown attention implementation {implementation!r}; {IMPLEMENTATIONS}."
    )


def attention(q, k, v, block_bytes=BLOCK_BYTES, implementation=None):
  """softmax(q k^T / sqrt(head_dim)) v over [B, N, heads, head_dim].

  implementation: one of IMPLEMENTATIONS; None = the `use` context's, else
  default_implementation().
  """
  impl = implementation or _FORCED.get() or default_implementation()
  _check(impl)
  if impl == "dot_product":
    return dot_product(q, k, v)
  if impl == "one_block":
    block_bytes = 1 << 62
  return blocked(q, k, v, block_bytes)


def _cudnn_supported(q) -> bool:
  """cuDNN flash attention: GPU, half precision, head_dim a multiple of 8
  up to 128 (cuDNN 9 also needs compute capability 8.0+: checked by jax)."""
  head_dim = q.shape[-1]
  return (
    jax.default_backend() == "gpu"
    and q.dtype in (jnp.bfloat16, jnp.float16)
    and head_dim % 8 == 0
    and head_dim <= 128
  )


def dot_product(q, k, v):
  """jax.nn.dot_product_attention: cuDNN where supported, else XLA."""
  if _cudnn_supported(q):
    try:
      return jax.nn.dot_product_attention(q, k, v, implementation="cudnn")
    except (RuntimeError, ValueError, NotImplementedError):
      pass  # No cuDNN or an unsupported GPU: jax says so at trace time.
  return jax.nn.dot_product_attention(q, k, v, implementation="xla")


def _softmax_attend(q, k, v):
  """[B, G, Q, hd] queries on [B, G, N, hd] keys/values -> [B, G, Q, hd]."""
  logits = jnp.einsum(
    "bgqd,bgkd->bgqk", q, k, preferred_element_type=jnp.float32
  )
  logits_max = jax.lax.stop_gradient(logits.max(-1, keepdims=True))
  e = jnp.exp(logits - logits_max)
  y = jnp.einsum(
    "bgqk,bgkd->bgqd",
    e.astype(v.dtype),
    v,
    preferred_element_type=jnp.float32,
  )
  return (y / e.sum(-1, keepdims=True)).astype(v.dtype)


def block_shape(batch, heads, tokens, block_bytes=BLOCK_BYTES):
  """(heads per block, queries per block) keeping logits <= block_bytes."""
  if tokens * tokens * 4 <= SMALL_MAP_BYTES:
    return heads, tokens
  per_head = batch * tokens * tokens * 4  # float32 logits
  if per_head > block_bytes:  # one head per block, even query chunks
    chunks = -(-per_head // block_bytes)
    queries = -(-tokens // chunks)
    return 1, -(-queries // 8) * 8
  divisors = [d for d in range(1, heads + 1) if heads % d == 0]
  return max(d for d in divisors if d * per_head <= block_bytes), tokens


def blocked(q, k, v, block_bytes=BLOCK_BYTES):
  """Cache-blocked softmax attention over [B, N, heads, head_dim]."""
  b, n, h, hd = q.shape
  q = q * jnp.asarray(hd**-0.5, q.dtype)
  q, k, v = (a.transpose(0, 2, 1, 3) for a in (q, k, v))  # [B, H, N, hd]
  group, chunk = block_shape(b, h, n, block_bytes)
  if group == h and chunk == n:
    return _softmax_attend(q, k, v).transpose(0, 2, 1, 3)
  num_groups, num_chunks = h // group, -(-n // chunk)
  pad = num_chunks * chunk - n
  q = jnp.pad(q, ((0, 0), (0, 0), (0, pad), (0, 0)))
  q = q.reshape(b, num_groups, group, num_chunks, chunk, hd)
  q = q.transpose(1, 3, 0, 2, 4, 5)  # [groups, chunks, B, group, chunk, hd]
  q = q.reshape(num_groups * num_chunks, b, group, chunk, hd)
  k, v = (
    a.reshape(b, num_groups, group, n, hd).transpose(1, 0, 2, 3, 4)
    for a in (k, v)
  )  # [groups, B, group, N, hd]

  def block(args):
    i, q_block = args
    return _softmax_attend(q_block, k[i // num_chunks], v[i // num_chunks])

  y = jax.lax.map(block, (jnp.arange(num_groups * num_chunks), q))
  y = y.reshape(num_groups, num_chunks, b, group, chunk, hd)
  y = y.transpose(2, 0, 3, 1, 4, 5).reshape(b, h, num_chunks * chunk, hd)
  return y[:, :, :n].transpose(0, 2, 1, 3)  # [B, N, heads, hd]
