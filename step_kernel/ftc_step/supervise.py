"""A step's body runs as a child process whose stdout and stderr the step's first process reads and redacts.

Python-level redaction (:func:`ftc_step.runtime.redact_output`) sees only what Python writes through
``sys.stdout``/``sys.stderr``. A C or C++ library (CUDA, NCCL, tokenizers, a curl inside a library) writes to
file descriptors 1 and 2 directly, and so does a subprocess (the torchrun workers, a shell command). So the
container's process (``python -m ftc_trainer|ftc_evaluator``, PID 1 in the pod) starts the very same command
again as its child, with the child's fds 1 and 2 on pipes, and copies what arrives to its own stdout and
stderr with every credential replaced (:class:`~ftc_step.runtime.StreamRedactor`: a key split across two
writes is still found). The child, and every process it starts, inherits the pipes: nothing reaches the pod's
log unredacted.

The first process imports nothing heavy and does nothing else:

- SIGTERM and SIGINT are forwarded to the child (the step's own handler stops it with a retryable failure);
- the child dies with it (``PR_SET_PDEATHSIG``), as in a container whose PID 1 ends;
- it exits with the child's code, or 128 + N when signal N killed the child (what a shell and the kubelet
  report for a process killed by a signal: 137 for SIGKILL);
- the termination log the child wrote is redacted once more (a summary the torchrun agent assembled).

``FTC_STEP_SUPERVISED`` marks the child (and its own children, torchrun workers): they run the step itself.
"""

from __future__ import annotations

import contextlib
import ctypes
import io
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Callable

from .runtime import StreamRedactor, credentials, redact, termination_log_path

SUPERVISED_ENV = "FTC_STEP_SUPERVISED"
DRAIN_SECONDS = 10.0  # after the child exits, how long to wait for what its own leftover children still write
_PR_SET_PDEATHSIG = 1


def supervised(main: Callable[[], int]) -> int:
    """Run `main` here when this process is the supervised child; else run this same command as a child and
    relay its output redacted (see the module docstring). Returns the exit code."""
    if os.environ.get(SUPERVISED_ENV):
        return main()
    return supervise([sys.executable, *sys.orig_argv[1:]])


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(OSError, AttributeError):  # not Linux: the child may outlive a killed parent
        ctypes.CDLL(None, use_errno=True).prctl(_PR_SET_PDEATHSIG, signal.SIGKILL)


def _relay(source: io.BufferedReader, fd: int, secrets: list[str]) -> None:
    """Copy `source` to file descriptor `fd`, redacted, until end of file."""
    redactor = StreamRedactor(secrets)
    with source:
        while chunk := source.read1(1 << 16):
            _write_all(fd, redactor.feed(chunk))
        _write_all(fd, redactor.close())


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        try:
            view = view[os.write(fd, view) :]
        except BrokenPipeError:  # nobody reads our output any more: keep draining the child's
            return


def supervise(command: list[str]) -> int:
    """Run `command` as the supervised child: its output relayed redacted, SIGTERM and SIGINT forwarded; the
    exit code it ended with (128 + N when signal N killed it)."""
    secrets = credentials()
    sys.stdout.flush()
    sys.stderr.flush()
    env = dict(os.environ, **{SUPERVISED_ENV: "1", "PYTHONUNBUFFERED": "1"})
    child = subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, preexec_fn=_die_with_parent)
    assert isinstance(child.stdout, io.BufferedReader) and isinstance(child.stderr, io.BufferedReader)

    def forward(signum: int, _frame: object) -> None:
        if child.poll() is None:
            child.send_signal(signum)

    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, forward)
    relays = [
        threading.Thread(target=_relay, args=(pipe, fd, secrets), name=f"ftc-relay-{fd}", daemon=True)
        for pipe, fd in ((child.stdout, 1), (child.stderr, 2))
    ]
    for relay in relays:
        relay.start()
    code = child.wait()
    for relay in relays:
        relay.join(DRAIN_SECONDS)
    _redact_termination_log(secrets)
    return 128 - code if code < 0 else code


def _redact_termination_log(secrets: list[str]) -> None:
    path = termination_log_path()
    try:
        text = path.read_text()
        if (clean := redact(text, secrets)) != text:
            path.write_text(clean)
    except (OSError, UnicodeDecodeError):
        pass
