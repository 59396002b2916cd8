"""Frame scores to shots: PySceneDetect's detectors and our cut rules.

`ShotDetector` scores downscaled BGR frames exactly as PySceneDetect's
`ContentDetector` or `AdaptiveDetector` (same HSV frames, same float
operations, so the same scores bit for bit; see `content_score`). Every
detector's raw cuts (TransNetV2's too) are then cleaned by two rules of
ours, described in tfds_trailers12k/shots.py: flash suppression
(`drop_flashes`) and a minimum shot length (`shots_from_cuts`).
"""

import array
import collections

import cv2
import numpy as np

# Default threshold per detector: ContentDetector's `threshold` (mean HSV
# change), AdaptiveDetector's `adaptive_threshold` (score / local mean) and
# TransNetV2's on its single-frame probability.
DEFAULT_THRESHOLDS = {"content": 27.0, "adaptive": 3.0, "transnetv2": 0.5}
DETECTORS = tuple(DEFAULT_THRESHOLDS)
DEFAULT_MIN_SHOT_LEN = 6
DEFAULT_MAX_FLASH_LEN = 2
# Flash test: the frames before and after a short burst of cuts are closer
# than this fraction of the burst's cut scores: the scene came back.
_FLASH_SIMILARITY = 0.5
# AdaptiveDetector's defaults (window_width, min_content_val): frames on
# each side of the scored frame, and the least score that may cut.
_ADAPTIVE_WINDOW = 2
_ADAPTIVE_MIN_SCORE = 15.0


def _hsv_distance(a: np.ndarray, b: np.ndarray) -> float:
  """ContentDetector's score of two HSV frames (equal weights, no edges)."""
  diff = np.abs(a.astype(np.int16) - b.astype(np.int16))
  return float(diff.mean())


def content_score(
  prev_hsv: np.ndarray, hsv: np.ndarray, scratch: np.ndarray | None = None
) -> float:
  """ContentDetector's frame score of two HSV frames, bit for bit.

  PySceneDetect (default weights 1, 1, 1 and 0 for edges) takes per
  channel sum(|diff|) / pixels, then sums the weighted components left to
  right and divides by the weights' sum (3). absdiff + sumElems give the
  same exact integer sums 5x faster; the float steps are the same ones in
  the same order (no `sum()`: Python 3.12 compensates float sums).
  `scratch`: optional array like `hsv` for |diff|, to skip an allocation.
  """
  pixels = float(hsv.shape[0] * hsv.shape[1])
  dh, ds, dv, _ = cv2.sumElems(cv2.absdiff(hsv, prev_hsv, dst=scratch))
  return ((dh / pixels + ds / pixels) + dv / pixels) / 3.0


def adaptive_ratio(scores) -> float:
  """AdaptiveDetector's ratio for the middle of 2 * window + 1 scores."""
  w = len(scores) // 2
  total = 0.0
  for i, score in enumerate(scores):  # Left to right, as PySceneDetect.
    if i != w:
      total += score
  mean = total / (2.0 * w)
  if abs(mean) >= 0.00001:
    return min(scores[w] / mean, 255.0)
  return 255.0 if scores[w] >= _ADAPTIVE_MIN_SCORE else 0.0


class ShotDetector:
  """Scores downscaled BGR frames as a PySceneDetect detector; cleans cuts.

  `process` gives the same cuts as PySceneDetect's ContentDetector
  (threshold, min_scene_len=0) or AdaptiveDetector (adaptive_threshold,
  min_scene_len=1, other defaults) fed the same frames.
  """

  def __init__(
    self,
    detector: str = "content",
    threshold: float | None = None,
    min_shot_len: int = DEFAULT_MIN_SHOT_LEN,
    max_flash_len: int = DEFAULT_MAX_FLASH_LEN,
    fps: float = 24.0,  # Unused: cuts are frame indices. Kept for callers.
  ):
    del fps
    if detector not in ("content", "adaptive"):
      raise ValueError(
        f"Unknown shot detector {detector!r}; use one of "
        f"{sorted(DEFAULT_THRESHOLDS)} (transnetv2: TransNetV2Detector)."
      )
    threshold = check_settings(detector, threshold, min_shot_len, max_flash_len)
    self._adaptive = detector == "adaptive"
    self._threshold = threshold
    self._min_shot_len = min_shot_len
    self._max_flash_len = max_flash_len
    # Scores of the adaptive window, oldest first.
    self._window = collections.deque(maxlen=2 * _ADAPTIVE_WINDOW + 1)
    # Recent HSV frames by index: the adaptive detector reports a cut
    # `_ADAPTIVE_WINDOW` frames late; the flash test needs cut-1 and cut.
    self._recent: dict[int, np.ndarray] = {}
    self._keep = max_flash_len + 8
    # HSV frames and |diff| are written into buffers reused in a ring:
    # allocating ~0.2 MB per frame cost ~15% of the scoring time.
    self._ring: list[np.ndarray] = []
    self._scratch = None
    self._cuts: list[tuple[int, np.ndarray, np.ndarray]] = []
    self._scores = array.array("d")  # Content score or adaptive ratio.
    self.num_frames = 0

  def process(self, frame_bgr: np.ndarray) -> None:
    """Feeds the next frame (uint8 [h, w, 3] BGR, already downscaled)."""
    index = self.num_frames
    self.num_frames += 1
    if not self._ring or self._ring[0].shape != frame_bgr.shape:
      # _keep frames stay in _recent while the next one is written.
      self._ring = [np.empty_like(frame_bgr) for _ in range(self._keep + 1)]
      self._scratch = np.empty_like(frame_bgr)
    hsv = cv2.cvtColor(
      frame_bgr, cv2.COLOR_BGR2HSV, dst=self._ring[index % len(self._ring)]
    )
    prev = self._recent.get(index - 1)
    self._recent[index] = hsv
    self._recent.pop(index - self._keep, None)
    # The first frame scores 0.0, as in PySceneDetect.
    score = 0.0 if prev is None else content_score(prev, hsv, self._scratch)
    if not self._adaptive:
      self._scores.append(score)
      if score >= self._threshold:
        self._add_cut(index)
      return
    self._window.append(score)
    if len(self._window) == self._window.maxlen:
      middle = self._window[_ADAPTIVE_WINDOW]
      ratio = adaptive_ratio(self._window)
      self._scores.append(ratio)
      if ratio >= self._threshold and middle >= _ADAPTIVE_MIN_SCORE:
        self._add_cut(index - _ADAPTIVE_WINDOW)

  def _add_cut(self, c: int) -> None:
    if c > 0 and c - 1 in self._recent and c in self._recent:
      # Copies: the ring buffers will be overwritten.
      before, at = self._recent[c - 1].copy(), self._recent[c].copy()
      self._cuts.append((c, before, at))

  def shots(self) -> np.ndarray:
    """Shots of everything fed so far: int32 [S, 2]."""
    if self.num_frames == 0:
      raise ValueError("No frames were fed to the shot detector.")
    cuts = drop_flashes(self._cuts, self._max_flash_len)
    return shots_from_cuts(cuts, self.num_frames, self._min_shot_len)

  def scores(self) -> np.ndarray:
    """float64 [num_frames]: the value thresholded per frame, exactly (the
    adaptive ratio is 0 on the first and last `_ADAPTIVE_WINDOW` frames)."""
    out = np.zeros(self.num_frames, np.float64)
    start = _ADAPTIVE_WINDOW if self._adaptive else 0
    out[start : start + len(self._scores)] = self._scores
    return out


def check_settings(detector, threshold, min_shot_len, max_flash_len) -> float:
  """The threshold to use (None: the detector's default); bad ones raise."""
  if threshold is None:
    threshold = DEFAULT_THRESHOLDS[detector]
  if threshold <= 0 or min_shot_len < 1 or max_flash_len < 0:
    raise ValueError(
      f"Bad shot detector settings: threshold={threshold} (> 0), "
      f"min_shot_len={min_shot_len} (>= 1), max_flash_len="
      f"{max_flash_len} (>= 0)."
    )
  return threshold


def drop_flashes(cuts, max_flash_len: int) -> list[int]:
  """Cut frames without the flashes: `cuts` is [(cut, HSV frame before,
  HSV frame at)] in order; see the module docstring for the rule."""
  kept, i = [], 0
  while i < len(cuts):
    c1, before, first = cuts[i]
    if i + 1 < len(cuts):
      c2, last, after = cuts[i + 1]
      jump = min(_hsv_distance(before, first), _hsv_distance(last, after))
      if (
        c2 - c1 <= max_flash_len
        and _hsv_distance(before, after) < _FLASH_SIMILARITY * jump
      ):
        i += 2  # The scene came back: a flash, not two cuts.
        continue
    kept.append(c1)
    i += 1
  return kept


def shots_from_cuts(cuts, num_frames: int, min_shot_len: int) -> np.ndarray:
  """int32 [S, 2] rows covering [0, num_frames), cuts closer than
  `min_shot_len` to the last kept one dropped."""
  starts = [0]
  for c in cuts:
    if c - starts[-1] >= min_shot_len and c < num_frames:
      starts.append(c)
  ends = starts[1:] + [num_frames]
  return np.stack([starts, ends], axis=1).astype(np.int32)  # [S, 2]


def cuts_from_shots(shots: np.ndarray) -> np.ndarray:
  """Frame indices where a new shot starts (all starts but the first)."""
  return np.asarray(shots, np.int32)[1:, 0]
