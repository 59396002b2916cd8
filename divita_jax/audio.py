"""Audio per clip: streamed PyAV decoding and the checkpoints' front ends.

`load_audio(video, start_s, end_s)` -> float32 [N] mono samples at `rate`
(16 kHz) of the file's first audio stream over [start_s, end_s). Times are
seconds on the same timeline as divita_jax/video.py's clips: t = 0 is the
video stream's start (the first displayed frame), or the audio stream's
start in a file without video. Samples outside the audio stream are zeros.

Streaming: the demuxer seeks to the packet before start_s - MARGIN_S and
decodes until end_s + MARGIN_S; only the span's 16-kHz samples are kept.
The first decoded frame is trimmed to an input sample on the resampling
phase grid of a decode from the stream start (a multiple of in_rate /
gcd(in_rate, rate) input samples), so `av.AudioResampler` produces the
same output samples as when it resamples the whole stream; the margin
covers the resampler's warm-up (17 samples at 44.1 -> 16 kHz) and the AAC
decoder's (the overlap of the frame before the seek point).
What a seek cannot reproduce: AAC's perceptual noise substitution (PNS,
on by default in FFmpeg's AAC encoder) draws noise from a generator whose
state depends on every frame decoded since the stream start, so in noise-
substituted bands samples after a seek differ from a full decode (same
spectral envelope, other noise); a span within MARGIN_S of the start is
decoded without seeking and is exact. tests/test_audio.py pins both.

`log_mel(samples, spec)` -> float32 [frames, bins]: the front end
recorded in a converted audio checkpoint's spec["front_end"], in numpy
(float64 inside): AST's Kaldi filter bank (ASTFeatureExtractor) or
Whisper's log-mel spectrogram (WhisperFeatureExtractor), each equal to
the transformers extractor (tests: within 1e-4 on real audio).
"""

import fractions
import functools
import io
import math
import os

import av
import numpy as np

# Decoded before start_s and after end_s: resampler and AAC warm-up.
MARGIN_S = 0.25


class AudioError(ValueError):
  """An audio stream that cannot be read; names the file and why."""

  def __init__(self, name: str, reason: str):
    super().__init__(f"{name}: {reason}")
    self.name = name
    self.reason = reason


class NoAudio(AudioError):
  """The file has no audio stream (callers may use silence instead)."""


def _open(video, name: str):
  if isinstance(video, np.ndarray):  # A TFDS object scalar of bytes.
    video = video.item()
  if isinstance(video, (bytes, bytearray, memoryview)):
    video = io.BytesIO(video)
  try:
    return av.open(video, metadata_errors="ignore")
  except (av.FFmpegError, OSError) as e:
    raise AudioError(name, f"cannot open the file: {e}") from e


def _name(video, name) -> str:
  if name:
    return name
  if isinstance(video, (str, os.PathLike)):
    return os.fspath(video)
  return "<in-memory video>"


def _seconds(stream) -> float:
  if stream.start_time is None:
    return 0.0
  return float(stream.start_time * stream.time_base)


def load_audio(
  video, start_s: float, end_s: float, rate: int = 16000, *, name: str = ""
) -> np.ndarray:
  """Mono float32 [round(end_s * rate) - round(start_s * rate)] samples of
  the first audio stream over [start_s, end_s), zeros outside it.

  video: a path, encoded bytes, or a TFDS object scalar of bytes. name:
  for messages (default: the path). Raises NoAudio for a file without an
  audio stream, AudioError for one that cannot be opened or decoded.
  """
  name = _name(video, name)
  if not end_s > start_s:
    raise ValueError(f"{name}: empty span [{start_s}, {end_s}).")
  first, last = round(start_s * rate), round(end_s * rate)
  out = np.zeros(last - first, np.float32)
  with _open(video, name) as container:
    if not container.streams.audio:
      raise NoAudio(name, "no audio stream")
    stream = container.streams.audio[0]
    origin = _seconds((container.streams.video or [stream])[0])
    # Output sample 0 of the resampled stream is at audio time `delay`.
    delay = _seconds(stream) - origin
    lo = start_s - delay - MARGIN_S
    hi = end_s - delay + MARGIN_S
    try:
      _decode_span(container, stream, rate, lo, hi, out, first, delay)
    except av.FFmpegError as e:
      raise AudioError(name, f"audio decoding failed: {e}") from e
  return out


def _decode_span(container, stream, rate, lo, hi, out, first, delay):
  """Decodes stream seconds [lo, hi) (since the stream start), resamples
  and writes the output samples that fall in `out` (out[0] = sample
  `first` on the video timeline)."""
  in_rate = stream.codec_context.sample_rate
  step = in_rate // math.gcd(in_rate, rate)  # Input samples per phase.
  begin = max(0, math.floor(lo * in_rate / step) * step)
  start_pts = stream.start_time or 0
  tb = stream.time_base
  per_tick = tb * in_rate  # input samples per pts tick (1 in mp4 audio)
  if begin > 0:
    container.seek(start_pts + int(begin / in_rate / tb), stream=stream)
  resampler = av.AudioResampler(format="flt", layout="mono", rate=rate)
  offset = round(delay * rate) - first  # Output pts -> index in out.
  started = False
  for frame in container.decode(stream):
    if frame.pts is None:
      continue
    j = frame.pts - start_pts  # Input sample index.
    if per_tick != 1:
      j = round(j * per_tick)
    if not started:
      frame, j = _trim(frame, j, begin, step)
      if frame is None:
        continue
      started = True
    frame.pts, frame.time_base = j, fractions.Fraction(1, in_rate)
    for piece in resampler.resample(frame):
      _place(piece, out, offset)
    if j / in_rate >= hi:
      return
  for piece in resampler.resample(None):  # End of stream: the tail.
    _place(piece, out, offset)


def _trim(frame, j, begin, step):
  """(frame starting at the first input sample >= max(begin, j) on the
  phase grid, its index), or (None, j) when the frame ends before it."""
  at = max(begin, -(-j // step) * step)
  if at >= j + frame.samples:
    return None, j
  if at == j:
    return frame, j
  samples = frame.to_ndarray()
  if frame.format.is_planar:
    samples = samples[:, at - j :]
  else:  # Packed: [1, samples * channels].
    samples = samples[:, (at - j) * len(frame.layout.channels) :]
  trimmed = av.AudioFrame.from_ndarray(
    np.ascontiguousarray(samples),
    format=frame.format.name,
    layout=frame.layout.name,
  )
  trimmed.sample_rate = frame.sample_rate
  return trimmed, at


def _place(piece, out, offset):
  """Writes a resampled frame at its pts (gaps stay zero)."""
  data = piece.to_ndarray().reshape(-1)
  i = piece.pts + offset
  lo, hi = max(i, 0), min(i + len(data), len(out))
  if hi > lo:
    out[lo:hi] = data[lo - i : hi - i]


# ---------------------------------------------------------------------------
# Front ends.


def clip_windows(
  times: np.ndarray, frame_indices: np.ndarray, duration: float, seconds: float
) -> np.ndarray:
  """Audio span of each clip: float64 [N, 2] (start_s, end_s).

  The window rule: `seconds` of audio centred on the middle of the clip's
  frames (from its first frame's time to the end of its last), whatever
  the shot's length, so every clip's audio is the same length; parts
  outside the soundtrack are zeros (load_audio). seconds <= 0: the clip's
  own span. times: VideoIndex.times; frame_indices [N, T] (plan_clips).
  """
  times = np.asarray(times, np.float64)
  ends = np.append(times[1:], duration)  # Each frame shows until the next.
  first = times[frame_indices[:, 0]]
  last = ends[frame_indices[:, -1]]
  if seconds <= 0:
    return np.stack([first, np.maximum(last, first + 1e-3)], axis=1)
  mid = (first + last) / 2
  return np.stack([mid - seconds / 2, mid + seconds / 2], axis=1)


def clip_log_mels(video, windows: np.ndarray, spec, *, name: str = ""):
  """float32 [N, frames, bins]: the front end of each window's audio.

  A file without an audio stream gives silence (its features are those of
  zeros) and `has_audio` False: (features, has_audio).
  """
  rate = int(spec["front_end"]["sampling_rate"])
  windows = np.asarray(windows, np.float64)
  # One decoding pass over the span of all windows, then each window's
  # slice: the samples load_audio gives for the window alone (the output
  # grid is absolute), without a seek and a resampler per clip.
  lo, hi = windows[:, 0].min(), windows[:, 1].max()
  try:
    whole = load_audio(video, lo, hi, rate, name=name)
  except NoAudio:
    return silent_log_mels(windows, spec), False
  first = round(lo * rate)
  cut = [(round(a * rate) - first, round(b * rate) - first) for a, b in windows]
  return np.stack([log_mel(whole[i:j], spec) for i, j in cut]), True


def num_chunks(end_s: float, spec) -> int:
  """Front-end inputs (Whisper: 30-s chunks) covering [0, end_s)."""
  fe = spec["front_end"]
  samples = round(end_s * int(fe["sampling_rate"]))
  return max(1, math.ceil(samples / int(fe["n_samples"])))


def chunk_log_mels(video, end_s: float, spec, *, name: str = ""):
  """The soundtrack from 0 to `end_s` in consecutive front-end inputs
  (Whisper: 30-s chunks, the last zero-padded): float32 [C, frames, bins]
  with C = num_chunks(end_s), and has_audio (False: silence)."""
  fe = spec["front_end"]
  rate, size = int(fe["sampling_rate"]), int(fe["n_samples"])
  count = num_chunks(end_s, spec)
  try:
    whole = load_audio(video, 0.0, count * size / rate, rate, name=name)
  except NoAudio:
    return silent_chunk_log_mels(count, spec), False
  chunks = whole.reshape(count, size)
  return np.stack([log_mel(x, spec) for x in chunks]), True


def silent_chunk_log_mels(count: int, spec) -> np.ndarray:
  """`count` chunks of silence: [count, frames, bins]."""
  size = int(spec["front_end"]["n_samples"])
  return np.repeat(log_mel(np.zeros(size, np.float32), spec)[None], count, 0)


def silent_log_mels(windows: np.ndarray, spec) -> np.ndarray:
  """The front end of silence over each window: [N, frames, bins]."""
  rate = int(spec["front_end"]["sampling_rate"])
  sizes = [round(b * rate) - round(a * rate) for a, b in windows]
  return np.stack([log_mel(np.zeros(n, np.float32), spec) for n in sizes])


def log_mel(samples, spec) -> np.ndarray:
  """float32 [frames, bins] features of mono samples at the front end's
  sampling rate, as the checkpoint's transformers feature extractor.

  spec: a converted audio checkpoint's spec (its "front_end" entry).
  AST: num_frames (1024) frames, padded / truncated. Whisper: one chunk of
  n_samples (30 s; longer input is truncated as the extractor does, so
  encode a trailer chunk by chunk).
  """
  fe = spec["front_end"]
  x = np.asarray(samples, np.float32).reshape(-1)
  if fe["type"] == "kaldi_fbank":
    return kaldi_fbank(x, fe)
  if fe["type"] == "whisper_log_mel":
    return whisper_log_mel(x, fe)
  raise ValueError(f"Unknown front end {fe['type']!r}.")


def window(name: str, length: int) -> np.ndarray:
  """hann (symmetric), hann_periodic (torch.hann_window) or povey."""
  n = np.arange(length)
  if name == "hann_periodic":
    return 0.5 - 0.5 * np.cos(2 * np.pi * n / length)
  hann = 0.5 - 0.5 * np.cos(2 * np.pi * n / (length - 1))
  if name == "hann":
    return hann
  if name == "povey":
    return hann**0.85
  raise ValueError(f"Unknown window {name!r}; hann | hann_periodic | povey.")


def hz_to_mel(f, scale: str):
  """Kaldi: 1127 ln(1 + f / 700); Slaney: linear to 1 kHz, then log."""
  f = np.asarray(f, np.float64)
  if scale == "kaldi":
    return 1127.0 * np.log1p(f / 700.0)
  if scale == "htk":
    return 2595.0 * np.log10(1.0 + f / 700.0)
  if scale != "slaney":
    raise ValueError(f"Unknown mel scale {scale!r}; kaldi | htk | slaney.")
  step = 27.0 / np.log(6.4)  # mels per log-Hz above 1 kHz
  lin = 3.0 * f / 200.0
  return np.where(
    f >= 1000.0, 15.0 + np.log(np.maximum(f, 1e-9) / 1e3) * step, lin
  )


def mel_to_hz(m, scale: str):
  m = np.asarray(m, np.float64)
  if scale == "kaldi":
    return 700.0 * np.expm1(m / 1127.0)
  if scale == "htk":
    return 700.0 * (10.0 ** (m / 2595.0) - 1.0)
  lin = 200.0 * m / 3.0
  return np.where(m >= 15.0, 1e3 * np.exp((m - 15.0) * np.log(6.4) / 27.0), lin)


def _triangles(x, edges):
  """[len(x), len(edges) - 2] triangles over points x with corners edges."""
  left, center, right = edges[:-2], edges[1:-1], edges[2:]
  up = (x[:, None] - left) / (center - left)
  down = (right - x[:, None]) / (right - center)
  return np.maximum(0.0, np.minimum(up, down))


@functools.lru_cache(maxsize=16)
def mel_filters(
  num_bins, num_mels, sampling_rate, low, high, scale, norm, in_mel_space
):
  """[num_bins, num_mels] triangular filters over the rfft bins 0..sr/2.

  in_mel_space: triangles linear in mel (Kaldi), else in Hz (librosa /
  Whisper). norm 'slaney': each filter divided by half its Hz width.
  """
  mels = np.linspace(
    hz_to_mel(low, scale), hz_to_mel(high, scale), num_mels + 2
  )
  freqs = np.linspace(0.0, sampling_rate / 2, num_bins)
  if in_mel_space:
    bank = _triangles(hz_to_mel(freqs, scale), mels)
  else:
    bank = _triangles(freqs, mel_to_hz(mels, scale))
  if norm == "slaney":
    hz = mel_to_hz(mels, scale)
    bank = bank * (2.0 / (hz[2:] - hz[:-2]))
  elif norm is not None:
    raise ValueError(f"Unknown mel norm {norm!r}; slaney | None.")
  return bank


def _frames(x, length, hop):
  """[n, length] strided view of the frames starting every hop samples."""
  if len(x) < length:
    return np.zeros((0, length))
  view = np.lib.stride_tricks.sliding_window_view(x, length)
  return view[::hop]


def kaldi_fbank(x, fe) -> np.ndarray:
  """AST's Kaldi log-mel filter bank ([num_frames, num_mel_bins]).

  Frames of frame_length every hop_length samples (snip edges), minus
  their mean, pre-emphasis (the first sample against itself), window,
  |rfft(fft_length)|^2, mel filters, log with mel_floor; zero frames pad
  to num_frames, then (x - mean) / (2 std). In float32, as the extractor
  (torchaudio) computes it.
  """
  n = fe["num_frames"]  # Frames past num_frames are dropped anyway.
  length, hop = fe["frame_length"], fe["hop_length"]
  x = np.asarray(x, np.float32)[: (n - 1) * hop + length]
  frames = _frames(x, length, hop).astype(np.float32)  # A copy.
  if fe["remove_dc_offset"]:
    frames -= frames.mean(axis=1, keepdims=True)
  k = fe["preemphasis"]
  if k:
    frames[:, 1:] -= k * frames[:, :-1].copy()
    frames[:, 0] *= 1 - k
  frames *= _window32(fe["window"], length)
  spec = np.fft.rfft(frames, n=fe["fft_length"])
  power = np.square(spec.real) + np.square(spec.imag)
  bank = mel_filters(
    fe["fft_length"] // 2 + 1,
    fe["num_mel_bins"],
    fe["sampling_rate"],
    fe["low_freq"],
    fe["high_freq"],
    fe["mel_scale"],
    None,
    in_mel_space=True,
  ).astype(np.float32)
  feats = np.log(np.maximum(power @ bank, np.float32(fe["mel_floor"])))
  out = np.zeros((n, fe["num_mel_bins"]), np.float32)
  out[: len(feats)] = feats
  if fe["do_normalize"]:
    out = (out - np.float32(fe["mean"])) / np.float32(2 * fe["std"])
  return out


@functools.lru_cache(maxsize=8)
def _window32(name: str, length: int) -> np.ndarray:
  return window(name, length).astype(np.float32)


def whisper_log_mel(x, fe) -> np.ndarray:
  """Whisper's log-mel spectrogram ([num_frames, num_mel_bins]).

  Zero-pad / truncate to n_samples, centred STFT (reflect padding, n_fft,
  hop_length, periodic Hann) without its last frame, power, Slaney mel,
  log10 with floor, clamp to (max - dynamic_range), (x + 4) / 4. In
  float32, as the extractor (torch.stft) computes it.
  """
  n, n_fft = fe["n_samples"], fe["n_fft"]
  x = np.asarray(x, np.float32)
  x = np.pad(x[:n], (0, max(0, n - len(x))))
  x = np.pad(x, n_fft // 2, mode="reflect")
  frames = _frames(x, n_fft, fe["hop_length"])[: n // fe["hop_length"]]
  spec = np.fft.rfft(frames * _window32(fe["window"], n_fft))
  power = np.square(spec.real) + np.square(spec.imag)
  bank = mel_filters(
    n_fft // 2 + 1,
    fe["num_mel_bins"],
    fe["sampling_rate"],
    fe["low_freq"],
    fe["high_freq"],
    fe["mel_scale"],
    fe["mel_norm"],
    in_mel_space=False,
  ).astype(np.float32)
  log = np.log10(np.maximum(power @ bank, np.float32(fe["log_floor"])))
  log = np.maximum(log, log.max() - np.float32(fe["dynamic_range"]))
  return (log + np.float32(4.0)) / np.float32(4.0)
