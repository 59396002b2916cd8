"""Frozen-backbone feature extraction into the representation store.

Every clip of every trailer goes through each branch's backbone: 2-D (image)
kinds per frame, pooled over the clip's frames (mean, or the centre frame
only), video kinds per clip; each trailer's [num_clips, D] array is written
atomically to an `NpyStore` under the branch's tag. Work is split across JAX
processes (each takes its share of trailers) and each process shards its
clip batches over its local devices, so extraction itself needs no
cross-process collective. Loading a converted checkpoint does (orbax ends
in a barrier), so every process loads every backbone whatever its share.

Clips stream into fixed-size batches across trailer boundaries (no padded
batch per trailer), travel to the device as uint8 and are normalised inside
the jitted function; the next batch is dispatched before the previous
result is fetched, so decoding (grain threads or worker processes), the
transfer and the compute overlap. Trailers already in the store are
skipped, so a rerun resumes; trailers whose video fails are recorded in
`skipped_p<process>.json` beside the store and skipped.

The audio branch (`extract_audio.py`): per clip, the log-mel of a window of
the soundtrack centred on the clip, through the audio encoder in the same
batches.
"""

import collections
import json
import os
import time
from collections.abc import Mapping

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from divita_jax import atomic, extract_audio, hosts, video
from divita_jax.models import backbone, runtime
from divita_jax.pipelines import common, extraction, stores

FRAME_POOLINGS = ("mean", "center")
# Batches dispatched and not yet fetched: one computes while the next is
# transferred and the previous one's features come back.
IN_FLIGHT = 2


def decode_processes(config: ml_collections.ConfigDict) -> int:
  """Decode worker processes of extraction (see `auto_processes`)."""
  return auto_processes(int(config.extract.decode_processes))


def auto_processes(n: int) -> int:
  """`n` decode worker processes; -1 = one per core beside the main
  process on GPU/TPU, none on CPU (its cores run the backbones; PyAV's
  threads release the GIL)."""
  if n >= 0:
    return n
  if jax.default_backend() == "cpu":
    return 0
  return max(1, len(os.sched_getaffinity(0)) - 1)


def backbone_tag(config: ml_collections.ConfigDict, branch: str) -> str:
  """Store tag naming everything that changes a branch's representations."""
  b = config.backbones[branch]
  name = (
    os.path.basename(b.checkpoint.rstrip("/"))
    if b.checkpoint
    else (f"random_{b.variant.replace('/', '-')}_seed{config.seed}")
  )
  c = config.clips
  if branch == "audio":  # Random init: its front end's size too.
    if not b.checkpoint:
      name += f"_b{b.mel_bins}x{b.mel_frames}"
    chunks = "_chunks" if b.pooling == "chunks" else ""  # Window: as before.
    return (
      f"audio_{b.kind}_{name}_{c.segmentation}_fps{c.fps:g}"
      f"_fpc{c.frames_per_clip}_a{c.audio_seconds:g}s{chunks}"
    )
  pooling = config.backbones[branch].frame_pooling
  suffix = "_center" if pooling == "center" else ""  # Mean: as before.
  return (
    f"{branch}_{b.kind}_{name}_{c.segmentation}_fps{c.fps:g}"
    f"_fpc{c.frames_per_clip}_r{b.resolution}{suffix}"
  )


class FeatureFn:
  """uint8 clips [n, T, H, W, 3] -> float32 features [n, D] of one backbone
  (audio backbones: float32 log-mels [n, frames, bins], mean_std None).

  `fn(clips, batch_size)` runs all clips in fixed-size batches (one
  compiled program); `Batcher` streams clips of many trailers through
  `dispatch`. 2-D (image) kinds see every frame alone and average the
  pooled features over T (`frame_pooling='mean'`), or see only the centre
  frame T // 2 (`'center'`: the loader may then decode that frame alone).

  variables: {'params': ...} (and 'batch_stats' for BatchNorm backbones),
  or a bare params tree. mean_std: the input convention
  (backbone.input_stats). kind: the backbone's spec (or its kind name):
  2-D backbones (backbone.is_image_model) see frames.
  """

  def __init__(
    self,
    module,
    variables,
    kind: str,
    mean_std,
    frame_pooling="mean",
    encoded: bool = False,
  ):
    if frame_pooling not in FRAME_POOLINGS:
      raise ValueError(
        f"Unknown frame_pooling {frame_pooling!r}; {FRAME_POOLINGS}."
      )
    spec = kind if isinstance(kind, Mapping) else {"kind": kind, "model": {}}
    self.image = backbone.is_image_model(spec)
    self.audio = backbone.is_audio_model(spec)
    self.encoded = encoded  # Audio: the encoder frames [n, N, D], unpooled.
    self._spec = self.spec = spec
    self.center_frame = self.image and frame_pooling == "center"
    self.devices = jax.local_devices()
    mesh = Mesh(np.array(self.devices), ("data",))
    self.sharding = NamedSharding(mesh, PartitionSpec("data"))
    self.variables = jax.device_put(
      runtime.as_variables(variables), NamedSharding(mesh, PartitionSpec())
    )
    self.device_fn = jax.jit(self._features, in_shardings=(None, self.sharding))
    self._module, self._mean_std = module, mean_std

  def _features(self, variables, x):
    if self.audio:  # Log-mels, normalised by the front end.
      pooled, out = self._module.apply(variables, x)
      return (out["encoded"] if self.encoded else pooled).astype(jnp.float32)
    if self.center_frame:  # Host already cut it to 1 frame: index 0.
      x = video.center_frame(x)[:, 0]
    frames = None if self.image else runtime.clip_frames(self._spec, x.shape[1])
    if frames is not None:  # The clip model's own frame count.
      x = x[:, frames]
    x = runtime.normalize(x, *self._mean_std)
    if self.center_frame or not self.image:  # [n, H, W, 3] | [n, T, ...]
      pooled, _ = self._module.apply(variables, x)
      return pooled.astype(jnp.float32)
    n, t = x.shape[:2]  # Every frame alone, then the mean over the clip.
    pooled, _ = self._module.apply(variables, x.reshape(n * t, *x.shape[2:]))
    return pooled.reshape(n, t, -1).mean(axis=1).astype(jnp.float32)

  def prepare(self, clips: np.ndarray) -> np.ndarray:
    """What the device needs of uint8 clips: the centre frame alone for
    centre pooling (1/T of the bytes)."""
    if self.center_frame and clips.shape[1] > 1:
      return video.center_frame(clips)
    return clips

  def padded_size(self, batch_size: int) -> int:
    """Batch size rounded up to a multiple of the local devices."""
    return -(-batch_size // len(self.devices)) * len(self.devices)

  def dispatch(self, batch: np.ndarray) -> jax.Array:
    """Starts the features of a full uint8 batch; returns without waiting."""
    return self.device_fn(self.variables, jax.device_put(batch, self.sharding))

  def __call__(self, clips: np.ndarray, batch_size: int) -> np.ndarray:
    batcher = Batcher(self, batch_size)
    done = dict(batcher.add(0, clips) + batcher.flush())
    return done[0]


class Batcher:
  """Clips of consecutive trailers -> fixed-size batches -> per trailer.

  `add(key, clips)` queues a trailer's clips and dispatches every full
  batch; a batch may hold the end of one trailer and the start of the
  next. Results are fetched IN_FLIGHT batches late, so the device always
  has the next batch. Returns the (key, float32 [n, D]) of trailers whose
  features are complete; `flush()` pads and runs the last partial batch.
  """

  def __init__(self, fn: FeatureFn, batch_size: int):
    self.fn, self.size = fn, fn.padded_size(batch_size)
    self._queued = collections.deque()  # [key, clips, next row]
    self._num_queued = 0
    self._in_flight = collections.deque()  # (output, [(key, rows)])
    self._parts = {}  # key -> [feature arrays]
    self._missing = {}  # key -> rows not yet fetched

  def add(self, key, clips: np.ndarray) -> list:
    clips = self.fn.prepare(clips)
    self._missing[key], self._parts[key] = len(clips), []
    if len(clips):
      self._queued.append([key, clips, 0])
      self._num_queued += len(clips)
    done = [] if len(clips) else self._complete_empty(key, clips)
    while self._num_queued >= self.size:
      done += self._dispatch()
    return done

  def flush(self) -> list:
    done = self._dispatch() if self._num_queued else []
    while self._in_flight:
      done += self._fetch()
    return done

  def _dispatch(self) -> list:
    pieces, owners, need = [], [], self.size
    while need and self._queued:
      entry = self._queued[0]
      key, clips, start = entry
      part = clips[start : start + need]
      pieces.append(part)
      owners.append((key, len(part)))
      entry[2] += len(part)
      need -= len(part)
      if entry[2] == len(clips):
        self._queued.popleft()
    self._num_queued -= self.size - need
    if need:  # The last batch: zero rows keep the compiled shape.
      pad = np.zeros((need,) + pieces[0].shape[1:], pieces[0].dtype)
      pieces.append(pad)
    batch = np.concatenate(pieces) if len(pieces) > 1 else pieces[0]
    self._in_flight.append((self.fn.dispatch(batch), owners))
    return self._fetch() if len(self._in_flight) > IN_FLIGHT else []

  def _fetch(self) -> list:
    output, owners = self._in_flight.popleft()
    features, row, done = np.asarray(output), 0, []
    for key, rows in owners:
      self._parts[key].append(features[row : row + rows])
      row += rows
      self._missing[key] -= rows
      if not self._missing[key]:
        del self._missing[key]
        done.append((key, np.concatenate(self._parts.pop(key))))
    return done

  def _complete_empty(self, key, clips: np.ndarray) -> list:
    """A trailer without clips: float32 [0, D]."""
    shape = (self.size,) + clips.shape[1:]
    out = jax.eval_shape(
      self.fn.device_fn,
      self.fn.variables,
      jax.ShapeDtypeStruct(shape, clips.dtype),
    )
    del self._missing[key], self._parts[key]
    return [(key, np.zeros((0, out.shape[1]), np.float32))]


def branch_feature_fn(
  config: ml_collections.ConfigDict, branch: str, variables=None
):
  """The branch's backbone (runtime.make_backbone) as a FeatureFn; `variables`
  replace its starting weights (e.g. a fine-tuned run's)."""
  module, start, spec = runtime.make_backbone(config, branch)
  variables = start if variables is None else variables
  b = config.backbones[branch]
  if branch == "audio":
    chunks = b.pooling == "chunks"
    if chunks and spec["kind"] != "whisper":
      raise ValueError(
        f"backbones.audio.pooling='chunks' pools Whisper's encoder frames; "
        f"the audio backbone is {spec['kind']!r} (use pooling='window')."
      )
    return FeatureFn(module, variables, spec, None, encoded=chunks)
  return FeatureFn(
    module,
    variables,
    spec,
    backbone.input_stats(spec, b.normalization),
    b.frame_pooling,
  )


def _record_skipped(store_root: str, skipped: list[dict]) -> None:
  path = os.path.join(store_root, f"skipped_p{jax.process_index()}.json")
  previous = []
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
  by_id = {s["id"]: s for s in previous + skipped}
  records = sorted(by_id.values(), key=lambda s: s["id"])
  atomic.write_json(path, records, indent=1)


def extract(
  config: ml_collections.ConfigDict, source, ids: list[str], store_root: str
) -> dict[str, stores.NpyStore]:
  """Extracts the representations of every branch; returns the stores.

  Args:
    config: the run config (clips, backbones, model.branches, seed).
    source: random-access TFDS data source of the stored split `all`.
    ids: trailer ids in record order of `source`.
    store_root: root of the representation store.
  """
  branches = tuple(config.model.branches)
  out = {
    b: stores.NpyStore(store_root, backbone_tag(config, b)) for b in branches
  }
  # Before looking at this process's share: loading a converted checkpoint
  # ends in a barrier of all processes, also those with nothing left.
  feature_fns = {b: branch_feature_fn(config, b) for b in branches}
  todo = [
    i
    for i in hosts.process_shard(np.arange(len(ids)))
    if not all(out[b].has(ids[i]) for b in branches)
  ]
  logging.info(
    "Extraction: %d of %d trailers left for this process.", len(todo), len(ids)
  )
  if "audio" in branches:
    audio_todo = [i for i in todo if not out["audio"].has(ids[i])]
    fn, store = feature_fns["audio"], out["audio"]
    skipped = _extract_audio(config, source, audio_todo, fn, store)
    if skipped:
      _record_skipped(store_root, skipped)
  # Clips are decoded once per resolution and shared by branches using it.
  by_resolution = {}
  for b in (b for b in branches if b != "audio"):
    by_resolution.setdefault(config.backbones[b].resolution, []).append(b)
  for resolution, group in by_resolution.items():
    group_todo = [i for i in todo if not all(out[b].has(ids[i]) for b in group)]
    if group_todo:
      fns = {b: feature_fns[b] for b in group}
      skipped = _extract_group(config, source, group_todo, resolution, fns, out)
      if skipped:
        _record_skipped(store_root, skipped)
  return out


def _loader(config, source, todo, resolution, center_frame_only):
  decoding = extraction.Decoding(
    video.sample_kwargs(config.clips, resolution),
    center_frame_only,
    threads=int(config.extract.decode_threads),
    processes=decode_processes(config),
  )
  return extraction.clip_loader(source, np.asarray(todo, np.int64), decoding)


def _extract_group(config, source, todo, resolution, fns, out) -> list:
  """Branches `fns` of one input resolution: their clips are decoded once.
  Returns the skipped trailers ({'id', 'reason'})."""
  center = all(fn.center_frame for fn in fns.values())
  batchers = {
    b: Batcher(fn, config.backbones[b].batch_size) for b, fn in fns.items()
  }
  skipped, num_clips, start = [], 0, time.time()
  bar = tqdm(
    _loader(config, source, todo, resolution, center),
    total=len(todo),
    desc=f"extract r{resolution}",
    # Process 0 only; None: tqdm's own test, off when stderr is no terminal.
    disable=None if jax.process_index() == 0 else True,
    unit="trailer",
  )
  for item in bar:
    if "error" in item:
      logging.warning("Skipping %s: %s", item["id"], item["error"])
      skipped.append({"id": item["id"], "reason": item["error"]})
      continue
    for b, batcher in batchers.items():
      if not out[b].has(item["id"]):
        for tid, feats in batcher.add(item["id"], item["clips"]):
          out[b].write(tid, feats)  # [num_clips, D]
    num_clips += len(item["clips"])
    bar.set_postfix(clips_per_s=f"{num_clips / (time.time() - start):.1f}")
  for b, batcher in batchers.items():
    for tid, feats in batcher.flush():
      out[b].write(tid, feats)
  logging.info(
    "Extracted %d clips in %.1fs (%.1f clips/s); skipped %d.",
    num_clips,
    time.time() - start,
    num_clips / max(time.time() - start, 1e-9),
    len(skipped),
  )
  return skipped


def _extract_audio(config, source, todo, fn, store) -> list:
  """The audio branch of trailers `todo`; returns those skipped (video
  unreadable). Trailers heard as silence are logged and stored."""
  batcher = Batcher(fn, config.backbones.audio.batch_size)
  skipped, silent, num_clips, start = [], [], 0, time.time()
  windows = {}  # Trailer -> clip windows, until its outputs are back.
  clip = lambda key, out: extract_audio.clip_features(
    out, windows.pop(key), config, fn.spec
  )
  bar = tqdm(
    todo,
    desc="extract audio",
    disable=None if jax.process_index() == 0 else True,  # As above.
    unit="trailer",
  )
  for i in bar:
    record = source[int(i)]
    tid = common.as_str(record["id"])
    try:
      mels, windows[tid], silence = extract_audio.trailer_log_mels(
        record, config, fn.spec, tid
      )
    except video.VideoError as e:
      logging.warning("Skipping %s: %s", tid, e)
      skipped.append({"id": tid, "reason": str(e)})
      continue
    if silence:
      silent.append(tid)
      logging.warning("%s: audio branch hears silence (%s).", tid, silence)
    for key, out in batcher.add(tid, mels):
      store.write(key, clip(key, out))
    num_clips += len(windows[tid])
  for key, out in batcher.flush():
    store.write(key, clip(key, out))
  logging.info(
    "Audio: %d clips in %.1fs; %d trailers silent, %d skipped.",
    num_clips,
    time.time() - start,
    len(silent),
    len(skipped),
  )
  return skipped
