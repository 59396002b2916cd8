"""One JAX process of the multi-host extraction test: extract, then sync.

  python tests/multihost_extract_worker.py ROOT NUM_PROCESSES PROCESS_ID PORT

ROOT holds the converted backbones (vit/, vivit/) and the store (reps/).
Runs `extract.extract` and then the barrier `run.py` has after it; prints
the ids whose representations this process wrote.
"""

import json
import os
import sys

import multihost_common


def main():
  root, num_processes, process_id, port = sys.argv[1:5]
  multihost_common.start(int(num_processes), int(process_id), port, 1)
  from jax.experimental import multihost_utils

  from divita_jax import extract
  from divita_jax.pipelines import stores
  from tests import test_extract_multihost as t

  written = []
  write = stores.NpyStore.write
  stores.NpyStore.write = lambda self, i, a: (
    written.append(i) or write(self, i, a)
  )
  extract.extract(t.config(root), t.source(), t.IDS, os.path.join(root, "reps"))
  multihost_utils.sync_global_devices("representations extracted")
  print(json.dumps({"written": sorted(set(written))}))


if __name__ == "__main__":
  main()
