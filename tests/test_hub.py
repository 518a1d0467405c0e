"""gpt2kit.checkpoints.hub against a stand-in Hugging Face Hub on 127.0.0.1 (no real network, ever).

The stand-in answers the three endpoints snapshot_download uses: GET /api/models/{repo}/revision/{rev}
(repo_info: sha + siblings), GET /api/models/{repo}/tree/{rev} (file listing) and HEAD/GET
/{repo}/resolve/{rev}/{file} (X-Repo-Commit, ETag, Content-Length, body); errors carry X-Error-Code
like the real Hub's, since that is how huggingface_hub tells a missing repo from a gated one.

For uploads (tests/test_push.py) it answers the POSTs create_repo and create_commit make: /api/repos/create,
/api/validate-yaml, /api/models/{repo}/preupload/{rev} (every file "regular", so the commit carries it inline,
base64, and no LFS or Xet transfer is needed) and /api/models/{repo}/commit/{rev} (ndjson). A request without
a bearer token, or with the token "bad", is refused with 401; the namespace "not-mine" with 403.
"""

from __future__ import annotations

import base64
import contextlib
import hashlib
import json
import re
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
import torch
from huggingface_hub import constants
from safetensors.torch import load_file
from safetensors.torch import save as st_save

from gpt2kit.checkpoints import hub
from gpt2kit.errors import Gpt2kitError

TINY = Path(__file__).resolve().parents[2] / "shared" / "data" / "tf-gpt2-tiny" / "hf"  # ../shared beside the repo
SHA = "0123456789abcdef0123456789abcdef01234567"
WANTED = {"config.json", "generation_config.json", "model.safetensors", "vocab.json", "merges.txt"}
LFS_SUFFIXES = (".safetensors", ".bin", ".h5")  # weights (and shards of them) are LFS files on the Hub


def _files(weights=("model.safetensors", "pytorch_model.bin")) -> dict[str, bytes]:
    files = {f: (TINY / f).read_bytes() for f in ("config.json", "generation_config.json", "vocab.json",
                                                    "merges.txt")}
    files["README.md"] = b"# stand-in\n"
    files["tf_model.h5"] = b"not for gpt2kit"
    if "model.safetensors" in weights:
        files["model.safetensors"] = st_save({"x": torch.arange(4, dtype=torch.float32)})
    if "pytorch_model.bin" in weights:
        files["pytorch_model.bin"] = b"pickle bytes gpt2kit should not fetch when safetensors exist"
    return files


def _sharded(missing_shard: bool = False) -> dict[str, bytes]:
    """The tiny real model as save_pretrained(max_shard_size=...) lays it out: an index and two shards."""
    files = {f: (TINY / f).read_bytes() for f in ("config.json", "vocab.json", "merges.txt")}
    sd = load_file(str(TINY / "model.safetensors"))
    keys = sorted(sd)
    names = ("model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors")
    parts = dict(zip(names, (keys[: len(keys) // 2], keys[len(keys) // 2:])))
    for n, ks in parts.items():
        files[n] = st_save({k: sd[k] for k in ks})
    index = {"metadata": {"total_size": 0}, "weight_map": {k: n for n, ks in parts.items() for k in ks}}
    files["model.safetensors.index.json"] = json.dumps(index).encode()
    files["pytorch_model.bin.index.json"] = b'{"weight_map": {}}'  # a pickle copy gpt2kit should not fetch
    if missing_shard:
        del files[names[1]]
    return files


def _etag(name: str, data: bytes) -> str:
    # The Hub's ETag: sha256 for LFS files, git blob sha1 otherwise (huggingface_hub names cache blobs by it).
    if name.endswith(LFS_SUFFIXES):
        return hashlib.sha256(data).hexdigest()
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


class FakeHub:
    def __init__(self):
        real = {f: (TINY / f).read_bytes() for f in ("config.json", "model.safetensors", "vocab.json", "merges.txt")}
        self.repos = {"openai-community/gpt2": _files(),
                      "openai-community/gpt2-medium": real,  # a real (tiny) model, for end-to-end use
                      "someone/old-gpt2": _files(weights=("pytorch_model.bin",)),
                      "someone/sharded-gpt2": _sharded(),
                      "someone/broken-shards": _sharded(missing_shard=True)}
        self.gated = {"meta/gated-gpt2"}
        self.private: dict[str, bool] = {}  # repositories created by create_repo -> private?
        self.commits: list[dict] = []  # each commit's header (summary, description)
        self.requests: list[tuple[str, str]] = []
        hub_ = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args):  # keep pytest output clean
                pass

            def do_GET(self):
                hub_.handle(self, body=True)

            def do_HEAD(self):
                hub_.handle(self, body=False)

            def do_POST(self):
                hub_.handle_post(self)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        threading.Thread(target=self.server.serve_forever, args=(0.05,), daemon=True).start()

    def stop(self):
        self.server.shutdown()
        self.server.server_close()

    def handle(self, req: BaseHTTPRequestHandler, body: bool):
        path = unquote(urlsplit(req.path).path)
        self.requests.append((req.command, path))
        m = (re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)", path)
             or re.fullmatch(r"/()([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path))
        if not m:
            return self.send(req, 404, b"{}", body, {"X-Error-Code": "EntryNotFound"})
        if m.group(1):
            repo, kind, rev = m.groups()
        else:
            _, repo, rev, fname = m.groups()
            kind = "resolve"
        if repo in self.gated:
            return self.send(req, 401, b"{}", body, {"X-Error-Code": "GatedRepo"})
        if repo not in self.repos:
            return self.send(req, 404, b"{}", body, {"X-Error-Code": "RepoNotFound"})
        if rev not in ("main", SHA):
            return self.send(req, 404, b"{}", body, {"X-Error-Code": "RevisionNotFound"})
        files = self.repos[repo]
        if kind == "revision":
            info = {"id": repo, "sha": SHA, "private": False, "siblings": [{"rfilename": f} for f in files]}
            return self.send(req, 200, json.dumps(info).encode(), body)
        if kind == "tree":
            tree = [{"type": "file", "path": f, "size": len(d), "oid": _etag("", d),
                     **({"lfs": {"oid": _etag(f, d), "size": len(d), "pointerSize": 134}}
                        if f.endswith(LFS_SUFFIXES) else {})}
                    for f, d in files.items()]
            return self.send(req, 200, json.dumps(tree).encode(), body)
        if fname not in files:
            return self.send(req, 404, b"{}", body, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": SHA})
        data = files[fname]
        return self.send(req, 200, data, body, {"X-Repo-Commit": SHA, "ETag": f'"{_etag(fname, data)}"'})

    def handle_post(self, req: BaseHTTPRequestHandler):
        path = unquote(urlsplit(req.path).path)
        self.requests.append((req.command, path))
        data = req.rfile.read(int(req.headers.get("Content-Length") or 0))
        auth = req.headers.get("Authorization") or ""
        if not auth.startswith("Bearer ") or auth == "Bearer bad":
            return self.send(req, 401, b'{"error": "Invalid credentials in Authorization header"}', True)
        reply = lambda obj, status=200: self.send(req, status, json.dumps(obj).encode(), True)  # noqa: E731
        if path == "/api/validate-yaml":
            return reply({"errors": [], "warnings": []})
        if path == "/api/repos/create":
            payload = json.loads(data)
            repo = f"{payload['organization']}/{payload['name']}"
            if payload["organization"] == "not-mine":
                return reply({"error": "You don't have the rights to create a model under this namespace"}, 403)
            if repo in self.repos:
                return reply({"error": "You already created this model repo", "url": f"{self.url}/{repo}"}, 409)
            self.repos[repo] = {}
            self.private[repo] = payload.get("visibility") == "private" or payload.get("private") is True
            return reply({"url": f"{self.url}/{repo}"})
        m = re.fullmatch(r"/api/models/([^/]+/[^/]+)/(preupload|commit)/([^/]+)", path)
        if not m or m.group(1) not in self.repos:
            return self.send(req, 404, b"{}", True, {"X-Error-Code": "RepoNotFound"})
        repo, kind, _ = m.groups()
        if kind == "preupload":
            files = json.loads(data)["files"]
            return reply({"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False}
                                    for f in files]})
        for line in data.decode().splitlines():
            item = json.loads(line)
            if item["key"] == "header":
                self.commits.append(item["value"])
            elif item["key"] == "file":
                self.repos[repo][item["value"]["path"]] = base64.b64decode(item["value"]["content"])
            else:  # (LFS, copies and deletions are never asked for: preupload answers "regular")
                return reply({"error": f"the stand-in cannot {item['key']}"}, 400)
        return reply({"success": True, "commitOid": SHA, "commitUrl": f"{self.url}/{repo}/commit/{SHA}"})

    @staticmethod
    def send(req, status, data, body, headers=None):
        req.send_response(status)
        for k, v in {"Content-Length": str(len(data)), **(headers or {})}.items():
            req.send_header(k, v)
        req.end_headers()
        if body:
            req.wfile.write(data)


@pytest.fixture(autouse=True)
def _isolated(monkeypatch, tmp_path):
    """Own cache, no token, short timeouts, and a guard that fails any connection not to 127.0.0.1."""
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf"))
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hf" / "hub"))
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setattr(constants, "HF_HUB_ETAG_TIMEOUT", 2)
    monkeypatch.setattr(constants, "HF_HUB_DOWNLOAD_TIMEOUT", 2)
    real_connect = socket.socket.connect

    def guarded_connect(sock, address):
        if sock.family in (socket.AF_INET, socket.AF_INET6) and address[0] not in ("127.0.0.1", "::1"):
            raise AssertionError(f"test tried to reach {address}")
        return real_connect(sock, address)

    monkeypatch.setattr(socket.socket, "connect", guarded_connect)


@pytest.fixture
def fake_hub(monkeypatch):
    h = FakeHub()
    # huggingface_hub read HF_ENDPOINT at import: point its module-level defaults at the stand-in too.
    monkeypatch.setattr(constants, "ENDPOINT", h.url)
    monkeypatch.setattr(constants, "HUGGINGFACE_CO_URL_TEMPLATE", h.url + "/{repo_id}/resolve/{revision}/{filename}")
    yield h
    h.stop()


def _one_line(e: pytest.ExceptionInfo) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def _resolve_paths(h: FakeHub) -> set[str]:
    return {p.rsplit("/", 1)[1] for m, p in h.requests if "/resolve/" in p}


def test_download_bare_name_fetches_only_needed_files(fake_hub, tmp_path):
    d = hub.download("gpt2", cache_dir=str(tmp_path / "c"), endpoint=fake_hub.url)
    assert d == tmp_path / "c" / "models--openai-community--gpt2" / "snapshots" / SHA
    assert {p.name for p in d.iterdir()} == WANTED
    for f in WANTED:
        assert (d / f).read_bytes() == fake_hub.repos["openai-community/gpt2"][f]
    # allow_patterns: the pickle, README and TF weights are never even asked for.
    assert _resolve_paths(fake_hub) == WANTED


def test_cached_model_loads_with_server_down(fake_hub, tmp_path):
    first = hub.download("openai-community/gpt2", cache_dir=str(tmp_path / "c"), endpoint=fake_hub.url)
    fake_hub.stop()
    n = len(fake_hub.requests)
    t = time.monotonic()
    assert hub.download("gpt2", cache_dir=str(tmp_path / "c"), endpoint=fake_hub.url) == first
    assert time.monotonic() - t < 1 and len(fake_hub.requests) == n


def test_resolve_uses_hf_endpoint_and_default_cache(fake_hub, tmp_path):
    d = hub.resolve("gpt2")
    assert d.is_relative_to(tmp_path / "hf" / "hub") and (d / "model.safetensors").is_file()
    fake_hub.stop()
    assert hub.resolve("gpt2") == d


def test_pickle_only_repo_falls_back_to_pytorch_model_bin(fake_hub, tmp_path):
    d = hub.download("someone/old-gpt2", cache_dir=str(tmp_path / "c"), endpoint=fake_hub.url)
    assert {p.name for p in d.iterdir()} == WANTED - {"model.safetensors"} | {"pytorch_model.bin"}
    fake_hub.stop()  # and the pickle-only snapshot counts as complete in the cache
    assert hub.download("someone/old-gpt2", cache_dir=str(tmp_path / "c"), endpoint=fake_hub.url) == d


def test_force_downloads_again(fake_hub, tmp_path):
    hub.download("gpt2", cache_dir=str(tmp_path / "c"), endpoint=fake_hub.url)
    n = len(fake_hub.requests)
    hub.download("gpt2", cache_dir=str(tmp_path / "c"), endpoint=fake_hub.url, force=True)
    assert len(fake_hub.requests) > n


def test_unknown_repo(fake_hub, tmp_path):
    with pytest.raises(Gpt2kitError) as e:
        hub.download("foo/bar", cache_dir=str(tmp_path / "c"), endpoint=fake_hub.url)
    assert _one_line(e) == ("model 'foo/bar' not found on the Hub: check the name, or "
                            "pass --model a local directory holding config.json and model.safetensors")


def test_unknown_revision(fake_hub, tmp_path):
    with pytest.raises(Gpt2kitError) as e:
        hub.download("gpt2", revision="nope", cache_dir=str(tmp_path / "c"), endpoint=fake_hub.url)
    assert _one_line(e).startswith("revision 'nope' of model 'gpt2' not found on the Hub")


def test_gated_repo(fake_hub, tmp_path):
    with pytest.raises(Gpt2kitError) as e:
        hub.download("meta/gated-gpt2", cache_dir=str(tmp_path / "c"), endpoint=fake_hub.url)
    assert "is gated on the Hub" in _one_line(e) and "HF_TOKEN" in str(e.value)


def test_server_down_empty_cache_fails_fast(tmp_path):
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        url = f"http://127.0.0.1:{s.getsockname()[1]}"
    t = time.monotonic()
    with pytest.raises(Gpt2kitError) as e:
        hub.download("gpt2", cache_dir=str(tmp_path / "c"), endpoint=url)
    assert time.monotonic() - t < 5
    assert _one_line(e) == ("cannot download 'gpt2' from the Hugging Face Hub (no network connection, or no answer): "
                            "connect to the internet, or pass --model a local directory holding config.json and "
                            "model.safetensors")


@contextlib.contextmanager
def silent_server():
    """A Hub endpoint that accepts connections and never answers."""
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    s.listen(16)
    held: list[socket.socket] = []
    stop = threading.Event()

    def accept() -> None:
        s.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(s.accept()[0])
            except OSError:
                pass
    t = threading.Thread(target=accept, daemon=True)
    t.start()
    try:
        yield f"http://127.0.0.1:{s.getsockname()[1]}"
    finally:
        stop.set()
        t.join()
        for c in held:
            c.close()
        s.close()


def test_a_hub_that_never_answers_fails_instead_of_hanging(tmp_path, monkeypatch):
    monkeypatch.setattr(hub, "READ_TIMEOUT_S", 0.5)  # (60 s in use)
    with silent_server() as url:
        t = time.monotonic()
        with pytest.raises(Gpt2kitError) as e:
            hub.download("gpt2", cache_dir=str(tmp_path / "c"), endpoint=url)
    assert time.monotonic() - t < 30
    assert _one_line(e).startswith("cannot download 'gpt2' from the Hugging Face Hub (no network connection, or no "
                                   "answer)")


def test_offline_mode(fake_hub, tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(Gpt2kitError) as e:
        hub.download("gpt2", cache_dir=str(tmp_path / "c"), endpoint=fake_hub.url)
    assert "HF_HUB_OFFLINE is set" in _one_line(e)
    assert fake_hub.requests == []
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", False)
    d = hub.download("gpt2", cache_dir=str(tmp_path / "c"), endpoint=fake_hub.url)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    assert hub.download("gpt2", cache_dir=str(tmp_path / "c"), endpoint=fake_hub.url) == d


def test_resolve_local_paths(tmp_path, monkeypatch):
    assert hub.resolve(str(tmp_path)) == tmp_path
    for arg in ("./missing", "/x/y", "a/b/c"):
        with pytest.raises(Gpt2kitError) as e:
            hub.resolve(arg)
        assert _one_line(e).startswith(f"no such directory: {arg}")
    with pytest.raises(Gpt2kitError, match="neither a local directory nor a known model name"):
        hub.resolve("gpt3")
    (tmp_path / "f.bin").write_bytes(b"")
    with pytest.raises(Gpt2kitError, match="is a file"):
        hub.resolve(str(tmp_path / "f.bin"))


def test_is_model_name(tmp_path, monkeypatch):
    assert all(hub.is_model_name(n) for n in hub.KNOWN_MODELS)
    assert hub.is_model_name("openai-community/gpt2") and hub.is_model_name("distilbert/distilgpt2")
    assert hub.repo_id("distilgpt2") == "distilbert/distilgpt2" and hub.repo_id("gpt2-xl").startswith("openai-")
    assert not hub.is_model_name("./gpt2") and not hub.is_model_name("/x/y") and not hub.is_model_name("gpt3")
    monkeypatch.chdir(tmp_path)
    (tmp_path / "runs" / "a").mkdir(parents=True)
    assert hub.is_model_name("runs/b") and not hub.is_model_name("runs/a")


def test_model_name_works_end_to_end_in_the_cli(fake_hub, tmp_path, capsys):
    import json as _json

    from gpt2kit.cli import main

    ref = _json.loads((TINY.parent / "reference.json").read_text())
    assert main(["download", "gpt2-medium"]) == 0
    path = capsys.readouterr().out.strip()
    assert (Path(path) / "model.safetensors").is_file()
    fake_hub.stop()  # from here on, only the cache
    assert main(["generate", ref["text"], "-m", "gpt2-medium", "--length", "8", "-t", "0",
                 "--no-stop-at-eot", "--format", "jsonl"]) == 0
    assert _json.loads(capsys.readouterr().out)["tokens"] == ref["greedy_next_32"][:8]
    assert main(["generate", "x", "-m", "distilgpt2"]) == 1  # not cached, hub down
    assert "no network" in capsys.readouterr().err


def test_sharded_repo_fetches_the_index_and_its_shards(fake_hub, tmp_path):
    from gpt2kit.checkpoints import load_model

    d = hub.download("someone/sharded-gpt2", cache_dir=str(tmp_path / "c"), endpoint=fake_hub.url)
    shards = {"model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"}
    want = {"config.json", "vocab.json", "merges.txt", "model.safetensors.index.json"} | shards
    assert {p.name for p in d.iterdir()} == want == _resolve_paths(fake_hub)  # no pickle index, nothing else
    ours, _ = load_model(d)
    ref, _ = load_model(TINY)
    x = torch.tensor([[1, 2, 3, 4]])
    with torch.inference_mode():
        assert torch.equal(ours(x), ref(x))
    fake_hub.stop()  # the sharded snapshot counts as complete in the cache
    n = len(fake_hub.requests)
    assert hub.download("someone/sharded-gpt2", cache_dir=str(tmp_path / "c"), endpoint=fake_hub.url) == d
    assert len(fake_hub.requests) == n


def test_sharded_repo_missing_a_shard_is_one_line(fake_hub, tmp_path):
    with pytest.raises(Gpt2kitError) as e:
        hub.download("someone/broken-shards", cache_dir=str(tmp_path / "c"), endpoint=fake_hub.url)
    assert "model-00002-of-00002.safetensors" in _one_line(e) and "incomplete" in str(e.value)


def test_force_with_the_hub_unreachable_fails_instead_of_reusing_the_cache(fake_hub, tmp_path, monkeypatch):
    d = hub.download("gpt2", cache_dir=str(tmp_path / "c"), endpoint=fake_hub.url)
    fake_hub.stop()
    with pytest.raises(Gpt2kitError) as e:  # "download again" must not quietly answer with the old copy
        hub.download("gpt2", cache_dir=str(tmp_path / "c"), endpoint=fake_hub.url, force=True)
    assert "no network connection" in _one_line(e)
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(Gpt2kitError) as e:
        hub.download("gpt2", cache_dir=str(tmp_path / "c"), endpoint=fake_hub.url, force=True)
    assert "HF_HUB_OFFLINE is set" in _one_line(e)
    assert hub.download("gpt2", cache_dir=str(tmp_path / "c"), endpoint=fake_hub.url) == d  # the cache is intact
