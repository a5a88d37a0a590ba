"""An aiohttp application served from a daemon thread: the base of the local stand-in servers (the
OpenAI-compatible judge, the Hugging Face hub). Subclasses add their routes in `routes(app)`."""

from __future__ import annotations

import asyncio
import threading
from typing import Self

from aiohttp import web


class ThreadedServer:
    """Serve `routes(app)` on host:port (port 0: any free one) until `stop()`; `port` is set by `start()`."""

    name = "http"

    def __init__(self, host: str = "127.0.0.1", port: int = 0) -> None:
        self.host, self.port = host, port
        # The Service name pods use instead of the host's address, once a cluster gave it one
        # (devcluster.kube.addons.expose_host_service), e.g. http://judge.ftc-host.svc.cluster.local
        self.service_url = ""
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None

    def routes(self, app: web.Application) -> None:
        raise NotImplementedError

    def started(self) -> None:
        """Called once the port is known (set URLs here)."""

    def start(self) -> Self:
        ready = threading.Event()

        def run() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            asyncio.set_event_loop(loop)
            app = web.Application()
            self.routes(app)
            runner = web.AppRunner(app, shutdown_timeout=0.1)
            loop.run_until_complete(runner.setup())
            site = web.TCPSite(runner, self.host, self.port)
            loop.run_until_complete(site.start())
            self.port = site._server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
            self.started()
            ready.set()
            loop.run_forever()
            loop.run_until_complete(runner.cleanup())
            loop.close()

        self._thread = threading.Thread(target=run, name=f"fake-{self.name}", daemon=True)
        self._thread.start()
        if not ready.wait(10):
            raise RuntimeError(f"the local {self.name} server did not start in 10 s")
        return self

    def cluster_url(self) -> str:
        """The URL pods use: its Service name once one is set (``service_url``), else http://HOST_IP:PORT (pods
        cannot reach the host's loopback); needs 0.0.0.0."""
        from devcluster.kube.node import host_ip

        if self.service_url:
            return self.service_url
        if self.host not in ("0.0.0.0", host_ip()):
            raise RuntimeError(f"the local {self.name} server listens on {self.host}: pods cannot reach it")
        return f"http://{host_ip()}:{self.port}"

    def stop(self) -> None:
        if self._loop is not None:
            self._loop.call_soon_threadsafe(self._loop.stop)
        if self._thread is not None:
            self._thread.join(10)
