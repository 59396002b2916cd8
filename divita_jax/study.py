r"""Grids of runs: the paper's analyses (or yours) as one command.

  python -m divita_jax.study --config=configs/divita.py:runlocal \
    --grid="clips.fps=4,8;model.cam=savg,tsfm_128_4_6_0.25" \
    --baseline="clips.fps=8,model.cam=tsfm_128_4_6_0.25" --workdir=DIR
  python -m divita_jax.study --config=configs/divita.py --study=frame_rate \
    --workdir=DIR [--shard=I/N] [--report]

Every setting (one value per axis) is a normal run (run.run) in
DIR/<axis>=<label>,...; all settings share the dataset (DIR/tfds) and the
representations of the settings whose extraction fields agree
(DIR/reps/<key>: `extraction_key`), so a change of CAM, fusion, branches or
training field never re-extracts. A finished setting is skipped, a failed
one is reported (DIR/<setting>/study_failed.txt) and the others go on.
DIR/study.md, study.csv and study.png aggregate what is finished
(study_report.py). The grid, the baseline and every setting's config are
checked before any work.
"""

import copy
import difflib
import fnmatch
import hashlib
import importlib.util
import itertools
import json
import logging as std_logging
import os
import re
import sys
from dataclasses import dataclass

from absl import app, flags, logging

from divita_jax import main as entry  # The run's flags: config, workdir, ...
from divita_jax import study_report
from divita_jax import workdir as workdir_lib
from divita_jax.configs import checks
from divita_jax.study_report import FAILED_FILE, finished

FLAGS = flags.FLAGS
flags.DEFINE_string(
  "grid", "", 'Axes "field=v1,v2;field=v1,v2" (tuples: "(a,b),(a)").'
)
flags.DEFINE_string(
  "baseline", "", 'The reference setting, "axis=value,..."; default: the first.'
)
flags.DEFINE_string("study", "", "A named study of --studies_file.")
flags.DEFINE_string(
  "studies_file",
  os.path.join(
    os.path.dirname(os.path.dirname(__file__)), "configs", "studies.py"
  ),
  "The named studies (get_study(name, config)).",
)
flags.DEFINE_string(
  "shard", "0/1", "I/N: run every N-th setting from the I-th."
)
flags.DEFINE_bool("report", False, "Only aggregate the finished settings.")

STUDY_FILE = "study.json"  # The study's axes, settings and claims.
# Fields of the config that change the representations (every other field
# changes only the head, training or where things are).
EXTRACTION_SECTIONS = ("seed", "dataset.", "clips.", "backbones.")


class StudyError(ValueError):
  """A bad grid, baseline or study; the message is one line."""


@dataclass
class Axis:
  name: str
  values: dict  # label -> {config field: value}
  field: str | None = None  # The one field a --grid axis sweeps.


# ------------------------------------------------------------------- grids


def _split(text: str, sep: str) -> list[str]:
  """`text` split at `sep` outside parentheses."""
  parts, depth, start = [], 0, 0
  for i, ch in enumerate(text):
    depth += {"(": 1, ")": -1}.get(ch, 0)
    if ch == sep and depth == 0:
      parts.append(text[start:i])
      start = i + 1
  return [*parts, text[start:]]


def _field(config, name: str):
  """The config value at dotted `name`; StudyError (did you mean) if none."""
  node, path = config, []
  for key in name.split("."):
    if not hasattr(node, "keys") or key not in node:
      fields = node.keys() if hasattr(node, "keys") else []
      close = difflib.get_close_matches(key, list(fields), 1)
      hint = f" (did you mean {'.'.join([*path, close[0]])}?)" if close else ""
      raise StudyError(f"unknown config field {name!r}{hint}")
    node, path = node[key], [*path, key]
  if hasattr(node, "keys"):
    raise StudyError(f"config field {name!r} is a section, not a value")
  return node


def _parse(name: str, text: str, current):
  """`text` as a value of the type of `current` (the base config's)."""
  text = text.strip()
  try:
    if isinstance(current, bool):
      if text.lower() not in ("true", "false"):
        raise ValueError
      return text.lower() == "true"
    if isinstance(current, int):
      return int(text)
    if isinstance(current, float):
      return float(text)
    if isinstance(current, (tuple, list)):
      if not (text.startswith("(") and text.endswith(")")):
        raise ValueError
      items = [t for t in _split(text[1:-1], ",") if t.strip()]
      item = current[0] if len(current) else ""
      return tuple(_parse(name, t, item) for t in items)
  except ValueError:
    kind = type(current).__name__
    kind = "a tuple as (a,b)" if kind in ("tuple", "list") else f"a {kind}"
    raise StudyError(f"{name}={text!r}: expected {kind}") from None
  if isinstance(current, str):
    return text.strip("'\"")
  raise StudyError(f"{name}: a {type(current).__name__} field cannot be swept")


def label(value) -> str:
  """A folder-safe label of a value: 8.0 -> 8, (a, b) -> a+b."""
  if isinstance(value, (tuple, list)):
    return "+".join(label(v) for v in value) or "none"
  text = f"{value:g}" if isinstance(value, float) else str(value)
  return re.sub(r"[^\w.+-]", "-", text)


def parse_grid(text: str, config) -> list[Axis]:
  """--grid "a.b=1,2;c.d=x,y" -> axes, each value checked against the type
  of the field in `config`."""
  axes = []
  for part in [p for p in _split(text, ";") if p.strip()]:
    name, eq, values = part.partition("=")
    name = name.strip()
    if not eq or not name:
      raise StudyError(f"--grid axis {part.strip()!r}: expected field=v1,v2")
    current = _field(config, name)
    texts = [t for t in _split(values, ",") if t.strip()]
    if not texts:
      raise StudyError(f"--grid axis {name!r} has no values")
    parsed = {}
    for t in texts:
      value = _parse(name, t, current)
      if label(value) in parsed:
        raise StudyError(f"--grid axis {name!r}: {t.strip()!r} given twice")
      parsed[label(value)] = {name: value}
    axes.append(Axis(name, parsed, field=name))
  return axes


def named_axes(study: dict, config) -> list[Axis]:
  """A named study's axes, every field checked against `config`."""
  axes = []
  for name, values in study["axes"].items():
    if not values:
      raise StudyError(f"study axis {name!r} has no values")
    for fields in values.values():
      for field in fields:
        _field(config, field)
    axes.append(Axis(name, dict(values)))
  return axes


def check_axes(axes: list[Axis]) -> None:
  names = [a.name for a in axes]
  if not axes:
    raise StudyError("no axes: give --grid and/or --study")
  dup = sorted({n for n in names if names.count(n) > 1})
  if dup:
    raise StudyError(f"axis {dup[0]!r} given twice")


def settings(axes: list[Axis]) -> list[dict]:
  """Every setting, {axis: label}, the last axis varying fastest."""
  labels = [list(a.values) for a in axes]
  return [
    dict(zip([a.name for a in axes], combo))
    for combo in itertools.product(*labels)
  ]


def setting_name(setting: dict) -> str:
  return ",".join(f"{k}={v}" for k, v in setting.items())


def parse_setting(text: str, axes: list[Axis], what="--baseline") -> dict:
  """ "axis=value,..." naming one value of every axis -> {axis: label}."""
  by_name = {a.name: a for a in axes}
  setting = {}
  for part in [p for p in _split(text, ",") if p.strip()]:
    name, _, value = (s.strip() for s in part.partition("="))
    if name not in by_name:
      raise StudyError(f"{what} names {name!r}, not an axis of the grid")
    axis = by_name[name]
    found = value if value in axis.values else None
    if found is None and axis.field is not None:
      try:
        found = label(
          _parse(name, value, next(iter(axis.values.values()))[name])
        )
      except StudyError:
        found = None
    if found not in axis.values:
      raise StudyError(
        f"{what} {name}={value!r} is not in the grid ({', '.join(axis.values)})"
      )
    setting[name] = found
  missing = [a.name for a in axes if a.name not in setting]
  if missing:
    raise StudyError(f"{what} {text!r} names no value of axis {missing[0]!r}")
  return {a.name: setting[a.name] for a in axes}


# ---------------------------------------------------------------- settings


def extraction_key(config) -> tuple[str, dict]:
  """(digest, fields) of every field that changes the representations
  (dataset, clips, backbones, seed; not the free ones: batch sizes,
  folders): the settings that agree on them share DIR/reps/<digest>. The
  store tag inside (extract.backbone_tag) does not name all of them."""
  fields = {
    k: v
    for k, v in workdir_lib.flat(
      json.loads(config.to_json_best_effort())
    ).items()
    if k.startswith(EXTRACTION_SECTIONS)
    and not any(fnmatch.fnmatchcase(k, p) for p in workdir_lib.FREE_FIELDS)
  }
  text = json.dumps(fields, sort_keys=True)
  return hashlib.sha1(text.encode()).hexdigest()[:10], fields


def setting_config(base, axes: list[Axis], setting: dict, workdir: str):
  """The base config with the setting's fields, the shared dataset folder
  and its extraction group's representation folder."""
  config = copy.deepcopy(base)
  by_name = {a.name: a for a in axes}
  for name, value_label in setting.items():
    for field, value in by_name[name].values[value_label].items():
      *parents, leaf = field.split(".")
      node = config
      for p in parents:
        node = node[p]
      try:
        node[leaf] = value
      except (TypeError, ValueError) as e:
        raise StudyError(f"{field}={value!r}: {e}") from None
  workdir = os.path.abspath(workdir)
  if not base.dataset.data_dir:
    config.dataset.data_dir = os.path.join(workdir, "tfds")
  key, _ = extraction_key(config)
  config.reps.dir = os.path.join(
    base.reps.dir or os.path.join(workdir, "reps"), key
  )
  return config


def load_study(name: str, path: str, config) -> dict:
  """get_study(name, config) of the studies file at `path`."""
  spec = importlib.util.spec_from_file_location("divita_studies", path)
  if spec is None or not os.path.isfile(path):
    raise StudyError(f"--studies_file {path!r} is not a file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  try:
    return module.get_study(name, config)
  except ValueError as e:
    raise StudyError(f"--study: {e}") from None


# -------------------------------------------------------------------- plan


@dataclass
class Study:
  axes: list[Axis]
  settings: list[dict]  # {axis: label}, in grid order.
  baseline: dict
  configs: dict  # setting name -> config.
  claims: list[dict]
  costs: bool  # The table carries the backbones' costs.

  def names(self) -> list[str]:
    return [setting_name(s) for s in self.settings]

  def baseline_name(self) -> str:
    return setting_name(self.baseline)


def _check_claims(claims: list[dict], axes: list[Axis]) -> list[dict]:
  """Claims with their settings as names; each must be in the grid."""
  out = []
  for claim in claims:
    names = []
    for s in [claim["setting"], *claim["reference"]]:
      text = setting_name(s)
      names.append(setting_name(parse_setting(text, axes, "study claim")))
    out.append({**claim, "setting": names[0], "reference": names[1:]})
  return out


def plan(base, workdir: str, grid: str, baseline: str, study: str = "",
         studies_file: str = "") -> Study:  # fmt: skip
  """Every setting's config, checked (configs/checks.py) before any work;
  StudyError names the first problem."""
  named = load_study(study, studies_file, base) if study else None
  axes = named_axes(named, base) if named else []
  axes += parse_grid(grid, base)
  check_axes(axes)
  all_settings = settings(axes)
  if baseline:
    base_setting = parse_setting(baseline, axes)
  else:  # The study's, the first value of any other axis.
    first = {**all_settings[0], **(named["baseline"] if named else {})}
    base_setting = parse_setting(setting_name(first), axes, "study baseline")
  configs = {}
  for s in all_settings:
    config = setting_config(base, axes, s, workdir)
    try:
      checks.check(config)
    except checks.ConfigError as e:
      raise StudyError(f"setting {setting_name(s)}: {e}") from None
    configs[setting_name(s)] = config
  claims = _check_claims(named["claims"], axes) if named else []
  costs = bool(named and named["costs"])
  return Study(axes, all_settings, base_setting, configs, claims, costs)


def parse_shard(text: str) -> tuple[int, int]:
  m = re.fullmatch(r"(\d+)/(\d+)", text.strip())
  if not m or not int(m[1]) < int(m[2]):
    raise StudyError(f"--shard={text!r}: expected I/N with 0 <= I < N")
  return int(m[1]), int(m[2])


# ---------------------------------------------------------------- running


def _one_line(e: BaseException) -> str:
  text = " ".join(str(e).split())
  return f"{type(e).__name__}: {text}"[:500]


def run_setting(config, setting_dir: str, overwrite: bool) -> str | None:
  """One setting as a normal run; returns why it failed (None: it did
  not). Preemption and Ctrl-C stop the study (rerun to resume)."""
  import jax

  from divita_jax import atomic, run
  from divita_jax.trainers import checkpoints

  failed = os.path.join(setting_dir, FAILED_FILE)
  try:
    run.run(config, setting_dir, overwrite=overwrite)
  except (checkpoints.Preempted, KeyboardInterrupt):
    raise
  except Exception as e:  # Reported; the other settings go on.
    logging.exception("Setting %s failed.", setting_dir)
    why = _one_line(e)
    if jax.process_index() == 0:
      os.makedirs(setting_dir, exist_ok=True)
      atomic.write_text(failed, why + "\n")
    return why
  if jax.process_index() == 0 and os.path.exists(failed):
    os.remove(failed)
  return None


def run_study(study: Study, workdir: str, shard=(0, 1), overwrite=False):
  """Runs this shard's settings (every N-th); returns {name: why failed}."""
  from divita_jax import hosts

  i, n = shard
  names = study.names()[i::n]
  failed = {}
  for k, name in enumerate(names):
    config, setting_dir = study.configs[name], os.path.join(workdir, name)
    where = f"[study {k + 1}/{len(names)}] {name}"
    if hosts.agree(finished(config, setting_dir)):
      print(f"{where}: finished, skipped.", flush=True)
      continue
    print(f"{where}: running in {setting_dir}", flush=True)
    why = run_setting(config, setting_dir, overwrite)
    if why:
      failed[name] = why
      print(f"{where}: FAILED: {why}", flush=True)
  return failed


def write_plan(study: Study, workdir: str) -> None:
  """DIR/study.json: the axes, settings, baseline and claims."""
  from divita_jax import atomic

  record = dict(
    axes={a.name: a.values for a in study.axes},
    settings=study.names(),
    baseline=setting_name(study.baseline),
    claims=study.claims,
    reps={
      name: os.path.relpath(c.reps.dir, workdir)
      for name, c in study.configs.items()
    },
  )
  os.makedirs(workdir, exist_ok=True)
  atomic.write_json(os.path.join(workdir, STUDY_FILE), record, indent=1)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  try:
    shard = parse_shard(FLAGS.shard)
    st = plan(
      FLAGS.config,
      FLAGS.workdir,
      FLAGS.grid,
      FLAGS.baseline,
      FLAGS.study,
      FLAGS.studies_file,
    )
  except StudyError as e:
    sys.exit(f"divita_jax.study: error: {e}")
  workdir = os.path.abspath(FLAGS.workdir)
  if FLAGS.report:
    if not os.path.isdir(workdir):
      sys.exit(f"divita_jax.study: error: --workdir {workdir} holds no study")
    study_report.write(st, workdir)
    return
  quiet = entry.QuietLibraries()  # As main: orbax, TFDS chatter.
  logging.get_absl_handler().addFilter(quiet)
  std_logging.getLogger().addFilter(quiet)
  entry.initialize_distributed()
  import jax

  for name, config in st.configs.items():  # On these devices, folders.
    try:
      workdir_lib.preflight(config, os.path.join(workdir, name))
    except checks.ConfigError as e:
      sys.exit(f"divita_jax.study: error: setting {name}: {e}")

  from divita_jax.trainers import checkpoints

  if jax.process_index() == 0:
    write_plan(st, workdir)
  print(f"Study: {len(st.settings)} settings in {workdir}", flush=True)
  try:
    failed = run_study(st, workdir, shard, FLAGS.overwrite)
  except checkpoints.Preempted as e:
    logging.warning("%s Exiting; rerun the same command to resume.", e)
    sys.exit(128 + e.signum)
  except KeyboardInterrupt:
    sys.exit("divita_jax.study: interrupted; rerun the same command to resume.")
  if jax.process_index() == 0:
    study_report.write(st, workdir)
  if failed:
    sys.exit(
      f"divita_jax.study: {len(failed)} setting(s) failed: "
      + "; ".join(f"{k}: {v}" for k, v in failed.items())
    )


if __name__ == "__main__":
  entry.quiet_native_logs()
  app.run(main, flags_parser=entry.parse_flags)
