"""Results files: per-fold CSVs, a mean +- std summary, per-trailer
probabilities (writer and reader), strict JSON records."""

import csv
import math
import os

import numpy as np

from divita_jax import atomic
from tfds_trailers12k import genres

METRIC_COLUMNS = ("uap", "map", "wap", "sap") + genres.SHORT_NAMES
HEADER = ("fold", "epoch") + METRIC_COLUMNS


def _atomic_write(path: str, text: str) -> None:
  atomic.write_text(path, text)


def write_predictions(path: str, ids, probs: np.ndarray) -> None:
  """Per-trailer probabilities: `id,<genre short names>`, 6 decimals."""
  lines = ["id," + ",".join(genres.SHORT_NAMES)]
  lines += [
    f"{i}," + ",".join(f"{p:.6f}" for p in row) for i, row in zip(ids, probs)
  ]
  _atomic_write(path, "\n".join(lines) + "\n")


def read_predictions(path: str) -> tuple[list[str], np.ndarray]:
  """(ids, float64 [N, 10]) of a `write_predictions` CSV."""
  with open(path) as f:
    header = f.readline().strip().split(",")
    if header != ["id", *genres.SHORT_NAMES]:
      raise ValueError(f"{path}: not a probabilities CSV (header {header}).")
    rows = [line.strip().split(",") for line in f if line.strip()]
  probs = np.array([[float(x) for x in r[1:]] for r in rows], np.float64)
  return [r[0] for r in rows], probs.reshape(-1, genres.NUM_GENRES)


def strict(value):
  """NaN / inf -> None: results JSON is strict JSON."""
  if isinstance(value, dict):
    return {k: strict(v) for k, v in value.items()}
  if isinstance(value, (list, tuple)):
    return [strict(v) for v in value]
  if isinstance(value, (float, np.floating)):
    return float(value) if math.isfinite(value) else None
  if isinstance(value, np.integer):
    return int(value)
  return value


def write_json(path: str, record: dict) -> None:
  """Strict JSON (undefined metrics, NaN, become null)."""
  atomic.write_json(path, strict(record), indent=1, allow_nan=False)


def fold_rows(results: dict[int, dict], subset: str) -> list[dict]:
  """One row per fold: fold, best epoch and every metric x100."""
  rows = []
  for fold in sorted(results):
    metrics = results[fold][subset]
    row = {"fold": fold, "epoch": int(results[fold]["epoch"])}
    # Undefined metrics (None in a fold's JSON, NaN in memory) stay NaN.
    row.update(
      {
        k: np.nan if metrics[k] is None else 100.0 * float(metrics[k])
        for k in METRIC_COLUMNS
      }
    )
    rows.append(row)
  return rows


def write_csv(path: str, rows: list[dict]) -> None:
  lines = [",".join(HEADER)]
  for row in rows:
    values = [str(row["fold"]), str(row["epoch"])]
    values += [f"{row[k]:.2f}" for k in METRIC_COLUMNS]
    lines.append(",".join(values))
  _atomic_write(path, "\n".join(lines) + "\n")


def read_csv(path: str) -> list[dict]:
  with open(path) as f:
    return [{k: float(v) for k, v in row.items()} for row in csv.DictReader(f)]


def mean_std(rows: list[dict], key: str) -> str:
  """Mean +- sample std over folds; folds where the metric is undefined (a
  genre without positives in that fold's subset: NaN) are left out."""
  values = np.array(
    [np.nan if r[key] is None else r[key] for r in rows], np.float64
  )
  finite = values[np.isfinite(values)]
  if not len(finite):
    return "n/a"
  std = finite.std(ddof=1) if len(finite) > 1 else 0.0
  text = f"{finite.mean():.2f} +- {std:.2f}"
  if len(finite) < len(values):  # Says so instead of a silent mean.
    text += f" ({len(finite)}/{len(values)} folds)"
  return text


PARTIAL_NOTE = (
  "(k/n folds): mean +- std over the k of n folds where the metric is "
  "defined; a genre without a positive trailer in a fold's subset has no "
  "PR-AUC there (mAP counts it as 0, wAP weighs it 0); with one fold the std "
  "reads 0.00."
)
UNDEFINED_NOTE = (
  "n/a: undefined in every fold (no positive trailer of that genre in any "
  "fold's subset)."
)


def summary_markdown(rows_by_subset: dict[str, list[dict]], title: str) -> str:
  """Table-6 style: mean +- sample std (ddof=1) over folds, per subset;
  a footnote explains the `(k/n folds)` and `n/a` cells that occur."""
  lines, cells = [f"# {title}", ""], []
  for subset, rows in rows_by_subset.items():
    folds = ", ".join(str(int(r["fold"])) for r in rows)
    row = [mean_std(rows, k) for k in METRIC_COLUMNS]
    cells += row
    lines += [
      f"## {subset} (folds {folds}; mean +- std, x100)",
      "",
      "| " + " | ".join(METRIC_COLUMNS) + " |",
      "|" + "---|" * len(METRIC_COLUMNS),
      "| " + " | ".join(row) + " |",
      "",
    ]
  if any(c.endswith(" folds)") for c in cells):
    lines += [PARTIAL_NOTE, ""]
  if "n/a" in cells:
    lines += [UNDEFINED_NOTE, ""]
  return "\n".join(lines)


def write_results(results: dict[int, dict], out_dir: str, title: str) -> None:
  """Writes val.csv, test.csv and summary.md under out_dir."""
  rows = {s: fold_rows(results, s) for s in ("val", "test")}
  for subset, subset_rows in rows.items():
    write_csv(os.path.join(out_dir, f"{subset}.csv"), subset_rows)
  _atomic_write(
    os.path.join(out_dir, "summary.md"),
    summary_markdown({"test": rows["test"], "val": rows["val"]}, title),
  )
