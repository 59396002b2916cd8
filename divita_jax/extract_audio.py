"""The audio branch's input per trailer, and its features per clip.

The clips are those of the frame branches (`video.plan_clips` on the same
`clips` settings, so every branch has the same clips in the same order);
each clip's audio is `clips.audio_seconds` of the soundtrack centred on it
(`audio.clip_windows`). `backbones.audio.pooling` says how the encoder
hears it:
- "window": each clip's window through the front end (`audio.log_mel`)
  and the encoder alone; the clip's feature is the encoder's pooled output.
- "chunks" (Whisper): the soundtrack from the start through the encoder in
  consecutive inputs (`audio.chunk_log_mels`: 30 s for a checkpoint); the
  clip's feature is the mean of the encoder frames that fall in its window
  (`pool_frames`), so every clip hears its sound in the context of up to
  30 s, and the trailer is encoded once.
A trailer without an audio stream, or whose audio cannot be decoded, is not
skipped: it is heard as silence and the reason is returned, so the video
is never lost for its sound.
"""

import math

import numpy as np

from divita_jax import audio, video
from divita_jax.models import whisper


def trailer_log_mels(record, config, spec, trailer_id: str):
  """(encoder inputs float32 [n, frames, bins], clip windows [N, 2], the
  reason for silence or ""). n = N clips ("window") or chunks ("chunks").

  Raises video.VideoError for a video that cannot be read (the trailer is
  skipped, as by the frame branches).
  """
  kwargs = video.sample_kwargs(config.clips, 0)
  del kwargs["resolution"]
  with video.Video(record["video"], trailer_id) as v:
    shots = np.asarray(record["shots"])
    plan = video.plan_clips(v.index, shots, trailer_id=trailer_id, **kwargs)
    windows = audio.clip_windows(
      v.index.times,
      plan["frame_indices"],
      v.index.duration,
      float(config.clips.audio_seconds),
    )
  chunks = config.backbones.audio.pooling == "chunks"
  try:
    if chunks:
      end = windows[:, 1].max()
      mels, has_audio = audio.chunk_log_mels(
        record["video"], end, spec, name=trailer_id
      )
    else:
      mels, has_audio = audio.clip_log_mels(
        record["video"], windows, spec, name=trailer_id
      )
  except audio.AudioError as e:  # A broken audio stream in a good video.
    if chunks:
      count = audio.num_chunks(windows[:, 1].max(), spec)
      mels = audio.silent_chunk_log_mels(count, spec)
    else:
      mels = audio.silent_log_mels(windows, spec)
    return mels, windows, str(e)
  return mels, windows, "" if has_audio else "no audio stream"


def clip_features(outputs: np.ndarray, windows, config, spec) -> np.ndarray:
  """float32 [N, D] per clip from the encoder's outputs of
  trailer_log_mels' inputs: pooled [N, D] ("window") as they are, or
  encoder frames [C, n, D] ("chunks") pooled per window."""
  if config.backbones.audio.pooling != "chunks":
    return outputs
  return pool_frames(outputs, windows, spec)


def pool_frames(encoded: np.ndarray, windows, spec) -> np.ndarray:
  """Mean of the encoder frames in each window: encoded [C, n, D] of
  consecutive chunks from time 0 (frame i covers [i, i + 1) x hop, hop =
  STRIDE log-mel frames: 20 ms for Whisper) -> float32 [N, D]. A window
  shorter than a frame takes the frame it starts in."""
  fe = spec["front_end"]
  hop = whisper.STRIDE * fe["hop_length"] / fe["sampling_rate"]
  frames = encoded.reshape(-1, encoded.shape[-1])
  total = len(frames)
  out = np.empty((len(windows), frames.shape[1]), np.float32)
  for k, (a, b) in enumerate(windows):
    lo = min(max(math.floor(a / hop), 0), total - 1)
    hi = min(max(math.ceil(b / hop), lo + 1), total)
    out[k] = frames[lo:hi].mean(axis=0)
  return out
