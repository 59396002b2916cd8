r"""Genres of your own trailer files, with a trained DIViTA run.

  python -m divita_jax.predict --workdir=/tmp/divita trailer.mp4 more/
  python -m divita_jax.predict --workdir=DIR --fold=1 --json a.mp4 > out.json
  python -m divita_jax.predict --workdir=DIR --plot=a.png a.mp4

Every file goes through what the run's dataset and evaluation did: shot
detection with the dataset builder's settings (and its re-encoding, for raw
builds), clip sampling, the run's frozen backbones and normalization, then
the fold's best head over all windows of `train.num_clips` clips, averaged
(`evaluate.predict_probs`). A file that fails is reported and skipped; the
exit code is 1 if any did.
"""

import argparse
import dataclasses
import json
import os
import sys

import av
import ml_collections
import numpy as np
from tqdm import tqdm

import tfds_trailers12k
from divita_jax import (
  evaluate,
  extract,
  extract_audio,
  sharding,
  video,
)
from divita_jax import run as run_lib
from divita_jax.configs.divita import get_config
from divita_jax.pipelines import stores
from divita_jax.trainers import frozen, loop
from tfds_trailers12k import genres, shots, transcode

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg")
# Per-file failures: bad videos, missing files and decoder errors.
FILE_ERRORS = (shots.VideoError, av.FFmpegError, OSError)


@dataclasses.dataclass
class Run:
  """What predict needs from a trained workdir."""

  config: ml_collections.ConfigDict
  fold: int
  variables: dict  # The fold's best head: params, batch_stats.
  feature_fns: dict  # branch -> uint8 clips [n, T, H, W, 3] -> [n, D].
  source: dict  # Dataset settings: shot_kwargs, reencode_height/_fps.


def load_config(workdir: str) -> ml_collections.ConfigDict:
  """The config a run saved as `<workdir>/config.json`."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{workdir} is not a trained workdir: {path} is missing (written by "
      "`python -m divita_jax.main`)."
    )
  with open(path) as f:
    saved = json.load(f)
  # Fields added since the run was made take their defaults.
  return ml_collections.ConfigDict(_merged(get_config().to_dict(), saved))


def _merged(defaults: dict, saved: dict) -> dict:
  out = dict(defaults)
  for k, v in saved.items():
    both = isinstance(v, dict) and isinstance(out.get(k), dict)
    out[k] = _merged(out[k], v) if both else v
  return out


def source_settings(config: ml_collections.ConfigDict) -> dict:
  """Shot detection and re-encoding settings the run's dataset used.

  The builder config is rebuilt from `run_lib.dataset_kwargs`, the overrides
  the run built its dataset with, so its detector fields are the ones the
  stored shots came from.
  """
  name = config.dataset.config
  if name == "reps":
    raise ValueError(
      "This run trained on the official zarr representations "
      "(dataset.config='reps'); their backbones are not part of "
      "divita_jax, so it cannot classify video files."
    )
  cfg = tfds_trailers12k.make_config(name, **run_lib.dataset_kwargs(config))
  return dict(
    shot_kwargs=cfg.shot_kwargs(),
    reencode_height=cfg.reencode_height,
    reencode_fps=cfg.reencode_fps,
  )


def load_run(workdir: str, fold: int = 0) -> Run:
  """Config, best head of `fold` and backbones of a trained workdir."""
  config = load_config(workdir)
  fold_dir = os.path.join(workdir, f"fold{fold}")
  if not os.path.isdir(fold_dir):
    trained = sorted(
      d for d in os.listdir(workdir) if d.startswith("fold") and d[4:].isdigit()
    )
    raise FileNotFoundError(
      f"Fold {fold} was not trained in {workdir} (found: {trained or 'none'})."
    )
  source = source_settings(config)
  variables, tuned = loop.mode(config).load_variables(config, fold_dir)
  feature_fns = {}
  for b in config.model.branches:
    checkpoint = config.backbones[b].checkpoint
    if checkpoint and not os.path.isdir(checkpoint):
      raise FileNotFoundError(
        f"Backbone checkpoint of the {b} branch not found: {checkpoint!r} "
        "(relative paths are resolved from the current directory; run from "
        "where training ran)."
      )
    feature_fns[b] = extract.branch_feature_fn(config, b, tuned.get(b))
  return Run(config, fold, variables, feature_fns, source)


def find_videos(inputs: list[str]) -> list[str]:
  """Files as given, folders expanded to their video files (sorted)."""
  paths = []
  for p in inputs:
    if os.path.isdir(p):
      found = sorted(
        os.path.join(p, f)
        for f in os.listdir(p)
        if f.lower().endswith(VIDEO_EXTENSIONS)
      )
      if not found:
        raise FileNotFoundError(
          f"Folder {p} holds no video files ({', '.join(VIDEO_EXTENSIONS)})."
        )
      paths += found
    else:
      paths.append(p)  # Missing files fail per file, with the others run.
  return paths


def analyze_file(run: Run, path: str, bar: tqdm | None = None) -> dict:
  """Shots, clips and clip features of one file (see module doc).

  Returns 'id' (file stem), 'path', 'video' (the bytes the dataset would
  store), 'shots' int32 [S, 2], 'fps', 'num_frames', 'duration' (seconds),
  'features' {branch: float32 [num_clips, D]} and 'silence' (why an audio
  branch heard silence, e.g. "no audio stream"; "" otherwise).
  """
  trailer_id = os.path.splitext(os.path.basename(path))[0]
  s = run.source
  if not os.path.isfile(path):
    raise shots.VideoError(path, "missing file")
  data, found = transcode.process(
    path, path, s["reencode_height"], s["reencode_fps"], s["shot_kwargs"]
  )
  by_resolution = {}
  for b in run.config.model.branches:
    if b != "audio":
      by_resolution.setdefault(run.config.backbones[b].resolution, []).append(b)
  features, info = {}, {}
  for resolution, branches in by_resolution.items():
    clips, info = video.sample_clips(
      data,
      found.shots,
      trailer_id=path,
      **video.sample_kwargs(run.config.clips, resolution),
    )  # [N, T, H, W, 3]
    for b in branches:
      features[b] = _features(run, b, clips, bar)
  silence = ""
  if "audio" in run.config.model.branches:  # The clips' log-mels.
    record = dict(video=data, shots=found.shots)
    spec = run.feature_fns["audio"].spec
    mels, windows, silence = extract_audio.trailer_log_mels(
      record, run.config, spec, path
    )
    outputs = _features(run, "audio", mels, bar)
    features["audio"] = extract_audio.clip_features(
      outputs, windows, run.config, spec
    )
    if not info:  # No frame branch: the duration from the video's index.
      with video.Video(data, path) as v:
        info = dict(duration=v.index.duration)
  return dict(
    id=trailer_id,
    path=path,
    video=data,
    shots=found.shots,
    fps=float(found.fps),
    num_frames=int(found.num_frames),
    duration=float(info["duration"]),
    features=features,
    silence=silence,
  )


def _features(run: Run, branch: str, clips: np.ndarray, bar) -> np.ndarray:
  """Clip features in backbone batches, advancing `bar` by clips."""
  batch = run.config.backbones[branch].batch_size
  out = []
  for start in range(0, len(clips), batch):
    out.append(run.feature_fns[branch](clips[start : start + batch], batch))
    if bar is not None:
      bar.set_postfix_str(f"{branch} clips {start + len(out[-1])}/{len(clips)}")
  return np.concatenate(out)  # [N, D]


def head_probs(run: Run, items: list[dict]):
  """The head over every window of every item, averaged: [len, classes];
  and, for a late-fusion head of several branches, what each branch says
  alone ({branch: [len, classes]}, evaluate.branch_probs), else {}."""
  keys = [str(i) for i in range(len(items))]  # File stems may repeat.
  readers = {
    b: stores.MemoryStore({k: it["features"][b] for k, it in zip(keys, items)})
    for b in run.config.model.branches
  }
  # The head alone over the clips' features, in either mode.
  programs = lambda nf: frozen.programs(
    run.config, sharding.make_mesh(run.config.mesh), nf
  )
  probs = evaluate.predict_probs(
    run.config, programs, run.variables, readers, keys
  )
  m = run.config.model
  if m.fusion != "late" or len(m.branches) < 2:
    return probs, {}
  alone = evaluate.branch_probs(run.config, run.variables, readers, keys)
  return probs, alone


def classify(
  run: Run, paths: list[str], progress: bool = True, keep_video: bool = True
):
  """(results, errors) for `paths`; a failing file only adds an error.

  results: dicts of analyze_file (without 'features', and without 'video'
  unless `keep_video`: plots need it, long lists of files would hold every
  video in memory) plus 'genres' {name: probability} in GENRES order and
  'branches' {branch: {name: probability}}: each branch alone, for a
  late-fusion head of several branches (else {}).
  errors: {'path', 'error'}.
  """
  items, errors = [], []
  bar = tqdm(paths, desc="predict", unit="file", disable=not progress)
  for path in bar:
    bar.set_postfix_str(os.path.basename(path))
    try:
      item = analyze_file(run, path, bar)
      if not keep_video:
        del item["video"]
      items.append(item)
    except FILE_ERRORS as e:
      reason = getattr(e, "reason", None) or str(e)
      errors.append(dict(path=path, error=reason))
      tqdm.write(f"error: {path}: {reason}", file=sys.stderr)
  if not items:
    return [], errors
  probs, alone = head_probs(run, items)
  results = []
  for i, (it, p) in enumerate(zip(items, probs)):
    it = {k: v for k, v in it.items() if k != "features"}
    it["genres"] = _named(p)
    it["branches"] = {b: _named(q[i]) for b, q in alone.items()}
    results.append(it)
  return results, errors


def _named(probs) -> dict:
  return {g: float(x) for g, x in zip(genres.GENRES, probs)}


def to_json(result: dict) -> dict:
  """The machine-readable record of one prediction."""
  return dict(
    id=result["id"],
    path=result["path"],
    genres=result["genres"],
    shots=np.asarray(result["shots"]).tolist(),
    fps=result["fps"],
    num_frames=result["num_frames"],
    branches=result["branches"],
    silence=result["silence"],
  )


def format_table(result: dict, threshold: float = 0.5) -> str:
  """Genres sorted by probability, with a bar; `*` marks >= threshold.
  Several late-fused branches: a column per branch, what it says alone."""
  alone = result.get("branches", {})
  silence = result.get("silence", "")
  head = f"  {'genre':<10} {'prob':>6}" + "".join(f" {b:>6}" for b in alone)
  note = f"* = prob >= {threshold:g}"
  if alone:
    note += "; branch columns: each branch alone (the head averages logits)"
  lines = [
    f"{result['id']}  ({result['path']})",
    f"  {len(result['shots'])} shots, {result['duration']:.1f} s "
    f"({result['num_frames']} frames at {result['fps']:.2f} fps)"
    + (f"; audio branch: silence ({silence})" if silence else ""),
    f"{head}  ({note})",
  ]
  ranked = sorted(result["genres"].items(), key=lambda kv: -kv[1])
  for name, p in ranked:
    mark = "*" if p >= threshold else " "
    cols = "".join(f" {alone[b][name]:6.3f}" for b in alone)
    lines.append(f"{mark} {name:<10} {p:6.3f}{cols}  {'#' * round(p * 30)}")
  return "\n".join(lines)


def plot_path(out: str, trailer_id: str, many: bool) -> str:
  """`out` for one file; `out` with `_<id>` before the extension for many."""
  if not many:
    return out
  root, ext = os.path.splitext(out)
  return f"{root}_{trailer_id}{ext or '.png'}"


def parse_args(argv):
  p = argparse.ArgumentParser(
    prog="python -m divita_jax.predict",
    description="Genre probabilities of trailer files with a trained run.",
  )
  p.add_argument("inputs", nargs="+", help="Video files or folders of them.")
  p.add_argument("--workdir", required=True, help="Workdir of a trained run.")
  p.add_argument("--fold", type=int, default=0, help="Whose best head.")
  p.add_argument("--json", action="store_true", help="A JSON list on stdout.")
  p.add_argument(
    "--plot", help="PNG: shot timeline + genre bars (_<id> if many files)."
  )
  p.add_argument("--no_progress", action="store_true")
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  try:
    paths = find_videos(args.inputs)  # Before the slow part: fail fast.
    run = load_run(args.workdir, args.fold)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  results, errors = classify(
    run, paths, progress=not args.no_progress, keep_video=bool(args.plot)
  )
  if args.json:
    print(json.dumps([to_json(r) for r in results], indent=1))
  for r in results:
    if not args.json:
      print(format_table(r) + "\n")
    if args.plot:
      from divita_jax import plots  # matplotlib only when plotting.

      out = plot_path(args.plot, r["id"], len(paths) > 1)
      plots.plt.close(plots.plot_prediction(r, out))
  if errors:
    print(f"{len(errors)} of {len(paths)} file(s) failed.", file=sys.stderr)
  return 1 if errors else 0


if __name__ == "__main__":
  sys.exit(main())
