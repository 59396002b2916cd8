r"""Build throughput: the local worker pool vs Beam's FnApiRunner.

Builds the synthetic trailers12k (96 trailers by default) into fresh
directories, on the same number of processes:
  local   tfds_trailers12k.build(num_workers=W): W worker processes, the
          main process writes array_record;
  beam    FnApiRunner, direct_num_workers=W, multi_processing: W SDK worker
          processes (each running the trailers in a child), TFDS's Beam
          writer;
then both again from a folder of trailers prepared earlier (nothing to
compute: start-up, loading, shuffle and writing only), and a trivial Beam
pipeline (the runner's fixed start-up). The difference between the two
full builds splits into the second pair's difference (fixed costs) and the
rest (the work itself: static split over the workers, child processes).

  python benchmarks/dataset_build.py               # 96 trailers, 2 workers
  python benchmarks/dataset_build.py --workers=8 --num_trailers=384
  python benchmarks/dataset_build.py --smoke       # 4 trailers (CI)
"""

import argparse
import os
import shutil
import tempfile
import time

import loadavg  # benchmarks/loadavg.py, beside this script.

import tfds_trailers12k

RUNNER = "FnApiRunner"


def _beam_options(workers: int) -> str:
  mode = "--direct_running_mode=multi_processing"
  return f"--direct_num_workers={workers},{mode}"


def _build(data_dir, num_trailers, workers, beam, keep=None) -> float:
  """Wall seconds of one build; `keep`: copy its prepared trailers there."""
  cls = tfds_trailers12k.Trailers12k
  hook = cls._post_download_and_prepare_hook
  if keep:  # The hook would delete them once the dataset is written.
    cls._post_download_and_prepare_hook = lambda self: shutil.copytree(
      self._prepared_root, keep
    )
  kwargs = dict(beam_runner=RUNNER, beam_options=_beam_options(workers))
  start = time.perf_counter()
  try:
    tfds_trailers12k.build(
      "synthetic",
      data_dir,
      num_trailers=num_trailers,
      num_workers=workers,
      **(kwargs if beam else {}),
    )
  finally:
    cls._post_download_and_prepare_hook = hook
  return time.perf_counter() - start


def _prepared_root(data_dir, num_trailers) -> str:
  cfg = tfds_trailers12k.make_config("synthetic", num_trailers=num_trailers)
  builder = tfds_trailers12k.Trailers12k(config=cfg, data_dir=data_dir)
  return builder._prepared_root


def _trivial_pipeline(workers: int) -> float:
  """Seconds of Create -> Reshuffle -> Map on the same runner settings."""
  import apache_beam as beam  # noqa: PLC0415

  from tfds_trailers12k.beam import pipeline_options  # noqa: PLC0415

  start = time.perf_counter()
  options = pipeline_options(_beam_options(workers))
  with beam.Pipeline(runner=RUNNER, options=options) as p:
    _ = p | beam.Create(range(8)) | beam.Reshuffle() | beam.Map(abs)
  return time.perf_counter() - start


def measure(tmp: str, num_trailers: int, workers: int) -> dict:
  """{row name: wall seconds}."""
  kept = os.path.join(tmp, "kept")
  out = {
    "local": _build(f"{tmp}/local", num_trailers, workers, False, kept),
    "beam": _build(f"{tmp}/beam", num_trailers, workers, True),
  }
  for name, beam in (("local, prepared", False), ("beam, prepared", True)):
    data_dir = f"{tmp}/{name.replace(', ', '_')}"
    shutil.copytree(kept, _prepared_root(data_dir, num_trailers))
    out[name] = _build(data_dir, num_trailers, workers, beam)
  out["beam, trivial pipeline"] = _trivial_pipeline(workers)
  return out


def table(times: dict, num_trailers: int, workers: int, mark: str) -> str:
  rows = [
    f"| build ({workers} processes, {num_trailers} trailers) | wall s | "
    "trailers/s | vs local |",
    "|---|---|---|---|",
  ]
  for name, seconds in times.items():
    full = name in ("local", "beam")  # The others: fixed costs only.
    ratio = f"{times['local'] / seconds:.2f}x{mark}" if full else "-"
    rate = num_trailers / seconds if "trivial" not in name else 0.0
    rows.append(f"| {name} | {seconds:.1f} | {rate:.2f} | {ratio} |")
  fixed = times["beam, prepared"] - times["local, prepared"]
  rest = times["beam"] - times["local"] - fixed
  rows.append(
    f"\nbeam - local: {times['beam'] - times['local']:.1f} s = fixed "
    f"costs {fixed:.1f} s (start-up {times['beam, trivial pipeline']:.1f} "
    f"s, shuffle and writer) + {rest:.1f} s in the work itself"
  )
  return "\n".join(rows)


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--num_trailers", type=int, default=96)
  parser.add_argument("--workers", type=int, default=2)
  parser.add_argument("--smoke", action="store_true", help="4 trailers.")
  args = parser.parse_args()
  num = 4 if args.smoke else args.num_trailers
  with tempfile.TemporaryDirectory() as tmp, loadavg.Watch() as load:
    times = measure(tmp, num, args.workers)
  print(table(times, num, args.workers, " (under load)" if load.busy else ""))
  print(load.report())


if __name__ == "__main__":
  main()
