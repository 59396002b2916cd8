"""grain input pipeline of decoded clips (end-to-end fine-tuning).

The datasets of rep_pipeline with clips decoded from the videos in place of
representations read from a store: `TrainData` / `EvalData` whose element
i is the process-local batch of global step i, iterated (and resumed) with
`reps.iterate`. Train: rep_pipeline's epoch order, cut into global
batches; each example is a random contiguous window of `clips_per_trailer`
clips (start drawn from seed, epoch and subset position) and only the
window's frames are decoded. Eval: every window of `num_clips` consecutive
clips of every trailer, padded to whole global batches.

Every branch gets its own uint8 array at its resolution, [b, clips, T, H, W,
3] (T = 1 for `center_frame` branches: frame T // 2 of each clip); branches
at one resolution share one decode. Training clips are augmented with a
random resized crop and a horizontal flip, the same for every frame of a
clip (and, as a relative box, for every branch), drawn from (seed, epoch,
2, position, clip): a batch depends on (seed, step) only, whatever the
process layout, threads or workers.

A trailer whose video fails during training gets `weight` 0 (zero clips,
the first one unmasked so masked means stay finite) and a warning; at
evaluation it raises `video.VideoError`. A batch's trailers are decoded on
`decode_threads` threads (PyAV releases the GIL), straight into the
preallocated batch arrays. One batch holds b * clips * T * H * W * 3 bytes
per branch (8 x 8 x 16 x 224^2 x 3 = 154 MB); `iterate` buffers `prefetch`
of them per reader.
"""

import concurrent.futures
import dataclasses
import functools
import math

import cv2
import grain
import numpy as np
from absl import logging

from divita_jax import hosts, video
from divita_jax.pipelines import extraction, reps


@dataclasses.dataclass(frozen=True)
class _Clips:
  source: object  # Random access: records {'id', 'video', 'shots', ...}.
  ids: tuple  # [N] trailer ids of the source rows.
  labels: np.ndarray  # [N, C]
  indices: np.ndarray  # [n] subset rows into the source.
  branches: tuple  # (name, resolution, center_frame) per branch.
  clip_kwargs: dict  # plan_clips keyword arguments.
  num_clips: int  # Clips per example.
  decode_threads: int

  def empty(self, b: int) -> dict:
    """Zero clips of every branch and an all-False mask for `b` rows."""
    t = self.clip_kwargs["frames_per_clip"]
    out = {
      name: np.zeros(
        (b, self.num_clips, 1 if center else t, res, res, 3), np.uint8
      )
      for name, res, center in self.branches
    }
    out["mask"] = np.zeros((b, self.num_clips), bool)
    return out

  def groups(self) -> dict:
    """resolution -> names of its branches (decoded together)."""
    out = {}
    for name, res, _ in self.branches:
      out.setdefault(res, []).append(name)
    return out


def _fill(src: _Clips, out: dict, position: int, rows, starts, key, augment):
  """Decodes windows of the trailer at subset `position` into batch `rows`.

  starts: first clip of each row's window; None: one row whose start is
  drawn from `key` (seed, epoch). Augments with boxes drawn from `key`.
  """
  i = int(src.indices[position])
  tid = extraction._as_str(src.ids[i])
  record = src.source[i]
  shots = np.asarray(record["shots"])
  with video.Video(record["video"], tid) as v:
    frames = video.plan_clips(
      v.index, shots, trailer_id=tid, **src.clip_kwargs
    )["frame_indices"]  # [N, T]
    if starts is None:  # As rep_pipeline: independent of batch and layout.
      rng = np.random.default_rng((*key, 1, position))
      starts = [int(rng.integers(0, max(len(frames) - src.num_clips, 0) + 1))]
    windows = [frames[s : s + src.num_clips] for s in starts]
    counts = [len(w) for w in windows]
    offsets = np.cumsum([0] + counts)
    wanted = np.concatenate(windows)  # [sum(counts), T]
    boxes = [
      None if augment is None else _boxes(augment, key, position, c)
      for c in counts
    ]
    center = wanted.shape[1] // 2
    center_only = {name: c for name, _, c in src.branches}
    for res, names in src.groups().items():
      full = not all(center_only[n] for n in names)
      sel = wanted if full else wanted[:, center : center + 1]
      x = v.read(sel, res)  # [sum(counts), T or 1, res, res, 3]
      for n in names:
        clips = x[:, center : center + 1] if full and center_only[n] else x
        for r, c, lo, box in zip(rows, counts, offsets, boxes):
          _write(out[n][r, :c], clips[lo : lo + c], box)
  for r, c in zip(rows, counts):
    out["mask"][r, :c] = True


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


def _train_batch(src, share, seed, steps, global_batch_size, augment, i):
  # Module-level (not a closure): worker processes receive it pickled.
  epoch, step = divmod(int(i), steps)
  order = reps._epoch_order(
    seed, epoch, len(src.indices), steps * global_batch_size
  )
  positions = order[step * global_batch_size :][:global_batch_size][share]
  out = src.empty(len(positions))
  out["labels"] = src.labels[src.indices[positions]].astype(np.float32)
  out["weight"] = np.ones(len(positions), np.float32)

  def decode(r: int) -> None:
    p = int(positions[r])
    try:
      _fill(src, out, p, (r,), None, (seed, epoch), augment)
    except video.VideoError as e:
      logging.warning(
        "Training with weight 0 on trailer %r: %s", e.trailer_id, e.reason
      )
      for name, _, _ in src.branches:
        out[name][r] = 0
      out["mask"][r] = np.arange(src.num_clips) == 0
      out["weight"][r] = 0

  _run(src.decode_threads, decode, range(len(positions)))
  return out


def _check(source, ids, labels, indices, branches, clip_kwargs) -> tuple:
  """Validated (subset indices, branches as (name, resolution, center))."""
  if not branches:
    raise ValueError("No branches given.")
  if "resolution" in clip_kwargs:
    raise ValueError("clip_kwargs holds 'resolution'; branches give it.")
  if len(labels) != len(ids) or len(source) != len(ids):
    raise ValueError(
      f"{len(ids)} ids, {len(labels)} label rows and {len(source)} source "
      "records must be aligned."
    )
  indices = np.asarray(indices, np.int64)
  if not len(indices):
    raise ValueError("The subset to load is empty.")
  if indices.min() < 0 or indices.max() >= len(ids):
    raise ValueError(f"Subset indices out of range [0, {len(ids)}).")
  branches = tuple(
    (name, int(b["resolution"]), bool(b["center_frame"]))
    for name, b in branches.items()
  )
  return indices, branches


def check_augment(augment) -> dict | None:
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


def train_data(
  source,
  ids,
  labels,
  indices,
  *,
  branches: dict,
  clip_kwargs: dict,
  clips_per_trailer: int,
  global_batch_size: int,
  seed: int,
  num_epochs: int,
  augment: dict | None,
  decode_threads: int = 2,
  num_workers: int = 0,
  process_index: int | None = None,
  process_count: int | None = None,
) -> reps.TrainData:
  """Batches of random augmented windows for `num_epochs` epochs: {branch:
  uint8 [b, clips_per_trailer, T, H, W, 3], 'mask' bool [b, clips],
  'labels' float32 [b, C], 'weight' float32 [b]} (see module doc).

  branches: {name: {'resolution', 'center_frame'}}; clip_kwargs:
  video.sample_kwargs without 'resolution'; augment: {'flip', 'crop_scale',
  'crop_ratio'} or None. num_workers > 0: `reps.iterate` decodes
  in that many worker processes (each with `decode_threads` threads).
  """
  indices, branches = _check(
    source, ids, labels, indices, branches, clip_kwargs
  )
  augment = check_augment(augment)
  share = hosts.process_rows(global_batch_size, process_index, process_count)
  if num_workers:
    source = extraction._picklable(source)
  src = _Clips(
    source,
    tuple(ids),
    np.asarray(labels),
    indices,
    branches,
    dict(clip_kwargs),
    clips_per_trailer,
    decode_threads,
  )
  steps = -(-len(indices) // global_batch_size)
  make_batch = functools.partial(
    _train_batch, src, share, seed, steps, global_batch_size, augment
  )
  ds = grain.MapDataset.range(num_epochs * steps).map(make_batch)
  if num_workers:
    reps._WORKERS[ds] = num_workers
  return reps.TrainData(ds, steps)


def clip_counts(source, indices, clip_kwargs, *, decode_threads=2):
  """[len(indices)] int64 clips of each trailer, planned from the demuxed
  index (no frame decoding). Raises video.VideoError for a bad video."""
  indices = np.asarray(indices, np.int64)
  counts = np.zeros(len(indices), np.int64)

  def count(k: int) -> None:
    record = source[int(indices[k])]
    tid = extraction._as_str(record["id"])
    with video.Video(record["video"], tid) as v:
      plan = video.plan_clips(
        v.index, np.asarray(record["shots"]), trailer_id=tid, **clip_kwargs
      )
    counts[k] = len(plan["frame_indices"])

  _run(decode_threads, count, range(len(indices)))
  return counts


def _eval_batch(src, windows, share, global_batch_size, i) -> dict:
  rows = windows[int(i) * global_batch_size :][:global_batch_size][share]
  real = rows[:, 0] >= 0
  out = src.empty(len(rows))
  labels = src.labels[src.indices[np.maximum(rows[:, 0], 0)]]
  out["labels"] = np.where(real[:, None], labels, 0).astype(np.float32)
  out["mask"][~real, 0] = True  # Padding: one zero clip, finite means.
  by_trailer = {}  # A trailer's windows: one open, one pass over its frames.
  for r in np.flatnonzero(real):
    by_trailer.setdefault(int(rows[r, 0]), []).append(int(r))

  def decode(p: int) -> None:
    rs = by_trailer[p]
    _fill(src, out, p, rs, [int(rows[r, 1]) for r in rs], None, None)

  _run(src.decode_threads, decode, by_trailer)
  out["trailer"] = rows[:, 0].astype(np.int32)
  out["valid"] = real
  return out


def eval_data(
  source,
  ids,
  labels,
  indices,
  *,
  branches: dict,
  clip_kwargs: dict,
  num_clips: int,
  global_batch_size: int,
  decode_threads: int = 2,
  process_index: int | None = None,
  process_count: int | None = None,
) -> reps.EvalData:
  """Batches of every window of `num_clips` clips of every trailer: {branch:
  uint8 [b, num_clips, T, H, W, 3], 'mask', 'labels', 'trailer' int32 [b]
  (subset position, -1 = padding), 'valid' bool [b]}; no augmentation.
  Demuxes every video once here to count its clips."""
  indices, branches = _check(
    source, ids, labels, indices, branches, clip_kwargs
  )
  share = hosts.process_rows(global_batch_size, process_index, process_count)
  src = _Clips(
    source,
    tuple(ids),
    np.asarray(labels),
    indices,
    branches,
    dict(clip_kwargs),
    num_clips,
    decode_threads,
  )
  counts = clip_counts(
    source, indices, clip_kwargs, decode_threads=decode_threads
  )
  windows = [
    (p, s) for p, n in enumerate(counts) for s in range(0, n, num_clips)
  ]
  windows = np.asarray(windows, np.int64).reshape(-1, 2)  # [W, 2]
  steps = -(-len(windows) // global_batch_size)
  pad = steps * global_batch_size - len(windows)
  windows = np.concatenate([windows, np.tile([[-1, 0]], (pad, 1))], 0)
  make_batch = functools.partial(
    _eval_batch, src, windows, share, global_batch_size
  )
  ds = grain.MapDataset.range(steps).map(make_batch)
  return reps.EvalData(ds, windows, steps)
