"""DIViTA head: parity with a PyTorch re-implementation, masking, shapes."""

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from configs.divita import get_config
from divita_jax.models.divita import DIViTA, parse_cam

B, S, F = 4, 8, 12
LENGTHS = np.array([8, 5, 3, 8])  # Real clips per example, padding at end.
CAMS = ["tsfm_16_4_2_0.0", "savg", "gru_2_5", "conv_3_8_5_4"]

# ---------------------------------------------------------------------------
# PyTorch re-implementation of the reference head (input [B, S, F]).


class TorchAttention(torch.nn.Module):
  def __init__(self, h, heads):
    super().__init__()
    self.heads = heads
    self.q, self.k, self.v, self.o = (
      torch.nn.Linear(h, h, bias=False) for _ in range(4)
    )

  def forward(self, x):
    b, s, h = x.shape
    # Head-major split of the projected features.
    split = lambda t: t.view(b, s, self.heads, -1).movedim(1, 2)
    q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
    w = torch.softmax(q @ k.transpose(-1, -2) / (h // self.heads) ** 0.5, -1)
    return self.o((w @ v).movedim(1, 2).reshape(b, s, h))


class TorchHead(torch.nn.Module):
  def __init__(self, f, cam, classes=10):
    super().__init__()
    self.kind, kw = parse_cam(cam)
    self.bn = torch.nn.BatchNorm1d(f)
    if self.kind == "tsfm":
      h = kw["hidden"]
      self.proj = torch.nn.Linear(f, h)
      self.att = TorchAttention(h, kw["heads"])
      self.norm1, self.norm2 = torch.nn.LayerNorm(h), torch.nn.LayerNorm(h)
      self.ff = torch.nn.Sequential(
        torch.nn.Linear(h, kw["ff_mult"] * h),
        torch.nn.ReLU(),
        torch.nn.Linear(kw["ff_mult"] * h, h),
      )
    elif self.kind == "gru":
      h = kw["hidden"]
      self.gru = torch.nn.GRU(f, h, kw["layers"], batch_first=True)
    elif self.kind == "conv":
      convs, c = [], f
      for k, n in kw["layers"]:
        convs.append(torch.nn.Conv1d(c, n, k, 1, 1))
        c = h = n
      self.convs = torch.nn.ModuleList(convs)
    else:
      h = f
    self.cls = torch.nn.Linear(h, classes)

  def forward(self, x):
    x = self.bn(x.transpose(1, 2))  # [B, F, S]
    if self.kind == "tsfm":
      x = self.proj(x.transpose(1, 2))
      x = self.norm1(self.att(x) + x)
      x = self.norm2(self.ff(x) + x).mean(1)
    elif self.kind == "gru":
      x = torch.relu(self.gru(x.transpose(1, 2))[0]).mean(1)
    elif self.kind == "conv":
      for i, conv in enumerate(self.convs):
        x = torch.relu(conv(x))
        if i < len(self.convs) - 1:
          x = torch.nn.functional.avg_pool1d(x, 2, 2)
      x = x.mean(2)
    else:
      x = torch.relu(x.mean(2))
    return self.cls(x)


def t2j(t):
  return jnp.asarray(t.detach().numpy())


def torch_to_flax(head):
  """Flax params and batch_stats of one Branch from a TorchHead."""
  lin = lambda m: {"kernel": t2j(m.weight.T), "bias": t2j(m.bias)}
  p = {
    "bn": {"scale": t2j(head.bn.weight), "bias": t2j(head.bn.bias)},
    "head": lin(head.cls),
  }
  stats = {
    "bn": {"mean": t2j(head.bn.running_mean), "var": t2j(head.bn.running_var)}
  }
  if head.kind == "tsfm":
    a = head.att
    ln = lambda m: {"scale": t2j(m.weight), "bias": t2j(m.bias)}
    attention = {
      n: {"kernel": t2j(m.weight.T)}
      for n, m in zip(["query", "key", "value", "out"], [a.q, a.k, a.v, a.o])
    }
    p["cam"] = {
      "proj": lin(head.proj),
      "block": {
        "attention": attention,
        "norm1": ln(head.norm1),
        "norm2": ln(head.norm2),
        "ff_in": lin(head.ff[0]),
        "ff_out": lin(head.ff[2]),
      },
    }
  elif head.kind == "gru":
    g = lambda n: t2j(getattr(head.gru, n))
    p["cam"] = {
      f"layer_{i}": {
        "input_kernel": g(f"weight_ih_l{i}").T,
        "input_bias": g(f"bias_ih_l{i}"),
        "hidden_kernel": g(f"weight_hh_l{i}").T,
        "hidden_bias": g(f"bias_hh_l{i}"),
      }
      for i in range(head.gru.num_layers)
    }
  elif head.kind == "conv":
    p["cam"] = {
      f"conv_{i}": {
        "kernel": t2j(c.weight.permute(2, 1, 0)),
        "bias": t2j(c.bias),
      }
      for i, c in enumerate(head.convs)
    }
  return p, stats


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


def init(model, inputs, mask):
  v = model.init(jax.random.key(0), inputs, mask, False)
  return nn.unbox(v)


def train_apply(model, variables, inputs, mask):
  return model.apply(
    variables,
    inputs,
    mask,
    True,
    rngs={"dropout": jax.random.key(1)},
    mutable=["batch_stats"],
  )


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
  params, stats = torch_to_flax(head)
  model = DIViTA(branches=("image",), cam=cam, mask_padding=False)
  variables = {"params": {"image": params}, "batch_stats": {"image": stats}}
  tol = dict(rtol=1e-5, atol=2e-5)

  head.eval()
  with torch.no_grad():
    want = head(x).numpy()
  got = model.apply(variables, inputs, mask, False)
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
  got = model.apply(variables, inputs, mask, False)
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
  out = model.apply(variables, long_inputs, long_mask, False)
  for i, n in enumerate(LENGTHS):
    alone = {k: v[i : i + 1, :n] for k, v in inputs.items()}
    want = model.apply(variables, alone, np.ones((1, n), bool), False)
    np.testing.assert_allclose(out[i : i + 1], want, rtol=1e-5, atol=1e-5)


def test_all_padding_example_is_finite_and_ignored():
  model = DIViTA(cam="tsfm_16_4_2_0.25")
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
  out = model.apply(variables, inputs, mask, False)
  out_p = model.apply(variables, shuffled, mask[:, perm], False)
  np.testing.assert_allclose(out_p, out, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("cam", ["tsfm", "savg", "gru", "conv"])
def test_shapes_every_fusion_and_branch_set(cam):
  inputs, mask = padded_batch(5)
  for branches in [("image",), ("video",), ("image", "video")]:
    for fusion in ["late", "early"]:
      model = DIViTA(branches, fusion, cam, num_classes=3)
      boxed = model.init(jax.random.key(0), inputs, mask, False)
      out, _ = train_apply(model, nn.unbox(boxed), inputs, mask)
      assert out.shape == (B, 3) and out.dtype == jnp.float32
      names = list(boxed["params"])
      if fusion == "early" and len(branches) == 2:
        assert names == ["image_video"]
      else:
        assert names == list(branches)


def test_default_params_are_logically_partitioned():
  inputs, mask = padded_batch(6)
  model = DIViTA()
  boxed = model.init(jax.random.key(0), inputs, mask, False)
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
    model.apply(boxed, inputs, mask, False),
    model.apply(nn.unbox(boxed), inputs, mask, False),
  )


def test_parse_cam():
  assert parse_cam("tsfm") == (
    "tsfm",
    dict(hidden=128, heads=4, ff_mult=6, dropout=0.25),
  )
  assert parse_cam("gru_2_64") == ("gru", dict(layers=2, hidden=64))
  assert parse_cam("conv") == ("conv", dict(layers=((3, 128),)))
  assert parse_cam("conv_3_64_5_32")[1]["layers"] == ((3, 64), (5, 32))
  assert parse_cam("savg") == ("savg", {})
  for bad in ["tsfm_128_4", "tsfm_a_4_6_0.1", "gru_1", "conv_3", "savg_2"]:
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
