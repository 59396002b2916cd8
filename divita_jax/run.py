"""The DIViTA protocol, stage by stage.

ensure dataset (TFDS trailers12k) -> clip representations (extracted once,
cached in the store) -> for each fold: train the head, evaluate the best
validation checkpoint on validation and test -> results tables. Every stage
resumes: a rerun with the same workdir skips finished work.
"""

import json
import os

import jax
import ml_collections
import numpy as np
from absl import logging
from jax.experimental import multihost_utils

import tfds_trailers12k
from divita_jax import (
  extract,
  hosts,
  report,
)
from divita_jax import workdir as workdir_lib
from divita_jax.pipelines import common, reps, stores
from divita_jax.trainers import loop


def dataset_kwargs(config: ml_collections.ConfigDict) -> dict:
  """Builder-config fields of `config.dataset` for its TFDS config."""
  d = config.dataset
  shots = dict(
    detector=d.detector,
    threshold=d.threshold,
    min_shot_len=d.min_shot_len,
    downscale=d.downscale,
    max_flash_len=d.max_flash_len,
    checkpoint=d.checkpoint,
  )
  if d.config == "synthetic":
    return dict(num_trailers=d.num_trailers, seed=config.seed, **shots)
  if d.config == "raw":
    return dict(
      reencode_height=d.reencode_height, reencode_fps=d.reencode_fps, **shots
    )
  return {}  # reps: labels and folds; features stay in the zarr.


def ensure_dataset(config: ml_collections.ConfigDict, workdir: str):
  """Builds the TFDS dataset if needed; returns (builder, index).

  Process 0 builds it (with the local worker pool, or with Beam when
  `dataset.beam_runner` / `beam_options` are set) and writes its index;
  the other processes wait at the barrier, then open it.
  """
  data_dir = config.dataset.data_dir or os.path.join(workdir, "tfds")
  kwargs = dataset_kwargs(config)
  manual_dir = config.dataset.manual_dir or None
  if jax.process_index() == 0:
    built = tfds_trailers12k.build(
      config.dataset.config,
      data_dir,
      manual_dir,
      num_workers=config.dataset.num_workers,
      retry_skipped=config.dataset.retry_skipped,
      beam_runner=config.dataset.beam_runner,
      beam_options=config.dataset.beam_options,
      **kwargs,
    )
    tfds_trailers12k.load_index(built)
  multihost_utils.sync_global_devices("dataset built")
  builder = tfds_trailers12k.build(
    config.dataset.config, data_dir, manual_dir, **kwargs
  )
  return builder, tfds_trailers12k.load_index(builder)


def representation_readers(config, workdir, builder, index) -> dict:
  """Readers (branch -> store) of the clip representations the head uses."""
  if config.dataset.config == "reps":  # Official zarr groups, in place.
    groups = {b: config.reps[f"zarr_{b}"] for b in config.model.branches}
    manual_dir = config.dataset.manual_dir or ""  # Absolute paths stay.
    return {
      b: stores.ZarrStore(os.path.join(manual_dir, g))
      for b, g in groups.items()
    }
  store_root = config.reps.dir or os.path.join(workdir, "reps")
  readers = extract.extract(
    config,
    tfds_trailers12k.data_source(builder),
    list(index["ids"]),
    store_root,
  )
  multihost_utils.sync_global_devices("representations extracted")
  return readers


def available(readers: dict, index: dict) -> np.ndarray:
  """Boolean [N]: trailers with representations in every branch (process
  0's view, so every process trains on the same trailers)."""
  return hosts.agree(
    np.array([all(r.has(i) for r in readers.values()) for i in index["ids"]])
  )


def _representations(config, workdir, builder, index):
  """(branch -> in-memory reader, kept trailers [N] bool): extracted once
  (or the official zarr), loaded into memory once for every fold (zarr/TFDS
  reads would starve the step; train_fold keeps in-memory readers)."""
  readers = representation_readers(config, workdir, builder, index)
  keep = available(readers, index)
  if not keep.all():
    logging.warning(
      "%d trailers have no representations (skipped).", int((~keep).sum())
    )
  kept_ids = [i for i, k in zip(index["ids"], keep) if k]
  return reps.preload(readers, kept_ids), keep


def _rounded(metrics: dict) -> dict:
  """x100, 2 decimals; undefined (None / NaN) stays None."""
  out = {}
  for k, v in metrics.items():
    v = np.nan if v is None else float(v)
    out[k] = None if np.isnan(v) else round(100 * v, 2)
  return out


def run_fold(config, workdir, readers, index, keep, fold) -> dict:
  """Trains and evaluates one fold, or loads its finished result."""
  out = os.path.join(workdir, "results", f"fold{fold}.json")
  if hosts.agree(os.path.exists(out)):  # Finished: every process loads it.
    with open(out) as f:
      return json.load(f)
  data = common.FoldData.from_split(
    [i for i, k in zip(index["ids"], keep) if k],
    index["labels"][keep],
    index["split_assignment"][keep],
    fold,
  )
  result = loop.train_fold(
    config, os.path.join(workdir, f"fold{fold}"), readers, data
  )
  summary = {k: result[k] for k in ("epoch", "val", "test")}
  summary = report.strict(summary)  # As a rerun reads it back: NaN -> None.
  if jax.process_index() == 0:
    for subset in ("val", "test"):
      report.write_predictions(
        os.path.join(workdir, "results", f"fold{fold}_{subset}_probs.csv"),
        result[f"{subset}_ids"],
        np.asarray(result[f"{subset}_probs"]),
      )
    report.write_json(out, summary)
  return summary


def run(
  config: ml_collections.ConfigDict, workdir: str, overwrite: bool = False
) -> dict:
  """Runs every stage; returns {fold: {'epoch', 'val', 'test'}}.

  First, before any work: the settings that would fail later
  (workdir.preflight), and the workdir's config.json against `config`
  (another config's results -> an error, or moved aside with `overwrite`).
  """
  workdir_lib.preflight(config, workdir)
  workdir_lib.check_config(config, workdir, overwrite)
  os.makedirs(workdir, exist_ok=True)
  if jax.process_index() == 0:  # predict.py rebuilds the run from this file.
    workdir_lib.write_config(config, workdir)
  builder, index = ensure_dataset(config, workdir)
  if loop.mode(config).READS_REPRESENTATIONS:
    readers, keep = _representations(config, workdir, builder, index)
  else:  # Fine-tuning decodes the clips itself.
    readers = tfds_trailers12k.data_source(builder)
    keep = np.ones(len(index["ids"]), bool)
  results = {}
  for fold in config.folds:
    results[fold] = run_fold(config, workdir, readers, index, keep, fold)
    logging.info(
      "Fold %d (best epoch %d) test x100: %s",
      fold,
      results[fold]["epoch"],
      _rounded(results[fold]["test"]),
    )
  if jax.process_index() == 0:
    title = (
      f"DIViTA on trailers12k/{config.dataset.config}: "
      f"{'+'.join(config.model.branches)}, {config.model.fusion} "
      f"fusion, CAM {config.model.cam}, {config.clips.segmentation} "
      "clips"
    )
    title += loop.mode(config).TITLE_SUFFIX
    report.write_results(results, os.path.join(workdir, "results"), title)
    with open(os.path.join(workdir, "results", "summary.md")) as f:
      print(f.read())
  return results
