r"""Head training epoch at Trailers12k scale, input pipeline included.

Generates random clip representations (two branches, ~96 clips x 768
features per trailer) in our NpyStore and in official-layout zarr v2 groups,
then times one training epoch of the default DIViTA head (tsfm, late fusion,
batch 32, windows of 30 clips) fed by `rep_pipeline` from each store, read
directly (mmap / zarr) or preloaded into memory. Reports epoch seconds,
examples/s, the share of step time spent waiting for data, and the pipeline
alone. Baseline in the same process: the reference's scheme, a PyTorch head
of the same shape fed by a DataLoader with 8 workers reading one zarr array
per example (a few steps, extrapolated to the epoch).

  python benchmarks/head.py                    # 2,000 trailers, minutes
  python benchmarks/head.py --trailers=12000   # full scale (~15 GB on disk)
"""

import argparse
import os
import shutil
import tempfile
import time

import jax
import numpy as np
import zarr

from configs import divita as divita_config
from divita_jax import hosts, rep_pipeline, reps, sharding, train

BRANCHES = ("image", "video")


def generate(root: str, n: int, dim: int, mean_clips: int, seed: int = 0):
  """Writes both layouts; returns trailer ids."""
  rng = np.random.default_rng(seed)
  ids = [f"tt{i:07d}" for i in range(n)]
  clips = rng.integers(mean_clips * 2 // 3, mean_clips * 4 // 3 + 1, size=n)
  npy = {b: reps.NpyStore(os.path.join(root, "npy"), b) for b in BRANCHES}
  groups = {}
  for b in BRANCHES:
    groups[b] = zarr.open_group(
      os.path.join(root, f"trailers_{b}.zarr"), mode="w", zarr_format=2
    )
    groups[b].attrs["num_features"] = dim
  for tid, c in zip(ids, clips):
    for b in BRANCHES:
      array = rng.standard_normal((c, dim), np.float32)  # [clips, features]
      npy[b].write(tid, array)
      groups[b].create_array(tid, data=array, chunks=array.shape)
  return ids


def timed_epoch(p, mesh, data, state, threads: int):
  """(state, epoch s, data-wait s) of one epoch, each step synchronised."""
  lr = np.float32(1e-4)
  it = rep_pipeline.iterate(data.dataset, num_threads=threads, prefetch=8)
  wait = 0.0
  start = time.perf_counter()
  for _ in range(data.steps_per_epoch):
    t = time.perf_counter()
    batch = next(it)
    wait += time.perf_counter() - t
    state, loss = p.train_step(state, hosts.global_batch(batch, mesh), lr)
    loss.block_until_ready()
  return state, time.perf_counter() - start, wait


def data_only(data, threads: int, steps: int) -> float:
  """Examples/s of the pipeline alone."""
  it = rep_pipeline.iterate(data.dataset, num_threads=threads, prefetch=8)
  next(it)
  start = time.perf_counter()
  for _ in range(steps - 1):
    batch = next(it)
  return (steps - 1) * len(batch["mask"]) / (time.perf_counter() - start)


def _reference_dataset(root, ids, num_clips):
  """The reference's scheme: one zarr read per example, random window."""
  import torch

  class ZarrWindows(torch.utils.data.Dataset):
    def __init__(self):
      self.stores = None

    def __len__(self):
      return len(ids)

    def __getitem__(self, i):
      if self.stores is None:  # Opened in the worker.
        self.stores = {
          b: reps.ZarrStore(os.path.join(root, f"trailers_{b}.zarr"))
          for b in BRANCHES
        }
      out = []
      for b in BRANCHES:
        a = self.stores[b].read(ids[i])
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
  next(it)
  start = time.perf_counter()
  for _ in range(steps - 1):
    next(it)
  loader_ex_s = (steps - 1) * batch_size / (time.perf_counter() - start)

  model = _reference_head(dim)
  opt = torch.optim.AdamW(model.parameters(), lr=1e-4, amsgrad=True)
  loss_fn = torch.nn.BCEWithLogitsLoss()
  labels = (torch.rand(batch_size, 10) < 0.3).float()
  it = iter(loader)
  for i in range(steps):
    if i == 1:  # First step (worker start-up) untimed.
      start = time.perf_counter()
    xs = next(it)
    opt.zero_grad()
    loss_fn(model(xs), labels).backward()
    opt.step()
  train_ex_s = (steps - 1) * batch_size / (time.perf_counter() - start)
  return loader_ex_s, train_ex_s


def main():
  ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  ap.add_argument("--trailers", type=int, default=2000)
  ap.add_argument("--clips", type=int, default=96, help="Mean clips/trailer.")
  ap.add_argument("--features", type=int, default=768)
  ap.add_argument("--threads", type=int, default=4, help="grain threads.")
  ap.add_argument("--ref_workers", type=int, default=8)
  ap.add_argument("--ref_steps", type=int, default=20, help="Timed steps.")
  ap.add_argument("--dir", default="", help="Data dir (default: temp).")
  ap.add_argument("--keep", action="store_true", help="Keep generated data.")
  args = ap.parse_args()

  root = args.dir or tempfile.mkdtemp(prefix="head_bench_")
  t = time.perf_counter()
  ids = generate(root, args.trailers, args.features, args.clips)
  gen_s = time.perf_counter() - t

  config = divita_config.get_config()
  tc = config.train
  mesh = sharding.make_mesh(config.mesh)
  labels = np.random.default_rng(1).random((len(ids), 10)) < 0.3
  p = train.programs(config, mesh, {b: args.features for b in BRANCHES})
  state = p.init(jax.random.PRNGKey(0))
  npy = {b: reps.NpyStore(os.path.join(root, "npy"), b) for b in BRANCHES}
  zarrs = {
    b: reps.ZarrStore(os.path.join(root, f"trailers_{b}.zarr"))
    for b in BRANCHES
  }
  sources = [
    ("npy mmap", npy, False),
    ("zarr direct", zarrs, False),
    ("npy preloaded", npy, True),
    ("zarr preloaded", zarrs, True),
  ]
  rows = []
  for i, (name, readers, preload) in enumerate(sources):
    t = time.perf_counter()
    if preload:  # One store in memory at a time (7 GB at full scale).
      readers = rep_pipeline.preload(readers, ids)
    load_s = time.perf_counter() - t
    data = rep_pipeline.train_data(
      readers,
      ids,
      labels,
      np.arange(len(ids)),
      num_clips=tc.num_clips,
      global_batch_size=tc.batch_size,
      seed=0,
      num_epochs=1,
    )
    if i == 0:  # Compile outside the timings.
      state, _ = timed_epoch(p, mesh, _first_steps(data, 2), state, 1)[:2]
    state, epoch_s, wait_s = timed_epoch(p, mesh, data, state, args.threads)
    examples = data.steps_per_epoch * tc.batch_size
    pipe = data_only(data, args.threads, min(data.steps_per_epoch, 40))
    rows.append(
      (name, epoch_s, examples / epoch_s, 100 * wait_s / epoch_s, pipe, load_s)
    )
    del data, readers  # Frees a preloaded store before the next one.
  ref_loader, ref_train = reference_epoch(
    root,
    ids,
    args.features,
    tc.num_clips,
    tc.batch_size,
    args.ref_workers,
    min(len(ids) // tc.batch_size, args.ref_steps),
  )

  print(
    f"\nDIViTA head epoch: {args.trailers} trailers x ~{args.clips} clips"
    f" x {args.features} features x {len(BRANCHES)} branches, batch "
    f"{tc.batch_size}, windows of {tc.num_clips}, cam {config.model.cam}; "
    f"{jax.device_count()} {jax.devices()[0].platform} device(s), "
    f"{os.cpu_count()} CPU cores; data generated in {gen_s:.0f} s."
  )
  print(
    "| input | epoch s | examples/s | data wait % | pipeline alone "
    "ex/s | preload s |"
  )
  print("|---|---|---|---|---|---|")
  for name, epoch_s, ex_s, wait, pipe, load_s in rows:
    print(
      f"| {name} | {epoch_s:.1f} | {ex_s:.0f} | {wait:.1f} | {pipe:.0f} "
      f"| {load_s:.1f} |"
    )
  ref_epoch = len(ids) / ref_train
  best = min(r[1] for r in rows)
  print(
    f"| reference (PyTorch head, DataLoader {args.ref_workers} workers, "
    f"zarr per example; {args.ref_steps} steps extrapolated) | "
    f"{ref_epoch:.1f} | {ref_train:.0f} | - | {ref_loader:.0f} | - |"
  )
  print(f"\nBest JAX epoch vs the reference scheme: {ref_epoch / best:.1f}x.")
  if not args.keep and not args.dir:
    shutil.rmtree(root)


def _first_steps(data, steps):
  return rep_pipeline.TrainData(data.dataset.slice(slice(0, steps)), steps)


if __name__ == "__main__":
  main()
