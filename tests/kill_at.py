"""Kill a training child at a step it reports (no sleeps as timing).

The child runs with `train.log_every_steps=1`, so the fold loop logs
"Step k: ..." after every step; `kill_at_step` reads its output until the
epoch-1 line (the first checkpoint follows it), then until step
steps_per_epoch + offset (a seeded offset into epoch 2), and sends SIGKILL.
"""

import re
import signal

import numpy as np

_STEP = re.compile(r"Step (\d+): ")
_EPOCH_1 = re.compile(r"Epoch 1: ")


def kill_at_step(proc, seed: int) -> tuple[int, str]:
  """(the step it was killed after, output so far); asserts it was alive."""
  lines, last_step, target = [], 0, None
  for line in proc.stdout:
    lines.append(line)
    m = _STEP.search(line)
    if m:
      last_step = int(m.group(1))
    if target is None and _EPOCH_1.search(line):
      steps = last_step  # Steps per epoch.
      rng = np.random.default_rng(seed)
      target = steps + int(rng.integers(1, max(steps, 2)))
    if target is not None and last_step >= target:
      proc.send_signal(signal.SIGKILL)
      break
  out = "".join(lines)
  assert target is not None and last_step >= target, (
    "The run ended before it was killed:\n" + out[-3000:]
  )
  proc.communicate()
  return last_step, out
