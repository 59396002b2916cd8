"""Shot boundary detection: PyAV decoding + PySceneDetect's detectors.

A video is decoded once with PyAV (threaded decoding); every frame is
shrunk (point sampling, like the CLI's unfiltered resize at these factors)
and converted to BGR by swscale in the same call, then scored exactly as
PySceneDetect's `ContentDetector` or `AdaptiveDetector` would (same HSV
frames, same float operations, so the same scores bit for bit; see
`content_score`), with OpenCV's SIMD kernels instead of their per-frame
numpy and Python. Shrinking and scoring run on a thread beside the
decoder. The detector's raw cuts are then cleaned by two rules of ours:

* Flash suppression: two cuts at most `max_flash_len` frames apart whose
  outer frames (the frame before the first cut and the frame at the second
  cut) look alike are a flash (photographer flash, muzzle flash, lightning),
  not two cuts; both are dropped. PySceneDetect's own `FlashFilter` only
  merges such pairs into one cut, which would still split the shot.
* Minimum shot length: a cut closer than `min_shot_len` frames to the
  previously kept cut is dropped.

`detector="transnetv2"` is the learned detector instead (tfds_trailers12k/
transnetv2.py, a converted checkpoint directory in `checkpoint`): frames
shrunk to 48x27 RGB by libavfilter's `scale=48:27:flags=bicubic` (the
filter that `ffmpeg -s 48x27` inserts) in the decoding thread, the
network run over 100-frame windows beside it, a new shot where the
reference's `predictions_to_scenes` starts a scene (transition frames stay
with the shot before), then the same two rules (flash frames compared in
HSV at 48x27).

The scores, the rules and the defaults live in cut_rules.py, TransNetV2's
windows in transnetv2_windows.py; this module decodes and dispatches, and
is the command line (`python -m tfds_trailers12k.shots`).

Shots are int32 [S, 2] rows (start frame, end frame exclusive) that cover
[0, num_frames) in order. Defaults (chosen on the synthetic Trailers12k,
where they give hard-cut F1 ~1.0 at +-2 frames and ignore flashes):
`detector="content"`, `threshold=27` (PySceneDetect's default),
`min_shot_len=6` frames (trailers cut fast; PySceneDetect's 15 frames
would merge real shots of action trailers), `downscale=0` (auto: frames
are shrunk by an integer factor to about 256 px wide, as PySceneDetect
does), `max_flash_len=2` frames.
"""

import argparse
import collections
import concurrent.futures
import dataclasses
import io
import json
import multiprocessing
import os
import sys

import av
import numpy as np
from av.video.format import VideoFormat
from av.video.reformatter import Interpolation, VideoReformatter

from tfds_trailers12k import cut_rules

# TransNetV2 windows per network call (fixed shape; a video's last call is
# padded). On 2 CPU cores 2 was fastest (1, 4 and 8 were 15-30% slower)
# and pads short videos least; accelerators want more.
DEFAULT_NET_BATCH = 2
# Auto downscale targets about this width, like PySceneDetect's CLI.
_AUTO_DOWNSCALE_WIDTH = 256
# Decoded frames go to the scoring thread in batches (a hand-off costs
# ~20 us) with at most this many batches queued: queued frames are full
# size (3 MB at 1080p), so at most (2 + 2) * 4 are alive at a time.
_BATCH = 4
_MAX_QUEUED = 2
_BGR24 = VideoFormat("bgr24")


class VideoError(ValueError):
  """A video that cannot be decoded or sampled; names the trailer and why."""

  def __init__(self, trailer_id: str, reason: str):
    super().__init__(f"trailer {trailer_id!r}: {reason}")
    self.trailer_id = trailer_id
    self.reason = reason


@dataclasses.dataclass
class VideoShots:
  """Result of one decoding pass: shots plus stream facts."""

  shots: np.ndarray  # int32 [S, 2], start and end-exclusive frame indices.
  num_frames: int
  fps: float
  height: int
  width: int
  # [num_frames]: the value the detector thresholds per frame (content
  # score, adaptive ratio: float64; TransNetV2 probability: float32).
  scores: np.ndarray | None = None


def downscale_size(width: int, height: int, downscale: int) -> tuple[int, int]:
  """Detector frame size; downscale 0 = auto (about 256 px wide)."""
  if downscale < 0:
    raise ValueError(f"downscale must be >= 0, got {downscale}.")
  if downscale == 0:
    downscale = max(1, width // _AUTO_DOWNSCALE_WIDTH)
  return max(1, width // downscale), max(1, height // downscale)


def open_video(video: bytes | str, name: str = "") -> av.container.Container:
  """Opens bytes or a path with PyAV; bad input raises VideoError."""
  name = name or (video if isinstance(video, str) else "<bytes>")
  if isinstance(video, str):
    if not os.path.exists(video):
      raise VideoError(name, "missing file")
    if os.path.getsize(video) == 0:
      raise VideoError(name, "empty file")
  elif not video:
    raise VideoError(name, "empty file")
  source = video if isinstance(video, str) else io.BytesIO(video)
  try:
    container = av.open(source, mode="r")
  except (av.error.FFmpegError, ValueError, OSError) as e:
    raise VideoError(name, f"unreadable container ({e})") from e
  if not container.streams.video:
    container.close()
    raise VideoError(name, "no video stream (audio-only or data-only file)")
  return container


def decode_error(name: str, num_frames: int, e: Exception) -> VideoError:
  if num_frames == 0:
    return VideoError(name, f"no decodable frames ({e})")
  return VideoError(
    name, f"corrupt stream: decode error after {num_frames} frames ({e})"
  )


def stream_fps(stream) -> float:
  rate = stream.average_rate or stream.guessed_rate or stream.base_rate
  return float(rate) if rate else 24.0


class Shrinker:
  """Decoded frame -> detector-size BGR in one swscale call.

  One reformatter for all frames keeps its swscale context:
  `frame.to_ndarray(width=...)` makes a new one per frame, re-initialising
  swscale (and its threads) every time, which cost more than the scaling
  itself on small frames. threads=1: the decoder's threads already use
  the cores. Same arithmetic, so the same pixels as `to_ndarray`.
  """

  def __init__(self, downscale: int):
    self._downscale = downscale
    self._reformatter = VideoReformatter()
    self.source = (0, 0)  # The first frame's (width, height).
    self.size = None

  def __call__(self, frame: av.VideoFrame) -> np.ndarray:
    if self.size is None:
      self.source = frame.width, frame.height
      self.size = downscale_size(frame.width, frame.height, self._downscale)
    return self._reformatter.reformat(
      frame,
      width=self.size[0],
      height=self.size[1],
      format=_BGR24,
      interpolation=Interpolation.POINT,  # Fastest; like the CLI's resize.
      threads=1,
    ).to_ndarray()


class NetShrinker:
  """Decoded frame -> uint8 [27, 48, 3] RGB, as TransNetV2's reference
  decodes (`ffmpeg -i VIDEO -f rawvideo -pix_fmt rgb24 -s 48x27`).

  Runs the filters that command inserts: libavfilter's
  `scale=48:27:flags=bicubic`, then `format=rgb24`. Not VideoReformatter:
  its bicubic swscale call equals this filter only with
  `in_chroma_loc=left`; the filter's own default sites the package
  video's chroma at the centre (pixels up to 7 levels apart). threads=1
  as in Shrinker; the graph is rebuilt if the stream changes size or
  format.
  """

  def __init__(self):
    self._graph = None
    self._key = None
    self.source = (0, 0)  # The first frame's (width, height).

  def __call__(self, frame: av.VideoFrame) -> np.ndarray:
    key = (frame.width, frame.height, frame.format.name)
    if key != self._key:
      if self._key is None:
        self.source = key[:2]
      self._graph, self._key = _scale_graph(frame), key
    self._graph.vpush(frame)
    return self._graph.vpull().to_ndarray()


def _scale_graph(frame: av.VideoFrame) -> av.filter.Graph:
  graph = av.filter.Graph()
  graph.threads = 1
  source = graph.add(
    "buffer",
    video_size=f"{frame.width}x{frame.height}",
    pix_fmt=str(int(frame.format)),
    time_base=str(frame.time_base or "1/1000"),
    pixel_aspect="1/1",
    # The frames' own tags, so that the source does not warn of a change.
    colorspace=str(int(frame.colorspace)),
    range=str(int(frame.color_range)),
  )
  graph.link_nodes(
    source,
    graph.add("scale", "48:27:flags=bicubic"),
    graph.add("format", "pix_fmts=rgb24"),
    graph.add("buffersink"),
  ).configure()
  return graph


def _detect(container, stream, det, shrink, name: str, early=False) -> int:
  """Decodes every frame into `det`; returns the number decoded.

  The decoder runs here; shrinking and scoring run on one worker thread,
  in order, on batches of frames (PyAV, swscale, OpenCV and XLA release
  the GIL), so they overlap with decoding when a core is free. `early`:
  shrink here instead (cheap 48x27 frames for TransNetV2, whose network
  then has the worker thread to itself).
  """

  def score(frames):
    for frame in frames:
      det.process(frame if early else shrink(frame))

  decoded = 0
  with concurrent.futures.ThreadPoolExecutor(1) as worker:
    queued = collections.deque()
    batch = []
    try:
      for frame in container.decode(stream):
        decoded += 1
        batch.append(shrink(frame) if early else frame)
        if len(batch) == _BATCH:
          queued.append(worker.submit(score, batch))
          batch = []
          if len(queued) > _MAX_QUEUED:
            queued.popleft().result()  # Also raises the worker's errors.
      queued.append(worker.submit(score, batch))
      for job in queued:
        job.result()
    except (av.error.FFmpegError, ValueError) as e:
      raise decode_error(name, decoded, e) from e
  return decoded


def _transnetv2(device: str):
  """tfds_trailers12k.transnetv2_windows, imported on first use: JAX
  costs seconds to import in every build worker, and most builds never
  need it.

  In a worker process asked for the CPU, JAX is kept off any accelerator
  (set before JAX is imported), so that workers do not each claim one.
  """
  in_worker = multiprocessing.parent_process() is not None
  if device == "cpu" and in_worker and "jax" not in sys.modules:
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
  from tfds_trailers12k import transnetv2_windows  # noqa: PLC0415

  return transnetv2_windows


def make_detector(
  detector: str = "content",
  threshold: float | None = None,
  min_shot_len: int = cut_rules.DEFAULT_MIN_SHOT_LEN,
  max_flash_len: int = cut_rules.DEFAULT_MAX_FLASH_LEN,
  checkpoint: str = "",
  device: str = "cpu",
):
  """A cut_rules.ShotDetector (frames: Shrinker's BGR) or, for
  "transnetv2", a TransNetV2Detector (frames: NetShrinker's RGB) of
  `checkpoint`.

  device: TransNetV2's JAX platform ("cpu", "gpu", "tpu"; "" = JAX's
  default). Bad settings or checkpoints raise ValueError.
  """
  if detector != "transnetv2":
    return cut_rules.ShotDetector(
      detector, threshold, min_shot_len, max_flash_len
    )
  if not checkpoint:
    raise ValueError(
      "The transnetv2 shot detector needs a checkpoint directory; make one "
      "with `python -m divita_jax.convert --source transnetv2 --output DIR`."
    )
  net = _transnetv2(device)
  predictor = net.cached_predictor(checkpoint, DEFAULT_NET_BATCH, device)
  return net.TransNetV2Detector(
    predictor, threshold, min_shot_len, max_flash_len
  )


def analyze(
  video: bytes | str,
  *,
  detector: str = "content",
  threshold: float | None = None,
  min_shot_len: int = cut_rules.DEFAULT_MIN_SHOT_LEN,
  downscale: int = 0,
  max_flash_len: int = cut_rules.DEFAULT_MAX_FLASH_LEN,
  checkpoint: str = "",
  device: str = "cpu",
  name: str = "",
) -> VideoShots:
  """Decodes `video` once and returns its shots, scores and stream facts.

  Raises VideoError (with `.reason`) for missing, empty, unreadable,
  audio-only, undecodable or frameless input; ValueError for bad settings
  or a bad TransNetV2 checkpoint (see `make_detector`).
  """
  name = name or (video if isinstance(video, str) else "<bytes>")
  det = make_detector(
    detector, threshold, min_shot_len, max_flash_len, checkpoint, device
  )
  net = detector == "transnetv2"
  shrink = NetShrinker() if net else Shrinker(downscale)
  with open_video(video, name) as container:
    stream = container.streams.video[0]
    stream.thread_type = "AUTO"  # Frame + slice threads.
    fps = stream_fps(stream)
    _detect(container, stream, det, shrink, name, early=net)
  if det.num_frames == 0:
    raise VideoError(name, "no decodable frames")
  width, height = shrink.source
  shots = det.shots()
  return VideoShots(shots, det.num_frames, fps, height, width, det.scores())


def detect_shots(
  video: bytes | str,
  *,
  detector: str = "content",
  threshold: float | None = None,
  min_shot_len: int = cut_rules.DEFAULT_MIN_SHOT_LEN,
  downscale: int = 0,
  max_flash_len: int = cut_rules.DEFAULT_MAX_FLASH_LEN,
  checkpoint: str = "",
) -> np.ndarray:
  """Shots of an encoded video (bytes or path): int32 [S, 2].

  Rows are (start frame, end frame exclusive), in order, covering every
  decoded frame. See the module docstring for the defaults.
  """
  return analyze(
    video,
    detector=detector,
    threshold=threshold,
    min_shot_len=min_shot_len,
    downscale=downscale,
    max_flash_len=max_flash_len,
    checkpoint=checkpoint,
  ).shots


def parse_args(argv):
  p = argparse.ArgumentParser(
    prog="python -m tfds_trailers12k.shots",
    description="Prints the shots of each video (one line per video).",
  )
  p.add_argument("videos", nargs="+", metavar="VIDEO")
  p.add_argument("--detector", choices=cut_rules.DETECTORS, default="content")
  p.add_argument(
    "--checkpoint", default="", help="transnetv2: a converted checkpoint DIR."
  )
  p.add_argument("--threshold", type=float, help="Default: the detector's own.")
  p.add_argument(
    "--min_shot_len", type=int, default=cut_rules.DEFAULT_MIN_SHOT_LEN
  )
  p.add_argument(
    "--max_flash_len", type=int, default=cut_rules.DEFAULT_MAX_FLASH_LEN
  )
  p.add_argument("--downscale", type=int, default=0, help="content/adaptive.")
  p.add_argument(
    "--device", default="", help="transnetv2: cpu|gpu|tpu (default: JAX's)."
  )
  p.add_argument(
    "--json",
    action="store_true",
    help='One object per line: {"path", "num_frames", "fps", "shots", '
    '"scores"} (scores: the per-frame value the detector thresholds).',
  )
  return p, p.parse_args(argv)


def main(argv=None) -> int:
  """Shots of each VIDEO; a bad file gets its line and exit status 1."""
  parser, a = parse_args(argv)
  settings = dict(
    detector=a.detector,
    threshold=a.threshold,
    min_shot_len=a.min_shot_len,
    max_flash_len=a.max_flash_len,
  )
  try:  # Settings and checkpoint once, before any video.
    make_detector(**settings, checkpoint=a.checkpoint, device=a.device)
  except ValueError as e:
    parser.error(str(e))
  failed = 0
  for path in a.videos:
    try:
      r = analyze(
        path,
        **settings,
        downscale=a.downscale,
        checkpoint=a.checkpoint,
        device=a.device,
      )
    except VideoError as e:
      failed += 1
      if a.json:
        print(json.dumps({"path": path, "error": e.reason}), flush=True)
      else:
        print(f"{path}: error: {e.reason}", file=sys.stderr, flush=True)
      continue
    if a.json:
      out = dict(
        path=path,
        num_frames=r.num_frames,
        fps=r.fps,
        shots=r.shots.tolist(),
        scores=[float(x) for x in r.scores],
      )
      print(json.dumps(out), flush=True)
    else:
      rows = " ".join(f"[{s}, {e})" for s, e in r.shots.tolist())
      print(
        f"{path}: {r.num_frames} frames, {r.fps:g} fps, {len(r.shots)} "
        f"shots: {rows}",
        flush=True,
      )
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
