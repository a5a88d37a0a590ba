"""Nothing a step writes carries a credential: the redactor itself (whole and cut-short keys, a stream split
anywhere), the text artefacts written through storage, and a step's native output (fd 1 and 2 written by C
code or by a subprocess), which the step's first process reads from its child and redacts."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
from ftc_step.runtime import StreamRedactor, redact
from ftc_step.storage import Storage

pytestmark = pytest.mark.unit

KEY = "sk-proj-canary-0123456789abcdef"
S3_KEY = "s3-canary-secret-0a1b2c3d"


@pytest.mark.parametrize(
    ("text", "want"),
    [
        pytest.param(f"refused {KEY} (401)", "refused [redacted] (401)", id="whole"),
        pytest.param(f"HTTPError: key {KEY[:20]}", "HTTPError: key [redacted]", id="cut-short-at-the-end"),
        pytest.param(f"key {KEY[:15]}... (401)", "key [redacted]... (401)", id="cut-short-in-the-middle"),
        pytest.param(f"key {KEY[:11]}", f"key {KEY[:11]}", id="under-12-characters-is-no-key"),
        pytest.param(f"{S3_KEY}{KEY}", "[redacted][redacted]", id="two-side-by-side"),
        pytest.param("nothing secret", "nothing secret", id="nothing"),
    ],
)
def test_redact_finds_whole_and_cut_short_credentials(text: str, want: str) -> None:
    assert redact(text, sorted([KEY, S3_KEY], key=len, reverse=True)) == want


@pytest.mark.parametrize("cut", [1, 5, 12, 20, len(KEY) - 1, len(KEY)])
def test_a_stream_split_anywhere_is_redacted_and_nothing_else_is_held_back(cut: int) -> None:
    data = b"line one\nthe key " + KEY.encode() + b" was refused\n\xe2\x82 progress 50%\r"
    at = data.index(KEY.encode()) + cut
    redactor = StreamRedactor([KEY])
    first = redactor.feed(data[:at])
    assert first == b"line one\nthe key " or cut == len(KEY)  # the start of the key waits for the rest
    out = first + redactor.feed(data[at:]) + redactor.close()
    assert out == b"line one\nthe key [redacted] was refused\n\xe2\x82 progress 50%\r"  # bytes not UTF-8 pass
    assert StreamRedactor([KEY]).feed(b"50% it/s]\r") == b"50% it/s]\r"  # a progress bar is not held back


def test_text_artefacts_are_written_redacted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FTC_JUDGE_API_KEY", KEY)
    monkeypatch.setenv("AWS_SECRET_ACCESS_KEY", S3_KEY)
    store = Storage()
    doc = {"metricErrors": {"answer_correctness": {f"AuthenticationError: Incorrect API key: {KEY[:14]}": 3}}}
    store.write_text(str(tmp_path / "scores.json"), json.dumps(doc))
    store.write_text(str(tmp_path / "index.html"), f"<td>judge: 401 for key {KEY}; s3 said {S3_KEY}</td>")
    scores = (tmp_path / "scores.json").read_text()
    report = (tmp_path / "index.html").read_text()
    assert KEY[:12] not in scores + report and S3_KEY not in report
    errors = {"AuthenticationError: Incorrect API key: [redacted]": 3}
    assert json.loads(scores) == {"metricErrors": {"answer_correctness": errors}}
    assert report == "<td>judge: 401 for key [redacted]; s3 said [redacted]</td>"


STEP = textwrap.dedent(
    """
    import os, signal, subprocess, sys, time
    from ftc_step.supervise import supervised

    def main() -> int:
        key = os.environ["FTC_JUDGE_API_KEY"]
        if sys.argv[1] == "leak":
            os.write(1, f"native stdout {key}\\n".encode())  # as a C library writes: not through sys.stdout
            os.write(2, f"native stderr {key[:6]}".encode())  # the key split across two writes
            time.sleep(0.2)
            os.write(2, f"{key[6:]} end\\n".encode())
            subprocess.run(["sh", "-c", 'echo "subprocess $FTC_JUDGE_API_KEY"; echo "to stderr $FTC_JUDGE_API_KEY" >&2'])
            print("supervised:", os.environ.get("FTC_STEP_SUPERVISED"), "pid", os.getpid(), flush=True)
            with open(os.environ["FTC_TERMINATION_LOG"], "w") as log:
                log.write('{"ok": false, "error": "judge refused ' + key + '"}')
            return int(sys.argv[2])
        if sys.argv[1] == "wait-for-sigterm":
            signal.signal(signal.SIGTERM, lambda *_: sys.exit(7))
            print("ready", flush=True)
            time.sleep(60)
        if sys.argv[1] == "kill-self":
            os.kill(os.getpid(), signal.SIGKILL)
        return 0

    if __name__ == "__main__":
        sys.exit(supervised(main))
    """
)


def _start(tmp_path: Path, *args: str) -> subprocess.Popen[str]:
    script = tmp_path / "step.py"
    script.write_text(STEP)
    env = dict(os.environ, FTC_JUDGE_API_KEY=KEY, FTC_TERMINATION_LOG=str(tmp_path / "termination-log"))
    env.pop("FTC_STEP_SUPERVISED", None)
    command = [sys.executable, str(script), *args]
    return subprocess.Popen(command, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def test_native_and_subprocess_output_of_a_step_is_redacted(tmp_path: Path) -> None:
    step = _start(tmp_path, "leak", "3")
    out, err = step.communicate(timeout=60)
    assert step.returncode == 3  # the child's exit code is the step's
    assert KEY not in out + err and KEY[:12] not in out + err, out + err
    assert "native stdout [redacted]\n" in out and "subprocess [redacted]\n" in out
    assert "native stderr [redacted] end\n" in err and "to stderr [redacted]\n" in err
    supervised = next(line for line in out.splitlines() if line.startswith("supervised:"))
    assert supervised.split()[1] == "1" and int(supervised.split()[3]) != step.pid  # the body ran in a child
    assert json.loads((tmp_path / "termination-log").read_text())["error"] == "judge refused [redacted]"


def test_sigterm_reaches_the_body_and_a_killed_body_exits_128_plus_the_signal(tmp_path: Path) -> None:
    step = _start(tmp_path, "wait-for-sigterm")
    assert step.stdout is not None and step.stdout.readline() == "ready\n"
    started = time.monotonic()
    step.send_signal(signal.SIGTERM)
    assert step.wait(30) == 7 and time.monotonic() - started < 10  # the child's own SIGTERM handler ran
    step.communicate()

    killed = _start(tmp_path, "kill-self")
    killed.communicate(timeout=60)
    assert killed.returncode == 128 + signal.SIGKILL  # what the kubelet reports for a killed PID 1: 137
