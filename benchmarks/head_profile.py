r"""Where the DIViTA head's training step spends its time, and its levers.

At the issue's sizes (batch 32 trailers x 30 clips x 768 features x 2
branches, default `tsfm` head, AdamW AMSGrad), in one process:

- the step's operations from a profiler trace (XLA:CPU runs one thunk per
  fused operation; each is attributed to a part of the head through its HLO
  `op_name`): projections, attention, feed-forward, LayerNorm, BatchNorm,
  dropout, optimizer, forward and backward;
- the host side and the levers, timed round robin (every candidate once
  per round, so all see the same machine load): per-step sync, dispatch,
  transfer, several steps per dispatch (`Programs.train_steps`, a lax.scan),
  no donation, XLA:CPU compiler options (bitwise equal or not), evaluation
  per batch or scanned over many;
- the matmul peak (a plain jnp.dot of the head's shapes) against the step's
  achieved GFLOP/s (XLA's flop count / step time);
- training epochs (data included, as the fold loop runs them) and the
  validation pass on generated in-memory representations of 3,000 and
  12,000 trailers (fold 0's shares: 70.6% train, 14.7% validation).

  python benchmarks/head.py --profile                 # this, from head.py
  python benchmarks/head_profile.py --epoch_trailers=3000,12000
  python benchmarks/head_profile.py --smoke           # tiny sizes (CI)
"""

import argparse
import collections
import functools
import glob
import gzip
import json
import os
import re
import tempfile
import time

import jax
import numpy as np
import timing

from divita_jax import evaluate, hosts, sharding
from divita_jax.configs import divita as divita_config
from divita_jax.pipelines import common
from divita_jax.trainers import frozen, loop
from divita_jax.trainers import state as st

BRANCHES = ("image", "video")
# XLA:CPU compiler options tried on the step (jax.jit compiler_options).
XLA_OPTIONS = {
  "default": {},
  "Eigen dots (no YNNPACK)": {"xla_cpu_experimental_ynn_fusion_type": ""},
  "concurrency scheduler": {
    "xla_cpu_enable_concurrency_optimized_scheduler": True
  },
  "vector width 512": {"xla_cpu_prefer_vector_width": 512},
  "fast math": {"xla_cpu_enable_fast_math": True},
}
# Parts of the head, by a piece of the HLO op_name (first match wins).
PARTS = (
  ("Dropout", "dropout (RNG, masks)"),
  ("/bn/", "BatchNorm [B, clips, F]"),
  ("/proj/", "projection F -> 128"),
  ("/attention/", "attention (q, k, v, out, softmax)"),
  ("/ff_", "feed-forward 128 -> 768 -> 128"),
  ("relu", "feed-forward 128 -> 768 -> 128"),
  ("/norm", "LayerNorm"),
  ("/head/", "classifier 128 -> 10"),
)


def _load() -> str:
  return "/".join(f"{x:.1f}" for x in os.getloadavg())


# ------------------------------------------------------------------ inputs


def config_for(args):
  config = divita_config.get_config()
  if args.smoke:
    config.model.cam = "tsfm_16_4_2_0.25"
    config.train.num_clips = 6
    config.train.batch_size = config.train.eval_batch_size = 8
  return config


def random_batch(rng, config, features: int) -> dict:
  """One training batch of full windows (trailers of ~96 clips)."""
  b, s = config.train.batch_size, config.train.num_clips
  out = {k: rng.standard_normal((b, s, features), np.float32) for k in BRANCHES}
  out["mask"] = np.ones((b, s), bool)
  out["labels"] = (rng.random((b, 10)) < 0.3).astype(np.float32)
  return out


class GeneratedStore:
  """Random [clips, D] float32 per trailer, made on read (what
  reps.preload copies into its buffer: no zarr written)."""

  def __init__(self, clips: np.ndarray, dim: int, seed: int):
    self.clips, self.num_features, self.seed = clips, dim, seed
    self.tag = f"generated{seed}"

  def length(self, trailer_id: str) -> int:
    return int(self.clips[int(trailer_id[2:])])

  def read(self, trailer_id: str) -> np.ndarray:
    i = int(trailer_id[2:])
    rng = np.random.default_rng((self.seed, i))
    return rng.random((self.clips[i], self.num_features), np.float32) - 0.5


def generated_fold(n: int, dim: int, mean_clips: int = 96):
  """(readers, FoldData) of n generated trailers, fold 0's shares."""
  rng = np.random.default_rng(0)
  clips = rng.integers(mean_clips * 2 // 3, mean_clips * 4 // 3 + 1, size=n)
  ids = [f"tt{i:07d}" for i in range(n)]
  labels = (rng.random((n, 10)) < 0.3).astype(np.float32)
  subset = np.digitize(rng.random(n), [0.706, 0.853])  # train/val/test
  split = np.tile(subset[:, None], (1, 3))
  readers = {
    b: GeneratedStore(clips, dim, seed) for seed, b in enumerate(BRANCHES)
  }
  return readers, common.FoldData.from_split(ids, labels, split, 0)


# ---------------------------------------------------------- op breakdown


def _part(op_name: str) -> str:
  backward = "transpose(" in op_name
  if "jvp(" not in op_name and not backward:
    return "optimizer (AdamW AMSGrad) + metrics"
  name = next(
    (v for k, v in PARTS if k in op_name), "other (masks, means, loss)"
  )
  return f"{name} {'bwd' if backward else 'fwd'}"


def op_breakdown(step, state, batch, lr, steps: int) -> dict:
  """{part: thunk ms per step} from a profiler trace of `steps` steps
  (thunks of both threads summed: can exceed the wall time); also
  'matmul' (every dot thunk) and 'thunks' (their number per step)."""
  hlo = step.lower(state, batch, lr).compile().as_text()
  names = dict(
    re.findall(r'^\s*(?:ROOT )?%?([\w.\-]+) = .*?op_name="([^"]*)"', hlo, re.M)
  )
  dots = set(
    re.findall(r"^\s*(?:ROOT )?%?([\w.\-]+) = \S+ (?:dot)\(", hlo, re.M)
  )
  dots |= {n for n in names if n.startswith("ynn_fusion")}
  for _ in range(2):
    state, out = step(state, batch, lr)
  jax.block_until_ready(out)
  with tempfile.TemporaryDirectory() as tmp:
    jax.profiler.start_trace(tmp)
    for _ in range(steps):
      state, out = step(state, batch, lr)
    jax.block_until_ready(out)
    jax.profiler.stop_trace()
    (path,) = glob.glob(f"{tmp}/plugins/profile/*/*.trace.json.gz")
    with gzip.open(path) as f:
      events = json.load(f)["traceEvents"]
  ms = collections.defaultdict(float)
  count = 0
  for e in events:
    if e.get("ph") == "X" and e["name"] in names:
      ms[_part(names[e["name"]])] += e["dur"] / 1e3 / steps
      ms["matmul"] += e["dur"] / 1e3 / steps if e["name"] in dots else 0
      count += 1
  ms["thunks"] = count / steps
  return dict(ms), state


# --------------------------------------------------------------- levers


def matmul_peak(config, features: int, reps_: int = 20) -> dict:
  """GFLOP/s of jnp.dot on the head's shapes ([B * clips, F] x [F, 128],
  [B * clips, 128] x [128, 768], the weight gradient [F, B * clips] x
  [B * clips, 128]) and of a square 1024 one."""
  t = config.train.batch_size * config.train.num_clips
  shapes = {
    f"[{t},{features}]x[{features},128]": ((t, features), (features, 128)),
    f"[{t},128]x[128,768]": ((t, 128), (128, 768)),
    f"[{features},{t}]x[{t},128]": ((features, t), (t, 128)),
    "[1024,1024]x[1024,1024]": ((1024, 1024), (1024, 1024)),
  }
  dot = jax.jit(lambda a, b: a @ b)
  args = {
    k: (jax.numpy.ones(a, np.float32), jax.numpy.ones(b, np.float32))
    for k, (a, b) in shapes.items()
  }

  def run(k):
    def f():
      for _ in range(reps_):
        out = dot(*args[k])
      jax.block_until_ready(out)

    return f

  times = timing.round_robin({k: run(k) for k in shapes}, rounds=5)
  return {
    k: 2 * a[0] * a[1] * b[1] * reps_ / times[k].best / 1e9
    for k, (a, b) in shapes.items()
  }


def step_flops(p, state, batch, lr) -> float:
  cost = p.train_step.lower(state, batch, lr).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return float(cost["flops"])


class _Candidates:
  """Zero-argument callables, each running `k` training steps on its own
  state (donated and carried) from one numpy batch."""

  def __init__(self, p, config, mesh, nb, k: int):
    self.p, self.mesh, self.nb, self.k = p, mesh, nb, k
    self.lr = np.float32(config.train.learning_rate)
    self.batch = hosts.global_batch(nb, mesh)
    self.states = {}
    self.fns = {}

  def _state(self, name):
    if name not in self.states:
      self.states[name] = self.p.init(jax.random.PRNGKey(0))
    return self.states[name]

  def add_single(self, name, step, sync: bool, transfer: bool):
    def f():
      for _ in range(self.k):
        if transfer:
          batch = hosts.global_batch(self.nb, self.mesh)
        else:
          batch = self.batch
        self.states[name], out = step(self._state(name), batch, self.lr)
        if sync:
          jax.block_until_ready(out)
      jax.block_until_ready(out)

    self.fns[name] = f

  def add_scanned(self, name, n: int):
    lrs = np.full(n, self.lr)

    def f():
      for _ in range(self.k // n):
        batches = st.global_batches([self.nb] * n, self.mesh)
        self.states[name], out = self.p.train_steps(
          self._state(name), batches, lrs
        )
      jax.block_until_ready(out)

    self.fns[name] = f

  def add(self, name, fn):
    self.fns[name] = fn


def lever_times(p, config, mesh, nb, k: int, rounds: int) -> tuple:
  """({candidate: ms per step (best, median)}, {option: bitwise equal})."""
  c = _Candidates(p, config, mesh, nb, k)
  c.add_single("step, synchronised every step", p.train_step, True, True)
  c.add_single("step, no per-step sync", p.train_step, False, True)
  c.add_single("step, batch already on device", p.train_step, False, False)
  for n in (4, 8, 16):
    if k % n == 0:
      c.add_scanned(f"{n} steps per dispatch (lax.scan)", n)
  fn = functools.partial(frozen.train_step, p.model, p.tx)
  c.add_single("step, state not donated", jax.jit(fn), False, False)
  exact = {}
  for name, options in XLA_OPTIONS.items():
    if not options:
      continue
    compiled = (
      jax.jit(fn, donate_argnums=(0,))
      .lower(p.init(jax.random.PRNGKey(0)), c.batch, c.lr)
      .compile(options)
    )
    exact[name] = _same_steps(p.train_step, compiled, p, c)
    c.add_single(f"XLA: {name}", compiled, False, False)

  def dispatch():  # The call's return alone: XLA:CPU runs asynchronously.
    outs = []
    start = time.perf_counter()
    for _ in range(k):
      c.states["dispatch"], out = p.train_step(
        c._state("dispatch"), c.batch, c.lr
      )
      outs.append(out)
    seconds = time.perf_counter() - start
    jax.block_until_ready(outs)
    dispatch.seconds.append(seconds)

  dispatch.seconds = []
  c.add("dispatch (the call returning)", dispatch)
  c.add(
    "transfer one batch to the device",
    lambda: [
      jax.block_until_ready(hosts.global_batch(nb, mesh)) for _ in range(k)
    ],
  )
  times = timing.round_robin(c.fns, rounds=rounds)
  out = {n: (t.best * 1e3 / k, t.median * 1e3 / k) for n, t in times.items()}
  best = min(dispatch.seconds) * 1e3 / k
  out["dispatch (the call returning)"] = (best, best)
  return out, exact


def _same_steps(step, other, p, c, n: int = 3) -> bool:
  """Whether `other` gives the state of `step` bit for bit after n steps."""
  a = p.init(jax.random.PRNGKey(0))
  b = p.init(jax.random.PRNGKey(0))
  for _ in range(n):
    a, _ = step(a, c.batch, c.lr)
    b, _ = other(b, c.batch, c.lr)
  return all(
    np.array_equal(x, y) for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


# ----------------------------------------------------------------- epochs


def epoch_times(config, mesh, n: int, dim: int, ks, rounds: int) -> dict:
  """Seconds of one training epoch (data included: the preloaded pipeline,
  transfers, dispatches, as loop.py runs them) per steps-per-dispatch in
  `ks`, and at the largest with the pipeline's per-step batches stacked
  (the read before loop.train_batches), round robin over epochs; and of
  the validation pass per batch
  (evaluate.window_outputs) and scanned over stacks of 8 batches."""
  readers, fold = generated_fold(n, dim)
  start = time.perf_counter()
  setup = frozen.fold_setup(config, mesh, readers, fold, preload=True)
  load_s = time.perf_counter() - start
  p = setup.programs
  state = p.init(jax.random.PRNGKey(0))
  steps = setup.train.steps_per_epoch
  # The loop's batches (stacks gathered at once from the preloaded buffers,
  # read ahead) and, for comparison, the pipeline's batches stacked.
  its = {True: loop.train_batches(setup), False: common.iterate(setup.train)}
  lr = np.float32(config.train.learning_rate)
  holder = {"state": state}
  size = lambda k, left: k if 1 < k <= left else 1

  def epoch(k, stacks=True):
    def f():
      s, done, it = holder["state"], 0, its[stacks]
      while done < steps:
        m = size(k, steps - done)
        then = size(k, steps - done - m) if steps - done - m else 0
        local = loop.next_batches(it, m, then)
        if m == 1:
          s, out = p.train_step(s, hosts.global_batch(local, mesh), lr)
        else:
          batches = st.global_stack(local, mesh)
          s, out = p.train_steps(s, batches, np.full(m, lr))
        done += m
      jax.block_until_ready(out)
      holder["state"] = s

    return f

  val = setup.eval_data("validation")
  variables = st.variables_of(p.init(jax.random.PRNGKey(1)))  # Not donated.
  scanned = _scanned_eval(p, mesh)
  fns = {f"train epoch, {k} steps per dispatch": epoch(k) for k in ks}
  k = max(ks)
  fns[f"train epoch, {k} per dispatch, pipeline batches stacked"] = epoch(
    k, stacks=False
  )
  fns["validation, one dispatch per batch"] = lambda: evaluate.window_outputs(
    p.eval_step, variables, val, mesh, config.model.branches
  )
  fns["validation, 8 batches per dispatch"] = lambda: scanned(variables, val)
  same = _same_outputs(fns, scanned, p, variables, val, mesh, config)
  times = timing.round_robin(fns, rounds=rounds)
  out = {name: t.best for name, t in times.items()}
  return dict(
    seconds=out,
    steps=steps,
    train=len(fold.rows("train")),
    windows=val.num_steps * config.train.eval_batch_size,
    load_s=load_s,
    eval_exact=same,
  )


def _scanned_eval(p, mesh, k: int = 8):
  """Validation windows k batches per dispatch (lax.map of eval_step):
  what evaluate.window_outputs would do with stacked batches."""
  model = p.model
  rep = sharding.replicated(mesh)
  var_sh = {
    "params": p.shardings.params,
    "batch_stats": p.shardings.batch_stats,
  }
  many = jax.jit(
    lambda v, bs: jax.lax.map(lambda b: frozen.eval_step(model, v, b), bs),
    in_shardings=(var_sh, st.stacked_sharding(mesh)),
    out_shardings=rep,
  )

  def run(variables, data):
    it = common.iterate(data)
    keys = (*BRANCHES, "mask", "labels", "trailer")
    outs, left = [], data.num_steps
    while left:
      n = k if left >= k else 1
      local = [
        {key: b[key] for key in keys} for b in (next(it) for _ in range(n))
      ]
      if n == 1:
        out = p.eval_step(variables, hosts.global_batch(local[0], mesh))
        out = jax.tree.map(lambda x: np.asarray(x)[None], out)
      else:
        out = many(variables, st.global_batches(local, mesh))
      outs.append(jax.tree.map(np.asarray, out))
      left -= n
    return {
      key: np.concatenate([o[key].reshape(-1, *o[key].shape[2:]) for o in outs])
      for key in outs[0]
    }

  return run


def _same_outputs(fns, scanned, p, variables, val, mesh, config) -> bool:
  a = fns["validation, one dispatch per batch"]()
  b = scanned(variables, val)
  return all(np.array_equal(a[k], b[k]) for k in a)


# ------------------------------------------------------------------ print


def report(args) -> None:
  """Every table, in this process."""
  config = config_for(args)
  mesh = sharding.make_mesh(config.mesh)
  features = args.features
  p = frozen.programs(config, mesh, {b: features for b in BRANCHES})
  rng = np.random.default_rng(0)
  nb = random_batch(rng, config, features)
  batch = hosts.global_batch(nb, mesh)
  lr = np.float32(config.train.learning_rate)
  load_start = _load()
  if args.epochs_only:
    for n in args.epoch_trailers:
      r = epoch_times(config, mesh, n, features, args.ks, args.rounds)
      _print_epoch(n, r, config)
    print(f"Load average {load_start} at start, {_load()} at end.")
    return
  flops = step_flops(p, p.init(jax.random.PRNGKey(0)), batch, lr)
  peak = matmul_peak(config, features)
  levers, exact = lever_times(p, config, mesh, nb, args.k, args.rounds)
  parts, _ = op_breakdown(
    p.train_step, p.init(jax.random.PRNGKey(0)), batch, lr, args.k
  )
  tc = config.train
  print(
    f"\nDIViTA head step: batch {tc.batch_size} trailers x {tc.num_clips} "
    f"clips x {features} features x {len(BRANCHES)} branches, cam "
    f"{config.model.cam}, AdamW AMSGrad; {os.cpu_count()} CPU cores; load "
    f"average {load_start} at start (1/5/15 min)."
  )
  _print_parts(parts, levers["step, batch already on device"][0])
  _print_levers(levers, exact, flops, max(peak.values()))
  _print_peak(peak, flops, levers)
  for n in args.epoch_trailers:
    _print_epoch(n, epoch_times(config, mesh, n, features, args.ks, 2), config)
  print(f"Load average at end: {_load()}.")


def _print_parts(parts: dict, step_ms: float):
  total = sum(v for k, v in parts.items() if k not in ("matmul", "thunks"))
  print(
    f"\nStep by part (profiler: XLA:CPU thunk ms per step, both threads "
    f"summed; {parts['thunks']:.0f} thunks a step; the step's wall time "
    f"{step_ms:.1f} ms):"
  )
  print("| part | ms per step | share % |")
  print("|---|---|---|")
  rows = sorted(
    ((k, v) for k, v in parts.items() if k not in ("matmul", "thunks")),
    key=lambda kv: -kv[1],
  )
  for k, v in rows:
    print(f"| {k} | {v:.2f} | {100 * v / total:.1f} |")
  print(f"| all thunks | {total:.2f} | 100.0 |")
  print(
    f"| of which matmuls (dots) | {parts['matmul']:.2f} | "
    f"{100 * parts['matmul'] / total:.1f} |"
  )


def _print_levers(levers: dict, exact: dict, flops: float, peak: float):
  print(
    "\nHost side and levers (round robin in this process; ms per step, best "
    "and median round; GFLOP/s of the best):"
  )
  print("| candidate | best ms | median ms | GFLOP/s | % of peak | exact |")
  print("|---|---|---|---|---|---|")
  for name, (best, median) in levers.items():
    option = name.removeprefix("XLA: ")
    same = "yes" if option not in exact else ("yes" if exact[option] else "no")
    work = name.startswith(("step", "XLA", "4 ", "8 ", "16 "))
    rate = f"{flops / best / 1e6:.1f} | {100 * flops / best / 1e6 / peak:.0f}"
    print(
      f"| {name} | {best:.2f} | {median:.2f} | "
      f"{rate if work else '- | -'} | {same if work else '-'} |"
    )


def _print_peak(peak: dict, flops: float, levers: dict):
  print(
    f"\nMatmul peak (jnp.dot, best of 5 rounds); the step: "
    f"{flops / 1e9:.3f} GFLOP (XLA's count)."
  )
  print("| dot | GFLOP/s |")
  print("|---|---|")
  for k, v in peak.items():
    print(f"| {k} | {v:.1f} |")


def _print_epoch(n: int, r: dict, config):
  s = r["seconds"]
  print(
    f"\nEpoch on {n} generated trailers (fold 0 shares: {r['train']} "
    f"training trailers = {r['steps']} steps, {r['windows']} validation "
    f"windows; preload {r['load_s']:.1f} s; best round; the "
    f"validation outputs of both ways bitwise equal: {r['eval_exact']}):"
  )
  print("| part | s | ms per step |")
  print("|---|---|---|")
  for name, seconds in s.items():
    per = (
      r["steps"]
      if name.startswith("train")
      else r["windows"] / (config.train.eval_batch_size)
    )
    print(f"| {name} | {seconds:.2f} | {1e3 * seconds / per:.1f} |")


def add_flags(ap) -> None:
  ap.add_argument("--features", type=int, default=768)
  ap.add_argument("--k", type=int, default=16, help="Steps per timed round.")
  ap.add_argument("--rounds", type=int, default=4)
  ap.add_argument(
    "--ks", default="1,8", help="Steps per dispatch compared in epochs."
  )
  ap.add_argument(
    "--epoch_trailers",
    default="3000",
    help="Generated trailers, e.g. 3000,12000.",
  )


def parse(args):
  if args.smoke:
    vars(args).update(features=16, k=8, rounds=2, epoch_trailers="64")
  args.ks = [int(x) for x in str(args.ks).split(",")]
  args.epoch_trailers = [
    int(x) for x in str(args.epoch_trailers).split(",") if x
  ]
  return args


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  add_flags(ap)
  ap.add_argument("--smoke", action="store_true", help="Tiny sizes (CI).")
  ap.add_argument("--epochs_only", action="store_true", help="Epochs only.")
  report(parse(ap.parse_args()))


if __name__ == "__main__":
  main()
