"""Whisper's audio encoder (Radford et al. 2022) in Flax.

Input: Whisper log-mel features [B, frames, bins] of one 30-s chunk
(divita_jax.audio.log_mel: 3000 x 80, or x 128 for large-v3). Two
convolutions over time (kernel 3, padding 1; the second with stride 2),
each followed by exact GELU, give one frame per 20 ms (1500 per chunk);
the stored sinusoidal position table is added and ViT's pre-LN encoder
runs (vit.Encoder: exact GELU, LayerNorm epsilon 1e-5). Pooled = the mean
of the encoder frames; `encoded` holds the frames, so a caller can pool a
clip's span instead (`span_frames`).

Parameter tree: `stem_conv1`, `stem_conv2` (kernels [3, in, D]),
`Transformer/posembed_input/pos_embedding` [1, max_source_positions, D],
`Transformer/encoderblock_{i}/...`, `Transformer/encoder_norm`, named as
vit.py's. Whisper's key projection has no bias; the shared attention's
`key/bias` is written as zeros (a key bias adds the same q.b to every
logit of a query, which softmax ignores, so it stays inert).
"""

import math
from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from divita_jax.models import vit
from divita_jax.models.axes import logical

# name -> (width, depth, mlp_dim, num_heads) of the encoder; `tiny` is our
# test size, `openai_tiny` OpenAI's smallest model.
_SIZES = {
  "tiny": (64, 2, 128, 4),
  "openai_tiny": (384, 4, 1536, 6),
  "base": (512, 6, 2048, 8),
  "small": (768, 12, 3072, 12),
  "medium": (1024, 24, 4096, 16),
  "large": (1280, 32, 5120, 20),
}
# Log-mel frames per encoder frame (the stride of stem_conv2).
STRIDE = 2


def decode_variant(variant: str, num_frames: int = 3000) -> dict[str, Any]:
  """'base', ... or 'tiny' for num_frames log-mel frames -> model fields."""
  if variant not in _SIZES:
    raise ValueError(f"Unknown Whisper variant {variant!r}; {list(_SIZES)}.")
  if num_frames % STRIDE:
    raise ValueError(f"Whisper needs an even num_frames, got {num_frames}.")
  width, depth, mlp_dim, num_heads = _SIZES[variant]
  return dict(
    width=width,
    depth=depth,
    mlp_dim=mlp_dim,
    num_heads=num_heads,
    max_source_positions=num_frames // STRIDE,
  )


def front_end(
  num_mel_bins: int = 80,
  num_frames: int = 3000,
  *,
  sampling_rate: int = 16000,
  hop_length: int = 160,
  n_fft: int = 400,
) -> dict[str, Any]:
  """WhisperFeatureExtractor's features as audio.log_mel's parameters:
  chunks of num_frames * hop_length samples (30 s), periodic Hann STFT,
  Slaney mel (0-8 kHz, area-normalised), log10, 8-decade range, scaled."""
  return {
    "type": "whisper_log_mel",
    "sampling_rate": int(sampling_rate),
    "num_mel_bins": int(num_mel_bins),
    "num_frames": int(num_frames),
    "n_samples": int(num_frames * hop_length),
    "chunk_length": num_frames * hop_length / sampling_rate,
    "n_fft": int(n_fft),
    "hop_length": int(hop_length),
    "window": "hann_periodic",
    "low_freq": 0.0,
    "high_freq": 8000.0,
    "mel_scale": "slaney",
    "mel_norm": "slaney",
    "log_floor": 1e-10,
    "dynamic_range": 8.0,
  }


def span_frames(spec, start_s: float, end_s: float) -> slice:
  """Encoder frames of a chunk covering [start_s, end_s) (seconds since
  the chunk's start): frame i covers [i, i + 1) * 20 ms."""
  fe = spec["front_end"]
  hop = STRIDE * fe["hop_length"] / fe["sampling_rate"]
  n = spec["model"]["max_source_positions"]
  lo = min(max(int(math.floor(start_s / hop)), 0), n)
  return slice(lo, min(max(int(math.ceil(end_s / hop)), lo), n))


def conv_gelu(x):
  """The exact GELU after each stem convolution."""
  return nn.gelu(x, approximate=False)


class WhisperEncoder(nn.Module):
  """Whisper encoder on log-mel [B, frames, bins] -> (pooled [B, D],
  intermediates `stem` [B, N, D] (after the convolutions), `encoded`
  [B, N, D] (encoder frames, after encoder_norm), `pooled`)."""

  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  max_source_positions: int = 1500
  layer_norm_eps: float = 1e-5
  gelu_approximate: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = "none"  # per encoder block; a remat.POLICIES name

  @nn.compact
  def __call__(self, x):
    frames = STRIDE * self.max_source_positions
    if x.shape[1] != frames:
      raise ValueError(
        f"Whisper encodes chunks of {frames} log-mel frames (log_mel pads "
        f"to its chunk), got {x.shape[1]}."
      )
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    x = x.astype(self.dtype)
    for i, stride in ((1, 1), (2, STRIDE)):
      x = nn.Conv(
        self.width,
        (3,),
        strides=(stride,),
        padding=((1, 1),),
        kernel_init=logical(
          nn.initializers.lecun_normal(), None, None, "embed"
        ),
        bias_init=logical(nn.initializers.zeros, "embed"),
        name=f"stem_conv{i}",
        **kw,
      )(x)
      x = conv_gelu(x)  # [B, frames / stride, D]
    out = {"stem": x}
    x = vit.Encoder(
      self.depth,
      self.mlp_dim,
      self.num_heads,
      self.layer_norm_eps,
      self.gelu_approximate,
      remat=self.remat,
      name="Transformer",
      **kw,
    )(x)
    out["encoded"] = x
    out["pooled"] = jnp.mean(x, axis=1)
    return out["pooled"], out
