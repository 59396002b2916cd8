"""The backbones at run time: build or load one, its compute dtype, its
variables, and the one in-jit input normalisation (uint8 -> float32).

Extraction (frozen backbones), fine-tuning and predict all go through
these, so a backbone sees the same inputs in every mode.
"""

from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from divita_jax import video
from divita_jax.models import backbone, clip_time

# Clip kinds that take their own frame count (spec.json num_frames): our
# clips are resampled in time to it (clip_time.resample_time).
OWN_FRAMES_KINDS = ("vjepa2", "videoprism")


def compute_dtype(name: str) -> str:
  """'auto': bfloat16 on GPU/TPU (frozen backbones), float32 on CPU (XLA's
  CPU bf16 matmuls are no faster; fp32 is the parity reference)."""
  if name == "auto":
    return "float32" if jax.default_backend() == "cpu" else "bfloat16"
  return name


def make_backbone(config: ml_collections.ConfigDict, branch: str):
  """(module, variables, spec) from a converted checkpoint (its spec.json
  names the kind) or random init of `kind` / `variant`."""
  b = config.backbones[branch]
  if branch == "audio":  # Its spec's front end sets the log-mel size.
    if b.checkpoint:
      return backbone.load_backbone(b.checkpoint, dtype=compute_dtype(b.dtype))
    return backbone.create_backbone(
      b.kind,
      b.variant,
      resolution=b.mel_bins,
      num_frames=b.mel_frames,
      dtype=compute_dtype(b.dtype),
      seed=config.seed,
    )
  if b.checkpoint:  # Position embeddings resampled to the clips' size.
    spec = backbone.read_spec(b.checkpoint)
    frames = None
    own = spec["kind"] in OWN_FRAMES_KINDS
    if not backbone.is_image_model(spec) and not own:
      frames = config.clips.frames_per_clip
    return backbone.load_backbone(
      b.checkpoint,
      dtype=compute_dtype(b.dtype),
      resolution=b.resolution,
      num_frames=frames,
    )
  return backbone.create_backbone(
    b.kind,
    b.variant,
    resolution=b.resolution,
    num_frames=config.clips.frames_per_clip,
    tubelet=config.backbones.video.tubelet,
    dtype=compute_dtype(b.dtype),
    seed=config.seed,
  )


def clip_frames(spec, frames: int) -> np.ndarray | None:
  """Indices resampling a `frames`-frame clip in time to the frames a clip
  model of OWN_FRAMES_KINDS takes; None: the clip goes in as it is."""
  if spec.get("kind") not in OWN_FRAMES_KINDS:
    return None
  if spec["num_frames"] == frames:
    return None
  return clip_time.resample_time(frames, spec["num_frames"])


def as_variables(params_or_variables) -> dict:
  """{'params': ...[, 'batch_stats': ...]}; a bare params tree is wrapped."""
  tree = params_or_variables
  if isinstance(tree, Mapping) and "params" in tree:
    return dict(tree)
  return {"params": tree}


def normalize(x, mean, std):
  """uint8 [..., 3] -> float32 (x / 255 - mean) / std, inside jit.

  A lookup in the 256 x 3 table that video.normalize computes on the host:
  the same float32 values bit for bit on every backend (XLA would turn
  the divisions by constants into multiplications by reciprocals).
  """
  table = video.normalize(np.arange(256, dtype=np.uint8)[:, None], mean, std)
  flat = jnp.asarray(table.reshape(-1))  # [256 * 3]: value * 3 + channel
  return flat[x.astype(jnp.int32) * 3 + jnp.arange(3, dtype=jnp.int32)]
