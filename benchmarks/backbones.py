r"""Backbone throughput: our Flax backbones vs their PyTorch references.

Default (a few minutes on a 2-core CPU: batch 2, 8-frame clips, 3 rounds):
  python benchmarks/backbones.py
Full size (ViViT-B/16x2 on 32-frame clips, bigger batches):
  python benchmarks/backbones.py --frames 32 --vit_batch 8 --iters 5
The Table-6 cost table (params, GMACs, clips/s of every paper backbone;
benchmarks/costs.py, its flags after it):
  python benchmarks/backbones.py --table6 [--quick]

Prints frames/s (ViT-B/16 at 224) and clips/s (ViViT-B/16x2), fp32 and bf16,
next to HF `ViTModel` / `VivitModel` of the same size in this process, and
achieved GFLOP/s (analytic count of the forward pass) against a measured
fp32 matmul peak (jnp.dot of two square matrices). The machine is shared,
so every candidate, and the matmul, runs once per round, round-robin, and
each keeps its best round: all numbers of a model see the same load.

Swin rows (torchvision `swin_t` / `swin3d_t`, converted to our Flax
`Swin` / `Swin3D` with the same random weights, same input; FLOPs counted
by torch's FlopCounterMode on the reference, attention matmuls included):
  python benchmarks/backbones.py --models swin,swin3d
Swin-T at 224 (frames/s) and Video Swin-T at 16x224 and 24x224 (clips/s),
fp32 (add bfloat16 with --swin_dtypes float32,bfloat16). The load average
is printed at start and end.
"""

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import torch
import transformers
from timing import best_times

from divita_jax.convert import swin as convert_swin
from divita_jax.models import backbone, swin


def forward_flops(tokens, d, mlp, depth, patch_inputs, num_patches):
  """Multiply-adds x2 of embedding + encoder (dense layers and attention)."""
  embed = 2 * num_patches * patch_inputs * d
  per_layer = 2 * tokens * (4 * d * d + 2 * d * mlp) + 4 * tokens**2 * d
  return embed + depth * per_layer


def jax_fn(kind, variant, x, dtype, frames=1):
  module, params, _ = backbone.create_backbone(
    kind, variant, resolution=224, num_frames=frames, dtype=dtype
  )
  params = params["params"]
  f = jax.jit(lambda p, v: module.apply({"params": p}, v)[0])
  x = jnp.asarray(x)
  return lambda: f(params, x).block_until_ready()


def torch_fn(model, x, bf16):
  def run():
    with (
      torch.inference_mode(),
      torch.autocast("cpu", torch.bfloat16, enabled=bf16),
    ):
      model(x)

  return run


def matmul_fn(n):
  a = jnp.asarray(np.random.RandomState(0).randn(n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  return lambda: f(a).block_until_ready()


def bench(name, batch, flops, fns, args):
  fns["matmul"] = matmul_fn(args.matmul)
  best = best_times(fns, args.iters)
  peak = 2 * args.matmul**3 / best.pop("matmul") / 1e9
  torch_rate = {d: batch / t for (i, d), t in best.items() if i == "torch"}
  rows = []
  for (impl, dtype), t in best.items():
    gflops = flops / t / 1e9
    rows.append(
      f"{name:<13}{impl:<6}{dtype:<9}{batch:>5}{batch / t:>9.2f}"
      f"{gflops:>9.1f}{peak:>9.1f}{100 * gflops / peak:>6.0f}%"
      f"{batch / t / torch_rate[dtype]:>8.2f}x"
    )
  return rows


def bench_vit(args):
  b = args.vit_batch
  x = np.random.RandomState(0).randn(b, 224, 224, 3).astype(np.float32)
  hf = transformers.ViTModel(transformers.ViTConfig(), add_pooling_layer=False)
  tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())  # NCHW
  fns = {
    ("flax", d): jax_fn("vit", "B/16", x, d) for d in ("float32", "bfloat16")
  }
  fns[("torch", "float32")] = torch_fn(hf.eval(), tx, False)
  fns[("torch", "bfloat16")] = torch_fn(hf, tx, True)
  flops = b * forward_flops(197, 768, 3072, 12, 16 * 16 * 3, 196)
  return bench("ViT-B/16", b, flops, fns, args)


def bench_vivit(args):
  b, f = args.vivit_batch, args.frames
  x = np.random.RandomState(0).randn(b, f, 224, 224, 3).astype(np.float32)
  hf = transformers.VivitModel(
    transformers.VivitConfig(num_frames=f), add_pooling_layer=False
  )
  tx = torch.from_numpy(x.transpose(0, 1, 4, 2, 3).copy())  # NTCHW
  fns = {
    ("flax", d): jax_fn("vivit", "B/16x2", x, d, f)
    for d in ("float32", "bfloat16")
  }
  fns[("torch", "float32")] = torch_fn(hf.eval(), tx, False)
  fns[("torch", "bfloat16")] = torch_fn(hf, tx, True)
  patches = f // 2 * 196
  flops = b * forward_flops(
    patches + 1, 768, 3072, 12, 2 * 16 * 16 * 3, patches
  )
  return bench("ViViT-B/16x2", b, flops, fns, args)


def torchvision():
  """torchvision through the tests' helper (CPU torch needs its schemas);
  also lets transformers import torchvision."""
  sys.path.insert(
    0, os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
  )
  from tests.torch_reference import torchvision as tv  # noqa: PLC0415

  return tv()


def swin_jax_fn(fields, params, x, dtype):
  cls = swin.Swin3D if len(fields["patch"]) == 3 else swin.Swin
  module = cls(**fields, dtype=jnp.dtype(dtype))
  f = jax.jit(lambda p, v: module.apply({"params": p}, v)[0])
  x, params = jnp.asarray(x), jax.tree.map(jnp.asarray, params)
  return lambda: f(params, x).block_until_ready()


def torch_flops(model, x):
  from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

  with FlopCounterMode(display=False) as counter, torch.inference_mode():
    model(x)
  return counter.get_total_flops()


def bench_swin(args, frames=0):
  """Swin-T at 224 (frames=0) or Video Swin-T on frames x 224 clips."""
  tv = torchvision()
  if frames:
    b, arch, ref = args.swin3d_batch, "swin3d_t", tv.models.video.swin3d_t()
    x = np.random.RandomState(0).randn(b, frames, 224, 224, 3)
  else:
    b, arch, ref = args.swin_batch, "swin_t", tv.models.swin_t()
    x = np.random.RandomState(0).randn(b, 224, 224, 3)
  x = x.astype(np.float32)
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  params, fields, _ = convert_swin.from_torchvision(sd, arch)
  tx = torch.from_numpy(np.moveaxis(x, -1, 1).copy())  # N C [T] H W
  dtypes = args.swin_dtypes.split(",")
  fns = {("flax", d): swin_jax_fn(fields, params, x, d) for d in dtypes}
  for d in dtypes:
    fns[("torch", d)] = torch_fn(ref.eval(), tx, d == "bfloat16")
  flops = torch_flops(ref, tx)
  return bench(f"VSwin-T/{frames}" if frames else "Swin-T", b, flops, fns, args)


def main():
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--vit_batch", type=int, default=2)
  p.add_argument("--vivit_batch", type=int, default=1)
  p.add_argument("--frames", type=int, default=8, help="ViViT clip length.")
  p.add_argument("--iters", type=int, default=3, help="Timed rounds.")
  p.add_argument("--matmul", type=int, default=2048)
  p.add_argument("--swin_batch", type=int, default=4)
  p.add_argument("--swin3d_batch", type=int, default=1)
  p.add_argument(
    "--swin3d_frames", default="16,24", help="Video Swin clip lengths."
  )
  p.add_argument("--swin_dtypes", default="float32")
  p.add_argument(
    "--models", default="vit,vivit", help="Which to run: vit,vivit,swin,swin3d."
  )
  args = p.parse_args()
  print(f"load average at start: {os.getloadavg()}")
  torchvision()  # before transformers imports torchvision
  rows = []
  if "vit" in args.models.split(","):
    rows += bench_vit(args)
  if "vivit" in args.models.split(","):
    rows += bench_vivit(args)
  if "swin" in args.models.split(","):
    rows += bench_swin(args)
  if "swin3d" in args.models.split(","):
    for frames in map(int, args.swin3d_frames.split(",")):
      rows += bench_swin(args, frames)
  print(f"load average at end: {os.getloadavg()}")
  print(
    f"device: {jax.devices()[0].device_kind}; ViT-B/16 and ViViT-B/16x2 at "
    f"224 px, ViViT clips of {args.frames} frames; Swin-T at 224 px, "
    f"VSwin-T/F: Video Swin-T on F x 224 px clips; best of {args.iters} "
    f"round-robin rounds; peak = fp32 jnp.dot {args.matmul}^2 in the same "
    "rounds."
  )
  print(
    f"{'model':<13}{'impl':<6}{'dtype':<9}{'batch':>5}{'items/s':>9}"
    f"{'GFLOP/s':>9}{'peak':>9}{'%peak':>7}{'vs torch':>9}"
  )
  print("\n".join(rows))


if __name__ == "__main__":
  if "--table6" in sys.argv:  # The Table-6 cost table (benchmarks/costs.py).
    sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
    import costs

    costs.main([a for a in sys.argv[1:] if a != "--table6"])
  else:
    main()
