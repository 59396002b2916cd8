r"""End-to-end fine-tuning step: finetune.py against PyTorch, data wait, memory.

Default (CPU, ~3 minutes on 2 cores): the tiny ViViT (`vivit tiny/8`) and
the tiny Video Swin (`swin3d tiny`) of `configs/divita.py:finetune`, the
video branch only (one backbone and the DIViTA head, so that the PyTorch
side is one backbone too), its synthetic sizes: 16 trailers x 8 clips x 8
frames x 32 px, float32, no remat:
  python benchmarks/finetune.py
An accelerator (ViViT-B/16x2 and Video Swin-T on 16 x 224 px clips,
bf16 compute with float32 master weights, remat `dots`, 8 trailers x 4
clips per step unless --batch / --clips):
  python benchmarks/finetune.py --large
Every table on the smallest sizes (2 trailers x 2 clips x 2 frames, one
round, one data step, 8 synthetic trailers decoded in this process; CI):
  python benchmarks/finetune.py --smoke

Prints Markdown tables, per backbone:
- step: the jitted `finetune.programs(...).train_step` on one device, and
  the same step in PyTorch on the same device (torchvision
  `SwinTransformer3d` / HF `VivitModel` of the same size, the PyTorch
  DIViTA head `divita_jax.references.divita_head.TorchHead`, uint8 clips
  normalised inside the step, the same weighted BCE, AdamW with AMSGrad
  and the head / backbone learning-rate groups; fp32, bf16 autocast on
  GPU). Both run once per round, round-robin, so they see the same load;
  median and best of --iters rounds after a warm-up step. clips/s =
  trailers x clips per trailer / step time; vs torch = JAX clips/s /
  PyTorch clips/s.
- data: the same step fed by `finetune.fold_setup` batches (decoded clips
  of a small synthetic TFDS dataset, built once by `run.ensure_dataset`
  under --data_dir, with the configured decode threads and processes),
  as train.py feeds it: the share of the loop's wall time spent blocked
  in `next(it)` after a warm-up of --data_warmup steps, and the input
  pipeline's own rate without training beside it. The synthetic videos
  are 96 x 72 px, so decoding is far cheaper than on real trailers.
- memory: per-device bytes of the donated train state (parameters,
  optimizer state, step, rng: `alias_size_in_bytes`) and temporaries
  from the compiled step's memory analysis, replicated (mesh (N, 1, 1))
  vs FSDP (mesh (1, N, 1)). With one device here, N = 8 fake CPU devices
  in a child process (XLA_FLAGS=--xla_force_host_platform_device_count=8):
  the state bytes do not depend on the backend, the temporaries do.
The load average at start and end, and other processes' CPU share, are
printed last (loadavg.Watch); numbers under load are not comparable.
"""

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time

import jax
import numpy as np
import timing
from loadavg import Watch

import tfds_trailers12k
from divita_jax import extract, hosts, run, sharding
from divita_jax.configs import divita as divita_config
from divita_jax.models import runtime, swin, vit
from divita_jax.pipelines import common
from divita_jax.trainers import finetune

# --smoke: every table on the smallest sizes.
SMOKE = dict(
  batch=2,
  clips=2,
  frames=2,
  resolution=32,
  iters=1,
  data_steps=1,
  data_warmup=0,
  trailers=8,
  decode_processes=0,
)
# kind -> (tiny variant, large variant).
VARIANTS = {"vivit": ("tiny/8", "B/16x2"), "swin3d": ("tiny", "T")}
NAMES = {"vivit": "ViViT", "swin3d": "Swin-3D"}
FAKE_DEVICES = 8  # Memory rows on a one-device machine.


def make_config(kind: str, args):
  """The `finetune` config, video branch only, at the benchmark's sizes."""
  c = divita_config.get_config("finetune")
  c.model.branches = ("video",)
  b = c.backbones.video
  b.kind = kind
  b.variant = VARIANTS[kind][args.large]
  b.resolution = args.resolution
  c.clips.frames_per_clip = args.frames
  c.finetune.clips_per_trailer = args.clips
  c.train.batch_size = args.batch
  c.train.max_epochs = 10_000  # The data loop never runs out.
  c.dataset.num_trailers = args.trailers
  if args.large:  # As `:trailers12k,swin,finetune`.
    c.finetune.dtype = "bfloat16"
    c.finetune.remat = "dots"
    c.finetune.decode_processes = -1
  if args.decode_threads is not None:
    c.finetune.decode_threads = args.decode_threads
  if args.decode_processes is not None:
    c.finetune.decode_processes = args.decode_processes
  # Resolved here for the table; fold_setup resolves -1 the same way.
  c.finetune.decode_processes = extract.auto_processes(
    c.finetune.decode_processes
  )
  return c


def random_batch(c, seed: int = 0) -> dict:
  """A train batch of the pipeline's shapes (tests/test_finetune.py)."""
  rng = np.random.default_rng(seed)
  r, t = c.backbones.video.resolution, c.clips.frames_per_clip
  b, n = c.train.batch_size, c.finetune.clips_per_trailer
  mask = np.ones((b, n), bool)
  mask[::3, -1] = False  # Some padded clips.
  return {
    "video": rng.integers(0, 256, (b, n, t, r, r, 3), dtype=np.uint8),
    "mask": mask,
    "labels": (rng.random((b, c.model.num_classes)) < 0.3).astype(np.float32),
    "weight": np.ones(b, np.float32),
  }


def compute_dtype(c) -> str:
  return runtime.compute_dtype(c.finetune.dtype)


# ------------------------------------------------------------------- JAX


@dataclasses.dataclass
class JaxStep:
  """One device's train_step on a fixed batch; the state is carried."""

  programs: object
  mesh: object
  state: object
  batch: dict
  lr: np.ndarray

  @classmethod
  def create(cls, c):
    c.mesh.shape = (1, 1, 1)
    mesh = sharding.make_mesh(c.mesh, jax.devices()[:1])
    p = finetune.programs(c, mesh)
    batch = hosts.global_batch(random_batch(c), mesh)
    lr = np.float32(c.train.learning_rate)
    return cls(p, mesh, p.init(jax.random.PRNGKey(0)), batch, lr)

  def __call__(self, batch=None, block: bool = True):
    self.state, loss = self.programs.train_step(
      self.state, self.batch if batch is None else batch, self.lr
    )
    if block:
      jax.block_until_ready((self.state, loss))


# --------------------------------------------------------------- PyTorch


def torch_device():
  """The torch device beside JAX's, or None (no CUDA torch on a GPU)."""
  import torch

  if jax.default_backend() == "cpu":
    return torch.device("cpu")
  if jax.default_backend() == "gpu" and torch.cuda.is_available():
    return torch.device("cuda")
  return None


def _cls_token_module():
  import torch

  class ClsToken(torch.nn.Module):
    """HF ViViT -> its final CLS token (our ViViT's pooled features)."""

    def __init__(self, hf):
      super().__init__()
      self.hf = hf

    def forward(self, x):
      return self.hf(pixel_values=x).last_hidden_state[:, 0]

  return ClsToken


def torch_backbone(kind: str, c):
  """(module: clips [N, T, H, W, 3] float -> features [N, D], D)."""
  import torch

  from divita_jax.references.torchvision_cpu import torchvision

  tv = torchvision()  # Before transformers imports torchvision.
  variant = c.backbones.video.variant
  if kind == "swin3d":
    f = swin.decode_variant(variant, video=True)
    net = tv.models.video.swin_transformer.SwinTransformer3d(
      patch_size=f["patch"],
      embed_dim=f["embed_dim"],
      depths=f["depths"],
      num_heads=f["num_heads"],
      window_size=f["window"],
      stochastic_depth_prob=0.0,  # Ours has no drop path: equal work.
    )
    net.head = torch.nn.Identity()  # Pooled features.
    layout = (0, 4, 1, 2, 3)  # N C T H W
    dim = swin.feature_dim(f)
  else:
    import transformers

    m = vit.decode_variant(variant)
    cfg = transformers.VivitConfig(
      image_size=c.backbones.video.resolution,
      num_frames=c.clips.frames_per_clip,
      tubelet_size=[m.get("tubelet", c.backbones.video.tubelet)]
      + [m["patch_size"]] * 2,
      hidden_size=m["width"],
      num_hidden_layers=m["depth"],
      num_attention_heads=m["num_heads"],
      intermediate_size=m["mlp_dim"],
    )
    net = _cls_token_module()(
      transformers.VivitModel(cfg, add_pooling_layer=False)
    )
    layout = (0, 1, 4, 2, 3)  # N T C H W
    dim = m["width"]
  return net, layout, dim


def torch_step(kind: str, c, stats, device):
  """The same training step in PyTorch: a zero-argument callable."""
  import torch

  from divita_jax.references.divita_head import TorchHead

  torch.manual_seed(0)
  net, layout, dim = torch_backbone(kind, c)
  head = TorchHead(dim, c.model.cam, c.model.num_classes)
  net.to(device)
  head.to(device)
  net.train()
  head.train()
  tc, f = c.train, c.finetune
  opt = torch.optim.AdamW(
    [
      {"params": list(head.parameters()), "lr": tc.learning_rate},
      {
        "params": list(net.parameters()),
        "lr": tc.learning_rate * f.backbone_lr_scale,
      },
    ],
    betas=(tc.b1, tc.b2),
    eps=tc.eps,
    weight_decay=tc.weight_decay,
    amsgrad=tc.amsgrad,
  )
  batch = random_batch(c)
  x = torch.from_numpy(batch["video"]).to(device)  # uint8, as JAX gets it.
  labels = torch.from_numpy(batch["labels"]).to(device)
  weight = torch.from_numpy(batch["weight"]).to(device)
  mean, std = (torch.tensor(v, device=device) for v in stats)
  b, n = x.shape[:2]
  bf16 = compute_dtype(c) == "bfloat16"

  def step():
    opt.zero_grad(set_to_none=True)
    with torch.autocast(device.type, torch.bfloat16, enabled=bf16):
      clips = x.reshape(-1, *x.shape[2:]).float().div(255).sub(mean).div(std)
      feats = net(clips.permute(*layout)).float().reshape(b, n, -1)
      logits = head(feats).float()
    bce = torch.nn.functional.binary_cross_entropy_with_logits(
      logits, labels, reduction="none"
    ).mean(-1)
    loss = (bce * weight).sum() / weight.sum().clamp(min=1.0)
    loss.backward()
    opt.step()
    if device.type == "cuda":
      torch.cuda.synchronize()

  return step


# ----------------------------------------------------------------- data


def dataset(c, data_dir: str):
  """(source, common.FoldData of fold 0) of the synthetic dataset, built
  once in data_dir."""
  os.makedirs(data_dir, exist_ok=True)
  t = time.perf_counter()
  builder, index = run.ensure_dataset(c, data_dir)
  print(
    f"synthetic dataset: {len(index['ids'])} trailers in {data_dir} "
    f"({time.perf_counter() - t:.0f} s to build or open)",
    flush=True,
  )
  fold = common.FoldData.from_split(
    index["ids"], index["labels"], index["split_assignment"], 0
  )
  return tfds_trailers12k.data_source(builder), fold


def data_wait(c, step: JaxStep, data, args) -> dict:
  """The step fed by fold_setup's batches as the fold loop feeds it: wait
  share, step time with input; then the input pipeline alone (clips/s)."""
  train = finetune.fold_setup(c, step.mesh, *data).train
  clips = c.train.batch_size * c.finetune.clips_per_trailer
  it = common.iterate(train)
  for _ in range(args.data_warmup):  # Start-up, prefetch buffer at rest.
    step(hosts.global_batch(next(it), step.mesh))
  wait, start = 0.0, time.perf_counter()
  for _ in range(args.data_steps):
    t = time.perf_counter()
    batch = next(it)
    wait += time.perf_counter() - t
    step(hosts.global_batch(batch, step.mesh), block=False)
  jax.block_until_ready(step.state)
  total = time.perf_counter() - start
  getattr(it, "close", lambda: None)()
  del it
  it = common.iterate(train)  # Alone: nothing beside it.
  times = timing.round_robin({"next": lambda: next(it)}, args.data_steps)
  alone = clips * args.data_steps / times["next"].total
  getattr(it, "close", lambda: None)()
  return {"wait": wait / total, "step": total / args.data_steps, "alone": alone}


# --------------------------------------------------------------- memory


def memory(c, devices) -> dict:
  """{'replicated' | 'fsdp': (state bytes, temp bytes) per device,
  'batch': the global batch compiled for}."""
  n, out = len(devices), {}
  # The batch must split over the devices (the state's size doesn't
  # depend on it; the temporaries do).
  c.train.batch_size = -(-c.train.batch_size // n) * n
  out["batch"] = c.train.batch_size
  for name, shape in (("replicated", (n, 1, 1)), ("fsdp", (1, n, 1))):
    c.mesh.shape = shape
    mesh = sharding.make_mesh(c.mesh, devices)
    p = finetune.programs(c, mesh)
    bs = sharding.batch_sharding(mesh)
    batch = {
      k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=bs)
      for k, v in random_batch(c).items()
    }
    lowered = p.train_step.lower(p.abstract, batch, np.float32(1))
    m = lowered.compile().memory_analysis()
    out[name] = (int(m.alias_size_in_bytes), int(m.temp_size_in_bytes))
  return out


def memory_rows(kind: str, args) -> dict:
  """memory() on this process's devices when there are several, else on
  FAKE_DEVICES CPU devices in a child process."""
  if jax.device_count() > 1:
    out = memory(make_config(kind, args), jax.devices())
    return {"devices": jax.device_count(), "backend": "this", **out}
  env = dict(
    os.environ,
    XLA_FLAGS=f"--xla_force_host_platform_device_count={FAKE_DEVICES}",
    JAX_PLATFORMS="cpu",
  )
  cmd = [sys.executable, __file__, f"--memory_child={kind}", *sys.argv[1:]]
  res = subprocess.run(cmd, capture_output=True, text=True, env=env)
  if res.returncode:
    raise RuntimeError(f"{' '.join(cmd)} failed:\n{res.stderr[-3000:]}")
  (line,) = [x for x in res.stdout.splitlines() if x.startswith("RESULT ")]
  return json.loads(line[len("RESULT ") :])


# ----------------------------------------------------------------- main


def bench(kind: str, args, data) -> dict:
  c = make_config(kind, args)
  out = {"kind": kind, "config": c, "seconds": {}}
  t = time.perf_counter()
  step = JaxStep.create(c)
  fns = {"jax": step}
  device = None if args.no_torch else torch_device()
  if device is not None:
    stats = step.programs.model.stats["video"]
    fns["torch"] = torch_step(kind, c, stats, device)
  out["times"] = timing.round_robin(fns, args.iters)
  out["seconds"]["step"] = time.perf_counter() - t
  if data is not None:
    t = time.perf_counter()
    out["data"] = data_wait(c, step, data, args)
    out["seconds"]["data"] = time.perf_counter() - t
  if not args.no_memory:
    t = time.perf_counter()
    out["memory"] = memory_rows(kind, args)
    out["seconds"]["memory"] = time.perf_counter() - t
  return out


def _mib(x: int) -> str:
  return f"{x / 2**20:.1f}"


def report(results: list, args, load: Watch):
  dev = jax.devices()[0]
  c = results[0]["config"]
  b, n = c.train.batch_size, c.finetune.clips_per_trailer
  t, r = c.clips.frames_per_clip, c.backbones.video.resolution
  print(
    f"\ndevice: {dev.platform} ({dev.device_kind}), {os.cpu_count()} CPU "
    f"cores; video branch only, head cam {c.model.cam}; batch {b} trailers "
    f"x {n} clips x {t} frames x {r} px; JAX {compute_dtype(c)}, remat "
    f"{c.finetune.remat}; median (best) of {args.iters} round-robin rounds "
    "after a warm-up step.\n"
  )
  print(
    "| backbone | impl | dtype | step s median (best) | clips/s | vs torch |"
  )
  print("|---|---|---|---|---|---|")
  for res in results:
    c = res["config"]
    clips = c.train.batch_size * c.finetune.clips_per_trailer
    name = f"{NAMES[res['kind']]} {c.backbones.video.variant}"
    med = {k: t.median for k, t in res["times"].items()}
    rate = {k: clips / v for k, v in med.items()}
    dtype = compute_dtype(c)
    for impl, times in res["times"].items():
      vs = f"{rate['jax'] / rate['torch']:.2f}x" if "torch" in rate else "-"
      vs = vs if impl == "jax" else "1.00x"
      if impl == "torch":
        dtype = "float32" if dtype == "float32" else "bf16 autocast"
      print(
        f"| {name} | {impl} | {dtype} | {med[impl]:.3f} ({times.best:.3f}) "
        f"| {rate[impl]:.1f} | {vs} |"
      )
    if "torch" not in rate:
      why = "--no_torch" if args.no_torch else "torch has no device here"
      print(f"| {name} | torch | - | - | - | ({why}) |")
  if any("data" in res for res in results):
    print(
      "\n| backbone | decode threads / processes | step s with input "
      f"| vs without | data wait % ({args.data_steps} steps) "
      "| input alone clips/s |"
    )
    print("|---|---|---|---|---|---|")
    for res in results:
      c, d = res["config"], res["data"]
      alone = res["times"]["jax"].median
      print(
        f"| {NAMES[res['kind']]} | {c.finetune.decode_threads} / "
        f"{c.finetune.decode_processes} | {d['step']:.3f} | "
        f"{d['step'] / alone:.2f}x | {100 * d['wait']:.1f} | "
        f"{d['alone']:.1f} |"
      )
  if any("memory" in res for res in results):
    m = results[0]["memory"]
    where = (
      f"{m['devices']} fake CPU devices in a child process"
      if m["backend"] == "cpu-child"
      else f"{m['devices']} devices of this process"
    )
    print(
      f"\nmemory per device from the compiled step ({where}, batch "
      f"{m['batch']} trailers); state = donated parameters + optimizer "
      "state, temp = temporaries:"
    )
    print(
      "| backbone | state MiB replicated (N,1,1) | state MiB FSDP (1,N,1) "
      "| FSDP / replicated | temp MiB replicated | temp MiB FSDP |"
    )
    print("|---|---|---|---|---|---|")
    for res in results:
      m = res["memory"]
      (rs, rt), (fs, ft) = m["replicated"], m["fsdp"]
      print(
        f"| {NAMES[res['kind']]} | {_mib(rs)} | {_mib(fs)} | {fs / rs:.3f} "
        f"| {_mib(rt)} | {_mib(ft)} |"
      )
  print(f"\n{load.report()}")


def parse(argv=None):
  p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  p.add_argument("--large", action="store_true", help="B/16x2, T; 16 x 224.")
  p.add_argument("--kinds", default="vivit,swin3d")
  p.add_argument("--batch", type=int, default=0, help="0: 16, large 8.")
  p.add_argument("--clips", type=int, default=0, help="0: 8, large 4.")
  p.add_argument("--frames", type=int, default=0, help="0: 8, large 16.")
  p.add_argument("--resolution", type=int, default=0, help="0: 32, 224.")
  p.add_argument("--iters", type=int, default=5, help="Timed rounds.")
  p.add_argument("--data_steps", type=int, default=12)
  p.add_argument("--data_warmup", type=int, default=5)
  p.add_argument("--trailers", type=int, default=32, help="Synthetic.")
  p.add_argument(
    "--data_dir",
    default=os.path.join(tempfile.gettempdir(), "divita_finetune_bench"),
    help="Workdir of the synthetic dataset (built once, reused).",
  )
  p.add_argument("--decode_threads", type=int, help="Default: config's.")
  p.add_argument(
    "--decode_processes", type=int, help="Default: config's; -1 = auto."
  )
  p.add_argument("--no_torch", action="store_true")
  p.add_argument("--no_data", action="store_true")
  p.add_argument("--no_memory", action="store_true")
  p.add_argument("--memory_child", help=argparse.SUPPRESS)
  p.add_argument("--smoke", action="store_true", help="Tiny run (CI).")
  args = p.parse_args(argv)
  if args.smoke:
    vars(args).update(SMOKE)
  for name, tiny, large in (
    ("batch", 16, 8),
    ("clips", 8, 4),
    ("frames", 8, 16),
    ("resolution", 32, 224),
  ):
    if not getattr(args, name):
      setattr(args, name, large if args.large else tiny)
  return args


def main():
  args = parse()
  if args.memory_child:
    out = memory(make_config(args.memory_child, args), jax.devices())
    out.update(devices=jax.device_count(), backend="cpu-child")
    print("RESULT " + json.dumps(out), flush=True)
    return
  la = os.getloadavg()
  print(f"load average at start: {la[0]:.2f} {la[1]:.2f} {la[2]:.2f}")
  kinds = args.kinds.split(",")
  data = None
  if not args.no_data:
    c = make_config(kinds[0], args)
    data_dir = os.path.join(args.data_dir, f"n{args.trailers}")
    data = dataset(c, data_dir)
  results = []
  with Watch() as load:
    for kind in kinds:
      results.append(bench(kind, args, data))
      took = ", ".join(
        f"{k} {v:.0f} s" for k, v in results[-1]["seconds"].items()
      )
      print(f"{kind} done: {took}", flush=True)
  report(results, args, load)


if __name__ == "__main__":
  main()
