"""The Beam build: trailers decoded and scored by a Beam pipeline's workers.

Imported only when a build is given a Beam runner or pipeline options (the
local build never imports apache_beam). The pipeline is

  jobs (id, worker item, labels/folds/metadata)
    -> Reshuffle (spread the trailers over the workers)
    -> Prepare: the trailer's result from the prepared folder, or computed
       (decode + shot detection) in a child process and saved there
    -> (id, example) for TFDS's Beam writer (array_record).

Nothing of the builder is pickled: the step is a module-level function of
this package (synthetic or transcode), pickled by reference and imported
by the worker. The prepared folder is on the data_dir, which every worker
must see as a POSIX path (NFS, Filestore, gcsfuse: array_record cannot
write gs://). A rerun of a pipeline that died reuses every trailer it
saved; skipped trailers are saved with their reason, as in the local
build, and counted (`reused`, `computed`, `skipped`, namespace trailers12k).
"""

import re

import apache_beam as beam
import tensorflow_datasets as tfds
from apache_beam.options.pipeline_options import PipelineOptions

from tfds_trailers12k import prepared, workers

NAMESPACE = "trailers12k"
COUNTERS = ("reused", "computed", "skipped")


def pipeline_options(options) -> PipelineOptions | None:
  """PipelineOptions from a string of flags, a list of flags, or as given.

  A string splits before each `--` at commas or spaces, so values with
  commas stay whole: "--direct_num_workers=0,--experiments=a,b".
  """
  if not options or isinstance(options, PipelineOptions):
    return options or None
  if isinstance(options, str):
    options = [f for f in re.split(r"[,\s]+(?=--)", options.strip()) if f]
  bad = [f for f in options if not f.startswith("--")]
  if bad:
    raise ValueError(
      f"beam_options: {bad[0]!r} is not a flag; expected --name=value "
      "flags separated by commas or spaces."
    )
  return PipelineOptions(flags=list(options))


class Prepare(beam.DoFn):
  """(id, item, common) -> (id, example); skipped trailers emit nothing."""

  def __init__(self, fn, root: str, retry_skipped: bool):
    self._fn, self._root, self._retry = fn, root, retry_skipped

  def setup(self):
    self._store = prepared.PreparedExamples(self._root)
    self._worker = workers.IsolatedWorker()

  def _reusable(self, mid: str) -> bool:
    if not self._store.has(mid):
      return False
    return not (self._retry and self._store.skipped(mid))

  def process(self, job):
    mid, item, common = job
    if self._reusable(mid):
      result = self._store.load(mid)
      tfds.beam.inc_counter("reused", namespace=NAMESPACE)
    else:
      crashed = lambda it, detail: (mid, None, f"{workers.CRASHED}: {detail}")
      result = self._worker.run(self._fn, item, crashed)
      self._store.save(*result)
      tfds.beam.inc_counter("computed", namespace=NAMESPACE)
    _, ex, _ = result
    if ex is None:
      tfds.beam.inc_counter("skipped", namespace=NAMESPACE)
      return
    yield mid, {**common, **ex}

  def teardown(self):
    self._worker.close()


@beam.ptransform_fn
def Examples(pipeline, jobs: list, fn, root: str, retry_skipped: bool):  # noqa: N802
  """The (id, example) pairs of `jobs` [(id, item, common)]."""
  return (
    pipeline
    | "Jobs" >> beam.Create(jobs)
    | "Spread" >> beam.Reshuffle()
    | "Prepare" >> beam.ParDo(Prepare(fn, root, retry_skipped))
  )


def counts(result) -> dict:
  """{reused, computed, skipped} of a finished pipeline (committed counts
  where the runner has them)."""
  query = result.metrics().query(
    beam.metrics.MetricsFilter().with_namespace(NAMESPACE)
  )
  out = dict.fromkeys(COUNTERS, 0)
  for c in query["counters"]:
    value = c.committed if c.committed is not None else c.attempted
    out[c.key.metric.name] += value
  return out
