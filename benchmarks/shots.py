r"""Shot detection speed vs decode-only and vs the PySceneDetect CLI.

Generates (once, cached) a trailer-like H.264 video of synthetic scenes
(1080p by default), then times on the same file, in this process:
  decode    PyAV threaded decode of every frame, no conversion (the floor);
  ours      tfds_trailers12k.shots.detect_shots (one decode, swscale shrink+BGR,
            ContentDetector's score, flash filter) with its defaults;
  cli       `python -m scenedetect -i VIDEO list-scenes` with the CLI's
            default settings (default detector, OpenCV backend), run by
            this interpreter so it needs no activated virtualenv;
and checks whether our cut list agrees with the CLI's (and the truth).
`--breakdown` also prints where a frame's time goes, stage by stage.

Timings depend on the machine's load: the load averages at start and end
and the other processes' CPU use are printed with the table, and ratios
taken under load are marked (rule in benchmarks/loadavg.py).

  python benchmarks/shots.py                      # 1080p, 32 s (~2-3 min)
  python benchmarks/shots.py --height=360 --breakdown
  python benchmarks/shots.py --smoke   # 144p, 3 s, 1 round, breakdown (CI)
"""

import argparse
import csv
import os
import subprocess
import sys
import tempfile

import av
import cv2
import loadavg  # benchmarks/loadavg.py, beside this script.
import numpy as np
import timing
from scenedetect.common import FrameTimecode
from scenedetect.detectors import ContentDetector
from scenedetect.detectors.content_detector import _mean_pixel_distance

from tfds_trailers12k import cut_rules, shots, synthetic

DECODE = "decode only (PyAV, threaded)"
OURS = "ours: detect_shots (content)"
CLI = "scenedetect CLI (defaults)"


def make_video(path: str, seconds: float, height: int, fps: int) -> np.ndarray:
  """Writes a trailer-like mp4; returns its true cut frames."""
  width = height * 16 // 9
  cfg = synthetic.SyntheticConfig(
    height=136,
    width=240,
    fps=fps,
    min_seconds=seconds,
    max_seconds=seconds,
    dissolve_prob=0.0,
    fade_prob=0.0,
    flash_prob=0.0,
  )
  labels = np.eye(10, dtype=np.int32)[4]  # Drama: ~1 s shots.
  frames, true_shots, _, _ = synthetic.render_frames(0, cfg, labels)
  with av.open(path, mode="w") as out:
    stream = out.add_stream("libx264", rate=fps)
    stream.height, stream.width, stream.pix_fmt = height, width, "yuv420p"
    stream.options = {"preset": "veryfast", "crf": "20"}
    for img in frames:  # Upscaled on the fly: 1080p frames are 6 MB each.
      big = cv2.resize(img, (width, height), interpolation=cv2.INTER_LINEAR)
      out.mux(stream.encode(av.VideoFrame.from_ndarray(big, format="rgb24")))
    out.mux(stream.encode(None))
  return cut_rules.cuts_from_shots(true_shots)


def decode_only(path: str) -> int:
  with av.open(path) as c:
    stream = c.streams.video[0]
    stream.thread_type = "AUTO"
    return sum(1 for _ in c.decode(stream))


def cli_cuts(path: str) -> np.ndarray:
  with tempfile.TemporaryDirectory() as tmp:
    cmd = [
      sys.executable,
      "-m",
      "scenedetect",
      "-q",
      "-i",
      path,
      "-o",
      tmp,
      "list-scenes",
      "-f",
      "scenes.csv",
      "-s",
    ]
    subprocess.run(cmd, check=True, capture_output=True)
    with open(os.path.join(tmp, "scenes.csv")) as f:
      rows = list(csv.DictReader(f))
  # "Start Frame" is 1-based in the CLI's CSV.
  return np.array([int(r["Start Frame"]) - 1 for r in rows[1:]], np.int32)


def pyscenedetect_fed(path: str) -> np.ndarray:
  """Raw cuts of PySceneDetect's ContentDetector fed frame by frame.

  How detect_shots worked before: a fresh swscale context per frame
  (`to_ndarray`) and the detector's per-frame numpy and Python.
  """
  det, cuts = None, []
  with av.open(path) as c:
    stream = c.streams.video[0]
    stream.thread_type = "AUTO"
    fps = shots.stream_fps(stream)
    for i, frame in enumerate(c.decode(stream)):
      if det is None:
        size = shots.downscale_size(frame.width, frame.height, 0)
        det = ContentDetector(threshold=27.0, min_scene_len=0)
      bgr = frame.to_ndarray(
        width=size[0], height=size[1], format="bgr24", interpolation="POINT"
      )
      cuts += [
        t.frame_num for t in det.process_frame(FrameTimecode(i, fps), bgr)
      ]
  return np.array(cuts, np.int32)


def _pyscenedetect_score(prev: tuple, hsv: tuple) -> float:
  """ContentDetector's score as it computes it from split HSV frames."""
  parts = [_mean_pixel_distance(a, b) for a, b in zip(hsv, prev)]
  return sum(parts) / 3.0


def _stages(frames: list, w: int, h: int) -> dict:
  """name -> (before, after): callables that run one stage on all frames."""
  bgr = [shots.Shrinker(0)(f) for f in frames]
  hsv = [cv2.cvtColor(b, cv2.COLOR_BGR2HSV) for b in bgr]

  def old_sws():
    for f in frames:
      f.to_ndarray(width=w, height=h, format="bgr24", interpolation="POINT")

  def new_sws():
    shrink = shots.Shrinker(0)
    for f in frames:
      shrink(f)

  def to_hsv():
    for b in bgr:
      cv2.cvtColor(b, cv2.COLOR_BGR2HSV)

  def score(fn, frames):
    return lambda: [fn(a, b) for a, b in zip(frames, frames[1:])]

  def old_det():
    d = ContentDetector(threshold=27.0, min_scene_len=0)
    for i, b in enumerate(bgr):
      d.process_frame(FrameTimecode(i, 24.0), b)

  def new_det():
    d = cut_rules.ShotDetector()
    for b in bgr:
      d.process(b)

  return {
    f"shrink to {w}x{h} + YUV->BGR (swscale)": (old_sws, new_sws),
    "BGR->HSV (cv2.cvtColor)": (to_hsv, to_hsv),
    "score of a frame pair": (
      score(_pyscenedetect_score, [cv2.split(x) for x in hsv]),
      score(cut_rules.content_score, hsv),
    ),
    "detector, all in (HSV + score + rest)": (old_det, new_det),
  }


def breakdown(path: str, n: int, t_dec: float, cpu_dec: float, count=150):
  """Per-frame CPU cost of each stage, before (old path) and after (ours).

  Rounds alternate the stages and keep each one's best, so that load
  drifting during the run hits them alike.
  """
  with av.open(path) as c:
    stream = c.streams.video[0]
    stream.thread_type = "AUTO"
    frames = [f for _, f in zip(range(count), c.decode(stream))]
  w, h = shots.downscale_size(frames[0].width, frames[0].height, 0)
  stages = _stages(frames, w, h)
  fns = {
    (name, i): fn for name, pair in stages.items() for i, fn in enumerate(pair)
  }
  # CPU time of all threads: swscale may use some.
  times = timing.round_robin(fns, rounds=7, warmup=0)
  ms = {
    name: [1e3 * times[(name, i)].best_cpu / len(frames) for i in (0, 1)]
    for name in stages
  }
  _, (hsv, _), score, det = ms.values()  # In _stages' order.
  rest = [d - hsv - s for d, s in zip(det, score)]  # Python, bookkeeping.
  print(
    f"\nWhere a frame's time goes (CPU ms per frame, best of 7 rounds over "
    f"{len(frames)} frames). Before: to_ndarray (new swscale context per "
    "frame) + PySceneDetect's ContentDetector; after: tfds_trailers12k.shots. "
    "'The rest' is a difference: noise can make it slightly negative.\n"
  )
  print("| stage | before | after |\n|---|---|---|")
  print(f"| decode, threaded: wall | {1e3 * t_dec / n:.3f} | same |")
  print(
    f"| decode, threaded: CPU, all threads | {1e3 * cpu_dec / n:.3f} | same |"
  )
  for name, (before, after) in [*ms.items(), ("of which the rest", rest)]:
    print(f"| {name} | {before:.3f} | {after:.3f} |")


def agreement(a: np.ndarray, b: np.ndarray, tol: int = 1) -> str:
  matched = sum(any(abs(x - y) <= tol for y in b) for x in a)
  return f"{matched}/{len(a)} vs {len(b)}"


def run_methods(path: str, repeats: int):
  """Best (wall, CPU) seconds per method, our cuts, the CLI's, the load."""
  methods = {
    DECODE: decode_only,
    OURS: shots.detect_shots,
    "before: PyAV + ContentDetector per frame": pyscenedetect_fed,
  }
  out = {}
  keep = lambda name, fn: lambda: out.__setitem__(name, fn(path))
  with loadavg.Watch() as load:
    # Interleaved repeats (best of each): the machine is shared, so load
    # drifts; alternating keeps the ratios fair. CPU: the process's
    # threads and its finished children (the CLI).
    fns = {name: keep(name, fn) for name, fn in methods.items()}
    times = timing.round_robin(fns, repeats, warmup=0)
    cli = timing.round_robin({CLI: keep(CLI, cli_cuts)}, 1, warmup=0)
  best = {k: (t.best, t.cpu_of_best) for k, t in {**times, **cli}.items()}
  ours = cut_rules.cuts_from_shots(out[OURS])
  return out[DECODE], best, ours, out[CLI], load


def print_table(n: int, best: dict, notes: dict, load) -> None:
  t_dec = best[DECODE][0]
  mark = " (under load)" if load.busy else ""
  print(load.report() + "\n")
  print(
    "| method | frames/s | x decode | CPU ms/frame | cuts |\n"
    "|---|---|---|---|---|"
  )
  for name, (t, cpu) in best.items():
    ratio = f"{t_dec / t:.2f}" + ("" if name == DECODE else mark)
    print(
      f"| {name} | {n / t:.1f} | {ratio} | {1e3 * cpu / n:.2f} | "
      f"{notes.get(name, '-')} |"
    )


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seconds", type=float, default=32.0)
  p.add_argument("--height", type=int, default=1080)
  p.add_argument("--fps", type=int, default=24)
  p.add_argument("--video", default="")
  p.add_argument("--repeats", type=int, default=3)
  p.add_argument("--breakdown", action="store_true")
  p.add_argument("--smoke", action="store_true", help="Tiny run (CI).")
  args = p.parse_args()
  if args.smoke:
    args.seconds, args.height, args.repeats, args.breakdown = 3.0, 144, 1, True
  path = args.video or os.path.join(
    tempfile.gettempdir(), f"shots_bench_{args.height}p_{args.seconds:g}s.mp4"
  )
  truth_path = path + ".cuts.npy"  # True cuts, written with the video.
  if not args.video and not os.path.exists(truth_path):
    print(f"writing {path} ...", file=sys.stderr)
    np.save(truth_path, make_video(path, args.seconds, args.height, args.fps))
  truth = np.load(truth_path) if os.path.exists(truth_path) else None
  n, best, ours, cli, load = run_methods(path, args.repeats)
  raw = cut_rules.cuts_from_shots(
    shots.detect_shots(path, max_flash_len=0, min_shot_len=1)
  )
  print(f"\n{path}: {n} frames, {args.height}p, {os.cpu_count()} cores")
  notes = {OURS: f"{len(ours)} cuts", CLI: f"{len(cli)} cuts"}
  print_table(n, best, notes, load)
  print(
    "\nraw cuts (no flash filter, no min length) identical to "
    "PySceneDetect's ContentDetector fed the same frames: "
    f"{np.array_equal(raw, pyscenedetect_fed(path))}"
  )
  print(
    f"ours vs CLI cuts (+-1 frame): {agreement(ours, cli)}; "
    f"CLI vs ours: {agreement(cli, ours)}"
  )
  if truth is not None:
    print(
      f"ours vs truth: {agreement(ours, truth)}; "
      f"CLI vs truth: {agreement(cli, truth)}"
    )
  if args.breakdown:
    breakdown(path, n, *best[DECODE])


if __name__ == "__main__":
  main()
