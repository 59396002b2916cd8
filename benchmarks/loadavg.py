"""Machine load around a benchmark: is a timing taken on an idle machine?

  with loadavg.Watch() as load:
    ...  # timed runs
  print(load.report())  # load averages at start and end, others' CPU use
  if load.busy: ...     # mark ratios "under load"

Rule: a run is *under load* when other processes used more than 10% of
the machine's CPU time during it (from /proc/stat, minus this process and
its children). Without /proc/stat (not Linux): when the 1-min load
average at the start is above 0.5 per core. Load averages are printed but
are not the rule where /proc/stat exists: they lag by minutes and count
this benchmark's own threads, so a second run started right after a first
would look loaded.

Why it matters: threaded decoding suffers most from other jobs, and a
process with more threads gets a larger share of a loaded machine, so a
ratio taken under load can even exceed 1.0x decode-only.
"""

import os

MAX_OTHERS_SHARE = 0.10  # Others' CPU time / (wall time * cores).
MAX_LOAD_PER_CORE = 0.5  # Fallback: 1-min load average at the start.


def _busy_and_total() -> tuple[float, float] | None:
  """Busy and total CPU seconds of the whole machine, or None."""
  try:
    with open("/proc/stat") as f:
      fields = [float(x) for x in f.readline().split()[1:]]
  except (OSError, ValueError):
    return None
  hz = os.sysconf("SC_CLK_TCK")
  idle = fields[3] + (fields[4] if len(fields) > 4 else 0.0)  # + iowait.
  total = sum(fields[:8])  # Guest time is already in user time.
  return (total - idle) / hz, total / hz


def _own_cpu() -> float:
  t = os.times()
  return t.user + t.system + t.children_user + t.children_system


class Watch:
  """Context manager: load averages and others' CPU share over a block."""

  def __init__(self):
    self.cores = os.cpu_count() or 1
    self.start = self.end = (0.0, 0.0, 0.0)
    self.others_share = None  # Fraction of the machine; None if unknown.

  def __enter__(self):
    self.start = os.getloadavg()
    self._machine = _busy_and_total()
    self._own = _own_cpu()
    return self

  def __exit__(self, *exc):
    self.end = os.getloadavg()
    machine = _busy_and_total()
    if machine is not None and self._machine is not None:
      busy = machine[0] - self._machine[0]
      total = machine[1] - self._machine[1]
      others = busy - (_own_cpu() - self._own)
      self.others_share = max(0.0, others) / total if total > 0 else None
    return False

  @property
  def busy(self) -> bool:
    if self.others_share is not None:
      return self.others_share > MAX_OTHERS_SHARE
    return self.start[0] > MAX_LOAD_PER_CORE * self.cores

  def report(self) -> str:
    fmt = lambda la: " ".join(f"{x:.2f}" for x in la)
    others = (
      "unknown"
      if self.others_share is None
      else f"{100 * self.others_share:.0f}% of the CPU time"
    )
    if self.others_share is None:
      rule = f"start 1-min load > {MAX_LOAD_PER_CORE} per core"
    else:
      rule = f"others > {100 * MAX_OTHERS_SHARE:.0f}% of the CPU time"
    verdict = "UNDER LOAD" if self.busy else "idle"
    return (
      f"load average (1, 5, 15 min) at start: {fmt(self.start)}, at end: "
      f"{fmt(self.end)}; {self.cores} cores; other processes used "
      f"{others} during the runs -> {verdict} (under load: {rule})"
    )
