"""Figures of trailers, shots, clips and predictions (predict + the Colab).

Every function draws one matplotlib figure and, given `out`, writes it as
PNG; it returns the figure. The Agg backend is used unless a notebook
already picked one, so this runs headless.
"""

import av
import cv2
import matplotlib
import numpy as np

if "inline" not in matplotlib.get_backend():
  matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from divita_jax import video  # noqa: E402
from tfds_trailers12k import genres


def _save(fig, out: str | None):
  if out:
    fig.savefig(out, dpi=100, bbox_inches="tight")
  return fig


def shrink(frame: np.ndarray, height: int) -> np.ndarray:
  """Integer-stride downsample of [H, W, 3] to about `height` rows."""
  step = max(1, frame.shape[0] // height)
  return frame[::step, ::step]


def shot_thumbnails(data, shot_list, max_thumbs: int = 16, height: int = 72):
  """(picked shot indices [K], middle frames list of [h, w, 3]).

  Shots are picked evenly when there are more than `max_thumbs`; frames
  are decoded one at a time, so a long 1080p trailer stays small.
  """
  shot_list = np.asarray(shot_list)
  k = min(len(shot_list), max_thumbs)
  pick = np.unique(np.linspace(0, len(shot_list) - 1, k).round().astype(int))
  mids = (shot_list[pick, 0] + shot_list[pick, 1] - 1) // 2
  with video.Video(data) as v:
    frames = [shrink(v.read(np.array([m]))[0], height) for m in mids]
  return pick, frames


def frame_differences(data, width: int = 64) -> np.ndarray:
  """Mean absolute HSV change between consecutive frames: float [n - 1].

  The content score PySceneDetect's ContentDetector thresholds (equal
  channel weights), on frames shrunk to `width` pixels.
  """
  import io

  src = io.BytesIO(data) if isinstance(data, bytes) else data
  hsv = []
  with av.open(src) as c:
    for frame in c.decode(c.streams.video[0]):
      h = max(1, round(frame.height * width / frame.width))
      bgr = frame.to_ndarray(width=width, height=h, format="bgr24")
      hsv.append(cv2.cvtColor(bgr, cv2.COLOR_BGR2HSV).astype(np.int16))
  hsv = np.stack(hsv)  # [n, h, w, 3]
  return np.abs(np.diff(hsv, axis=0)).mean(axis=(1, 2, 3))


def _strip(frames: list[np.ndarray], gap: int = 2) -> np.ndarray:
  """Frames side by side (same height), white gaps: [h, sum(w), 3]."""
  h = min(f.shape[0] for f in frames)
  pad = np.full((h, gap, 3), 255, np.uint8)
  parts = []
  for f in frames:
    parts += [f[:h], pad]
  return np.concatenate(parts[:-1], axis=1)


def plot_prediction(result: dict, out: str | None = None, max_thumbs=12):
  """Shot timeline with middle-frame thumbnails, and genre bars."""
  shot_list = np.asarray(result["shots"])
  pick, thumbs = shot_thumbnails(result["video"], shot_list, max_thumbs)
  fig = plt.figure(figsize=(12, 6.5))
  grid = fig.add_gridspec(3, 1, height_ratios=[1.4, 0.5, 3], hspace=0.5)
  ax = fig.add_subplot(grid[0])
  ax.imshow(_strip(thumbs))
  ax.set_yticks([])
  widths = np.array([t.shape[1] + 2 for t in thumbs])
  ax.set_xticks(np.cumsum(widths) - widths / 2 - 1)
  fps = result["fps"]
  ax.set_xticklabels(
    [f"#{i}\n{shot_list[i, 0] / fps:.1f}s" for i in pick], fontsize=7
  )
  silence = result.get("silence")
  ax.set_title(
    f"{result['id']}: {len(shot_list)} shots, {result['duration']:.1f} s"
    + (f" (audio branch: silence, {silence})" if silence else "")
  )
  ax = fig.add_subplot(grid[1])
  spans = [(s / fps, (e - s) / fps) for s, e in shot_list]
  colors = ["#4c72b0", "#a1c9f4"] * (len(spans) // 2 + 1)
  ax.broken_barh(spans, (0, 1), facecolors=colors[: len(spans)])
  ax.plot((shot_list[pick].sum(1) / 2) / fps, [0.5] * len(pick), "k|", ms=12)
  ax.set_xlim(0, result["num_frames"] / fps)
  ax.set_yticks([])
  ax.set_xlabel("seconds (shots; | = thumbnail)")
  ax = fig.add_subplot(grid[2])
  ranked = sorted(result["genres"].items(), key=lambda kv: kv[1])
  names = [g for g, _ in ranked]
  ax.barh(names, [p for _, p in ranked], color="#dd8452", label="head")
  # Several late-fused branches: what each says alone (predict.classify).
  alone = result.get("branches", {})
  for (branch, probs), marker in zip(alone.items(), "o^sD"):
    ax.plot(
      [probs[g] for g in names],
      names,
      marker,
      ms=6,
      mfc="none",
      color="k",
      label=f"{branch} alone",
    )
  ax.axvline(0.5, color="gray", ls="--", lw=1)
  ax.set_xlim(0, 1)
  ax.set_xlabel("probability")
  if alone:
    ax.legend(loc="lower right", fontsize=8)
  return _save(fig, out)


def plot_soundtrack(data, shot_list, fps: float, windows=None, out=None):
  """A trailer's waveform and log-mel spectrogram (16 kHz mono; AST's
  Kaldi filter bank, 64 bins, unnormalised) under its shot boundaries;
  `windows` [N, 2] (seconds, e.g. audio.clip_windows): the audio branch's
  clip windows, shaded. A file without audio says so."""
  from divita_jax import audio  # The audio stack only when plotting sound.
  from divita_jax.models import ast

  shot_list = np.asarray(shot_list)
  duration = shot_list[-1, 1] / fps
  cuts = shot_list[1:, 0] / fps
  fig, (top, bottom) = plt.subplots(
    2, 1, figsize=(12, 4.5), sharex=True, gridspec_kw=dict(hspace=0.1)
  )
  try:
    x = audio.load_audio(data, 0.0, duration)
  except audio.AudioError as e:  # NoAudio too: say why, draw the shots.
    top.set_title(f"no soundtrack: {e}")
    x = None
  if x is not None:
    t = np.arange(len(x)) / 16000
    top.plot(t[::8], x[::8], lw=0.3, color="#4c72b0")
    fe = ast.front_end(64, max(1, int(duration * 100)), do_normalize=False)
    mel = audio.log_mel(x, {"front_end": fe})
    bottom.imshow(
      mel.T, origin="lower", aspect="auto", extent=(0, duration, 0, 64),
      cmap="magma",
    )  # fmt: skip
  for ax in (top, bottom):
    for c in cuts:
      ax.axvline(c, color="w" if ax is bottom else "k", lw=0.8, ls="--")
  for a, b in windows if windows is not None else ():
    top.axvspan(max(a, 0), min(b, duration), color="#dd8452", alpha=0.15)
  top.set_ylabel("waveform")
  bottom.set_ylabel("mel bin")
  bottom.set_xlabel("seconds (dashed: shot boundaries; shaded: clip windows)")
  bottom.set_xlim(0, duration)
  return _save(fig, out)


def plot_shot_strip(
  frames, frame_ids, diffs, shot_list, true_shots=None, out=None
):
  """Sampled frames over the frame-difference curve with detected cuts."""
  fig, (top, bottom) = plt.subplots(
    2, 1, figsize=(12, 5), gridspec_kw=dict(height_ratios=[1, 1.4])
  )
  top.imshow(_strip(list(frames)))
  top.set_yticks([])
  widths = np.array([f.shape[1] + 2 for f in frames])
  top.set_xticks(np.cumsum(widths) - widths / 2 - 1)
  top.set_xticklabels([str(i) for i in frame_ids], fontsize=7)
  top.set_title("frames (index below)")
  bottom.plot(np.arange(1, len(diffs) + 1), diffs, lw=1, label="HSV change")
  for i, c in enumerate(np.asarray(shot_list)[1:, 0]):
    bottom.axvline(c, color="r", lw=1, label="detected cut" if i == 0 else "")
  if true_shots is not None:
    for i, c in enumerate(np.asarray(true_shots)[1:, 0]):
      label = "true cut" if i == 0 else ""
      bottom.axvline(c, color="g", ls=":", lw=1.5, label=label)
  bottom.set_xlabel("frame")
  bottom.legend(loc="upper right", fontsize=8)
  return _save(fig, out)


def plot_clips(clips: np.ndarray, clip_shots, out=None, max_clips: int = 6):
  """Rows = clips [N, T, H, W, 3] (first `max_clips`), columns = frames."""
  n, t = min(len(clips), max_clips), clips.shape[1]
  fig, axes = plt.subplots(n, 1, figsize=(1.2 * t, 1.3 * n), squeeze=False)
  for i in range(n):
    axes[i, 0].imshow(_strip(list(clips[i])))
    axes[i, 0].set_axis_off()
    axes[i, 0].set_title(f"shot {int(clip_shots[i])}", fontsize=8, loc="left")
  return _save(fig, out)


def plot_genre_stats(labels: np.ndarray, out=None):
  """Trailers per genre and the genre co-occurrence matrix."""
  labels = np.asarray(labels, np.int64)  # [N, 10]
  fig, (a, b) = plt.subplots(1, 2, figsize=(12, 4.5))
  a.bar(genres.SHORT_NAMES, labels.sum(0))
  a.set_title(f"trailers per genre (N={len(labels)})")
  co = labels.T @ labels  # [10, 10]; diagonal = counts.
  im = b.imshow(co, cmap="viridis")
  b.set_xticks(range(genres.NUM_GENRES), genres.SHORT_NAMES, rotation=90)
  b.set_yticks(range(genres.NUM_GENRES), genres.SHORT_NAMES)
  b.set_title("co-occurrence (trailers with both)")
  fig.colorbar(im, ax=b)
  return _save(fig, out)


def pr_curve(scores, labels) -> tuple[np.ndarray, np.ndarray]:
  """(recall, precision) at every distinct threshold, from (0, 1)."""
  order = np.argsort(-np.asarray(scores, np.float64), kind="mergesort")
  s, y = np.asarray(scores)[order], np.asarray(labels)[order]
  last = np.r_[np.flatnonzero(np.diff(s)), s.size - 1]  # Tie runs' ends.
  tps = np.cumsum(y)[last]
  precision = tps / (last + 1)
  return np.r_[0.0, tps / tps[-1]], np.r_[1.0, precision]


def plot_pr_curves(probs: np.ndarray, labels: np.ndarray, out=None):
  """Per-genre precision-recall curves with their trapezoidal PR-AUC."""
  from divita_jax import metrics

  probs, labels = np.asarray(probs), np.asarray(labels)
  fig, axes = plt.subplots(2, 5, figsize=(14, 5.5), sharex=True, sharey=True)
  for g, ax in enumerate(axes.flat):
    ax.set_title(genres.GENRES[g], fontsize=9)
    if not labels[:, g].any():
      ax.text(0.5, 0.5, "no positives", ha="center")
      continue
    ax.plot(*pr_curve(probs[:, g], labels[:, g]))
    auc = metrics.pr_auc(probs[:, g], labels[:, g])
    ax.text(0.05, 0.05, f"PR-AUC {100 * auc:.1f}", fontsize=8)
  fig.supxlabel("recall")
  fig.supylabel("precision")
  return _save(fig, out)
