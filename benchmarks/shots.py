r"""Shot detection speed vs decode-only and vs the PySceneDetect CLI.

Generates (once, cached) a 1080p H.264 trailer-like video of synthetic
scenes, then times on the same file, in this process:
  decode    PyAV threaded decode of every frame, no conversion (the floor);
  ours      divita_jax.shots.detect_shots (one decode, swscale shrink+BGR,
            ContentDetector, flash filter) with its defaults;
  cli       `scenedetect -i VIDEO list-scenes` with the CLI's default
            settings (default detector, OpenCV backend), as a subprocess;
and checks whether our cut list agrees with the CLI's (and the truth).

  python benchmarks/shots.py                      # 1080p, 32 s (~2-3 min)
  python benchmarks/shots.py --seconds=60 --height=720
"""

import argparse
import csv
import os
import subprocess
import sys
import tempfile
import time

import av
import cv2
import numpy as np

from divita_jax import shots
from tfds_trailers12k import synthetic


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
  return shots.cuts_from_shots(true_shots)


def decode_only(path: str) -> int:
  with av.open(path) as c:
    stream = c.streams.video[0]
    stream.thread_type = "AUTO"
    return sum(1 for _ in c.decode(stream))


def cli_cuts(path: str) -> np.ndarray:
  with tempfile.TemporaryDirectory() as tmp:
    cmd = [
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


def agreement(a: np.ndarray, b: np.ndarray, tol: int = 1) -> str:
  matched = sum(any(abs(x - y) <= tol for y in b) for x in a)
  return f"{matched}/{len(a)} vs {len(b)}"


def timed(fn, *args):
  start = time.perf_counter()
  out = fn(*args)
  return out, time.perf_counter() - start


def main():
  p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  p.add_argument("--seconds", type=float, default=32.0)
  p.add_argument("--height", type=int, default=1080)
  p.add_argument("--fps", type=int, default=24)
  p.add_argument("--video", default="")
  p.add_argument("--repeats", type=int, default=3)
  args = p.parse_args()
  path = args.video or os.path.join(
    tempfile.gettempdir(), f"shots_bench_{args.height}p_{args.seconds:g}s.mp4"
  )
  truth_path = path + ".cuts.npy"  # True cuts, written with the video.
  if not args.video and not os.path.exists(truth_path):
    print(f"writing {path} ...", file=sys.stderr)
    np.save(truth_path, make_video(path, args.seconds, args.height, args.fps))
  truth = np.load(truth_path) if os.path.exists(truth_path) else None
  rows = []
  # Interleaved repeats (best of each): the machine is shared, so load
  # drifts; alternating keeps the ratio fair.
  t_dec = t_ours = float("inf")
  for _ in range(args.repeats):
    (n, t), (ours, t2) = (
      timed(decode_only, path),
      timed(shots.detect_shots, path),
    )
    t_dec, t_ours = min(t_dec, t), min(t_ours, t2)
  ours = shots.cuts_from_shots(ours)
  rows.append(("decode only (PyAV, threaded)", n / t_dec, "-"))
  cli, t_cli = timed(cli_cuts, path)
  rows.append(("ours: detect_shots (content)", n / t_ours, f"{len(ours)} cuts"))
  rows.append(("scenedetect CLI (defaults)", n / t_cli, f"{len(cli)} cuts"))
  print(f"\n{path}: {n} frames, {args.height}p, {os.cpu_count()} cores\n")
  print("| method | frames/s | x decode | cuts |\n|---|---|---|---|")
  for name, fps, note in rows:
    print(f"| {name} | {fps:.1f} | {fps / rows[0][1]:.2f} | {note} |")
  print(
    f"\nours vs CLI cuts (+-1 frame): {agreement(ours, cli)}; "
    f"CLI vs ours: {agreement(cli, ours)}"
  )
  if truth is not None:
    print(
      f"ours vs truth: {agreement(ours, truth)}; "
      f"CLI vs truth: {agreement(cli, truth)}"
    )


if __name__ == "__main__":
  main()
