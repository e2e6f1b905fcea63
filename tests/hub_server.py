"""A small Hugging Face Hub-compatible HTTP server for tests (stdlib only).

It speaks the subset of the Hub HTTP API that ``huggingface_hub`` 2.x uses to
create repos, push commits (regular files inline, large files through the
legacy git-LFS "basic" transfer) and download snapshots. Repos live in a temp
directory; every commit is a 40-hex sha1 id plus a full file snapshot, branches
and tags point at commits, like git.

Usage::

    with HubServer() as hub:
        sha = hub.add_repo("org/expert-a", {"config.json": b"{}"}, revision_tag="v1")
        env = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_DISABLE_XET": "1",
               "HF_TOKEN": "hf_test", "HF_HOME": str(tmp_path)}
        subprocess.run([sys.executable, "-c", code], env=env, check=True)

The client must see ``HF_ENDPOINT`` before ``huggingface_hub`` is imported
(URL templates are built at import) and ``HF_HUB_DISABLE_XET=1`` (uploads would
otherwise go to a Xet CAS endpoint, which this server does not speak): run the
client in a subprocess.

Behaviour that mirrors the real Hub:

* ``create_repo`` makes an initial commit holding a ``.gitattributes`` (pass
  ``gitattributes=False`` to make it empty). ``add_repo`` commits exactly the
  files it is given.
* Writes (create/delete repo, preupload, LFS batch, commit, tag, branch,
  settings) need ``Authorization: Bearer <token>`` with a token in
  ``valid_tokens`` (default ``{"hf_test"}``); ``valid_tokens=None`` accepts any
  request. Private repos are only visible with a valid token (401 RepoNotFound
  otherwise). Gated repos have public metadata and file listings, but
  ``/resolve`` answers 401 (no valid token) or 403 (token not granted) with
  ``X-Error-Code: GatedRepo``; ``grant_access`` lets a token through.
* Errors carry ``X-Error-Code`` (RepoNotFound / RevisionNotFound /
  EntryNotFound / GatedRepo) and ``X-Error-Message`` so the client raises its
  typed errors.

Test-side API: ``add_repo`` / ``commit`` / ``tag`` / ``create_branch`` build
repos; ``resolve`` / ``commit_ids`` / ``files`` / ``read_file`` inspect them;
``fail_next`` injects faults; ``requests`` / ``request_log`` /
``authorizations`` / ``tokens_seen`` record what the client did.
"""

from __future__ import annotations

import base64
import fnmatch
import hashlib
import io
import json
import os
import re
import shutil
import socket
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Iterable, Mapping
from urllib.parse import parse_qs, quote, unquote, urlencode, urlsplit

__all__ = ["HubServer", "RequestRecord", "Fault"]

REPO_TYPES = {"models": "model", "datasets": "dataset", "spaces": "space"}
URL_PREFIX = {"model": "", "dataset": "datasets/", "space": "spaces/"}

# Files matching these are stored through LFS (like the Hub's default .gitattributes).
LFS_PATTERNS = (
    "*.7z", "*.arrow", "*.bin", "*.bz2", "*.ckpt", "*.ftz", "*.gguf", "*.gz", "*.h5",
    "*.joblib", "*.lfs.*", "*.mlmodel", "*.model", "*.msgpack", "*.npy", "*.npz",
    "*.onnx", "*.ot", "*.parquet", "*.pb", "*.pickle", "*.pkl", "*.pt", "*.pth",
    "*.rar", "*.safetensors", "*.tar", "*.tflite", "*.tgz", "*.wasm", "*.xz",
    "*.zip", "*.zst", "*tfevents*",
)
DEFAULT_GITATTRIBUTES = "".join(
    f"{pattern} filter=lfs diff=lfs merge=lfs -text\n" for pattern in LFS_PATTERNS
).encode()

_HEX40 = re.compile(r"[0-9a-f]{40}")
_HEX_PREFIX = re.compile(r"[0-9a-f]{7,40}")
_LFS_BATCH_SUFFIX = ".git/info/lfs/objects/batch"
_SUBPATHS = {
    "revision", "tree", "preupload", "commit", "commits", "refs", "paths-info", "tag",
    "branch", "settings", "resolve", "xet-write-token", "xet-read-token",
}


def _now_iso() -> str:
    return datetime.now(timezone.utc).strftime("%Y-%m-%dT%H:%M:%S.%f")[:-3] + "Z"


def _git_blob_sha1(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def _lfs_pointer(sha256: str, size: int) -> bytes:
    return f"version https://git-lfs.github.com/spec/v1\noid sha256:{sha256}\nsize {size}\n".encode()


def _ascii(text: str) -> str:
    return text.encode("ascii", "replace").decode("ascii").replace("\r", " ").replace("\n", " ")


@dataclass(frozen=True)
class _File:
    size: int
    sha256: str
    lfs: bool
    blob_id: str  # git blob id: of the content (regular) or of the LFS pointer (LFS)

    @property
    def etag(self) -> str:
        return self.sha256 if self.lfs else self.blob_id


@dataclass
class _Commit:
    oid: str
    parent: str | None
    files: dict[str, _File]
    title: str
    message: str
    date: str
    author: str


@dataclass
class _Repo:
    repo_type: str
    repo_id: str
    private: bool = False
    gated: bool = False
    granted: set[str] = field(default_factory=set)
    created_at: str = field(default_factory=_now_iso)
    commits: dict[str, _Commit] = field(default_factory=dict)
    branches: dict[str, str] = field(default_factory=dict)
    tags: dict[str, str] = field(default_factory=dict)
    pr_count: int = 0

    @property
    def key(self) -> tuple[str, str]:
        return (self.repo_type, self.repo_id)


@dataclass
class RequestRecord:
    """One request as the server saw it."""

    method: str
    path: str  # raw path, without the query string
    query: str
    authorization: str | None
    headers: dict[str, str]
    status: int = 0
    fault: bool = False

    def header(self, name: str, default: str | None = None) -> str | None:
        """Request header, looked up case-insensitively."""
        name = name.lower()
        return next((v for k, v in self.headers.items() if k.lower() == name), default)


@dataclass
class Fault:
    """An injected failure, see :meth:`HubServer.fail_next`."""

    path_substring: str
    status: int = 500
    times: int = 1
    method: str | None = None
    body: bytes | None = None
    headers: dict[str, str] = field(default_factory=dict)
    truncate_after: int | None = None
    hits: int = 0

    def matches(self, method: str, path: str) -> bool:
        return (
            self.times > 0
            and self.path_substring in path
            and (self.method is None or self.method.upper() == method)
        )


class _HttpError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        code: str | None = None,
        headers: Mapping[str, str] | None = None,
        body: Any = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.code = code
        self.headers = dict(headers or {})
        self.body = body


@dataclass
class _Response:
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    body: bytes = b""
    file: Path | None = None  # stream this file instead of `body`
    start: int = 0
    length: int = 0
    truncate_after: int | None = None


class HubServer:
    """Hub-compatible HTTP server on 127.0.0.1, for tests.

    Args:
        host, port: where to listen (port 0 picks a free one).
        valid_tokens: bearer tokens accepted for writes and private/gated reads.
            ``None`` disables every auth check.
        lfs_threshold: files at least this large are LFS even if no pattern matches.
        tree_page_size: entries per page of ``/tree`` (the client follows ``Link: rel="next"``).
        gitattributes: whether ``create_repo`` puts a ``.gitattributes`` in the initial commit.
        storage_dir: where blobs are stored (default: a fresh temp dir, removed on ``stop``).
    """

    def __init__(
        self,
        host: str = "127.0.0.1",
        port: int = 0,
        *,
        valid_tokens: Iterable[str] | None = ("hf_test",),
        lfs_threshold: int = 10 * 1024 * 1024,
        tree_page_size: int = 1000,
        gitattributes: bool = True,
        storage_dir: str | Path | None = None,
        user: str = "test-user",
    ) -> None:
        self.host = host
        self._port = port
        self.valid_tokens = None if valid_tokens is None else set(valid_tokens)
        self.lfs_threshold = lfs_threshold
        self.tree_page_size = tree_page_size
        self.gitattributes = gitattributes
        self.user = user
        self._own_storage = storage_dir is None
        if storage_dir is None:
            storage_dir = tempfile.mkdtemp(prefix="hub-server-")
        self.storage_dir = Path(storage_dir)
        self.blob_dir = self.storage_dir / "blobs"
        self.blob_dir.mkdir(parents=True, exist_ok=True)

        self._lock = threading.RLock()
        self._repos: dict[tuple[str, str], _Repo] = {}
        self._blob_ids: dict[tuple[str, bool], str] = {}  # (sha256, lfs) -> git blob id
        self._commit_counter = 0
        self.faults: list[Fault] = []
        self.request_log: list[RequestRecord] = []
        self.errors: list[str] = []  # tracebacks of unexpected server-side exceptions

        self._httpd: ThreadingHTTPServer | None = None
        self._thread: threading.Thread | None = None

    # ------------------------------------------------------------------ lifecycle
    def start(self) -> "HubServer":
        if self._httpd is not None:
            return self
        hub = self

        class Handler(_Handler):
            pass

        Handler.hub = hub
        self._httpd = _QuietServer((self.host, self._port), Handler)
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.05}, name="hub-server", daemon=True
        )
        self._thread.start()
        return self

    def stop(self) -> None:
        if self._httpd is not None:
            self._httpd.shutdown()
            self._httpd.server_close()
            self._httpd = None
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        if self._own_storage:
            shutil.rmtree(self.storage_dir, ignore_errors=True)

    def __enter__(self) -> "HubServer":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def port(self) -> int:
        if self._httpd is None:
            raise RuntimeError("server not started")
        return self._httpd.server_address[1]

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    # ------------------------------------------------------------------ request log
    @property
    def requests(self) -> list[tuple[str, str]]:
        """(method, path) of every request so far, oldest first (path without query)."""
        with self._lock:
            return [(r.method, r.path) for r in self.request_log]

    @property
    def authorizations(self) -> list[str | None]:
        """Authorization header of every request (None where absent), same order as `requests`."""
        with self._lock:
            return [r.authorization for r in self.request_log]

    @property
    def tokens_seen(self) -> set[str]:
        """Bearer tokens seen in any request."""
        with self._lock:
            return {
                r.authorization.split(" ", 1)[1]
                for r in self.request_log
                if r.authorization and r.authorization.lower().startswith("bearer ")
            }

    def clear_log(self) -> None:
        with self._lock:
            self.request_log.clear()

    # ------------------------------------------------------------------ fault injection
    def fail_next(
        self,
        path_substring: str,
        status: int = 500,
        times: int = 1,
        *,
        method: str | None = None,
        body: bytes | str | dict | None = None,
        headers: Mapping[str, str] | None = None,
        truncate_after: int | None = None,
    ) -> Fault:
        """Make the next `times` requests whose path contains `path_substring` fail.

        With `truncate_after`, the request is served normally (full Content-Length)
        but the connection is cut after that many body bytes (tests download resume).
        Note the client retries 408/429/5xx on some endpoints (preupload, LFS batch,
        LFS PUT, tree listing: 5 retries, 23 s of back-off), so use `times` > 5
        or a 4xx status there.
        """
        if isinstance(body, dict):
            body = json.dumps(body).encode()
        elif isinstance(body, str):
            body = body.encode()
        fault = Fault(path_substring, status, times, method, body, dict(headers or {}), truncate_after)
        with self._lock:
            self.faults.append(fault)
        return fault

    def clear_faults(self) -> None:
        with self._lock:
            self.faults.clear()

    # ------------------------------------------------------------------ repo helpers (test side)
    def add_repo(
        self,
        repo_id: str,
        files: Mapping[str, bytes | str | os.PathLike] | str | os.PathLike,
        revision_tag: str | None = None,
        private: bool = False,
        gated: bool = False,
        *,
        repo_type: str = "model",
        message: str = "Add files",
        branch: str = "main",
    ) -> str:
        """Create `repo_id` if needed and commit `files` as the full snapshot of a new commit.

        `files` maps repo paths to bytes, str (utf-8 text) or a pathlib.Path of a local
        file; or is a local folder (all files under it). Tags the commit with
        `revision_tag` if given. `private` / `gated` are (re)applied on every call.
        Returns the commit sha (call twice to get an older, pinnable commit).
        """
        snapshot = self._materialize(files)
        with self._lock:
            repo = self._repos.get((repo_type, repo_id))
            if repo is None:
                repo = _Repo(repo_type, repo_id, private=private, gated=gated)
                self._repos[repo.key] = repo
            else:
                repo.private, repo.gated = private, gated
            oid = self._new_commit(repo, branch, snapshot, title=message, replace=True)
            if revision_tag is not None:
                repo.tags[revision_tag] = oid
            return oid

    def commit(
        self,
        repo_id: str,
        add: Mapping[str, bytes | str | os.PathLike] | None = None,
        delete: Iterable[str] = (),
        *,
        message: str = "Update files",
        branch: str = "main",
        repo_type: str = "model",
    ) -> str:
        """Commit on top of `branch`: add/overwrite `add`, remove `delete`. Returns the sha."""
        snapshot = self._materialize(add or {})
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            return self._new_commit(repo, branch, snapshot, title=message, delete=list(delete))

    def tag(self, repo_id: str, tag: str, revision: str = "main", *, repo_type: str = "model") -> str:
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            repo.tags[tag] = self._resolve(repo, revision)
            return repo.tags[tag]

    def create_branch(self, repo_id: str, branch: str, revision: str = "main", *, repo_type: str = "model") -> str:
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            repo.branches[branch] = self._resolve(repo, revision)
            return repo.branches[branch]

    def set_private(self, repo_id: str, private: bool = True, *, repo_type: str = "model") -> None:
        with self._lock:
            self._repo(repo_id, repo_type).private = private

    def set_gated(self, repo_id: str, gated: bool = True, *, repo_type: str = "model") -> None:
        with self._lock:
            self._repo(repo_id, repo_type).gated = gated

    def grant_access(self, repo_id: str, token: str, *, repo_type: str = "model") -> None:
        """Let `token` download files of a gated repo."""
        with self._lock:
            self._repo(repo_id, repo_type).granted.add(token)

    def delete_repo(self, repo_id: str, *, repo_type: str = "model") -> None:
        with self._lock:
            self._repos.pop((repo_type, repo_id), None)

    def repo_exists(self, repo_id: str, *, repo_type: str = "model") -> bool:
        with self._lock:
            return (repo_type, repo_id) in self._repos

    def repo_ids(self, repo_type: str = "model") -> list[str]:
        with self._lock:
            return sorted(rid for (rtype, rid) in self._repos if rtype == repo_type)

    def resolve(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> str:
        """Commit sha that `revision` (branch, tag, sha or sha prefix) points to."""
        with self._lock:
            return self._resolve(self._repo(repo_id, repo_type), revision)

    def commit_ids(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> list[str]:
        """Commit shas reachable from `revision`, oldest first (so `[-1]` is the head)."""
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            return [c.oid for c in reversed(self._history(repo, self._resolve(repo, revision)))]

    def commit_message(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> str:
        """Title (summary) of the commit at `revision`."""
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            return repo.commits[self._resolve(repo, revision)].title

    def refs(self, repo_id: str, *, repo_type: str = "model") -> dict[str, dict[str, str]]:
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            return {"branches": dict(repo.branches), "tags": dict(repo.tags)}

    def list_files(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> list[str]:
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            return sorted(repo.commits[self._resolve(repo, revision)].files)

    def is_lfs(self, repo_id: str, path: str, revision: str = "main", *, repo_type: str = "model") -> bool:
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            return repo.commits[self._resolve(repo, revision)].files[path].lfs

    def read_file(self, repo_id: str, path: str, revision: str = "main", *, repo_type: str = "model") -> bytes:
        with self._lock:
            repo = self._repo(repo_id, repo_type)
            entry = repo.commits[self._resolve(repo, revision)].files[path]
        return (self.blob_dir / entry.sha256).read_bytes()

    def files(self, repo_id: str, revision: str = "main", *, repo_type: str = "model") -> dict[str, bytes]:
        """Full snapshot {path: bytes} at `revision`."""
        paths = self.list_files(repo_id, revision, repo_type=repo_type)
        return {p: self.read_file(repo_id, p, revision, repo_type=repo_type) for p in paths}

    # ------------------------------------------------------------------ storage internals
    def _materialize(self, files: Mapping[str, Any] | str | os.PathLike) -> dict[str, _File]:
        if isinstance(files, (str, os.PathLike)):
            root = Path(files)
            if not root.is_dir():
                raise ValueError(f"{root} is not a directory")
            files = {p.relative_to(root).as_posix(): p for p in sorted(root.rglob("*")) if p.is_file()}
        out: dict[str, _File] = {}
        for path, value in files.items():
            if isinstance(value, os.PathLike):
                out[path] = self._store_path(path, Path(value))
            elif isinstance(value, str):
                out[path] = self._store_bytes(path, value.encode("utf-8"))
            elif isinstance(value, (bytes, bytearray, memoryview)):
                out[path] = self._store_bytes(path, bytes(value))
            else:
                raise TypeError(f"unsupported content for {path!r}: {type(value).__name__}")
        return out

    def _wants_lfs(self, path: str, size: int, sample: bytes) -> bool:
        name = path.rsplit("/", 1)[-1]
        return (
            size >= self.lfs_threshold
            or any(fnmatch.fnmatch(name, pat) or fnmatch.fnmatch(path, pat) for pat in LFS_PATTERNS)
            or (size > 0 and b"\0" in sample[:512])
        )

    def _put_blob(self, data: bytes) -> str:
        sha = hashlib.sha256(data).hexdigest()
        target = self.blob_dir / sha
        if not target.exists():
            tmp = self.blob_dir / f".{sha}.{threading.get_ident()}.tmp"
            tmp.write_bytes(data)
            os.replace(tmp, target)
        return sha

    def _file_entry(self, sha256: str, size: int, lfs: bool, data: bytes | None = None) -> _File:
        key = (sha256, lfs)
        blob_id = self._blob_ids.get(key)
        if blob_id is None:
            if lfs:
                blob_id = _git_blob_sha1(_lfs_pointer(sha256, size))
            else:
                if data is None:
                    data = (self.blob_dir / sha256).read_bytes()
                blob_id = _git_blob_sha1(data)
            self._blob_ids[key] = blob_id
        return _File(size=size, sha256=sha256, lfs=lfs, blob_id=blob_id)

    def _store_bytes(self, path: str, data: bytes, lfs: bool | None = None) -> _File:
        sha = self._put_blob(data)
        if lfs is None:
            lfs = self._wants_lfs(path, len(data), data[:512])
        with self._lock:
            return self._file_entry(sha, len(data), lfs, data)

    def _store_path(self, path: str, src: Path) -> _File:
        h = hashlib.sha256()
        with open(src, "rb") as f:
            sample = f.read(512)
            f.seek(0)
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
        sha = h.hexdigest()
        target = self.blob_dir / sha
        if not target.exists():
            tmp = self.blob_dir / f".{sha}.{threading.get_ident()}.tmp"
            shutil.copyfile(src, tmp)
            os.replace(tmp, target)
        size = target.stat().st_size
        with self._lock:
            return self._file_entry(sha, size, self._wants_lfs(path, size, sample))

    def _new_commit(
        self,
        repo: _Repo,
        branch: str,
        changes: Mapping[str, _File],
        *,
        title: str,
        description: str = "",
        delete: Iterable[str] = (),
        delete_folders: Iterable[str] = (),
        replace: bool = False,
        parent: str | None = None,
    ) -> str:
        if parent is None:
            parent = repo.branches.get(branch)
        files: dict[str, _File] = {} if (replace or parent is None) else dict(repo.commits[parent].files)
        for path in delete:
            files.pop(path, None)
        for folder in delete_folders:
            prefix = folder.rstrip("/") + "/"
            for path in [p for p in files if p.startswith(prefix)]:
                del files[path]
        files.update(changes)
        self._commit_counter += 1
        digest = hashlib.sha1()
        digest.update(f"{repo.repo_type}/{repo.repo_id}\n{parent}\n{title}\n{description}\n".encode())
        digest.update(f"{self._commit_counter}\n{time.time_ns()}\n{id(self)}\n".encode())
        for path in sorted(files):
            digest.update(f"{path}\0{files[path].blob_id}\n".encode())
        oid = digest.hexdigest()
        message = title if not description else f"{title}\n\n{description}"
        repo.commits[oid] = _Commit(oid, parent, files, title, message, _now_iso(), self.user)
        repo.branches[branch] = oid
        return oid

    def _repo(self, repo_id: str, repo_type: str = "model") -> _Repo:
        try:
            return self._repos[(repo_type, repo_id)]
        except KeyError:
            raise KeyError(f"no {repo_type} repo {repo_id!r} on the test hub") from None

    def _resolve(self, repo: _Repo, revision: str) -> str:
        rev = revision
        if rev.startswith("refs/heads/"):
            rev = rev[len("refs/heads/"):]
        if rev in repo.branches:
            return repo.branches[rev]
        if rev.startswith("refs/tags/"):
            rev = rev[len("refs/tags/"):]
        if rev in repo.tags:
            return repo.tags[rev]
        if rev in repo.commits:
            return rev
        if _HEX_PREFIX.fullmatch(rev):
            matches = [oid for oid in repo.commits if oid.startswith(rev)]
            if len(matches) == 1:
                return matches[0]
        raise _HttpError(404, f"Invalid rev id: {revision}", "RevisionNotFound")

    def _history(self, repo: _Repo, oid: str | None) -> list[_Commit]:
        out = []
        while oid is not None:
            commit = repo.commits[oid]
            out.append(commit)
            oid = commit.parent
        return out

    def _last_commit(self, repo: _Repo, oid: str, path: str, is_dir: bool) -> dict[str, str]:
        def state(c: _Commit) -> Any:
            if is_dir:
                prefix = path + "/"
                return sorted((p, f.blob_id) for p, f in c.files.items() if p.startswith(prefix))
            f = c.files.get(path)
            return f.blob_id if f else None

        commit = repo.commits[oid]
        current = state(commit)
        while commit.parent is not None and state(repo.commits[commit.parent]) == current:
            commit = repo.commits[commit.parent]
        return {"id": commit.oid, "title": commit.title, "date": commit.date}

    # ------------------------------------------------------------------ HTTP dispatch
    def _token(self, headers: Mapping[str, str]) -> str | None:
        auth = headers.get("authorization")
        if auth and auth.lower().startswith("bearer "):
            return auth.split(" ", 1)[1].strip()
        return None

    def _token_valid(self, token: str | None) -> bool:
        if self.valid_tokens is None:
            return True
        return token is not None and token in self.valid_tokens

    def _require_write(self, token: str | None) -> None:
        if not self._token_valid(token):
            raise _HttpError(401, "Invalid credentials in Authorization header")

    def _get_repo_for_read(self, repo_type: str, repo_id: str, token: str | None) -> _Repo:
        repo = self._repos.get((repo_type, repo_id))
        if repo is None:
            raise _HttpError(404, "Repository not found", "RepoNotFound")
        if repo.private and not self._token_valid(token):
            raise _HttpError(401, "Repository not found", "RepoNotFound")
        return repo

    def _get_repo_for_write(self, repo_type: str, repo_id: str, token: str | None) -> _Repo:
        self._require_write(token)
        return self._get_repo_for_read(repo_type, repo_id, token)

    def _check_gate(self, repo: _Repo, token: str | None) -> None:
        if not repo.gated or self.valid_tokens is None:
            return
        kind = repo.repo_type
        if not self._token_valid(token):
            raise _HttpError(
                401,
                f"Access to {kind} {repo.repo_id} is restricted. You must have access to it and be"
                " authenticated to access it. Please log in.",
                "GatedRepo",
            )
        if token not in repo.granted:
            raise _HttpError(
                403,
                f"Access to {kind} {repo.repo_id} is restricted and you are not in the authorized list."
                f" Visit {self.url}/{URL_PREFIX[kind]}{repo.repo_id} to ask for access.",
                "GatedRepo",
            )

    def _handle(self, method: str, raw_path: str, query: str, headers: Mapping[str, str], body: bytes) -> _Response:
        segs = raw_path.split("/")[1:]
        if segs and segs[-1] == "" and len(segs) > 1:
            segs = segs[:-1]
        params = {k: v[-1] for k, v in parse_qs(query, keep_blank_values=True).items()}
        token = self._token(headers)

        if segs[:1] == ["api"]:
            return self._handle_api(method, segs[1:], params, headers, body, token, raw_path)
        if raw_path.endswith(_LFS_BATCH_SUFFIX) and method == "POST":
            repo_type, repo_id = self._split_prefixed_repo(raw_path[1:-len(_LFS_BATCH_SUFFIX)].rstrip("/"))
            return self._lfs_batch(repo_type, repo_id, body, token)
        if segs[:1] == ["_lfs"] and len(segs) == 3:
            if segs[1] == "upload" and method == "PUT":
                return self._lfs_put(segs[2], params, body)
            if segs[1] == "verify" and method == "POST":
                return self._lfs_verify(segs[2], body)
        if "resolve" in segs and method in ("GET", "HEAD"):
            return self._resolve_file(method, segs, headers, token)
        raise _HttpError(404, f"Not found: {method} {raw_path}")

    def _split_prefixed_repo(self, text: str) -> tuple[str, str]:
        text = unquote(text)
        for plural, singular in REPO_TYPES.items():
            if text.startswith(plural + "/"):
                return singular, text[len(plural) + 1:]
        return "model", text

    def _locate_repo(self, repo_type: str, rest: list[str]) -> tuple[str, list[str]]:
        """Split `rest` into (repo_id, tail): repo ids have one or two segments."""
        rest = [unquote(s) for s in rest[:2]] + rest[2:]
        if len(rest) >= 2 and (repo_type, f"{rest[0]}/{rest[1]}") in self._repos:
            return f"{rest[0]}/{rest[1]}", rest[2:]
        if rest and (repo_type, rest[0]) in self._repos:
            return rest[0], rest[1:]
        if len(rest) >= 2 and rest[1] not in _SUBPATHS:
            return f"{rest[0]}/{rest[1]}", rest[2:]
        return (rest[0] if rest else ""), rest[1:]

    def _handle_api(
        self,
        method: str,
        segs: list[str],
        params: dict,
        headers: Mapping[str, str],
        body: bytes,
        token: str | None,
        raw_path: str,
    ) -> _Response:
        if segs == ["whoami-v2"] and method == "GET":
            if token is None or not self._token_valid(token):
                raise _HttpError(401, "Invalid credentials in Authorization header")
            return _json({
                "type": "user", "id": "0" * 24, "name": self.user, "fullname": "Test User",
                "email": None, "orgs": [], "isPro": False,
                "auth": {"type": "access_token", "accessToken": {"displayName": "test", "role": "write"}},
            })
        if segs == ["agent-harnesses"] and method == "GET":  # client telemetry registry (best effort)
            return _json({"standardEnvVars": [], "harnesses": {}})
        if segs == ["validate-yaml"] and method == "POST":
            return self._validate_yaml(body)
        if segs == ["repos", "create"] and method == "POST":
            return self._create_repo(_load_json(body), token)
        if segs == ["repos", "delete"] and method == "DELETE":
            payload = _load_json(body)
            self._require_write(token)
            repo_type = payload.get("type") or "model"
            name = payload.get("name")
            org = payload.get("organization")
            repo_id = f"{org}/{name}" if org else name
            if (repo_type, repo_id) not in self._repos:
                raise _HttpError(404, "Repository not found", "RepoNotFound")
            del self._repos[(repo_type, repo_id)]
            return _json({})
        if len(segs) >= 2 and segs[0] in REPO_TYPES:
            repo_type = REPO_TYPES[segs[0]]
            repo_id, tail = self._locate_repo(repo_type, segs[1:])
            return self._handle_repo_api(method, repo_type, repo_id, tail, params, headers, body, token)
        raise _HttpError(404, f"Not found: {method} {raw_path}")

    def _handle_repo_api(
        self,
        method: str,
        repo_type: str,
        repo_id: str,
        tail: list[str],
        params: dict,
        headers: Mapping[str, str],
        body: bytes,
        token: str | None,
    ) -> _Response:
        head = tail[0] if tail else None
        rest = "/".join(tail[1:])  # still quoted
        if head in ("xet-write-token", "xet-read-token"):
            raise _HttpError(501, "This test Hub does not speak Xet: set HF_HUB_DISABLE_XET=1 for the client")
        if head is None and method == "GET":
            repo = self._get_repo_for_read(repo_type, repo_id, token)
            return _json(self._info(repo, self._resolve(repo, "main"), params))
        if head == "revision" and method == "GET":
            repo = self._get_repo_for_read(repo_type, repo_id, token)
            return _json(self._info(repo, self._resolve(repo, unquote(rest)), params))
        if head == "tree" and method == "GET" and tail[1:]:
            repo = self._get_repo_for_read(repo_type, repo_id, token)
            rev = unquote(tail[1])
            path = unquote("/".join(tail[2:])).strip("/")
            return self._tree(repo, rev, path, params)
        if head == "paths-info" and method == "POST":
            repo = self._get_repo_for_read(repo_type, repo_id, token)
            return self._paths_info(repo, unquote(rest), headers, body)
        if head == "refs" and method == "GET":
            repo = self._get_repo_for_read(repo_type, repo_id, token)
            def ref(kind, name, oid):
                return {"name": name, "ref": f"refs/{kind}/{name}", "targetCommit": oid}

            return _json({
                "branches": [ref("heads", n, o) for n, o in repo.branches.items() if not n.startswith("refs/pr/")],
                "converts": [],
                "tags": [ref("tags", n, o) for n, o in repo.tags.items()],
                "pullRequests": [
                    {"name": n, "ref": n, "targetCommit": o}
                    for n, o in repo.branches.items()
                    if n.startswith("refs/pr/")
                ],
            })
        if head == "commits" and method == "GET":
            repo = self._get_repo_for_read(repo_type, repo_id, token)
            oid = self._resolve(repo, unquote(rest) or "main")
            return _json([
                {
                    "id": c.oid, "title": c.title, "message": c.message, "date": c.date,
                    "authors": [{"user": c.author}],
                    "formatted": {"title": c.title, "message": c.message},
                }
                for c in self._history(repo, oid)
            ])
        if head == "preupload" and method == "POST":
            repo = self._get_repo_for_write(repo_type, repo_id, token)
            return self._preupload(repo, unquote(rest), params, _load_json(body))
        if head == "commit" and method == "POST":
            repo = self._get_repo_for_write(repo_type, repo_id, token)
            return self._commit(repo, unquote(rest), params, body)
        if head == "tag" and method == "POST":
            repo = self._get_repo_for_write(repo_type, repo_id, token)
            payload = _load_json(body)
            tag = payload.get("tag")
            if not tag:
                raise _HttpError(400, "Missing tag")
            if tag in repo.tags:
                raise _HttpError(409, f"Tag {tag} already exists")
            repo.tags[tag] = self._resolve(repo, unquote(rest) or "main")
            return _json({})
        if head == "tag" and method == "DELETE":
            repo = self._get_repo_for_write(repo_type, repo_id, token)
            if repo.tags.pop(unquote(rest), None) is None:
                raise _HttpError(404, f"Invalid rev id: {unquote(rest)}", "RevisionNotFound")
            return _json({})
        if head == "branch" and method == "POST":
            repo = self._get_repo_for_write(repo_type, repo_id, token)
            payload = _load_json(body)
            branch = unquote(rest)
            if branch in repo.branches:
                raise _HttpError(409, f"Branch {branch} already exists")
            repo.branches[branch] = self._resolve(repo, payload.get("startingPoint") or "main")
            return _json({})
        if head == "branch" and method == "DELETE":
            repo = self._get_repo_for_write(repo_type, repo_id, token)
            if repo.branches.pop(unquote(rest), None) is None:
                raise _HttpError(404, f"Invalid rev id: {unquote(rest)}", "RevisionNotFound")
            return _json({})
        if head == "settings" and method == "PUT":
            repo = self._get_repo_for_write(repo_type, repo_id, token)
            payload = _load_json(body)
            if "private" in payload:
                repo.private = bool(payload["private"])
            if payload.get("visibility") in ("private", "public"):
                repo.private = payload["visibility"] == "private"
            if "gated" in payload:
                repo.gated = payload["gated"] not in (False, None, "false")
            return _json({})
        raise _HttpError(404, f"Not found: {method} /api/{repo_type}s/{repo_id}/{'/'.join(tail)}")

    # --- endpoints ------------------------------------------------------------
    def _validate_yaml(self, body: bytes) -> _Response:
        content = _load_json(body).get("content", "")
        if content.startswith("---"):
            end = content.find("\n---", 3)
            if end == -1:
                return _json({"errors": [{"message": "Unterminated YAML front matter"}], "warnings": []}, 400)
            try:
                import yaml  # optional: only checks syntax when PyYAML is around
            except ImportError:
                yaml = None
            if yaml is not None:
                try:
                    data = yaml.safe_load(content[3:end])
                except yaml.YAMLError as e:
                    return _json({"errors": [{"message": f"Invalid YAML: {_ascii(str(e))}"}], "warnings": []}, 400)
                if data is not None and not isinstance(data, dict):
                    return _json({"errors": [{"message": "YAML metadata must be a mapping"}], "warnings": []}, 400)
        return _json({"errors": [], "warnings": []})

    def _create_repo(self, payload: dict, token: str | None) -> _Response:
        self._require_write(token)
        name = payload.get("name")
        org = payload.get("organization")
        repo_type = payload.get("type") or "model"
        if not name or repo_type not in URL_PREFIX:
            raise _HttpError(400, "Invalid repo name or type")
        repo_id = f"{org}/{name}" if org else name
        url = f"{self.url}/{URL_PREFIX[repo_type]}{repo_id}"
        if (repo_type, repo_id) in self._repos:
            # The client reads `url` from the 409 body when exist_ok=True.
            return _json({"error": "You already created this model repo", "url": url}, 409)
        private = payload.get("visibility") == "private" or bool(payload.get("private"))
        repo = _Repo(repo_type, repo_id, private=private)
        self._repos[repo.key] = repo
        initial: dict[str, _File] = {}
        if self.gitattributes:
            initial[".gitattributes"] = self._store_bytes(".gitattributes", DEFAULT_GITATTRIBUTES, lfs=False)
        self._new_commit(repo, "main", initial, title="initial commit")
        return _json({"url": url, "name": repo_id, "id": repo_id})

    def _info(self, repo: _Repo, oid: str, params: dict) -> dict:
        commit = repo.commits[oid]
        blobs = str(params.get("blobs", "")).lower() in ("1", "true")
        siblings = []
        for path in sorted(commit.files):
            f = commit.files[path]
            sib: dict[str, Any] = {"rfilename": path}
            if blobs:
                sib.update(size=f.size, blobId=f.blob_id)
                if f.lfs:
                    pointer_size = len(_lfs_pointer(f.sha256, f.size))
                    sib["lfs"] = {"size": f.size, "sha256": f.sha256, "pointerSize": pointer_size}
            siblings.append(sib)
        info: dict[str, Any] = {
            "_id": hashlib.sha1(f"{repo.repo_type}/{repo.repo_id}".encode()).hexdigest()[:24],
            "id": repo.repo_id,
            "author": repo.repo_id.split("/")[0] if "/" in repo.repo_id else None,
            "sha": commit.oid,
            "lastModified": commit.date,
            "createdAt": repo.created_at,
            "private": repo.private,
            "gated": "manual" if repo.gated else False,
            "disabled": False,
            "downloads": 0,
            "likes": 0,
            "tags": [],
            "siblings": siblings,
            "usedStorage": sum(f.size for f in commit.files.values()),
        }
        if repo.repo_type == "model":
            info["modelId"] = repo.repo_id
            card = self._card_data(commit)
            if card is not None:
                info["cardData"] = card
                if isinstance(card.get("library_name"), str):
                    info["library_name"] = card["library_name"]
                if isinstance(card.get("tags"), list):
                    info["tags"] = [t for t in card["tags"] if isinstance(t, str)]
        return info

    def _card_data(self, commit: _Commit) -> dict | None:
        f = commit.files.get("README.md")
        if f is None or f.size > 1 << 20:
            return None
        text = (self.blob_dir / f.sha256).read_text("utf-8", errors="replace")
        if not text.startswith("---"):
            return None
        end = text.find("\n---", 3)
        if end == -1:
            return None
        try:
            import yaml
            data = yaml.safe_load(text[3:end])
        except Exception:
            return None
        if not isinstance(data, dict):
            return None
        return json.loads(json.dumps(data, default=str))

    def _entries(self, repo: _Repo, oid: str, expand: bool) -> tuple[dict[str, dict], dict[str, dict]]:
        """(files, folders) of a commit as tree-API JSON, keyed by path."""
        commit = repo.commits[oid]
        files: dict[str, dict] = {}
        folders: dict[str, dict] = {}
        for path, f in commit.files.items():
            entry: dict[str, Any] = {"type": "file", "oid": f.blob_id, "size": f.size, "path": path}
            if f.lfs:
                entry["lfs"] = {"oid": f.sha256, "size": f.size, "pointerSize": len(_lfs_pointer(f.sha256, f.size))}
            if expand:
                entry["lastCommit"] = self._last_commit(repo, oid, path, False)
            files[path] = entry
            parts = path.split("/")
            for i in range(1, len(parts)):
                folders.setdefault("/".join(parts[:i]), {})
        for folder in folders:
            prefix = folder + "/"
            tree_oid = hashlib.sha1(
                "".join(f"{p}\0{f.blob_id}\n" for p, f in sorted(commit.files.items()) if p.startswith(prefix)).encode()
            ).hexdigest()
            entry = {"type": "directory", "oid": tree_oid, "size": 0, "path": folder}
            if expand:
                entry["lastCommit"] = self._last_commit(repo, oid, folder, True)
            folders[folder] = entry
        return files, folders

    def _tree(self, repo: _Repo, rev: str, path: str, params: dict) -> _Response:
        oid = self._resolve(repo, rev)
        recursive = str(params.get("recursive", "")).lower() in ("1", "true")
        expand = str(params.get("expand", "")).lower() in ("1", "true")
        files, folders = self._entries(repo, oid, expand)
        if path and path not in folders:
            if path in files:
                listing = [files[path]]
            else:
                raise _HttpError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": oid})
        else:
            prefix = path + "/" if path else ""
            listing = []
            for p, entry in sorted({**folders, **files}.items()):
                if not p.startswith(prefix):
                    continue
                if not recursive and "/" in p[len(prefix):]:
                    continue
                listing.append(entry)
            listing.sort(key=lambda e: (e["type"] != "directory", e["path"]))
        try:
            cursor = int(params.get("cursor", "0") or 0)
        except ValueError:
            raise _HttpError(400, "Invalid cursor") from None
        page_size = max(1, self.tree_page_size if not expand else min(self.tree_page_size, 50))
        page = listing[cursor:cursor + page_size]
        headers = {"X-Repo-Commit": oid}
        if cursor + page_size < len(listing):
            q = {
                "recursive": "true" if recursive else "false",
                "expand": "true" if expand else "false",
                "cursor": str(cursor + page_size),
            }
            quoted_path = "/" + quote(path, safe="") if path else ""
            base = f"{self.url}/api/{repo.repo_type}s/{repo.repo_id}/tree/{quote(rev, safe='')}{quoted_path}"
            next_url = f"{base}?{urlencode(q)}"
            headers["Link"] = f'<{next_url}>; rel="next"'
        return _json(page, headers=headers)

    def _paths_info(self, repo: _Repo, rev: str, headers: Mapping[str, str], body: bytes) -> _Response:
        oid = self._resolve(repo, rev)
        ctype = headers.get("content-type", "")
        if "json" in ctype:
            payload = _load_json(body)
            paths = payload.get("paths", [])
            expand = bool(payload.get("expand"))
        else:
            form = parse_qs(body.decode("utf-8"), keep_blank_values=True)
            paths = form.get("paths", [])
            expand = (form.get("expand", ["false"])[-1]).lower() in ("1", "true")
        files, folders = self._entries(repo, oid, expand)
        out = []
        for p in paths if isinstance(paths, list) else [paths]:
            p = p.strip("/")
            if p in files:
                out.append(files[p])
            elif p in folders:
                out.append(folders[p])
        return _json(out)

    def _preupload(self, repo: _Repo, rev: str, params: dict, payload: dict) -> _Response:
        oid = self._resolve(repo, rev)
        current = repo.commits[oid].files
        out = []
        for item in payload.get("files", []):
            path = item["path"]
            size = int(item.get("size", 0))
            sample = base64.b64decode(item.get("sample", "") or "")
            lfs = self._wants_lfs(path, size, sample)
            existing = current.get(path)
            remote_oid = None
            if existing is not None:
                remote_oid = existing.sha256 if existing.lfs else existing.blob_id
            mode = "lfs" if lfs else "regular"
            out.append({"path": path, "uploadMode": mode, "shouldIgnore": False, "oid": remote_oid})
        return _json({"files": out, "commitOid": oid})

    def _lfs_batch(self, repo_type: str, repo_id: str, body: bytes, token: str | None) -> _Response:
        self._get_repo_for_write(repo_type, repo_id, token)
        payload = _load_json(body)
        if payload.get("operation") != "upload":
            raise _HttpError(400, "Only the upload operation is supported by the test hub")
        objects = []
        for obj in payload.get("objects", []):
            oid, size = obj["oid"], int(obj["size"])
            entry: dict[str, Any] = {"oid": oid, "size": size, "authenticated": True}
            blob = self.blob_dir / oid
            if not (blob.exists() and blob.stat().st_size == size):
                entry["actions"] = {
                    "upload": {"href": f"{self.url}/_lfs/upload/{oid}?size={size}", "expires_in": 3600},
                    "verify": {"href": f"{self.url}/_lfs/verify/{oid}", "header": {}},
                }
            objects.append(entry)
        lfs_json = {"Content-Type": "application/vnd.git-lfs+json"}
        return _json({"transfer": "basic", "objects": objects}, headers=lfs_json)

    def _lfs_put(self, oid: str, params: dict, body: bytes) -> _Response:
        sha = hashlib.sha256(body).hexdigest()
        if sha != oid:
            raise _HttpError(400, f"sha256 mismatch: expected {oid}, got {sha}")
        if "size" in params and int(params["size"]) != len(body):
            raise _HttpError(400, f"size mismatch: expected {params['size']}, got {len(body)}")
        self._put_blob(body)
        return _Response(200, {"ETag": f'"{hashlib.md5(body).hexdigest()}"'}, b"")

    def _lfs_verify(self, oid: str, body: bytes) -> _Response:
        payload = _load_json(body)
        blob = self.blob_dir / oid
        if not blob.exists() or (payload.get("size") is not None and blob.stat().st_size != int(payload["size"])):
            raise _HttpError(404, f"LFS object {oid} not found")
        return _json({})

    def _commit(self, repo: _Repo, rev: str, params: dict, body: bytes) -> _Response:
        lines = [json.loads(line) for line in body.decode("utf-8").splitlines() if line.strip()]
        if not lines or lines[0].get("key") != "header":
            raise _HttpError(400, "The first line of a commit payload must be the header")
        header = lines[0]["value"]
        create_pr = str(params.get("create_pr", "")).lower() in ("1", "true")
        branch = rev[len("refs/heads/"):] if rev.startswith("refs/heads/") else rev
        if branch not in repo.branches:
            raise _HttpError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        head = repo.branches[branch]
        parent_commit = header.get("parentCommit")
        if parent_commit is not None and not create_pr and parent_commit != head:
            raise _HttpError(412, "A commit has happened since. Please refresh and try again.")

        changes: dict[str, _File] = {}
        deleted: list[str] = []
        deleted_folders: list[str] = []
        base_oid = parent_commit if (create_pr and parent_commit in repo.commits) else head
        base = repo.commits[base_oid].files
        for line in lines[1:]:
            key, value = line.get("key"), line.get("value", {})
            path = value.get("path", "")
            if not path or path.startswith("/") or ".." in path.split("/"):
                raise _HttpError(400, f"Invalid path in commit: {path!r}")
            if key == "file":
                if value.get("encoding", "base64") != "base64":
                    data = value["content"].encode("utf-8")
                else:
                    data = base64.b64decode(value["content"])
                changes[path] = self._store_bytes(path, data, lfs=False)
            elif key == "lfsFile":
                oid = value["oid"]
                blob = self.blob_dir / oid
                if not blob.exists():
                    raise _HttpError(
                        422,
                        "Your push was rejected because an LFS pointer pointed to a file that does not exist"
                        f" ({path}: {oid})",
                    )
                size = blob.stat().st_size
                if value.get("size") is not None and int(value["size"]) != size:
                    raise _HttpError(422, f"LFS object size mismatch for {path}")
                changes[path] = self._file_entry(oid, size, True)
            elif key == "deletedFile":
                if path not in base and path not in changes:
                    raise _HttpError(404, "A file with this name doesn't exist", "EntryNotFound")
                changes.pop(path, None)
                deleted.append(path)
            elif key == "deletedFolder":
                prefix = path.rstrip("/") + "/"
                if not any(p.startswith(prefix) for p in base):
                    raise _HttpError(404, "A file with this name doesn't exist", "EntryNotFound")
                deleted_folders.append(path)
            else:
                raise _HttpError(400, f"Unsupported commit operation {key!r}")

        pr_url = None
        if create_pr:
            repo.pr_count += 1
            target_branch = f"refs/pr/{repo.pr_count}"
            repo.branches[target_branch] = base_oid
            pr_url = f"{self.url}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}/discussions/{repo.pr_count}"
        else:
            target_branch = branch
        oid = self._new_commit(
            repo, target_branch, changes,
            title=header.get("summary") or "Upload files",
            description=header.get("description") or "",
            delete=deleted, delete_folders=deleted_folders,
        )
        return _json({
            "success": True,
            "commitOid": oid,
            "commitUrl": f"{self.url}/{URL_PREFIX[repo.repo_type]}{repo.repo_id}/commit/{oid}",
            "commitMessage": header.get("summary") or "",
            "hookOutput": "",
            "pullRequestUrl": pr_url,
        })

    def _resolve_file(self, method: str, segs: list[str], headers: Mapping[str, str], token: str | None) -> _Response:
        repo_type = "model"
        if segs[0] in REPO_TYPES and segs[0] != "models":
            repo_type, segs = REPO_TYPES[segs[0]], segs[1:]
        if len(segs) >= 4 and segs[2] == "resolve" and (repo_type, unquote(f"{segs[0]}/{segs[1]}")) in self._repos:
            repo_id, rest = unquote(f"{segs[0]}/{segs[1]}"), segs[3:]
        elif len(segs) >= 3 and segs[1] == "resolve":
            repo_id, rest = unquote(segs[0]), segs[2:]
        elif len(segs) >= 4 and segs[2] == "resolve":
            repo_id, rest = unquote(f"{segs[0]}/{segs[1]}"), segs[3:]
        else:
            raise _HttpError(404, "Not found")
        repo = self._get_repo_for_read(repo_type, repo_id, token)
        if len(rest) < 2:
            raise _HttpError(404, "Entry not found", "EntryNotFound")
        oid = self._resolve(repo, unquote(rest[0]))
        self._check_gate(repo, token)
        path = unquote("/".join(rest[1:]))
        entry = repo.commits[oid].files.get(path)
        if entry is None:
            raise _HttpError(404, "Entry not found", "EntryNotFound", {"X-Repo-Commit": oid})
        blob = self.blob_dir / entry.sha256
        resp_headers = {
            "X-Repo-Commit": oid,
            "ETag": f'"{entry.etag}"',
            "Accept-Ranges": "bytes",
            "Content-Type": "application/octet-stream",
            "Content-Disposition": f'inline; filename="{quote(path.rsplit("/", 1)[-1])}"',
        }
        if entry.lfs:
            resp_headers["X-Linked-Etag"] = f'"{entry.sha256}"'
            resp_headers["X-Linked-Size"] = str(entry.size)
        start, length, status = 0, entry.size, 200
        range_header = headers.get("range")
        if range_header:
            m = re.fullmatch(r"\s*bytes\s*=\s*(\d*)\s*-\s*(\d*)\s*", range_header)
            if not m or (not m.group(1) and not m.group(2)):
                unsatisfiable = {"Content-Range": f"bytes */{entry.size}"}
                raise _HttpError(416, f"Unsupported range {range_header}", headers=unsatisfiable)
            first, last = m.group(1), m.group(2)
            if first:
                start = int(first)
                end = min(int(last), entry.size - 1) if last else entry.size - 1
            else:
                start = max(entry.size - int(last), 0)
                end = entry.size - 1
            if start >= entry.size or end < start:
                raise _HttpError(416, "Range not satisfiable", headers={"Content-Range": f"bytes */{entry.size}"})
            length = end - start + 1
            status = 206
            resp_headers["Content-Range"] = f"bytes {start}-{end}/{entry.size}"
        resp_headers["Content-Length"] = str(length)
        return _Response(status, resp_headers, file=blob if method == "GET" else None, start=start, length=length)

    # --- called by the handler -----------------------------------------------------
    def _serve(self, handler: "_Handler") -> None:
        split = urlsplit(handler.path)
        raw_path, query = split.path or "/", split.query
        headers = {k.lower(): v for k, v in handler.headers.items()}
        record = RequestRecord(
            handler.command, raw_path, query, handler.headers.get("Authorization"), dict(handler.headers.items())
        )
        try:
            body = handler.read_body()
        except Exception as e:  # malformed body: answer and drop the connection
            handler.close_connection = True
            resp = _error_response(_HttpError(400, f"Bad request body: {e}"))
            with self._lock:
                record.status = resp.status
                self.request_log.append(record)
            handler.send(resp)
            return
        with self._lock:
            self.request_log.append(record)
            fault = next((f for f in self.faults if f.matches(handler.command, raw_path)), None)
            if fault is not None:
                fault.times -= 1
                fault.hits += 1
                record.fault = True
        if fault is not None and fault.truncate_after is None:
            body = fault.body
            if body is None:
                body = json.dumps({"error": f"Injected fault ({fault.status})"}).encode()
            resp = _Response(fault.status, {"Content-Type": "application/json", **fault.headers}, body)
        else:
            try:
                with self._lock:
                    resp = self._handle(handler.command, raw_path, query, headers, body)
            except _HttpError as e:
                resp = _error_response(e)
            except Exception:
                tb = traceback.format_exc()
                self.errors.append(tb)
                resp = _Response(500, {"Content-Type": "text/plain; charset=utf-8"}, tb.encode())
            if fault is not None:
                resp.truncate_after = fault.truncate_after
        record.status = resp.status
        handler.send(resp)


def _load_json(body: bytes) -> dict:
    if not body:
        return {}
    try:
        data = json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise _HttpError(400, f"Invalid JSON body: {e}") from e
    if not isinstance(data, dict):
        raise _HttpError(400, "JSON body must be an object")
    return data


def _json(obj: Any, status: int = 200, headers: Mapping[str, str] | None = None) -> _Response:
    h = {"Content-Type": "application/json; charset=utf-8"}
    h.update(headers or {})
    return _Response(status, h, json.dumps(obj).encode())


def _error_response(e: _HttpError) -> _Response:
    headers = {"X-Error-Message": _ascii(e.message)}
    if e.code:
        headers["X-Error-Code"] = e.code
    headers.update(e.headers)
    return _json(e.body if e.body is not None else {"error": e.message}, e.status, headers)


class _QuietServer(ThreadingHTTPServer):
    daemon_threads = True

    def handle_error(self, request: Any, client_address: Any) -> None:
        # A client that drops a keep-alive connection (or a truncate fault) is not an error.
        if isinstance(sys.exc_info()[1], (ConnectionError, TimeoutError)):
            return
        super().handle_error(request, client_address)


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # headers and body go out in separate writes: avoid 40 ms stalls
    server_version = "TestHub/1.0"
    hub: HubServer  # set on a per-server subclass

    def log_message(self, format: str, *args: Any) -> None:  # keep test output quiet
        pass

    def read_body(self) -> bytes:
        if "chunked" in (self.headers.get("Transfer-Encoding") or "").lower():
            out = io.BytesIO()
            while True:
                line = self.rfile.readline(65537)
                size = int(line.split(b";", 1)[0].strip() or b"0", 16)
                if size == 0:
                    while self.rfile.readline(65537) not in (b"\r\n", b"\n", b""):
                        pass  # trailers
                    break
                out.write(self.rfile.read(size))
                self.rfile.readline(65537)  # CRLF after chunk
            return out.getvalue()
        length = int(self.headers.get("Content-Length") or 0)
        return self.rfile.read(length) if length > 0 else b""

    def send(self, resp: _Response) -> None:
        self.send_response(resp.status)
        headers = dict(resp.headers)
        if resp.file is None and "Content-Length" not in headers:
            headers["Content-Length"] = str(len(resp.body))
        for k, v in headers.items():
            self.send_header(k, v)
        if resp.truncate_after is not None:
            self.send_header("Connection", "close")
            self.close_connection = True
        self.end_headers()
        if self.command == "HEAD":
            return
        limit = resp.truncate_after
        if resp.file is not None:
            remaining = resp.length if limit is None else min(resp.length, limit)
            with open(resp.file, "rb") as f:
                f.seek(resp.start)
                while remaining > 0:
                    chunk = f.read(min(1 << 20, remaining))
                    if not chunk:
                        break
                    self.wfile.write(chunk)
                    remaining -= len(chunk)
        else:
            self.wfile.write(resp.body if limit is None else resp.body[:limit])
        if limit is not None:
            self.wfile.flush()
            try:
                self.connection.shutdown(socket.SHUT_RDWR)
            except OSError:
                pass

    def _do(self) -> None:
        self.hub._serve(self)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = do_PATCH = _do
