"""TransNetV2 inference as the reference's `predict_frames`, streamed.

uint8 RGB frames of 48x27 go into 100-frame windows with stride 50, of
which frames 25-75 are kept; the video is padded with 25 copies of its
first frame and up to 74 of its last. `WindowStream` takes frames one at
a time and runs `batch` windows per call of one compiled program
(`Predictor`; the last call padded), so a video of any length streams in
bounded memory. `TransNetV2Detector` turns the probabilities into shots
as the reference's `predictions_to_scenes`, then our cut rules.
"""

import array
import functools

import cv2
import jax
import jax.numpy as jnp
import numpy as np

from tfds_trailers12k import cut_rules
from tfds_trailers12k.transnetv2 import (
  HEIGHT,
  PAD,
  STRIDE,
  WIDTH,
  WINDOW,
  color_histograms,
  load,
)

# XLA:CPU options of the network's program: its convolutions by XLA's own
# (Eigen) kernels, not YNNPACK's, which ran these shapes 10-15% slower on
# 2 cores (benchmarks/shot_accuracy.py); dots and reductions stay on
# YNNPACK. Same sums up to float rounding (1.9e-6 on the logits).
CPU_COMPILER_OPTIONS = {
  "xla_cpu_experimental_ynn_fusion_type": (
    "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT,LIBRARY_FUSION_TYPE_REDUCE"
  )
}


class Predictor:
  """Probabilities of `batch` consecutive windows per call, one program.

  A call takes a block of STRIDE * batch + STRIDE padded frames (windows
  overlap by half: the block holds each frame once) and returns the
  sigmoids of both heads on the kept frames, each float32 [STRIDE * batch].
  """

  def __init__(self, module, variables, batch: int, device: str = ""):
    self.batch = batch
    self.block = STRIDE * batch + STRIDE
    dev = jax.devices(device)[0] if device else jax.devices()[0]
    self._variables = jax.device_put(variables, dev)
    self._device = dev
    options = CPU_COMPILER_OPTIONS if dev.platform == "cpu" else None
    self._run = jax.jit(
      functools.partial(_predict_block, module, batch),
      compiler_options=options,
    )

  def __call__(self, block: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    if block.shape != (self.block, HEIGHT, WIDTH, 3):
      raise ValueError(
        f"TransNetV2 block must be uint8 [{self.block}, {HEIGHT}, {WIDTH}, 3]"
        f", got {block.dtype} {list(block.shape)}."
      )
    one, many = self._run(self._variables, jax.device_put(block, self._device))
    return np.asarray(one), np.asarray(many)


def _predict_block(module, batch, variables, block):
  """uint8 [STRIDE * (batch + 1), H, W, 3] -> kept sigmoids, 2 x [S * b]."""
  hists = color_histograms(block)  # Once per frame, not per window.
  idx = STRIDE * jnp.arange(batch)[:, None] + jnp.arange(WINDOW)[None]
  keep = slice(PAD, PAD + STRIDE)
  one, many = module.apply(variables, block[idx], hists[idx], keep)  # [b, S]
  return (
    jax.nn.sigmoid(one).reshape(-1),
    jax.nn.sigmoid(many).reshape(-1),
  )


class WindowStream:
  """Frames in, per-frame probabilities out, as the reference's windows.

  `push(frame)` (uint8 [27, 48, 3] RGB) returns the probabilities of
  the frames whose windows are complete (possibly none), `finish()` those
  of the rest: each a pair (single frame, many hot) of float32 [n]. At
  most one block of frames is held.
  """

  def __init__(self, predictor: Predictor):
    self._predict = predictor
    self._frames: list[np.ndarray] = []
    self.num_frames = 0
    self._done = 0  # Frames whose probabilities were returned.

  @property
  def held(self) -> int:
    """Frames held now (never more than one block)."""
    return len(self._frames)

  def push(self, frame: np.ndarray):
    if self.num_frames == 0:
      self._frames = [frame] * PAD  # The reference's start padding.
    self._frames.append(frame)
    self.num_frames += 1
    if len(self._frames) < self._predict.block:
      return _EMPTY
    return self._run(self._predict.batch)

  def _run(self, windows: int):
    """Predicts the next `windows` windows (a full block, padded)."""
    block = self._frames[: self._predict.block]
    block += [block[-1]] * (self._predict.block - len(block))
    one, many = self._predict(np.stack(block))
    self._frames = self._frames[STRIDE * windows :]
    n = min(STRIDE * windows, self.num_frames - self._done)
    self._done += n
    return one[:n], many[:n]

  def finish(self):
    """Probabilities of the frames not returned yet; ends the video."""
    if self.num_frames == 0:
      raise ValueError("No frames were fed to TransNetV2.")
    end = PAD + STRIDE - (self.num_frames % STRIDE or STRIDE)
    self._frames += [self._frames[-1]] * end  # The reference's end padding.
    outs = []
    left = -(-self.num_frames // STRIDE) - self._done // STRIDE  # Windows.
    while left > 0:
      take = min(left, self._predict.batch)
      outs.append(self._run(take))
      left -= take
    if not outs:
      return _EMPTY
    return tuple(np.concatenate(x) for x in zip(*outs))


_EMPTY = (np.zeros(0, np.float32), np.zeros(0, np.float32))


def predict_frames(predictor: Predictor, frames: np.ndarray):
  """Both heads' probabilities of a whole uint8 [N, 27, 48, 3] video."""
  stream = WindowStream(predictor)
  outs = [stream.push(f) for f in frames] + [stream.finish()]
  return tuple(np.concatenate(x) for x in zip(*outs))


@functools.lru_cache(maxsize=4)
def cached_predictor(checkpoint: str, batch: int, device: str) -> Predictor:
  """One loaded, compiled predictor per checkpoint in a process: a build
  worker runs many videos."""
  module, variables = load(checkpoint)
  return Predictor(module, variables, batch, device)


class TransNetV2Detector:
  """TransNetV2's shots: the reference's scenes, then our two rules.

  `predictor`: e.g. `cached_predictor(checkpoint, batch, device)`.
  `process(frame)` takes uint8 [27, 48, 3] RGB frames in order. A cut is
  where the reference's `predictions_to_scenes` starts a scene: the first
  frame at or below `threshold` after frames above it, unless no frame at
  or below it came before them (the first scene starts at frame 0 here).
  The flash rule compares 48x27 HSV frames.
  """

  def __init__(
    self,
    predictor: Predictor,
    threshold: float | None = None,
    min_shot_len: int = cut_rules.DEFAULT_MIN_SHOT_LEN,
    max_flash_len: int = cut_rules.DEFAULT_MAX_FLASH_LEN,
  ):
    self._threshold = cut_rules.check_settings(
      "transnetv2", threshold, min_shot_len, max_flash_len
    )
    self._min_shot_len = min_shot_len
    self._max_flash_len = max_flash_len
    self._stream = WindowStream(predictor)
    self._hsv: dict[int, np.ndarray] = {}  # Frames not yet scored (+1).
    self._probs = array.array("f")
    self._above = False  # The last scored frame was above the threshold.
    self._seen_below = False  # Some scored frame was not.
    self._cuts: list[tuple[int, np.ndarray, np.ndarray]] = []
    self._finished = False
    self.num_frames = 0

  def process(self, frame_rgb: np.ndarray) -> None:
    self._hsv[self.num_frames] = cv2.cvtColor(frame_rgb, cv2.COLOR_RGB2HSV)
    self.num_frames += 1
    self._scored(self._stream.push(frame_rgb)[0])

  def _scored(self, probs: np.ndarray) -> None:
    for p in probs:
      i = len(self._probs)
      self._probs.append(p)
      above = bool(p > self._threshold)
      if self._above and not above and self._seen_below:
        self._cuts.append((i, self._hsv[i - 1], self._hsv[i]))
      self._seen_below |= not above
      self._above = above
      self._hsv.pop(i - 1, None)

  def shots(self) -> np.ndarray:
    """Shots of the video fed: int32 [S, 2]; ends the video."""
    if self.num_frames == 0:
      raise ValueError("No frames were fed to the shot detector.")
    if not self._finished:
      self._scored(self._stream.finish()[0])
      self._finished = True
    cuts = cut_rules.drop_flashes(self._cuts, self._max_flash_len)
    return cut_rules.shots_from_cuts(cuts, self.num_frames, self._min_shot_len)

  def scores(self) -> np.ndarray:
    """float32 [num_frames]: single-frame probabilities (after `shots`)."""
    return np.asarray(self._probs, np.float32)
