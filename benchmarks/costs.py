r"""Table 6 costs: parameters, GMACs per clip and CPU clips/s per backbone.

  python benchmarks/costs.py           # 24-frame clips (~15 min, 2 cores)
  python benchmarks/costs.py --quick   # 8-frame clips, 1 round, no Swin timing

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
import sys
from collections.abc import Callable
from dataclasses import dataclass

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import torch
from timing import best_times
from torch.utils.flop_counter import FlopCounterMode

from divita_jax.convert import convnets
from divita_jax.models import resnet, shufflenet

try:  # Written concurrently; without it the Swin rows are torchvision-only.
  from divita_jax.models import swin
except ImportError:
  swin = None

PAPER = {"params": 11.82, "flops": 0.81}


def head_params(width: int) -> int:
  """One DIViTA tsfm branch on F-wide features (backbone_zoo.md sec. 3)."""
  return 130 * width + 264_970


@dataclass
class Row:
  name: str
  module: object  # Flax module, or None (no JAX port importable)
  torch_model: torch.nn.Module
  shape: tuple[int, ...]  # our input per clip, channels-last
  width: int
  ref_shape: tuple[int, ...] | None  # torchvision's reference input
  ref_gmacs: float | None  # torchvision's published `_ops`
  variables: Callable[[], dict] | None = None


def torch_shape(shape):
  """Channels-last -> torch NC(T)HW."""
  return (shape[0], shape[-1], *shape[1:-1])


def torch_shufflenet3d(tv):
  """Efficient-3DCNNs' ShuffleNet-V2 1.0x topology (stem stride (1,2,2),
  pool and stage strides 2 in T) from torchvision's 2-D modules; no
  package ships it. Timing and FLOP reference only (the parity tests'
  construction)."""
  from tests.test_convnets import inflate_layers, shuffle_any_rank  # noqa: PLC0415

  tv.models.shufflenetv2.channel_shuffle = shuffle_any_rank
  m = tv.models.shufflenet_v2_x1_0()
  inflate_layers(m)
  m.conv1[0].stride = (1, 2, 2)
  body = torch.nn.Sequential(
    m.conv1, m.maxpool, m.stage2, m.stage3, m.stage4, m.conv5
  )
  return _MeanPool(body)


class _MeanPool(torch.nn.Module):
  def __init__(self, body):
    super().__init__()
    self.body = body

  def forward(self, x):
    return self.body(x).mean(dim=tuple(range(2, x.ndim)))


def headless(model):
  """torchvision classifier -> Identity (features as our pooled output)."""
  for name in ("fc", "head"):
    if hasattr(model, name):
      setattr(model, name, torch.nn.Identity())
  return model.eval()


def torch_params(model) -> int:
  return sum(p.numel() for p in model.parameters())


def converted(model, arch):
  sd = {k: v.numpy() for k, v in model.state_dict().items()}
  return lambda: convnets.from_torchvision(sd, arch)[0]


def rows(tv, frames: int, with_swin: bool) -> list[Row]:
  """The Table 6 backbones at one clip of `frames` frames."""
  vid = tv.models.video
  s2d = tv.models.shufflenet_v2_x1_0()
  r50 = tv.models.resnet50()
  r21 = vid.r2plus1d_18()
  out = [
    Row("ShuffleNet-2D x1.0", shufflenet.ShuffleNetV2(), headless(s2d),
        (frames, 224, 224, 3), 1024, (1, 224, 224, 3), 0.145,
        converted(s2d, "shufflenet_v2_x1_0")),
    Row("ShuffleNet-3D 1.0x", shufflenet.ShuffleNetV2(
        **shufflenet.decode_variant(1.0, 3)), torch_shufflenet3d(tv).eval(),
        (1, frames, 112, 112, 3), 1024, (1, 16, 112, 112, 3), None),
    Row("ResNet-50", resnet.ResNet(), headless(r50), (frames, 224, 224, 3),
        2048, (1, 224, 224, 3), 4.089, converted(r50, "resnet50")),
    Row("R(2+1)D-18", convnets.KINDS["r2plus1d"](), headless(r21),
        (1, frames, 112, 112, 3), 512, (1, 16, 112, 112, 3), 40.519,
        converted(r21, "r2plus1d_18")),
  ]  # fmt: skip
  if with_swin:
    out += [
      Row("Swin-2D T", swin and swin.Swin(**swin.decode_variant("T")),
          headless(tv.models.swin_t()), (frames, 224, 224, 3), 768,
          (1, 224, 224, 3), 4.491),
      Row("Swin-3D T", swin and swin.Swin3D(**swin.decode_variant("T", True)),
          headless(vid.swin3d_t()), (1, frames, 224, 224, 3), 768,
          (1, 16, 224, 224, 3), 43.882),
    ]  # fmt: skip
  return out


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
  blocked = getattr(swin, "attend_windows", None)
  if blocked:
    # XLA counts a loop body once: Swin's attention in one block, no lax.map.
    swin.attend_windows = lambda *a, block_bytes=0: blocked(*a, 1 << 62)
  try:
    yield
  finally:
    resnet.batch_norm, shufflenet.batch_norm, resnet.conv, nn.gelu = saved
    if blocked:
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

  fns = {"torch": run_torch}
  if row.module is not None:
    module = row.module.clone(dtype=dtype)
    v = row.variables() if row.variables else init(module, row.shape)
    f = jax.jit(lambda v, x: module.apply(v, x)[0])
    xj = jnp.asarray(x)
    fns["ours"] = lambda: f(v, xj).block_until_ready()
  return {k: 1 / t for k, t in best_times(fns, iters).items()}


def init(module, shape):
  return jax.jit(module.init)(jax.random.key(0), jnp.zeros(shape))


def measure(row: Row, args) -> dict:
  m = {"torch_params": torch_params(row.torch_model)}
  m["torch_gmacs"] = torch_gmacs(row.torch_model, row.shape)
  if row.module is not None:
    m["params"] = our_params(row.module, row.shape)
    m["gmacs"] = xla_gmacs(row.module, row.shape)
    if row.ref_shape:
      m["ref_gmacs"] = xla_gmacs(row.module, row.ref_shape)
  else:  # no JAX port importable: torchvision's figures only
    m["params"], m["gmacs"] = m["torch_params"], m["torch_gmacs"]
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


def print_ratios(results, frames):
  s2, s3 = results["ShuffleNet-2D x1.0"], results["ShuffleNet-3D 1.0x"]
  sw = results.get("Swin-3D T")
  if sw is None:
    return
  light = s2["params"] + s3["params"] + 2 * head_params(1024)
  top = sw["params"] + head_params(768)
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
    print(
      f"- GMACs at the reference clips (2-D 1x224, 3-D 16x112, Swin-3D "
      f"16x224): {ref:.3f} / {sw['ref_gmacs']:.2f} = "
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
  args = p.parse_args(argv)
  if args.quick:
    args.frames, args.iters = 8, 1
  print(f"load average at start: {os.getloadavg()}")
  print(f"jax {jax.__version__} ({jax.devices()[0].platform}), torch "
        f"{torch.__version__}, {torch.get_num_threads()} torch threads, "
        f"swin port: {'yes' if swin else 'no'}")  # fmt: skip
  torch.manual_seed(0)
  # The one torchvision import that works on this CPU torch (tests/).
  sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
  from tests.torch_reference import torchvision  # noqa: PLC0415

  table = rows(torchvision(), args.frames, not args.no_swin)
  results = {}
  for r in table:
    results[r.name] = measure(r, args)
    print(f"{r.name}: {results[r.name]}", flush=True)
  print_tables(table, results, args.frames)
  print_ratios(results, args.frames)
  print(f"\nload average at end: {os.getloadavg()}")


if __name__ == "__main__":
  main()
