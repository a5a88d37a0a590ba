"""A local server that speaks the Hugging Face hub's HTTP API, as far as `huggingface_hub` uses it to stage a
model (as the local MinIO stands in for S3): point `HF_ENDPOINT` at it.

- `GET /api/models/{repo}[/revision/{rev}]`: model info (`sha`, `siblings`, `gated`); an unknown repo is
  404 `RepoNotFound`, an unknown revision 404 `RevisionNotFound`.
- `GET`/`HEAD /{repo}/resolve/{rev}/{path}`: a file, with `X-Repo-Commit`, `ETag` and `Content-Length`; a
  gated repo answers 401 `GatedRepo` without the right `Authorization: Bearer` token.

Repos are served from local directories (`server.add(repo_id, directory, gated_token=None)`); the commit sha
is a hash of the files. Every request is kept in `server.requests` (method, path, whether a token was sent).
`server.fail_with = 400` fails every request with an error quoting its Authorization header.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from devcluster.servers.http_thread import ThreadedServer


@dataclass
class Repo:
    files: dict[str, bytes]
    sha: str
    gated_token: str | None = None


class FakeHub(ThreadedServer):
    name = "hub"

    def __init__(self, host: str = "0.0.0.0", port: int = 0) -> None:
        super().__init__(host, port)
        self.repos: dict[str, Repo] = {}
        self.requests: list[dict[str, Any]] = []
        self.endpoint = ""
        self.fail_with: int | None = None  # answer every request with this status, quoting the request's token

    def add(self, repo_id: str, directory: Path, gated_token: str | None = None) -> Repo:
        files = {str(p.relative_to(directory)): p.read_bytes() for p in sorted(Path(directory).rglob("*")) if p.is_file()}
        digest = hashlib.sha1()
        for name, data in sorted(files.items()):
            digest.update(name.encode() + b"\0" + hashlib.sha256(data).digest())
        self.repos[repo_id] = repo = Repo(files, digest.hexdigest(), gated_token)
        return repo

    # ------------------------------------------------------------------ handlers

    def _log(self, request: web.Request) -> None:
        self.requests.append(
            {"method": request.method, "path": request.path, "token": request.headers.get("authorization", "") != ""}
        )

    @staticmethod
    def _error(status: int, code: str, message: str) -> web.Response:
        return web.json_response({"error": message}, status=status, headers={"X-Error-Code": code, "X-Error-Message": message})

    def _lookup(self, request: web.Request) -> tuple[str, Repo | web.Response]:
        """The repo id and the repo at the request's revision, or the hub's 404 for an unknown repo or revision."""
        self._log(request)
        repo_id = f"{request.match_info['org']}/{request.match_info['name']}"
        if self.fail_with is not None:
            message = f"Bad request for {request.path} with Authorization: {request.headers.get('authorization', '')}"
            return repo_id, self._error(self.fail_with, "BadRequest", message)
        repo = self.repos.get(repo_id)
        if repo is None:
            return repo_id, self._error(404, "RepoNotFound", "Repository not found")
        revision = request.match_info.get("revision", "main")
        if revision not in ("main", repo.sha):
            return repo_id, self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
        return repo_id, repo

    async def _info(self, request: web.Request) -> web.Response:
        repo_id, repo = self._lookup(request)
        if isinstance(repo, web.Response):
            return repo
        return web.json_response(
            {
                "_id": repo.sha[:24],
                "id": repo_id,
                "modelId": repo_id,
                "sha": repo.sha,
                "private": False,
                "gated": "manual" if repo.gated_token else False,
                "disabled": False,
                "tags": [],
                "siblings": [{"rfilename": name} for name in sorted(repo.files)],
            }
        )

    async def _resolve(self, request: web.Request) -> web.Response:
        repo_id, repo = self._lookup(request)
        if isinstance(repo, web.Response):
            return repo
        if repo.gated_token and request.headers.get("authorization") != f"Bearer {repo.gated_token}":
            message = f"Access to model {repo_id} is restricted. You must have access to it and be authenticated."
            return self._error(401, "GatedRepo", message)
        data = repo.files.get(request.match_info["path"])
        if data is None:
            return self._error(404, "EntryNotFound", "Entry not found")
        headers = {
            "X-Repo-Commit": repo.sha,
            "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
            "Content-Length": str(len(data)),
            "Accept-Ranges": "bytes",
        }
        if request.method == "HEAD":
            return web.Response(status=200, headers=headers)
        return web.Response(body=data, headers=headers)

    # ------------------------------------------------------------------ lifecycle

    def routes(self, app: web.Application) -> None:
        app.router.add_get("/api/models/{org}/{name}", self._info)
        app.router.add_get("/api/models/{org}/{name}/revision/{revision}", self._info)
        app.router.add_route("HEAD", "/{org}/{name}/resolve/{revision}/{path:.+}", self._resolve)
        app.router.add_get("/{org}/{name}/resolve/{revision}/{path:.+}", self._resolve, allow_head=False)

    def started(self) -> None:
        self.endpoint = f"http://127.0.0.1:{self.port}"

    @property
    def cluster_endpoint(self) -> str:
        """The URL pods use: the host's address (pods cannot reach its loopback)."""
        return self.cluster_url()
