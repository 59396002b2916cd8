r"""The Table-6 input paths at scale: reps build, preloaded vs streamed zarr.

Writes random clip representations once as official-layout zarr v2 groups
(two branches, one Blosc-lz4 chunk per trailer, ~96 clips x 768 features
per trailer), then measures:

- the TFDS `reps` build (labels, folds, metadata only) on a 12,000-row
  mtgc.csv (it reads no representations, so the full scale costs nothing);
- one training epoch (fold 0's 70.6% training share, as in issue 28) of
  the default DIViTA head (tsfm, late fusion, batch 32, windows of 30
  clips) fed by `rep_pipeline`, each input path in a
  fresh process so memory peaks do not mix: `preload` (the run's default:
  every trailer read once into one buffer per branch), `stream` (zarr read
  per batch in grain worker processes, `reps.default_workers()`
  unless --workers), `threads` (zarr read per batch in this process) and
  `zarr-api` (the same through zarr-python's API, the path before the
  direct chunk decode).

Reported: peak RSS (VmHWM) against the representations' size (also net of
the process's RSS before loading), epoch seconds and the share of it spent
blocked in `next(it)` (worker start-up, once per fold, shown apart), and
the load average (the machine may be shared). `--reference` adds the
reference's scheme: a PyTorch head of the same shape fed by a DataLoader
with 8 workers reading one zarr array per example (a few steps,
extrapolated to the epoch).

  python benchmarks/head.py                    # 3,000 trailers (~1.8 GB)
  python benchmarks/head.py --trailers=12000   # full scale (~7 GB)
  python benchmarks/head.py --smoke            # 64 tiny trailers (CI)
  python benchmarks/head.py --profile          # the step: head_profile.py
  python benchmarks/head.py --table6_row --trailers=12000  # 3 folds

Epochs train as the fold loop does (loop.STEPS_PER_DISPATCH steps per
dispatch, no per-step sync; before issue 28 every step was synchronised;
preloaded, a dispatch's batches are gathered at once and the next read
ahead: loop.train_batches).
"""

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time

import numpy as np
import timing

from divita_jax.pipelines import stores

BRANCHES = ("image", "video")
MODES = ("preload", "stream", "threads", "zarr-api")
# --smoke: every mode and the reference on the smallest sizes.
SMOKE = dict(
  trailers=64,
  clips=48,  # Mean clips; the reference needs 30 (windows unpadded).
  features=16,
  build_trailers=64,
  workers=1,
  reference=True,
  ref_workers=0,  # No fork beside JAX's threads (in-process runs).
  ref_steps=2,
)


def _status_kb(key: str, pid: int | str = "self") -> int:
  with open(f"/proc/{pid}/status") as f:
    for line in f:
      if line.startswith(key + ":"):
        return int(line.split()[1])
  raise KeyError(key)


def _load() -> str:
  return "/".join(f"{x:.1f}" for x in os.getloadavg())


def generate(root: str, n: int, dim: int, mean_clips: int, seed: int = 0):
  """Writes the zarr groups once (reused when complete); returns clips [n]."""
  import zarr

  done = os.path.join(root, f"done_{n}_{dim}_{mean_clips}_{seed}.json")
  if os.path.exists(done):
    with open(done) as f:
      return np.asarray(json.load(f))
  rng = np.random.default_rng(seed)
  clips = rng.integers(mean_clips * 2 // 3, mean_clips * 4 // 3 + 1, size=n)
  for b in BRANCHES:
    group = zarr.open_group(_group(root, b), mode="w", zarr_format=2)
    group.attrs["num_features"] = dim
    for tid, c in zip(_ids(n), clips):
      array = rng.standard_normal((c, dim), np.float32)  # [clips, features]
      group.create_array(tid, data=array, chunks=array.shape)
  with open(done, "w") as f:
    json.dump(clips.tolist(), f)
  return clips


def _ids(n: int) -> list[str]:
  return [f"tt{i:07d}" for i in range(n)]


def _group(root: str, branch: str) -> str:
  return os.path.join(root, f"trailers_{branch}.zarr")


def reps_build_seconds(n: int) -> float:
  """TFDS `reps` build on an n-row mtgc.csv, in a fresh data dir."""
  import tfds_trailers12k
  from tfds_trailers12k import dummy_data

  with tempfile.TemporaryDirectory() as tmp:
    rng = np.random.default_rng(0)
    labels = rng.random((n, 10)) < 0.3
    splits = rng.integers(0, 3, (n, 3))
    dummy_data.write_mtgc(f"{tmp}/mtgc.csv", _ids(n), labels, splits)
    start = time.perf_counter()
    builder = tfds_trailers12k.build("reps", f"{tmp}/tfds", tmp)
    tfds_trailers12k.load_index(builder)
    return time.perf_counter() - start


def measure(args) -> dict:
  """One input path in this (fresh) process: memory and one epoch."""
  import jax

  from divita_jax import hosts, sharding
  from divita_jax.configs import divita as divita_config
  from divita_jax.pipelines import common, reps
  from divita_jax.trainers import frozen, loop
  from divita_jax.trainers import state as st

  config = divita_config.get_config()
  tc = config.train
  mesh = sharding.make_mesh(config.mesh)
  ids = _ids(args.trailers)
  labels = np.random.default_rng(1).random((len(ids), 10)) < 0.3
  # Fold 0's shares (70.6% train), as in the issue and head_profile.py.
  fold = common.FoldData.from_split(ids, labels, generated_split(len(ids)), 0)
  p = frozen.programs(config, mesh, {b: args.features for b in BRANCHES})
  state = p.init(jax.random.PRNGKey(0))
  lr = np.float32(1e-4)
  shape = (tc.batch_size, tc.num_clips)
  dummy = {b: np.zeros((*shape, args.features), np.float32) for b in BRANCHES}
  dummy.update(
    mask=np.ones(shape, bool), labels=np.zeros((shape[0], 10), np.float32)
  )
  for _ in range(2):  # Compiles outside the timings and the base RSS.
    state, out = p.train_step(state, hosts.global_batch(dummy, mesh), lr)
    k = loop.STEPS_PER_DISPATCH  # The scanned program too.
    stack = st.global_batches([dummy] * k, mesh)
    state, out = p.train_steps(state, stack, np.full(k, lr, np.float32))
  jax.block_until_ready(out)
  store = ZarrApi if args.child == "zarr-api" else stores.ZarrStore
  readers = {b: store(_group(args.dir, b)) for b in BRANCHES}
  base_kb = _status_kb("VmRSS")  # Before any representation is loaded.
  start = time.perf_counter()
  if args.child == "preload":
    readers = reps.preload(readers, ids)
  load_s = time.perf_counter() - start
  batching = common.Batching(tc.num_clips, tc.batch_size)
  epochs = common.Epochs(seed=0, count=1)
  data = reps.train_data(
    readers,
    fold,
    batching,
    epochs,
    # stream: None = reps.default_workers() unless --workers.
    num_workers=args.workers if args.child == "stream" else 0,
  )
  # Preloaded: read as the fold loop does (loop.train_batches).
  setup = st.FoldSetup(
    p, data, None, {}, None, reps.train_stacks(readers, fold, batching, epochs)
  )
  epoch_s, waits, workers_kb = _epoch(p, mesh, setup, state, args.threads)
  return dict(
    mode=args.child,
    workers=data.num_workers,
    load_s=load_s,
    base_gb=base_kb / 2**20,
    peak_gb=_status_kb("VmHWM") / 2**20,
    worker_peak_gb=workers_kb / 2**20,
    startup_s=waits[0],
    epoch_s=epoch_s - waits[0],
    wait_s=float(np.sum(waits[1:])),
    steps=data.steps_per_epoch,
    train_trailers=len(fold.rows("train")),
    pipeline_ex_s=pipeline_alone(data, args.threads),
  )


def _epoch(p, mesh, setup, state, threads):
  """(epoch s, [wait s per dispatch], workers' peak RSS kB); as the fold
  loop trains: loop.STEPS_PER_DISPATCH steps per dispatch, no per-step
  sync, batches from loop.train_batches (stacks gathered at once from the
  preloaded buffers, the next read ahead; else the pipeline's)."""
  import jax

  from divita_jax import hosts
  from divita_jax.pipelines import common
  from divita_jax.trainers import loop
  from divita_jax.trainers import state as st

  lr = np.float32(1e-4)
  waits, workers_kb = [], 0
  start = time.perf_counter()
  if setup.train_stacks is None:
    it = common.iterate(setup.train, num_threads=threads)
  else:
    it = loop.train_batches(setup)
  step, steps = 0, setup.train.steps_per_epoch
  k = loop.STEPS_PER_DISPATCH
  size = lambda left: k if 1 < k <= left else 1
  while step < steps:
    n = size(steps - step)
    then = size(steps - step - n) if steps - step - n else 0
    t = time.perf_counter()
    local = loop.next_batches(it, n, then)
    waits.append(time.perf_counter() - t)
    if n == 1:
      batch = hosts.global_batch(local, mesh)
      state, out = p.train_step(state, batch, lr)
    else:
      stack = st.global_stack(local, mesh)
      state, out = p.train_steps(state, stack, np.full(n, lr))
    if step // 10 != (step + n) // 10:  # Workers exit at their share's end.
      kb = sum(_status_kb("VmHWM", pid) for pid in _children())
      workers_kb = max(workers_kb, kb)
    step += n
  jax.block_until_ready(out)
  epoch_s = time.perf_counter() - start
  if hasattr(it, "close"):
    it.close()
  return epoch_s, waits, workers_kb


def pipeline_alone(data, threads: int, steps: int = 30) -> float:
  """Examples/s of the input alone (after its first batch)."""
  from divita_jax.pipelines import common

  steps = min(steps, data.steps_per_epoch - 1)
  it = common.iterate(data, num_threads=threads)
  batch = {}
  fetch = lambda: batch.update(next(it))
  times = timing.round_robin({"next": fetch}, rounds=steps)  # 1 warm-up.
  ex_s = steps * len(batch["mask"]) / times["next"].total
  if hasattr(it, "close"):
    it.close()  # Worker processes and their shared memory.
  return ex_s


class ZarrApi:
  """Every read through zarr-python's API (the path before the direct
  chunk decode); ids, lengths and width from the store."""

  def __init__(self, path: str):
    import zarr

    self.store = stores.ZarrStore(path)
    self.group = zarr.open_group(path, mode="r")
    self.tag, self.num_features = self.store.tag, self.store.num_features

  def has(self, trailer_id: str) -> bool:
    return self.store.has(trailer_id)

  def ids(self) -> list[str]:
    return self.store.ids()

  def length(self, trailer_id: str) -> int:
    return self.store.length(trailer_id)

  def read(self, trailer_id: str) -> np.ndarray:
    return np.asarray(self.group[trailer_id][...], np.float32)


def _children() -> list[int]:
  """Child processes of this one (grain's workers while they run)."""
  pids = []
  for task in os.listdir("/proc/self/task"):
    with open(f"/proc/self/task/{task}/children") as f:
      pids += [int(x) for x in f.read().split()]
  return pids


def _reference_dataset(root, ids, num_clips):
  """The reference's scheme: one zarr read per example, random window."""
  import torch

  class ZarrWindows(torch.utils.data.Dataset):
    def __init__(self):
      self.stores = None

    def __len__(self):
      return len(ids)

    def __getitem__(self, i):
      if self.stores is None:  # Opened in the worker, read through zarr.
        import zarr

        self.stores = {
          b: zarr.open_group(_group(root, b), mode="r") for b in BRANCHES
        }
      out = []
      for b in BRANCHES:
        a = np.asarray(self.stores[b][ids[i]][...], np.float32)
        s = np.random.randint(0, max(len(a) - num_clips, 0) + 1)
        out.append(torch.from_numpy(a[s : s + num_clips]))
      return out

  return ZarrWindows()


def _reference_head(dim):
  """PyTorch head shaped like the reference's (tsfm 128/4/6, late fusion)."""
  import torch
  from torch import nn

  class Branch(nn.Module):
    def __init__(self):
      super().__init__()
      self.bn = nn.BatchNorm1d(dim)
      self.proj = nn.Linear(dim, 128)
      self.block = nn.TransformerEncoderLayer(
        128, 4, 6 * 128, 0.25, batch_first=True
      )
      self.head = nn.Linear(128, 10)

    def forward(self, x):  # [B, clips, D]
      x = self.bn(x.transpose(1, 2)).transpose(1, 2)
      return self.head(self.block(self.proj(x)).mean(1))

  class Head(nn.Module):
    def __init__(self):
      super().__init__()
      self.branches = nn.ModuleList([Branch() for _ in BRANCHES])

    def forward(self, xs):
      return torch.stack([m(x) for m, x in zip(self.branches, xs)]).mean(0)

  return Head()


def reference_epoch(root, ids, dim, num_clips, batch_size, workers, steps):
  """(loader-only ex/s, train ex/s) of the reference scheme in PyTorch."""
  import torch

  loader = torch.utils.data.DataLoader(
    _reference_dataset(root, ids, num_clips),
    batch_size=batch_size,
    shuffle=True,
    num_workers=workers,
    drop_last=True,
  )
  it = iter(loader)
  # The first batch of each (worker start-up) is the untimed warm-up.
  times = timing.round_robin({"loader": lambda: next(it)}, rounds=steps - 1)
  loader_ex_s = (steps - 1) * batch_size / times["loader"].total

  model = _reference_head(dim)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, amsgrad=True)
  loss_fn = torch.nn.BCEWithLogitsLoss()
  labels = (torch.rand(batch_size, 10) < 0.3).float()
  it = iter(loader)

  def step():
    xs = next(it)
    opt.zero_grad()
    loss_fn(model(xs), labels).backward()
    opt.step()

  times = timing.round_robin({"train": step}, rounds=steps - 1)
  train_ex_s = (steps - 1) * batch_size / times["train"].total
  return loader_ex_s, train_ex_s


def generated_split(n: int, seed: int = 0) -> np.ndarray:
  """int [n, 3] subsets (0 train, 1 validation, 2 test) of three folds,
  each drawn on its own with fold 0's shares of Trailers12k."""
  rng = np.random.default_rng((seed, 3))
  draws = rng.random((n, 3))
  return np.digitize(draws, [0.706, 0.853])


def table6_row(args) -> None:
  """The protocol's three folds (early stopping, best-checkpoint test) with
  the real trainer on generated in-memory features: wall time, epochs each
  fold ran and the muAP (features and labels are random: chance level)."""
  import head_profile

  from divita_jax import report
  from divita_jax.configs import divita as divita_config
  from divita_jax.pipelines import common, reps
  from divita_jax.trainers import checkpoints, loop

  config = divita_config.get_config()
  if args.smoke:
    config.train.max_epochs = 3
  load_start, start = _load(), time.perf_counter()
  n = args.trailers
  readers, fold0 = head_profile.generated_fold(n, args.features, args.clips)
  readers = reps.preload(readers, fold0.ids)  # Once for the three folds.
  load_s = time.perf_counter() - start
  split = generated_split(n)
  results, rows = {}, []
  with tempfile.TemporaryDirectory() as tmp:
    for k in range(3):
      data = common.FoldData.from_split(fold0.ids, fold0.labels, split, k)
      t = time.perf_counter()
      results[k] = loop.train_fold(config, f"{tmp}/fold{k}", readers, data)
      steps = -(-len(data.rows("train")) // config.train.batch_size)
      latest, _ = checkpoints.managers(f"{tmp}/fold{k}")
      epochs = latest.latest_step() // steps
      rows.append((k, time.perf_counter() - t, epochs, steps))
      print(f"fold {k}: {rows[-1][1]:.0f} s, {epochs} epochs", flush=True)
  total_s = time.perf_counter() - start
  print(
    f"\nTable-6 row, {n} generated trailers x ~{args.clips} clips x "
    f"{args.features} x {len(BRANCHES)} branches, default head and "
    f"protocol (max {config.train.max_epochs} epochs, early stopping "
    f"patience {config.train.early_stop_patience}); load average "
    f"{load_start} at start, {_load()} at end: wall {total_s:.0f} s "
    f"({total_s / 60:.1f} min; generation + preload {load_s:.0f} s)."
  )
  print("| fold | s | epochs run | steps per epoch | best epoch | test muAP |")
  print("|---|---|---|---|---|---|")
  test = report.fold_rows(results, "test")
  for (k, seconds, epochs, steps), row in zip(rows, test):
    print(
      f"| {k} | {seconds:.0f} | {epochs} | {steps} | {row['epoch']} | "
      f"{row['uap']:.2f} |"
    )
  val = report.fold_rows(results, "val")
  print(
    f"test muAP {report.mean_std(test, 'uap')}, validation muAP "
    f"{report.mean_std(val, 'uap')} (x100; random labels at 30%: chance)."
  )


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--trailers", type=int, default=3000)
  ap.add_argument("--clips", type=int, default=96, help="Mean clips/trailer.")
  ap.add_argument("--features", type=int, default=768)
  ap.add_argument("--build_trailers", type=int, default=12000)
  ap.add_argument("--workers", type=int, default=None, help="stream: procs.")
  ap.add_argument("--threads", type=int, default=2, help="grain threads.")
  ap.add_argument("--modes", default=",".join(MODES))
  ap.add_argument("--reference", action="store_true")
  ap.add_argument("--ref_workers", type=int, default=8)
  ap.add_argument("--ref_steps", type=int, default=20, help="Timed steps.")
  ap.add_argument("--dir", default="/tmp/head_bench", help="zarr groups.")
  ap.add_argument("--child", choices=MODES, help=argparse.SUPPRESS)
  ap.add_argument("--smoke", action="store_true", help="Tiny run (CI).")
  ap.add_argument(
    "--profile",
    action="store_true",
    help="Only the step's profile, levers, matmul peak and epochs "
    "(head_profile.py) on --profile_trailers generated trailers.",
  )
  ap.add_argument("--profile_trailers", default="3000,12000")
  ap.add_argument(
    "--table6_row",
    action="store_true",
    help="Only the three folds of the protocol on --trailers generated "
    "in-memory trailers with the real trainer (wall time, epochs, muAP).",
  )
  args = ap.parse_args()
  if args.table6_row:
    if args.smoke:
      vars(args).update(trailers=96, clips=48, features=16)
    table6_row(args)
    return
  if args.profile:
    import head_profile

    options = dict(features=args.features, k=16, rounds=4, ks="1,8")
    options.update(epoch_trailers=args.profile_trailers, smoke=args.smoke)
    namespace = argparse.Namespace(**options, epochs_only=False)
    head_profile.report(head_profile.parse(namespace))
    return
  if args.smoke:
    vars(args).update(SMOKE)
  if args.child:
    print("RESULT " + json.dumps(measure(args)), flush=True)
    return
  load_start = _load()
  os.makedirs(args.dir, exist_ok=True)
  t = time.perf_counter()
  clips = generate(args.dir, args.trailers, args.features, args.clips)
  gen_s = time.perf_counter() - t
  size_gb = int(clips.sum()) * args.features * 4 * len(BRANCHES) / 2**30
  build_s = reps_build_seconds(args.build_trailers)
  # --smoke: every mode in this process (one import and compile; the
  # memory peaks mix), else each in a fresh one.
  run = _in_process if args.smoke else _child
  rows = [run(args, mode) for mode in args.modes.split(",")]
  ref = None
  if args.reference:
    ref = _reference(args)
  _print(args, rows, size_gb, gen_s, build_s, ref, load_start)


def _in_process(args, mode: str) -> dict:
  return measure(argparse.Namespace(**{**vars(args), "child": mode}))


def _child(args, mode: str) -> dict:
  """`measure` in a fresh interpreter (its own memory peak)."""
  cmd = [sys.executable, __file__, f"--child={mode}"]
  cmd += [f"--{k}={getattr(args, k)}" for k in ("trailers", "features")]
  cmd += [f"--{k}={getattr(args, k)}" for k in ("clips", "threads", "dir")]
  if args.workers is not None:
    cmd.append(f"--workers={args.workers}")
  out = subprocess.run(cmd, capture_output=True, text=True)
  if out.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{out.stderr[-3000:]}")
  (line,) = [x for x in out.stdout.splitlines() if x.startswith("RESULT ")]
  return json.loads(line[len("RESULT ") :])


def _reference(args) -> tuple[float, float]:
  from divita_jax.configs import divita as divita_config

  tc = divita_config.get_config().train
  steps = min(args.trailers // tc.batch_size, args.ref_steps)
  return reference_epoch(
    args.dir,
    _ids(args.trailers),
    args.features,
    tc.num_clips,
    tc.batch_size,
    args.ref_workers,
    steps,
  )


def _print(args, rows, size_gb, gen_s, build_s, ref, load_start):
  print(
    f"\nDIViTA head input: {args.trailers} trailers x ~{args.clips} clips x "
    f"{args.features} features x {len(BRANCHES)} branches = {size_gb:.2f} "
    f"GB float32 (zarr v2, Blosc lz4, in {args.dir}; written in "
    f"{gen_s:.0f} s); {os.cpu_count()} CPU cores; load average "
    f"{load_start} at start, {_load()} at end (1/5/15 min)."
  )
  print(
    f"TFDS reps build ({args.build_trailers} trailers, labels/folds/"
    f"metadata only): {build_s:.1f} s."
  )
  print(
    "| input | workers | load s | peak RSS GB | peak / reps | (peak - "
    "base) / reps | workers' peak GB | epoch s | ms per step | data wait % "
    "| start-up s | input alone ex/s |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|---|---|")
  for r in rows:
    print(
      f"| {r['mode']} | {r['workers']} | {r['load_s']:.1f} | "
      f"{r['peak_gb']:.2f} | {r['peak_gb'] / size_gb:.2f} | "
      f"{(r['peak_gb'] - r['base_gb']) / size_gb:.2f} | "
      f"{r['worker_peak_gb']:.2f} | {r['epoch_s']:.2f} | "
      f"{1e3 * r['epoch_s'] / r['steps']:.1f} | "
      f"{100 * r['wait_s'] / r['epoch_s']:.1f} | {r['startup_s']:.1f} | "
      f"{r['pipeline_ex_s']:.0f} |"
    )
  train = rows[0]["train_trailers"]
  print(
    f"Epoch: fold 0's {train} training trailers ({rows[0]['steps']} steps "
    "of 32) of the generated split (70.6% train, as the issue's)."
  )
  if ref:
    loader_ex_s, train_ex_s = ref
    print(
      f"Reference scheme (PyTorch head, DataLoader {args.ref_workers} "
      f"workers, zarr per example, {args.ref_steps} steps extrapolated): "
      f"epoch {train / train_ex_s:.1f} s over the same {train} trailers, "
      f"loader alone {loader_ex_s:.0f} ex/s."
    )


if __name__ == "__main__":
  main()
