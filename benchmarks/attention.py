r"""Self-attention alone: our blocked attention vs plain and PyTorch SDPA.

  python benchmarks/attention.py            # ~1 minute on a 2-core CPU
  python benchmarks/attention.py --smoke    # two small shapes, 1 round

Per shape (batch, tokens; 12 heads of 64 as in ViT-B): ms per call of
`divita_jax.models.attention.attention` (cache-blocked), the same math in
one block (what XLA gets from plain einsum + softmax),
jax.nn.dot_product_attention (XLA), and torch's
scaled_dot_product_attention, best of round-robin rounds in this process.
Tokens: 197 (ViT-B/16 at 224), 785 and 3137 (ViViT-B/16x2, 8 and 32 frames).
"""

import argparse

import jax
import jax.numpy as jnp
import numpy as np
import timing
import torch

from divita_jax.models import attention as attn

SHAPES = ((8, 197), (32, 197), (2, 785), (1, 3137), (2, 3137))
# One block, and blocks of heads.
SMOKE_SHAPES = ((2, 197), (1, 785))


def candidates(q, k, v):
  tq, tk, tv = (
    torch.from_numpy(np.array(a).transpose(0, 2, 1, 3).copy())
    for a in (q, k, v)
  )
  blocked = jax.jit(attn.attention)
  one_block = jax.jit(lambda q, k, v: attn.attention(q, k, v, 1 << 62))
  xla = jax.jit(lambda q, k, v: jax.nn.dot_product_attention(q, k, v))

  def sdpa():
    with torch.inference_mode():
      torch.nn.functional.scaled_dot_product_attention(tq, tk, tv)

  return {
    "blocked": lambda: blocked(q, k, v).block_until_ready(),
    "one block": lambda: one_block(q, k, v).block_until_ready(),
    "jax.nn.dpa": lambda: xla(q, k, v).block_until_ready(),
    "torch sdpa": sdpa,
  }


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--smoke", action="store_true", help="Tiny run (CI).")
  args = p.parse_args()
  shapes, rounds = (SMOKE_SHAPES, 1) if args.smoke else (SHAPES, args.rounds)
  names = ("blocked", "one block", "jax.nn.dpa", "torch sdpa")
  print(f"device: {jax.devices()[0].device_kind}; 12 heads x 64; ms per call")
  print(
    f"{'batch':>5}{'tokens':>7}{'block':>11}"
    + "".join(f"{n:>12}" for n in names)
    + f"{'vs torch':>10}"
  )
  for batch, tokens in shapes:
    rs = np.random.RandomState(0)
    q, k, v = (
      jnp.asarray(rs.randn(batch, tokens, 12, 64), jnp.float32)
      for _ in range(3)
    )
    times = timing.round_robin(candidates(q, k, v), rounds)
    best = {name: 1e3 * t.best for name, t in times.items()}
    heads, queries = attn.block_shape(batch, 12, tokens)
    print(
      f"{batch:>5}{tokens:>7}{f'{heads}h x {queries}q':>11}"
      + "".join(f"{best[n]:>12.1f}" for n in names)
      + f"{best['torch sdpa'] / best['blocked']:>9.2f}x"
    )


if __name__ == "__main__":
  main()
