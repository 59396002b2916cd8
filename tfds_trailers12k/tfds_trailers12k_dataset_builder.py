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
"""

import dataclasses
import os

import numpy as np
import tensorflow_datasets as tfds
from etils import epath

from tfds_trailers12k import (
  cut_rules,
  mtgc,
  prepared,
  synthetic,
  transcode,
)
from tfds_trailers12k.genres import NUM_FOLDS, NUM_GENRES
from tfds_trailers12k.workers import map_in_pool

RETRY_SKIPPED_ENV = "TRAILERS12K_RETRY_SKIPPED"
# Two fresh worker processes died on the file in a row (a decoder crash on
# a corrupt or hostile file); environment failures never get here.
_CRASHED = "the file killed its worker process twice (decoder crash)"


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

  def _split_generators(self, dl_manager: tfds.download.DownloadManager):
    cfg = self.builder_config
    if cfg.kind not in ("synthetic", "raw", "reps"):
      raise ValueError(f"Unknown trailers12k config kind {cfg.kind!r}.")
    self.info.metadata["skipped"] = []
    if cfg.kind == "synthetic":
      return {"trailers": self._generate_examples(None)}
    root = epath.Path(dl_manager.manual_dir)
    return {"trailers": self._generate_examples(root)}

  def _generate_examples(self, root: epath.Path | None):
    """Yields (id, features) of the configured kind; skips bad trailers."""
    count = 0
    for example in self._examples(root):
      count += 1
      yield example
    if not count:
      skipped = self.info.metadata["skipped"]
      reasons = "; ".join(f"{s['id']}: {s['reason']}" for s in skipped[:3])
      raise ValueError(
        f"No trailer survived the build of trailers12k/"
        f"{self.builder_config.name}: {len(skipped)} skipped (first: "
        f"{reasons or 'none listed'}). Saved skips are re-attempted with "
        "retry_skipped=True (python -m tfds_trailers12k --retry_skipped)."
      )

  def _examples(self, root: epath.Path | None):
    if root is None:
      yield from self._generate_synthetic()
      return
    # Parsed before any video work: a malformed file fails fast.
    ann = mtgc.read_mtgc(root / "mtgc.csv")
    meta = mtgc.read_metadata(root / "metadata.json")
    if self.builder_config.kind == "raw":
      yield from self._generate_raw(root, ann, meta)
    else:
      yield from self._generate_reps(ann, meta)

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
    (or another process's `prepare_share`) leaves it for the next one.
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
      lambda it, detail: (key(it), None, f"{_CRASHED}: {detail}"),
    )
    for it in items:
      if key(it) not in todo_ids:
        yield store.load(key(it))
        continue
      result = next(computed)
      store.save(*result)
      self.prepared_counts["computed"] += 1
      yield result

  def prepare_share(
    self, manual_dir: str | None, process_index: int, process_count: int
  ) -> list[str]:
    """Prepares every process_count-th trailer; returns the ids computed.

    The multi-host build: each process prepares its share, then (after a
    barrier) process 0 writes the dataset from the saved results.
    Trailers already prepared are not redone. The reps config has no
    expensive per-trailer step: it prepares nothing.
    """
    kind = self.builder_config.kind
    if kind == "synthetic":
      items, *_ = self._synthetic_items()
    elif kind == "raw":
      root = epath.Path(manual_dir)
      items, *_ = self._raw_items(root, mtgc.read_mtgc(root / "mtgc.csv"))
    else:
      return []
    share = items[process_index::process_count]
    _, key = self._worker()
    todo = [key(it) for it in share if not self.prepared().has(key(it))]
    for _ in self._prepare(share, f"prepare {process_index}/{process_count}"):
      pass
    return todo

  def _synthetic_items(self):
    """Worker items of every synthetic trailer, their labels and folds."""
    cfg = self.builder_config
    gen = synthetic.SyntheticConfig(
      num_trailers=cfg.num_trailers, seed=cfg.seed
    )
    labels = synthetic.sample_labels(gen)  # [N, 10]
    folds = synthetic.sample_folds(labels, gen.seed)  # [N, 3]
    items = [
      (i, gen, labels[i], cfg.shot_kwargs()) for i in range(gen.num_trailers)
    ]
    return items, labels, folds

  def _generate_synthetic(self):
    items, labels, folds = self._synthetic_items()
    results = self._prepare(items, "synthetic trailers")
    for (i, *_), (mid, ex, reason) in zip(items, results):
      if ex is None:
        self._skip(mid, reason)
        continue
      meta = dict(title=ex.pop("title"), year=ex.pop("year"))
      yield mid, {**self._common(mid, labels[i], folds[i], meta), **ex}

  def _raw_items(self, root: epath.Path, ann: mtgc.Annotations):
    """Worker items and rows of trailers with a video; ids without one."""
    cfg = self.builder_config
    videos = {}  # mid -> file; any container, mp4 preferred.
    if (root / "videos").is_dir():
      for p in sorted((root / "videos").iterdir()):
        if p.stem not in videos or p.suffix.lower() == ".mp4":
          videos[p.stem] = p
    items, rows, missing = [], [], []
    for i, mid in enumerate(ann.ids):
      if mid not in videos:
        missing.append(mid)
        continue
      rows.append(i)
      items.append(
        (
          mid,
          str(videos[mid]),
          cfg.reencode_height,
          cfg.reencode_fps,
          cfg.shot_kwargs(),
        )
      )
    return items, rows, missing

  def _generate_raw(self, root: epath.Path, ann: mtgc.Annotations, meta):
    items, rows, missing = self._raw_items(root, ann)
    for mid in missing:
      self._skip(mid, "missing file")
    results = self._prepare(items, "raw trailers")
    for i, (mid, ex, reason) in zip(rows, results):
      if ex is None:
        self._skip(mid, reason)
        continue
      yield (
        mid,
        {
          **self._common(mid, ann.labels[i], ann.splits[i], meta.get(mid, {})),
          **ex,
        },
      )

  def _generate_reps(self, ann: mtgc.Annotations, meta):
    """Every trailer of mtgc.csv; which ones have representations is the
    run's business (`run.available` drops the ones missing from a group)."""
    for i, mid in enumerate(ann.ids):
      yield (
        mid,
        self._common(mid, ann.labels[i], ann.splits[i], meta.get(mid, {})),
      )
