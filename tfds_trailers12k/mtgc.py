"""Trailers12k annotation files: `mtgc.csv` and the optional `metadata.json`.

`mtgc.csv`: header `mid,<10 genres in tfds_trailers12k.genres order>,split0,
split1,split2`; genre cells 0/1; split cells 0 (train), 1 (validation),
2 (test) for each of the three folds. Any malformed cell stops the build
with an error naming the line (1 = header) and the column.
"""

import csv
import dataclasses
import json

import numpy as np
from etils import epath

from tfds_trailers12k.genres import GENRES, NUM_FOLDS

SPLIT_COLUMNS = tuple(f"split{f}" for f in range(NUM_FOLDS))
COLUMNS = ("mid",) + GENRES + SPLIT_COLUMNS
METADATA_KEYS = ("title", "year", "imdb_id", "youtube_id")
# Accepted spellings in metadata.json for each stored field.
ALIASES = {
  "title": ("title", "name", "original_title", "originalTitle"),
  "year": ("year", "release_year", "startYear"),
  "imdb_id": ("imdb_id", "imdbId", "imdbid", "imdb", "tconst", "mid"),
  "youtube_id": (
    "youtube_id",
    "youtubeId",
    "yt_id",
    "ytid",
    "youtube",
    "youtube_trailer_key",
    "trailer_id",
    "trailers",
  ),
}


@dataclasses.dataclass
class Annotations:
  ids: list[str]
  labels: np.ndarray  # int32 [N, 10]
  splits: np.ndarray  # int32 [N, 3]


def _cell(row: dict, column: str, line: int, allowed: tuple[int, ...]) -> int:
  value = (row.get(column) or "").strip()
  if value not in {str(a) for a in allowed}:
    raise ValueError(
      f"mtgc.csv line {line}, column {column!r}: value {value!r} is not "
      f"one of {list(allowed)}."
    )
  return int(value)


def read_mtgc(path: epath.PathLike) -> Annotations:
  """Parses and validates mtgc.csv."""
  path = epath.Path(path)
  if not path.exists():
    raise FileNotFoundError(f"mtgc.csv not found: {path}")
  reader = csv.DictReader(path.read_text().splitlines())
  header = [c.strip() for c in reader.fieldnames or []]
  reader.fieldnames = header
  rows = list(reader)
  missing = [c for c in COLUMNS if c not in header]
  if missing:
    raise ValueError(
      f"mtgc.csv line 1 (header): missing column(s) {missing}; expected "
      f"{list(COLUMNS)}."
    )
  ids, labels, splits, seen = [], [], [], {}
  for i, row in enumerate(rows):
    line = i + 2  # 1-based, after the header.
    if row.get(None):  # csv.DictReader's place for cells beyond the header.
      raise ValueError(
        f"mtgc.csv line {line}: {len(header) + len(row[None])} cells, the "
        f"header has {len(header)} (extra: {row[None]})."
      )
    mid = (row["mid"] or "").strip()
    if not mid:
      raise ValueError(f"mtgc.csv line {line}, column 'mid': empty id.")
    if mid in seen:
      raise ValueError(
        f"mtgc.csv line {line}, column 'mid': duplicate id {mid!r} "
        f"(first on line {seen[mid]})."
      )
    seen[mid] = line
    ids.append(mid)
    labels.append([_cell(row, g, line, (0, 1)) for g in GENRES])
    splits.append([_cell(row, s, line, (0, 1, 2)) for s in SPLIT_COLUMNS])
  if not ids:
    raise ValueError(f"mtgc.csv {path} has no rows.")
  return Annotations(
    ids, np.asarray(labels, np.int32), np.asarray(splits, np.int32)
  )


def _pick(entry: dict, key: str) -> str:
  for alias in ALIASES[key]:
    value = entry.get(alias)
    if value not in (None, ""):
      if isinstance(value, list):  # e.g. several trailer ids: first one.
        value = value[0] if value else ""
      return str(value)
  return ""


def read_metadata(path: epath.PathLike) -> dict[str, dict[str, str]]:
  """metadata.json -> {mid: {title, year, imdb_id, youtube_id}}.

  Accepts `{mid: {...}}` or `[{"mid": ..., ...}, ...]`; fields are looked
  up under common spellings (see `ALIASES`); absent fields are "". A
  missing file gives {}.
  """
  path = epath.Path(path)
  if not path.exists():
    return {}
  try:
    data = json.loads(path.read_text())
  except json.JSONDecodeError as e:
    raise ValueError(f"metadata.json {path} is not valid JSON: {e}") from e
  if isinstance(data, list):
    data = {_pick(e, "imdb_id"): e for e in data if isinstance(e, dict)}
  if not isinstance(data, dict):
    raise ValueError(f"metadata.json {path}: expected an object or a list.")
  out = {}
  for mid, entry in data.items():
    if isinstance(entry, dict):
      out[mid] = {k: _pick(entry, k) for k in METADATA_KEYS}
      out[mid]["imdb_id"] = out[mid]["imdb_id"] or (
        mid if mid.startswith("tt") else ""
      )
  return out
