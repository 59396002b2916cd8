"""AST, the Audio Spectrogram Transformer (Gong et al. 2021), in Flax.

Input: AST log-mel features [B, frames, bins] (divita_jax.audio.log_mel,
1024 x 128 for the AudioSet checkpoints). The spectrogram is a one-channel
image with frequency as rows and time as columns; a patch_size x
patch_size convolution with strides (frequency_stride, time_stride)
(16 / 10 / 10: overlapping patches) makes an f x t grid, flattened
frequency-major as transformers' ASTPatchEmbeddings does. A class and a
distillation token (DeiT) are prepended, a learned position embedding for
this input size is added, and ViT's pre-LN encoder runs (vit.Encoder:
exact GELU, LayerNorm epsilon 1e-12). Pooled = the mean of the class and
distillation tokens after the final norm (transformers' `pooler_output`).

Parameter tree: `embedding` (kernel [p, p, 1, D]), `cls`,
`cls_distillation`, `Transformer/posembed_input/pos_embedding` [1, 2 + f
t, D], `Transformer/encoderblock_{i}/...` and `Transformer/encoder_norm`,
named as vit.py's, so the sharding rules and layer groups apply.
"""

from typing import Any

import flax.linen as nn
import jax.numpy as jnp

from divita_jax.models import vit
from divita_jax.models.axes import logical

# name -> (width, depth, mlp_dim, num_heads); B is every public AST.
_SIZES = {"tiny": (64, 2, 128, 4), "B": (768, 12, 3072, 12)}
# ASTFeatureExtractor's AudioSet statistics of the log-mel features.
AUDIOSET_MEAN, AUDIOSET_STD = -4.2677393, 4.5689974


def decode_variant(variant: str) -> dict[str, Any]:
  """'B' (AST-base, patch 16, strides 10) or 'tiny' -> model fields."""
  if variant not in _SIZES:
    raise ValueError(f"Unknown AST variant {variant!r}; {sorted(_SIZES)}.")
  width, depth, mlp_dim, num_heads = _SIZES[variant]
  return dict(width=width, depth=depth, mlp_dim=mlp_dim, num_heads=num_heads)


def front_end(
  num_mel_bins: int = 128,
  max_length: int = 1024,
  *,
  sampling_rate: int = 16000,
  do_normalize: bool = True,
  mean: float = AUDIOSET_MEAN,
  std: float = AUDIOSET_STD,
) -> dict[str, Any]:
  """ASTFeatureExtractor's features as audio.log_mel's parameters.

  torchaudio.compliance.kaldi.fbank as the extractor calls it (and its
  numpy path without torchaudio): 25 ms frames every 10 ms without edge
  padding, symmetric Hann window ("hanning": not Kaldi's default Povey),
  DC removal, pre-emphasis 0.97, 512-point FFT power, Kaldi mel scale
  triangles from 20 Hz to Nyquist, natural log floored at float32 eps, no
  dither; padded / truncated to max_length frames, then normalised.
  """
  return {
    "type": "kaldi_fbank",
    "sampling_rate": int(sampling_rate),
    "num_mel_bins": int(num_mel_bins),
    "num_frames": int(max_length),
    "frame_length": sampling_rate // 40,  # 25 ms
    "hop_length": sampling_rate // 100,  # 10 ms
    "fft_length": 512,
    "window": "hann",
    "remove_dc_offset": True,
    "preemphasis": 0.97,
    "low_freq": 20.0,
    "high_freq": sampling_rate / 2,
    "mel_scale": "kaldi",
    "mel_floor": 1.192092955078125e-07,
    "do_normalize": bool(do_normalize),
    "mean": float(mean),
    "std": float(std),
  }


def grid(model: dict, frames: int, bins: int) -> tuple[int, int]:
  """(frequency, time) patch grid of a [frames, bins] input."""
  p = model.get("patch_size", 16)
  f = (bins - p) // model.get("frequency_stride", 10) + 1
  t = (frames - p) // model.get("time_stride", 10) + 1
  return f, t


def patch_tokens(x):
  """[B, f, t, D] -> [B, f * t, D], frequency-major (torch's flatten)."""
  b, f, t, d = x.shape
  return x.reshape(b, f * t, d)


def pool(encoded):
  """pooler_output: mean of the class and distillation tokens."""
  return (encoded[:, 0] + encoded[:, 1]) / 2


class AST(nn.Module):
  """AST on log-mel [B, frames, bins] -> (pooled [B, D], intermediates).

  Intermediates: `stem` [B, f, t, D] (patch grid), `encoded` [B, 2 + f t,
  D] (class, distillation, patches; after encoder_norm), `pooled`.
  """

  width: int
  depth: int
  mlp_dim: int
  num_heads: int
  patch_size: int = 16
  frequency_stride: int = 10
  time_stride: int = 10
  layer_norm_eps: float = 1e-12
  gelu_approximate: bool = False
  dtype: Any = jnp.float32
  param_dtype: Any = jnp.float32
  remat: str = "none"  # per encoder block; a remat.POLICIES name

  @nn.compact
  def __call__(self, x):
    kw = dict(dtype=self.dtype, param_dtype=self.param_dtype)
    p = self.patch_size
    x = x.astype(self.dtype).transpose(0, 2, 1)[..., None]  # [B, bins, T, 1]
    x = nn.Conv(
      self.width,
      (p, p),
      strides=(self.frequency_stride, self.time_stride),
      padding="VALID",
      kernel_init=logical(nn.initializers.lecun_normal(), *[None] * 3, "embed"),
      bias_init=logical(nn.initializers.zeros, "embed"),
      name="embedding",
      **kw,
    )(x)  # [B, f, t, D]
    out = {"stem": x}
    x = patch_tokens(x)
    tokens = [
      self.param(
        name,
        logical(nn.initializers.zeros, None, None, "embed"),
        (1, 1, self.width),
        self.param_dtype,
      )
      for name in ("cls", "cls_distillation")
    ]
    tokens = [jnp.tile(t.astype(x.dtype), (x.shape[0], 1, 1)) for t in tokens]
    x = jnp.concatenate([*tokens, x], axis=1)  # [B, 2 + f t, D]
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
    out["pooled"] = pool(x)
    return out["pooled"], out
