"""Build the project's images and load them into a node's containerd, for the cluster launcher.

``devcluster/scripts/build-images.sh`` builds the operator, trainer and evaluator images from their Dockerfiles with a
private dockerd (no registry: a local Debian base from mmdebstrap, uv from ``.venv``, a static pause image)
and ``devcluster/scripts/load-images.sh`` imports them into a containerd's ``k8s.io`` namespace, skipping what is already
there. Both print timestamped progress, which goes to the real stderr (past pytest's capture).

    images = build_images()                  # {tag: {"id": "sha256:...", "size": bytes, "build_seconds": s}}
    images = built_images()                  # the same, as the last build wrote it (no build)
    load_images("/run/node-1/containerd.sock", [PAUSE_IMAGE, TRAINER_IMAGE, EVALUATOR_IMAGE])
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import threading
import tomllib
from collections import deque
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
BUILD_SCRIPT = REPO / "devcluster" / "scripts" / "build-images.sh"
LOAD_SCRIPT = REPO / "devcluster" / "scripts" / "load-images.sh"

VERSION: str = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["version"]
OPERATOR_IMAGE = f"ghcr.io/ftc-project/ftc-operator:{VERSION}"
TRAINER_IMAGE = f"ghcr.io/ftc-project/ftc-trainer:{VERSION}"
EVALUATOR_IMAGE = f"ghcr.io/ftc-project/ftc-evaluator:{VERSION}"
BASE_IMAGE = "ftc.local/debian:bookworm"
PAUSE_IMAGE = "registry.k8s.io/pause:3.10"


class ImageError(RuntimeError):
    """An image build or load failed; the message carries the tail of the script's output."""


def _run_script(argv: list[str], prefix: str, timeout: float) -> list[str]:
    """Run a script, echo its lines to the real stderr with ``prefix``, return its output lines.

    Raises ImageError with the output tail when it fails or runs past ``timeout`` seconds.
    """
    # Its own process group: a timeout or an interrupt stops the script, its docker/ctr commands and the
    # dockerd it started (the script's exit trap stops that dockerd too).
    proc = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True)
    timed_out = threading.Event()

    def stop_group(sig: int) -> None:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)

    def on_timeout() -> None:
        timed_out.set()
        stop_group(signal.SIGTERM)

    timer = threading.Timer(timeout, on_timeout)
    timer.start()
    lines: deque[str] = deque(maxlen=2000)
    try:
        assert proc.stdout is not None
        for line in proc.stdout:
            lines.append(line.rstrip("\n"))
            if sys.__stderr__ is not None:
                sys.__stderr__.write(f"{prefix}{line}")
                sys.__stderr__.flush()
        code = proc.wait()
    finally:
        timer.cancel()
        if proc.poll() is None:
            stop_group(signal.SIGTERM)
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                stop_group(signal.SIGKILL)
                proc.wait()
    if timed_out.is_set() or code != 0:
        why = f"timed out after {timeout:.0f} s" if timed_out.is_set() else f"failed with exit code {code}"
        tail = "\n".join(list(lines)[-60:])
        raise ImageError(f"{' '.join(argv)} {why}:\n{tail}")
    return list(lines)


def build_images(timeout: float = 5400) -> dict[str, dict]:
    """Build (or reuse from the build cache) every image; return ``{tag: {"id", "size", "build_seconds"}}``.

    A cold build downloads torch and its CUDA libraries from PyPI (about 4 minutes here); an unchanged tree
    takes seconds. The tags are OPERATOR_IMAGE, TRAINER_IMAGE, EVALUATOR_IMAGE, BASE_IMAGE, PAUSE_IMAGE
    and the local uv image.
    """
    lines = _run_script(["bash", str(BUILD_SCRIPT)], "build-images: ", timeout)
    path = Path(lines[-1]) if lines else None
    if path is None or not path.is_file():
        raise ImageError(f"{BUILD_SCRIPT} did not print the path of images.json; last line: {lines[-1:]!r}")
    return json.loads(path.read_text())["images"]


def built_images() -> dict[str, dict]:
    """What the last :func:`build_images` built, without building: ``{tag: {"id", "size", "build_seconds"}}`` from
    ``$FTC_CACHE/images/images.json`` (``id``: the image's config digest, ``sha256:...``)."""
    cache = Path(os.environ.get("FTC_CACHE") or Path.home() / ".cache" / "ftc")
    return json.loads((cache / "images" / "images.json").read_text())["images"]


def load_images(addresses: str | list[str], tags: list[str], timeout: float = 1800) -> None:
    """Import ``tags`` (built by build_images) into the containerd(s) at ``addresses``, namespace ``k8s.io``.

    Several containerds (one per node) are loaded side by side from one ``docker save`` stream. Images already
    there with the same image ID (and unpacked for overlayfs) are skipped.
    """
    if not tags:
        return
    joined = addresses if isinstance(addresses, str) else ",".join(addresses)
    _run_script(["bash", str(LOAD_SCRIPT), joined, *tags], "load-images: ", timeout)
