"""A small local stand-in for the Hugging Face Hub endpoints that push and pull use.

It answers exactly the requests huggingface_hub 2.x makes for `create_repo`, `create_branch`,
`upload_folder` (README validation, preupload, NDJSON commit with base64 contents), `repo_info` /
`model_info`, `list_repo_tree` and `snapshot_download` / `hf_hub_download` (HEAD and GET of
`/{repo}/resolve/{revision}/{path}` with `X-Repo-Commit`, `ETag` and `Content-Length`). Repos live
in memory. Every file is declared `regular` at preupload and no Xet headers are ever sent, so no
LFS or Xet transfer is attempted. Errors carry the `X-Error-Code` / `X-Error-Message` headers the
client maps to its exception types.

Requests must carry ``authorization: Bearer <TOKEN>`` to write (any other token is a 401, as on the
Hub); reads of public repos need no token. Point huggingface_hub at it with
``HF_ENDPOINT=<standin.url>`` (read at import time, so in a subprocess).
"""

from __future__ import annotations

import base64
import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, unquote, urlsplit

import yaml

TOKEN = "hf_standin_token_for_tests"
GITATTRIBUTES = b"*.spra filter=lfs diff=lfs merge=lfs -text\n"


def git_blob_oid(data: bytes) -> str:
    """The git object id of a blob (what the Hub reports as a regular file's oid and ETag)."""
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repo:
    private: bool
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)  # oid -> {path: bytes}
    branches: dict[str, str] = field(default_factory=dict)  # name -> commit oid

    def resolve(self, revision: str) -> str | None:
        if revision in self.branches:
            return self.branches[revision]
        return revision if revision in self.commits else None


class HubStandin:
    """The server and its in-memory state; `url` is the endpoint to give huggingface_hub."""

    def __init__(self):
        self.repos: dict[str, Repo] = {}
        self.requests: list[tuple[str, str]] = []  # (method, path), for assertions
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_port}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def start(self) -> HubStandin:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()

    def files(self, repo_id: str, revision: str = "main") -> dict[str, bytes]:
        repo = self.repos[repo_id]
        return dict(repo.commits[repo.resolve(revision)])

    def replace_file(self, repo_id: str, path: str, data: bytes, revision: str = "main") -> None:
        """Serve `data` as `path` from now on (in place, as a corrupted store would)."""
        repo = self.repos[repo_id]
        repo.commits[repo.resolve(revision)][path] = data

    def _commit(self, repo: Repo, parent: str | None, files: dict[str, bytes], summary: str) -> str:
        oid = hashlib.sha1(f"{parent}:{summary}:{len(repo.commits)}".encode()).hexdigest()
        repo.commits[oid] = files
        return oid


def _handler(hub: HubStandin):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args):  # keep pytest output clean
            pass

        # -- plumbing ---------------------------------------------------------------------
        def _send(self, status: int, body: bytes = b"", headers: dict | None = None, head: bool = False):
            self.send_response(status)
            headers = {"Content-Length": str(len(body)), **(headers or {})}
            for k, v in headers.items():
                self.send_header(k, v)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def _json(self, status: int, obj, headers: dict | None = None):
            self._send(status, json.dumps(obj).encode(), {"Content-Type": "application/json", **(headers or {})})

        def _error(self, status: int, message: str, code: str | None = None):
            headers = {"X-Error-Message": message}
            if code:
                headers["X-Error-Code"] = code
            self._json(status, {"error": message}, headers)

        def _body(self) -> bytes:
            return self.rfile.read(int(self.headers.get("Content-Length") or 0))

        def _auth(self) -> bool | None:
            """True: the valid token; False: no token; None: a wrong token (already answered 401)."""
            value = self.headers.get("authorization")
            if value is None:
                return False
            if value == f"Bearer {TOKEN}":
                return True
            self._error(401, "Invalid credentials in Authorization header")
            return None

        def _repo(self, repo_id: str, auth: bool, write: bool = False) -> Repo | None:
            repo = hub.repos.get(repo_id)
            if repo is None or (repo.private and not auth):
                self._error(404, "Repository not found", "RepoNotFound")
                return None
            if write and not auth:
                self._error(401, "You must be authenticated to write")
                return None
            return repo

        def _route(self, method: str):
            url = urlsplit(self.path)
            parts = [unquote(p) for p in url.path.strip("/").split("/")]
            query = parse_qs(url.query)
            hub.requests.append((method, url.path))
            auth = self._auth()
            if auth is None:
                return
            with hub._lock:
                return self._dispatch(method, parts, query, auth)

        def do_GET(self):
            self._route("GET")

        def do_HEAD(self):
            self._route("HEAD")

        def do_POST(self):
            self._route("POST")

        # -- endpoints --------------------------------------------------------------------
        def _dispatch(self, method, parts, query, auth):
            if method == "POST" and parts == ["api", "repos", "create"]:
                return self._create_repo(auth)
            if method == "POST" and parts == ["api", "validate-yaml"]:
                return self._validate_yaml()
            if parts[:2] == ["api", "models"] and len(parts) >= 4:
                repo_id, rest = "/".join(parts[2:4]), parts[4:]
                if method == "GET" and (rest == [] or (rest[0] == "revision" and len(rest) == 2)):
                    return self._repo_info(repo_id, rest[1] if len(rest) == 2 else "main", auth)
                if method == "GET" and rest[:1] == ["tree"] and len(rest) >= 2:
                    return self._tree(repo_id, rest[1], "/".join(rest[2:]), auth)
                if method == "POST" and rest[:1] == ["preupload"] and len(rest) == 2:
                    return self._preupload(repo_id, rest[1], auth)
                if method == "POST" and rest[:1] == ["commit"] and len(rest) == 2:
                    return self._commit(repo_id, rest[1], auth)
                if method == "POST" and rest[:1] == ["branch"] and len(rest) == 2:
                    return self._branch(repo_id, rest[1], auth)
            if method in ("GET", "HEAD") and len(parts) >= 5 and parts[2] == "resolve":
                return self._resolve("/".join(parts[:2]), parts[3], "/".join(parts[4:]), auth, method == "HEAD")
            self._error(404, f"the stand-in does not serve {method} {self.path}")

        def _create_repo(self, auth):
            payload = json.loads(self._body())
            if not auth:
                return self._error(401, "You must be authenticated to create a repo")
            repo_id = f"{payload['organization']}/{payload['name']}"
            if repo_id in hub.repos:  # the Hub's 409 still names the repo's url; the client reads it
                return self._json(409, {"error": "You already created this model repo", "url": f"{hub.url}/{repo_id}"})
            repo = Repo(private=payload.get("visibility") == "private")
            repo.branches["main"] = hub._commit(repo, None, {".gitattributes": GITATTRIBUTES}, "initial commit")
            hub.repos[repo_id] = repo
            self._json(200, {"url": f"{hub.url}/{repo_id}", "name": repo_id})

        def _validate_yaml(self):
            content = json.loads(self._body())["content"]
            errors = []
            if content.startswith("---\n"):
                try:
                    meta = yaml.safe_load(content[4 : content.index("\n---\n", 3)])
                    if not isinstance(meta, dict):
                        errors.append({"message": "metadata must be a mapping"})
                except (ValueError, yaml.YAMLError) as e:
                    errors.append({"message": f"invalid YAML: {e}"})
            self._json(400 if errors else 200, {"errors": errors, "warnings": []})

        def _revision(self, repo_id, revision, auth):
            """(repo, commit oid) for a readable repo and an existing revision; else answers the error."""
            repo = self._repo(repo_id, auth)
            if repo is None:
                return None
            oid = repo.resolve(revision)
            if oid is None:
                self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
                return None
            return repo, oid

        def _repo_info(self, repo_id, revision, auth):
            found = self._revision(repo_id, revision, auth)
            if found is None:
                return
            repo, oid = found
            siblings = [{"rfilename": p} for p in sorted(repo.commits[oid])]
            self._json(200, {"id": repo_id, "sha": oid, "private": repo.private, "siblings": siblings})

        def _tree(self, repo_id, revision, prefix, auth):
            found = self._revision(repo_id, revision, auth)
            if found is None:
                return
            repo, oid = found
            entries = [
                {"type": "file", "path": p, "size": len(data), "oid": git_blob_oid(data)}
                for p, data in sorted(repo.commits[oid].items())
                if not prefix or p.startswith(prefix.rstrip("/") + "/")
            ]
            self._json(200, entries)

        def _preupload(self, repo_id, revision, auth):
            payload = json.loads(self._body())
            repo = self._repo(repo_id, auth, write=True)
            if repo is None:
                return
            oid = repo.resolve(revision)
            current = repo.commits[oid] if oid else {}
            files = [
                {
                    "path": f["path"],
                    "uploadMode": "regular",  # contents come base64 in the commit: no LFS, no Xet
                    "shouldIgnore": False,
                    "oid": git_blob_oid(current[f["path"]]) if f["path"] in current else None,
                }
                for f in payload["files"]
            ]
            self._json(200, {"files": files, "commitOid": oid})

        def _commit(self, repo_id, revision, auth):
            lines = [json.loads(line) for line in self._body().splitlines() if line.strip()]
            repo = self._repo(repo_id, auth, write=True)
            if repo is None:
                return
            parent = repo.resolve(revision)
            if parent is None or revision not in repo.branches:
                return self._error(404, f"Invalid rev id: {revision}", "RevisionNotFound")
            files = dict(repo.commits[parent])
            summary = ""
            for item in lines:
                key, value = item["key"], item["value"]
                if key == "header":
                    summary = value["summary"]
                elif key == "file" and value.get("encoding") == "base64":
                    files[value["path"]] = base64.b64decode(value["content"])
                elif key == "deletedFile":
                    files.pop(value["path"], None)
                else:
                    return self._error(400, f"the stand-in does not support commit operation {key!r}")
            oid = hub._commit(repo, parent, files, summary)
            repo.branches[revision] = oid
            self._json(200, {"commitUrl": f"{hub.url}/{repo_id}/commit/{oid}", "commitOid": oid})

        def _branch(self, repo_id, branch, auth):
            payload = json.loads(self._body() or b"{}")
            repo = self._repo(repo_id, auth, write=True)
            if repo is None:
                return
            if branch in repo.branches:
                return self._error(409, "Reference already exists")
            start = repo.resolve(payload.get("startingPoint") or "main")
            if start is None:
                return self._error(404, "Invalid starting point", "RevisionNotFound")
            repo.branches[branch] = start
            self._json(200, {})

        def _resolve(self, repo_id, revision, path, auth, head):
            found = self._revision(repo_id, revision, auth)
            if found is None:
                return
            repo, oid = found
            data = repo.commits[oid].get(path)
            if data is None:
                return self._error(404, "Entry not found", "EntryNotFound")
            headers = {
                "Content-Type": "application/octet-stream",
                "X-Repo-Commit": oid,
                "ETag": f'"{git_blob_oid(data)}"',
            }
            self._send(200, data, headers, head=head)

    return Handler
