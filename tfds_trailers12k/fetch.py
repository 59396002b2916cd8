"""Trailers12k's trailers from YouTube, by the ids in its `metadata.json`.

  pip install -e '.[fetch]'   # yt-dlp
  python -m tfds_trailers12k.fetch --metadata MANUAL/metadata.json \
    --mtgc MANUAL/mtgc.csv --out MANUAL/videos

Each movie's trailer ids are tried in order; the first that downloads and
decodes (PyAV: a video stream with a decodable frame) becomes
`OUT/<mid>.mp4`. By default the best format up to 720p with audio, H.264/AAC
preferred (`--format`, yt-dlp's syntax; merging video and audio needs
ffmpeg on PATH, without it YouTube's single-file formats, often 360p, are
used). Downloads go to `OUT/.fetch_tmp/<mid>/` (yt-dlp's `.part` files,
continued after an interruption) and are moved into place once complete
and valid. `OUT/fetch_manifest.json` records every movie: `ok` with its
file, id, size and height, or `failed` with a `reason` (see
`youtube.REASONS`) and each attempt's yt-dlp message. A rerun skips the
movies present and the permanent failures (`--retry_failed` retries those
too) and retries the transient ones (network, rate-limited). Runs stop
early when YouTube keeps rate-limiting; rerun later, with a longer
`--sleep`.

You run this under YouTube's Terms of Service and the copyright of each
trailer; the dataset's authors do not redistribute the videos. Fetch only
what you may, keep the defaults polite (a few jobs, a pause between
downloads, `--rate_limit`), and do not share the files.
"""

import argparse
import concurrent.futures
import contextlib
import os
import re
import shutil
import sys
import threading
import time

import av

from tfds_trailers12k import fetch_manifest, youtube

TMP_DIR = ".fetch_tmp"
TERMS = (
  "You run this under YouTube's Terms of Service and each trailer's "
  "copyright: fetch only what you may, keep it slow, do not share the files."
)
# Not retried by a rerun unless --retry_failed; the others ("network",
# "rate-limited", "needs-ffmpeg", "no-format", "other") are.
PERMANENT = {
  "private",
  "geo-blocked",
  "removed",
  "age-restricted",
  "unavailable",
  "not-a-video",
  "corrupt",
  "no-trailer-id",
}
STOP_AFTER_RATE_LIMITED = 5  # Consecutive movies; then stop the run.
SAVE_EVERY = 25  # Finished movies between manifest writes.


def validate_video(path: str) -> tuple[dict | None, str]:
  """({height, audio}, "") if PyAV decodes a video frame, else (None, why)."""
  try:
    with av.open(path) as container:
      if not container.streams.video:
        return None, "no video stream"
      stream = container.streams.video[0]
      for _ in container.decode(stream):
        info = {"height": stream.height, "audio": bool(container.streams.audio)}
        return info, ""
      return None, "no decodable video frame"
  except (av.FFmpegError, OSError, ValueError) as e:
    return None, f"{type(e).__name__}: {e}"


def _attempt(yid: str, mid: str, out: str, opts: youtube.Options) -> dict:
  """Fetches and validates one id; the ok record or the failed attempt."""
  from yt_dlp.utils import YoutubeDLError

  tmp = os.path.join(out, TMP_DIR, mid)
  try:
    path = youtube.download(yid, tmp, opts)
  except YoutubeDLError as e:
    reason, message = youtube.failure(e)
    return {"youtube_id": yid, "reason": reason, "message": message}
  info, why = validate_video(path)
  if info is None:
    os.remove(path)  # Nothing worth resuming: a rerun starts anew.
    return {"youtube_id": yid, "reason": "corrupt", "message": why}
  name = mid + os.path.splitext(path)[1]
  os.replace(path, os.path.join(out, name))
  shutil.rmtree(tmp, ignore_errors=True)
  size = os.path.getsize(os.path.join(out, name))
  ok = {"status": "ok", "file": name, "youtube_id": yid, "bytes": size}
  return {**ok, **info}


def fetch_movie(
  mid: str, ids: list[str], out: str, opts: youtube.Options
) -> dict:
  """Tries `ids` in order; the movie's manifest record."""
  attempts = []
  for yid in ids:
    result = _attempt(yid, mid, out, opts)
    time.sleep(opts.sleep)
    if result.get("status") == "ok":
      return {**result, "attempts": attempts}
    attempts.append(result)
  with contextlib.suppress(OSError):  # Unless a .part is left to resume.
    os.rmdir(os.path.join(out, TMP_DIR, mid))
  if not ids:
    why = "no YouTube id in metadata.json"
    attempts.append(
      {"youtube_id": "", "reason": "no-trailer-id", "message": why}
    )
  retry = any(a["reason"] not in PERMANENT for a in attempts)
  reason = next(
    (a["reason"] for a in attempts if a["reason"] not in PERMANENT),
    attempts[-1]["reason"],
  )
  record = {"status": "failed", "reason": reason, "retry": retry}
  return {**record, "attempts": attempts}


def _present(mid: str, record: dict | None, out: str) -> dict | None:
  """The ok record of a video already in `out`, or None.

  A file the manifest lists as fetched, at its recorded size, is trusted;
  any other `<mid>.mp4` (e.g. your own copy) is decoded first.
  """
  if record and record.get("status") == "ok":
    path = os.path.join(out, record["file"])
    if os.path.isfile(path) and os.path.getsize(path) == record["bytes"]:
      return record
  path = os.path.join(out, f"{mid}.mp4")
  if not os.path.isfile(path) or validate_video(path)[0] is None:
    return None
  size = os.path.getsize(path)
  return {
    "status": "ok",
    "file": f"{mid}.mp4",
    "youtube_id": "",  # Not fetched here: unknown.
    "bytes": size,
    "attempts": [],
  }


def _plan(movies: dict, records: dict, out: str, opts: youtube.Options):
  """(records kept as they are, [(mid, ids)] to fetch)."""
  kept, todo = {}, []
  for mid, ids in movies.items():
    old = records.get(mid)
    present = _present(mid, old, out)
    if present:
      kept[mid] = present
    elif old and old["status"] == "failed" and not old["retry"]:
      if opts.retry_failed:
        todo.append((mid, ids))
      else:
        kept[mid] = old
    else:
      todo.append((mid, ids))
  return kept, todo


def _line(i: int, n: int, mid: str, record: dict) -> str:
  if record["status"] == "ok":
    mb = record["bytes"] / 1e6
    return f"[{i}/{n}] {mid} ok: {record['youtube_id']} ({mb:.1f} MB)"
  message = record["attempts"][-1]["message"][:160]
  return f"[{i}/{n}] {mid} failed: {record['reason']} ({message})"


def _fetch_pending(todo, records, out, opts, log) -> bool:
  """Fetches `todo` into `records`; True if stopped for rate limiting."""
  stop = threading.Event()
  rate_limited = False

  def job(mid, ids):
    return None if stop.is_set() else fetch_movie(mid, ids, out, opts)

  streak = 0
  with concurrent.futures.ThreadPoolExecutor(opts.jobs) as pool:
    futures = {pool.submit(job, mid, ids): mid for mid, ids in todo}
    try:
      done = concurrent.futures.as_completed(futures)
      for i, future in enumerate(done, 1):
        record = future.result()
        if record is None:  # Not started: the run was stopped.
          continue
        records[futures[future]] = record
        log(_line(i, len(todo), futures[future], record))
        limited = record.get("reason") == "rate-limited"
        streak = streak + 1 if limited else 0
        if streak >= STOP_AFTER_RATE_LIMITED and not rate_limited:
          rate_limited = True
          stop.set()
          log(f"{streak} movies in a row rate-limited: stopping.")
        if i % SAVE_EVERY == 0:
          fetch_manifest.save_manifest(out, records, opts)
    except KeyboardInterrupt:
      log("interrupted: finishing the downloads under way, starting none.")
      raise
    finally:
      stop.set()
      pool.shutdown(wait=False, cancel_futures=True)
      fetch_manifest.save_manifest(out, records, opts)
  return rate_limited


def fetch_all(movies: dict, out: str, opts: youtube.Options, log=print):
  """Fetches what `out` lacks; (the manifest's records, stopped early)."""
  os.makedirs(out, exist_ok=True)
  records = fetch_manifest.load_manifest(out)
  kept, todo = _plan(movies, records, out, opts)
  records.update(kept)
  present = sum(r["status"] == "ok" for r in kept.values())
  log(
    f"{len(movies)} movies: {present} present, {len(kept) - present} "
    f"known failures kept (--retry_failed), {len(todo)} to fetch."
  )
  stopped = _fetch_pending(todo, records, out, opts, log)
  with contextlib.suppress(OSError):  # Empty unless partial downloads.
    os.rmdir(os.path.join(out, TMP_DIR))
  return records, stopped


def _summary(movies: dict, records: dict, out: str) -> str:
  ours = [records[m] for m in movies if m in records]
  ok = sum(r["status"] == "ok" for r in ours)
  reasons = {}
  for r in ours:
    if r["status"] == "failed":
      reasons[r["reason"]] = reasons.get(r["reason"], 0) + 1
  detail = ", ".join(f"{k} {v}" for k, v in sorted(reasons.items()))
  return (
    f"{ok} of {len(movies)} trailers in {out}; {len(ours) - ok} failed"
    + (f" ({detail})" if detail else "")
    + f"; manifest: {os.path.join(out, fetch_manifest.MANIFEST)}"
  )


def _rate(text: str) -> int:
  """ "2M", "500K", "1.5M", "100000" -> bytes/s."""
  match = re.fullmatch(r"(\d+(?:\.\d+)?)([kKmMgG]?)", text.strip())
  if not match or float(match.group(1)) <= 0:
    raise argparse.ArgumentTypeError(f"{text!r} is not a rate like 2M or 500K")
  scale = {"": 1, "k": 2**10, "m": 2**20, "g": 2**30}
  return int(float(match.group(1)) * scale[match.group(2).lower()])


def _positive(kind):
  def parse(text):
    value = kind(text)
    if value < 0:
      raise argparse.ArgumentTypeError(f"{text!r} is negative")
    return value

  return parse


def parse_args(argv):
  p = argparse.ArgumentParser(
    prog="python -m tfds_trailers12k.fetch",
    formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    description="Downloads Trailers12k's trailers as OUT/<mid>.mp4 by the "
    "YouTube ids of metadata.json; resumable; OUT/fetch_manifest.json says "
    "what failed and why. " + TERMS,
  )
  p.add_argument("--metadata", required=True, help="Trailers12k metadata.json")
  p.add_argument("--out", required=True, help="Folder, e.g. MANUAL/videos")
  p.add_argument("--mtgc", help="mtgc.csv: fetch exactly its movies")
  p.add_argument("--limit", type=_positive(int), help="Only the first N")
  p.add_argument(
    "--format", default=youtube.DEFAULT_FORMAT, help="yt-dlp format"
  )
  p.add_argument("--jobs", type=int, default=3, help="Downloads at a time")
  p.add_argument(
    "--sleep",
    type=_positive(float),
    default=2.0,
    help="Seconds between a job's downloads",
  )
  p.add_argument(
    "--rate_limit", type=_rate, help="Bytes/s per download, e.g. 2M"
  )
  p.add_argument("--retries", type=_positive(int), default=3)
  p.add_argument("--socket_timeout", type=_positive(float), default=30.0)
  p.add_argument(
    "--retry_failed",
    action="store_true",
    help="Also retry the permanent failures (unavailable, private, "
    "geo-blocked, removed, corrupt, ...)",
  )
  p.add_argument(
    "--url_template",
    default=youtube.DEFAULT_URL_TEMPLATE,
    help="URL of an id (tests point it at a local server)",
  )
  args = p.parse_args(argv)
  if args.jobs < 1:
    p.error(f"--jobs {args.jobs}: at least 1")
  if "{id}" not in args.url_template:
    p.error(f"--url_template {args.url_template!r} has no {{id}}")
  if os.path.exists(args.out) and not os.path.isdir(args.out):
    p.error(f"--out {args.out}: exists and is not a folder")
  return args


def main(argv=None) -> int:
  """0: all present; 1: some failed (see the manifest); 2: bad input;
  3: stopped while rate-limited."""
  args = parse_args(argv)
  try:
    import yt_dlp  # noqa: F401
  except ImportError:
    print(
      "error: yt-dlp is missing: pip install -e '.[fetch]'", file=sys.stderr
    )
    return 2
  warn = lambda line: print(line, file=sys.stderr)
  try:
    movies = fetch_manifest.read_movies(args.metadata, args.mtgc)
    opts = youtube.Options(
      url_template=args.url_template,
      format=youtube.resolve_format(args.format, warn),
      jobs=args.jobs,
      sleep=args.sleep,
      rate_limit=args.rate_limit,
      retries=args.retries,
      socket_timeout=args.socket_timeout,
      retry_failed=args.retry_failed,
    )
    if args.limit is not None:
      movies = dict(list(movies.items())[: args.limit])
    print(TERMS)
    records, stopped = fetch_all(movies, args.out, opts)
  except (FileNotFoundError, ValueError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  except KeyboardInterrupt:
    print(f"interrupted; rerun to continue ({args.out}).", file=sys.stderr)
    return 130
  print(_summary(movies, records, args.out))
  if stopped:
    print("YouTube is rate-limiting: rerun later (--sleep longer).")
    return 3
  return 0 if all(records[m]["status"] == "ok" for m in movies) else 1


if __name__ == "__main__":
  sys.exit(main())
