"""A workdir belongs to one config; checks that need no work run first.

`check_config` compares a run's config with the workdir's `config.json`
before anything is touched: a field that changes results differs -> a
clear error listing the fields (use a new workdir, or `--overwrite`, which
moves the old results aside to `previous-<time>/`; nothing is deleted).
Fields that cannot change results (where things are stored, logging, mesh,
batch sizes of extraction and evaluation, which folds run) may differ.

`preflight` finds the mistakes that would otherwise surface after hours of
dataset building or extraction: every config value (configs/checks.py,
with the batch sizes on this run's mesh), a remote or unusable workdir, a
missing manual_dir or converted checkpoint.
"""

import fnmatch
import json
import os
import time

import jax
import ml_collections

from divita_jax import atomic
from divita_jax.configs import checks

CONFIG_FILE = "config.json"
# Fields (dotted, fnmatch patterns) that cannot change results.
FREE_FIELDS = (
  "folds",
  "checkpoints_dir",  # The checkpoint paths themselves are compared.
  "dataset.data_dir",
  "dataset.num_workers",
  "dataset.retry_skipped",
  "dataset.beam_runner",
  "dataset.beam_options",
  "backbones.*.batch_size",
  "extract.*",
  "reps.dir",
  "train.eval_batch_size",
  "train.log_every_steps",
  "train.checkpoint_every_epochs",
  "mesh.*",
  "finetune.decode_threads",
  "finetune.decode_processes",
)
# Fields added after runs were written: an older config.json without them
# ran with these values.
ADDED_FIELDS = {
  "train.mode": "frozen",
  "train.grad_clip_norm": 0.0,
  "dataset.checkpoint": "",
  "finetune.lr_mults": [],
  "finetune.wd_mults": [],
}
# Fields that only a branch uses, by branch.
BRANCH_FIELDS = {
  "image": ("backbones.image.*",),
  "video": ("backbones.video.*",),
  "audio": ("backbones.audio.*", "clips.audio_seconds"),
}
# What --overwrite moves aside (caches of the dataset and reps stay).
RESULTS = ("config.json", "results", "fold*")


class WorkdirError(checks.ConfigError):
  """A workdir or file the config names that cannot work; the message says
  what to do."""


def flat(tree: dict, prefix: str = "") -> dict:
  """{"a.b": v} of a nested dict."""
  out = {}
  for k, v in tree.items():
    if isinstance(v, dict):
      out.update(flat(v, f"{prefix}{k}."))
    else:
      out[f"{prefix}{k}"] = v
  return out


def config_differences(old: dict, new: dict) -> list[str]:
  """Result-changing fields whose values differ: ['path: old -> new']."""
  if isinstance(old, ml_collections.ConfigDict):
    old = old.to_dict()
  if isinstance(new, ml_collections.ConfigDict):
    new = new.to_dict()
  # Through JSON, as config.json was written: tuples become lists.
  old, new = (
    flat(json.loads(json.dumps(old))),
    flat(json.loads(json.dumps(new))),
  )
  old = {**ADDED_FIELDS, **old}
  # Fine-tuning settings change nothing in frozen mode, nor the settings of
  # a branch that neither run has (e.g. the audio fields added later).
  frozen = old.get("train.mode") == new.get("train.mode") == "frozen"
  unused = _unused_branch_fields(old, new)
  diffs = []
  for key in sorted(set(old) | set(new)):
    if any(fnmatch.fnmatchcase(key, p) for p in FREE_FIELDS + unused):
      continue
    if frozen and key.startswith("finetune."):
      continue
    a, b = old.get(key, "<absent>"), new.get(key, "<absent>")
    if a != b:
      diffs.append(f"{key}: {a!r} -> {b!r}")
  return diffs


def _unused_branch_fields(old: dict, new: dict) -> tuple[str, ...]:
  """Patterns of the fields of branches in neither flat config."""
  used = {*old.get("model.branches", ()), *new.get("model.branches", ())}
  unused = ()
  for branch, fields in BRANCH_FIELDS.items():
    if branch not in used:
      unused += fields
  return unused


def check_config(config, workdir: str, overwrite: bool = False) -> None:
  """Raises WorkdirError if `workdir` holds another config's results; with
  `overwrite`, moves them aside instead (process 0 only)."""
  path = os.path.join(workdir, CONFIG_FILE)
  if not os.path.exists(path):
    return
  with open(path) as f:
    old = json.load(f)
  diffs = config_differences(old, config)
  if not diffs:
    return
  if not overwrite:
    raise WorkdirError(
      f"{workdir} holds the results of another config ({len(diffs)} "
      f"field(s) differ: {'; '.join(diffs[:5])}"
      f"{' ...' if len(diffs) > 5 else ''}). Use a new --workdir, or pass "
      "--overwrite to move the old results aside."
    )
  if jax.process_index() == 0:
    moved = move_results_aside(workdir)
    print(f"--overwrite: the previous results were moved to {moved}.")


def move_results_aside(workdir: str) -> str:
  """Moves config.json, results/ and fold*/ into previous-<time>/."""
  dst = os.path.join(workdir, time.strftime("previous-%Y%m%d-%H%M%S"))
  os.makedirs(dst)
  for name in sorted(os.listdir(workdir)):
    if any(fnmatch.fnmatchcase(name, p) for p in RESULTS):
      os.rename(os.path.join(workdir, name), os.path.join(dst, name))
  return dst


def write_config(config, workdir: str) -> None:
  """config.json, atomically (predict.py rebuilds the run from it)."""
  text = config.to_json_best_effort(indent=1, sort_keys=True)
  atomic.write_text(os.path.join(workdir, CONFIG_FILE), text + "\n")


def _is_remote(path: str) -> bool:
  return "://" in str(path)


def _check_dir(path: str, what: str) -> None:
  if _is_remote(path):
    raise WorkdirError(
      f"{what} {path!r} is not a local path: remote storage (gs://, s3://) "
      "is not supported yet; use a local or mounted folder (gcsfuse, NFS)."
    )
  if os.path.exists(path) and not os.path.isdir(path):
    raise WorkdirError(f"{what} {path!r} exists and is not a directory.")
  parent = path
  while parent and not os.path.exists(parent):
    parent = os.path.dirname(parent.rstrip("/"))
  if parent and not os.access(parent, os.W_OK | os.X_OK):
    raise WorkdirError(f"{what} {path!r} is not writable.")


def preflight(config: ml_collections.ConfigDict, workdir: str) -> None:
  """One clear error for each setting that would fail later: the config's
  values on this run's devices (configs/checks.py), then the folders and
  files it names."""
  checks.check(config, jax.device_count(), jax.process_count())
  _check_dir(workdir, "--workdir")
  for field in ("data_dir",):
    if config.dataset[field]:
      _check_dir(config.dataset[field], f"config.dataset.{field}")
  if config.reps.dir:
    _check_dir(config.reps.dir, "config.reps.dir")
  d = config.dataset
  if d.manual_dir and not os.path.isdir(d.manual_dir):
    raise WorkdirError(
      f"config.dataset.manual_dir {d.manual_dir!r} is not a directory."
    )
  if d.config != "reps":
    for b in config.model.branches:
      ckpt = config.backbones[b].checkpoint
      if ckpt and not os.path.isfile(os.path.join(ckpt, "spec.json")):
        raise WorkdirError(
          f"config.backbones.{b}.checkpoint {ckpt!r} is not a converted "
          "checkpoint (no spec.json; run python -m divita_jax.convert)."
        )
