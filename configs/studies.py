r"""The paper's analyses as named studies: each a grid over config fields.

  python -m divita_jax.study --config=configs/divita.py:runlocal \
    --study=frame_rate --workdir=/tmp/study_fps
  python -m divita_jax.study --config=configs/divita.py:trailers12k \
    --config.dataset.manual_dir=MANUAL --study=backbones --workdir=DIR

`get_study(name, config)` returns the study for the base config: real data
(`:trailers12k`, `:reps`) gets the paper's values, the synthetic data small
ones that run in minutes. A study is a dict:

  axes:     {axis: {label: {config field: value}}}, in order; the first
            axis is the plot's x axis, the second its lines.
  baseline: {axis: label}, the reference setting of the deltas.
  claims:   the paper's claims about the study: what, the setting, the
            reference settings (the best of them by test muAP), the
            paper's number and its kind: `delta` (test muAP points),
            `params` or `gmacs` (the setting's backbones as % of the
            reference's).
  costs:    True: the table has the backbones' parameters and GMACs.
"""

from divita_jax.configs import divita


def _axis(field: str, values) -> dict:
  """One field swept: {label: {field: value}}; floats labelled like 8."""
  return {
    f"{v:g}" if isinstance(v, float) else str(v): {field: v} for v in values
  }


def _real(config) -> bool:
  return config.dataset.config != "synthetic"


_BRANCHES = {
  "image": {"model.branches": ("image",)},
  "video": {"model.branches": ("video",)},
  "late": {"model.branches": ("image", "video"), "model.fusion": "late"},
  "early": {"model.branches": ("image", "video"), "model.fusion": "early"},
}
_CAMS = ("savg", "tsfm_128_4_6_0.25", "gru_1_115", "conv_3_128")


def frame_rate(config) -> dict:
  fps = (3.0, 6.0, 12.0, 24.0) if _real(config) else (2.0, 4.0, 8.0)
  axes = {"clips.fps": _axis("clips.fps", fps)}
  return dict(axes=axes, baseline={"clips.fps": f"{fps[-1]:g}"})


def clip_length(config) -> dict:
  frames = (4, 8, 16, 24) if _real(config) else (2, 4, 8)
  axes = {"clips.frames_per_clip": _axis("clips.frames_per_clip", frames)}
  return dict(axes=axes, baseline={"clips.frames_per_clip": str(frames[-1])})


def input_extension(config) -> dict:
  """How much of the trailer the head sees: clips per window, per shot."""
  num_clips = (5, 10, 20, 30) if _real(config) else (4, 8, 16, 30)
  axes = {
    "train.num_clips": _axis("train.num_clips", num_clips),
    "clips.max_clips_per_shot": _axis("clips.max_clips_per_shot", (1, 2)),
  }
  baseline = {"train.num_clips": "30", "clips.max_clips_per_shot": "1"}
  return dict(axes=axes, baseline=baseline)


def spatiotemporal(config) -> dict:
  """Image only / video only / late / early fusion x the CAM families."""
  axes = {"input": _BRANCHES, "model.cam": _axis("model.cam", _CAMS)}
  baseline = {"input": "late", "model.cam": "tsfm_128_4_6_0.25"}
  return dict(axes=axes, baseline=baseline)


def segmentation(config) -> dict:
  """Shot-based vs fixed-length clips, per branch (abstract: +1.83
  ImageNet, +3.75 Kinetics)."""
  axes = {
    "clips.segmentation": _axis("clips.segmentation", ("fixed", "shots")),
    "input": {k: _BRANCHES[k] for k in ("image", "video")},
  }
  baseline = {"clips.segmentation": "fixed", "input": "image"}
  claims = [
    dict(
      what=f"shots vs fixed clips, {branch} branch",
      setting={"clips.segmentation": "shots", "input": branch},
      reference=[{"clips.segmentation": "fixed", "input": branch}],
      paper=paper,
      kind="delta",
    )
    for branch, paper in (("image", 1.83), ("video", 3.75))
  ]
  return dict(axes=axes, baseline=baseline, claims=claims)


def fusion(config) -> dict:
  """Both pretrainings fused vs the best single one (abstract: +2.91)."""
  axes = {"input": _BRANCHES}
  claims = [
    dict(
      what="late fusion vs the best single branch",
      setting={"input": "late"},
      reference=[{"input": "image"}, {"input": "video"}],
      paper=2.91,
      kind="delta",
    )
  ]
  return dict(axes=axes, baseline={"input": "image"}, claims=claims)


def _pair(name: str, config) -> dict:
  """The backbone fields of a Table 6 pair (configs/divita.py's tables);
  real checkpoints under the config's checkpoints_dir."""
  real = _real(config)
  fields = {}
  for i, branch in enumerate(("image", "video")):
    b = f"backbones.{branch}"
    if real:
      kind, folder, resolution = divita.TABLE6[name][i]
      checkpoint = f"{config.checkpoints_dir}/{folder}"
      fields.update(
        {
          f"{b}.kind": kind,
          f"{b}.checkpoint": checkpoint,
          f"{b}.resolution": resolution,
        }
      )
    else:
      kind, variant = divita.TINY[name][i]
      fields.update({f"{b}.kind": kind, f"{b}.variant": variant})
  return fields


def backbones(config) -> dict:
  """The Table 6 pairs (abstract: the light ConvNet pair loses 3.46% to the
  top Transformer with 11.82% of its parameters and 0.81% of its FLOPs)."""
  names = ("shufflenet", "resnet", "swin")
  axes = {"backbones": {n: _pair(n, config) for n in names}}
  light, top = {"backbones": "shufflenet"}, [{"backbones": "swin"}]
  claims = [
    dict(
      what="ShuffleNet pair vs Swin pair, test muAP",
      setting=light,
      reference=top,
      paper=-3.46,
      kind="delta",
    ),
    dict(
      what="ShuffleNet pair backbone parameters, % of Swin's",
      setting=light,
      reference=top,
      paper=11.82,
      kind="params",
    ),
    dict(
      what="ShuffleNet pair GMACs per clip, % of Swin's",
      setting=light,
      reference=top,
      paper=0.81,
      kind="gmacs",
    ),
  ]
  return dict(axes=axes, baseline=top[0], claims=claims, costs=True)


STUDIES = {
  "frame_rate": frame_rate,
  "clip_length": clip_length,
  "input_extension": input_extension,
  "spatiotemporal": spatiotemporal,
  "segmentation": segmentation,
  "fusion": fusion,
  "backbones": backbones,
}


def get_study(name: str, config) -> dict:
  if name not in STUDIES:
    raise ValueError(f"unknown study {name!r}; known: {', '.join(STUDIES)}")
  return {"claims": [], "costs": False, **STUDIES[name](config)}
