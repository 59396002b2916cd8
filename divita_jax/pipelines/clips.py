"""Decoded-clip windows for end-to-end fine-tuning.

The datasets of common.py (epoch order, windows, padding, processes) with
clips decoded from the videos in place of representations read from a
store. Only a window's frames are decoded. Train examples are windows of
`Batching.num_clips` clips (the config's `clips_per_trailer`); eval windows
cover every clip.

Every branch gets its own uint8 array at its resolution, [b, clips, T, H, W,
3] (T = 1 for `center_frame` branches: frame T // 2 of each clip); branches
at one resolution share one decode. Training clips are augmented with a
random resized crop and a horizontal flip, the same for every frame of a
clip (and, as a relative box, for every branch), drawn from (seed, epoch,
2, position, clip): a batch depends on (seed, step) only, whatever the
process layout, threads or workers.

The audio branch (`Decoder.audio`) gets float32 log-mels [b, clips,
frames, bins]: each clip's `clips.audio_seconds` of soundtrack centred on
it through the audio checkpoint's front end, as extraction computes them
(audio.clip_windows, audio.clip_log_mels: one decode of the span of a
trailer's windows); silence (audio.silent_log_mels) for a trailer without
a soundtrack or with one that does not decode. Audio is not augmented.

A trailer whose video fails during training gets `weight` 0 (zero clips,
the first one unmasked so masked means stay finite) and a warning; at
evaluation it raises `video.VideoError`. Eval padding rows are one zero
clip with zero labels. A batch's trailers are decoded on `Decoder.threads`
threads (PyAV releases the GIL), straight into the preallocated batch
arrays. One batch holds b * clips * T * H * W * 3 bytes per branch (8 x 8 x
16 x 224^2 x 3 = 154 MB); `common.iterate` buffers `prefetch` of them per
reader.
"""

import concurrent.futures
import dataclasses
import math

import cv2
import numpy as np
from absl import logging

from divita_jax import audio, video
from divita_jax.pipelines import common


def check_augment(augment) -> dict | None:
  """{'flip', 'crop_scale', 'crop_ratio'} checked, as bool and tuples."""
  if augment is None:
    return None
  scale, ratio = tuple(augment["crop_scale"]), tuple(augment["crop_ratio"])
  if not 0 < scale[0] <= scale[1] <= 1 or not 0 < ratio[0] <= ratio[1]:
    raise ValueError(
      f"crop_scale {scale} needs 0 < lo <= hi <= 1 and crop_ratio {ratio} "
      "0 < lo <= hi."
    )
  return {
    "flip": bool(augment["flip"]),
    "crop_scale": scale,
    "crop_ratio": ratio,
  }


@dataclasses.dataclass(frozen=True)
class Decoder:
  """How the trailers of a source are decoded for every branch."""

  source: object  # Random access: records {'id', 'video', 'shots', ...}.
  branches: dict  # name -> {'resolution': int, 'center_frame': bool}
  clip_kwargs: dict  # video.sample_kwargs without 'resolution'.
  threads: int = 2  # Decode threads per batch.
  augment: dict | None = None  # check_augment's; training windows only.
  # The audio branch: {'spec': the audio backbone's spec (its front_end),
  # 'seconds': clips.audio_seconds}; None = no audio branch.
  audio: dict | None = None

  def __post_init__(self):
    if not self.branches and self.audio is None:
      raise ValueError("No branches given.")
    if "resolution" in self.clip_kwargs:
      raise ValueError("clip_kwargs holds 'resolution'; branches give it.")
    object.__setattr__(self, "augment", check_augment(self.augment))


def clip_counts(decoder: Decoder, indices) -> np.ndarray:
  """[len(indices)] int64 clips of each source row, planned from the
  demuxed index (no frame decoding). Raises video.VideoError for a bad
  video."""
  indices = np.asarray(indices, np.int64)
  counts = np.zeros(len(indices), np.int64)

  def count(k: int) -> None:
    record = decoder.source[int(indices[k])]
    tid = common.as_str(record["id"])
    with video.Video(record["video"], tid) as v:
      plan = video.plan_clips(
        v.index,
        np.asarray(record["shots"]),
        trailer_id=tid,
        **decoder.clip_kwargs,
      )
    counts[k] = len(plan["frame_indices"])

  _run(decoder.threads, count, range(len(indices)))
  return counts


@dataclasses.dataclass(frozen=True)
class _Clips:
  """Decodes windows of a subset's trailers (common.py's reader)."""

  decoder: Decoder
  fold: common.FoldData
  indices: np.ndarray  # [n] subset rows into the source.
  num_clips: int  # Clips per example.
  branches: tuple  # (name, resolution, center_frame) per branch.

  def empty(self, b: int) -> dict:
    """Zero clips (and log-mels) of every branch and an all-False mask for
    `b` rows."""
    t = self.decoder.clip_kwargs["frames_per_clip"]
    out = {
      name: np.zeros(
        (b, self.num_clips, 1 if center else t, res, res, 3), np.uint8
      )
      for name, res, center in self.branches
    }
    if self.decoder.audio is not None:
      fe = self.decoder.audio["spec"]["front_end"]
      size = (fe["num_frames"], fe["num_mel_bins"])
      out["audio"] = np.zeros((b, self.num_clips, *size), np.float32)
    out["mask"] = np.zeros((b, self.num_clips), bool)
    return out

  def groups(self) -> dict:
    """resolution -> names of its branches (decoded together)."""
    out = {}
    for name, res, _ in self.branches:
      out.setdefault(res, []).append(name)
    return out

  def train(self, positions, key) -> dict:
    """Windows of subset `positions` [b], starts and augmentation drawn
    from `key` (seed, epoch); a failing video gets weight 0."""
    out = self.empty(len(positions))
    out["labels"] = self.fold.labels[self.indices[positions]]
    out["weight"] = np.ones(len(positions), np.float32)

    def decode(r: int) -> None:
      try:
        self._fill(out, int(positions[r]), (r,), key=key)
      except video.VideoError as e:
        logging.warning(
          "Training with weight 0 on trailer %r: %s", e.trailer_id, e.reason
        )
        for name in out.keys() - {"labels", "weight", "mask"}:
          out[name][r] = 0
        out["mask"][r] = np.arange(self.num_clips) == 0
        out["weight"][r] = 0

    _run(self.decoder.threads, decode, range(len(positions)))
    return out

  def eval(self, windows) -> dict:
    """Windows [b, 2] (position, start); a padding row is one zero clip
    (finite means) with zero labels."""
    real = windows[:, 0] >= 0
    out = self.empty(len(windows))
    labels = self.fold.labels[self.indices[np.maximum(windows[:, 0], 0)]]
    out["labels"] = np.where(real[:, None], labels, 0).astype(np.float32)
    out["mask"][~real, 0] = True
    by_trailer = {}  # A trailer's windows: one open, one pass over its frames.
    for r in np.flatnonzero(real):
      by_trailer.setdefault(int(windows[r, 0]), []).append(int(r))

    def decode(p: int) -> None:
      rs = by_trailer[p]
      self._fill(out, p, rs, starts=[int(windows[r, 1]) for r in rs])

    _run(self.decoder.threads, decode, by_trailer)
    return out

  def _fill(self, out: dict, position: int, rows, starts=None, key=None):
    """Decodes windows of the trailer at subset `position` into batch
    `rows`: from `starts`, or one window whose start (common.random_start)
    and augmentation are drawn from `key`."""
    i = int(self.indices[position])
    tid, record = self.fold.ids[i], self.decoder.source[i]
    augment = self.decoder.augment
    with video.Video(record["video"], tid) as v:
      frames = video.plan_clips(
        v.index,
        np.asarray(record["shots"]),
        trailer_id=tid,
        **self.decoder.clip_kwargs,
      )["frame_indices"]  # [N, T]
      if starts is None:
        starts = [
          common.random_start(key, position, len(frames), self.num_clips)
        ]
      windows = [frames[s : s + self.num_clips] for s in starts]
      boxes = [
        None if augment is None else _boxes(augment, key, position, len(w))
        for w in windows
      ]
      self._decode(v, out, rows, windows, boxes)
      if self.decoder.audio is not None:  # Each clip's audio span [c, 2].
        spans = audio.clip_windows(
          v.index.times,
          np.concatenate(windows),
          v.index.duration,
          float(self.decoder.audio["seconds"]),
        )
    if self.decoder.audio is not None:
      mels = _log_mels(record["video"], spans, self.decoder.audio, tid)
      lo = 0
      for r, w in zip(rows, windows):
        out["audio"][r, : len(w)] = mels[lo : lo + len(w)]
        lo += len(w)
    for r, w in zip(rows, windows):
      out["mask"][r, : len(w)] = True

  def _decode(self, v: video.Video, out: dict, rows, windows, boxes):
    """Frames of `windows` ([c, T] each) -> batch `rows` of every branch,
    one decode per resolution; centre-frame branches get frame T // 2."""
    counts = [len(w) for w in windows]
    offsets = np.cumsum([0] + counts)
    wanted = np.concatenate(windows)  # [sum(counts), T]
    center_only = {name: c for name, _, c in self.branches}
    for res, names in self.groups().items():
      full = not all(center_only[n] for n in names)
      x = v.read(wanted if full else video.center_frame(wanted), res)
      for n in names:  # x: [sum(counts), T or 1, res, res, 3]
        clips = video.center_frame(x) if full and center_only[n] else x
        for r, c, lo, box in zip(rows, counts, offsets, boxes):
          _write(out[n][r, :c], clips[lo : lo + c], box)


def _log_mels(data, spans, audio_branch: dict, tid: str) -> np.ndarray:
  """float32 [c, frames, bins] front end of each span's audio, decoded in
  one pass; silence for a trailer without a soundtrack or with one that
  does not decode (as extract_audio.trailer_log_mels)."""
  spec = audio_branch["spec"]
  try:
    mels, has_audio = audio.clip_log_mels(data, spans, spec, name=tid)
  except audio.AudioError as e:  # A broken audio stream in a good video.
    logging.log_first_n(logging.WARNING, "Audio branch: silence: %s", 10, e)
    return audio.silent_log_mels(spans, spec)
  if not has_audio:
    logging.log_first_n(
      logging.WARNING, "Audio branch: silence for %s (no audio).", 10, tid
    )
  return mels


def _crop_box(rng, scale, ratio) -> tuple:
  """Inception-style random resized crop of the unit square -> (top, left,
  height, width) as fractions: area in `scale`, width / height in `ratio`
  (log-uniform); after 10 misses the centre crop of the nearest ratio."""
  log_ratio = np.log(ratio)
  for _ in range(10):
    area = rng.uniform(*scale)
    aspect = math.exp(rng.uniform(*log_ratio))
    w, h = math.sqrt(area * aspect), math.sqrt(area / aspect)
    if w <= 1 and h <= 1:
      return rng.uniform(0, 1 - h), rng.uniform(0, 1 - w), h, w
  aspect = min(max(1.0, ratio[0]), ratio[1])
  w, h = min(1.0, aspect), min(1.0, 1 / aspect)
  return (1 - h) / 2, (1 - w) / 2, h, w


def _boxes(augment, key, position: int, count: int) -> list:
  """(crop box, flip) of each of a window's `count` clips."""
  out = []
  for clip in range(count):
    rng = np.random.default_rng((*key, 2, position, clip))
    box = _crop_box(rng, augment["crop_scale"], augment["crop_ratio"])
    out.append((box, bool(augment["flip"]) and rng.random() < 0.5))
  return out


def _write(dst: np.ndarray, clips: np.ndarray, boxes) -> None:
  """clips [c, T, R, R, 3] -> dst (a view of the batch), cropped, resized
  back to R and flipped per clip when `boxes` are given."""
  if boxes is None:
    dst[...] = clips
    return
  res = clips.shape[-2]
  for d, clip, ((top, left, height, width), flip) in zip(dst, clips, boxes):
    h = min(res, max(1, round(height * res)))
    w = min(res, max(1, round(width * res)))
    y, x = min(round(top * res), res - h), min(round(left * res), res - w)
    for df, frame in zip(d, clip):  # cv2 writes into the batch itself.
      if (h, w) == (res, res):
        df[...] = frame
      else:
        crop = frame[y : y + h, x : x + w]
        cv2.resize(crop, (res, res), dst=df, interpolation=cv2.INTER_LINEAR)
      if flip:
        cv2.flip(df, 1, dst=df)


def _run(threads: int, fn, items) -> None:
  """fn(item) for every item on up to `threads` threads; raises the first
  error (in item order)."""
  items = list(items)
  if threads <= 1 or len(items) <= 1:
    for item in items:
      fn(item)
    return
  with concurrent.futures.ThreadPoolExecutor(min(threads, len(items))) as ex:
    for f in [ex.submit(fn, item) for item in items]:
      f.result()


def _clips(decoder: Decoder, fold, subset: str, num_clips: int) -> _Clips:
  if len(decoder.source) != len(fold.ids):
    raise ValueError(
      f"{len(fold.ids)} ids and {len(decoder.source)} source records must "
      "be aligned."
    )
  branches = tuple(
    (name, int(b["resolution"]), bool(b["center_frame"]))
    for name, b in decoder.branches.items()
  )
  return _Clips(decoder, fold, fold.rows(subset), num_clips, branches)


def train_data(
  decoder: Decoder,
  fold: common.FoldData,
  batching: common.Batching,
  epochs: common.Epochs,
  num_workers: int = 0,
) -> common.TrainData:
  """Batches of random augmented windows of the fold's 'train' subset for
  `epochs.count` epochs: {branch: uint8 [b, num_clips, T, H, W, 3], 'audio'
  float32 [b, num_clips, frames, bins] (with Decoder.audio), 'mask' bool
  [b, num_clips], 'labels' float32 [b, C], 'weight' float32 [b]}.
  num_workers > 0: `common.iterate` decodes in that many worker processes
  (each with `decoder.threads` threads)."""
  if num_workers:
    source = common.picklable(decoder.source)
    decoder = dataclasses.replace(decoder, source=source)
  src = _clips(decoder, fold, "train", batching.num_clips)
  size = len(src.indices)
  return common.train_data(src.train, size, batching, epochs, num_workers)


def eval_data(
  decoder: Decoder,
  fold: common.FoldData,
  subset: str,
  batching: common.Batching,
) -> common.EvalData:
  """Batches of every window of every trailer of `subset`: {branch: uint8
  [b, num_clips, T, H, W, 3], 'mask', 'labels', 'trailer' int32 [b]
  (subset position, -1 = padding), 'valid' bool [b]}; never augmented.
  Demuxes every video once here to count its clips."""
  decoder = dataclasses.replace(decoder, augment=None)
  src = _clips(decoder, fold, subset, batching.num_clips)
  lengths = clip_counts(decoder, src.indices)
  return common.eval_data(src.eval, lengths, batching)
