"""The audio branch's input per trailer: one log-mel per clip.

The clips are those of the frame branches (`video.plan_clips` on the same
`clips` settings, so every branch has the same clips in the same order);
each clip's audio is `clips.audio_seconds` of the soundtrack centred on it
(`audio.clip_windows`), through the audio checkpoint's front end
(`audio.log_mel`). A trailer without an audio stream, or whose audio
cannot be decoded, is not skipped: its clips get the features of silence
and the reason is returned, so the video is never lost for its sound.
"""

import numpy as np

from divita_jax import audio, video


def trailer_log_mels(record, config, spec, trailer_id: str):
  """float32 [N, frames, bins] and the reason for silence ("" if none).

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
  try:
    mels, has_audio = audio.clip_log_mels(
      record["video"], windows, spec, name=trailer_id
    )
  except audio.AudioError as e:  # A broken audio stream in a good video.
    return audio.silent_log_mels(windows, spec), str(e)
  return mels, "" if has_audio else "no audio stream"
