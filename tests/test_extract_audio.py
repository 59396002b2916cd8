"""The audio branch's clip features: per-clip windows and Whisper chunks."""

import numpy as np
import pytest

from divita_jax import audio, extract, extract_audio
from divita_jax.configs import divita
from tfds_trailers12k import synthetic


def _spec(hop_length=160, rate=16000):
  return {"front_end": {"hop_length": hop_length, "sampling_rate": rate}}


def test_pool_frames_takes_the_frames_in_each_window():
  """Encoder frames of 20 ms from time 0, across chunk boundaries; windows
  partly before the start or past the end keep the frames that exist."""
  encoded = np.arange(2 * 50 * 1, dtype=np.float32).reshape(2, 50, 1)
  windows = np.array(
    [[0.0, 0.1], [0.95, 1.05], [-0.5, 0.04], [1.9, 2.5], [0.5, 0.505]]
  )
  got = extract_audio.pool_frames(encoded, windows, _spec())[:, 0]
  # Frames 0-4; 47-52 (both chunks); 0-1; 95-99; 25 (shorter than a frame).
  want = [2.0, np.mean(range(47, 53)), 0.5, 97.0, 25.0]
  np.testing.assert_allclose(got, want)


def _trailer():
  cfg = synthetic.SyntheticConfig(num_trailers=2, min_seconds=3, max_seconds=3)
  t = synthetic.make_trailer(0, cfg, synthetic.sample_labels(cfg)[0])
  return {"video": t["video"], "shots": t["true_shots"]}


def test_whisper_chunks_encode_the_soundtrack_once_and_pool_each_clip():
  """`audio_only,whisper`: the trailer in 1-s chunks (the tiny random
  encoder's input) through the encoder once; each clip the mean of the
  encoder frames of its window, equal to encoding its chunk alone."""
  config = divita.get_config("audio_only,whisper")
  assert config.backbones.audio.pooling == "chunks"
  config.clips.audio_seconds = 0.5
  fn = extract.branch_feature_fn(config, "audio")
  record = _trailer()
  mels, windows, silence = extract_audio.trailer_log_mels(
    record, config, fn.spec, "t"
  )
  assert silence == "" and len(windows) >= 3
  assert len(mels) == audio.num_chunks(windows[:, 1].max(), fn.spec)
  assert mels.shape[1:] == (100, 32)
  feats = extract_audio.clip_features(fn(mels, 4), windows, config, fn.spec)
  assert feats.shape == (len(windows), 64)
  # A clip inside one chunk: that chunk's encoder frames, encoded alone.
  k = next(k for k, (a, b) in enumerate(windows) if int(a) == int(b) and a > 0)
  a, b = windows[k]
  _, out = fn._module.apply(fn.variables, mels[int(a)][None])
  lo, hi = int(np.floor((a % 1) / 0.02)), int(np.ceil((b % 1) / 0.02))
  mean = np.asarray(out["encoded"])[0, lo:hi].mean(0)
  np.testing.assert_allclose(feats[k], mean, rtol=1e-5, atol=1e-6)
  assert np.abs(feats - feats[k]).max() > 1e-3  # Clips differ.
  assert extract.backbone_tag(config, "audio").endswith("_a0.5s_chunks")


def test_chunks_need_whisper():
  config = divita.get_config("audio_only")
  config.backbones.audio.pooling = "chunks"
  with pytest.raises(ValueError, match="pools Whisper's encoder frames"):
    extract.branch_feature_fn(config, "audio")
