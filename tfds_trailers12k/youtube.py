"""yt-dlp's side of the trailer fetcher: one YouTube id downloaded into a
folder under the run's `Options` (format, rate limit, retries, timeouts),
the format chosen by whether ffmpeg can merge video and audio, and each
yt-dlp error turned into a manifest `reason` by the fragments of its
message (`REASONS`). yt-dlp is imported only when used (the `fetch` extra).
"""

import dataclasses
import os
import re

DEFAULT_URL_TEMPLATE = "https://www.youtube.com/watch?v={id}"
DEFAULT_FORMAT = "bv*[height<=?720]+ba/b[height<=?720]"
SINGLE_FILE_FORMAT = "b[height<=?720]"  # No ffmpeg: nothing to merge.
FORMAT_SORT = ["res:720", "vcodec:h264", "acodec:aac"]
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


@dataclasses.dataclass
class Options:
  """One run's settings: yt-dlp's, and the pacing of its downloads."""

  url_template: str = DEFAULT_URL_TEMPLATE
  format: str = DEFAULT_FORMAT
  jobs: int = 3
  sleep: float = 2.0  # Seconds after each download attempt, per job.
  rate_limit: int | None = None  # Bytes/s per download.
  retries: int = 3
  socket_timeout: float = 30.0
  retry_failed: bool = False


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


def failure(error: BaseException) -> tuple[str, str]:
  """A YoutubeDLError -> (reason, its message without "ERROR: ")."""
  message = re.sub(r"^ERROR: ", "", str(error))[:500]
  cause = (getattr(error, "exc_info", None) or (None, None))[1]
  return classify(message, cause), message


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


def download(yid: str, tmp: str, opts: Options) -> str:
  """One trailer id into `tmp`; returns the file. Raises YoutubeDLError."""
  import yt_dlp

  url = opts.url_template.format(id=yid)
  with yt_dlp.YoutubeDL(_ydl_params(opts, tmp, yid)) as ydl:
    info = ydl.extract_info(url, download=True)
  files = info.get("requested_downloads") or [{}]
  if not files[0].get("filepath"):  # E.g. a playlist, not one video.
    raise yt_dlp.utils.YoutubeDLError(f"no video file for {url}")
  return files[0]["filepath"]


def resolve_format(fmt: str, log) -> str:
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
