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
from ftc_api.spec import LoraSpec, Method
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


def start_nodes(tiny_s3: TinyS3, path: Path, tmp_path: Path, attempt: int) -> list[subprocess.Popen]:
    """Both "pods" of one attempt of the group, started together (logs and summaries under `a{attempt}n{rank}`)."""
    port = free_port()
    procs = []
    for rank in (0, 1):
        name = f"a{attempt}n{rank}"
        env = _env(tiny_s3, tmp_path, name, 1) | {
            "FTC_NODES": "2",
            "FTC_NODE_RANK": str(rank),
            "FTC_MASTER_ADDR": "127.0.0.1",
            "FTC_MASTER_PORT": str(port),
        }
        log = (tmp_path / f"{name}.log").open("w")
        cmd = [sys.executable, "-m", "ftc_trainer", "train", "--input", str(path)]
        procs.append(subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT, cwd=ROOT))
    return procs


@pytest.mark.ml
@pytest.mark.timeout(900)
def test_a_killed_node_fails_the_other_and_the_new_group_resumes(tiny_s3: TinyS3, data_prefix: str, tmp_path: Path) -> None:
    """What JobSet's failure policy relies on: a node's pod killed mid-run (SIGKILL: no time to save) makes the other
    fail within seconds (gloo sees the peer gone, exit 1: retried), and the recreated group resumes from the newest
    complete checkpoint with every step of the history once."""
    import signal
    import time

    training = PARALLEL.model_copy(update={"max_steps": 120, "save_steps": 10, "eval_steps": 60, "logging_steps": 5})
    loc = new_run(tiny_s3, data_prefix, "kill", tmp_path)
    path = tmp_path / "kill.json"
    path.write_text(TrainInput(model=ModelRef(name="tiny-llama", base_model=tiny_s3.llama, method=Method.LORA),
                               training=training, location=loc).to_json())  # fmt: skip
    store = Storage(endpoint_url=tiny_s3.endpoint_url)
    procs = start_nodes(tiny_s3, path, tmp_path, 0)
    deadline = time.monotonic() + 600
    while len([k for k in store.list(loc.uri("models/tiny-llama/checkpoints")) if k.endswith("manifest.json")]) < 2:
        assert time.monotonic() < deadline and procs[0].poll() is None, (tmp_path / "a0n0.log").read_text()[-3000:]
        time.sleep(0.5)
    procs[1].send_signal(signal.SIGKILL)
    killed = time.monotonic()
    assert [p.wait(timeout=300) for p in procs] == [1, -signal.SIGKILL]
    waited = time.monotonic() - killed
    assert waited < 60, waited  # not the process-group timeout (1800 s): the peer's socket closed
    failed = TrainResult.model_validate_json((tmp_path / "a0n0.termination-log").read_text())
    assert not failed.ok and "remote worker crashing" in (failed.error or ""), failed

    procs = start_nodes(tiny_s3, path, tmp_path, 1)
    assert [p.wait(timeout=600) for p in procs] == [0, 0], (tmp_path / "a1n0.log").read_text()[-3000:]
    leader = TrainResult.model_validate_json((tmp_path / "a1n0.termination-log").read_text())
    assert leader.ok and (leader.total_steps, leader.processes) == (120, 2)
    assert leader.resumed_from_step is not None and leader.resumed_from_step >= 20
    steps = [p.step for p in history_of(store, leader) if p.train_loss is not None]
    assert steps == list(range(5, 121, 5)), steps
    print(f"the leader failed {waited:.1f} s after its peer was killed; the new group resumed at {leader.resumed_from_step}")


def run_group(tiny_s3: TinyS3, inp: TrainInput, tmp_path: Path, attempt: int) -> TrainResult:
    """One attempt of the two-node group to its end; the leader's summary."""
    path = tmp_path / f"input{attempt}.json"
    path.write_text(inp.to_json())
    procs = start_nodes(tiny_s3, path, tmp_path, attempt)
    assert [p.wait(timeout=300) for p in procs] == [0, 0], (tmp_path / f"a{attempt}n0.log").read_text()[-3000:]
    return TrainResult.model_validate_json((tmp_path / f"a{attempt}n0.termination-log").read_text())


@pytest.mark.ml
@pytest.mark.slow  # two two-node runs (process start-up dominates): 96 s, 222 s beside a cluster test
@pytest.mark.timeout(600)
def test_a_group_resumed_from_the_uploaded_checkpoint_trains_on_as_if_uninterrupted(
    tiny_s3: TinyS3, data_prefix: str, tmp_path: Path
) -> None:
    """A restarted group sees only what the leader uploaded (the other node's disk is gone). With LoRA dropout on
    (the default), each rank draws its masks from its own RNG: the checkpoint must hold every rank's RNG state, or
    the resumed worker draws other masks than it would have and the losses part from the uninterrupted run's (seen
    before the worker's state was uploaded: every step after the resume apart, by up to 7e-4 here and 2e-2 within
    30 steps)."""
    dropout = LoraSpec().dropout
    assert dropout > 0
    training = PARALLEL.model_copy(
        update={"max_steps": 12, "save_steps": 6, "eval_steps": 12, "logging_steps": 1,
                "lora": PARALLEL.lora.model_copy(update={"dropout": dropout})}
    )  # fmt: skip
    store = Storage(endpoint_url=tiny_s3.endpoint_url)
    ref = ModelRef(name="tiny-llama", base_model=tiny_s3.llama, method=Method.LORA)
    whole_loc = new_run(tiny_s3, data_prefix, "whole", tmp_path)
    whole = run_group(tiny_s3, TrainInput(model=ref, training=training, location=whole_loc), tmp_path, 0)
    checkpoint = whole_loc.uri("models/tiny-llama/checkpoints/step-6")
    assert {"rng_state_0.pth", "rng_state_1.pth"} <= set(store.list(checkpoint))  # the worker's, from node 1's disk

    # The group restarted after step 6: a new run prefix holding only that checkpoint, as the leader uploaded it.
    loc = new_run(tiny_s3, data_prefix, "resumed", tmp_path)
    store.download_verified(checkpoint, tmp_path / "step-6")
    store.upload_tree(tmp_path / "step-6", loc.uri("models/tiny-llama/checkpoints/step-6"), extra={"step": 6})
    resumed = run_group(tiny_s3, TrainInput(model=ref, training=training, location=loc), tmp_path, 1)
    assert (resumed.resumed_from_step, resumed.total_steps, resumed.processes) == (6, 12, 2)

    before = {p.step: p.train_loss for p in history_of(store, whole) if p.train_loss is not None}
    after = {p.step: p.train_loss for p in history_of(store, resumed) if p.train_loss is not None}
    assert sorted(after) == sorted(before) == list(range(1, 13))
    # The same computation in the same order: equal to the logged precision (4 decimals).
    assert [after[s] for s in range(7, 13)] == pytest.approx([before[s] for s in range(7, 13)], rel=1e-5, abs=1e-4)
