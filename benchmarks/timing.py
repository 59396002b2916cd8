"""Timed loops shared by the benchmarks (imported beside them, as scripts).

  times = timing.round_robin({"ours": f, "torch": g}, rounds=3)
  times["ours"].best, times["ours"].median, times["ours"].per_second(batch)

Every candidate runs `warmup` untimed times (compiles, caches), then once
per round in turn, so that all of them see the same machine load; the
machine is shared, so a candidate's best round is the least disturbed one.
"""

import dataclasses
import os
import statistics
import time


def cpu_seconds() -> float:
  """CPU seconds of this process's threads and of its finished children."""
  t = os.times()
  return time.process_time() + t.children_user + t.children_system


@dataclasses.dataclass(frozen=True)
class Times:
  """Wall and CPU seconds of each timed round of one candidate."""

  wall: tuple[float, ...]
  cpu: tuple[float, ...]

  @property
  def best(self) -> float:
    return min(self.wall)

  @property
  def median(self) -> float:
    return statistics.median(self.wall)

  @property
  def total(self) -> float:
    return sum(self.wall)

  @property
  def best_cpu(self) -> float:
    return min(self.cpu)

  @property
  def cpu_of_best(self) -> float:
    """CPU seconds of the round with the best wall time."""
    return self.cpu[self.wall.index(self.best)]

  def per_second(self, items: float) -> float:
    """Throughput of the best round: items / best seconds."""
    return items / self.best


def round_robin(fns: dict, rounds: int, warmup: int = 1) -> dict:
  """{name: Times} of zero-argument callables {name: fn}."""
  for _ in range(warmup):
    for fn in fns.values():
      fn()
  wall = {name: [] for name in fns}
  cpu = {name: [] for name in fns}
  for _ in range(rounds):
    for name, fn in fns.items():
      start, start_cpu = time.perf_counter(), cpu_seconds()
      fn()
      wall[name].append(time.perf_counter() - start)
      cpu[name].append(cpu_seconds() - start_cpu)
  return {n: Times(tuple(wall[n]), tuple(cpu[n])) for n in fns}
