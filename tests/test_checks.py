"""configs/checks.py: a bad config value is one line naming the field;
inputs.py: so is a dataset input that is missing or wrong."""

import json
import os
import shutil

import pytest

from divita_jax import evaluate, extract, inputs
from divita_jax.configs import checks, divita
from divita_jax.models import backbone
from divita_jax.trainers import loop
from tfds_trailers12k import dummy_data


def _config(variants="", **fields):
  c = divita.get_config(variants)
  if c.dataset.config != "synthetic":
    c.dataset.manual_dir = "/data"
  for name, value in fields.items():
    *path, key = name.split("__")
    node = c
    for part in path:
      node = node[part]
    node[key] = value
  return c


def bad(field, value, variants="", devices=None, **more):
  """A case: `field` (dotted) set to `value` fails, naming `field`."""
  fields = {field.replace(".", "__"): value, **more}
  return pytest.param(
    variants, fields, field, value, devices, id=f"{field}={value!r}"
  )


CASES = [
  bad("seed", -1),
  bad("folds", ()),
  bad("folds", (0, 0)),
  bad("folds", (0, 3)),
  # Dataset and shot detection.
  bad("dataset.config", "synth"),
  bad("dataset.manual_dir", "", "trailers12k"),
  bad("dataset.num_trailers", 9),
  bad("dataset.detector", "contnet"),
  bad("dataset.threshold", -1.0),
  bad("dataset.min_shot_len", 0),
  bad("dataset.downscale", -1),
  bad("dataset.max_flash_len", -1),
  bad("dataset.reencode_height", -1),
  bad("dataset.reencode_fps", -1.0),
  bad("dataset.num_workers", -1),
  bad("dataset.beam_options", "direct_num_workers=0"),
  bad("dataset.beam_options", "runner=FnApiRunner,--direct_num_workers=0"),
  bad("reps.zarr_video", "", "reps"),
  # Clips and extraction.
  bad("clips.segmentation", "shot"),
  bad("clips.placement", "middle"),
  bad("clips.frames_per_clip", 0),
  bad("clips.frames_per_clip", 7),  # The ViViT's tubelet is 2.
  bad("clips.fps", 0.0),
  bad("clips.max_clips_per_shot", 0),
  bad("extract.decode_processes", -2),
  bad("extract.decode_threads", 0),
  # Backbones.
  bad("backbones.image.kind", "vitt"),
  bad("backbones.video.normalization", "imagnet"),
  bad("backbones.image.frame_pooling", "max"),
  bad("backbones.video.dtype", "fp16"),
  bad("backbones.image.resolution", 0),
  bad("backbones.image.resolution", 36),  # Patch 8.
  bad("backbones.video.batch_size", 0),
  bad("backbones.video.tubelet", 0),
  bad("backbones.image.variant", "X/16"),
  bad("backbones.image.variant", "tiny/8x2"),  # A ViT has no tubelet.
  bad("backbones.video.variant", "huge", "swin"),
  bad("backbones.image.variant", "wide", "shufflenet"),
  bad("backbones.video.variant", "3.0", "shufflenet"),
  bad("backbones.image.variant", "resnet7", "resnet"),
  bad("backbones.video.variant", "r2plus1d_7", "resnet"),
  # Head.
  bad("model.branches", ()),
  bad("model.branches", ("image", "image")),
  bad("model.branches", ("sound",)),
  bad("backbones.audio.kind", "vit"),
  bad("backbones.audio.mel_frames", 0),
  bad("backbones.audio.pooling", "chunk", "audio"),
  bad("backbones.audio.pooling", "chunks", "audio"),  # AST: window only.
  bad("backbones.audio.mel_frames", 101, "audio,whisper"),  # Odd.
  bad("model.fusion", "mid"),
  bad("model.cam", "tsfm_x"),
  bad("model.cam", "tsfm_130_4_6_0.1"),  # Heads do not divide.
  bad("model.cam", "lstm"),
  bad("model.num_classes", 9),
  # Training.
  bad("train.mode", "finetun"),
  bad("train.val_loss", "foo"),
  bad("train.num_clips", 0),
  bad("train.batch_size", 0),
  bad("train.eval_batch_size", 0),
  bad("train.max_epochs", 0),
  bad("train.log_every_steps", 0),
  bad("train.checkpoint_every_epochs", 0),
  bad("train.plateau_patience", -1),
  bad("train.early_stop_patience", -1),
  bad("train.learning_rate", -1e-4),
  bad("train.weight_decay", -0.1),
  bad("train.plateau_threshold", -1.0),
  bad("train.eps", 0.0),
  bad("train.b1", 1.0),
  bad("train.b2", -0.1),
  bad("train.plateau_factor", 1.0),
  bad("train.plateau_factor", 0.0),
  bad("train.grad_clip_norm", -1.0),
  # Fine-tuning.
  bad("dataset.config", "reps", "finetune"),
  bad("model.branches", ("image", "audio"), "reps", dataset__manual_dir="/r"),
  bad("backbones.audio.pooling", "chunks", "finetune,audio,whisper"),
  bad("finetune.remat", "dot", "finetune"),
  bad("finetune.dtype", "half", "finetune"),
  bad("finetune.schedule", "cos", "finetune"),
  bad("finetune.head_batch_norm", "stats", "finetune"),
  bad("finetune.clips_per_trailer", 0, "finetune"),
  bad("finetune.microbatches", 0, "finetune"),
  bad("finetune.eval_microbatches", 0, "finetune"),
  bad("finetune.decode_threads", 0, "finetune"),
  bad("finetune.decode_processes", -2, "finetune"),
  bad("finetune.freeze_layers", -1, "finetune"),
  bad("finetune.backbone_lr_scale", -1.0, "finetune"),
  bad("finetune.warmup_epochs", -1.0, "finetune"),
  bad("finetune.layer_decay", 0.0, "finetune"),
  bad("finetune.freeze", ("video/(",), "finetune"),
  bad("finetune.lr_mults", ("encoder_norm",), "finetune"),
  bad("finetune.lr_mults", ("head/(=2",), "finetune"),
  bad("finetune.wd_mults", ("bias=-1",), "finetune"),
  bad("finetune.augment.crop_scale", (0.5, 1.5), "finetune"),
  bad("finetune.augment.crop_ratio", (0.0, 1.0), "finetune"),
  # Mesh, and the batch sizes on 8 devices.
  bad("mesh.axes", ("data", "data")),
  bad("mesh.axes", ("rows", "model")),  # No batch axis.
  bad("mesh.shape", (-1, -1)),
  bad("mesh.shape", (-1,)),
  bad("mesh.shape", (0, 1)),
  bad("mesh.rules", (("mlp", "modl"),)),
  bad("mesh.shape", (3, -1), devices=8),
  bad("train.batch_size", 12, devices=8),
  bad("train.eval_batch_size", 4, devices=8),
  bad("train.batch_size", 16, "finetune", 8, finetune__microbatches=4),
  bad("train.eval_batch_size", 8, "finetune", 8, finetune__eval_microbatches=2),
]


@pytest.mark.parametrize("variants,fields,field,value,devices", CASES)
def test_a_bad_value_is_one_line_naming_the_field(
  variants, fields, field, value, devices
):
  config = _config(variants, **fields)
  with pytest.raises(checks.ConfigError) as e:
    checks.check(config, devices)
  message = str(e.value)
  assert "\n" not in message
  assert message.startswith(f"config.{field}"), message
  named_entry = ("mesh.rules", "finetune.freeze", "finetune.lr_mults")
  if not field.startswith(named_entry):
    assert message.startswith(f"config.{field}={value!r}: "), message


def test_batch_sizes_split_over_the_processes():
  config = _config()
  checks.check(config, 8, 2)
  with pytest.raises(checks.ConfigError, match=r"processes \(3\)"):
    checks.check(config, 6, 3)  # 32 trailers over 3 processes.


# The presets alone, and the combinations the config's docstring and the
# README launch.
PRESETS = [
  "",
  "trailers12k",
  "reps",
  "vit",
  "swin",
  "shufflenet",
  "resnet",
  "image_only",
  "video_only",
  "early_fusion",
  "fixed_clips",
  "runlocal",
  "finetune",
  "trailers12k,swin",
  "trailers12k,shufflenet",
  "trailers12k,resnet",
  "trailers12k,swin,image_only",
  "trailers12k,swin,video_only",
  "trailers12k,swin,finetune",
  "fixed_clips,early_fusion",
  "swin,finetune",
  "shufflenet,finetune",
  "resnet,finetune",
  "runlocal,image_only,early_fusion",
]


@pytest.mark.parametrize("variants", PRESETS)
def test_every_preset_passes(variants):
  config = _config(variants)
  checks.check(config)
  checks.check(config, 8, 1)
  checks.check(config, 1, 1)


def test_copied_names_match_their_modules(monkeypatch):
  assert checks.MODES == tuple(loop.MODES)
  assert checks.FRAME_POOLINGS == extract.FRAME_POOLINGS
  assert checks.NORMALIZATIONS == tuple(backbone.NORMALIZATIONS)
  kinds = set(backbone.MODULES) - set(backbone.AUDIO_KINDS)
  assert set(checks.KINDS) == kinds | {"shufflenet3d"}
  monkeypatch.setattr(evaluate, "window_loss", lambda *a: 1.0)
  monkeypatch.setattr(evaluate, "trailer_loss", lambda *a: 2.0)
  config = _config()
  for name in checks.VAL_LOSSES:
    config.train.val_loss = name
    assert evaluate.validation_loss(config, {}, None, None) in (1.0, 2.0)


@pytest.mark.parametrize("pair", sorted(divita.TINY))
def test_variants_decode_as_create_backbone_does(pair):
  for kind, variant in divita.TINY[pair]:
    model = checks.model_fields(kind, variant)
    if kind == "vivit":  # The tubelet comes from the config.
      model.setdefault("tubelet", 2)
    assert backbone._random_model(kind, variant, 8, 2)[1] == model


# ------------------------------------------------------------------ inputs


@pytest.fixture(scope="module")
def reps_dir(tmp_path_factory):
  """mtgc.csv and the two official-layout zarr groups of 3 trailers."""
  root = str(tmp_path_factory.mktemp("reps"))
  dummy_data.write_reps(root, num=3, clips=(2, 3, 2))
  return root


def _input_config(kind: str, manual_dir: str):
  config = divita.get_config("reps" if kind == "reps" else "trailers12k")
  config.dataset.manual_dir = manual_dir
  return config


def _input_error(config, workdir) -> str:
  with pytest.raises(inputs.InputError) as e:
    inputs.check(config, str(workdir))
  message = str(e.value)
  assert "\n" not in message
  return message


def _copy(src: str, tmp_path) -> str:
  root = str(tmp_path / "manual")
  shutil.copytree(src, root)
  return root


def test_reps_inputs(reps_dir, tmp_path):
  inputs.check(_input_config("reps", reps_dir), str(tmp_path / "w"))
  root = _copy(reps_dir, tmp_path)
  config = _input_config("reps", root)
  # A group without num_features still tells its width by its arrays.
  os.remove(os.path.join(root, dummy_data.REPS_GROUPS[1], ".zattrs"))
  inputs.check(config, str(tmp_path / "w"))
  group = os.path.join(root, dummy_data.REPS_GROUPS[1])
  for name in os.listdir(group):
    if not name.startswith("."):
      shutil.rmtree(os.path.join(group, name))
  msg = _input_error(config, tmp_path / "w")
  assert f"{group!r} has no num_features attribute and no arrays" in msg
  os.remove(os.path.join(group, ".zgroup"))
  assert f"{group!r} is not a zarr group" in _input_error(config, tmp_path)
  shutil.rmtree(group)
  msg = _input_error(config, tmp_path)
  assert msg.startswith(f"config.reps.zarr_video {group!r} not found")
  os.remove(os.path.join(root, "mtgc.csv"))
  msg = _input_error(config, tmp_path)
  assert msg.startswith(f"{os.path.join(root, 'mtgc.csv')} not found")
  config.dataset.manual_dir = str(tmp_path / "nowhere")
  assert "is not a directory" in _input_error(config, tmp_path)


def test_raw_inputs(reps_dir, tmp_path):
  root = str(tmp_path / "manual")
  os.makedirs(root)
  shutil.copy(os.path.join(reps_dir, "mtgc.csv"), root)
  config = _input_config("raw", root)
  videos = os.path.join(root, "videos")
  msg = _input_error(config, tmp_path / "w")
  assert msg.startswith(f"{videos} not found: the raw dataset reads videos/")
  os.makedirs(videos)
  assert _input_error(config, tmp_path) == f"{videos} is empty: expected " + (
    "videos/<mid>.mp4 files."
  )
  open(os.path.join(videos, "trailer.mp4"), "wb").close()
  msg = _input_error(config, tmp_path)
  assert "holds no video of an id of mtgc.csv" in msg and "tt2000000" in msg
  open(os.path.join(videos, "tt2000001.mkv"), "wb").close()
  inputs.check(config, str(tmp_path / "w"))  # One of three: the build skips.
  # A dataset built in the data_dir needs its videos no more.
  shutil.rmtree(videos)
  built = tmp_path / "w" / "tfds" / "trailers12k" / "raw" / "1.1.0"
  built.mkdir(parents=True)
  (built / "dataset_info.json").write_text(json.dumps({}))
  inputs.check(config, str(tmp_path / "w"))
