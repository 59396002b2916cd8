"""Every check of a config's values, run before any work.

`check(config)` raises ConfigError, one line naming the field, its value
and what is allowed: `config.train.val_loss='foo': expected windows |
trailers`. Pure and cheap: no files (workdir.preflight checks those), no
dataset, no compilation. Given the device and process counts it also
checks the mesh and the batch sizes that must split over it.
"""

import math
import re

from divita_jax import sharding, video
from divita_jax.models import (
  ast,
  dinov2,
  dinov3,
  divita,
  r2plus1d,
  remat,
  resnet,
  shufflenet,
  siglip,
  swin,
  videoprism,
  vit,
  vjepa2,
  whisper,
)
from divita_jax.trainers import param_groups
from tfds_trailers12k import cut_rules, genres

DATASET_CONFIGS = ("synthetic", "raw", "reps")
DETECTORS = tuple(cut_rules.DEFAULT_THRESHOLDS)  # The detectors shots.py runs.
BRANCHES = ("image", "video", "audio")
AUDIO_KINDS = ("ast", "whisper")  # Random-init kinds of the audio branch.
AUDIO_POOLINGS = ("window", "chunks")
# Random-init kinds of models/backbone.create_backbone.
KINDS = (
  "vit",
  "vivit",
  "swin",
  "swin3d",
  "resnet",
  "shufflenet",
  "shufflenet3d",
  "r2plus1d",
  "siglip",
  "dinov2",
  "dinov3",
  "vjepa2",
  "videoprism",
)
# Patch-based kinds past the paper: the resolution is a multiple of the
# patch size (their position tables or rotary grids follow the input).
PATCH_KINDS = ("siglip", "dinov2", "dinov3", "vjepa2", "videoprism")
DTYPES = ("float32", "bfloat16", "auto")
FUSIONS = ("late", "early")
SCHEDULES = ("plateau", "cosine")
HEAD_BATCH_NORMS = ("batch", "running")
# Names from modules that take seconds to import (orbax, grain, the
# training loop); tests/test_checks.py pins these copies equal to them.
MODES = ("frozen", "finetune")  # trainers/loop.py
FRAME_POOLINGS = ("mean", "center")  # extract.py
NORMALIZATIONS = ("imagenet", "minus_one_one", "zero_one")  # backbone.py
VAL_LOSSES = ("windows", "trailers")  # evaluate.validation_loss
# The synthetic folds assign trailers in groups of 10 (7 train, 1
# validation, 2 test): fewer leave a fold without validation trailers.
MIN_SYNTHETIC_TRAILERS = 10


class ConfigError(ValueError):
  """A config value that cannot work; the message is one line."""


def check(config, num_devices: int | None = None, num_processes: int = 1):
  """Raises ConfigError for the first field that cannot work.

  num_devices: the devices of all processes; given, the mesh shape must
  use them all and the batch sizes must split over processes and mesh.
  """
  _check_run(config)
  _check_model(config)
  _check_dataset(config)
  _check_clips(config)
  for branch in config.backbones:
    _check_backbone(config, branch)
  if config.dataset.config != "reps":  # The official reps need none.
    for branch in config.model.branches:
      _check_variant(config, branch)
  _check_train(config)
  if config.train.mode == "finetune":
    _check_finetune(config)
  _check_mesh(config)
  if num_devices is not None:
    _check_batches(config, num_devices, num_processes)


# ------------------------------------------------------------------ helpers


def _fail(name: str, value, expected: str):
  raise ConfigError(f"config.{name}={value!r}: expected {expected}")


def _get(config, name: str):
  for key in name.split("."):
    config = config[key]
  return config


def _one_of(config, name: str, allowed) -> None:
  value = _get(config, name)
  if value not in allowed:
    _fail(name, value, " | ".join(allowed))


def _no_audio(config, where: str) -> None:
  """The audio branch is not built for `where`."""
  branches = tuple(config.model.branches)
  if "audio" in branches:
    _fail("model.branches", branches, f"image and/or video with {where}")


def _is_number(value) -> bool:
  return isinstance(value, (int, float)) and not isinstance(value, bool)


def _integers(config, low: int, *names: str) -> None:
  """Integer fields >= low."""
  for name in names:
    value = _get(config, name)
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
      _fail(name, value, f"an integer >= {low}")


def _at_least(config, low: float, *names: str) -> None:
  for name in names:
    value = _get(config, name)
    if not _is_number(value) or not value >= low:  # NaN fails too.
      _fail(name, value, f">= {low}")


def _positive(config, *names: str) -> None:
  for name in names:
    value = _get(config, name)
    if not _is_number(value) or not value > 0:
      _fail(name, value, "> 0")


def _fraction(config, name: str, low_open: bool = False) -> None:
  """0 <= value < 1, or 0 < value < 1 with low_open."""
  value = _get(config, name)
  low_ok = _is_number(value) and (value > 0 if low_open else value >= 0)
  if not low_ok or not value < 1:
    _fail(name, value, f"in {'(' if low_open else '['}0, 1)")


# ---------------------------------------------------------------- sections


def _check_run(config) -> None:
  _integers(config, 0, "seed")  # numpy seeds the synthetic data with it.
  folds = tuple(config.folds)
  known = set(folds) <= set(range(genres.NUM_FOLDS))
  if not folds or not known or len(set(folds)) < len(folds):
    _fail("folds", folds, "distinct folds of 0, 1, 2")
  _one_of(config, "train.mode", MODES)


def _check_dataset(config) -> None:
  d = config.dataset
  _one_of(config, "dataset.config", DATASET_CONFIGS)
  if config.train.mode == "finetune" and d.config == "reps":
    _fail(
      "dataset.config",
      d.config,
      "synthetic | raw with config.train.mode='finetune', which decodes "
      "trailers: the reps dataset has no videos",
    )
  if d.config in ("raw", "reps") and not d.manual_dir:
    _fail(
      "dataset.manual_dir",
      d.manual_dir,
      f"the folder of the {d.config} dataset's files (mtgc.csv + videos/ "
      "or zarr groups): set --config.dataset.manual_dir=DIR",
    )
  if d.config == "reps":  # The official groups replace the backbones.
    _no_audio(config, "the reps dataset (the official reps have no audio)")
    for b in config.model.branches:
      if not config.reps[f"zarr_{b}"]:
        _fail(f"reps.zarr_{b}", "", "a zarr group (under manual_dir)")
  if d.config == "synthetic":
    _integers(config, MIN_SYNTHETIC_TRAILERS, "dataset.num_trailers")
  _one_of(config, "dataset.detector", DETECTORS)
  _at_least(config, 0, "dataset.threshold", "dataset.reencode_fps")
  _integers(config, 1, "dataset.min_shot_len")
  _integers(
    config,
    0,
    "dataset.downscale",
    "dataset.max_flash_len",
    "dataset.reencode_height",
    "dataset.num_workers",
  )
  _beam_flags(config)


def _beam_flags(config) -> None:
  """dataset.beam_options: --name=value flags (tfds_trailers12k.beam)."""
  options = config.dataset.beam_options
  # Split as tfds_trailers12k.beam.pipeline_options does.
  flags = [f for f in re.split(r"[,\s]+(?=--)", options.strip()) if f]
  bad = [f for f in flags if not f.startswith("--")]
  if bad:
    _fail(
      "dataset.beam_options",
      options,
      f"Beam pipeline flags --name=value separated by commas ({bad[0]!r} "
      "is not one), or '' for the local build",
    )


def _check_clips(config) -> None:
  _one_of(config, "clips.segmentation", video.SEGMENTATIONS)
  _one_of(config, "clips.placement", video.PLACEMENTS)
  _integers(config, 1, "clips.frames_per_clip", "clips.max_clips_per_shot")
  _positive(config, "clips.fps")
  _integers(config, -1, "extract.decode_processes")  # -1 = auto.
  _integers(config, 1, "extract.decode_threads")


def _check_backbone(config, branch: str) -> None:
  name = f"backbones.{branch}"
  if branch == "audio":
    _one_of(config, f"{name}.kind", AUDIO_KINDS)  # Also names the store.
    _one_of(config, f"{name}.pooling", AUDIO_POOLINGS)
    a = config.backbones.audio
    if a.pooling == "chunks" and not a.checkpoint and a.kind != "whisper":
      _fail(f"{name}.pooling", a.pooling, "'window' for kind " + a.kind)
    _one_of(config, f"{name}.dtype", DTYPES)
    _integers(config, 1, f"{name}.mel_bins", f"{name}.mel_frames")
    if a.kind == "whisper" and a.mel_frames % whisper.STRIDE:
      _fail(f"{name}.mel_frames", a.mel_frames, "even for kind whisper")
    _integers(config, 1, f"{name}.batch_size")
    return
  _one_of(config, f"{name}.kind", KINDS)  # Also names the store.
  _one_of(config, f"{name}.normalization", ("", *NORMALIZATIONS))
  _one_of(config, f"{name}.frame_pooling", FRAME_POOLINGS)
  _one_of(config, f"{name}.dtype", DTYPES)
  _integers(config, 1, f"{name}.resolution", f"{name}.batch_size")
  if "tubelet" in config.backbones[branch]:
    _integers(config, 1, f"{name}.tubelet")


def model_fields(kind: str, variant: str) -> dict:
  """Module fields of a random-init variant, decoded as create_backbone
  does; ValueError names the variants of the kind."""
  if kind in ("vit", "vivit"):
    return vit.decode_variant(variant)
  if kind == "ast":
    return ast.decode_variant(variant)
  if kind == "whisper":
    return whisper.decode_variant(variant)
  if kind in ("swin", "swin3d"):
    return swin.decode_variant(variant, video=kind == "swin3d")
  if kind == "resnet":
    return resnet.decode_variant(variant)
  if kind == "r2plus1d":
    return r2plus1d.decode_variant(variant)
  if kind in PATCH_KINDS:
    family = {
      "siglip": siglip,
      "dinov2": dinov2,
      "dinov3": dinov3,
      "vjepa2": vjepa2,
      "videoprism": videoprism,
    }[kind]
    return family.decode_variant(variant)
  try:  # shufflenet, shufflenet3d: the width multiplier.
    width = float(variant)
  except ValueError:
    width = None  # Not a width: decode_variant's error lists them.
  return shufflenet.decode_variant(width, 3 if kind == "shufflenet3d" else 2)


def _check_variant(config, branch: str) -> None:
  """The random-init variant of a used branch, and the clip and image
  sizes it needs."""
  b = config.backbones[branch]
  if b.checkpoint:  # Its spec.json names its own model.
    return
  name = f"backbones.{branch}"
  try:
    model = model_fields(b.kind, b.variant)
  except ValueError as e:
    raise ConfigError(f"config.{name}.variant={b.variant!r}: {e}") from None
  if b.kind == "vit" and "tubelet" in model:
    _fail(f"{name}.variant", b.variant, "SIZE/PATCH: a ViT has no tubelet")
  patched = b.kind in ("vit", "vivit", *PATCH_KINDS)
  if patched and b.resolution % model["patch_size"]:
    _fail(
      f"{name}.resolution",
      b.resolution,
      f"a multiple of the patch size {model['patch_size']} of "
      f"config.{name}.variant={b.variant!r}",
    )
  tubelet = model.get("tubelet", config.backbones.video.tubelet)
  frames = config.clips.frames_per_clip
  if b.kind in ("vivit", "vjepa2") and frames % tubelet:
    _fail(
      "clips.frames_per_clip",
      frames,
      f"a multiple of the tubelet {tubelet} of the {branch} backbone",
    )


def _check_model(config) -> None:
  m = config.model
  branches = tuple(m.branches)
  distinct = len(set(branches)) == len(branches)
  if not branches or not distinct or not set(branches) <= set(BRANCHES):
    _fail("model.branches", branches, "image, video and/or audio, each once")
  _one_of(config, "model.fusion", FUSIONS)
  try:
    divita.parse_cam(m.cam)
  except ValueError as e:
    # parse_cam says "Invalid CAM 'x': <reason>"; the value is named here.
    reason = str(e).split(": ", 1)[-1]
    raise ConfigError(f"config.model.cam={m.cam!r}: {reason}") from None
  if m.num_classes != genres.NUM_GENRES:
    _fail(
      "model.num_classes",
      m.num_classes,
      f"{genres.NUM_GENRES} (the Trailers12k genres)",
    )


def _check_train(config) -> None:
  _one_of(config, "train.val_loss", VAL_LOSSES)
  counts = ("num_clips", "batch_size", "eval_batch_size", "max_epochs")
  counts += ("log_every_steps", "checkpoint_every_epochs")
  _integers(config, 1, *(f"train.{f}" for f in counts))
  patience = ("plateau_patience", "early_stop_patience")
  _integers(config, 0, *(f"train.{f}" for f in patience))
  reals = ("learning_rate", "weight_decay", "plateau_threshold")
  reals += ("grad_clip_norm",)  # 0 = no clipping.
  _at_least(config, 0, *(f"train.{f}" for f in reals))
  _positive(config, "train.eps")
  _fraction(config, "train.b1")
  _fraction(config, "train.b2")
  _fraction(config, "train.plateau_factor", low_open=True)  # lr x factor.


def _check_finetune(config) -> None:
  """Fine-tuning fields (ignored by the frozen protocol)."""
  f = "finetune."
  audio = config.backbones.audio
  if "audio" in config.model.branches and audio.pooling != "window":
    _fail("backbones.audio.pooling", audio.pooling, "'window' in fine-tuning")
  _one_of(config, f + "remat", tuple(remat.POLICIES))
  _one_of(config, f + "dtype", DTYPES)
  _one_of(config, f + "schedule", SCHEDULES)
  _one_of(config, f + "head_batch_norm", HEAD_BATCH_NORMS)
  _integers(
    config,
    1,
    f + "clips_per_trailer",
    f + "microbatches",
    f + "eval_microbatches",
    f + "decode_threads",
  )
  _integers(config, 0, f + "freeze_layers")
  _integers(config, -1, f + "decode_processes")  # -1 = auto.
  _at_least(config, 0, f + "backbone_lr_scale", f + "warmup_epochs")
  _positive(config, f + "layer_decay")
  for field in ("lr_mults", "wd_mults"):
    try:
      mults = param_groups.parse_mults(config.finetune[field], field)
    except ValueError as e:  # Its message names the field and the entry.
      raise ConfigError(str(e)) from None
    if not all(factor >= 0 for _, factor in mults):
      entries = tuple(config.finetune[field])
      _fail(f + field, entries, "'regex=factor' entries, factor >= 0")
  for pattern in config.finetune.freeze:
    try:
      re.compile(pattern)
    except (re.error, TypeError) as e:
      raise ConfigError(
        f"config.finetune.freeze pattern {pattern!r} is not a regex: {e}"
      ) from None
  augment = config.finetune.augment
  scale, ratio = tuple(augment.crop_scale), tuple(augment.crop_ratio)
  if len(scale) != 2 or not 0 < scale[0] <= scale[1] <= 1:
    _fail(f + "augment.crop_scale", scale, "(lo, hi) with 0 < lo <= hi <= 1")
  if len(ratio) != 2 or not 0 < ratio[0] <= ratio[1]:
    _fail(f + "augment.crop_ratio", ratio, "(lo, hi) with 0 < lo <= hi")


def _check_mesh(config) -> None:
  axes, shape = tuple(config.mesh.axes), tuple(config.mesh.shape)
  named = all(isinstance(a, str) and a for a in axes)
  if not axes or not named or len(set(axes)) < len(axes):
    _fail("mesh.axes", axes, "distinct axis names")
  if not set(axes) & set(sharding.BATCH_AXES):
    _fail("mesh.axes", axes, f"a batch axis: {' | '.join(sharding.BATCH_AXES)}")
  sizes_ok = all(isinstance(s, int) and (s == -1 or s >= 1) for s in shape)
  if len(shape) != len(axes) or not sizes_ok or shape.count(-1) > 1:
    _fail(
      "mesh.shape",
      shape,
      f"{len(axes)} sizes (one per config.mesh.axes), each >= 1 or one -1 "
      "(the devices left)",
    )
  for i, rule in enumerate(config.mesh.rules):
    rule = tuple(rule)
    if len(rule) != 2 or not isinstance(rule[0], str) or not rule[0]:
      _fail(f"mesh.rules[{i}]", rule, "(logical axis name, mesh axis)")
    if rule[1] is not None and rule[1] not in axes:
      _fail(
        f"mesh.rules[{i}]",
        rule,
        f"a mesh axis of {' | '.join(axes)} | None (replicated)",
      )


def _check_batches(config, num_devices: int, num_processes: int) -> None:
  """Batch sizes split over processes, then over the mesh's batch axes
  (x the micro-batches when fine-tuning: each device's rows split)."""
  axes, shape = tuple(config.mesh.axes), tuple(config.mesh.shape)
  try:
    shape = sharding.mesh_shape(shape, num_devices)
  except ValueError:
    _fail("mesh.shape", shape, f"sizes whose product is {num_devices} devices")
  sizes = dict(zip(axes, shape))
  batch_axes = [a for a in sharding.BATCH_AXES if a in sizes]
  rows = math.prod(sizes[a] for a in batch_axes)
  finetune = config.train.mode == "finetune"
  for name, micro in (
    ("batch_size", "microbatches"),
    ("eval_batch_size", "eval_microbatches"),
  ):
    size = config.train[name]
    k = config.finetune[micro] if finetune else 1
    multiple = math.lcm(num_processes, rows * k)
    if size % multiple:
      why = (
        f"divisible by the processes ({num_processes}); divisible by the "
        f"batch devices ({rows}: mesh axes {' x '.join(batch_axes)})"
      )
      if finetune:
        why += f" x config.finetune.{micro} ({k})"
      _fail(f"train.{name}", size, f"a multiple of {multiple}: {why}")
