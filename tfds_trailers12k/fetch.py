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
file, id, size and height, or `failed` with a `reason` (see `REASONS`) and
each attempt's yt-dlp message. A rerun skips the movies present and the
permanent failures (`--retry_failed` retries those too) and retries the
transient ones (network, rate-limited). Runs stop early when YouTube keeps
rate-limiting; rerun later, with a longer `--sleep`.

You run this under YouTube's Terms of Service and the copyright of each
trailer; the dataset's authors do not redistribute the videos. Fetch only
what you may, keep the defaults polite (a few jobs, a pause between
downloads, `--rate_limit`), and do not share the files.
"""

import argparse
import concurrent.futures
import contextlib
import dataclasses
import datetime
import json
import os
import re
import shutil
import sys
import threading
import time

import av

from tfds_trailers12k import mtgc

DEFAULT_URL_TEMPLATE = "https://www.youtube.com/watch?v={id}"
DEFAULT_FORMAT = "bv*[height<=?720]+ba/b[height<=?720]"
SINGLE_FILE_FORMAT = "b[height<=?720]"  # No ffmpeg: nothing to merge.
FORMAT_SORT = ["res:720", "vcodec:h264", "acodec:aac"]
MANIFEST = "fetch_manifest.json"
TMP_DIR = ".fetch_tmp"
TERMS = (
  "You run this under YouTube's Terms of Service and each trailer's "
  "copyright: fetch only what you may, keep it slow, do not share the files."
)
# Reason -> lowercase fragments of yt-dlp's messages; the first match wins,
# so the specific ones come before `unavailable` and `network`.
REASONS = {
  "private": ("private video", "video is private", "members-only"),
  "geo-blocked": ("your country", "geo restrict", "geo-restrict"),
  "removed": (
    "removed by the",
    "has been removed",
    "has been terminated",
    "copyright",
    "violating youtube",
  ),
  "age-restricted": ("confirm your age", "age-restricted", "inappropriate"),
  "rate-limited": ("http error 429", "too many requests", "not a bot"),
  "needs-ffmpeg": ("ffmpeg",),
  "no-format": ("requested format is not available",),
  "unavailable": (
    "video unavailable",
    "not available",
    "no longer available",
    "http error 404",
    "http error 410",
    "does not exist",
  ),
  "not-a-video": (
    "unsupported url",
    "no video formats",
    "not a valid url",
    "no video file",
  ),
  "network": (
    "timed out",
    "connection",
    "urlopen error",
    "name resolution",
    "name or service",
    "unreachable",
    "http error 5",
    "incomplete read",
    "ssl",
  ),
}
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
_URL_ID = re.compile(r"(?:[?&]v=|youtu\.be/|/embed/|/shorts/)([\w-]{11})")


@dataclasses.dataclass
class Options:
  url_template: str = DEFAULT_URL_TEMPLATE
  format: str = DEFAULT_FORMAT
  jobs: int = 3
  sleep: float = 2.0  # Seconds after each download attempt, per job.
  rate_limit: int | None = None  # Bytes/s per download.
  retries: int = 3
  socket_timeout: float = 30.0
  retry_failed: bool = False


def _split_ids(value) -> list[str]:
  """A metadata value -> YouTube ids: an id, a URL, a comma-separated
  string, a list of those, or objects holding them (`{"key": id}`,
  `{"trailers": [...]}`), in order."""
  if isinstance(value, dict):
    keys = ("key", "id", "youtube_id", "ytid", "trailers", "ids", "videos")
    value = next((value[k] for k in keys if value.get(k)), "")
  ids = []
  for item in value if isinstance(value, list) else [value]:
    if isinstance(item, (dict, list)):
      parts = _split_ids(item)
    else:
      parts = re.split(r"[,\s]+", str(item or ""))
    for part in parts:
      match = _URL_ID.search(part)
      part = match.group(1) if match else part
      if part and part not in ids:
        ids.append(part)
  return ids


def trailer_ids(entry: dict) -> list[str]:
  """All YouTube ids of one metadata.json entry, in the file's order."""
  for key in mtgc._ALIASES["youtube_id"]:  # The spellings the builder reads.
    ids = _split_ids(entry.get(key))
    if ids:
      return ids
  return []


def read_movies(path: str, mtgc_path: str | None = None) -> dict:
  """metadata.json (`{mid: {...}}` or `[{"mid": ...}, ...]`) -> {mid: ids}.

  With `mtgc_path`, only (and all) the movies of mtgc.csv, in its order;
  one missing from metadata.json gets no ids.
  """
  if not os.path.isfile(path):
    raise FileNotFoundError(f"metadata.json not found: {path}")
  try:
    with open(path) as f:
      data = json.load(f)
  except json.JSONDecodeError as e:
    raise ValueError(f"metadata.json {path} is not valid JSON: {e}") from e
  if isinstance(data, list):
    keyed = {}
    mid_keys = ("mid",) + mtgc._ALIASES["imdb_id"]
    for i, entry in enumerate(data):
      entry = entry if isinstance(entry, dict) else {}
      mid = next((entry[k] for k in mid_keys if entry.get(k)), None)
      if not mid:
        raise ValueError(
          f"metadata.json {path}: entry {i} has no movie id ({mid_keys})."
        )
      keyed[str(mid)] = entry
    data = keyed
  if not isinstance(data, dict):
    raise ValueError(f"metadata.json {path}: expected an object or a list.")
  movies = {
    mid: trailer_ids(e) if isinstance(e, dict) else []
    for mid, e in data.items()
  }
  if movies and not any(movies.values()):
    first = next(iter(data.values()))
    raise ValueError(
      f"metadata.json {path}: no YouTube id in any entry under "
      f"{list(mtgc._ALIASES['youtube_id'])}; an entry's keys: "
      f"{sorted(first) if isinstance(first, dict) else first!r}."
    )
  if mtgc_path:
    movies = {mid: movies.get(mid, []) for mid in mtgc.read_mtgc(mtgc_path).ids}
  return movies


def classify(message: str, error: BaseException | None = None) -> str:
  """yt-dlp's error (its message, the exception behind it) -> a reason."""
  from yt_dlp.networking import exceptions as net
  from yt_dlp.utils import GeoRestrictedError

  if isinstance(error, GeoRestrictedError):
    return "geo-blocked"
  if isinstance(error, net.HTTPError):
    if error.status == 429:
      return "rate-limited"
    if error.status in (404, 410):
      return "unavailable"
  text = message.lower()
  for reason, fragments in REASONS.items():
    if any(f in text for f in fragments):
      return reason
  if isinstance(error, net.TransportError):
    return "network"
  return "other"


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


class _Silent:
  """yt-dlp's logger: its errors come back as exceptions, the rest is noise."""

  def debug(self, msg):
    pass

  info = warning = error = debug


def _ydl_params(opts: Options, tmp: str, yid: str) -> dict:
  # One file name per id: a .part left by one id is never continued by the
  # next. `%` is the template's escape.
  name = re.sub(r"[^\w-]", "_", yid) + ".%(ext)s"
  return {
    "format": opts.format,
    "format_sort": FORMAT_SORT,
    "merge_output_format": "mp4",
    "outtmpl": {"default": os.path.join(tmp.replace("%", "%%"), name)},
    "noplaylist": True,
    "continuedl": True,  # Resume a .part left by an interrupted run.
    "ratelimit": opts.rate_limit,
    "retries": opts.retries,
    "fragment_retries": opts.retries,
    "socket_timeout": opts.socket_timeout,
    "cachedir": False,
    "quiet": True,
    "no_warnings": True,
    "noprogress": True,
    "logger": _Silent(),
  }


def _download(yid: str, tmp: str, opts: Options) -> str:
  """One trailer id into `tmp`; returns the file. Raises YoutubeDLError."""
  import yt_dlp

  url = opts.url_template.format(id=yid)
  with yt_dlp.YoutubeDL(_ydl_params(opts, tmp, yid)) as ydl:
    info = ydl.extract_info(url, download=True)
  files = info.get("requested_downloads") or [{}]
  if not files[0].get("filepath"):  # E.g. a playlist, not one video.
    raise yt_dlp.utils.YoutubeDLError(f"no video file for {url}")
  return files[0]["filepath"]


def _attempt(yid: str, mid: str, out: str, opts: Options) -> dict:
  """Fetches and validates one id; the ok record or the failed attempt."""
  from yt_dlp.utils import YoutubeDLError

  tmp = os.path.join(out, TMP_DIR, mid)
  try:
    path = _download(yid, tmp, opts)
  except YoutubeDLError as e:
    message = re.sub(r"^ERROR: ", "", str(e))[:500]
    cause = (getattr(e, "exc_info", None) or (None, None))[1]
    reason = classify(message, cause)
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


def fetch_movie(mid: str, ids: list[str], out: str, opts: Options) -> dict:
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


def load_manifest(out: str) -> dict:
  path = os.path.join(out, MANIFEST)
  if not os.path.isfile(path):
    return {}
  try:
    with open(path) as f:
      return json.load(f)["movies"]
  except (json.JSONDecodeError, KeyError, TypeError) as e:
    raise ValueError(
      f"{path} is not a fetch manifest ({e}); move it away to start over."
    ) from e


def save_manifest(out: str, movies: dict, opts: Options) -> str:
  """Writes OUT/fetch_manifest.json atomically; returns its path."""
  counts = {"ok": 0, "failed": 0}
  reasons = {}
  for record in movies.values():
    counts[record["status"]] += 1
    if record["status"] == "failed":
      reasons[record["reason"]] = reasons.get(record["reason"], 0) + 1
  manifest = {
    "updated": datetime.datetime.now(datetime.timezone.utc).isoformat(),
    "url_template": opts.url_template,
    "format": opts.format,
    "counts": {**counts, "failed_by_reason": dict(sorted(reasons.items()))},
    "movies": movies,
  }
  path = os.path.join(out, MANIFEST)
  with open(path + ".tmp", "w") as f:
    json.dump(manifest, f, indent=1)
  os.replace(path + ".tmp", path)
  return path


def _plan(movies: dict, records: dict, out: str, opts: Options):
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
          save_manifest(out, records, opts)
    except KeyboardInterrupt:
      log("interrupted: finishing the downloads under way, starting none.")
      raise
    finally:
      stop.set()
      pool.shutdown(wait=False, cancel_futures=True)
      save_manifest(out, records, opts)
  return rate_limited


def fetch_all(movies: dict, out: str, opts: Options, log=print):
  """Fetches what `out` lacks; (the manifest's records, stopped early)."""
  os.makedirs(out, exist_ok=True)
  records = load_manifest(out)
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
    + f"; manifest: {os.path.join(out, MANIFEST)}"
  )


def _resolve_format(fmt: str, log) -> str:
  """`fmt`, or the single-file default where ffmpeg cannot merge streams."""
  from yt_dlp.postprocessor.ffmpeg import FFmpegPostProcessor

  if "+" not in fmt or FFmpegPostProcessor().available:
    return fmt
  if fmt != DEFAULT_FORMAT:
    raise ValueError(
      f"--format {fmt!r} merges video and audio ('+'), which needs ffmpeg; "
      "none found on PATH."
    )
  log(
    "ffmpeg not found: video and audio cannot be merged, so single-file "
    f"formats ({SINGLE_FILE_FORMAT}; YouTube: often 360p) are fetched."
  )
  return SINGLE_FILE_FORMAT


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
  p.add_argument("--format", default=DEFAULT_FORMAT, help="yt-dlp format")
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
    default=DEFAULT_URL_TEMPLATE,
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
    movies = read_movies(args.metadata, args.mtgc)
    opts = Options(
      url_template=args.url_template,
      format=_resolve_format(args.format, warn),
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
