r"""Smoke test and timings on an accelerator (also runs on CPU with --tiny).

  python benchmarks/gpu_smoke.py            # full-size backbones, a GPU
  python benchmarks/gpu_smoke.py --tiny     # tiny backbones: CPU
  python benchmarks/gpu_smoke.py --smoke    # --tiny, 1 round: CI

Prints Markdown tables: the backend and devices; every backbone of
BACKBONES through the real extraction feature function
(`extract.FeatureFn`: uint8 in, normalised inside, batches
streamed) end to end from host clips and device-only (a uint8 batch
already on the device), in float32 and bfloat16, with each attention
implementation (blocked, one block, jax.nn.dot_product_attention), and
the peak device memory so far (`memory_stats()`, 'n/a' where the backend
has none, as on CPU); the TransNetV2 shot detector's frames/s at 2 (16,
64) windows per call (a build is limited by decoding when this is >= 10x
the decode rate of benchmarks/shots.py); the DIViTA head trained for 2
epochs with its number of compiled train and eval programs (must be 1 and
1); and whether the mesh's data axis holds the processes in the order the
code expects (process p's rows at [p*b, (p+1)*b) of each global batch).
"""

import argparse
import os
import tempfile
import time

import jax
import numpy as np
import timing
from jax.experimental import multihost_utils

from divita_jax import extract, hosts, sharding
from divita_jax.configs import divita
from divita_jax.models import attention, backbone
from divita_jax.pipelines import common, stores
from divita_jax.trainers import frozen, loop
from tfds_trailers12k import transnetv2, transnetv2_windows

# name -> (kind, (variant, px, batch), tiny (variant, px, batch)).
BACKBONES = {
  "ViT": ("vit", ("B/16", 224, 64), ("tiny/8", 32, 8)),
  "ViViT": ("vivit", ("B/16x2", 224, 16), ("tiny/8", 32, 8)),
  "Swin": ("swin", ("T", 224, 64), ("tiny", 32, 64)),
  "Swin3D": ("swin3d", ("T", 224, 8), ("tiny", 32, 8)),
  "ShuffleNet": ("shufflenet", ("1.0", 224, 64), ("0.5", 32, 64)),
  "ShuffleNet3D": ("shufflenet3d", ("1.0", 112, 64), ("0.25", 32, 64)),
  "ResNet": ("resnet", ("resnet50", 224, 64), ("resnet18", 32, 64)),
  "R(2+1)D": ("r2plus1d", ("r2plus1d_18", 112, 16), ("r2plus1d_18", 32, 16)),
}
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


def backbone_rows(tiny: bool, repeats: int, names) -> list[str]:
  rows = []
  for name in names:
    kind, full, small = BACKBONES[name]
    variant, res, batch = small if tiny else full
    frames = _frames(tiny)
    # One init per backbone: both dtypes run the same float32 weights.
    _, variables, spec = backbone.create_backbone(
      kind, variant, resolution=res, num_frames=frames
    )
    rng = np.random.default_rng(0)
    clips = rng.integers(0, 256, (4 * batch, frames, res, res, 3), np.uint8)
    stats = backbone.input_stats(spec)
    impls = attention.IMPLEMENTATIONS
    if kind not in ATTENTION_KINDS:
      impls = ("blocked",)  # Its own attention (Swin) or none.
    for dtype in DTYPES:
      module = backbone.module_from_spec(spec, dtype)
      for impl in impls:
        with attention.use(impl):  # Traced inside: this implementation.
          fn = extract.FeatureFn(module, variables, kind, stats)
          x = jax.device_put(clips[:batch], fn.sharding)
          device = lambda: fn.device_fn(fn.variables, x).block_until_ready()
          fns = {"device": device, "end_to_end": lambda: fn(clips, batch)}
          times = timing.round_robin(fns, repeats)
        device = times["device"].median
        end_to_end = times["end_to_end"].median / 4  # 4 batches a call.
        rows.append(
          f"| {name} | {dtype} | {impl} | {batch} x {frames} x {res}^2 "
          f"| {batch / end_to_end:.1f} | {batch / device:.1f} "
          f"| {_peak_mib()} |"
        )
  return rows


def transnetv2_rows(tiny: bool, repeats: int) -> list[str]:
  """The shot detector's network (random weights: the same arithmetic as
  the real ones) from host frames: windows per call, frames/s."""
  module = transnetv2.TransNetV2()
  frames = np.zeros((1, transnetv2.WINDOW, 27, 48, 3), np.uint8)
  variables = module.init(jax.random.key(0), frames)
  rows = []
  for batch in (2,) if tiny else (2, 16, 64):
    predict = transnetv2_windows.Predictor(module, variables, batch)
    rng = np.random.default_rng(0)
    block = rng.integers(0, 256, (predict.block, 27, 48, 3), np.uint8)
    times = timing.round_robin({"net": lambda: predict(block)}, repeats)
    fps = times["net"].per_second(transnetv2.STRIDE * batch)
    rows.append(f"| TransNetV2 | {batch} windows | {fps:.1f} |")
  return rows


def _write_problem(root: str, n: int = 40, d: int = 16) -> tuple:
  """Random clip representations with learnable labels; fold 0 of a
  3-way split -> (readers, common.FoldData)."""
  rng = np.random.default_rng(0)
  labels = (rng.uniform(size=(n, 10)) < 0.3).astype(np.int32)
  means = rng.normal(size=(10, d))
  ids = [f"tt{i:04d}" for i in range(n)]
  readers = {b: stores.NpyStore(root, b) for b in ("image", "video")}
  for i, tid in enumerate(ids):
    for store in readers.values():
      store.write(tid, labels[i] @ means + rng.normal(size=(8, d)))
  split = np.tile((np.arange(n) % 5 // 3 + (np.arange(n) % 5 == 4))[:, None], 3)
  return readers, common.FoldData.from_split(ids, labels, split, 0)


def head_compiles() -> tuple[int, int, float]:
  """(train programs, eval programs, seconds) of 2 epochs of the head."""
  config = divita.get_config()
  config.model.cam = "tsfm_16_4_2_0.1"
  config.train.num_clips = 6
  config.train.batch_size = config.train.eval_batch_size = 8
  config.train.max_epochs = 2
  with tempfile.TemporaryDirectory() as root:
    readers, data = _write_problem(os.path.join(root, "reps"))
    start = time.perf_counter()
    loop.train_fold(config, os.path.join(root, "fold0"), readers, data)
    seconds = time.perf_counter() - start
    num_features = {b: r.num_features for b, r in readers.items()}
  mesh = sharding.make_mesh(config.mesh)
  p = frozen.programs(config, mesh, num_features)  # The cached programs.
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
    default=",".join(BACKBONES),
    help="Comma-separated names of BACKBONES to run.",
  )
  p.add_argument("--smoke", action="store_true", help="Tiny run (CI).")
  args = p.parse_args()
  if args.smoke:
    args.tiny, args.repeats = True, 1
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
  print(
    "\n| shot detector | per call | frames/s (host frames in, "
    "probabilities out) |\n|---|---|---|"
  )
  for row in transnetv2_rows(args.tiny, repeats):
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
