"""Frozen-backbone feature extraction into the representation store.

Every clip of every trailer goes through the image backbone (ViT per frame,
mean over the clip's frames) and the video backbone (ViViT per clip); each
trailer's [num_clips, D] array is written atomically to an `NpyStore` under
the branch's tag. Work is split across JAX processes (each takes its share of
trailers) and each process shards its clip batches over its local devices, so
no cross-process collective is needed. Trailers already in the store are
skipped, so a rerun resumes; trailers whose video fails are recorded in
`skipped_p<process>.json` beside the store and skipped.
"""

import json
import os
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from absl import logging
from jax.sharding import Mesh, NamedSharding, PartitionSpec
from tqdm import tqdm

from divita_jax import hosts, input_pipeline, reps, video
from divita_jax.models import backbone


def backbone_tag(config: ml_collections.ConfigDict, branch: str) -> str:
  """Store tag naming everything that changes a branch's representations."""
  b = config.backbones[branch]
  name = (
    os.path.basename(b.checkpoint.rstrip("/"))
    if b.checkpoint
    else (f"random_{b.variant.replace('/', '-')}_seed{config.seed}")
  )
  c = config.clips
  return (
    f"{branch}_{b.kind}_{name}_{c.segmentation}_fps{c.fps:g}"
    f"_fpc{c.frames_per_clip}_r{b.resolution}"
  )


def make_backbone(config: ml_collections.ConfigDict, branch: str):
  """(module, params, spec) from a converted checkpoint or random init."""
  b = config.backbones[branch]
  if b.checkpoint:  # Position embeddings resampled to the clips' size.
    frames = config.clips.frames_per_clip if b.kind == "vivit" else None
    return backbone.load_backbone(
      b.checkpoint, dtype=b.dtype, resolution=b.resolution, num_frames=frames
    )
  return backbone.create_backbone(
    b.kind,
    b.variant,
    resolution=b.resolution,
    num_frames=config.clips.frames_per_clip,
    tubelet=config.backbones.video.tubelet,
    dtype=b.dtype,
    seed=config.seed,
  )


def make_feature_fn(module, params, kind: str, mean_std):
  """uint8 clips [n, T, H, W, 3] -> float32 features [n, D], jitted.

  mean_std: the input convention (backbone.input_stats).
  """
  devices = jax.local_devices()
  mesh = Mesh(np.array(devices), ("data",))
  batch_sharding = NamedSharding(mesh, PartitionSpec("data"))
  params = jax.device_put(params, NamedSharding(mesh, PartitionSpec()))

  def features(params, x):
    n, t = x.shape[:2]
    if kind == "vit":  # Every frame alone, then the mean over the clip.
      pooled, _ = module.apply(
        {"params": params}, x.reshape(n * t, *x.shape[2:])
      )
      return pooled.reshape(n, t, -1).mean(axis=1).astype(jnp.float32)
    pooled, _ = module.apply({"params": params}, x)
    return pooled.astype(jnp.float32)

  jitted = jax.jit(features, in_shardings=(None, batch_sharding))

  def run(clips: np.ndarray, batch_size: int) -> np.ndarray:
    # A fixed batch shape (padded) keeps one compiled program.
    batch_size = -(-batch_size // len(devices)) * len(devices)
    outputs = []
    for start in range(0, len(clips), batch_size):
      chunk = video.normalize(clips[start : start + batch_size], *mean_std)
      pad = batch_size - len(chunk)
      if pad:
        chunk = np.concatenate(
          [chunk, np.zeros((pad,) + chunk.shape[1:], chunk.dtype)]
        )
      out = jitted(params, jax.device_put(chunk, batch_sharding))
      outputs.append(np.asarray(out)[: batch_size - pad])
    return np.concatenate(outputs)

  return run


def _record_skipped(store_root: str, skipped: list[dict]) -> None:
  path = os.path.join(store_root, f"skipped_p{jax.process_index()}.json")
  previous = []
  if os.path.exists(path):
    with open(path) as f:
      previous = json.load(f)
  by_id = {s["id"]: s for s in previous + skipped}
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(sorted(by_id.values(), key=lambda s: s["id"]), f, indent=1)
  os.replace(tmp, path)


def extract(
  config: ml_collections.ConfigDict, source, ids: list[str], store_root: str
) -> dict[str, reps.NpyStore]:
  """Extracts the representations of every branch; returns the stores.

  Args:
    config: the run config (clips, backbones, model.branches, seed).
    source: random-access TFDS data source of the stored split `all`.
    ids: trailer ids in record order of `source`.
    store_root: root of the representation store.
  """
  branches = tuple(config.model.branches)
  stores = {
    b: reps.NpyStore(store_root, backbone_tag(config, b)) for b in branches
  }
  todo = [
    i
    for i in hosts.process_shard(np.arange(len(ids)))
    if not all(stores[b].has(ids[i]) for b in branches)
  ]
  logging.info(
    "Extraction: %d of %d trailers left for this process.", len(todo), len(ids)
  )
  if not todo:
    return stores
  # Clips are decoded once per resolution and shared by branches using it.
  by_resolution = {}
  for b in branches:
    by_resolution.setdefault(config.backbones[b].resolution, []).append(b)
  feature_fns = {}
  for b in branches:
    module, params, spec = make_backbone(config, b)
    feature_fns[b] = make_feature_fn(
      module,
      params,
      config.backbones[b].kind,
      backbone.input_stats(spec, config.backbones[b].normalization),
    )
  for resolution, group in by_resolution.items():
    _extract_group(
      config,
      source,
      ids,
      todo,
      resolution,
      group,
      stores,
      feature_fns,
      store_root,
    )
  return stores


def _extract_group(
  config,
  source,
  ids,
  todo,
  resolution,
  branches,
  stores,
  feature_fns,
  store_root,
) -> None:
  clip_kwargs = video.sample_kwargs(config.clips, resolution)
  todo = [i for i in todo if not all(stores[b].has(ids[i]) for b in branches)]
  loader = input_pipeline.clip_loader(
    source, np.asarray(todo, np.int64), clip_kwargs=clip_kwargs
  )
  skipped, num_clips, start = [], 0, time.time()
  bar = tqdm(
    loader,
    total=len(todo),
    desc=f"extract r{resolution}",
    disable=jax.process_index() != 0,
    unit="trailer",
  )
  for item in bar:
    if "error" in item:
      logging.warning("Skipping %s: %s", item["id"], item["error"])
      skipped.append({"id": item["id"], "reason": item["error"]})
      continue
    for b in branches:
      feats = feature_fns[b](item["clips"], config.backbones[b].batch_size)
      stores[b].write(item["id"], feats)  # [num_clips, D]
    num_clips += len(item["clips"])
    bar.set_postfix(clips_per_s=f"{num_clips / (time.time() - start):.1f}")
  if skipped:
    _record_skipped(store_root, skipped)
  logging.info(
    "Extracted %d clips in %.1fs (%.1f clips/s); skipped %d.",
    num_clips,
    time.time() - start,
    num_clips / max(time.time() - start, 1e-9),
    len(skipped),
  )
