"""What the trailer fetcher reads and records: each movie's YouTube ids
from Trailers12k's `metadata.json` (under the spellings `mtgc.ALIASES`
lists, as ids, URLs or nested lists; optionally only mtgc.csv's movies),
and `OUT/fetch_manifest.json`, every movie's last outcome, read at the
start of a run and written atomically during and after it.
"""

import datetime
import json
import os
import re

from tfds_trailers12k import mtgc, youtube

MANIFEST = "fetch_manifest.json"
_URL_ID = re.compile(r"(?:[?&]v=|youtu\.be/|/embed/|/shorts/)([\w-]{11})")


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
  for key in mtgc.ALIASES["youtube_id"]:  # The spellings the builder reads.
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
    mid_keys = ("mid",) + mtgc.ALIASES["imdb_id"]
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
      f"{list(mtgc.ALIASES['youtube_id'])}; an entry's keys: "
      f"{sorted(first) if isinstance(first, dict) else first!r}."
    )
  if mtgc_path:
    movies = {mid: movies.get(mid, []) for mid in mtgc.read_mtgc(mtgc_path).ids}
  return movies


def load_manifest(out: str) -> dict:
  """OUT/fetch_manifest.json's records, {mid: record}; {} before a run."""
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


def save_manifest(out: str, movies: dict, opts: youtube.Options) -> str:
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
