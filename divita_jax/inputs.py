"""Input files checked before anything slow is loaded or written.

`check`: the files a run's dataset reads, before main makes the workdir.
raw: `manual_dir/mtgc.csv` and `manual_dir/videos/` holding a video of at
least one of its ids (the builder skips the others). reps: `mtgc.csv` and,
for each branch, the zarr group `config.reps.zarr_<branch>` (relative to
manual_dir) with a known feature width: its `num_features` attribute or,
failing that, an array to read it from (stores.ZarrStore.num_features).
A dataset already built in the run's data_dir needs no mtgc.csv or videos
any more; the zarr groups are read by every run.

`find_videos`, `saved_config`, `check_workdir`, `check_files`: what
predict is given, before it loads the run.

Cheap on purpose (stats and small JSON files; no TFDS, zarr or JAX): the
error is one line, seconds after the command starts.
"""

import csv
import glob
import json
import os


class InputError(ValueError):
  """A dataset input that cannot work; the message is one line."""


def check(config, workdir: str) -> None:
  """Raises InputError for the first input of `config.dataset` that the
  build or the run would fail on; synthetic data needs none."""
  d = config.dataset
  if d.config not in ("raw", "reps"):
    return
  if not os.path.isdir(d.manual_dir):
    raise InputError(
      f"config.dataset.manual_dir {d.manual_dir!r} is not a directory."
    )
  data_dir = d.data_dir or os.path.join(workdir, "tfds")
  if not _built(data_dir, d.config):
    ids = _mtgc_ids(d.manual_dir)
    if d.config == "raw":
      _check_videos(d.manual_dir, ids)
  if d.config == "reps":
    for b in config.model.branches:
      _check_group(os.path.join(d.manual_dir, config.reps[f"zarr_{b}"]), b)


def _built(data_dir: str, name: str) -> bool:
  """A finished TFDS build of this kind (any overrides) in data_dir."""
  pattern = os.path.join(data_dir, "trailers12k", f"{name}*", "*")
  return bool(glob.glob(os.path.join(pattern, "dataset_info.json")))


def _mtgc_ids(manual_dir: str) -> list[str]:
  """The `mid` column of manual_dir/mtgc.csv (mtgc.read_mtgc checks the
  rest when the dataset is built)."""
  path = os.path.join(manual_dir, "mtgc.csv")
  if not os.path.isfile(path):
    raise InputError(
      f"{path} not found: the dataset's labels and folds (the official "
      "Trailers12k mtgc.csv) go in config.dataset.manual_dir."
    )
  try:
    with open(path, newline="") as f:
      rows = list(csv.DictReader(f))
  except (OSError, UnicodeDecodeError, csv.Error) as e:
    raise InputError(f"{path} cannot be read: {e}") from None
  if not rows or "mid" not in rows[0]:
    raise InputError(f"{path} has no 'mid' column or no rows.")
  return [(r["mid"] or "").strip() for r in rows]


def _check_videos(manual_dir: str, ids: list[str]) -> None:
  folder = os.path.join(manual_dir, "videos")
  if not os.path.isdir(folder):
    raise InputError(
      f"{folder} not found: the raw dataset reads videos/<mid>.mp4 (one "
      "trailer per id of mtgc.csv) in config.dataset.manual_dir."
    )
  stems = {os.path.splitext(f)[0] for f in os.listdir(folder)}
  if not stems:
    raise InputError(f"{folder} is empty: expected videos/<mid>.mp4 files.")
  if not stems & set(ids):
    raise InputError(
      f"{folder} holds no video of an id of mtgc.csv (expected names like "
      f"{ids[0]}.mp4; found e.g. {sorted(stems)[0]!r})."
    )


def _check_group(path: str, branch: str) -> None:
  """A zarr group (v2 or v3) whose feature width can be known."""
  what = f"config.reps.zarr_{branch} {path!r}"
  if not os.path.isdir(path):
    raise InputError(f"{what} not found (relative paths are under manual_dir).")
  v2 = os.path.join(path, ".zgroup")
  v3 = _json(os.path.join(path, "zarr.json"), what)
  if not os.path.isfile(v2) and (v3 or {}).get("node_type") != "group":
    raise InputError(f"{what} is not a zarr group (no .zgroup or zarr.json).")
  attrs = _json(os.path.join(path, ".zattrs"), what) or {}
  attrs = {**attrs, **(v3 or {}).get("attributes", {})}
  if "num_features" in attrs:
    return
  arrays = [
    d
    for d in os.listdir(path)
    if os.path.isfile(os.path.join(path, d, ".zarray"))
    or os.path.isfile(os.path.join(path, d, "zarr.json"))
  ]
  if not arrays:
    raise InputError(
      f"{what} has no num_features attribute and no arrays to read the "
      "feature width from."
    )


def _json(path: str, what: str) -> dict | None:
  if not os.path.isfile(path):
    return None
  try:
    with open(path) as f:
      return json.load(f)
  except (OSError, ValueError) as e:
    raise InputError(f"{what}: {path} cannot be read: {e}") from None


# ------------------------------------------------------------------ predict

VIDEO_EXTENSIONS = (".mp4", ".mov", ".mkv", ".webm", ".avi", ".m4v", ".mpg")


def find_videos(inputs: list[str]) -> list[str]:
  """Files as given, folders expanded to their video files (sorted); a
  folder without any is a FileNotFoundError."""
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


def check_files(paths: list[str]) -> tuple[list[str], list[dict]]:
  """(readable files, errors {'path', 'error'} of the others)."""
  good, errors = [], []
  for path in paths:
    if not os.path.exists(path):
      reason = "missing file"
    elif not os.path.isfile(path):
      reason = "not a regular file"
    else:
      try:
        with open(path, "rb") as f:
          f.read(1)
        reason = ""
      except OSError as e:
        reason = f"not readable ({e.strerror or e})"
    if reason:
      errors.append(dict(path=path, error=reason))
    else:
      good.append(path)
  return good, errors


def saved_config(workdir: str) -> dict:
  """`<workdir>/config.json` as written by `python -m divita_jax.main`."""
  path = os.path.join(workdir, "config.json")
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"{workdir} is not a trained workdir: {path} is missing (written by "
      "`python -m divita_jax.main`)."
    )
  with open(path) as f:
    return json.load(f)


def check_workdir(workdir: str, fold: int) -> dict:
  """The saved config.json (a dict) of a workdir whose `fold` was trained
  and whose backbone checkpoints are where the config says; otherwise a
  FileNotFoundError or ValueError saying what is missing."""
  saved = saved_config(workdir)
  if not os.path.isdir(os.path.join(workdir, f"fold{fold}")):
    trained = sorted(
      d for d in os.listdir(workdir) if d.startswith("fold") and d[4:].isdigit()
    )
    raise FileNotFoundError(
      f"Fold {fold} was not trained in {workdir} (found: {trained or 'none'})."
    )
  if saved["dataset"]["config"] == "reps":
    raise ValueError(
      "This run trained on the official zarr representations "
      "(dataset.config='reps'); their backbones are not part of "
      "divita_jax, so it cannot classify video files."
    )
  for b in saved["model"]["branches"]:
    checkpoint = saved["backbones"][b]["checkpoint"]
    if checkpoint and not os.path.isdir(checkpoint):
      raise FileNotFoundError(
        f"Backbone checkpoint of the {b} branch not found: {checkpoint!r} "
        "(relative paths are resolved from the current directory; run from "
        "where training ran)."
      )
  return saved
