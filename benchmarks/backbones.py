r"""Backbone throughput: our Flax backbones vs their PyTorch references.

Default (a few minutes on a 2-core CPU: batch 2, 8-frame clips, 3 rounds):
  python benchmarks/backbones.py
Full size (ViViT-B/16x2 on 32-frame clips, bigger batches):
  python benchmarks/backbones.py --frames 32 --vit_batch 8 --iters 5
The Table-6 cost table (params, GMACs, clips/s of every paper backbone;
benchmarks/costs.py, its flags after it):
  python benchmarks/backbones.py --table6 [--quick]
Every row on the tiny variants at 32 px, one round (seconds; CI):
  python benchmarks/backbones.py --smoke

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
import functools
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np
import timing
import torch
import transformers

from divita_jax.convert import swin as convert_swin
from divita_jax.models import backbone, swin, vit
from divita_jax.references.torchvision_cpu import torchvision

# --smoke: every row on these sizes (ViT / ViViT, Swin variants; pixels).
SMOKE = dict(
  vit_variant="tiny/8",
  vivit_variant="tiny/8x2",
  swin_variant="tiny",
  resolution=32,
  vit_batch=1,
  vivit_batch=1,
  frames=4,
  iters=1,
  matmul=128,
  swin_batch=1,
  swin3d_batch=1,
  swin3d_frames="4",
  models="vit,vivit,swin,swin3d",
)


def forward_flops(tokens, d, mlp, depth, patch_inputs, num_patches):
  """Multiply-adds x2 of embedding + encoder (dense layers and attention)."""
  embed = 2 * num_patches * patch_inputs * d
  per_layer = 2 * tokens * (4 * d * d + 2 * d * mlp) + 4 * tokens**2 * d
  return embed + depth * per_layer


def forward_fn(module, params, x):
  f = jax.jit(lambda p, v: module.apply({"params": p}, v)[0])
  return lambda: f(params, x).block_until_ready()


def jax_fns(kind, variant, x, frames=1):
  """{("flax", dtype): forward on x} in float32 and bfloat16: one init,
  the same float32 weights."""
  _, variables, spec = backbone.create_backbone(
    kind, variant, resolution=x.shape[-2], num_frames=frames
  )
  params, x = variables["params"], jnp.asarray(x)
  return {
    ("flax", d): forward_fn(backbone.module_from_spec(spec, d), params, x)
    for d in ("float32", "bfloat16")
  }


def torch_fn(model, x, bf16):
  def run():
    with (
      torch.inference_mode(),
      torch.autocast("cpu", torch.bfloat16, enabled=bf16),
    ):
      model(x)

  return run


@functools.cache  # One compile for all models.
def matmul_fn(n):
  a = jnp.asarray(np.random.RandomState(0).randn(n, n), jnp.float32)
  f = jax.jit(lambda x: x @ x)
  return lambda: f(a).block_until_ready()


def bench(name, batch, flops, fns, args):
  fns["matmul"] = matmul_fn(args.matmul)
  times = timing.round_robin(fns, args.iters)
  best = {k: t.best for k, t in times.items()}
  peak = 2 * args.matmul**3 / best.pop("matmul") / 1e9
  torch_rate = {d: batch / t for (i, d), t in best.items() if i == "torch"}
  rows = []
  for (impl, dtype), t in best.items():
    gflops = flops / t / 1e9
    rows.append(
      f"{name:<15}{impl:<6}{dtype:<9}{batch:>5}{batch / t:>9.2f}"
      f"{gflops:>9.1f}{peak:>9.1f}{100 * gflops / peak:>6.0f}%"
      f"{batch / t / torch_rate[dtype]:>8.2f}x"
    )
  return rows


def hf_sizes(m: dict) -> dict:
  """Our ViT fields -> the HF config's (the HF defaults are B/16)."""
  return dict(
    hidden_size=m["width"],
    num_hidden_layers=m["depth"],
    num_attention_heads=m["num_heads"],
    intermediate_size=m["mlp_dim"],
  )


def bench_vit(args):
  b, r = args.vit_batch, args.resolution
  m = vit.decode_variant(args.vit_variant)
  p = m["patch_size"]
  x = np.random.RandomState(0).randn(b, r, r, 3).astype(np.float32)
  cfg = transformers.ViTConfig(image_size=r, patch_size=p, **hf_sizes(m))
  hf = transformers.ViTModel(cfg, add_pooling_layer=False)
  tx = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())  # NCHW
  fns = jax_fns("vit", args.vit_variant, x)
  fns[("torch", "float32")] = torch_fn(hf.eval(), tx, False)
  fns[("torch", "bfloat16")] = torch_fn(hf, tx, True)
  n = (r // p) ** 2
  w, mlp, depth = m["width"], m["mlp_dim"], m["depth"]
  flops = b * forward_flops(n + 1, w, mlp, depth, p * p * 3, n)
  return bench(f"ViT-{args.vit_variant}", b, flops, fns, args)


def bench_vivit(args):
  b, f, r = args.vivit_batch, args.frames, args.resolution
  m = vit.decode_variant(args.vivit_variant)
  p, t = m["patch_size"], m["tubelet"]
  x = np.random.RandomState(0).randn(b, f, r, r, 3).astype(np.float32)
  cfg = transformers.VivitConfig(
    image_size=r, num_frames=f, tubelet_size=[t, p, p], **hf_sizes(m)
  )
  hf = transformers.VivitModel(cfg, add_pooling_layer=False)
  tx = torch.from_numpy(x.transpose(0, 1, 4, 2, 3).copy())  # NTCHW
  fns = jax_fns("vivit", args.vivit_variant, x, f)
  fns[("torch", "float32")] = torch_fn(hf.eval(), tx, False)
  fns[("torch", "bfloat16")] = torch_fn(hf, tx, True)
  patches = f // t * (r // p) ** 2
  w, mlp, depth = m["width"], m["mlp_dim"], m["depth"]
  flops = b * forward_flops(patches + 1, w, mlp, depth, t * p * p * 3, patches)
  return bench(f"ViViT-{args.vivit_variant}", b, flops, fns, args)


def swin_jax_fn(fields, params, x, dtype):
  cls = swin.Swin3D if len(fields["patch"]) == 3 else swin.Swin
  module = cls(**fields, dtype=jnp.dtype(dtype))
  x, params = jnp.asarray(x), jax.tree.map(jnp.asarray, params)
  return forward_fn(module, params, x)


def torch_flops(model, x):
  from torch.utils.flop_counter import FlopCounterMode  # noqa: PLC0415

  with FlopCounterMode(display=False) as counter, torch.inference_mode():
    model(x)
  return counter.get_total_flops()


def torch_swin(tv, fields):
  """torchvision's Swin (2-D or 3-D by the patch) of our fields."""
  video = len(fields["patch"]) == 3
  cls = tv.models.swin_transformer.SwinTransformer
  if video:
    cls = tv.models.video.swin_transformer.SwinTransformer3d
  return cls(
    patch_size=fields["patch"],
    embed_dim=fields["embed_dim"],
    depths=fields["depths"],
    num_heads=fields["num_heads"],
    window_size=fields["window"],
  )


def bench_swin(args, frames=0):
  """Swin on images (frames=0) or Video Swin on clips of `frames` frames,
  at --resolution px (variant T: torchvision's swin_t / swin3d_t)."""
  tv, r, v = torchvision(), args.resolution, args.swin_variant
  fields = swin.decode_variant(v, video=bool(frames))
  if frames:
    b, arch = args.swin3d_batch, "swin3d_t"
    x = np.random.RandomState(0).randn(b, frames, r, r, 3)
  else:
    b, arch = args.swin_batch, "swin_t"
    x = np.random.RandomState(0).randn(b, r, r, 3)
  ref = torch_swin(tv, fields)
  x = x.astype(np.float32)
  sd = {k: v.numpy() for k, v in ref.state_dict().items()}
  params, fields, _ = convert_swin.from_torchvision(sd, arch, fields)
  tx = torch.from_numpy(np.moveaxis(x, -1, 1).copy())  # N C [T] H W
  dtypes = args.swin_dtypes.split(",")
  fns = {("flax", d): swin_jax_fn(fields, params, x, d) for d in dtypes}
  for d in dtypes:
    fns[("torch", d)] = torch_fn(ref.eval(), tx, d == "bfloat16")
  flops = torch_flops(ref, tx)
  name = f"VSwin-{v}/{frames}" if frames else f"Swin-{v}"
  return bench(name, b, flops, fns, args)


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
  p.add_argument("--vit_variant", default="B/16")
  p.add_argument("--vivit_variant", default="B/16x2")
  p.add_argument("--swin_variant", default="T")
  p.add_argument("--resolution", type=int, default=224)
  p.add_argument("--smoke", action="store_true", help="Tiny run (CI).")
  args = p.parse_args()
  if args.smoke:
    vars(args).update(SMOKE)
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
  r, v = args.resolution, args.swin_variant
  print(
    f"device: {jax.devices()[0].device_kind}; ViT-{args.vit_variant} and "
    f"ViViT-{args.vivit_variant} at {r} px, ViViT clips of {args.frames} "
    f"frames; Swin-{v} at {r} px, VSwin-{v}/F: Video Swin-{v} on F x {r} px "
    f"clips; best of {args.iters} round-robin rounds; peak = fp32 jnp.dot "
    f"{args.matmul}^2 in the same rounds."
  )
  print(
    f"{'model':<15}{'impl':<6}{'dtype':<9}{'batch':>5}{'items/s':>9}"
    f"{'GFLOP/s':>9}{'peak':>9}{'%peak':>7}{'vs torch':>9}"
  )
  print("\n".join(rows))


if __name__ == "__main__":
  if "--table6" in sys.argv:  # The Table-6 cost table (benchmarks/costs.py).
    import costs  # benchmarks/costs.py, beside this script.

    costs.main([a for a in sys.argv[1:] if a != "--table6"])
  else:
    main()
