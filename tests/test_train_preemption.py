"""The preemption checkpoint's policy: SIGTERM inside the training loop is a stop request, every process stops
after the same step (an all_reduce of the flag at each step end), and the Trainer is told through TrainerControl
to log, save and stop. The whole path on the tiny Llama (SIGTERM, upload, retry) is in test_train.py."""

from __future__ import annotations

import os
import signal
import socket
import time
from types import SimpleNamespace
from typing import Any

import pytest


def _args(world_size: int = 1) -> Any:
    return SimpleNamespace(world_size=world_size, device="cpu")


def _state(step: int, epoch: float) -> Any:
    return SimpleNamespace(global_step=step, epoch=epoch)


@pytest.mark.unit
def test_one_process_stops_after_the_step_in_flight_with_log_and_save() -> None:
    from ftc_step.runtime import StopRequest
    from ftc_trainer.callbacks import StopOnSigterm
    from transformers import TrainerControl

    request = StopRequest()
    stop = StopOnSigterm(request)
    control = TrainerControl()
    stop.on_step_end(_args(), _state(4, 0.4), control)
    assert not (control.should_save or control.should_training_stop or control.should_log) and stop.stopped_at is None
    request.received = time.monotonic()  # what the SIGTERM handler does inside graceful_sigterm
    stop.on_step_end(_args(), _state(5, 0.5), control)
    assert (control.should_log, control.should_save, control.should_training_stop) == (True, True, True)
    assert stop.stopped_at == 5
    control.should_save = False  # the Trainer saved (on_save resets it)
    stop.on_save(_args(), _state(5, 0.5), control)
    assert stop.save_seconds is not None and stop.save_seconds >= 0
    stop.on_step_end(_args(), _state(6, 0.6), control)  # decided once
    assert stop.stopped_at == 5

    # The loop breaks; the cut epoch's end adds no evaluation (the uninterrupted run has none at step 5).
    control.should_evaluate = True
    stop.on_epoch_end(_args(), _state(5, 0.5), control)
    assert not control.should_evaluate
    # Stopped exactly at an epoch's end: that epoch's evaluation stays (the uninterrupted run has it too).
    at_end = StopOnSigterm(request)
    at_end.on_step_end(_args(), _state(13, 1.0), control)
    control.should_evaluate = True
    at_end.on_epoch_end(_args(), _state(13, 1.0), control)
    assert control.should_evaluate


@pytest.mark.unit
def test_several_processes_agree_through_the_collective_every_step() -> None:
    """The collective runs at every step end, signal or none (a process that skipped it would leave the others
    waiting); a process that got no SIGTERM stops when another did."""
    from ftc_step.runtime import StopRequest
    from ftc_trainer.callbacks import StopOnSigterm
    from transformers import TrainerControl

    calls: list[int] = []
    others = {1: 0, 2: 0, 3: 1}  # another process got SIGTERM during step 3

    def reduce(flag: int, device: Any) -> int:
        calls.append(flag)
        return max(flag, others[len(calls)])

    stop = StopOnSigterm(StopRequest(), reduce=reduce)  # this process never got the signal
    control = TrainerControl()
    for step in (1, 2, 3):
        stop.on_step_end(_args(world_size=2), _state(step, step / 10), control)
    assert calls == [0, 0, 0] and stop.stopped_at == 3 and control.should_training_stop and control.should_save


@pytest.mark.unit
def test_sigterm_inside_the_training_block_is_a_request_and_a_second_one_stops_at_once() -> None:
    from ftc_step.runtime import Terminated, graceful_sigterm, stop_on_sigterm

    previous = signal.getsignal(signal.SIGTERM)
    try:
        stop_on_sigterm()
        with graceful_sigterm() as request:
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.01)  # the handler runs between bytecodes of the main thread
            assert request.requested and request.signal_name == "SIGTERM" and request.seconds_since() >= 0
            with pytest.raises(Terminated):
                os.kill(os.getpid(), signal.SIGTERM)
                time.sleep(0.5)
        with pytest.raises(Terminated):  # outside the training loop: at once, as before
            os.kill(os.getpid(), signal.SIGTERM)
            time.sleep(0.5)
    finally:
        signal.signal(signal.SIGTERM, previous)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank(rank: int, world: int, port: int, signalled_at: dict[int, int], out: Any) -> None:
    """One of two gloo processes stepping through on_step_end; `signalled_at[rank]`: the step during which this
    process gets SIGTERM (0: never)."""
    import torch.distributed as dist
    from ftc_step.runtime import StopRequest
    from ftc_trainer.callbacks import StopOnSigterm
    from transformers import TrainerControl

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    request = StopRequest()
    stop = StopOnSigterm(request)
    control = TrainerControl()
    step = 0
    while not control.should_training_stop and step < 20:
        step += 1
        if step == signalled_at[rank]:
            request.received = time.monotonic()
        stop.on_step_end(_args(world_size=world), _state(step, step / 100), control)
    dist.destroy_process_group()
    out.put((rank, stop.stopped_at, control.should_save))


@pytest.mark.ml
@pytest.mark.timeout(180)
def test_two_gloo_processes_stop_after_the_same_step() -> None:
    """Rank 1 alone gets SIGTERM, during step 3: both stop after step 3 and both save (the Trainer's save is
    collective under FSDP). Signals at different steps are the forced-function test's."""
    signalled_at, stopped = {0: 0, 1: 3}, 3
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    out = ctx.Queue()
    port = _free_port()
    procs = [ctx.Process(target=_rank, args=(rank, 2, port, signalled_at, out)) for rank in (0, 1)]
    for p in procs:
        p.start()
    results = sorted(out.get(timeout=100) for _ in procs)
    for p in procs:
        p.join(30)
        assert p.exitcode == 0
    assert results == [(0, stopped, True), (1, stopped, True)]
