"""Synthetic Trailers12k: genre-correlated scenes encoded as real H.264 mp4.

Every trailer has 1-3 genres (imbalanced like Trailers12k: drama and comedy
common, fantasy and sci-fi rare). Each shot is a scene whose look comes from
one of the trailer's genres, blended with the others: palette (hue,
saturation, brightness), texture (oriented gratings whose spatial frequency
is genre-specific), motion speed, a moving disc, and the shot length
distribution (action cuts fast, drama lingers, horror is dark). Shots are
joined mostly by hard cuts, sometimes by dissolves or fades through black;
some shots carry a single-frame flash that is not a cut. Ground truth
boundaries (`true_shots`, int32 [S, 2]) put a gradual transition's boundary
at its middle frame.

The soundtrack (AAC, 16 kHz mono, in the same mp4) changes with the true
shots: each shot sounds one of the trailer's genres (`AUDIO_STYLE`: the
pitch of a three-harmonic tone, its pulse rate, the share of noise), drawn
apart from the shot's look, so audio and frames are two views of the
genres. In a share of trailers (`UNINFORMATIVE_AUDIO`) every shot sounds
a genre drawn from all ten: their genres cannot be told from the audio.
Everything is a pure function of (seed, index); the frames do not depend
on the soundtrack.
"""

import colorsys
import dataclasses
import fractions
import io

import av
import cv2
import numpy as np

from tfds_trailers12k import shots as shots_lib
from tfds_trailers12k.genres import GENRES, NUM_FOLDS, NUM_GENRES

# Per genre: hue (0-1), saturation, brightness, grating cycles per frame
# width, phase speed (cycles per frame; small so motion is not a cut), mean
# shot length in seconds.
STYLE = {
  "action": (0.07, 0.85, 0.75, 6.0, 0.020, 0.45),
  "adventure": (0.33, 0.65, 0.70, 3.0, 0.010, 0.70),
  "comedy": (0.15, 0.75, 0.92, 2.0, 0.008, 0.80),
  "crime": (0.62, 0.30, 0.45, 5.0, 0.006, 0.70),
  "drama": (0.10, 0.35, 0.55, 1.5, 0.003, 1.10),
  "fantasy": (0.78, 0.75, 0.65, 4.0, 0.008, 0.80),
  "horror": (0.40, 0.60, 0.22, 8.0, 0.004, 0.80),
  "romance": (0.90, 0.50, 0.82, 1.0, 0.004, 1.00),
  "sci-fi": (0.50, 0.85, 0.60, 7.0, 0.015, 0.60),
  "thriller": (0.56, 0.45, 0.35, 3.0, 0.012, 0.55),
}
# Per genre: the tone's fundamental (Hz), pulses per second, noise share.
AUDIO_STYLE = {
  "action": (110.0, 4.0, 0.5),
  "adventure": (196.0, 2.0, 0.2),
  "comedy": (523.0, 3.0, 0.05),
  "crime": (147.0, 1.0, 0.3),
  "drama": (262.0, 0.5, 0.05),
  "fantasy": (784.0, 1.5, 0.1),
  "horror": (65.0, 0.25, 0.6),
  "romance": (392.0, 0.75, 0.02),
  "sci-fi": (1047.0, 6.0, 0.15),
  "thriller": (87.0, 2.5, 0.4),
}
UNINFORMATIVE_AUDIO = 0.2  # Share of trailers whose audio ignores genre.
AUDIO_RATE = 16000
# Relative genre frequencies (Trailers12k-like imbalance).
GENRE_WEIGHTS = np.array(
  [0.30, 0.20, 0.35, 0.20, 0.50, 0.10, 0.15, 0.15, 0.12, 0.30]
)
MIN_SHOT_FRAMES = 10
# A new shot must differ from the last frame of the previous one by at
# least this ContentDetector score, or it is re-drawn (two near-identical
# scenes joined by a "cut" are not a cut anyone could detect).
MIN_CUT_SCORE = 45.0


@dataclasses.dataclass(frozen=True)
class SyntheticConfig:
  num_trailers: int = 96
  seed: int = 0
  height: int = 72
  width: int = 96
  fps: int = 24
  min_seconds: float = 8.0
  max_seconds: float = 20.0
  dissolve_prob: float = 0.08  # Per boundary.
  fade_prob: float = 0.05  # Per boundary.
  flash_prob: float = 0.12  # Per shot of >= 16 frames.


def trailer_id(index: int) -> str:
  return f"syn{index:05d}"


def sample_labels(cfg: SyntheticConfig) -> np.ndarray:
  """Multi-hot genres of all trailers: int32 [N, 10]."""
  rng = np.random.default_rng([cfg.seed, 0])
  labels = np.zeros((cfg.num_trailers, NUM_GENRES), np.int32)
  p = GENRE_WEIGHTS / GENRE_WEIGHTS.sum()
  for i in range(cfg.num_trailers):
    k = rng.choice([1, 2, 3], p=[0.3, 0.4, 0.3])
    labels[i, rng.choice(NUM_GENRES, size=k, replace=False, p=p)] = 1
  return labels


def sample_folds(labels: np.ndarray, seed: int) -> np.ndarray:
  """Three ~70/10/20 assignments stratified by rarest genre: int32 [N, 3]."""
  n = len(labels)
  freq = labels.sum(0)
  rarest = np.array([freq[np.flatnonzero(row)].min() for row in labels])
  pattern = np.array([0] * 7 + [1] + [2] * 2, np.int32)
  folds = np.zeros((n, NUM_FOLDS), np.int32)
  for f in range(NUM_FOLDS):
    rng = np.random.default_rng([seed, 1, f])
    order = np.lexsort((rng.random(n), rarest))
    for start in range(0, n, len(pattern)):
      chunk = order[start : start + len(pattern)]
      folds[chunk, f] = rng.permutation(pattern)[: len(chunk)]
  return folds


def _safe_hue(hue: float) -> float:
  # Hues near red wrap around in OpenCV's HSV (0 == 180): codec noise
  # there flips the hue channel and looks like a cut to ContentDetector.
  return float(np.clip(hue % 1.0, 0.06, 0.94))


def _shot_params(rng, genres: list[str]) -> dict:
  main = STYLE[genres[rng.integers(len(genres))]]
  mean = np.mean([STYLE[g] for g in genres], axis=0)
  hue, sat, val, freq, speed, _ = 0.75 * np.array(main) + 0.25 * mean
  return dict(
    hue=_safe_hue(main[0] + rng.normal(0, 0.03)),  # Main genre's hue.
    sat=float(np.clip(sat + rng.normal(0, 0.05), 0.05, 1)),
    val=float(np.clip(val + rng.normal(0, 0.05), 0.08, 1)),
    freq=float(freq * rng.uniform(0.8, 1.25)),
    speed=float(speed * rng.uniform(0.7, 1.3)),
    angle=float(rng.uniform(0, np.pi)),
    phase=float(rng.uniform(0, 1)),
    disc=(float(rng.uniform(0.2, 0.8)), float(rng.uniform(0.2, 0.8))),
    disc_dir=float(rng.uniform(0, 2 * np.pi)),
  )


def _render(p: dict, t: int, cfg: SyntheticConfig) -> np.ndarray:
  """Frame t of a shot: uint8 [H, W, 3] RGB."""
  h, w = cfg.height, cfg.width
  y, x = np.mgrid[0:h, 0:w].astype(np.float32) / w
  u = x * np.cos(p["angle"]) + y * np.sin(p["angle"])
  phase = 2 * np.pi * (p["freq"] * u + p["phase"] + p["speed"] * t)
  shade = 1.0 + 0.3 * np.sin(phase)  # [H, W]
  rgb = np.array(colorsys.hsv_to_rgb(p["hue"], p["sat"], p["val"]))
  img = shade[..., None] * rgb  # [H, W, 3]
  # A disc in the complementary colour drifting at the genre's speed.
  step = 8 * p["speed"] * t
  cx = (p["disc"][0] + step * np.cos(p["disc_dir"])) % 1.0
  cy = (p["disc"][1] * h / w + step * np.sin(p["disc_dir"])) % (h / w)
  inside = (x - cx) ** 2 + (y - cy) ** 2 < 0.012
  comp = colorsys.hsv_to_rgb((p["hue"] + 0.5) % 1, p["sat"], p["val"])
  img[inside] = comp
  return (np.clip(img, 0, 1) * 255).astype(np.uint8)


def _content_score(a: np.ndarray, b: np.ndarray) -> float:
  ha = cv2.cvtColor(a, cv2.COLOR_RGB2HSV).astype(np.int16)
  hb = cv2.cvtColor(b, cv2.COLOR_RGB2HSV).astype(np.int16)
  return float(np.abs(ha - hb).mean())


def _draw_shot(rng, genres, prev_last, cfg) -> dict:
  for _ in range(20):
    p = _shot_params(rng, genres)
    if prev_last is None:
      return p
    if _content_score(prev_last, _render(p, 0, cfg)) >= MIN_CUT_SCORE:
      return p
  p["hue"] = _safe_hue(p["hue"] + 0.5)  # Rare: force a visible change.
  p["val"] = 1.0 - p["val"] * 0.7
  return p


def render_audio(index, cfg, labels, true_shots) -> tuple[np.ndarray, list]:
  """The soundtrack: float32 [N] at AUDIO_RATE, N covering every frame,
  and the genre each shot sounds."""
  rng = np.random.default_rng([cfg.seed, 3, index])
  own = [GENRES[g] for g in np.flatnonzero(labels)]
  informative = rng.random() >= UNINFORMATIVE_AUDIO
  bounds = np.round(true_shots / cfg.fps * AUDIO_RATE).astype(int)
  pieces, sounded = [], []
  for start, end in bounds:
    genre = (
      own[rng.integers(len(own))]
      if informative
      else GENRES[rng.integers(len(GENRES))]
    )
    sounded.append(genre)
    f0, pulse, noise = AUDIO_STYLE[genre]
    f0 *= rng.uniform(0.97, 1.03)
    t = np.arange(end - start) / AUDIO_RATE
    phase = rng.uniform(0, 2 * np.pi)
    tone = sum(np.sin(2 * np.pi * k * f0 * t + phase) / k for k in (1, 2, 3))
    beat = (0.5 + 0.5 * np.sin(2 * np.pi * pulse * t)) ** 2
    hiss = rng.normal(size=t.size)
    pieces.append(0.15 * (1 - noise) * tone * beat + 0.2 * noise * hiss)
  return np.concatenate(pieces).astype(np.float32), sounded


def _encode(frames: list[np.ndarray], fps: int, audio=None) -> bytes:
  buf = io.BytesIO()
  with av.open(buf, mode="w", format="mp4") as out:
    stream = out.add_stream("libx264", rate=fps)
    stream.height, stream.width = frames[0].shape[:2]
    stream.pix_fmt = "yuv420p"
    stream.options = {
      "preset": "veryfast",
      "crf": "20",
      # Byte-identical trailers in every process and run: with x264's SIMD
      # code 1 in 5 encodes differed (state left by earlier encodes), so a
      # dataset built by several hosts would differ from a one-host build.
      # 3x slower encoding, a few % of a synthetic build.
      "x264-params": "asm=0",
    }
    sound = None if audio is None else _audio_stream(out)
    for img in frames:
      out.mux(stream.encode(av.VideoFrame.from_ndarray(img, format="rgb24")))
    out.mux(stream.encode(None))
    if sound is not None:
      _encode_audio(out, sound, audio)
  return buf.getvalue()


def _audio_stream(out):
  """AAC (FFmpeg's encoder: the same bytes in every run), 32 kbit/s."""
  stream = out.add_stream("aac", rate=AUDIO_RATE)
  stream.layout, stream.bit_rate = "mono", 32000
  return stream


def _encode_audio(out, stream, samples: np.ndarray) -> None:
  for i in range(0, len(samples), 1024):
    frame = av.AudioFrame.from_ndarray(
      samples[None, i : i + 1024], format="flt", layout="mono"
    )
    frame.sample_rate, frame.pts = AUDIO_RATE, i
    frame.time_base = fractions.Fraction(1, AUDIO_RATE)
    out.mux(stream.encode(frame))
  out.mux(stream.encode(None))


def render_frames(index: int, cfg: SyntheticConfig, labels: np.ndarray):
  """Frames (uint8 [H, W, 3] RGB list), true_shots [S, 2], kinds, flashes.

  kinds: per boundary 'hard', 'dissolve' or 'fade'; flashes: frame indices
  of single-frame flashes.
  """
  rng = np.random.default_rng([cfg.seed, 2, index])
  genres = [GENRES[g] for g in np.flatnonzero(labels)]
  total = int(rng.uniform(cfg.min_seconds, cfg.max_seconds) * cfg.fps)
  mean_len = np.mean([STYLE[g][5] for g in genres]) * cfg.fps
  frames, starts, kinds, flashes = [], [0], [], []
  prev_last, prev_len, k = None, 0, 8  # k: frames of a gradual transition.
  while len(frames) < total:
    p = _draw_shot(rng, genres, prev_last, cfg)
    n = max(MIN_SHOT_FRAMES, int(rng.gamma(4.0, mean_len / 4.0)))
    shot = [_render(p, t, cfg) for t in range(n)]
    if n >= 16 and rng.random() < cfg.flash_prob:
      f = int(rng.integers(5, n - 5))
      shot[f] = (0.2 * shot[f] + 0.8 * 255).astype(np.uint8)
      flashes.append(len(frames) + f)
    if frames:
      kind = rng.choice(
        ["hard", "dissolve", "fade"],
        p=[
          1 - cfg.dissolve_prob - cfg.fade_prob,
          cfg.dissolve_prob,
          cfg.fade_prob,
        ],
      )
      if min(n, prev_len) < 2 * k + 2:
        kind = "hard"  # Too short to give frames to a transition.
      start = len(frames)
      if kind != "hard":
        # Blend the previous shot's last k frames with the next k; the
        # boundary is the middle of the transition.
        start -= k // 2
        for j in range(k):
          a = (j + 1) / (k + 1)
          prev = frames[len(frames) - k + j].astype(np.float32)
          nxt = shot[j].astype(np.float32)
          if kind == "dissolve":
            mix = (1 - a) * prev + a * nxt
          else:  # Fade out to black then in: dark in the middle.
            mix = prev * max(0, 1 - 2 * a) + nxt * max(0, 2 * a - 1)
          frames[len(frames) - k + j] = mix.astype(np.uint8)
        shot = shot[k:]
      kinds.append(str(kind))
      starts.append(start)
    frames.extend(shot)
    prev_last, prev_len = frames[-1], n
  ends = starts[1:] + [len(frames)]
  true_shots = np.stack([starts, ends], axis=1).astype(np.int32)
  return frames, true_shots, kinds, flashes


def make_trailer(index: int, cfg: SyntheticConfig, labels: np.ndarray):
  """One trailer: dict with video bytes, true shots and transition kinds.

  Keys: id, video (mp4 bytes), audio_genres (the genre each true shot
  sounds), fps, num_frames, height, width, labels (int32 [10]), true_shots
  (int32 [S, 2]), kinds, flashes (see `render_frames`), title, year.
  """
  frames, true_shots, kinds, flashes = render_frames(index, cfg, labels)
  genres = [GENRES[g] for g in np.flatnonzero(labels)]
  sound, sounded = render_audio(index, cfg, labels, true_shots)
  return dict(
    id=trailer_id(index),
    video=_encode(frames, cfg.fps, sound),
    audio_genres=sounded,  # Per true shot.
    fps=float(cfg.fps),
    num_frames=len(frames),
    height=cfg.height,
    width=cfg.width,
    labels=labels.astype(np.int32),
    true_shots=true_shots,
    kinds=kinds,
    flashes=flashes,
    title=f"Synthetic trailer {index} ({', '.join(genres)})",
    year=str(1980 + index % 45),
  )


def synthetic_example(args) -> tuple[str, dict | None, str]:
  """Worker: (index, cfg, labels, shot_kwargs) -> (id, features, reason).

  Generates one trailer and detects its shots from the encoded bytes, as
  the raw config would.
  """
  index, cfg, labels, shot_kwargs = args
  t = make_trailer(index, cfg, labels)
  try:
    r = shots_lib.analyze(t["video"], name=t["id"], **shot_kwargs)
  except shots_lib.VideoError as e:
    return t["id"], None, e.reason
  return (
    t["id"],
    dict(
      video=t["video"],
      fps=np.float32(r.fps),
      num_frames=np.int32(r.num_frames),
      height=np.int32(r.height),
      width=np.int32(r.width),
      shots=r.shots,
      true_shots=t["true_shots"],
      title=t["title"],
      year=t["year"],
    ),
    "",
  )
