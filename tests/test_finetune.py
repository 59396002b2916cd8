"""End-to-end fine-tuning: sharding, remat, micro-batches, memory, a run."""

import functools
import json
import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import traverse_util

import tfds_trailers12k
from divita_jax import (
  audio,
  extract_audio,
  hosts,
  metrics,
  predict,
  report,
  run,
  sharding,
  workdir,
)
from divita_jax.configs import checks
from divita_jax.configs import divita as divita_config
from divita_jax.models import backbone, runtime
from divita_jax.pipelines import common
from divita_jax.trainers import checkpoints, finetune, loop, param_groups
from divita_jax.trainers import state as ts
from tests import kill_at
from tests.conftest import run_main
from tfds_trailers12k import genres, synthetic

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# (kind, variant, resolution): tiny clip backbones.
VIDEO = {
  "vivit": ("vivit", "tiny/8", 16),
  "swin3d": ("swin3d", "tiny", 32),
}
# Frame backbones, fine-tuned on every frame of the clip.
IMAGE = {"dinov3": ("dinov3", "tiny/8", 16)}  # Rotary, registers.
# Audio encoders on log-mels of 100 frames x 32 bins (the default sizes).
AUDIO = {"ast": ("ast", "tiny"), "whisper": ("whisper", "tiny")}


def _config(kind="vivit", shape=(-1, 1, 1), batch=8, **finetune_kw):
  c = divita_config.get_config("finetune")
  branch = "image" if kind in IMAGE else "audio" if kind in AUDIO else "video"
  c.model.branches = (branch,)
  c.model.cam = "tsfm_16_2_2_0.0"  # No dropout: steps comparable.
  b = c.backbones[branch]
  if branch == "audio":
    b.kind, b.variant = AUDIO[kind]
  else:
    b.kind, b.variant, b.resolution = {**VIDEO, **IMAGE}[kind]
  c.clips.frames_per_clip = 4
  c.finetune.clips_per_trailer = 2
  c.mesh.shape = shape
  c.train.batch_size = batch
  for k, v in finetune_kw.items():
    c.finetune[k] = v
  return c


def _mesh(c, num_devices=None):
  return sharding.make_mesh(c.mesh, jax.devices()[:num_devices])


def _batch(c, batch=8, seed=0):
  rng = np.random.default_rng(seed)
  n, t = c.finetune.clips_per_trailer, c.clips.frames_per_clip
  mask = np.ones((batch, n), bool)
  mask[::3, -1] = False  # Some padded clips.
  out = {
    "mask": mask,
    "labels": (rng.random((batch, 10)) < 0.3).astype(np.float32),
    "weight": np.ones(batch, np.float32),
  }
  for branch in c.model.branches:
    if branch == "audio":  # Log-mels: AST-normalised scale, about N(0, 1).
      a = c.backbones.audio
      size = (batch, n, a.mel_frames, a.mel_bins)
      out[branch] = rng.normal(size=size).astype(np.float32)
    else:
      r = c.backbones[branch].resolution
      size = (batch, n, t, r, r, 3)
      out[branch] = rng.integers(0, 256, size, dtype=np.uint8)
  return out


def _flat(tree) -> dict:
  return traverse_util.flatten_dict(jax.device_get(tree), sep="/")


def _assert_close(a: dict, b: dict, atol: float):
  a, b = _flat(a), _flat(b)
  assert a.keys() == b.keys()
  for k in a:
    np.testing.assert_allclose(a[k], b[k], atol=atol, rtol=0, err_msg=k)


# Whisper trains in test_audio_encoder_trains_or_stays_frozen (one device);
# Swin-3D's windows are sharded like ViViT's blocks here and cost ~70 s on
# 2 cores, so its remat, parity and layer ids tests cover it instead.
@pytest.mark.parametrize("kind", sorted({"vivit": 0, **IMAGE, "ast": 0}))
def test_sharded_step_equals_one_device(kind):
  lr = np.float32(1e-3)
  out = {}
  for shape, devices in (((2, 2, 2), 8), ((1, 1, 1), 1)):
    c = _config(kind, shape)
    # Some gradients are zero up to rounding (attention key biases, shifts
    # that BatchNorm removes); Adam's first step, g / (|g| + eps), would
    # blow their rounding noise up to +-lr with the default eps.
    c.train.eps = 1e-4
    mesh = _mesh(c, devices)
    p = finetune.programs(c, mesh)
    state = p.init(jax.random.PRNGKey(0))
    if devices == 8:  # Parameters really are split three ways.
      specs = {x.sharding.spec for x in jax.tree.leaves(state.params)}
      assert any("model" in s for s in specs), specs
      assert any("fsdp" in s for s in specs), specs
    state, m = p.train_step(state, hosts.global_batch(_batch(c), mesh), lr)
    out[devices] = (jax.device_get(state.params), float(m["loss"]))
  assert abs(out[8][1] - out[1][1]) < 1e-5
  _assert_close(out[8][0], out[1][0], atol=1e-5)


def _grads(c, batch):
  c.mesh.shape = (1, 1, 1)  # One device: these compile fastest.
  mesh = _mesh(c, 1)
  p = finetune.programs(c, mesh)
  state = p.init(jax.random.PRNGKey(0))
  fn = jax.jit(functools.partial(finetune.loss_and_grads, p.model))
  loss, grads, _ = fn(state, hosts.global_batch(batch, mesh))
  return float(loss), grads


def test_remat_gives_the_same_gradients():
  batch = _batch(_config())
  # Every policy on every backbone: test_remat.py; here through the step.
  loss, grads = _grads(_config(remat="none"), batch)
  loss_r, grads_r = _grads(_config(remat="full"), batch)
  assert abs(loss - loss_r) < 1e-6
  _assert_close(grads, grads_r, atol=1e-6)


def test_microbatches_equal_one_big_batch():
  # Running head statistics: an example's loss doesn't depend on its batch.
  big = _batch(_config(), batch=16, seed=1)
  loss, grads = _grads(_config(batch=16, head_batch_norm="running"), big)
  loss4, grads4 = _grads(
    _config(batch=16, head_batch_norm="running", microbatches=4), big
  )
  assert abs(loss - loss4) < 1e-5
  _assert_close(grads, grads4, atol=1e-5)


def test_fsdp_shards_parameters_and_optimizer_state():
  per_device = {}
  for shape in ((8, 1, 1), (1, 8, 1)):  # Replicated, then fsdp = 8.
    c = _config(shape=shape)
    mesh = _mesh(c)
    p = finetune.programs(c, mesh)
    bs = sharding.batch_sharding(mesh)
    batch = {
      k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=bs)
      for k, v in _batch(c).items()
    }
    compiled = p.train_step.lower(p.abstract, batch, np.float32(1)).compile()
    # The donated arguments: parameters and optimizer state (and step, rng).
    per_device[shape] = compiled.memory_analysis().alias_size_in_bytes
  ratio = per_device[(1, 8, 1)] / per_device[(8, 1, 1)]
  print(f"state bytes per device: {per_device}, fsdp/replicated {ratio:.3f}")
  assert ratio <= 1 / 6


def test_param_groups_freeze_and_layer_decay():
  c = _config()
  c.finetune.freeze = ("video/cls",)
  c.finetune.freeze_layers = 2  # Stem and the first block.
  c.finetune.layer_decay = 0.5
  c.finetune.backbone_lr_scale = 0.1
  _, variables, _ = runtime.make_backbone(c, "video")
  params = {"head": {"w": np.zeros(2)}, "video": variables["params"]}
  frozen, scale, decay = param_groups.param_groups(c, params)
  assert "video/embedding/kernel" in frozen
  assert "video/cls" in frozen
  assert any("encoderblock_0/" in n for n in frozen)
  assert not any("encoderblock_1/" in n for n in frozen)
  assert scale["head/w"] == 1.0
  # Two blocks (layers 1, 2), the final norm is layer 3.
  block = [v for k, v in scale.items() if "encoderblock_1/" in k]
  assert set(block) == {0.1 * 0.5}
  assert scale["video/Transformer/encoder_norm/scale"] == 0.1
  assert set(decay.values()) == {1.0}
  c.finetune.freeze = ("video/no_such_layer",)
  with pytest.raises(ValueError, match="no_such_layer"):
    param_groups.param_groups(c, params)


def test_lr_and_weight_decay_multipliers_by_regex_and_clipping():
  c = _config()
  c.finetune.backbone_lr_scale = 0.1
  c.finetune.lr_mults = ("encoder_norm=3",)
  c.finetune.wd_mults = ("bias|scale=0",)
  params = {
    "head": {"w": jnp.ones(2), "bias": jnp.ones(2)},
    "video": {"Transformer": {"encoder_norm": {"scale": jnp.ones(2)}}},
  }
  _, scale, decay = param_groups.param_groups(c, params)
  assert scale["video/Transformer/encoder_norm/scale"] == pytest.approx(0.3)
  assert scale["head/w"] == 1.0
  assert decay == {
    "head/w": 1.0,
    "head/bias": 0.0,
    "video/Transformer/encoder_norm/scale": 0.0,
  }
  c.train.weight_decay, c.train.learning_rate = 0.5, 1.0
  tx = param_groups.make_optimizer(c, scale, decay)
  zero = jax.tree.map(jnp.zeros_like, params)
  updates, _ = tx.update(zero, tx.init(params), params)
  # Zero gradients: only the decay moves a parameter, -lr x wd x mult.
  np.testing.assert_allclose(updates["head"]["w"], -0.5)
  np.testing.assert_allclose(updates["head"]["bias"], 0.0)
  c.train.grad_clip_norm = 1e-3  # Clipped first: Adam's step is scale-free,
  c.train.weight_decay = 0.0  # so compare the clipped moments' input.
  tx = param_groups.make_optimizer(c)
  big = jax.tree.map(lambda x: 100.0 * x, params)
  state = tx.init(params)
  _, state = tx.update(big, state, params)
  mu = state.inner_state[1].mu
  norm = optax.global_norm(jax.tree.map(lambda m: m / (1 - c.train.b1), mu))
  assert norm == pytest.approx(1e-3, rel=1e-4)
  for bad in (("no_factor",), ("x=abc",), ("[=2",)):
    c.finetune.lr_mults = bad
    with pytest.raises(ValueError, match="lr_mults"):
      param_groups.param_groups(c, params)


# ------------------------------------------------- the synthetic end to end

RUN_FLAGS = (
  "--config=configs/divita.py:finetune,runlocal",
  "--config.folds=(0,)",
  "--config.train.max_epochs=3",
  "--config.finetune.clips_per_trailer=4",
  "--config.finetune.freeze_layers=1",  # Stems stay as initialised.
)


def _launch(workdir, data_dir="", *extra):
  flags = [*RUN_FLAGS, f"--workdir={workdir}", *extra]
  if data_dir:
    flags.append(f"--config.dataset.data_dir={data_dir}")
  return subprocess.Popen(
    [sys.executable, "-m", "divita_jax.main", *flags],
    cwd=ROOT,
    stdout=subprocess.PIPE,
    stderr=subprocess.STDOUT,
    text=True,
  )


def _finish(proc, timeout=900) -> str:
  out, _ = proc.communicate(timeout=timeout)
  assert proc.returncode == 0, out[-5000:]
  return out


@pytest.fixture(scope="module")
def finetuned(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("finetune"))
  _finish(_launch(workdir))
  return workdir


def _run_config(variant="finetune,runlocal"):
  c = divita_config.get_config(variant)
  c.train.max_epochs = 3
  c.finetune.clips_per_trailer = 4
  c.finetune.freeze_layers = 1
  return c


def _best(workdir, c=None):
  c = c or _run_config()
  mesh = sharding.make_mesh(c.mesh)
  abstract = ts.variables_of(finetune.programs(c, mesh).abstract)
  variables, _ = checkpoints.load_best(
    os.path.join(workdir, "fold0"), lambda _: abstract
  )
  return c, jax.device_get(variables)


@pytest.mark.xdist_group("finetune")
def test_finetuning_learns_and_keeps_frozen_layers(finetuned):
  with open(os.path.join(finetuned, "results", "fold0.json")) as f:
    test = json.load(f)["test"]
  # The label-frequency baseline on the same test trailers.
  probs = np.loadtxt(
    os.path.join(finetuned, "results", "fold0_test_probs.csv"),
    delimiter=",",
    skiprows=1,
    usecols=range(1, 11),
  )
  c = _run_config()
  builder = tfds_trailers12k.build(
    "synthetic", os.path.join(finetuned, "tfds"), None, **run.dataset_kwargs(c)
  )
  index = tfds_trailers12k.load_index(builder)
  split = index["split_assignment"]
  labels = index["labels"]
  test_rows = tfds_trailers12k.subset_indices(split, 0, "test")
  train_rows = tfds_trailers12k.subset_indices(split, 0, "train")
  freq = labels[train_rows].mean(0)
  base = metrics.compute_metrics(
    np.tile(freq, (len(test_rows), 1)), labels[test_rows]
  )
  assert len(probs) == len(test_rows)
  print(f"test muAP {test['uap']:.3f}, label-frequency {base['uap']:.3f}")
  assert test["uap"] > base["uap"] + 0.15
  c, variables = _best(finetuned)
  assert _moved_above_stems(c, variables["params"]) > 10


def _moved_above_stems(c, params, branches=None) -> int:
  """Frozen stems (layer 0) are bit for bit the initial weights; returns
  how many of the other backbone parameters moved."""
  trained = _flat(params)
  moved = 0
  for b in branches or c.model.branches:
    _, start, _ = runtime.make_backbone(c, b)
    ids, _ = param_groups.layer_ids(start["params"])
    ids = _flat(ids)
    for name, x in _flat(start["params"]).items():
      if ids[name] == 0:
        np.testing.assert_array_equal(x, trained[f"{b}/{name}"], err_msg=name)
      else:
        moved += not np.array_equal(x, trained[f"{b}/{name}"])
  return moved


@pytest.mark.xdist_group("finetune")
def test_finetuning_with_the_audio_branch_end_to_end(
  finetuned, tmp_path, capsys
):
  """audio_only, one epoch on the fixture's data: results written, the
  audio encoder trained above its stem, `predict` (extraction's audio
  path) gives the evaluation's probabilities (pixels and log-mels in one
  step: test_audio_clips_as_extraction_computes_them)."""
  workdir = str(tmp_path / "audio")
  flags = [f for f in RUN_FLAGS if not f.startswith("--config=")]
  run_main(
    "--config=configs/divita.py:finetune,runlocal,audio_only",
    *flags,
    "--config.train.max_epochs=1",
    f"--config.dataset.data_dir={os.path.join(finetuned, 'tfds')}",
    f"--workdir={workdir}",
  )
  with open(os.path.join(workdir, "results", "fold0.json")) as f:
    test = json.load(f)["test"]
  assert 0 < test["uap"] <= 1
  c = _run_config("finetune,runlocal,audio_only")
  c.train.max_epochs = 1
  _, variables = _best(workdir, c)
  assert _moved_above_stems(c, variables["params"], ("audio",)) > 10
  _predict_equals_evaluation(workdir, finetuned, tmp_path, capsys)


@pytest.mark.xdist_group("finetune")
def test_kill_9_mid_epoch_then_resume_is_bitwise_equal(finetuned, tmp_path):
  workdir = str(tmp_path / "killed")
  data_dir = os.path.join(finetuned, "tfds")  # Built already.
  # Every step's line (--verbosity=1: the fold loop's INFO lines).
  flags = ("--config.train.log_every_steps=1", "--verbosity=1")
  proc = _launch(workdir, data_dir, *flags)
  kill_at.kill_at_step(proc, seed=0)  # Mid epoch 2, after a checkpoint.
  assert "resuming at step" in _finish(_launch(workdir, data_dir))
  _, resumed = _best(workdir)
  _, whole = _best(finetuned)
  a, b = _flat(resumed), _flat(whole)
  assert a.keys() == b.keys()
  for k in a:  # Bitwise: same devices, same order of operations.
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)


@pytest.mark.xdist_group("finetune")
def test_predict_uses_the_finetuned_backbones(finetuned, tmp_path, capsys):
  _predict_equals_evaluation(finetuned, finetuned, tmp_path, capsys)


def _predict_equals_evaluation(workdir, data_workdir, tmp_path, capsys):
  """`predict` on two test trailers of `data_workdir`'s dataset gives
  the probabilities of `workdir`'s evaluation."""
  c = _run_config()
  builder = tfds_trailers12k.build(
    "synthetic",
    os.path.join(data_workdir, "tfds"),
    None,
    **run.dataset_kwargs(c),
  )
  source = tfds_trailers12k.data_source(builder)
  index = tfds_trailers12k.load_index(builder)
  test = tfds_trailers12k.subset_indices(index["split_assignment"], 0, "test")
  paths = []
  for i in test[:2]:
    data = source[int(i)]["video"]
    data = data.item() if isinstance(data, np.ndarray) else data
    paths.append(str(tmp_path / f"{index['ids'][i]}.mp4"))
    with open(paths[-1], "wb") as f:
      f.write(data)
  assert predict.main([f"--workdir={workdir}", "--json", *paths]) == 0
  out = json.loads(capsys.readouterr().out)
  ids, probs = report.read_predictions(
    os.path.join(workdir, "results", "fold0_test_probs.csv")
  )
  evaluated = dict(zip(ids, probs))
  for o in out:
    got = [o["genres"][g] for g in genres.GENRES]
    np.testing.assert_allclose(got, evaluated[o["id"]], atol=1e-5, rtol=0)


def test_bad_finetune_settings_fail_before_any_work(tmp_path):
  cases = {
    ("train", "mode", "finetun"): "config.train.mode='finetun'",
    ("finetune", "remat", "dot"): "config.finetune.remat='dot'",
    ("finetune", "schedule", "cos"): "config.finetune.schedule='cos'",
    ("finetune", "microbatches", 3): "divisible by the batch devices",
    ("finetune", "freeze", ("video/(",)): "is not a regex",
    ("dataset", "config", "reps"): "has no videos",
  }
  for (section, field, value), message in cases.items():
    c = _config()
    c[section][field] = value
    if section == "dataset":
      c.dataset.manual_dir = str(tmp_path)
    with pytest.raises(checks.ConfigError, match=re.escape(message)):
      workdir.preflight(c, str(tmp_path / "run"))
  assert not os.path.exists(tmp_path / "run")


def test_warmup_cosine_schedule():
  c = _config()
  c.train.learning_rate, c.train.max_epochs = 1.0, 4
  c.finetune.schedule, c.finetune.warmup_epochs = "cosine", 1.0
  host = loop.HostState(plateau={"lr": 0.5})
  lrs = [finetune.learning_rate(c, host, s, 10) for s in range(40)]
  np.testing.assert_allclose(lrs[:10], np.arange(1, 11) / 10)  # Warmup.
  assert lrs[10] == 1.0 and lrs[25] == pytest.approx(0.5)
  assert all(a > b for a, b in zip(lrs[10:], lrs[11:])) and lrs[-1] < 0.01
  c.finetune.schedule = "plateau"  # The frozen protocol's, from the host.
  assert finetune.learning_rate(c, host, 3, 10) == 0.5


def test_swin_patch_merging_follows_its_stage_blocks():
  _, _, spec = runtime.make_backbone(_config("swin3d"), "video")
  module = backbone.module_from_spec(spec)
  ids, num = param_groups.layer_ids(backbone.abstract_params(module, spec))
  ids = _flat(ids)
  layer = lambda prefix: {v for k, v in ids.items() if k.startswith(prefix)}
  assert layer("stage_0/block_0/") == {1}
  assert layer("stage_0/downsample/") == {2}  # After the stage's one block.
  assert layer("stage_1/block_0/") == {3}
  assert layer("patch_embed/") == {0} and layer("norm/") == {num + 1}


@pytest.mark.parametrize("kind", sorted(AUDIO))
def test_audio_encoders_layer_ids(kind):
  c = _config(kind)
  _, variables, _ = runtime.make_backbone(c, "audio")
  ids, num = param_groups.layer_ids(variables["params"])
  ids = _flat(ids)
  assert num == 2  # The tiny encoders' two blocks.
  stem = {k for k, v in ids.items() if v == 0}
  want = {"ast": "cls|cls_distillation|embedding", "whisper": "stem_conv."}
  assert all(
    re.fullmatch(f"({want[kind]})(/.*)?|Transformer/posembed_input/.*", k)
    for k in stem
  ), stem
  assert len(stem) >= 3
  for i in range(num):
    block = {v for k, v in ids.items() if f"encoderblock_{i}/" in k}
    assert block == {i + 1}
  assert {v for k, v in ids.items() if "encoder_norm" in k} == {num + 1}
  c.finetune.freeze_layers = 1  # The stem: as for every other kind.
  params = {"head": {"w": np.zeros(2)}, "audio": variables["params"]}
  frozen, _, _ = param_groups.param_groups(c, params)
  assert frozen == {f"audio/{k}" for k in stem}


def _sources(num=4, silent=1):
  """`num` short synthetic trailers (records as the TFDS source has them);
  the last `silent` re-encoded without their soundtrack."""
  cfg = synthetic.SyntheticConfig(
    num_trailers=num, min_seconds=3, max_seconds=4
  )
  labels = synthetic.sample_labels(cfg)
  out = []
  for i in range(num):
    t = synthetic.make_trailer(i, cfg, labels[i])
    if i >= num - silent:
      frames = synthetic.render_frames(i, cfg, labels[i])[0]
      t["video"] = synthetic._encode(frames, cfg.fps)
    out.append({"id": t["id"], "video": t["video"], "shots": t["true_shots"]})
  ids = [r["id"] for r in out]
  return out, ids, labels.astype(np.float32)


def test_audio_clips_as_extraction_computes_them():
  c = _config("vivit")
  c.model.branches = ("video", "audio")
  c.finetune.augment.flip = False  # Frames are not checked here.
  source, ids, labels = _sources()
  fold = common.FoldData(
    ids, labels, {"train": np.arange(4), "validation": np.arange(4)}
  )
  c.mesh.shape = (1, 1, 1)
  mesh = _mesh(c, 1)
  setup = finetune.fold_setup(c, mesh, source, fold)
  spec = setup.programs.model.specs["audio"]
  assert spec["front_end"]["type"] == "kaldi_fbank"
  want = [  # What extraction feeds the frozen encoder.
    extract_audio.trailer_log_mels(r, c, spec, i)[0]
    for r, i in zip(source, ids)
  ]
  silence = audio.log_mel(np.zeros(16000, np.float32), spec)  # 1 s.
  assert all(len(w) >= 2 for w in want)
  np.testing.assert_array_equal(
    want[-1], np.broadcast_to(silence, want[-1].shape)
  )
  assert np.abs(want[0] - silence).max() > 1.0
  # Evaluation: one window of every clip per trailer, as extracted.
  (batch,) = [setup.eval_data("validation").dataset[0]]
  assert batch["audio"].dtype == np.float32
  for row, pos in enumerate(batch["trailer"]):
    if pos < 0:
      assert not batch["audio"][row].any()
      continue
    n = len(want[pos])
    np.testing.assert_array_equal(batch["audio"][row, :n], want[pos])
    assert not batch["audio"][row, n:].any()
    assert batch["video"][row, :n].any()  # No sound, still the frames.
  # Training: the random window of clips_per_trailer clips (of step 0),
  # its log-mels those of the same clips in extraction up to the noise
  # that a seek into the AAC stream redraws in noise-substituted bands
  # (audio.py; wrong windows here are >= 0.07 off on average).
  train = setup.train.dataset[0]
  b, k = c.train.batch_size, c.finetune.clips_per_trailer
  assert train["audio"].shape == (b, k, 100, 32) and train["weight"].all()
  order = common.epoch_order(c.seed, 0, 4, b)
  for row, pos in enumerate(order):
    np.testing.assert_array_equal(train["labels"][row], labels[pos])
    n = min(k, len(want[pos]))
    s = common.random_start((c.seed, 0), pos, len(want[pos]), k)
    got, ref = train["audio"][row, :n], want[pos][s : s + n]
    assert np.abs(got - ref).mean() < 0.02, np.abs(got - ref).mean()
    if pos == 3:  # Silence is silence, seek or not.
      np.testing.assert_array_equal(got, ref)
  # The decoded batch trains both encoders in one step.
  p = setup.programs
  state = p.init(jax.random.PRNGKey(0))
  start = {k: np.array(v) for k, v in _flat(state.params).items()}
  state, m = p.train_step(
    state, hosts.global_batch(train, mesh), np.float32(1e-3)
  )
  assert np.isfinite(float(m["loss"]))
  end = _flat(state.params)
  for top in ("audio", "video"):
    names = [k for k in start if k.startswith(top + "/")]
    assert sum(not np.array_equal(start[k], end[k]) for k in names) > 10


def test_audio_encoder_trains_or_stays_frozen():
  lr = np.float32(1e-3)
  moved = {}
  for freeze in ((), ("^audio/",)):  # Not "audio/": head/audio/... too.
    c = _config("whisper", shape=(1, 1, 1), freeze=freeze)
    mesh = _mesh(c, 1)
    p = finetune.programs(c, mesh)
    state = p.init(jax.random.PRNGKey(0))
    # Copies: the step donates the state's buffers.
    start = {k: np.array(v) for k, v in _flat(state.params).items()}
    state, m = p.train_step(state, hosts.global_batch(_batch(c), mesh), lr)
    assert np.isfinite(float(m["loss"]))
    end = _flat(state.params)
    for top in ("audio", "head"):
      names = [k for k in start if k.startswith(top + "/")]
      changed = [not np.array_equal(start[k], end[k]) for k in names]
      moved[freeze, top] = sum(changed) / len(names)
  # Trained: all but the attention key biases (zero gradient, Whisper's
  # key has none).
  assert moved[(), "audio"] > 0.9 and moved[(), "head"] > 0.9, moved
  # Frozen: bit for bit (no gradient, no optimizer state); the head trains.
  assert moved[("^audio/",), "audio"] == 0, moved
  assert moved[("^audio/",), "head"] > 0.9, moved


def test_audio_chunks_pooling_is_refused_in_finetuning():
  c = _config("whisper", shape=(1, 1, 1))
  c.backbones.audio.pooling = "chunks"
  with pytest.raises(ValueError, match="pooling='chunks' is not built"):
    finetune.programs(c, _mesh(c, 1))


def test_frozen_workdirs_of_older_versions_still_resume():
  new = divita_config.get_config()
  old = new.to_dict()
  del old["train"]["mode"], old["finetune"]  # config.json before the mode.
  assert workdir.config_differences(old, new) == []
  other = divita_config.get_config()
  other.finetune.remat = "full"  # Unused in frozen mode.
  assert workdir.config_differences(new, other) == []
  diffs = workdir.config_differences(new, divita_config.get_config("finetune"))
  assert "train.mode: 'frozen' -> 'finetune'" in diffs


def test_eval_microbatches_give_the_same_outputs():
  batch = _batch(_config())
  del batch["weight"]
  batch["trailer"] = np.arange(8, dtype=np.int32)
  outs = []
  for k in (1, 4):
    c = _config(shape=(1, 1, 1), eval_microbatches=k)
    mesh = _mesh(c, 1)
    p = finetune.programs(c, mesh)
    state = p.init(jax.random.PRNGKey(0))
    out = p.eval_step(ts.variables_of(state), hosts.global_batch(batch, mesh))
    outs.append(jax.device_get(out))
  np.testing.assert_array_equal(outs[0]["trailer"], outs[1]["trailer"])
  np.testing.assert_allclose(outs[0]["probs"], outs[1]["probs"], atol=1e-6)
