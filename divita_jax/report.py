"""Paper-style results files: per-fold CSVs and a mean +- std summary."""

import csv
import os
import tempfile

import numpy as np

from divita_jax import genres

METRIC_COLUMNS = ("uap", "map", "wap", "sap") + genres.SHORT_NAMES
HEADER = ("fold", "epoch") + METRIC_COLUMNS


def _atomic_write(path: str, text: str) -> None:
  os.makedirs(os.path.dirname(path), exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=os.path.dirname(path), suffix=".tmp")
  with os.fdopen(fd, "w") as f:
    f.write(text)
  os.replace(tmp, path)


def fold_rows(results: dict[int, dict], subset: str) -> list[dict]:
  """One row per fold: fold, best epoch and every metric x100."""
  rows = []
  for fold in sorted(results):
    metrics = results[fold][subset]
    row = {"fold": fold, "epoch": int(results[fold]["epoch"])}
    row.update({k: 100.0 * float(metrics[k]) for k in METRIC_COLUMNS})
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
  values = np.array([r[key] for r in rows], np.float64)
  values = values[np.isfinite(values)]
  if not len(values):
    return "n/a"
  std = values.std(ddof=1) if len(values) > 1 else 0.0
  return f"{values.mean():.2f} +- {std:.2f}"


def summary_markdown(rows_by_subset: dict[str, list[dict]], title: str) -> str:
  """Table-6 style: mean +- sample std (ddof=1) over folds, per subset."""
  lines = [f"# {title}", ""]
  for subset, rows in rows_by_subset.items():
    folds = ", ".join(str(int(r["fold"])) for r in rows)
    lines += [
      f"## {subset} (folds {folds}; mean +- std, x100)",
      "",
      "| " + " | ".join(METRIC_COLUMNS) + " |",
      "|" + "---|" * len(METRIC_COLUMNS),
      "| " + " | ".join(mean_std(rows, k) for k in METRIC_COLUMNS) + " |",
      "",
    ]
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
