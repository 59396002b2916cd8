"""A study's results: DIR/study.md, study.csv and study.png.

Per setting (finished ones; the others are listed with their state): test
muAP, mAP, wAP, sAP and validation muAP, mean +- std over folds of the
setting's own results/{test,val}.csv (report.mean_std, as its summary.md),
the best epochs, and the test muAP delta against the baseline, paired per
fold (same fold, two settings: mean +- std of the differences, over the
folds both have). The paper's claims are checked the same way, against
the best of their reference settings.
"""

import csv
import io
import json
import os

import numpy as np

from divita_jax import atomic, report
from divita_jax import workdir as workdir_lib

METRICS = ("uap", "map", "wap", "sap")
FAILED_FILE = "study_failed.txt"  # In a setting's folder: why it failed.


def finished(config, setting_dir: str) -> bool:
  """results/test.csv of every fold, written by this very config."""
  test = os.path.join(setting_dir, "results", "test.csv")
  path = os.path.join(setting_dir, workdir_lib.CONFIG_FILE)
  if not (os.path.isfile(test) and os.path.isfile(path)):
    return False
  with open(path) as f:
    if workdir_lib.config_differences(json.load(f), config):
      return False
  folds = {int(r["fold"]) for r in report.read_csv(test)}
  return folds == set(config.folds)


def _stats(rows: list[dict], key: str) -> tuple[float, float, int]:
  """(mean, sample std, folds) over the folds where the metric is defined."""
  values = np.array([r[key] for r in rows], np.float64)
  finite = values[np.isfinite(values)]
  if not len(finite):
    return np.nan, np.nan, 0
  std = finite.std(ddof=1) if len(finite) > 1 else 0.0
  return float(finite.mean()), float(std), len(finite)


def paired_delta(rows: list[dict], base_rows: list[dict], key="uap") -> dict:
  """Per fold both have: rows' metric minus base_rows'; mean +- std."""
  base = {int(r["fold"]): r[key] for r in base_rows}
  diffs = {
    int(r["fold"]): r[key] - base[int(r["fold"])]
    for r in rows
    if int(r["fold"]) in base and np.isfinite(r[key] - base[int(r["fold"])])
  }
  values = np.array(list(diffs.values()), np.float64)
  std = values.std(ddof=1) if len(values) > 1 else 0.0
  mean = values.mean() if len(values) else np.nan
  return dict(per_fold=diffs, mean=float(mean), std=float(std), n=len(diffs))


def load(st, workdir: str) -> dict:
  """name -> {state, test, val}: rows of the finished settings."""
  out = {}
  for name, config in st.configs.items():
    d = os.path.join(workdir, name)
    if finished(config, d):
      rows = {
        s: report.read_csv(os.path.join(d, "results", f"{s}.csv"))
        for s in ("test", "val")
      }
      out[name] = dict(state="done", folds=len(config.folds), **rows)
    elif os.path.exists(os.path.join(d, FAILED_FILE)):
      with open(os.path.join(d, FAILED_FILE)) as f:
        out[name] = dict(state="failed: " + f.read().strip())
    else:
      out[name] = dict(state="not finished")
  return out


def backbone_costs(config) -> dict:
  """Parameters and GMACs per clip of the branches' backbones (2-D kinds:
  a frame's x the frames they see), from XLA's cost analysis of the
  lowered forward pass; the variables only as shapes (no init compiled)."""
  import jax

  from divita_jax.models import backbone, runtime

  params, gmacs = 0, 0.0
  for branch in config.model.branches:
    built = {}

    def make(branch=branch, built=built):
      module, variables, built["spec"] = runtime.make_backbone(config, branch)
      built["module"] = module
      return runtime.as_variables(variables)

    variables = jax.eval_shape(make)
    module, spec = built["module"], built["spec"]
    params += sum(
      int(np.prod(x.shape)) for x in jax.tree.leaves(variables["params"])
    )
    x = backbone.dummy_input(spec)
    analysis = jax.jit(module.apply).lower(variables, x).cost_analysis()
    analysis = analysis[0] if isinstance(analysis, list) else analysis
    frames = 1
    if backbone.is_image_model(spec):
      b = config.backbones[branch]
      frames = config.clips.frames_per_clip if b.frame_pooling == "mean" else 1
    gmacs += frames * float(analysis["flops"]) / 2e9
  return dict(params=params, gmacs=gmacs)


def _costs(st, workdir: str, name: str) -> dict:
  """backbone_costs of a setting, kept in DIR/<setting>/study_costs.json."""
  path = os.path.join(workdir, name, "study_costs.json")
  if not os.path.exists(path):
    atomic.write_json(path, backbone_costs(st.configs[name]))
  with open(path) as f:
    return json.load(f)


def _fmt(mean: float, std: float, sign: bool = False) -> str:
  if not np.isfinite(mean):
    return "n/a"
  return f"{mean:+.2f} +- {std:.2f}" if sign else f"{mean:.2f} +- {std:.2f}"


def _per_fold(delta: dict) -> str:
  return ", ".join(
    f"{k}: {v:+.2f}" for k, v in sorted(delta["per_fold"].items())
  )


def _claim_results(st, results, costs) -> list[dict]:
  """Each claim with ours: the paired delta (or cost %) against the best
  finished reference setting by mean test muAP."""
  out = []
  for claim in st.claims:
    done = [r for r in claim["reference"] if results[r]["state"] == "done"]
    ours, ref = None, None
    if results[claim["setting"]]["state"] == "done" and done:
      ref = max(done, key=lambda r: _stats(results[r]["test"], "uap")[0])
      if claim["kind"] == "delta":
        d = paired_delta(
          results[claim["setting"]]["test"], results[ref]["test"]
        )
        ours = f"{_fmt(d['mean'], d['std'], True)} ({d['n']} folds)"
      else:
        pct = 100 * costs[claim["setting"]][claim["kind"]]
        ours = f"{pct / costs[ref][claim['kind']]:.2f}%"
    out.append({**claim, "ours": ours or "n/a", "against": ref or "n/a"})
  return out


def table(st, results: dict, costs: dict) -> list[dict]:
  """One row per setting (study.csv's columns)."""
  base = st.baseline_name()
  base_rows = results[base].get("test")
  paper = {
    c["setting"]: c["paper"]
    for c in st.claims
    if c["kind"] == "delta" and c["reference"] == [base]
  }
  rows = []
  for s, name in zip(st.settings, st.names()):
    r = results[name]
    row = {"setting": name, **s, "state": r["state"].split(":")[0]}
    if r["state"] == "done":
      for m in METRICS:
        mean, std, _ = _stats(r["test"], m)
        row.update({f"test_{m}": mean, f"test_{m}_std": std})
      mean, std, _ = _stats(r["val"], "uap")
      row.update(val_uap=mean, val_uap_std=std, folds=len(r["test"]))
      row["epochs"] = "/".join(str(int(x["epoch"])) for x in r["test"])
      if base_rows is not None:
        d = paired_delta(r["test"], base_rows)
        row.update(delta_uap=d["mean"], delta_uap_std=d["std"])
        row.update(delta_folds=d["n"], delta_per_fold=_per_fold(d))
    if name in paper:
      row["paper_delta_uap"] = paper[name]
    if name in costs:
      row.update(params=costs[name]["params"], gmacs=costs[name]["gmacs"])
    rows.append(row)
  return rows


def markdown(st, results, rows, claims) -> str:
  base = st.baseline_name()
  axes = [a.name for a in st.axes]
  head = [*axes, "test muAP", "mAP", "wAP", "sAP", "val muAP", "best epochs"]
  head += [f"delta muAP vs {base}", "per-fold delta", "folds"]
  has_paper = any("paper_delta_uap" in r for r in rows)
  has_costs = any("params" in r for r in rows)
  head += ["paper delta"] * has_paper + [
    "backbone params (M)",
    "GMACs/clip",
  ] * has_costs
  lines = [
    f"# Study: {len(rows)} settings, baseline {base}",
    "",
    "Test metrics x100, mean +- std over folds; delta: test muAP minus the "
    "baseline's, paired per fold, over the folds both have.",
    "",
    "| " + " | ".join(head) + " |",
    "|" + "---|" * len(head),
  ]
  for row, name in zip(rows, st.names()):
    r = results[name]
    cells = [row[a] for a in axes]
    if r["state"] == "done":
      cells += [report.mean_std(r["test"], m) for m in METRICS]
      cells += [report.mean_std(r["val"], "uap"), row["epochs"]]
      if "delta_uap" in row:
        delta = _fmt(row["delta_uap"], row["delta_uap_std"], True)
        folds = f"{row['delta_folds']} of {r['folds']}"
        cells += [delta, row["delta_per_fold"] or "-", folds]
      else:
        cells += ["baseline not finished", "-", "-"]
    else:
      cells += [r["state"]] + ["-"] * 8
    if has_paper:
      p = row.get("paper_delta_uap")
      cells.append("-" if p is None else f"{p:+.2f}")
    if has_costs:
      cells += (
        [f"{row['params'] / 1e6:.2f}", f"{row['gmacs']:.3f}"]
        if "params" in row
        else ["-", "-"]
      )
    lines.append("| " + " | ".join(str(c) for c in cells) + " |")
  if claims:
    lines += ["", "## The paper's claims", ""]
    lines += [
      "| claim | setting | against | ours | paper |",
      "|---|---|---|---|---|",
    ]
    for c in claims:
      unit = "%" if c["kind"] != "delta" else ""
      paper = f"{c['paper']:+.2f}" if c["kind"] == "delta" else f"{c['paper']}"
      lines.append(
        f"| {c['what']} | {c['setting']} | {c['against']} | {c['ours']} "
        f"| {paper}{unit} |"
      )
  return "\n".join(lines) + "\n"


def csv_text(st, rows: list[dict]) -> str:
  columns = ["setting", *[a.name for a in st.axes], "state", "folds"]
  for m in METRICS:
    columns += [f"test_{m}", f"test_{m}_std"]
  columns += ["val_uap", "val_uap_std", "epochs", "delta_uap"]
  columns += ["delta_uap_std", "delta_folds", "delta_per_fold"]
  columns += ["paper_delta_uap", "params", "gmacs"]
  buf = io.StringIO()
  writer = csv.DictWriter(buf, columns, lineterminator="\n")
  writer.writeheader()
  for row in rows:
    writer.writerow(
      {
        k: round(v, 4) if isinstance(v, float) and np.isfinite(v) else v
        for k, v in row.items()
      }
    )
  return buf.getvalue()


def plot(st, rows: list[dict], path: str) -> None:
  """Test muAP against the first axis, std error bars, one line per value
  of the other axes."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  x_axis, others = st.axes[0], [a.name for a in st.axes[1:]]
  labels = list(x_axis.values)
  try:
    xs = {lab: float(lab) for lab in labels}
  except ValueError:  # Categorical: positions in grid order.
    xs = {lab: float(i) for i, lab in enumerate(labels)}
  fig, ax = plt.subplots(figsize=(6, 4))
  lines = {}
  for row in rows:
    if row["state"] == "done":
      key = ",".join(f"{a}={row[a]}" for a in others) or "all"
      lines.setdefault(key, []).append(row)
  for key, group in lines.items():
    ax.errorbar(
      [xs[r[x_axis.name]] for r in group],
      [r["test_uap"] for r in group],
      yerr=[r["test_uap_std"] for r in group],
      marker="o",
      capsize=3,
      label=key,
    )
  ax.set_xticks(list(xs.values()), labels)
  ax.set_xlabel(x_axis.name)
  ax.set_ylabel("test muAP (x100)")
  if lines and others:
    ax.legend(fontsize=8)
  fig.tight_layout()
  buf = io.BytesIO()
  fig.savefig(buf, format="png", dpi=100)
  plt.close(fig)
  atomic.write_bytes(path, buf.getvalue())


def write(st, workdir: str) -> dict:
  """Writes DIR/study.md, study.csv, study.png; returns the results."""
  results = load(st, workdir)
  costs = {}
  if st.costs:
    costs = {
      n: _costs(st, workdir, n)
      for n, r in results.items()
      if r["state"] == "done"
    }
  rows = table(st, results, costs)
  claims = _claim_results(st, results, costs)
  atomic.write_text(
    os.path.join(workdir, "study.md"), markdown(st, results, rows, claims)
  )
  atomic.write_text(os.path.join(workdir, "study.csv"), csv_text(st, rows))
  plot(st, rows, os.path.join(workdir, "study.png"))
  done = sum(r["state"] == "done" for r in results.values())
  print(f"Study report: {done} of {len(results)} settings finished; "
        f"{os.path.join(workdir, 'study.md')}", flush=True)  # fmt: skip
  return results
