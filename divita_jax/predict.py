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

import ml_collections

from divita_jax import inputs
from divita_jax import main as main_lib

# JAX, TensorFlow (TFDS), orbax and the models take tens of seconds to
# import on a small machine: the functions that use them import them, so
# that a wrong path or workdir is one line at once (divita_jax/inputs.py)
# and the libraries' notices are quieted before they load.

THRESHOLD = 0.5  # `*` in the table: the head calls the genre present.


def file_errors() -> tuple:
  """Per-file failures: bad videos, missing files and decoder errors."""
  import av

  from tfds_trailers12k import shots

  return (shots.VideoError, av.FFmpegError, OSError)


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
  from divita_jax.configs.divita import get_config

  saved = inputs.saved_config(workdir)
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
  import tfds_trailers12k
  from divita_jax import run as run_lib

  kwargs = run_lib.dataset_kwargs(config)
  cfg = tfds_trailers12k.make_config(config.dataset.config, **kwargs)
  return dict(
    shot_kwargs=cfg.shot_kwargs(),
    reencode_height=cfg.reencode_height,
    reencode_fps=cfg.reencode_fps,
  )


def load_run(workdir: str, fold: int = 0) -> Run:
  """Config, best head of `fold` and backbones of a trained workdir."""
  from divita_jax import extract
  from divita_jax.trainers import loop

  inputs.check_workdir(workdir, fold)  # What is missing, before loading.
  config = load_config(workdir)
  source = source_settings(config)
  fold_dir = os.path.join(workdir, f"fold{fold}")
  variables, tuned = loop.mode(config).load_variables(config, fold_dir)
  feature_fns = {
    b: extract.branch_feature_fn(config, b, tuned.get(b))
    for b in config.model.branches
  }
  return Run(config, fold, variables, feature_fns, source)


def caveat(saved: dict) -> str:
  """One line when the run's model cannot tell a real trailer's genres:
  trained on synthetic data, or on random (not converted) backbones."""
  why = []
  if saved["dataset"]["config"] == "synthetic":
    why.append("on synthetic trailers (dataset.config='synthetic')")
  random = [
    b
    for b in saved["model"]["branches"]
    if not saved["backbones"][b]["checkpoint"]
  ]
  if random:
    names = ", ".join(f"backbones.{b}.checkpoint=''" for b in random)
    why.append(f"with randomly initialised backbones ({names})")
  if not why:
    return ""
  return (
    f"warning: this run was trained {' and '.join(why)}: its probabilities "
    "show the pipeline works, not the genres of real footage."
  )


def analyze_file(run: Run, path: str, bar=None) -> dict:
  """Shots, clips and clip features of one file (see module doc); `bar`
  (tqdm) shows the clips done.

  Returns 'id' (file stem), 'path', 'video' (the bytes the dataset would
  store), 'shots' int32 [S, 2], 'fps', 'num_frames', 'duration' (seconds),
  'features' {branch: float32 [num_clips, D]} and 'silence' (why an audio
  branch heard silence, e.g. "no audio stream"; "" otherwise).
  """
  from divita_jax import extract_audio, video
  from tfds_trailers12k import shots, transcode

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


def _features(run: Run, branch: str, clips, bar):
  """Clip features in backbone batches, advancing `bar` by clips."""
  import numpy as np

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
  from divita_jax import evaluate, sharding
  from divita_jax.pipelines import stores
  from divita_jax.trainers import frozen

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
  from tqdm import tqdm

  items, errors = [], []
  # None: tqdm's own test, no bar when stderr is not a terminal.
  bar = tqdm(
    paths, desc="predict", unit="file", disable=None if progress else True
  )
  for path in bar:
    bar.set_postfix_str(os.path.basename(path))
    try:
      item = analyze_file(run, path, bar)
      if not keep_video:
        del item["video"]
      items.append(item)
    except file_errors() as e:
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
  from tfds_trailers12k import genres

  return {g: float(x) for g, x in zip(genres.GENRES, probs)}


def to_json(result: dict) -> dict:
  """The machine-readable record of one prediction."""
  import numpy as np

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


def format_table(result: dict, threshold: float = THRESHOLD) -> str:
  """Genres sorted by probability, with a bar; `*` marks >= threshold.
  Several late-fused branches: a column per branch, what it says alone.
  The last line is the legend."""
  alone = result.get("branches", {})
  silence = result.get("silence", "")
  head = f"  {'genre':<10} {'prob':>6}" + "".join(f" {b:>6}" for b in alone)
  lines = [
    f"{result['id']}  ({result['path']})",
    f"  {len(result['shots'])} shots, {result['duration']:.1f} s "
    f"({result['num_frames']} frames at {result['fps']:.2f} fps)"
    + (f"; audio branch: silence ({silence})" if silence else ""),
    head,
  ]
  ranked = sorted(result["genres"].items(), key=lambda kv: -kv[1])
  for name, p in ranked:
    mark = "*" if p >= threshold else " "
    cols = "".join(f" {alone[b][name]:6.3f}" for b in alone)
    lines.append(f"{mark} {name:<10} {p:6.3f}{cols}  {'#' * round(p * 30)}")
  legend = (
    f"  * = predicted genre: prob >= {threshold:g} (each genre on its own, "
    "a trailer can have several or none)"
  )
  if alone:
    legend += "; branch columns: each branch alone (the head averages logits)"
  return "\n".join(lines + [legend])


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
  p.add_argument(
    "--json",
    action="store_true",
    help="A JSON list on stdout, in input order: a prediction per file, "
    "{'path', 'error'} for a file that failed.",
  )
  p.add_argument(
    "--plot", help="PNG: shot timeline + genre bars (_<id> if many files)."
  )
  p.add_argument("--no_progress", action="store_true")
  p.add_argument(
    "--verbosity",
    type=int,
    default=0,
    help=">= 1: the libraries' notices too (TensorFlow, orbax).",
  )
  return p.parse_args(argv)


def main(argv=None) -> int:
  args = parse_args(argv)
  main_lib.quiet_native_logs(sys.argv if argv is None else argv)
  try:  # Every path before anything slow: one line at once.
    paths = inputs.find_videos(args.inputs)
    saved = inputs.check_workdir(args.workdir, args.fold)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  good, errors = inputs.check_files(paths)
  for e in errors:
    print(f"error: {e['path']}: {e['error']}", file=sys.stderr)
  if note := caveat(saved):
    print(note, file=sys.stderr)
  results = []
  if good:
    loud = main_lib.quiet_libraries(args.verbosity)
    try:
      run = load_run(args.workdir, args.fold)
      progress = not args.no_progress
      results, failed = classify(
        run, good, progress, keep_video=bool(args.plot)
      )
      errors += failed
    finally:
      loud()
  if args.json:
    order = {p: i for i, p in reversed(list(enumerate(paths)))}
    entries = [to_json(r) for r in results] + errors
    entries.sort(key=lambda e: order[e["path"]])  # Stable: repeats in order.
    print(json.dumps(entries, indent=1))
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
