"""Two nodes, as a JobSet's two pods run them: two train steps (torchrun agents) with `FTC_NODES=2`, node ranks 0 and 1
and a static rendezvous on the leader's address, here two processes on one machine with gloo on the CPU. Together
they learn what one process learns with their accumulation doubled (the tolerance of the parallel tests); the leader
pod reports the result, the other pod a summary of its own rank."""

from __future__ import annotations

import socket
import subprocess
import sys
from pathlib import Path

import pytest
from ftc_api.spec import Method
from ftc_api.steps import Location, ModelRef, TrainInput, TrainResult
from ftc_step.storage import Storage

from devcluster.models.tiny import TinyS3, new_run
from tests.test_train_parallel import EVAL_LOSS_TOLERANCE, ROOT, TRAIN_LOSS_TOLERANCE, _env, history_of, train
from tests.test_train_parallel import TRAINING as PARALLEL

TRAINING = PARALLEL.model_copy(update={"max_steps": 6})  # one evaluation, one checkpoint: half the parallel tests' run


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def train_on_two_nodes(tiny_s3: TinyS3, loc: Location, tmp_path: Path) -> list[tuple[int, TrainResult, str]]:
    """Both "pods" of a two-node train step, started together; (exit code, summary, log) by node rank."""
    inp = TrainInput(
        model=ModelRef(name="tiny-llama", base_model=tiny_s3.llama, method=Method.LORA), training=TRAINING, location=loc
    )
    path = tmp_path / "nodes.json"
    path.write_text(inp.to_json())
    port = free_port()
    runs = []
    for rank in (0, 1):
        env = _env(tiny_s3, tmp_path, f"node{rank}", 1) | {
            "FTC_NODES": "2",
            "FTC_NODE_RANK": str(rank),
            "FTC_MASTER_ADDR": "127.0.0.1",
            "FTC_MASTER_PORT": str(port),
        }
        cmd = [sys.executable, "-m", "ftc_trainer", "train", "--input", str(path)]
        runs.append(subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, cwd=ROOT))
    out = []
    for rank, run in enumerate(runs):
        log, _ = run.communicate(timeout=600)
        summary = TrainResult.model_validate_json((tmp_path / f"node{rank}.termination-log").read_text())
        out.append((run.returncode, summary, log))
    return out


@pytest.mark.ml
@pytest.mark.timeout(900)
def test_two_nodes_learn_what_one_process_learns_with_doubled_accumulation(
    tiny_s3: TinyS3, data_prefix: str, tmp_path: Path
) -> None:
    store = Storage(endpoint_url=tiny_s3.endpoint_url)
    code, single, log = train(tiny_s3, new_run(tiny_s3, data_prefix, "one", tmp_path), tmp_path, "one", 1, TRAINING)
    assert code == 0, log[-3000:]
    loc = new_run(tiny_s3, data_prefix, "nodes", tmp_path)
    (code0, leader, log0), (code1, worker, log1) = train_on_two_nodes(tiny_s3, loc, tmp_path)
    assert (code0, code1) == (0, 0), (log0[-3000:], log1[-3000:])
    assert "starting 1 training processes (torchrun) on each of 2 nodes" in log0 and "inputs fetched" in log1
    assert (leader.parallelism, leader.processes) == ("ddp", 2)
    # One process accumulates TRAINING's 2 micro-batches; each node 1 of them: the same effective batch.
    assert TRAINING.gradient_accumulation_steps == 2 and leader.forced.get("gradientAccumulationSteps") is None
    assert leader.ok and worker.ok and leader.adapter_uri and store.read_manifest(leader.adapter_uri) is not None

    one, two = history_of(store, single), history_of(store, leader)
    assert [p.step for p in two] == [p.step for p in one]
    for a, b in zip(one, two, strict=True):
        for attr, tolerance in (("train_loss", TRAIN_LOSS_TOLERANCE), ("eval_loss", EVAL_LOSS_TOLERANCE)):
            if getattr(a, attr) is not None:
                assert getattr(b, attr) == pytest.approx(getattr(a, attr), rel=tolerance), (a, b)
    assert leader.trained_tokens == single.trained_tokens  # both nodes' tokens are counted
