"""One raw trailer -> stored mp4 bytes + shots, in a single decoding pass.

Runs in the builder's worker processes. Without re-encoding, an mp4/mov
file is stored as is and only analysed (shots, fps, size); other
containers, or a requested working height / fps, are re-encoded to H.264
mp4 while the very same output frames feed the shot detector, so `shots`
index the stored video's frames. The re-encoded mp4 keeps the first audio
stream: its packets copied when mp4 can hold the codec (AAC, MP3, Opus,
...), else re-encoded to AAC; an audio stream that fails to decode is cut
where it fails, never the video.
"""

import fractions
import io
import logging

import av
import numpy as np
from etils import epath

from tfds_trailers12k import shots as shots_lib

# Audio codecs that the mp4 muxer stores as they are (copied, not decoded).
MP4_AUDIO = ("aac", "mp3", "ac3", "eac3", "alac", "opus", "flac")


def _even(x: float) -> int:
  return max(2, int(round(x / 2)) * 2)


def _reencode(path: str, name: str, height: int, fps: float, s: dict):
  """Decodes, resamples to `fps`, resizes to `height`, encodes and detects."""
  buf = io.BytesIO()
  with shots_lib.open_video(path, name) as src:
    stream = src.streams.video[0]
    stream.thread_type = "AUTO"
    src_fps = shots_lib.stream_fps(stream)
    out_fps = fps or src_fps
    det = shots_lib.make_detector(
      s["detector"],
      s["threshold"],
      s["min_shot_len"],
      s["max_flash_len"],
      s.get("checkpoint", ""),
    )
    # TransNetV2 sees 48x27 RGB as its reference decodes it; the
    # PySceneDetect detectors see downscaled BGR.
    net_shrink = (
      shots_lib.NetShrinker() if s["detector"] == "transnetv2" else None
    )
    out = av.open(buf, mode="w", format="mp4")
    sound = _audio_stream(src, out)
    enc = None
    try:
      for i, frame in enumerate(src.decode(stream)):
        if enc is None:
          h = _even(height or frame.height)
          w = _even(frame.width * h / frame.height)
          rate = fractions.Fraction(out_fps).limit_denominator(1001)
          enc = out.add_stream("libx264", rate=rate)
          enc.height, enc.width, enc.pix_fmt = h, w, "yuv420p"
          enc.options = {"preset": "veryfast", "crf": "20"}
          small = shots_lib.downscale_size(w, h, s["downscale"])
        # Frame-rate change: emit this frame as often as output frames
        # fall in its time slot [i, i + 1) / src_fps.
        repeats = int((i + 1) * out_fps / src_fps) - int(i * out_fps / src_fps)
        if repeats == 0:
          continue
        resized = frame.reformat(width=w, height=h, format="yuv420p")
        if net_shrink is None:
          small_frame = resized.to_ndarray(
            width=small[0], height=small[1], format="bgr24"
          )
        else:
          small_frame = net_shrink(resized)
        for _ in range(repeats):
          resized.pts = det.num_frames  # Output frame index.
          resized.time_base = 1 / rate
          out.mux(enc.encode(resized))
          det.process(small_frame)
    except (av.error.FFmpegError, ValueError) as e:
      out.close()
      raise shots_lib.decode_error(name, det.num_frames, e) from e
    if enc is None or det.num_frames == 0:
      out.close()
      raise shots_lib.VideoError(name, "no decodable frames")
    out.mux(enc.encode(None))
    if sound is not None:
      _carry_audio(path, name, out, *sound)
    out.close()
  return buf.getvalue(), shots_lib.VideoShots(
    det.shots(), det.num_frames, float(out_fps), h, w
  )


def _audio_stream(src, out):
  """(output stream, copy) for `src`'s first audio stream, None without
  one: a copy of it when mp4 holds its codec (copy True), else AAC."""
  if not src.streams.audio:
    return None
  audio = src.streams.audio[0]
  # MPEG-TS carries AAC with ADTS headers, which mp4 cannot copy as is.
  adts = "mpegts" in src.format.name.split(",")
  if audio.codec_context.name in MP4_AUDIO and not adts:
    return out.add_stream_from_template(audio), True
  rate = audio.codec_context.sample_rate or 48000
  stream = out.add_stream("aac", rate=rate)
  stream.layout = "stereo" if audio.codec_context.channels > 1 else "mono"
  return stream, False


def _carry_audio(path: str, name: str, out, sound, copy: bool) -> None:
  """Copies (`copy`) or re-encodes to AAC the source's first audio stream
  into `out`'s stream `sound`, after the video (mp4 needs no interleaving).
  Times are shifted so that the first video frame, the output's frame 0,
  stays where it was in the sound. A decoding failure ends the audio there
  (logged); the video is kept."""
  with shots_lib.open_video(path, name) as src:
    audio = src.streams.audio[0]
    video = src.streams.video[0]
    origin = (video.start_time or 0) * video.time_base  # Seconds.
    try:
      for packet in src.demux(audio):
        if packet.dts is None:
          continue
        if copy:
          shift = round(origin / packet.time_base)
          packet.pts, packet.dts = packet.pts - shift, packet.dts - shift
          packet.stream = sound
          out.mux(packet)
          continue
        for frame in packet.decode():
          frame.pts = round((frame.time - origin) * frame.sample_rate)
          frame.time_base = fractions.Fraction(1, frame.sample_rate)
          out.mux(sound.encode(frame))
      if not copy:
        out.mux(sound.encode(None))
    except (av.error.FFmpegError, ValueError) as e:
      logging.warning("%s: audio cut where it failed to decode (%s).", name, e)


def process(path: str, name: str, height: int, fps: float, s: dict):
  """(mp4 bytes, VideoShots) of one file; raises VideoError on bad input.

  `s`: keyword arguments of `tfds_trailers12k.shots.analyze` (detector,
  threshold, min_shot_len, downscale, max_flash_len).
  """
  if height or fps:
    return _reencode(path, name, height, fps, s)
  with shots_lib.open_video(path, name) as c:
    is_mp4 = bool({"mp4", "mov"} & set(c.format.name.split(",")))
  if not is_mp4:
    return _reencode(path, name, 0, 0.0, s)
  result = shots_lib.analyze(path, name=name, **s)
  return epath.Path(path).read_bytes(), result


def raw_example(args) -> tuple[str, dict | None, str]:
  """Worker: (id, path, height, fps, settings) -> (id, features, reason).

  Never raises: any failure becomes (id, None, reason) so the build goes on.
  """
  mid, path, height, fps, shot_kwargs = args
  try:
    video, r = process(path, mid, height, fps, shot_kwargs)
  except shots_lib.VideoError as e:
    return mid, None, e.reason
  except Exception as e:  # noqa: BLE001 - a bad file must not stop a build.
    return mid, None, f"unexpected error ({type(e).__name__}: {e})"
  return (
    mid,
    dict(
      video=video,
      fps=np.float32(r.fps),
      num_frames=np.int32(r.num_frames),
      height=np.int32(r.height),
      width=np.int32(r.width),
      shots=r.shots,
    ),
    "",
  )
