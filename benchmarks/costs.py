r"""Table 6 costs: parameters, GMACs per clip and CPU clips/s per backbone.

  python benchmarks/costs.py           # 24-frame clips (~15 min, 2 cores)
  python benchmarks/costs.py --quick   # 8-frame clips, 1 round, no Swin timing
  python benchmarks/costs.py --smoke   # small siblings, 32 px, 1 round (CI)

A clip is `--frames` frames at each backbone's resolution: the 2-D nets
(ShuffleNet-2D, ResNet-50, Swin-2D) run on every frame (batch = frames), the
3-D nets on the clip. Counting conventions:
- params: backbone without classifier (BatchNorm statistics are not
  parameters); "+ head" adds one DIViTA tsfm branch, 130 F + 264,970.
- GMACs: XLA's compiled cost analysis of our forward pass, flops / 2,
  counted as torch's counter and torchvision's `_ops` count: BatchNorm
  folded into the conv before it (as at inference), kernel taps on zero
  padding counted (XLA skips them), exact GELU as one flop per element
  (XLA expands erf into a polynomial), Swin's attention as one block (XLA
  counts a lax.map body once); other elementwise ops (ReLU, adds,
  pooling, softmax, LayerNorm) stay in, +0.1-1.5%. Cross-checked against
  torchvision's `_ops` at its reference input and against torch's
  FlopCounterMode on the same clip.
- clips/s: fp32 on this CPU, ours (jit) and torchvision (inference_mode)
  alternating, best round of each; the machine is shared, so the load
  average is printed at start and end.
"""

import argparse
import contextlib
import os
from collections.abc import Callable
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import timing
import torch
from torch.utils.flop_counter import FlopCounterMode

from divita_jax.convert import convnets
from divita_jax.convert import swin as convert_swin
from divita_jax.models import resnet, shufflenet, swin
from divita_jax.references.shufflenet3d import shufflenet3d
from divita_jax.references.torchvision_cpu import torchvision

PAPER = {"params": 11.82, "flops": 0.81}


def head_params(width: int) -> int:
  """One DIViTA tsfm branch on F-wide features (backbone_zoo.md sec. 3)."""
  return 130 * width + 264_970


@dataclass
class Row:
  name: str
  module: nn.Module  # ours
  torch_model: torch.nn.Module
  shape: tuple[int, ...]  # our input per clip, channels-last
  width: int
  ref_shape: tuple[int, ...] | None  # torchvision's reference input
  ref_gmacs: float | None  # torchvision's published `_ops`
  variables: Callable[[], dict]  # ours, the torch model's weights


def torch_shape(shape):
  """Channels-last -> torch NC(T)HW."""
  return (shape[0], shape[-1], *shape[1:-1])


def headless(model):
  """torchvision classifier -> Identity (features as our pooled output)."""
  for name in ("fc", "head"):
    if hasattr(model, name):
      setattr(model, name, torch.nn.Identity())
  return model.eval()


def torch_params(model) -> int:
  return sum(p.numel() for p in model.parameters())


def converted(model, arch=None, module=None):
  """The torch model's weights as our variables: by torchvision arch, or
  for `module` (3-D, torchvision's names)."""
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  if arch:
    return lambda: convnets.from_torchvision(sd, arch)[0]
  return lambda: convnets.convert(sd, module, 3, convnets.torchvision_name)


def swin_converted(model, arch, fields):
  """The torchvision Swin's weights as our variables."""
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  return lambda: {"params": convert_swin.from_torchvision(sd, arch, fields)[0]}


def rows(tv, frames: int, with_swin: bool) -> list[Row]:
  """The Table 6 backbones at one clip of `frames` frames."""
  vid = tv.models.video
  s2d = headless(tv.models.shufflenet_v2_x1_0())
  s3d = shufflenet3d(tv)
  r50 = headless(tv.models.resnet50())
  r21 = headless(vid.r2plus1d_18())
  ours_s3d = shufflenet.ShuffleNetV2(**shufflenet.decode_variant(1.0, 3))
  out = [
    Row("ShuffleNet-2D x1.0", shufflenet.ShuffleNetV2(), s2d,
        (frames, 224, 224, 3), 1024, (1, 224, 224, 3), 0.145,
        converted(s2d, "shufflenet_v2_x1_0")),
    Row("ShuffleNet-3D 1.0x", ours_s3d, s3d, (1, frames, 112, 112, 3), 1024,
        (1, 16, 112, 112, 3), None, converted(s3d, module=ours_s3d)),
    Row("ResNet-50", resnet.ResNet(), r50, (frames, 224, 224, 3), 2048,
        (1, 224, 224, 3), 4.089, converted(r50, "resnet50")),
    Row("R(2+1)D-18", convnets.KINDS["r2plus1d"](), r21,
        (1, frames, 112, 112, 3), 512, (1, 16, 112, 112, 3), 40.519,
        converted(r21, "r2plus1d_18")),
  ]  # fmt: skip
  if with_swin:
    t2d, t3d = swin.decode_variant("T"), swin.decode_variant("T", True)
    w2d, w3d = headless(tv.models.swin_t()), headless(vid.swin3d_t())
    out += [
      Row("Swin-2D T", swin.Swin(**t2d), w2d, (frames, 224, 224, 3), 768,
          (1, 224, 224, 3), 4.491, swin_converted(w2d, "swin_t", t2d)),
      Row("Swin-3D T", swin.Swin3D(**t3d), w3d, (1, frames, 224, 224, 3),
          768, (1, 16, 224, 224, 3), 43.882,
          swin_converted(w3d, "swin3d_t", t3d)),
    ]  # fmt: skip
  return out


def smoke_rows(tv, frames: int) -> list[Row]:
  """The smallest sibling of each Table 6 backbone at 32 px, same order
  (CI: every code path in seconds); reference GMACs by torch's counter,
  at the clip's own size."""
  vid = tv.models.video
  image, clip = (frames, 32, 32, 3), (1, frames, 32, 32, 3)
  s2d = headless(tv.models.shufflenet_v2_x0_5())
  s3d = shufflenet3d(tv, "shufflenet_v2_x0_5")
  r18 = headless(tv.models.resnet18())
  r21 = headless(vid.resnet.VideoResNet(
    vid.resnet.BasicBlock, [vid.resnet.Conv2Plus1D] * 4, [1, 1, 1, 1],
    vid.resnet.R2Plus1dStem,
  ))  # fmt: skip
  t2d, t3d = swin.decode_variant("tiny"), swin.decode_variant("tiny", True)
  w2d, w3d = headless(torch_swin(tv, t2d)), headless(torch_swin(tv, t3d))
  ours_s3d = shufflenet.ShuffleNetV2(**shufflenet.decode_variant(0.5, 3))
  ours_r21 = convnets.KINDS["r2plus1d"](depths=(1, 1, 1, 1))
  return [
    Row("ShuffleNet-2D x0.5", shufflenet.ShuffleNetV2(
        **shufflenet.decode_variant(0.5, 2)), s2d, image, 1024, image, None,
        converted(s2d, "shufflenet_v2_x0_5")),
    Row("ShuffleNet-3D 0.5x", ours_s3d, s3d, clip, 1024, clip, None,
        converted(s3d, module=ours_s3d)),
    Row("ResNet-18", resnet.ResNet(**resnet.decode_variant("resnet18")), r18,
        image, 512, image, None, converted(r18, "resnet18")),
    Row("R(2+1)D-10", ours_r21, r21, clip, 512, clip, None,
        converted(r21, module=ours_r21)),
    Row("Swin-2D tiny", swin.Swin(**t2d), w2d, image, swin.feature_dim(t2d),
        image, None, swin_converted(w2d, "swin_t", t2d)),
    Row("Swin-3D tiny", swin.Swin3D(**t3d), w3d, clip, swin.feature_dim(t3d),
        clip, None, swin_converted(w3d, "swin3d_t", t3d)),
  ]  # fmt: skip


def torch_swin(tv, fields):
  """torchvision's Swin (2-D or 3-D by the patch) of our fields."""
  cls = tv.models.swin_transformer.SwinTransformer
  if len(fields["patch"]) == 3:
    cls = tv.models.video.swin_transformer.SwinTransformer3d
  return cls(
    patch_size=fields["patch"],
    embed_dim=fields["embed_dim"],
    depths=fields["depths"],
    num_heads=fields["num_heads"],
    window_size=fields["window"],
  )


def _conv_counting_padding(x, w, strides, pads, depthwise=False):
  """XLA's cost analysis skips kernel taps on zero padding, torch's counter
  (and torchvision's `_ops`) count them: pad with ones, which XLA cannot
  fold into the conv, so every tap is counted. For counting only."""
  x = jnp.pad(x, ((0, 0), *pads, (0, 0)), constant_values=1.0)
  return _CONV(x, w, strides, ((0, 0),) * len(pads), depthwise)


_CONV = resnet.conv


def _gelu_one_flop(x, approximate=True):
  del approximate
  return jnp.maximum(x, 0)


@contextlib.contextmanager
def counting():
  """BatchNorm as identity (folded into the conv before it at inference),
  padded taps counted as torch's counter does, and exact GELU as one flop
  per element (XLA expands erf into a ~40-flop polynomial: +2.5% on Swin;
  torch's counter and the published GMACs ignore activations)."""
  saved = resnet.batch_norm, shufflenet.batch_norm, resnet.conv, nn.gelu
  resnet.batch_norm = shufflenet.batch_norm = lambda name, dtype: lambda x: x
  resnet.conv = _conv_counting_padding
  nn.gelu = _gelu_one_flop
  blocked = swin.attend_windows
  # XLA counts a loop body once: Swin's attention in one block, no lax.map.
  swin.attend_windows = lambda *a, block_bytes=0: blocked(*a, 1 << 62)
  try:
    yield
  finally:
    resnet.batch_norm, shufflenet.batch_norm, resnet.conv, nn.gelu = saved
    swin.attend_windows = blocked


def xla_gmacs(module, shape) -> float:
  """flops / 2 of the compiled forward pass, counted as torch does."""
  with counting():
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    v = jax.eval_shape(module.init, jax.random.key(0), x)
    f = jax.jit(lambda v, x: module.apply(v, x)[0])
    cost = f.lower(v, x).compile().cost_analysis()
  cost = cost[0] if isinstance(cost, list) else cost
  return cost["flops"] / 2e9


def torch_gmacs(model, shape) -> float:
  counter = FlopCounterMode(display=False)
  with torch.inference_mode(), counter:
    model(torch.zeros(torch_shape(shape)))
  return counter.get_total_flops() / 2e9


def our_params(module, shape) -> int:
  x = jax.ShapeDtypeStruct(shape, jnp.float32)
  v = jax.eval_shape(module.init, jax.random.key(0), x)
  return sum(int(np.prod(a.shape)) for a in jax.tree.leaves(v["params"]))


def speed(row: Row, iters: int, dtype) -> dict[str, float]:
  """Clips/s of ours and torchvision on one clip of random pixels."""
  x = np.random.default_rng(0).normal(size=row.shape).astype(np.float32)
  xt = torch.from_numpy(np.ascontiguousarray(np.moveaxis(x, -1, 1)))

  def run_torch():
    with torch.inference_mode():
      row.torch_model(xt)

  module = row.module.clone(dtype=dtype)
  v = row.variables()
  f = jax.jit(lambda v, x: module.apply(v, x)[0])
  xj = jnp.asarray(x)
  fns = {"torch": run_torch, "ours": lambda: f(v, xj).block_until_ready()}
  times = timing.round_robin(fns, iters)
  return {k: t.per_second(1) for k, t in times.items()}


def measure(row: Row, args) -> dict:
  m = {"torch_params": torch_params(row.torch_model)}
  m["torch_gmacs"] = torch_gmacs(row.torch_model, row.shape)
  m["params"] = our_params(row.module, row.shape)
  m["gmacs"] = xla_gmacs(row.module, row.shape)
  if row.ref_shape == row.shape:
    m["ref_gmacs"] = m["gmacs"]
  elif row.ref_shape:
    m["ref_gmacs"] = xla_gmacs(row.module, row.ref_shape)
  if row.ref_shape and row.ref_gmacs is None:  # no published figure
    m["ref_torch"] = torch_gmacs(row.torch_model, row.ref_shape)
  if not args.no_speed and not (args.quick and "Swin" in row.name):
    m.update(speed(row, args.iters, jnp.dtype(args.dtype)))
  return m


def fmt(v, spec):
  return "n/a" if v is None else format(v, spec)


def print_tables(rows, results, frames):
  print(f"\n### Costs per {frames}-frame clip\n")
  print("| backbone | input per clip | params (backbone) | torchvision "
        "params | + DIViTA head | GMACs/clip (XLA) | GMACs/clip (torch "
        "counter) |\n|---|---|---|---|---|---|---|")  # fmt: skip
  for r in rows:
    m = results[r.name]
    print(
      f"| {r.name} | {'x'.join(map(str, r.shape[:-1]))} | {m['params']:,} "
      f"| {m['torch_params']:,} | {m['params'] + head_params(r.width):,} "
      f"| {m['gmacs']:.3f} | {m['torch_gmacs']:.3f} |"
    )
  print("\n### GMACs cross-check at torchvision's reference input\n")
  print("| backbone | input | ours (XLA) | reference | diff |")
  print("|---|---|---|---|---|")
  for r in rows:
    ours = results[r.name].get("ref_gmacs")
    ref = r.ref_gmacs or results[r.name].get("ref_torch")
    if ours and ref:
      what = "torchvision `_ops`" if r.ref_gmacs else "torch counter"
      print(
        f"| {r.name} | {'x'.join(map(str, r.ref_shape[:-1]))} | {ours:.3f} "
        f"| {ref:.3f} ({what}) | {100 * (ours / ref - 1):+.2f}% |"
      )
  print("\n### Speed (fp32, CPU), clips/s\n")
  print("| backbone | ours | torchvision | ours / torchvision |")
  print("|---|---|---|---|")
  for r in rows:
    m = results[r.name]
    ratio = m["ours"] / m["torch"] if "ours" in m and "torch" in m else None
    print(
      f"| {r.name} | {fmt(m.get('ours'), '.3f')} | "
      f"{fmt(m.get('torch'), '.3f')} | {fmt(ratio, '.2f')} |"
    )


def print_ratios(rows, results, frames):
  """rows: the ShuffleNet 2-D and 3-D first, the Swin-3D last (if any)."""
  if not rows[-1].name.startswith("Swin-3D"):
    return
  s2, s3, sw = (results[r.name] for r in (rows[0], rows[1], rows[-1]))
  heads = sum(head_params(r.width) for r in rows[:2])
  light = s2["params"] + s3["params"] + heads
  top = sw["params"] + head_params(rows[-1].width)
  every = s2["gmacs"] + s3["gmacs"]
  one = s2["gmacs"] / frames + s3["gmacs"]
  print("\n### Light fusion (ShuffleNet 2-D + 3-D) vs Swin-3D\n")
  print(
    f"- params, backbones + one DIViTA head each: {light:,} / {top:,} = "
    f"{100 * light / top:.2f}% (paper {PAPER['params']}%)\n"
    f"- GMACs, 2-D on every frame: {every:.3f} / {sw['gmacs']:.2f} = "
    f"{100 * every / sw['gmacs']:.2f}% (paper {PAPER['flops']}%)\n"
    f"- GMACs, 2-D on one frame: {one:.3f} / {sw['gmacs']:.2f} = "
    f"{100 * one / sw['gmacs']:.2f}%"
  )
  if "ref_gmacs" in sw:
    ref = s2["ref_gmacs"] + s3["ref_gmacs"]
    # Frames x side: 2-D 1x224, 3-D 16x112, Swin-3D 16x224 by default.
    i2, i3, sw3 = (
      "x".join(map(str, r.ref_shape[-4:-2])) for r in rows[:2] + rows[-1:]
    )
    print(
      f"- GMACs at the reference clips (2-D {i2}, 3-D {i3}, Swin-3D {sw3}): "
      f"{ref:.3f} / {sw['ref_gmacs']:.2f} = "
      f"{100 * ref / sw['ref_gmacs']:.2f}%"
    )


def main(argv=None):
  """Entry point; argv as for this script (benchmarks/backbones.py
  --table6 can forward its remaining arguments)."""
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--frames", type=int, default=24)
  p.add_argument("--iters", type=int, default=2)
  p.add_argument("--quick", action="store_true", help="8 frames, 1 round")
  p.add_argument("--no_speed", action="store_true")
  p.add_argument("--no_swin", action="store_true")
  p.add_argument("--dtype", default="float32", help="our compute dtype")
  p.add_argument(
    "--smoke", action="store_true", help="Small siblings, 2 frames, 1 round."
  )
  args = p.parse_args(argv)
  if args.quick:
    args.frames, args.iters = 8, 1
  if args.smoke:  # Every table, Swin timing included (CI).
    args.frames, args.iters = 2, 1
  print(f"load average at start: {os.getloadavg()}")
  print(
    f"jax {jax.__version__} ({jax.devices()[0].platform}), torch "
    f"{torch.__version__}, {torch.get_num_threads()} torch threads"
  )
  torch.manual_seed(0)
  tv = torchvision()
  table = (
    smoke_rows(tv, args.frames)
    if args.smoke
    else rows(tv, args.frames, not args.no_swin)
  )
  results = {}
  for r in table:
    results[r.name] = measure(r, args)
    print(f"{r.name}: {results[r.name]}", flush=True)
  print_tables(table, results, args.frames)
  print_ratios(table, results, args.frames)
  print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
  main()
