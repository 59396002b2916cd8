r"""Clip sampling throughput and peak memory vs a naive full decode.

Generates a synthetic trailer (H.264 mp4, panning textured shots with hard
cuts, cached under --cache_dir), then samples one clip per shot with
`video.sample_clips` and, as the baseline, decodes every frame to RGB,
resizes it and keeps all frames (the usual read-the-whole-video loader)
before picking the same clips. Each method runs in a fresh child process so
peak RSS is its own.

Default (small, ~1 min on 2 cores):
  python benchmarks/clips.py
Smallest (a 3 s 128x72 video, 8-frame clips at 32 px; seconds, CI):
  python benchmarks/clips.py --smoke
Issue's full size (1080p, 150 s, 24 fps, 60 shots; generation takes minutes
once, then it is cached):
  python benchmarks/clips.py --full
"""

import argparse
import json
import os
import resource
import subprocess
import sys
import time

import av
import cv2
import numpy as np
import timing

from divita_jax import video

# --smoke: every method on the smallest video that still has 3 shots.
SMOKE = dict(
  width=128,
  height=72,
  seconds=3.0,
  num_shots=3,
  frames_per_clip=8,
  resolution=32,
)


def shots_of(num_frames: int, num_shots: int, seed: int = 0) -> np.ndarray:
  """Random cut positions -> int32 [S, 2], shots of 12 frames at least."""
  rng = np.random.default_rng(seed)
  cuts = np.sort(
    rng.choice(np.arange(12, num_frames - 12, 12), num_shots - 1, replace=False)
  )
  bounds = np.concatenate([[0], cuts, [num_frames]])
  return np.stack([bounds[:-1], bounds[1:]], 1).astype(np.int32)


def generate(
  path: str,
  width: int,
  height: int,
  seconds: float,
  fps: int,
  shots: np.ndarray,
) -> None:
  """Each shot: a smooth coloured texture panning at its own speed."""
  rng = np.random.default_rng(1)
  tmp = path + ".tmp.mp4"
  with av.open(tmp, "w") as out:
    stream = out.add_stream("libx264", rate=fps)
    stream.width, stream.height, stream.pix_fmt = width, height, "yuv420p"
    # Trailer-like encode: keyframes at cuts and at least every 5 s.
    stream.options = {"preset": "veryfast", "crf": "23", "g": str(5 * fps)}
    yy, xx = np.mgrid[0:height, 0 : 2 * width].astype(np.float32)
    for start, end in shots:
      f1, f2 = rng.uniform(0.002, 0.02, 2)
      color = rng.uniform(40, 215, 3)
      base = (
        np.sin(xx * f1)[..., None] * np.cos(yy * f2)[..., None] * 40
        + color
        + rng.normal(0, 6, (height, 2 * width, 1))
      )
      base = np.clip(base, 0, 255).astype(np.uint8)  # [H, 2W, 3]
      speed = int(rng.integers(1, 8))
      for t in range(end - start):
        x0 = (t * speed) % width
        frame = av.VideoFrame.from_ndarray(
          np.ascontiguousarray(base[:, x0 : x0 + width]), format="rgb24"
        )
        for packet in stream.encode(frame):
          out.mux(packet)
    for packet in stream.encode():
      out.mux(packet)
  os.replace(tmp, path)


def naive(path: str, frame_indices: np.ndarray, resolution: int) -> np.ndarray:
  """Decode all frames to RGB, resize + crop each, keep them all, index."""
  frames = []
  with av.open(path) as container:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"
    for frame in container.decode(stream):
      rgb = frame.to_ndarray(format="rgb24")  # Full resolution.
      h, w = rgb.shape[:2]
      scale = resolution / min(h, w)
      size = (round(w * scale), round(h * scale))
      small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
      top = (small.shape[0] - resolution) // 2
      left = (small.shape[1] - resolution) // 2
      crop = small[top : top + resolution, left : left + resolution]
      frames.append(crop.copy())  # Not a view: keep only the crop alive.
  return np.stack(frames)[frame_indices]  # [N, T, res, res, 3]


def worker(args) -> None:
  shots = np.asarray(json.loads(args.shots_json), np.int32)
  kw = dict(
    frames_per_clip=args.frames_per_clip,
    fps=float(args.fps),
    resolution=args.resolution,
  )
  out = {}

  def run():
    if args.worker == "naive":
      with video.Video(args.path) as v:
        plan = video.plan_clips(
          v.index, shots, **{k: kw[k] for k in ("frames_per_clip", "fps")}
        )
      out["clips"] = naive(args.path, plan["frame_indices"], args.resolution)
    else:
      seg = "fixed" if args.worker == "fixed" else "shots"
      out["clips"], _ = video.sample_clips(
        args.path, shots, segmentation=seg, **kw
      )

  # One cold run in a fresh process: its peak RSS is the method's own.
  seconds = timing.round_robin({"run": run}, rounds=1, warmup=0)["run"].best
  rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
  clips = len(out["clips"])
  print(json.dumps({"clips": clips, "seconds": seconds, "rss_mb": rss_mb}))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument(
    "--full",
    action="store_true",
    help="1920x1080, 150 s, 60 shots (the issue's size).",
  )
  p.add_argument("--width", type=int, default=640)
  p.add_argument("--height", type=int, default=360)
  p.add_argument("--seconds", type=float, default=30.0)
  p.add_argument("--fps", type=int, default=24)
  p.add_argument("--num_shots", type=int, default=12)
  p.add_argument("--frames_per_clip", type=int, default=24)
  p.add_argument("--resolution", type=int, default=224)
  p.add_argument("--cache_dir", default="/tmp/divita_bench")
  p.add_argument("--smoke", action="store_true", help="Tiny run (CI).")
  p.add_argument("--worker", default="", help=argparse.SUPPRESS)
  p.add_argument("--path", default="", help=argparse.SUPPRESS)
  p.add_argument("--shots_json", default="", help=argparse.SUPPRESS)
  args = p.parse_args()
  if args.worker:
    return worker(args)
  if args.full:
    args.width, args.height, args.seconds, args.num_shots = 1920, 1080, 150, 60
  if args.smoke:
    vars(args).update(SMOKE)
  num_frames = int(args.seconds * args.fps)
  shots = shots_of(num_frames, args.num_shots)
  os.makedirs(args.cache_dir, exist_ok=True)
  path = os.path.join(
    args.cache_dir,
    f"trailer_{args.width}x{args.height}_{num_frames}f_{args.num_shots}s.mp4",
  )
  if not os.path.exists(path):
    t = time.perf_counter()
    generate(path, args.width, args.height, args.seconds, args.fps, shots)
    print(f"generated {path} in {time.perf_counter() - t:.0f}s")
  with video.Video(path) as v:
    keyframes = len(v.index.keyframes)
  print(
    f"video: {args.width}x{args.height}, {num_frames} frames at "
    f"{args.fps} fps, {len(shots)} shots, {keyframes} keyframes, "
    f"{os.path.getsize(path) / 2**20:.1f} MiB; clips of "
    f"{args.frames_per_clip} frames at {args.fps} fps, "
    f"{args.resolution}px, {os.cpu_count()} CPUs"
  )
  rows = []
  for method in ("naive", "shots", "fixed"):
    cmd = [
      sys.executable,
      __file__,
      "--worker",
      method,
      "--path",
      path,
      "--shots_json",
      json.dumps(shots.tolist()),
      "--fps",
      str(args.fps),
      "--resolution",
      str(args.resolution),
      "--frames_per_clip",
      str(args.frames_per_clip),
    ]
    # A fixed mmap threshold keeps glibc from fragmenting the heap with the
    # naive loader's 6 MB frames (11 GB peak RSS at 1080p without it).
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="131072")
    out = subprocess.run(
      cmd, check=True, capture_output=True, text=True, env=env
    )
    rows.append((method, json.loads(out.stdout.strip().splitlines()[-1])))
  base = rows[0][1]
  print(
    f"\n| {'method':40s} | clips | seconds | clips/s | peak RSS MB "
    "| speed vs naive |"
  )
  print(
    f"|{'-' * 42}|-------|---------|---------|-------------|----------------|"
  )
  names = {
    "naive": "naive full decode, 1 clip per shot",
    "shots": "sample_clips, 1 clip per shot (center)",
    "fixed": "sample_clips, fixed windows (all frames)",
  }
  for method, r in rows:
    speed = (r["clips"] / r["seconds"]) / (base["clips"] / base["seconds"])
    speed = "-" if method == "fixed" else f"{speed:.2f}x"  # Other clips.
    print(
      f"| {names[method]:40s} | {r['clips']:5d} | {r['seconds']:7.2f} "
      f"| {r['clips'] / r['seconds']:7.2f} | {r['rss_mb']:11.0f} "
      f"| {speed:>14s} |"
    )


if __name__ == "__main__":
  main()
