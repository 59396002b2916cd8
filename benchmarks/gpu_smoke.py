r"""Smoke test and timings on an accelerator (also runs on CPU with --tiny).

  python benchmarks/gpu_smoke.py            # full-size backbones, a GPU
  python benchmarks/gpu_smoke.py --tiny     # tiny backbones: CPU, CI

Prints Markdown tables: the backend and devices; every backbone of
BACKBONES through the real extraction feature function
(`extract.make_feature_fn`: uint8 in, normalised inside, batches
streamed) end to end from host clips and device-only (a uint8 batch
already on the device), in float32 and bfloat16, with each attention
implementation (blocked, one block, jax.nn.dot_product_attention), and
the peak device memory so far (`memory_stats()`, 'n/a' where the backend
has none, as on CPU); the DIViTA head trained for 2 epochs with its
number of compiled train and eval programs (must be 1 and 1); and whether
the mesh's data axis holds the processes in the order the code expects
(process p's rows at [p*b, (p+1)*b) of each global batch).
"""

import argparse
import os
import tempfile
import time

import jax
import numpy as np
from jax.experimental import multihost_utils

from divita_jax import extract, hosts, sharding
from divita_jax.configs import divita
from divita_jax.models import attention, backbone
from divita_jax.pipelines import stores
from divita_jax.trainers import loop

# (name, factory(dtype, tiny) -> (module, variables, spec, kind, batch)).
# The lead adds Swin and the ConvNets here as they land.


def _vit(dtype, tiny):
  variant, res = ("tiny/8", 32) if tiny else ("B/16", 224)
  m, p, spec = backbone.create_backbone(
    "vit", variant, resolution=res, dtype=dtype
  )
  p = p["params"]
  return m, {"params": p}, spec, "vit", 8 if tiny else 64


def _vivit(dtype, tiny):
  variant, res = ("tiny/8", 32) if tiny else ("B/16x2", 224)
  m, p, spec = backbone.create_backbone(
    "vivit", variant, resolution=res, num_frames=_frames(tiny), dtype=dtype
  )
  p = p["params"]
  return m, {"params": p}, spec, "vivit", 8 if tiny else 16


def _other(kind, variant, tiny_variant, res, tiny_res, batch):
  """Factory of a backbone without attention.py paths (Swin, ConvNets)."""

  def make(dtype, tiny):
    m, v, spec = backbone.create_backbone(
      kind,
      tiny_variant if tiny else variant,
      resolution=tiny_res if tiny else res,
      num_frames=_frames(tiny),
      dtype=dtype,
    )
    return m, v, spec, kind, batch

  return make


BACKBONES = [
  ("ViT", _vit),
  ("ViViT", _vivit),
  ("Swin", _other("swin", "T", "tiny", 224, 32, 64)),
  ("Swin3D", _other("swin3d", "T", "tiny", 224, 32, 8)),
  ("ShuffleNet", _other("shufflenet", "1.0", "0.5", 224, 32, 64)),
  ("ShuffleNet3D", _other("shufflenet3d", "1.0", "0.25", 112, 32, 64)),
  ("ResNet", _other("resnet", "resnet50", "resnet18", 224, 32, 64)),
  ("R(2+1)D", _other("r2plus1d", "r2plus1d_18", "r2plus1d_18", 112, 32, 16)),
]
# Backbones whose attention goes through models/attention.py.
ATTENTION_KINDS = ("vit", "vivit")
DTYPES = ("float32", "bfloat16")


def _frames(tiny: bool) -> int:
  return 4 if tiny else 24  # Paper: 24 frames per clip.


def _load() -> str:
  return "/".join(f"{x:.1f}" for x in os.getloadavg())


def _peak_mib() -> str:
  stats = jax.local_devices()[0].memory_stats()
  if not stats or "peak_bytes_in_use" not in stats:
    return "n/a"
  return f"{stats['peak_bytes_in_use'] / 2**20:.0f}"


def _timed(fn, repeats: int) -> float:
  fn()  # Compile and warm up.
  start = time.perf_counter()
  for _ in range(repeats):
    fn()
  return (time.perf_counter() - start) / repeats


def backbone_rows(tiny: bool, repeats: int, names) -> list[str]:
  rows = []
  for name, factory in BACKBONES:
    if name not in names:
      continue
    for dtype in DTYPES:
      module, variables, spec, kind, batch = factory(dtype, tiny)
      res, frames = spec["resolution"], _frames(tiny)
      rng = np.random.default_rng(0)
      clips = rng.integers(0, 256, (4 * batch, frames, res, res, 3), np.uint8)
      stats = backbone.input_stats(spec)
      impls = attention.IMPLEMENTATIONS
      if kind not in ATTENTION_KINDS:
        impls = ("blocked",)  # Its own attention (Swin) or none.
      for impl in impls:
        with attention.use(impl):  # Traced inside: this implementation.
          fn = extract.make_feature_fn(module, variables, kind, stats)
          x = jax.device_put(clips[:batch], fn.sharding)
          device = _timed(
            lambda: fn.device_fn(fn.variables, x).block_until_ready(), repeats
          )
          end_to_end = _timed(lambda: fn(clips, batch), repeats) / 4
        rows.append(
          f"| {name} | {dtype} | {impl} | {batch} x {frames} x {res}^2 "
          f"| {batch / end_to_end:.1f} | {batch / device:.1f} "
          f"| {_peak_mib()} |"
        )
  return rows


def _write_problem(root: str, n: int = 40, d: int = 16) -> tuple:
  """Random clip representations with learnable labels; 3-way split."""
  rng = np.random.default_rng(0)
  labels = (rng.uniform(size=(n, 10)) < 0.3).astype(np.int32)
  means = rng.normal(size=(10, d))
  ids = [f"tt{i:04d}" for i in range(n)]
  readers = {b: stores.NpyStore(root, b) for b in ("image", "video")}
  for i, tid in enumerate(ids):
    for store in readers.values():
      store.write(tid, labels[i] @ means + rng.normal(size=(8, d)))
  split = np.tile((np.arange(n) % 5 // 3 + (np.arange(n) % 5 == 4))[:, None], 3)
  return readers, ids, labels, split


def head_compiles() -> tuple[int, int, float]:
  """(train programs, eval programs, seconds) of 2 epochs of the head."""
  config = divita.get_config()
  config.model.cam = "tsfm_16_4_2_0.1"
  config.train.num_clips = 6
  config.train.batch_size = config.train.eval_batch_size = 8
  config.train.max_epochs = 2
  with tempfile.TemporaryDirectory() as root:
    readers, ids, labels, split = _write_problem(os.path.join(root, "reps"))
    start = time.perf_counter()
    loop.train_fold(
      config, os.path.join(root, "fold0"), readers, ids, labels, split, 0
    )
    seconds = time.perf_counter() - start
    num_features = {b: r.num_features for b, r in readers.items()}
  mesh = sharding.make_mesh(config.mesh)
  p = loop.programs(config, mesh, num_features)  # The cached programs.
  return p.train_step._cache_size(), p.eval_step._cache_size(), seconds


def mesh_order() -> tuple[list[int], bool]:
  """Processes along the data axis, and whether a global batch built from
  each process's rows comes back in the order hosts.process_rows says."""
  config = divita.get_config()
  mesh = sharding.make_mesh(config.mesh)
  order = [d.process_index for d in mesh.devices[:, 0]]
  size = 2 * jax.device_count()
  rows = np.arange(size)[hosts.process_rows(size)]
  batch = hosts.global_batch({"row": rows}, mesh)["row"]
  gathered = multihost_utils.process_allgather(batch, tiled=True)
  return order, bool(np.array_equal(gathered, np.arange(size)))


def main() -> None:
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--tiny", action="store_true", help="Tiny backbones (CPU).")
  p.add_argument("--repeats", type=int, default=0, help="0: 2 tiny, 5 full.")
  p.add_argument(
    "--backbones",
    default=",".join(n for n, _ in BACKBONES),
    help="Comma-separated names of BACKBONES to run.",
  )
  args = p.parse_args()
  repeats = args.repeats or (2 if args.tiny else 5)
  devices = jax.devices()
  print(
    f"backend {jax.default_backend()}, {len(devices)} devices "
    f"({devices[0].device_kind}), {jax.process_count()} processes, "
    f"load {_load()}\n"
  )
  print(
    "| backbone | dtype | attention | batch (clips x T x px) "
    "| end-to-end clips/s | device-only clips/s | peak device MiB |"
  )
  print("|---|---|---|---|---|---|---|")
  for row in backbone_rows(args.tiny, repeats, args.backbones.split(",")):
    print(row, flush=True)
  train_programs, eval_programs, seconds = head_compiles()
  order, ok = mesh_order()
  print("\n| check | result |\n|---|---|")
  print(
    f"| head, 2 epochs: compiled train / eval programs "
    f"| {train_programs} / {eval_programs} ({seconds:.1f} s) |"
  )
  print(f"| mesh data axis: process order | {order} |")
  print(f"| global batch rows in process order | {'ok' if ok else 'WRONG'} |")
  print(f"\nload {_load()}")
  if (train_programs, eval_programs) != (1, 1) or not ok:
    raise SystemExit("FAILED: recompilation or process order.")


if __name__ == "__main__":
  main()
