"""Trailers12k as a TFDS dataset (`trailers12k`), and how to select folds.

  builder = tfds_trailers12k.build("synthetic", data_dir, num_trailers=96)
  source = tfds_trailers12k.data_source(builder)   # random access
  index = tfds_trailers12k.load_index(builder)     # ids, labels, folds
  train = tfds_trailers12k.subset_indices(index["split_assignment"], 0,
                                          "train")  # record indices

Videos are stored once (split `trailers`); a fold's train / validation / test
subset is a list of record indices into `data_source(builder)`.
"""

import dataclasses
import hashlib
import os
import tempfile
import time
import warnings

import numpy as np
import tensorflow_datasets as tfds

from tfds_trailers12k import lock
from tfds_trailers12k.genres import NUM_FOLDS, NUM_GENRES, SUBSETS
from tfds_trailers12k.tfds_trailers12k_dataset_builder import (
  Trailers12k,
  Trailers12kConfig,
)

__all__ = [
  "Trailers12k",
  "Trailers12kConfig",
  "build",
  "data_source",
  "load_index",
  "make_config",
  "subset_indices",
]
_INDEX_FILE = "index.npz"
# `python -m tfds_trailers12k.shots` runs shots.py as __main__ after this
# package (whose builder imports it) has loaded it: harmless here, but runpy
# warns about it on every run.
warnings.filterwarnings(
  "ignore",
  message="'tfds_trailers12k.shots' found in sys.modules",
  category=RuntimeWarning,
)


def make_config(config: str, **config_kwargs) -> Trailers12kConfig:
  """The named config with overrides, named uniquely after the overrides.

  `build("synthetic", d, num_trailers=8)` gets its own config name (and
  data directory), so builds of different sizes never share a cache.
  """
  base = {c.name: c for c in Trailers12k.BUILDER_CONFIGS}
  if config not in base:
    raise ValueError(
      f"Unknown trailers12k config {config!r}; known: {sorted(base)}."
    )
  fields = {f.name for f in dataclasses.fields(Trailers12kConfig)}
  unknown = set(config_kwargs) - fields
  if unknown:
    raise ValueError(
      f"Unknown trailers12k config field(s) {sorted(unknown)} for {config!r}."
    )
  changed = {
    k: v
    for k, v in sorted(config_kwargs.items())
    if v != getattr(base[config], k)
  }
  if not changed:
    return base[config]  # TFDS wants the registered instance itself.
  key, prefix = repr(changed), config
  if changed.get("detector") == "transnetv2":
    # Shots from other weights under the same path must not share a cache.
    path = changed.get("checkpoint", "")
    changed["checkpoint"] = os.path.abspath(path) if path else ""
    key = f"{changed} {_checkpoint_id(changed['checkpoint'])}"
    prefix = f"{config}_transnetv2"
  digest = hashlib.sha1(key.encode()).hexdigest()[:8]
  return dataclasses.replace(
    base[config],
    **changed,
    name=f"{prefix}_{digest}",
    description=f"{base[config].description} Overrides: {changed}.",
  )


def _checkpoint_id(checkpoint: str) -> str:
  """Hash of a checkpoint's weights, after checking it loads (a bad one
  fails here, not in every build worker). JAX is imported only here."""
  from tfds_trailers12k import transnetv2  # noqa: PLC0415

  return transnetv2.checkpoint_id(checkpoint)


def _summary(builder: tfds.core.DatasetBuilder, seconds: float) -> str:
  skipped = builder.info.metadata.get("skipped", [])
  counts = getattr(builder, "prepared_counts", None)
  prepared = (
    f"; {counts['reused']} trailers prepared earlier, {counts['computed']} now"
    if counts
    else ""
  )
  lines = [
    f"trailers12k/{builder.builder_config.name}: "
    f"{builder.info.splits.total_num_examples} trailers in "
    f"{builder.data_dir} ({seconds:.1f} s{prepared}); skipped "
    f"{len(skipped)}."
  ]
  lines += [f"  skipped {s['id']}: {s['reason']}" for s in skipped]
  return "\n".join(lines)


def _download_config(manual_dir, beam_runner, beam_options):
  """DownloadConfig of a build; Beam's runner and options only if given
  (apache_beam is imported only then)."""
  if not beam_runner and not beam_options:
    return tfds.download.DownloadConfig(manual_dir=manual_dir)
  try:
    from tfds_trailers12k import beam  # noqa: PLC0415
  except ImportError as e:
    raise ImportError(
      f"A Beam build (beam_runner={beam_runner!r}, beam_options="
      f"{beam_options!r}) needs apache_beam, which is not installed ({e}): "
      "pip install -e '.[beam]', or leave both empty for the local build."
    ) from e
  return tfds.download.DownloadConfig(
    manual_dir=manual_dir,
    beam_runner=beam_runner or None,
    beam_options=beam.pipeline_options(beam_options),
  )


def build(
  config: str,
  data_dir: str,
  manual_dir: str | None = None,
  num_workers: int = 0,
  retry_skipped: bool | None = None,
  beam_runner=None,
  beam_options=None,
  **config_kwargs,
) -> tfds.core.DatasetBuilder:
  """Builds trailers12k/<config> under data_dir if needed; returns it.

  `config_kwargs` override `Trailers12kConfig` fields (e.g. num_trailers,
  seed, detector); `num_workers` processes decode/generate
  (0 = all cores); `retry_skipped` re-attempts trailers a killed build
  saved as skipped (None: the TRAILERS12K_RETRY_SKIPPED environment
  variable, set by `python -m tfds_trailers12k --retry_skipped`). A build
  prints a summary including the skipped trailers (also in
  `builder.info.metadata['skipped']`).

  `beam_runner` (a name such as "FnApiRunner" or "DataflowRunner", or a
  runner) and / or `beam_options` (pipeline flags: a string such as
  "--direct_num_workers=0,--direct_running_mode=multi_processing", a list
  or PipelineOptions) build with an Apache Beam pipeline instead of the
  local worker pool (`num_workers` then does not apply); see README.md.
  """
  cfg = make_config(config, **config_kwargs)
  builder = Trailers12k(config=cfg, data_dir=data_dir)
  if builder.is_prepared():
    return builder
  if cfg.kind != "synthetic" and not manual_dir:
    raise ValueError(f"trailers12k/{config} needs manual_dir.")
  download_config = _download_config(manual_dir, beam_runner, beam_options)
  start = time.time()
  # One build of this config in this data_dir at a time; a second one waits
  # and then finds the dataset ready.
  with lock.build_lock(f"{builder.data_path}.lock"):
    builder = Trailers12k(config=cfg, data_dir=data_dir)
    if builder.is_prepared():
      return builder
    builder.num_workers = num_workers
    builder.retry_skipped = retry_skipped
    builder.download_and_prepare(
      file_format="array_record", download_config=download_config
    )
  print(_summary(builder, time.time() - start), flush=True)
  return builder


def data_source(builder: tfds.core.DatasetBuilder):
  """Random-access source of the split `trailers` (record order = index
  order)."""
  return builder.as_data_source(split="trailers")


def _compute_index(builder) -> dict:
  source = data_source(builder)
  ids, labels, splits, num_shots = [], [], [], []
  for i in range(len(source)):
    ex = source[i]
    ids.append(ex["id"].decode() if isinstance(ex["id"], bytes) else ex["id"])
    labels.append(ex["labels"])
    splits.append(ex["split_assignment"])
    # reps: no shots stored (the clip counts are the zarr stores' lengths).
    num_shots.append(len(ex["shots"]) if "shots" in ex else -1)
  return dict(
    ids=np.asarray(ids, dtype=str),
    labels=np.asarray(labels, np.int32).reshape(-1, NUM_GENRES),
    split_assignment=np.asarray(splits, np.int32).reshape(-1, NUM_FOLDS),
    num_shots=np.asarray(num_shots, np.int32),
  )


def load_index(builder: tfds.core.DatasetBuilder) -> dict:
  """Per-record ids, labels, split_assignment, num_shots (record order).

  Returns {'ids': list[str], 'labels': int32 [N, 10], 'split_assignment':
  int32 [N, 3], 'num_shots': int32 [N]} (reps: -1, the config stores no
  shots). Computed once by reading the dataset, then cached as
  index.npz in the builder's data directory.
  """
  path = os.path.join(builder.data_dir, _INDEX_FILE)
  if not os.path.exists(path):
    index = _compute_index(builder)
    try:
      fd, tmp = tempfile.mkstemp(dir=builder.data_dir, suffix=".tmp")
    except OSError:  # Read-only dataset directory: no cache, same result.
      index["ids"] = [str(i) for i in index["ids"]]
      return index
    umask = os.umask(0)
    os.umask(umask)
    os.fchmod(fd, 0o666 & ~umask)  # Readable by every host (not 0600).
    with os.fdopen(fd, "wb") as f:
      np.savez(f, **index)
    os.replace(tmp, path)  # Atomic: concurrent readers see all or nothing.
  with np.load(path) as z:
    index = {k: z[k] for k in z.files}
  index["ids"] = [str(i) for i in index["ids"]]
  return index


def subset_indices(
  split_assignment: np.ndarray, fold: int, subset: str
) -> np.ndarray:
  """Record indices of `subset` ('train'|'validation'|'test') of `fold`.

  `split_assignment`: int32 [N, 3] from `load_index`. Returns int64 [M],
  ascending.
  """
  split_assignment = np.asarray(split_assignment)
  if split_assignment.ndim != 2 or split_assignment.shape[1] != NUM_FOLDS:
    raise ValueError(
      f"split_assignment must be [N, {NUM_FOLDS}], got "
      f"{split_assignment.shape}."
    )
  if not isinstance(fold, (int, np.integer)) or not 0 <= fold < NUM_FOLDS:
    raise ValueError(f"fold must be 0, 1 or 2, got {fold!r}.")
  if subset not in SUBSETS:
    raise ValueError(f"subset must be one of {SUBSETS}, got {subset!r}.")
  return np.flatnonzero(split_assignment[:, fold] == SUBSETS.index(subset))
