"""DIViTA head: parity with a PyTorch re-implementation, masking, shapes."""

import functools

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from divita_jax.configs.divita import get_config
from divita_jax.convert import __main__ as convert_cli
from divita_jax.convert import divita_torch
from divita_jax.convert.divita_torch import load_reference_branch
from divita_jax.models.divita import DIViTA, parse_cam
from divita_jax.references.divita_head import TorchHead

B, S, F = 4, 8, 12
LENGTHS = np.array([8, 6, 3, 8])  # Real clips per example, padding at end.
CAMS = ["tsfm_16_4_2_0.0", "savg", "gru_2_5", "conv_3_8_5_4"]

# ---------------------------------------------------------------------------
# The reference head's weights in our variables.


def t2j(t):
  return jnp.asarray(t.detach().numpy())


def reference_variables(head, cam, name="image"):
  sd = {k: v.numpy() for k, v in head.state_dict().items()}
  v = load_reference_branch(sd, cam)
  return {k: {name: v[k]} for k in ("params", "batch_stats")}


# ---------------------------------------------------------------------------
# Helpers.


def padded_batch(seed, s=S, lengths=LENGTHS, garbage=0.0):
  """Inputs {image, video} with padding after `lengths` real clips."""
  rng = np.random.default_rng(seed)
  mask = np.arange(s)[None, :] < lengths[:, None]
  inputs = {}
  for name, f in [("image", F), ("video", F // 2)]:
    x = rng.normal(1.0, 2.0, (len(lengths), s, f)).astype(np.float32)
    inputs[name] = np.where(mask[..., None], x, garbage * x)
  return inputs, mask


# Jitted (model is a hashable static argument): one compile per model and
# shape is much cheaper than eager op-by-op dispatch.
@functools.partial(jax.jit, static_argnums=0)
def init(model, inputs, mask):
  return nn.unbox(model.init(jax.random.key(0), inputs, mask, False))


@functools.partial(jax.jit, static_argnums=0)
def train_apply(model, variables, inputs, mask):
  return model.apply(
    variables,
    inputs,
    mask,
    True,
    rngs={"dropout": jax.random.key(1)},
    mutable=["batch_stats"],
  )


@functools.partial(jax.jit, static_argnums=0)
def eval_apply(model, variables, inputs, mask):
  return model.apply(variables, inputs, mask, False)


# ---------------------------------------------------------------------------
# Tests.


@pytest.mark.parametrize("cam", CAMS)
def test_parity_with_reference_zero_padding(cam):
  torch.manual_seed(0)
  head = TorchHead(F, cam)
  with torch.no_grad():  # Non-trivial BN state and affine parameters.
    head.bn.running_mean.uniform_(-1, 1)
    head.bn.running_var.uniform_(0.5, 2)
    head.bn.weight.uniform_(0.5, 1.5)
    head.bn.bias.uniform_(-0.5, 0.5)
  inputs, mask = padded_batch(0)
  x = torch.from_numpy(inputs["image"])  # Zero-padded, as the reference.
  model = DIViTA(branches=("image",), cam=cam, mask_padding=False)
  variables = reference_variables(head, cam)
  tol = dict(rtol=1e-5, atol=2e-5)

  head.eval()
  with torch.no_grad():
    want = head(x).numpy()
  got = eval_apply(model, variables, inputs, mask)
  np.testing.assert_allclose(got, want, **tol)

  head.train()  # Batch statistics; the tsfm variant has dropout 0.
  with torch.no_grad():
    want = head(x).numpy()
  got, upd = train_apply(model, variables, inputs, mask)
  np.testing.assert_allclose(got, want, **tol)
  bn = upd["batch_stats"]["image"]["bn"]
  np.testing.assert_allclose(bn["mean"], t2j(head.bn.running_mean), **tol)
  np.testing.assert_allclose(bn["var"], t2j(head.bn.running_var), **tol)


def test_late_fusion_averages_branch_logits():
  inputs, mask = padded_batch(1)
  model = DIViTA(cam="savg")
  variables = init(model, inputs, mask)
  got = eval_apply(model, variables, inputs, mask)
  singles = [
    DIViTA(branches=(b,), cam="savg").apply(
      {k: {b: v[b]} for k, v in variables.items()}, inputs, mask, False
    )
    for b in ("image", "video")
  ]
  np.testing.assert_allclose(got, (singles[0] + singles[1]) / 2, atol=1e-6)


@pytest.mark.parametrize("cam", CAMS)
def test_masked_padding_changes_nothing(cam):
  model = DIViTA(cam=cam, mask_padding=True)
  inputs, mask = padded_batch(2)
  # Same real clips, 5 more padded clips holding garbage.
  long_inputs, long_mask = padded_batch(2, s=S + 5, garbage=1e3)
  long_inputs = {
    k: np.concatenate([inputs[k], v[:, S:] + 7.0], 1)
    for k, v in long_inputs.items()
  }
  variables = init(model, inputs, mask)
  out, upd = train_apply(model, variables, inputs, mask)
  out_l, upd_l = train_apply(model, variables, long_inputs, long_mask)
  np.testing.assert_allclose(out_l, out, rtol=1e-5, atol=1e-5)
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    upd_l,
    upd,
  )
  # Eval: each padded example equals the same example alone, unpadded.
  variables = {**variables, **upd}
  out = eval_apply(model, variables, long_inputs, long_mask)
  for i in [1, 2]:
    n = LENGTHS[i]
    alone = {k: v[i : i + 1, :n] for k, v in inputs.items()}
    want = eval_apply(model, variables, alone, np.ones((1, n), bool))
    np.testing.assert_allclose(out[i : i + 1], want, rtol=1e-5, atol=1e-5)


def test_all_padding_example_is_finite_and_ignored():
  model = DIViTA(cam="tsfm_16_4_2_0.0")
  inputs, mask = padded_batch(3, lengths=np.array([8, 5, 0, 8]))
  variables = init(model, inputs, mask)
  out, upd = train_apply(model, variables, inputs, mask)
  assert np.all(np.isfinite(out))
  keep = np.array([0, 1, 3])
  sub = {k: v[keep] for k, v in inputs.items()}
  _, upd_sub = train_apply(model, variables, sub, mask[keep])
  jax.tree.map(
    lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6),
    upd,
    upd_sub,
  )


def test_tsfm_invariant_to_clip_order():
  model = DIViTA(cam="tsfm_16_4_2_0.25")
  inputs, mask = padded_batch(4)
  variables = init(model, inputs, mask)
  perm = np.random.default_rng(0).permutation(S)  # Moves padding too.
  shuffled = {k: v[:, perm] for k, v in inputs.items()}
  out = eval_apply(model, variables, inputs, mask)
  out_p = eval_apply(model, variables, shuffled, mask[:, perm])
  np.testing.assert_allclose(out_p, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cam", ["tsfm", "savg", "gru", "conv"])
def test_shapes_every_fusion_and_branch_set(cam):
  inputs, mask = padded_batch(5)
  for branches in [("image",), ("video",), ("image", "video")]:
    for fusion in ["late", "early"]:
      model = DIViTA(branches, fusion, cam, num_classes=3)
      # Tracing runs the real code; compiling 24 variants would be slow.
      boxed = jax.eval_shape(lambda x, m: init(model, x, m), inputs, mask)
      out, _ = jax.eval_shape(
        lambda v, x, m: train_apply(model, v, x, m), boxed, inputs, mask
      )
      assert out.shape == (B, 3) and out.dtype == jnp.float32
      names = list(boxed["params"])
      if fusion == "early" and len(branches) == 2:
        assert names == ["image_video"]
      else:
        assert names == list(branches)


def test_default_params_are_logically_partitioned():
  inputs, mask = padded_batch(6)
  model = DIViTA(branches=("image",))
  boxed = jax.jit(lambda x, m: model.init(jax.random.key(0), x, m, False))(
    inputs, mask
  )
  leaves = jax.tree.leaves(
    boxed, is_leaf=lambda x: isinstance(x, nn.LogicallyPartitioned)
  )
  assert all(isinstance(x, nn.LogicallyPartitioned) for x in leaves)
  rules = get_config().mesh.rules
  specs = nn.logical_to_mesh(nn.get_partition_spec(boxed), rules)
  block = specs["params"]["image"]["cam"]["block"]
  assert block["ff_in"]["kernel"] == jax.sharding.PartitionSpec(None, "model")
  assert block["attention"]["query"]["kernel"][1] == "model"
  # Reference sizes: F -> 128, ff 6 * 128, 4 heads, 10 classes.
  p = nn.unbox(boxed)["params"]["image"]
  assert p["cam"]["proj"]["kernel"].shape == (F, 128)
  assert p["cam"]["block"]["ff_in"]["kernel"].shape == (128, 768)
  assert p["head"]["kernel"].shape == (128, 10)
  # Boxed and unboxed variables give the same logits.
  np.testing.assert_array_equal(
    eval_apply(model, boxed, inputs, mask),
    eval_apply(model, nn.unbox(boxed), inputs, mask),
  )


def test_default_cams_shard_on_2x4_mesh():
  """Every default CAM's variables shard on a 2x4 mesh under the config's
  rules; the default tsfm's sharded forward equals the unsharded one."""
  inputs, mask = padded_batch(8)
  # Auto axes, as sharding.make_mesh builds them (jax.make_mesh is Explicit).
  devices = np.asarray(jax.devices()[:8]).reshape(2, 4)
  mesh = jax.sharding.Mesh(devices, ("data", "model"))
  rules = get_config().mesh.rules
  for cam in ["savg", "gru", "conv", "tsfm"]:
    model = DIViTA(cam=cam)
    init = lambda x, m: model.init(jax.random.key(0), x, m, False)
    abstract = jax.eval_shape(init, inputs, mask)
    shardings = nn.logical_to_mesh_sharding(
      nn.get_partition_spec(abstract), mesh, rules
    )
    # shard_shape raises when a mesh axis does not divide its dimension.
    jax.tree.map(
      lambda s, a: s.shard_shape(a.shape), shardings, nn.unbox(abstract)
    )
  variables = nn.unbox(jax.jit(init, out_shardings=shardings)(inputs, mask))
  block = variables["params"]["video"]["cam"]["block"]
  assert block["ff_in"]["kernel"].sharding.shard_shape((128, 768)) == (128, 192)
  want = eval_apply(model, jax.device_get(variables), inputs, mask)
  batch = jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec("data"))
  got = eval_apply(model, variables, *jax.device_put((inputs, mask), batch))
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_parse_cam():
  assert parse_cam("tsfm") == (
    "tsfm",
    dict(hidden=128, heads=4, ff_mult=6, dropout=0.25),
  )
  assert parse_cam("gru_2_64") == ("gru", dict(layers=2, hidden=64))
  assert parse_cam("conv") == ("conv", dict(layers=((3, 128),)))
  assert parse_cam("conv_3_64_5_32")[1]["layers"] == ((3, 64), (5, 32))
  assert parse_cam("savg") == ("savg", {})
  for bad in [
    "tsfm_128_4",
    "tsfm_a_4_6_0.1",
    "gru_1",
    "conv_3",
    "savg_2",
    "tsfm_",
  ]:
    with pytest.raises(ValueError, match=f"Invalid CAM '{bad}': expected"):
      parse_cam(bad)
  with pytest.raises(ValueError, match="not divisible"):
    parse_cam("tsfm_10_4_6_0.1")
  with pytest.raises(ValueError, match="Unknown CAM 'lstm'"):
    parse_cam("lstm")


def test_bad_inputs():
  inputs, mask = padded_batch(7)
  with pytest.raises(ValueError, match="lack branch"):
    DIViTA().init(jax.random.key(0), {"image": inputs["image"]}, mask, False)
  with pytest.raises(ValueError, match="Unknown fusion"):
    DIViTA(fusion="mid").init(jax.random.key(0), inputs, mask, False)
  with pytest.raises(ValueError, match="batch, clips, features"):
    DIViTA().init(jax.random.key(0), inputs, mask[:, :3], False)


def test_load_reference_branch_errors():
  torch.manual_seed(0)
  sd = {k: v.numpy() for k, v in TorchHead(F, "gru_1_6").state_dict().items()}
  with pytest.raises(ValueError, match="CAM .gru_1_7. expects"):
    load_reference_branch(sd, "gru_1_7")  # Hidden size differs.
  with pytest.raises(ValueError, match="missing.*cam.1.weight_ih_l1"):
    load_reference_branch(sd, "gru_2_6")
  with pytest.raises(ValueError, match="unexpected.*cam.1.weight_hh_l0"):
    load_reference_branch(sd, "savg")
  lightning = {f"model.{k}": v for k, v in sd.items()}
  v = load_reference_branch(lightning, "gru_1_6", prefix="model.")
  assert v["params"]["cam"]["layer_0"]["input_kernel"].shape == (F, 18)


def _randomized_head(f, cam, seed):
  torch.manual_seed(seed)
  head = TorchHead(f, cam).eval()
  with torch.no_grad():  # Running statistics a dropped conversion would miss.
    head.bn.running_mean.uniform_(-1, 1)
    head.bn.running_var.uniform_(0.5, 2)
    head.bn.weight.uniform_(0.5, 1.5)
    head.bn.bias.uniform_(-0.5, 0.5)
  return head


def test_convert_official_lightning_checkpoint(tmp_path):
  # An official late-fusion run: Lightning checkpoint, branches under
  # model.fnet. / model.vnet., the CAM string in its hyper-parameters.
  cam = "tsfm_16_4_2_0.1"
  heads = {"image": _randomized_head(F, cam, 0)}
  heads["video"] = _randomized_head(F // 2, cam, 1)
  prefix = {"image": "model.fnet.", "video": "model.vnet."}
  sd = {
    prefix[b] + k: v
    for b, h in heads.items()
    for k, v in h.state_dict().items()
  }
  ckpt = tmp_path / "epoch=7-step=80.ckpt"
  torch.save({"state_dict": sd, "hyper_parameters": {"cam": cam}}, ckpt)
  convert_cli.main(
    ["--source=divita_torch", f"--input={ckpt}", f"--output={tmp_path}/h"]
  )
  model, variables = divita_torch.load_head(str(tmp_path / "h"))
  assert model.branches == ("image", "video") and model.cam == cam
  assert not model.mask_padding  # The reference's zero-padded windows.
  inputs, mask = padded_batch(3)
  with torch.no_grad():
    want = np.mean(
      [heads[b](torch.from_numpy(inputs[b])).numpy() for b in heads], 0
    )
  got = eval_apply(model, variables, inputs, mask)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)


def test_convert_official_state_dict_needs_cam(tmp_path):
  head = _randomized_head(F, "gru_1_6", 2)
  sd = {f"model.net.{k}": v for k, v in head.state_dict().items()}
  torch.save(sd, tmp_path / "head.pt")
  args = ["--source=divita_torch", f"--input={tmp_path}/head.pt"]
  with pytest.raises(SystemExit, match="pass --cam"):
    convert_cli.main([*args, f"--output={tmp_path}/a"])
  convert_cli.main([*args, "--cam=gru_1_6", f"--output={tmp_path}/b"])
  model, variables = divita_torch.load_head(str(tmp_path / "b"))
  assert model.branches == ("image",)
  inputs, mask = padded_batch(4)
  with torch.no_grad():
    want = head(torch.from_numpy(inputs["image"])).numpy()
  got = eval_apply(model, variables, {"image": inputs["image"]}, mask)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)
  with pytest.raises(SystemExit, match="expects"):  # Wrong CAM size.
    convert_cli.main([*args, "--cam=gru_1_7", f"--output={tmp_path}/c"])
