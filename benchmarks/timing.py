"""Round-robin timing shared by the benchmarks (run as scripts from here)."""

import time


def best_times(fns, iters):
  """Round-robin timing of fns {name: fn} -> {name: best seconds}.

  Every candidate runs once per round, so all see the same machine load.
  """
  for fn in fns.values():
    fn()  # compile / warm up
  best = dict.fromkeys(fns, float("inf"))
  for _ in range(iters):
    for name, fn in fns.items():
      t = time.perf_counter()
      fn()
      best[name] = min(best[name], time.perf_counter() - t)
  return best
