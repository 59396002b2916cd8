"""PyAV decoding and clip sampling: one clip per shot, or fixed windows.

Frame indexing: frame i is the i-th *displayed* frame of the first video
stream, i.e. packets sorted by presentation timestamp (pts). This holds for
variable-frame-rate files, B-frame reordering and files whose first timestamp
is not zero; the `shots` of the trailers12k dataset use the same indexing.

Sampling runs on the timeline: a segment [s, e) of frames spans the seconds
[t_s, t_e); at the target fps it holds L = ceil((t_e - t_s) * fps) grid
points t_s + k / fps, and each grid point takes the frame of the segment with
the nearest timestamp (ties to the earlier frame). At the native fps of a
constant-rate file this is exactly frames s, s+1, ..., e-1.

Decoding is streaming: the file is demuxed once to index timestamps and
keyframes (no decoding), then only the needed frames are decoded, seeking to
the keyframe before a clip when that skips frames. Only the sampled frames,
already resized, are held in memory.
"""

import dataclasses
import io
import os
from collections.abc import Iterator

import av
import numpy as np

from tfds_trailers12k.shots import VideoError

SEGMENTATIONS = ("shots", "fixed")
PLACEMENTS = ("center", "start", "uniform")


@dataclasses.dataclass(frozen=True)
class VideoIndex:
  """Presentation-order index of a video stream (from demuxing only)."""

  pts: np.ndarray  # int64 [n], ascending, in the stream's time base.
  times: np.ndarray  # float64 [n], seconds since the first displayed frame.
  duration: float  # Seconds: times[-1] plus the last frame's duration.
  keyframes: np.ndarray  # int64 [K], frame indices of keyframes, ascending.

  @property
  def num_frames(self) -> int:
    return len(self.pts)

  @property
  def fps(self) -> float:
    """Average frame rate over the whole stream."""
    return self.num_frames / self.duration


class Video:
  """An open video: `index` its frames, `read` a few of them.

  Use as a context manager; `video` is encoded bytes (also as a numpy object
  scalar, as TFDS returns them) or a file path.
  """

  def __init__(self, video: bytes | str | os.PathLike, trailer_id: str = ""):
    self.trailer_id = trailer_id
    if isinstance(video, np.ndarray):  # A TFDS object scalar of bytes.
      video = video.item()
    if isinstance(video, (bytes, bytearray, memoryview)):
      video = io.BytesIO(video)
    try:
      self._container = av.open(video, metadata_errors="ignore")
    except (av.FFmpegError, OSError) as e:
      raise VideoError(trailer_id, f"cannot open the video: {e}") from e
    if not self._container.streams.video:
      self._container.close()
      raise VideoError(trailer_id, "no video stream (or one with zero frames)")
    self._stream = self._container.streams.video[0]
    # Frame + slice threads; decoding releases the GIL.
    self._stream.thread_type = "AUTO"
    self.frames_decoded = 0  # Work done by `read`, counting skipped frames.
    try:
      self.index = self._build_index()
    except VideoError:
      self._container.close()
      raise

  def __enter__(self) -> "Video":
    return self

  def __exit__(self, *exc) -> None:
    self.close()

  def close(self) -> None:
    self._container.close()

  def _error(self, reason: str) -> VideoError:
    return VideoError(self.trailer_id, reason)

  def _build_index(self) -> VideoIndex:
    pts, key, dur = [], [], []
    try:
      for packet in self._container.demux(self._stream):
        if packet.size == 0 or packet.is_discard:
          continue  # Flush packets, or outside the edit list: not displayed.
        if packet.pts is None:
          raise self._error(
            "packets without timestamps; remux it to mp4 or mkv"
          )
        pts.append(packet.pts)
        key.append(packet.is_keyframe)
        dur.append(packet.duration or 0)
    except av.FFmpegError as e:
      raise self._error(f"demuxing failed after {len(pts)} frames: {e}") from e
    if not pts:
      raise self._error("the video stream has zero frames")
    order = np.argsort(np.asarray(pts, np.int64), kind="stable")
    pts = np.asarray(pts, np.int64)[order]
    if np.any(np.diff(pts) == 0):
      raise self._error("two frames share a presentation timestamp")
    keyframes = np.flatnonzero(np.asarray(key, bool)[order])
    if not len(keyframes) or keyframes[0] != 0:
      # Decoding from the stream start still reaches every frame.
      keyframes = np.concatenate([[0], keyframes])
    tb = float(self._stream.time_base)
    times = (pts - pts[0]) * tb
    last = dur[order[-1]] * tb
    if last <= 0:  # Unknown: the median frame step, else 1 / nominal rate.
      diffs = np.diff(times)
      rate = self._stream.average_rate
      last = float(np.median(diffs)) if len(diffs) else 1 / float(rate or 1)
    return VideoIndex(pts, times, float(times[-1] + last), keyframes)

  def read(
    self, frame_indices: np.ndarray, resolution: int | None = None
  ) -> np.ndarray:
    """Decodes frames by index -> uint8 [*frame_indices.shape, H, W, 3].

    resolution: resize the short side to it and center crop a square;
    None keeps the displayed size. Rotation metadata is applied.
    """
    frame_indices = np.asarray(frame_indices, np.int64)
    flat = frame_indices.reshape(-1)
    wanted, counts = np.unique(flat, return_counts=True)
    n = self.index.num_frames
    if wanted.size and (wanted[0] < 0 or wanted[-1] >= n):
      raise self._error(
        f"frame indices {wanted[0]}..{wanted[-1]} are "
        f"outside the video's {n} frames"
      )
    # Positions in `flat` of each wanted frame, in `wanted` order.
    groups = np.split(np.argsort(flat, kind="stable"), np.cumsum(counts)[:-1])
    out = None  # Filled in place: never two copies of the frames.
    for i, rgb in self._decode(wanted, resolution):
      if out is None:
        out = np.empty((len(flat),) + rgb.shape, np.uint8)
      out[groups[np.searchsorted(wanted, i)]] = rgb
    if out is None:
      size = resolution or 0
      out = np.zeros((0, size, size, 3), np.uint8)
    # [*frame_indices.shape, H, W, 3]
    return out.reshape(frame_indices.shape + out.shape[1:])

  def _decode(
    self, wanted: np.ndarray, resolution: int | None
  ) -> Iterator[tuple[int, np.ndarray]]:
    """Yields (index, rgb) for the sorted unique `wanted` frames."""
    index = self.index
    pts_to_index = {int(p): i for i, p in enumerate(index.pts)}
    frames, pos = None, -1  # Decoded-frame iterator; last index taken from it.
    for j in wanted:
      restarted = False
      key = index.keyframes[np.searchsorted(index.keyframes, j, "right") - 1]
      if frames is None or key > pos + 1:  # Seeking skips frames: do it.
        frames, pos = self._seek(key), -1
      found = False
      while pos < j:
        frame = self._next(frames, j)
        if frame is None:
          raise self._error(
            f"the stream ended before frame {j} of "
            f"{index.num_frames} (truncated or corrupt)"
          )
        if frame.pts is None:
          raise self._error("the decoder returned a frame without pts")
        i = pts_to_index.get(frame.pts, -1)
        if i < 0:
          continue  # Not displayed (e.g. cut by the edit list).
        if pos == -1 and i > j and not restarted:
          # The seek landed after the keyframe: decode from the start.
          frames, restarted = self._seek(0), True
          continue
        pos = max(pos, i)
        if i == j:
          found = True
          try:
            yield i, _to_rgb(frame, resolution)
          except ValueError as e:
            raise self._error(str(e)) from e
      if not found:
        raise self._error(f"frame {j} could not be decoded (corrupt stream)")

  def _seek(self, key: int):
    pts = int(self.index.pts[key])
    try:
      self._container.seek(pts, stream=self._stream, backward=True)
    except av.FFmpegError as e:
      raise self._error(f"seeking to frame {key} failed: {e}") from e
    return self._container.decode(self._stream)

  def _next(self, frames, target: int):
    try:
      frame = next(frames, None)
      self.frames_decoded += frame is not None
      return frame
    except av.FFmpegError as e:
      raise self._error(
        f"decoding failed before reaching frame {target}: {e}"
      ) from e


def _to_rgb(frame: av.VideoFrame, resolution: int | None) -> np.ndarray:
  """Frame -> uint8 [H, W, 3]: displayed orientation, short side resize, crop.

  swscale converts any pixel format (gray, 10-bit, 4:4:4) and resizes in one
  pass; rotation by 90 degrees keeps the short side, so it can come after.
  """
  w, h = frame.width, frame.height
  if resolution is None:
    sw, sh = w, h
  else:
    scale = resolution / min(w, h)
    sw = max(resolution, round(w * scale))
    sh = max(resolution, round(h * scale))
  try:
    rgb = frame.reformat(
      width=sw,
      height=sh,
      format="rgb24",
      interpolation="AREA" if sw < w else "BILINEAR",
    )
  except av.FFmpegError as e:
    raise ValueError(f"cannot convert a {frame.format.name} frame: {e}") from e
  img = rgb.to_ndarray()  # [sh, sw, 3]
  turns = round(frame.rotation / 90) % 4  # Counter-clockwise quarter turns.
  if turns:
    img = np.rot90(img, turns)
  if resolution is not None:
    top = (img.shape[0] - resolution) // 2
    left = (img.shape[1] - resolution) // 2
    img = img[top : top + resolution, left : left + resolution]
  return np.ascontiguousarray(img)


def _segment_grid(
  index: VideoIndex, start: int, end: int, fps: float
) -> np.ndarray:
  """Frames of [start, end) nearest to a grid at `fps` -> int64 [L]."""
  times = index.times
  t0 = times[start]
  t1 = times[end] if end < index.num_frames else index.duration
  # Tolerate timestamp rounding of up to 5% of a target frame.
  length = max(1, int(np.ceil((t1 - t0) * fps - 0.05)))
  grid = t0 + np.arange(length) / fps
  seg = times[start:end]
  if len(seg) == 1:
    return np.full(length, start, np.int64)
  right = np.clip(np.searchsorted(seg, grid), 1, len(seg) - 1)
  left = right - 1
  # Nearest timestamp, ties to the earlier frame.
  near = np.where(grid - seg[left] <= seg[right] - grid + 1e-9, left, right)
  return start + near.astype(np.int64)


def _place(
  length: int, frames_per_clip: int, placement: str, max_clips: int
) -> list[np.ndarray]:
  """Positions in a grid of `length` for each clip of a segment.

  A segment of at least k*T grid points gives k = min(length // T,
  max_clips) clips, one per equal part. A part shorter than T (a short shot)
  is stretched: its frames repeat in order, each about T / length times.
  """
  t = frames_per_clip
  k = int(np.clip(length // t, 1, max_clips))
  bounds = np.round(np.linspace(0, length, k + 1)).astype(np.int64)
  clips = []
  for a, b in zip(bounds[:-1], bounds[1:]):
    n = b - a
    if n < t:
      pos = np.arange(t) * n // t
    elif placement == "center":
      pos = (n - t) // 2 + np.arange(t)
    elif placement == "start":
      pos = np.arange(t)
    else:  # uniform: T frames spread over the whole part.
      pos = (2 * np.arange(t) + 1) * n // (2 * t)
    clips.append(a + pos)
  return clips


def validate_shots(
  shots: np.ndarray | None, num_frames: int, trailer_id: str = ""
) -> np.ndarray:
  """Checks shots -> int64 [S, 2]; ends past the last frame are clamped.

  None or empty means one shot covering the video. A shot starting at or
  after `num_frames` is an error (shots computed on another file?).
  """
  if shots is None or np.size(shots) == 0:
    return np.array([[0, num_frames]], np.int64)
  shots = np.asarray(shots, np.int64)
  if shots.ndim != 2 or shots.shape[1] != 2:
    raise VideoError(trailer_id, f"shots must be [S, 2], got {shots.shape}")
  bad = np.flatnonzero((shots[:, 0] < 0) | (shots[:, 1] <= shots[:, 0]))
  if bad.size:
    raise VideoError(
      trailer_id, f"shot {bad[0]} {shots[bad[0]].tolist()} is empty or negative"
    )
  beyond = np.flatnonzero(shots[:, 0] >= num_frames)
  if beyond.size:
    raise VideoError(
      trailer_id,
      f"shot {beyond[0]} "
      f"{shots[beyond[0]].tolist()} starts beyond the video's "
      f"{num_frames} frames",
    )
  return np.stack([shots[:, 0], np.minimum(shots[:, 1], num_frames)], 1)


def plan_clips(
  index: VideoIndex,
  shots: np.ndarray | None,
  *,
  segmentation: str = "shots",
  frames_per_clip: int = 24,
  fps: float = 24.0,
  placement: str = "center",
  max_clips_per_shot: int = 1,
  trailer_id: str = "",
) -> dict[str, np.ndarray]:
  """Which frames each clip uses, without decoding.

  Returns 'frame_indices' int64 [N, T], 'shot_lengths' int64 [N] (length of
  the clip's shot, or of its window for 'fixed', in frames at `fps`) and
  'clip_shots' int64 [N] (the shot of each clip; window number for 'fixed').
  """
  if segmentation not in SEGMENTATIONS:
    raise ValueError(f"segmentation {segmentation!r} not in {SEGMENTATIONS}")
  if placement not in PLACEMENTS:
    raise ValueError(f"placement {placement!r} not in {PLACEMENTS}")
  if frames_per_clip < 1 or fps <= 0 or max_clips_per_shot < 1:
    raise ValueError("frames_per_clip, fps, max_clips_per_shot must be > 0")
  t = frames_per_clip
  if segmentation == "fixed":
    grid = _segment_grid(index, 0, index.num_frames, fps)  # [L]
    starts = np.arange(0, len(grid), t)
    lengths = np.minimum(len(grid) - starts, t)
    pos = [s + np.arange(t) * n // t for s, n in zip(starts, lengths)]
    return {
      "frame_indices": grid[np.stack(pos)],
      "shot_lengths": lengths,
      "clip_shots": np.arange(len(starts)),
    }
  shots = validate_shots(shots, index.num_frames, trailer_id)
  frames, lengths, owners = [], [], []
  for s, (start, end) in enumerate(shots):
    grid = _segment_grid(index, start, end, fps)  # [L]
    for pos in _place(len(grid), t, placement, max_clips_per_shot):
      frames.append(grid[pos])
      lengths.append(len(grid))
      owners.append(s)
  return {
    "frame_indices": np.stack(frames),  # [N, T]
    "shot_lengths": np.asarray(lengths, np.int64),
    "clip_shots": np.asarray(owners, np.int64),
  }


def sample_clips(
  video: bytes | str,
  shots: np.ndarray | None,
  *,
  resolution: int = 224,
  trailer_id: str = "",
  **sampling,
) -> tuple[np.ndarray, dict]:
  """Decodes the clips of a trailer -> uint8 [N, T, res, res, 3], info.

  `sampling`: plan_clips's keywords. segmentation 'shots': one clip of T =
  `frames_per_clip` frames at `fps` per shot (`max_clips_per_shot` > 1
  splits long shots), placed at the shot's center / start, or spread
  uniformly over it; shots shorter than T repeat their frames in order.
  'fixed': consecutive windows of T frames covering the trailer, ignoring
  shots (the last window is stretched if short). `shots` int [S, 2] are
  (start, end-exclusive) displayed-frame indices.

  info: 'frame_indices' int64 [N, T], 'shot_lengths' int64 [N], 'clip_shots'
  int64 [N] (see plan_clips), 'num_frames', 'fps' (source average), 'duration'
  (seconds). Raises VideoError naming `trailer_id` for bad videos or shots.
  """
  with Video(video, trailer_id) as v:
    info = plan_clips(v.index, shots, trailer_id=trailer_id, **sampling)
    clips = v.read(info["frame_indices"], resolution)  # [N, T, H, W, 3]
    info.update(
      num_frames=v.index.num_frames, fps=v.index.fps, duration=v.index.duration
    )
  return clips, info


def center_frame(clips):
  """Frame T // 2 of each clip (numpy or jax): [N, T, ...] -> [N, 1, ...]."""
  t = clips.shape[1] // 2
  return clips[:, t : t + 1]


def read_frames(
  video: bytes | str, frame_indices, resolution=None, trailer_id: str = ""
) -> np.ndarray:
  """Decodes given frames (e.g. thumbnails) -> uint8 [*shape, H, W, 3]."""
  with Video(video, trailer_id) as v:
    return v.read(np.asarray(frame_indices), resolution)


def normalize(clips: np.ndarray, mean, std) -> np.ndarray:
  """uint8 pixels [..., 3] -> float32 (x / 255 - mean) / std per channel.

  mean, std: 3 values in [0, 1] units, a checkpoint's input convention
  (models/backbone.py names the usual ones: imagenet, minus_one_one, ...).
  """
  x = np.asarray(clips, np.float32) / 255.0
  mean, std = np.asarray(mean, np.float32), np.asarray(std, np.float32)
  if mean.shape != (3,) or std.shape != (3,) or np.any(std <= 0):
    raise ValueError(
      f"normalization needs 3 means and 3 positive stds, got {mean}, {std}."
    )
  return (x - mean) / std


def sample_kwargs(clips_config, resolution: int) -> dict:
  """`sample_clips` keyword arguments from a config's `clips` section (one
  place, so extraction, predict and the notebook sample clips alike)."""
  c = clips_config
  return dict(
    segmentation=c.segmentation,
    frames_per_clip=c.frames_per_clip,
    fps=c.fps,
    placement=c.placement,
    max_clips_per_shot=c.max_clips_per_shot,
    resolution=resolution,
  )
