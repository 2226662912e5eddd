"""A loopback stand-in for the Hugging Face Hub: the part of its HTTP API that the real huggingface_hub client uses to
create a repo and a branch, commit files in "regular" mode (no LFS, no Xet) and download them (KNOWLEDGE.md section 3).

    with HubServer() as hub:   # 127.0.0.1, a free port, served from a thread
        ...                    # client: HfApi(endpoint=hub.url) or HF_ENDPOINT=hub.url, and HF_HUB_DISABLE_XET=1

Repos live in memory. Writes need ``Authorization: Bearer WRITE_TOKEN`` (401 without a valid token, 403 with
READ_TOKEN); private repos look missing (404) to requests without a token. ``hub.faults["commit"] = 500`` makes the next
request to that route fail with that status. ``hub.requests`` lists every (method, path); ``hub.unknown`` the ones no
route matched.
"""

from __future__ import annotations

import base64
import hashlib
import json
import re
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import unquote, urlsplit

WRITE_TOKEN = "hf_loopback_write"
READ_TOKEN = "hf_loopback_read"
_ROLES = {WRITE_TOKEN: "write", READ_TOKEN: "read"}
_EMPTY_COMMIT = hashlib.sha1(b"").hexdigest()  # main of a new repo: no files (the real Hub adds .gitattributes)


def git_blob_sha1(data: bytes) -> str:
    """Git's blob id: the client compares it with its own for unchanged files, and caches downloads under it (ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


def commit_sha(parent: str, files: dict[str, bytes]) -> str:
    """A commit id that hashes the parent and every file's content, as git's does (not git's exact bytes)."""
    h = hashlib.sha1(parent.encode())
    for path in sorted(files):
        h.update(f"\n{path} {git_blob_sha1(files[path])}".encode())
    return h.hexdigest()


@dataclass
class Repo:
    private: bool
    branches: dict[str, str] = field(default_factory=lambda: {"main": _EMPTY_COMMIT})  # branch -> commit id
    commits: dict[str, dict[str, bytes]] = field(default_factory=lambda: {_EMPTY_COMMIT: {}})  # commit id -> files
    messages: dict[str, str] = field(default_factory=dict)  # commit id -> summary


class HubError(Exception):
    """An error reply; ``code`` goes to X-Error-Code, from which the client picks its exception class."""

    def __init__(self, status: int, message: str, code: str | None = None, **extra):
        super().__init__(message)
        self.status, self.code, self.extra = status, code, extra


_REPO = r"(?P<repo>[^/]+/[^/]+)"
_REV = r"(?P<rev>[^/]+)"  # the client quotes a revision with safe="", so it is one path segment
# (methods, path pattern, handler, fault name). Which client call needs each route is said at the handler.
_ROUTES = [
    ("POST", r"/api/validate-yaml", "validate_yaml", "validate-yaml"),
    ("POST", r"/api/repos/create", "create_repo", "create"),
    ("POST", rf"/api/models/{_REPO}/branch/{_REV}", "create_branch", "branch"),
    ("POST", rf"/api/models/{_REPO}/preupload/{_REV}", "preupload", "preupload"),
    ("POST", rf"/api/models/{_REPO}/commit/{_REV}", "commit", "commit"),
    ("GET", rf"/api/models/{_REPO}(?:/revision/{_REV})?", "model_info", "info"),
    ("GET", rf"/api/models/{_REPO}/tree/{_REV}(?:/(?P<path>.*))?", "tree", "tree"),
    ("GET HEAD", rf"/{_REPO}/resolve/{_REV}/(?P<path>.+)", "resolve", "resolve"),
]


class HubServer:
    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.faults: dict[str, int] = {}
        self.requests: list[tuple[str, str]] = []
        self.unknown: list[tuple[str, str]] = []
        self._lock = threading.Lock()  # one request changes the repos at a time
        handler = type("Handler", (_Handler,), {"hub": self})
        self._httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler)
        self._httpd.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._httpd.server_address[1]}"
        self._thread = threading.Thread(target=self._httpd.serve_forever, daemon=True)

    def __enter__(self) -> "HubServer":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return repo.commits[repo.branches[revision]]

    # --- access -------------------------------------------------------------------------------------------------

    def _role(self, headers) -> str | None:
        auth = headers.get("Authorization")
        if auth is None:
            return None
        role = _ROLES.get(auth.removeprefix("Bearer "))
        if role is None:
            raise HubError(401, "Invalid credentials in Authorization header")
        return role

    def _check_write(self, headers) -> None:
        role = self._role(headers)
        if role is None:
            raise HubError(401, "You must be authenticated to write")
        if role != "write":
            raise HubError(403, "You don't have the rights to write to this namespace")

    def _repo(self, repo_id: str, headers) -> Repo:
        repo = self.repos.get(repo_id)
        if repo is None or (repo.private and self._role(headers) is None):
            raise HubError(404, "Repository not found", "RepoNotFound")
        return repo

    @staticmethod
    def _commit_id(repo: Repo, rev: str) -> str:
        """A branch name or a commit id of ``repo`` (transformers downloads the later files at the commit id)."""
        if rev in repo.branches or rev in repo.commits:
            return repo.branches.get(rev, rev)
        raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")

    # --- routes: each returns the JSON reply, or (status, headers, body) ----------------------------------------

    def validate_yaml(self, req) -> dict:
        """create_commit / upload_folder check a README.md's metadata first."""
        return {"errors": [], "warnings": []}

    def create_repo(self, req) -> dict:
        """HfApi.create_repo; 409 for an existing repo, which exist_ok=True accepts."""
        self._check_write(req.headers)
        body = req.json()
        repo_id = f"{body['organization']}/{body['name']}"
        if repo_id in self.repos:
            # exist_ok=True reads the url of the existing repo from this reply
            raise HubError(409, "You already created this model repo", url=f"{self.url}/{repo_id}")
        self.repos[repo_id] = Repo(private=body.get("visibility") == "private")
        return {"url": f"{self.url}/{repo_id}", "name": repo_id}

    def create_branch(self, req, repo: str, rev: str) -> dict:
        """HfApi.create_branch; 409 for an existing branch, which exist_ok=True accepts."""
        self._check_write(req.headers)
        r = self._repo(repo, req.headers)
        if rev in r.branches:
            raise HubError(409, "Reference already exists")
        r.branches[rev] = self._commit_id(r, req.json().get("startingPoint") or "main")
        return {}

    def preupload(self, req, repo: str, rev: str) -> dict:
        """create_commit asks how to send each file: always "regular" (base64 in the commit); the oid of a file already
        there lets the client leave out unchanged files."""
        self._check_write(req.headers)
        r = self._repo(repo, req.headers)
        files = r.commits[self._commit_id(r, rev)]
        return {"files": [{"path": f["path"], "uploadMode": "regular", "shouldIgnore": False,
                           "oid": git_blob_sha1(files[f["path"]]) if f["path"] in files else None}
                          for f in req.json()["files"]]}

    def commit(self, req, repo: str, rev: str) -> dict:
        """create_commit's ndjson body: a header line, then one line per operation (regular files, deletions)."""
        self._check_write(req.headers)
        r = self._repo(repo, req.headers)
        if rev not in r.branches:
            raise HubError(404, f"Invalid rev id: {rev}", "RevisionNotFound")
        parent = r.branches[rev]
        files = dict(r.commits[parent])
        lines = [json.loads(line) for line in req.body().splitlines() if line.strip()]
        if lines[0]["key"] != "header":
            raise HubError(400, "the first line of a commit must be its header")
        for op in lines[1:]:
            if op["key"] == "file":
                files[op["value"]["path"]] = base64.b64decode(op["value"]["content"])
            elif op["key"] == "deletedFile":
                files.pop(op["value"]["path"], None)
            else:
                raise HubError(400, f"this server takes regular files only, not {op['key']!r}")
        sha = commit_sha(parent, files)
        r.commits[sha], r.messages[sha], r.branches[rev] = files, lines[0]["value"]["summary"], sha
        return {"commitUrl": f"{self.url}/{repo}/commit/{sha}", "commitOid": sha, "success": True}

    def model_info(self, req, repo: str, rev: str | None = None) -> dict:
        """repo_info / model_info: snapshot_download resolves the revision to ``sha`` here; a no-op commit reads it."""
        r = self._repo(repo, req.headers)
        sha = self._commit_id(r, rev or "main")
        return {"id": repo, "modelId": repo, "sha": sha, "private": r.private,
                "siblings": [{"rfilename": path} for path in r.commits[sha]]}

    def tree(self, req, repo: str, rev: str, path: str | None = None) -> list:
        """list_repo_tree: snapshot_download lists the files of the resolved commit (one page, no Link header)."""
        r = self._repo(repo, req.headers)
        files = r.commits[self._commit_id(r, rev)]
        return [{"type": "file", "path": p, "size": len(data), "oid": git_blob_sha1(data)}
                for p, data in files.items() if path is None or p.startswith(path.rstrip("/") + "/")]

    def resolve(self, req, repo: str, rev: str, path: str) -> tuple[int, dict, bytes]:
        """hf_hub_download: HEAD for the metadata (X-Repo-Commit, ETag, Content-Length), then GET, with Range when it
        resumes an interrupted download."""
        r = self._repo(repo, req.headers)
        sha = self._commit_id(r, rev)
        if path not in r.commits[sha]:
            raise HubError(404, f"Entry not found: {path}", "EntryNotFound")
        data = r.commits[sha][path]
        headers = {"X-Repo-Commit": sha, "ETag": f'"{git_blob_sha1(data)}"',
                   "Content-Type": "application/octet-stream"}
        start = re.fullmatch(r"bytes=(\d+)-", req.headers.get("Range", ""))
        if start:
            offset = int(start.group(1))
            headers["Content-Range"] = f"bytes {offset}-{len(data) - 1}/{len(data)}"
            return 206, headers, data[offset:]
        return 200, headers, data

    def dispatch(self, req, method: str, path: str):
        self.requests.append((method, path))
        for methods, pattern, name, fault in _ROUTES:
            match = re.fullmatch(pattern, path)
            if method in methods.split() and match:
                if fault in self.faults:
                    status = self.faults.pop(fault)
                    raise HubError(status, f"injected fault: {fault} answers {status}")
                args = {k: unquote(v) for k, v in match.groupdict().items() if v is not None}
                with self._lock:
                    return getattr(self, name)(req, **args)
        self.unknown.append((method, path))
        raise HubError(404, f"{method} {path} is not implemented by the loopback Hub")


class _Handler(BaseHTTPRequestHandler):
    hub: HubServer
    protocol_version = "HTTP/1.1"  # keep-alive; every reply carries Content-Length

    def body(self) -> bytes:
        if self._body is None:
            self._body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        return self._body

    def json(self) -> dict:
        return json.loads(self.body() or b"{}")

    def _handle(self) -> None:
        self._body = None  # one handler serves every request of a kept-alive connection
        try:
            reply = self.hub.dispatch(self, self.command, urlsplit(self.path).path)
            status, headers, data = reply if isinstance(reply, tuple) else (200, {}, json.dumps(reply).encode())
        except HubError as e:
            status, data = e.status, json.dumps({"error": str(e), **e.extra}).encode()
            headers = {"X-Error-Message": str(e), **({"X-Error-Code": e.code} if e.code else {})}
        self.body()  # read what is left of the request, so the connection can be reused
        self.send_response(status)
        for name, value in {"Content-Type": "application/json", **headers, "Content-Length": str(len(data))}.items():
            self.send_header(name, value)
        self.end_headers()
        if self.command != "HEAD":
            self.wfile.write(data)

    do_GET = do_HEAD = do_POST = do_PUT = do_DELETE = _handle

    def log_message(self, format, *args) -> None:  # quiet: hub.requests keeps the log
        pass
