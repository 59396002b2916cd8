"""The trailer fetcher against a local HTTP server (yt-dlp's generic
extractor), never the internet."""

import functools
import http.server
import io
import json
import os
import threading

import av
import numpy as np
import pytest

from tfds_trailers12k import fetch, fetch_manifest, youtube
from tfds_trailers12k.fetch_manifest import MANIFEST


def tiny_mp4() -> bytes:
  """Six 32x32 H.264 frames."""
  buf = io.BytesIO()
  with av.open(buf, "w", format="mp4") as c:
    s = c.add_stream("libx264", rate=12)
    s.width, s.height, s.pix_fmt = 32, 32, "yuv420p"
    for i in range(6):
      img = np.full((32, 32, 3), 40 * i, np.uint8)
      for p in s.encode(av.VideoFrame.from_ndarray(img, format="rgb24")):
        c.mux(p)
    for p in s.encode():
      c.mux(p)
  return buf.getvalue()


@pytest.fixture(scope="module")
def server(tmp_path_factory):
  """Serves good.mp4 and corrupt.mp4 (random bytes), 429 for limited*,
  404 for the rest. Yields (url template, list of the paths requested)."""
  root = tmp_path_factory.mktemp("server")
  (root / "good.mp4").write_bytes(tiny_mp4())
  (root / "corrupt.mp4").write_bytes(np.random.default_rng(0).bytes(4000))
  requests = []

  class Handler(http.server.SimpleHTTPRequestHandler):
    def do_GET(self):
      if self.path.startswith("/limited"):
        self.send_error(429)  # What YouTube answers a fast client.
      else:
        super().do_GET()

    def log_request(self, code="-", size="-"):
      requests.append(self.path)

    def log_message(self, *args):
      pass

  handler = functools.partial(Handler, directory=str(root))
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
  threading.Thread(target=httpd.serve_forever, daemon=True).start()
  yield f"http://127.0.0.1:{httpd.server_address[1]}/{{id}}.mp4", requests
  httpd.shutdown()
  httpd.server_close()


def run(server, metadata, out, *flags):
  template, _ = server
  argv = ["--metadata", str(metadata), "--out", str(out), "--sleep", "0"]
  return fetch.main(argv + ["--url_template", template, *flags])


def test_fetch_records_failures_and_resumes(server, tmp_path, monkeypatch):
  for var in ("http_proxy", "HTTP_PROXY", "all_proxy", "ALL_PROXY"):
    monkeypatch.delenv(var, raising=False)
  _, requests = server
  metadata = tmp_path / "metadata.json"
  movies = {
    "tt01": {"title": "Good", "youtube_id": "good"},
    "tt02": {"title": "Missing", "youtube_id": "missing"},
    "tt03": {"title": "Corrupt", "youtube_id": "corrupt"},
    "tt04": {"title": "Second id", "youtube_id": ["missing", "good"]},
  }
  metadata.write_text(json.dumps(movies))
  out = tmp_path / "videos"

  assert run(server, metadata, out, "--jobs", "2") == 1  # Some failed.
  assert sorted(os.listdir(out)) == [MANIFEST, "tt01.mp4", "tt04.mp4"]
  assert fetch.validate_video(str(out / "tt01.mp4"))[0]["height"] == 32
  manifest = json.loads((out / MANIFEST).read_text())
  got = manifest["movies"]
  assert got["tt01"]["status"] == "ok" and got["tt01"]["youtube_id"] == "good"
  assert got["tt02"]["status"] == "failed"
  assert got["tt02"]["reason"] == "unavailable"
  assert "404" in got["tt02"]["attempts"][0]["message"]
  assert got["tt03"]["reason"] == "corrupt" and not got["tt03"]["retry"]
  assert got["tt04"]["youtube_id"] == "good"  # The second id, in order.
  assert got["tt04"]["attempts"][0]["reason"] == "unavailable"
  assert manifest["counts"] == {
    "ok": 2,
    "failed": 2,
    "failed_by_reason": {"corrupt": 1, "unavailable": 1},
  }

  before = len(requests)
  assert run(server, metadata, out) == 1
  assert len(requests) == before  # Nothing fetched again, nothing retried.
  assert json.loads((out / MANIFEST).read_text())["movies"] == got

  assert run(server, metadata, out, "--retry_failed") == 1
  assert sorted(set(requests[before:])) == ["/corrupt.mp4", "/missing.mp4"]


# yt-dlp's messages (after "ERROR: ") for YouTube's usual failures.
MESSAGES = [
  ("private", "[youtube] x: Private video. Sign in if you've been granted"),
  ("geo-blocked", "[youtube] x: The uploader has not made this video "
   "available in your country"),
  ("removed", "[youtube] x: This video has been removed by the uploader"),
  ("removed", "[youtube] x: This video is no longer available because the "
   "YouTube account associated with this video has been terminated."),
  ("unavailable", "[youtube] x: Video unavailable"),
  ("age-restricted", "[youtube] x: Sign in to confirm your age. This video "
   "may be inappropriate for some users."),
  ("rate-limited", "[youtube] x: Sign in to confirm you’re not a bot"),
  ("rate-limited", "Unable to download webpage: HTTP Error 429: Too Many "
   "Requests"),
  ("network", "Unable to download webpage: <urlopen error [Errno 111] "
   "Connection refused>"),
  ("not-a-video", "[generic] Unsupported URL: http://example.com/page"),
  ("no-format", "Requested format is not available. Use --list-formats"),
  ("other", "something new"),
]  # fmt: skip


def test_stops_when_rate_limited(server, tmp_path):
  n = fetch.STOP_AFTER_RATE_LIMITED
  movies = {f"tt{i}": {"youtube_id": f"limited{i}"} for i in range(n + 3)}
  metadata = tmp_path / "metadata.json"
  metadata.write_text(json.dumps(movies))
  assert run(server, metadata, tmp_path / "v", "--jobs", "1") == 3
  manifest = json.loads((tmp_path / "v" / MANIFEST).read_text())
  got = manifest["movies"]
  assert len(got) < n + 3  # The last ones were never started.
  assert {r["reason"] for r in got.values()} == {"rate-limited"}
  assert all(r["retry"] for r in got.values())  # A rerun tries them again.


@pytest.mark.parametrize("reason, message", MESSAGES)
def test_classify(reason, message):
  assert youtube.classify(message) == reason


def test_read_movies_forms(tmp_path):
  path = tmp_path / "metadata.json"
  entries = [
    {"imdb_id": "tt1", "trailers": ["https://youtu.be/abcdefghijk", "x-1"]},
    {"mid": "tt2", "youtube_id": "https://www.youtube.com/watch?v=ABCDEFGHIJK"},
    {"mid": "tt3", "title": "no trailer"},
    {"mid": "tt4", "youtube": {"trailers": [{"key": "k1"}, "k2,k1"]}},
  ]
  path.write_text(json.dumps(entries))
  assert fetch_manifest.read_movies(str(path)) == {
    "tt1": ["abcdefghijk", "x-1"],
    "tt2": ["ABCDEFGHIJK"],
    "tt3": [],
    "tt4": ["k1", "k2"],
  }
  path.write_text(json.dumps({"tt1": {"title": "A"}, "tt2": {}}))
  with pytest.raises(ValueError, match="no YouTube id in any entry"):
    fetch_manifest.read_movies(str(path))
  path.write_text(json.dumps([{"title": "no id"}]))
  with pytest.raises(ValueError, match="entry 0 has no movie id"):
    fetch_manifest.read_movies(str(path))


def test_plan_retries_only_transient_failures(tmp_path):
  records = {
    "net": {"status": "failed", "reason": "network", "retry": True},
    "gone": {"status": "failed", "reason": "private", "retry": False},
  }
  movies = {"net": ["a"], "gone": ["b"], "new": ["c"]}
  kept, todo = fetch._plan(movies, records, str(tmp_path), youtube.Options())
  assert list(kept) == ["gone"] and todo == [("net", ["a"]), ("new", ["c"])]
  retry_all = youtube.Options(retry_failed=True)
  assert len(fetch._plan(movies, records, str(tmp_path), retry_all)[1]) == 3


def test_bad_flags_are_one_line(tmp_path, capsys):
  assert fetch._rate("1.5M") == 1572864 and fetch._rate("500K") == 512000
  base = ["--metadata", "m.json", "--out", str(tmp_path)]
  for flags, says in [
    (["--rate_limit", "fast"], "not a rate like 2M"),
    (["--url_template", "http://x/"], "has no {id}"),
    (["--out", __file__], "is not a folder"),
  ]:
    with pytest.raises(SystemExit):
      fetch.parse_args(base + flags)
    assert says in capsys.readouterr().err
  assert fetch.main(base) == 2
  assert "metadata.json not found: m.json" in capsys.readouterr().err
