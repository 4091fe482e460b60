"""A Hugging Face hub on 127.0.0.1: the endpoints huggingface_hub's snapshot_download calls, for the tests.

- GET /api/models/OWNER/NAME[/revision/REV]: the repository's listing (`sha`, `siblings`);
- HEAD and GET /OWNER/NAME/resolve/REV/FILE: the file, with X-Repo-Commit, ETag and Content-Length, honouring
  `Range: bytes=N-` (206) as the hub does;
- errors as the hub gives them: an unknown repository 401 with X-Error-Code RepoNotFound (the hub answers 401,
  not 404, so as not to say whether a private one exists), an unknown revision or file 404 with RevisionNotFound
  or EntryNotFound, a gated repository without its token 401 with GatedRepo.

`stall` makes the first GET of a file send half its bytes and then hang until released: a transfer cut off.
Every request is logged (method, path, Range header) for the tests to read.
"""

from __future__ import annotations

import hashlib
import json
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path


@dataclass
class Repo:
    files: dict[str, bytes]
    revisions: dict[str, str]  # branch or tag -> commit
    token: str | None = None  # gated: only this bearer token gets in


@dataclass
class Hub:
    repos: dict[str, Repo] = field(default_factory=dict)
    log: list[tuple[str, str, str | None]] = field(default_factory=list)
    stall: str | None = None  # a file name
    stalled: threading.Event = field(default_factory=threading.Event)  # set once half of it has gone out
    release: threading.Event = field(default_factory=threading.Event)

    def add(self, repo_id: str, folder: Path, extra: dict[str, bytes] | None = None, token: str | None = None,
            tags: tuple[str, ...] = ()) -> str:
        files = {p.name: p.read_bytes() for p in sorted(folder.iterdir()) if p.is_file()} | (extra or {})
        commit = hashlib.sha1(b"".join(hashlib.sha1(k.encode() + v).digest() for k, v in files.items())).hexdigest()
        self.repos[repo_id] = Repo(files, {"main": commit, **{t: commit for t in tags}}, token)
        return commit


def handler(hub: Hub):
    class Handler(BaseHTTPRequestHandler):
        def log_message(self, *args):  # quiet
            pass

        def error(self, status: int, code: str) -> None:
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("Content-Type", "application/json")
            body = json.dumps({"error": code}).encode()
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command != "HEAD":
                self.wfile.write(body)

        def repo(self, parts: list[str]) -> tuple[Repo | None, str]:
            repo_id = "/".join(parts[:2])
            repo = hub.repos.get(repo_id)
            if repo is None:
                self.error(401, "RepoNotFound")
                return None, repo_id
            if repo.token and self.headers.get("Authorization") != f"Bearer {repo.token}":
                self.error(401, "GatedRepo")
                return None, repo_id
            return repo, repo_id

        def do_GET(self):
            self.serve()

        def do_HEAD(self):
            self.serve()

        def serve(self):
            hub.log.append((self.command, self.path, self.headers.get("Range")))
            parts = self.path.split("?")[0].strip("/").split("/")
            if parts[:2] == ["api", "models"]:
                repo, repo_id = self.repo(parts[2:])
                if repo is None:
                    return
                revision = parts[5] if len(parts) > 5 and parts[4] == "revision" else "main"
                commit = repo.revisions.get(revision) or (revision if revision in repo.revisions.values() else None)
                if commit is None:
                    return self.error(404, "RevisionNotFound")
                body = json.dumps({"id": repo_id, "modelId": repo_id, "sha": commit, "private": False,
                                   "siblings": [{"rfilename": f} for f in repo.files]}).encode()
                self.send_response(200)
                self.send_header("Content-Type", "application/json")
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)
                return
            if len(parts) < 5 or parts[2] != "resolve":
                return self.error(404, "EntryNotFound")
            repo, _ = self.repo(parts)
            if repo is None:
                return
            commit = repo.revisions.get(parts[3]) or (parts[3] if parts[3] in repo.revisions.values() else None)
            name = "/".join(parts[4:])
            if commit is None:
                return self.error(404, "RevisionNotFound")
            if name not in repo.files:
                return self.error(404, "EntryNotFound")
            data = repo.files[name]
            start = int(self.headers["Range"].split("=")[1].split("-")[0]) if self.headers.get("Range") else 0
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{hashlib.sha256(data).hexdigest()}"')
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if self.command == "HEAD":
                return
            if name == hub.stall and not hub.stalled.is_set():
                self.wfile.write(data[start:len(data) // 2])
                self.wfile.flush()
                hub.stalled.set()
                hub.release.wait(60)
                return
            self.wfile.write(data[start:])

    return Handler


class Server:
    """`with Server(hub) as url:` serves the hub on a free port of 127.0.0.1 for the block."""

    def __init__(self, hub: Hub):
        self.hub = hub
        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), handler(hub))
        self.httpd.daemon_threads = True

    def __enter__(self) -> str:
        threading.Thread(target=self.httpd.serve_forever, daemon=True).start()
        return f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def __exit__(self, *exc):
        self.hub.release.set()
        self.httpd.shutdown()
        self.httpd.server_close()
