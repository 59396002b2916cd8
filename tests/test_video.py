"""Frame accuracy of clip sampling on videos whose frames encode their index."""

import fractions
import io

import av
import numpy as np
import pytest

from divita_jax import video
from divita_jax.models import backbone

BITS = 12  # 4 x 3 grid of blocks: up to 4096 frames.


def pattern(i: int, h: int, w: int) -> np.ndarray:
  """Frame i: block b of a 4x3 grid is white iff bit b of i is set."""
  img = np.zeros((h, w, 3), np.uint8)
  for b in range(BITS):
    if i >> b & 1:
      r, c = divmod(b, 4)
      img[r * h // 3 : (r + 1) * h // 3, c * w // 4 : (c + 1) * w // 4] = 255
  return img


def frame_index(img: np.ndarray) -> int:
  h, w = img.shape[:2]
  v = 0
  for b in range(BITS):
    r, c = divmod(b, 4)
    cell = img[
      r * h // 3 + h // 12 : (r + 1) * h // 3 - h // 12,
      c * w // 4 + w // 16 : (c + 1) * w // 4 - w // 16,
    ]
    v |= int(cell.mean() > 128) << b
  return v


def decoded_indices(clips: np.ndarray) -> np.ndarray:
  """uint8 [..., H, W, 3] -> int [...] frame indices read from the pixels."""
  flat = clips.reshape((-1,) + clips.shape[-3:])
  return np.array([frame_index(x) for x in flat]).reshape(clips.shape[:-3])


def make_video(
  n,
  *,
  times=None,
  fps=24,
  h=48,
  w=64,
  pix_fmt="yuv420p",
  start=0.0,
  rotation=0,
  gop=12,
  path=None,
  movflags=None,
) -> bytes:
  """H.264 mp4 (B-frames, keyframe every `gop`) of n index-pattern frames.

  times: seconds of each frame (VFR); default i / fps. start: offset of the
  first timestamp.
  """
  target = path or io.BytesIO()
  opts = {"movflags": movflags} if movflags else {}
  with av.open(target, "w", format="mp4", options=opts) as c:
    s = c.add_stream(
      "libx264", rate=fps, options={"crf": "12", "g": str(gop), "bf": "2"}
    )
    s.width, s.height, s.pix_fmt = w, h, pix_fmt
    tb = fractions.Fraction(1, 24000)  # Exact at 24 fps and for whole ms.
    s.codec_context.time_base = tb
    if rotation:
      s.set_display_rotation(rotation)
    if times is None:
      times = np.arange(n) / fps
    for i in range(n):
      f = av.VideoFrame.from_ndarray(pattern(i, h, w), format="rgb24")
      f.pts, f.time_base = int(round((times[i] + start) * 24000)), tb
      for p in s.encode(f):
        c.mux(p)
    for p in s.encode():
      c.mux(p)
  if path:
    return open(path, "rb").read()
  return target.getvalue()


@pytest.fixture(scope="module")
def cfr():
  return make_video(120)  # 5 s at 24 fps.


def vfr_times(n, seed=0):
  steps = np.random.default_rng(seed).choice([0.02, 0.05, 0.041, 0.1], n)
  return np.concatenate([[0.0], np.cumsum(steps[:-1])])


def nearest_oracle(times, duration, start, end, fps):
  """Brute force: frame of [start, end) nearest to each grid time."""
  t1 = times[end] if end < len(times) else duration
  length = int(np.ceil((t1 - times[start]) * fps - 0.05))
  out = []
  for k in range(length):
    t = times[start] + k / fps
    d = np.abs(times[start:end] - t)
    out.append(start + int(np.flatnonzero(d <= d.min() + 1e-9)[0]))
  return np.array(out)


def sample(v, shots, **kw):
  kw = {"frames_per_clip": 8, "fps": 24.0, "resolution": None} | kw
  clips, info = video.sample_clips(v, shots, trailer_id="t", **kw)
  # Every sampled frame shows the index the plan says it is.
  np.testing.assert_array_equal(decoded_indices(clips), info["frame_indices"])
  return clips, info


def test_shot_placements_native_fps(cfr):
  shots = np.array([[0, 5], [5, 45], [45, 120]])
  _, info = sample(cfr, shots, placement="center")
  fi = info["frame_indices"]
  # Short shot (5 < 8 frames): its frames repeat in order.
  np.testing.assert_array_equal(fi[0], [0, 0, 1, 1, 2, 3, 3, 4])
  np.testing.assert_array_equal(fi[1], np.arange(21, 29))  # 5 + (40-8)//2.
  np.testing.assert_array_equal(fi[2], np.arange(78, 86))  # 45 + (75-8)//2.
  np.testing.assert_array_equal(info["shot_lengths"], [5, 40, 75])
  assert info["num_frames"] == 120 and info["fps"] == pytest.approx(24.0)

  _, info = sample(cfr, shots, placement="start")
  np.testing.assert_array_equal(info["frame_indices"][1], np.arange(5, 13))
  _, info = sample(cfr, shots, placement="uniform")
  # 8 frames at the centres of 8 equal parts of the 40-frame shot.
  np.testing.assert_array_equal(
    info["frame_indices"][1], 5 + np.arange(8) * 5 + 2
  )


def test_long_shot_several_clips_and_resampled_fps(cfr):
  shots = np.array([[0, 10], [10, 120]])
  _, info = sample(cfr, shots, max_clips_per_shot=3)
  # 110 frames // 8 >= 3: three parts of ~37 frames, a centred clip in each.
  np.testing.assert_array_equal(info["clip_shots"], [0, 1, 1, 1])
  np.testing.assert_array_equal(
    info["frame_indices"][1], 10 + 14 + np.arange(8)
  )
  np.testing.assert_array_equal(
    info["frame_indices"][3], 10 + 73 + 14 + np.arange(8)
  )

  _, info = sample(cfr, shots, fps=8.0)  # Every third frame.
  np.testing.assert_array_equal(info["shot_lengths"], [4, 37])
  np.testing.assert_array_equal(
    info["frame_indices"][0], [0, 0, 3, 3, 6, 6, 9, 9]
  )
  np.testing.assert_array_equal(
    info["frame_indices"][1], 10 + 3 * (14 + np.arange(8))
  )


def test_fixed_segmentation(cfr):
  _, info = sample(cfr, None, segmentation="fixed", frames_per_clip=16)
  fi = info["frame_indices"]
  assert fi.shape == (8, 16)  # ceil(120 / 16).
  np.testing.assert_array_equal(fi[:7].reshape(-1), np.arange(112))
  # The last window holds 8 frames, stretched to 16.
  np.testing.assert_array_equal(fi[7], np.repeat(np.arange(112, 120), 2))
  np.testing.assert_array_equal(info["shot_lengths"], [16] * 7 + [8])

  _, info = sample(cfr, None, segmentation="fixed", fps=12.0)
  fi = info["frame_indices"]
  np.testing.assert_array_equal(fi[:7].reshape(-1), np.arange(0, 112, 2))


@pytest.mark.parametrize("start", [0.0, 1.5])
def test_vfr_and_nonzero_start(start):
  times = vfr_times(90)
  v = make_video(90, times=times, start=start)
  with video.Video(v) as vid:
    np.testing.assert_allclose(vid.index.times, times, atol=1e-9)
    duration = vid.index.duration
  shots = np.array([[0, 7], [7, 50], [50, 90]])
  for fps in (24.0, 10.0):
    _, info = sample(v, shots, fps=fps, placement="start")
    for (s, e), fi in zip(shots, info["frame_indices"]):
      want = nearest_oracle(times, duration, s, e, fps)
      if len(want) >= 8:
        np.testing.assert_array_equal(fi, want[:8])
      else:
        np.testing.assert_array_equal(fi, want[np.arange(8) * len(want) // 8])


def test_resize_crop_and_read_frames():
  v = make_video(30, h=96, w=160)
  clips, _ = video.sample_clips(v, None, frames_per_clip=4, resolution=48)
  assert clips.shape == (1, 4, 48, 48, 3) and clips.dtype == np.uint8
  full = video.read_frames(v, [[3, 29], [0, 0]])
  assert full.shape == (2, 2, 96, 160, 3)
  np.testing.assert_array_equal(decoded_indices(full), [[3, 29], [0, 0]])
  # Short side 96 -> 48 (width 80), then the centre 48 columns.
  small = video.read_frames(v, [3], resolution=48)[0]
  ref = full[0, 0].reshape(48, 2, 80, 2, 3).mean((1, 3))[:, 16:64]
  assert np.abs(small.astype(float) - ref).mean() < 8


def test_center_frame_is_frame_t_over_2_of_each_clip():
  indices = np.arange(2 * 5).reshape(2, 5)  # [N, T] frame indices.
  np.testing.assert_array_equal(video.center_frame(indices), [[2], [7]])
  clips = np.arange(2 * 4 * 3).reshape(2, 4, 3)  # [N, T, ...], T even.
  np.testing.assert_array_equal(video.center_frame(clips), clips[:, 2:3])
  assert video.center_frame(np.zeros((3, 1, 8, 8, 3))).shape == (3, 1, 8, 8, 3)


def test_decodes_only_from_the_keyframe_before_each_clip():
  v = make_video(240, gop=24)
  with video.Video(v) as vid:
    keys = vid.index.keyframes
    assert 10 <= len(keys) < 20  # Every 24 frames, plus scene cuts.
    frames = vid.read([[100, 101], [230, 231]])
    np.testing.assert_array_equal(
      decoded_indices(frames), [[100, 101], [230, 231]]
    )
    # From the keyframe before 100 and before 230, plus a few frames in
    # flight in the decoder (B-frame reordering).
    needed = sum(j + 2 - keys[keys <= j][-1] for j in (100, 230))
    assert needed <= vid.frames_decoded <= needed + 8
  with video.Video(v) as vid:
    vid.read(np.arange(240))
    assert vid.frames_decoded == 240  # One pass, nothing decoded twice.


def test_normalize():
  x = np.array([0, 255], np.uint8)[:, None].repeat(3, 1)
  stats = lambda name: backbone.input_stats({}, name)
  norm = lambda name: video.normalize(x, *stats(name))
  np.testing.assert_allclose(norm("zero_one")[:, 0], [0, 1])
  np.testing.assert_allclose(norm("minus_one_one")[:, 0], [-1, 1])
  mean, std = np.array(stats("imagenet"), np.float32)
  np.testing.assert_allclose(norm("imagenet")[1], (1 - mean) / std)
  # Efficient-3DCNNs: 0-255 inputs minus a mean, no std division.
  mean = np.array([114.7748, 107.7354, 99.4750]) / 255
  out = video.normalize(x, mean, [1 / 255] * 3)
  np.testing.assert_allclose(out[1], 255 - mean * 255, rtol=1e-5)
  with pytest.raises(ValueError, match="normalization 'bgr'"):
    stats("bgr")
  with pytest.raises(ValueError, match="3 positive stds"):
    video.normalize(x, [0, 0, 0], [1, 0, 1])


# ---- Bad input: handled correctly, or a VideoError naming trailer and reason.


@pytest.mark.parametrize(
  "kw",
  [
    {"h": 33, "w": 47, "pix_fmt": "yuv444p"},  # Odd dimensions.
    {"pix_fmt": "gray"},
    {"pix_fmt": "yuv420p10le"},
  ],
  ids=["odd", "gray", "10bit"],
)
def test_unusual_pixels_decode_correctly(kw):
  v = make_video(20, **kw)
  clips, _ = sample(v, np.array([[0, 20]]))
  assert clips.shape[-3:] == (kw.get("h", 48), kw.get("w", 64), 3)
  clips, _ = video.sample_clips(v, None, frames_per_clip=8, resolution=16)
  assert clips.shape == (1, 8, 16, 16, 3)


def test_rotation_metadata_is_applied():
  v = make_video(20, h=48, w=64, rotation=90)
  clips, info = video.sample_clips(v, None, frames_per_clip=4, resolution=None)
  assert clips.shape == (1, 4, 64, 48, 3)  # Displayed portrait.
  # Rotated 90 degrees counter-clockwise: undo it and read the index.
  undone = np.rot90(clips, -1, axes=(2, 3))
  np.testing.assert_array_equal(decoded_indices(undone), info["frame_indices"])


def test_corrupt_mid_stream(cfr):
  v = bytearray(make_video(200, h=64, w=64))
  mid = len(v) // 2
  v[mid : mid + 400] = np.random.default_rng(0).bytes(400)
  with pytest.raises(video.VideoError, match="'bad1'.*decoding failed"):
    video.read_frames(bytes(v), np.arange(200), trailer_id="bad1")


def test_truncated_and_empty(tmp_path):
  v = make_video(200, path=str(tmp_path / "a.mp4"), movflags="faststart")
  with pytest.raises(video.VideoError, match="'cut'"):
    video.sample_clips(v[: len(v) // 2], None, trailer_id="cut")
  for data in (b"", b"not a video" * 50):
    with pytest.raises(video.VideoError, match="'e'.*cannot open"):
      video.sample_clips(data, None, trailer_id="e")


def test_zero_video_frames(tmp_path):
  path = str(tmp_path / "audio_only.mp4")
  with av.open(path, "w") as c:
    c.add_stream("libx264", rate=24).width = 64
    a = c.add_stream("aac", rate=8000)
    frame = av.AudioFrame.from_ndarray(
      np.zeros((1, 1024), np.float32), format="fltp", layout="mono"
    )
    frame.sample_rate, frame.pts = 8000, 0
    for p in list(a.encode(frame)) + list(a.encode()):
      c.mux(p)
  with pytest.raises(video.VideoError, match="'z'.*zero frames"):
    video.sample_clips(path, None, trailer_id="z")


def test_bad_shots(cfr):
  _, info = sample(cfr, np.array([[0, 60], [60, 130]]))  # End clamped to 120.
  np.testing.assert_array_equal(info["shot_lengths"], [60, 60])
  with pytest.raises(video.VideoError, match="'s'.*shot 1 .*beyond.*120"):
    video.sample_clips(cfr, np.array([[0, 60], [125, 130]]), trailer_id="s")
  with pytest.raises(video.VideoError, match="'s'.*shot 0 .*empty"):
    video.sample_clips(cfr, np.array([[5, 5]]), trailer_id="s")
