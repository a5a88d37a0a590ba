"""A local server that speaks the Hugging Face hub's HTTP API, as far as `huggingface_hub` uses it to stage a
model (as the local MinIO stands in for S3): point `HF_ENDPOINT` at it.

- `GET /api/models/{repo}[/revision/{rev}]`: model info (`sha`, `siblings`, `gated`); an unknown repo is
  404 `RepoNotFound`, an unknown revision 404 `RevisionNotFound`. With `?blobs=true` (huggingface_hub's
  `files_metadata=True`) each sibling carries `size` and `blobId`, and LFS files (weights, as the hub's
  `.gitattributes` makes them, and any file over 10 MB) `lfs: {sha256, size, pointerSize}`, as the hub answers.
- `GET`/`HEAD /{repo}/resolve/{rev}/{path}`: a file, with `X-Repo-Commit`, `ETag` and `Content-Length`; a
  gated repo answers 401 `GatedRepo` without the right `Authorization: Bearer` token.

Repos are served from local directories (`server.add(repo_id, directory, gated_token=None)`); the commit sha
is a hash of the files. Every request is kept in `server.requests` (method, path, whether a token was sent).
`server.fail_with = 400` fails every request with an error quoting its Authorization header.
`server.cut_after(k, suffix)`: after k more file downloads (GET) whose name ends with `suffix`, every further one
answers 429 Too Many Requests (the hub's rate limit; transient) until `server.cut = None`. `downloads(suffix)`
counts the file downloads served. `server.bytes_per_second`: every download streams at that speed (a hub far
away; each connection on its own, as a CDN serves them).
"""

from __future__ import annotations

import asyncio
import hashlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from aiohttp import web

from devcluster.servers.http_thread import ThreadedServer

LFS_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".gguf", ".h5", ".msgpack", ".onnx")
LFS_SIZE = 10 * 2**20
CHUNK = 2**20


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
        self.bytes_per_second: float | None = None  # each download's speed (None: as fast as the machine)
        self.cut: tuple[int, str] | None = None  # (downloads still served, file-name suffix): see cut_after

    def cut_after(self, k: int, suffix: str = "") -> None:
        """After `k` more downloads of files ending with `suffix`, answer every further one 429 (rate limited)."""
        self.cut = (k, suffix)

    def downloads(self, suffix: str = "") -> list[str]:
        """The paths of the file downloads (GET .../resolve/...) served with 200, in order, ending with `suffix`."""
        return [r["path"] for r in self.requests if r.get("served") and r["path"].endswith(suffix)]

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
                "siblings": [
                    self._sibling(name, data, request.query.get("blobs", "").lower() == "true")
                    for name, data in sorted(repo.files.items())
                ],
            }
        )

    @staticmethod
    def _sibling(name: str, data: bytes, blobs: bool) -> dict[str, Any]:
        if not blobs:
            return {"rfilename": name}
        lfs = name.endswith(LFS_SUFFIXES) or len(data) > LFS_SIZE
        sibling: dict[str, Any] = {
            "rfilename": name,
            "size": len(data),
            "blobId": hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest(),
        }
        if lfs:
            sibling["lfs"] = {"sha256": hashlib.sha256(data).hexdigest(), "size": len(data), "pointerSize": 134}
        return sibling

    async def _resolve(self, request: web.Request) -> web.StreamResponse:
        repo_id, repo = self._lookup(request)
        if isinstance(repo, web.Response):
            return repo
        if repo.gated_token and request.headers.get("authorization") != f"Bearer {repo.gated_token}":
            message = f"Access to model {repo_id} is restricted. You must have access to it and be authenticated."
            return self._error(401, "GatedRepo", message)
        path = request.match_info["path"]
        data = repo.files.get(path)
        if data is None:
            return self._error(404, "EntryNotFound", "Entry not found")
        if request.method == "GET" and self.cut is not None and path.endswith(self.cut[1]):
            if self.cut[0] <= 0:
                return self._error(429, "TooManyRequests", "You have been rate-limited; retry later")
            self.cut = (self.cut[0] - 1, self.cut[1])
        if request.method == "GET":
            self.requests[-1]["served"] = True
        headers = {
            "X-Repo-Commit": repo.sha,
            "ETag": f'"{hashlib.sha256(data).hexdigest()}"',
            "Content-Length": str(len(data)),
            "Accept-Ranges": "bytes",
        }
        if request.method == "HEAD":
            return web.Response(status=200, headers=headers)
        if not self.bytes_per_second:
            return web.Response(body=data, headers=headers)
        response = web.StreamResponse(headers=headers)  # a far-away hub: each connection at bytes_per_second
        await response.prepare(request)
        for start in range(0, len(data), CHUNK):
            await response.write(data[start : start + CHUNK])
            await asyncio.sleep(min(CHUNK, len(data) - start) / self.bytes_per_second)
        await response.write_eof()
        return response

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
