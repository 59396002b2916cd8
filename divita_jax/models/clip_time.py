"""Time resampling of clips: our T-frame clips -> a clip model's frames.

Clip backbones (V-JEPA 2: 16 or 64 frames; VideoPrism: 16) take their own
frame count (spec.json `num_frames`), and our clips have 24 frames. The
rule is uniform index sampling: output frame i takes input frame
round(i * (frames_in - 1) / (frames_out - 1)), so the first and last
input frames are always kept and the picks are evenly spread over the
clip. Fewer output frames skip evenly; more repeat frames (no
interpolation: a repeated frame is a real frame, a blended one is not).
"""

import numpy as np


def resample_time(frames_in: int, frames_out: int) -> np.ndarray:
  """int32 indices [frames_out] into a clip of frames_in frames.

  Non-decreasing, first 0, last frames_in - 1 (a single output frame takes
  the first). Halves round up (floor(x + 0.5)), not to even, so a rule of
  the same name elsewhere gives the same picks.
  """
  if frames_in < 1 or frames_out < 1:
    raise ValueError(
      f"resample_time needs frames_in, frames_out >= 1; got {frames_in}, "
      f"{frames_out}."
    )
  if frames_out == 1:
    return np.zeros((1,), np.int32)
  pos = np.arange(frames_out) * (frames_in - 1) / (frames_out - 1)
  return np.floor(pos + 0.5).astype(np.int32)
