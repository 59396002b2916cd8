"""One JAX process of the multi-host data test: build + extract, then report.

  python tests/multihost_data_worker.py WORKDIR OUT.json NUM_PROCESSES \
    PROCESS_ID PORT

Runs the real stages of `divita_jax.run` (dataset build, representation
extraction) on a tiny synthetic config, and records which trailers this
process prepared and which representation files it wrote (by wrapping the
two writers; they still write), and whether apache_beam was imported.
"""

import json
import sys

import multihost_common

workdir, out, num_processes, process_id, port = sys.argv[1:6]
multihost_common.start(int(num_processes), int(process_id), port, 2)

from divita_jax import run  # noqa: E402
from divita_jax.configs import divita  # noqa: E402
from divita_jax.pipelines import stores  # noqa: E402
from tfds_trailers12k import prepared  # noqa: E402

saved, written = [], []


def spy(method, log):
  def wrapped(self, key, *args):
    log.append(key)
    return method(self, key, *args)

  return wrapped


prepared.PreparedExamples.save = spy(prepared.PreparedExamples.save, saved)
stores.NpyStore.write = spy(stores.NpyStore.write, written)


def main():
  config = divita.get_config("runlocal")
  config.dataset.num_trailers = 8
  config.dataset.num_workers = 1
  builder, index = run.ensure_dataset(config, workdir)
  readers = run.representation_readers(config, workdir, builder, index)
  complete = [all(r.has(i) for r in readers.values()) for i in index["ids"]]
  with open(out, "w") as f:
    json.dump(
      dict(
        ids=list(index["ids"]),
        saved=saved,
        written=written,
        complete=complete,
        branches=list(readers),
        beam_imported="apache_beam" in sys.modules,
      ),
      f,
    )


main()
