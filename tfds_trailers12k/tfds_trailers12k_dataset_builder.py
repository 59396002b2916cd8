"""TFDS builder `trailers12k`: trailers, shots, genres and folds.

One stored split, `trailers`; the three official folds are per-example
`split_assignment` rows (select them with `tfds_trailers12k.subset_indices`).
Configs: `synthetic` (generated), `raw` (manual_dir: mtgc.csv, videos/,
optional metadata.json), `reps` (manual_dir: mtgc.csv, optional
metadata.json: labels, folds and metadata only; the official zarr
representations are read in place by the run, not copied). See README.md
in this folder.

Built with `file_format=array_record` (no TensorFlow needed):
  tfds build tfds_trailers12k --config=synthetic --data_dir=DIR
  tfds build tfds_trailers12k --config=raw --manual_dir=MANUAL --data_dir=DIR
With a Beam runner or pipeline options in the DownloadConfig (`tfds build
--beam_pipeline_options=...`), the trailers are prepared by a Beam
pipeline (beam.py) instead of the local worker pool.
"""

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds
from absl import logging
from etils import epath

from tfds_trailers12k import (
  cut_rules,
  mtgc,
  prepared,
  synthetic,
  transcode,
)
from tfds_trailers12k.genres import NUM_FOLDS, NUM_GENRES
from tfds_trailers12k.workers import CRASHED, map_in_pool

RETRY_SKIPPED_ENV = "TRAILERS12K_RETRY_SKIPPED"


@dataclasses.dataclass(eq=False)
class Trailers12kConfig(tfds.core.BuilderConfig):
  """Config fields; which ones apply depends on `kind`."""

  kind: str = "synthetic"  # synthetic | raw | reps.
  # synthetic: trailers to generate and the generator's seed.
  num_trailers: int = 96
  seed: int = 0
  # synthetic / raw: shot detection (tfds_trailers12k/shots.py; threshold
  # 0 = the detector's default: 27 for content, 3.0 for adaptive, 0.5 for
  # transnetv2). Defaults: cut_rules.py's, the one place they are set.
  detector: str = "content"  # content | adaptive | transnetv2.
  threshold: float = 0.0
  min_shot_len: int = cut_rules.DEFAULT_MIN_SHOT_LEN
  downscale: int = 0  # content / adaptive: 0 = auto, about 256 px wide.
  max_flash_len: int = cut_rules.DEFAULT_MAX_FLASH_LEN
  # transnetv2: a checkpoint directory (python -m divita_jax.convert
  # --source transnetv2); its weights' hash is part of the config name.
  checkpoint: str = ""
  # raw: re-encode to this height / fps (0 = keep the source's).
  reencode_height: int = 0
  reencode_fps: float = 0.0

  def shot_kwargs(self) -> dict:
    return dict(
      detector=self.detector,
      threshold=self.threshold or None,
      min_shot_len=self.min_shot_len,
      downscale=self.downscale,
      max_flash_len=self.max_flash_len,
      checkpoint=self.checkpoint,
    )


def _metadata_features() -> dict:
  return {k: tfds.features.Text() for k in mtgc.METADATA_KEYS}


def _features(cfg: Trailers12kConfig) -> tfds.features.FeaturesDict:
  f = {
    "id": tfds.features.Text(),
    "labels": tfds.features.Tensor(shape=(NUM_GENRES,), dtype=np.int32),
    "split_assignment": tfds.features.Tensor(
      shape=(NUM_FOLDS,), dtype=np.int32
    ),
    **_metadata_features(),
  }
  if cfg.kind == "reps":  # Features stay in the zarr groups.
    return tfds.features.FeaturesDict(f)
  f.update(
    video=tfds.features.Tensor(shape=(), dtype=np.object_),  # mp4 bytes.
    fps=tfds.features.Scalar(dtype=np.float32),
    num_frames=tfds.features.Scalar(dtype=np.int32),
    height=tfds.features.Scalar(dtype=np.int32),
    width=tfds.features.Scalar(dtype=np.int32),
    shots=tfds.features.Tensor(shape=(None, 2), dtype=np.int32),
  )
  if cfg.kind == "synthetic":
    f["true_shots"] = tfds.features.Tensor(shape=(None, 2), dtype=np.int32)
  return tfds.features.FeaturesDict(f)


class Trailers12k(tfds.core.GeneratorBasedBuilder):
  """Trailers12k movie trailers with shot boundaries and genre labels."""

  VERSION = tfds.core.Version("1.1.0")
  RELEASE_NOTES = {
    "1.0.0": "Initial release.",
    "1.1.0": "Synthetic trailers carry a genre-correlated AAC soundtrack.",
  }
  BUILDER_CONFIGS = [
    Trailers12kConfig(
      name="synthetic",
      kind="synthetic",
      description="Generated genre-correlated trailers (no download).",
    ),
    Trailers12kConfig(
      name="raw",
      kind="raw",
      description="Your trailer videos + mtgc.csv; shots detected.",
    ),
    Trailers12kConfig(
      name="reps",
      kind="reps",
      description="Labels, folds and metadata for the official zarr "
      "clip representations (read in place, not copied).",
    ),
  ]
  DEFAULT_CONFIG_NAME = "synthetic"
  # Worker processes for decoding/generation (0 = all cores). An attribute,
  # not a config field: it does not change the data.
  num_workers = 0
  # Set per build from its DownloadConfig (a Beam runner or options given),
  # and the ids the Beam pipeline prepares (None: none made yet).
  _use_beam = False
  _beam_ids = None
  MANUAL_DOWNLOAD_INSTRUCTIONS = """
  raw: put `mtgc.csv`, `videos/<mid>.mp4` (any container FFmpeg reads) and
  optionally `metadata.json` in manual_dir.
  reps: put `mtgc.csv` (and the official zarr groups the run reads, e.g.
  trailers_i_swin_fpc24.zarr) in manual_dir.
  """

  def __init__(self, *, file_format=None, **kwargs):
    # array_record by default (random access, no TensorFlow), also for the
    # `tfds build` CLI, which passes file_format only when given.
    super().__init__(file_format=file_format or "array_record", **kwargs)
    # The final data_path (during a build it points to a temporary folder).
    self._prepared_root = f"{self.data_path}.prepared"

  def _info(self) -> tfds.core.DatasetInfo:
    return self.dataset_info_from_configs(
      features=_features(self.builder_config),
      supervised_keys=None,
      homepage="https://github.com/richardtml/DIViTA",
      metadata=tfds.core.MetadataDict(skipped=[]),
    )

  # TFDS prints "Downloading and preparing dataset Unknown size ..." and
  # "... downloaded and prepared" to stdout around every build: nothing is
  # downloaded here, and `build` prints its own summary. Logged instead.
  def _log_download_bytes(self) -> None:
    logging.info("Building %s into %s.", self.info.full_name, self.data_dir)

  def _log_download_done(self) -> None:
    logging.info("Built %s in %s.", self.info.full_name, self.data_dir)

  def _download_and_prepare(self, dl_manager, download_config):
    # Beam when a runner or pipeline options are given (`build(...,
    # beam_runner=...)`, `tfds build --beam_pipeline_options=...`).
    self._use_beam = bool(
      download_config.beam_runner or download_config.beam_options
    )
    try:
      super()._download_and_prepare(dl_manager, download_config)
    except Exception as e:
      # TFDS's Beam writer fails on zero examples with its own message.
      if self._beam_finished() and not self._beam_skips():
        raise self._nothing_survived() from e
      raise

  def _post_download_and_prepare_hook(self) -> None:
    self.prepared().remove()  # Now in the dataset's own files.

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    cfg = self.builder_config
    if cfg.kind not in ("synthetic", "raw", "reps"):
      raise ValueError(f"Unknown trailers12k config kind {cfg.kind!r}.")
    self.info.metadata["skipped"] = []
    root = None if cfg.kind == "synthetic" else dl_manager.manual_dir
    root = root and epath.Path(root)
    # reps has no expensive step per trailer: always the local build.
    if self._use_beam and cfg.kind != "reps":
      return {"trailers": self._beam_examples(root)}
    return {"trailers": self._generate_examples(root)}

  def _generate_examples(self, root: epath.Path | None):
    """Yields (id, features) of the configured kind; skips bad trailers."""
    count = 0
    for example in self._examples(root):
      count += 1
      yield example
    if not count:
      raise self._nothing_survived()

  def _nothing_survived(self) -> ValueError:
    skipped = self.info.metadata["skipped"]
    reasons = "; ".join(f"{s['id']}: {s['reason']}" for s in skipped[:3])
    return ValueError(
      f"No trailer survived the build of trailers12k/"
      f"{self.builder_config.name}: {len(skipped)} skipped (first: "
      f"{reasons or 'none listed'}). Saved skips are re-attempted with "
      "retry_skipped=True (python -m tfds_trailers12k --retry_skipped)."
    )

  def _examples(self, root: epath.Path | None):
    if self.builder_config.kind == "reps":
      yield from self._generate_reps(root)
      return
    jobs = self._jobs(root)
    desc = f"{self.builder_config.kind} trailers"
    results = self._prepare([item for _, item, _ in jobs], desc)
    for (mid, _, common), (_, ex, reason) in zip(jobs, results):
      if ex is None:
        self._skip(mid, reason)
        continue
      yield mid, {**common, **ex}

  def _skip(self, mid: str, reason: str) -> None:
    self.info.metadata["skipped"].append({"id": mid, "reason": reason})

  def _common(self, mid, labels, split, meta: dict) -> dict:
    return dict(
      id=mid,
      labels=np.asarray(labels, np.int32),
      split_assignment=np.asarray(split, np.int32),
      **{k: meta.get(k, "") for k in mtgc.METADATA_KEYS},
    )

  def prepared(self) -> prepared.PreparedExamples:
    """Where this config's prepared trailers wait for the TFDS writer."""
    return prepared.PreparedExamples(self._prepared_root)

  def _worker(self):
    """(worker fn, item -> trailer id) of this config's expensive step."""
    if self.builder_config.kind == "synthetic":
      return synthetic.synthetic_example, lambda it: synthetic.trailer_id(it[0])
    return transcode.raw_example, lambda it: it[0]

  def _retry_skipped(self) -> bool:
    """build(retry_skipped=True), or `python -m tfds_trailers12k
    --retry_skipped` (through the environment, as `tfds build` has no such
    flag)."""
    retry = getattr(self, "retry_skipped", None)
    if retry is None:
      retry = os.environ.get(RETRY_SKIPPED_ENV) == "1"
    return bool(retry)

  def _prepare(self, items: list, desc: str):
    """Yields worker results for items in order: saved ones, or computed.

    Each computed result is saved before it is yielded, so a killed build
    leaves it for the next one.
    """
    fn, key = self._worker()
    store = self.prepared()
    todo = [it for it in items if not store.has(key(it))]
    if self._retry_skipped():
      done = [it for it in items if it not in todo]
      skipped = [it for it in done if store.skipped(key(it))]
      if skipped:
        print(f"Re-attempting {len(skipped)} trailers skipped earlier.")
      todo += skipped
    todo_ids = {key(it) for it in todo}
    self.prepared_counts = dict(reused=len(items) - len(todo), computed=0)
    computed = map_in_pool(
      fn,
      todo,
      self.num_workers,
      desc,
      lambda it, detail: (key(it), None, f"{CRASHED}: {detail}"),
    )
    for it in items:
      if key(it) not in todo_ids:
        yield store.load(key(it))
        continue
      result = next(computed)
      store.save(*result)
      self.prepared_counts["computed"] += 1
      yield result

  def _beam_examples(self, root: epath.Path | None):
    """The Beam pipeline's PTransform of (id, example) (see beam.py)."""
    from tfds_trailers12k import beam  # noqa: PLC0415 - only with Beam.

    jobs = self._jobs(root)
    self._beam_ids = [mid for mid, _, _ in jobs]
    fn, _ = self._worker()
    root = os.fspath(self._prepared_root)
    return beam.Examples(jobs, fn, root, self._retry_skipped())

  def _process_pipeline_result(self, pipeline_result) -> None:
    """After the Beam pipeline: counts, and the skips from the saved
    results, in the local build's order."""
    from tfds_trailers12k import beam  # noqa: PLC0415 - only with Beam.

    counts = beam.counts(pipeline_result)
    self.prepared_counts = dict(
      reused=counts["reused"], computed=counts["computed"]
    )
    self._beam_skips()  # None kept: the writer failed the pipeline.

  def _beam_finished(self) -> bool:
    """Every trailer of the Beam pipeline has its result saved."""
    ids, store = self._beam_ids, self.prepared()
    return ids is not None and all(store.has(mid) for mid in ids)

  def _beam_skips(self) -> int:
    """Records the Beam build's skips from the saved results, in the local
    build's order; returns how many trailers were kept."""
    store, kept = self.prepared(), 0
    for mid in self._beam_ids:
      reason = store.reason(mid)
      if reason:
        self._skip(mid, reason)
      kept += not reason
    return kept

  def _jobs(self, root: epath.Path | None) -> list:
    """(id, worker item, labels/folds/metadata) of every trailer to
    prepare; trailers without a video are skipped here."""
    if root is None:
      return self._synthetic_jobs()
    # Parsed before any video work: a malformed file fails fast.
    ann = mtgc.read_mtgc(root / "mtgc.csv")
    meta = mtgc.read_metadata(root / "metadata.json")
    return self._raw_jobs(root, ann, meta)

  def _synthetic_jobs(self) -> list:
    cfg = self.builder_config
    gen = synthetic.SyntheticConfig(
      num_trailers=cfg.num_trailers, seed=cfg.seed
    )
    labels = synthetic.sample_labels(gen)  # [N, 10]
    folds = synthetic.sample_folds(labels, gen.seed)  # [N, 3]
    jobs = []
    for i in range(gen.num_trailers):
      mid = synthetic.trailer_id(i)
      # Title and year come with the generated trailer.
      common = self._common(mid, labels[i], folds[i], {})
      jobs.append((mid, (i, gen, labels[i], cfg.shot_kwargs()), common))
    return jobs

  def _raw_jobs(self, root: epath.Path, ann: mtgc.Annotations, meta) -> list:
    cfg = self.builder_config
    videos = {}  # mid -> file; any container, mp4 preferred.
    if (root / "videos").is_dir():
      for p in sorted((root / "videos").iterdir()):
        if p.stem not in videos or p.suffix.lower() == ".mp4":
          videos[p.stem] = p
    jobs = []
    for i, mid in enumerate(ann.ids):
      if mid not in videos:
        self._skip(mid, "missing file")
        continue
      item = (
        mid,
        str(videos[mid]),
        cfg.reencode_height,
        cfg.reencode_fps,
        cfg.shot_kwargs(),
      )
      row = (ann.labels[i], ann.splits[i], meta.get(mid, {}))
      jobs.append((mid, item, self._common(mid, *row)))
    return jobs

  def _generate_reps(self, root: epath.Path):
    """Every trailer of mtgc.csv; which ones have representations is the
    run's business (`run.available` drops the ones missing from a group)."""
    ann = mtgc.read_mtgc(root / "mtgc.csv")
    meta = mtgc.read_metadata(root / "metadata.json")
    for i, mid in enumerate(ann.ids):
      yield (
        mid,
        self._common(mid, ann.labels[i], ann.splits[i], meta.get(mid, {})),
      )
