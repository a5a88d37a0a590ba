"""Several GPUs in one pod: the train step starts one process per GPU with torchrun (data parallel).

Several nodes (placement.nodes > 1: a JobSet of one pod per node, `rendering.render_jobset`): every pod's agent
starts its GPUs' processes and joins the others in a static rendezvous on the leader pod (`FTC_MASTER_ADDR`, its
DNS name; `FTC_NODE_RANK`, the pod's completion index), as `torchrun --nnodes N --node-rank R --master-addr A`
does; each pod fetches its own inputs, and only global rank 0 (on the leader) uploads and reports progress.

`ftc-trainer train` in a pod whose placement asked for N > 1 GPUs (``FTC_GPUS``, set by the operator)
becomes the torchrun agent: it starts N copies of itself through torch's elastic launcher (what the
``torchrun --standalone --nproc-per-node=N`` command runs: a c10d rendezvous on a free local port, no
restarts: the Job retries and the step resumes from its checkpoint) and waits for them. Each copy finds
``LOCAL_RANK``/``WORLD_SIZE`` in its environment and trains its share of every batch on its own GPU;
transformers' Trainer wraps the model in DistributedDataParallel (or FSDP, see ``parallel.py``).

No training process waits on storage inside a collective: before it starts the workers, the agent downloads
everything they read (`train.fetch_inputs`: data/, the base model, the newest complete checkpoint) into one
scratch directory on the pod's disk and names it in ``$FTC_TRAIN_INPUTS`` (a small JSON file); the workers
read that and download nothing, then create the process group with the spec's processGroupTimeoutSeconds.
A download that fails fails the step here, as one process would (bad input 2, unreachable storage 1).

SIGTERM (a preemption): the agent passes it to the workers and waits up to the pod's grace period for them
to stop after the step in flight and upload its checkpoint (`callbacks.StopOnSigterm`), then ends with rank
0's summary (its `preemptedAtStep`) and exit 1.

Every rank writes its summary to its own file; the agent hands the container's termination log the
summary of the rank that failed first (or rank 0's when all succeeded) and exits with that rank's code,
so bad input still fails the Job at once (2) and a transient failure is still retried (1).
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import sys
import tempfile
import time
import uuid
from pathlib import Path
from typing import TYPE_CHECKING, Any

from ftc_api.steps import RANK_SUMMARY_DIR_ENV

if TYPE_CHECKING:
    from ftc_api.steps import TrainInput

log = logging.getLogger("ftc.trainer")


def under_launcher(env: dict[str, str] | os._Environ[str] = os.environ) -> bool:
    """Whether this process is one of torchrun's workers."""
    return "LOCAL_RANK" in env and "WORLD_SIZE" in env


def processes_for(env: dict[str, str] | os._Environ[str] = os.environ) -> int:
    """How many training processes the pod runs: one per requested GPU (1 when none or one)."""
    from ftc_step.devices import requested_gpus

    return max(1, requested_gpus(env))


def pick_outcome(failures: dict[int, int], first_failed: int | None, summaries: dict[int, str]) -> tuple[int, str | None]:
    """The pod's exit code and summary from its workers' exit codes by rank ({} when all succeeded), the
    rank that failed first, and the summaries the workers wrote. A worker killed by a signal (a negative
    code) or one that died without a summary counts as a transient failure (1)."""
    if not failures:  # rank 0's; on another node than the leader's, the lowest rank this pod ran
        return 0, summaries.get(min(summaries)) if summaries else None
    rank = first_failed if first_failed in failures else min(failures)
    code = failures[rank]
    summary = summaries.get(rank)
    if code <= 0 or summary is None:
        code = 1
    return (2 if code == 2 else 1), summary


DEFAULT_SHUTDOWN_SECONDS = 300  # a pod whose grace period ftc did not set: Kubernetes' SIGKILL comes first anyway


def shutdown_timeout(env: dict[str, str] | os._Environ[str] = os.environ) -> int:
    """How long the agent waits for its SIGTERM'd workers: the pod's grace period ($FTC_TERMINATION_GRACE_SECONDS),
    else DEFAULT_SHUTDOWN_SECONDS."""
    from ftc_api.steps import GRACE_PERIOD_ENV

    try:
        return max(1, int(float(env[GRACE_PERIOD_ENV])))
    except (KeyError, ValueError):
        return DEFAULT_SHUTDOWN_SECONDS


def launch(argv: list[str], processes: int, inp: TrainInput, workdir: Path | None = None) -> int:
    """Fetch the inputs of `inp` into `workdir` (a new temporary directory when None), then run
    `python -m ftc_trainer ARGV` as `processes` torchrun workers reading them; returns the pod's exit code
    after writing the chosen summary to the termination log. A failed download raises StepError (no worker
    was started)."""
    from ftc_step.runtime import write_termination_log
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    from .parallel import rendezvous
    from .train import INPUTS_ENV, fetch_inputs

    started = time.monotonic()
    fetched = fetch_inputs(inp, workdir or Path(tempfile.mkdtemp(prefix="ftc-train-")))
    log.info("inputs fetched in %.1fs, before any training process started", time.monotonic() - started)
    os.environ[INPUTS_ENV] = str(fetched.write())  # the workers inherit the agent's environment
    summaries_dir = Path(tempfile.mkdtemp(prefix="ftc-ranks-"))
    os.environ[RANK_SUMMARY_DIR_ENV] = str(summaries_dir)
    rdzv = rendezvous()  # several nodes: a static rendezvous on the leader pod (FTC_MASTER_ADDR, FTC_NODE_RANK)
    config = LaunchConfig(
        min_nodes=rdzv.nodes,
        max_nodes=rdzv.nodes,
        nproc_per_node=processes,
        run_id=str(uuid.uuid4()) if rdzv.nodes == 1 else f"ftc-{rdzv.endpoint}",
        rdzv_backend=rdzv.backend,
        rdzv_endpoint=rdzv.endpoint,
        rdzv_configs=rdzv.configs,
        max_restarts=0,
        monitor_interval=1.0,
        start_method="spawn",
        # On SIGTERM the agent passes it to the workers, then waits this long before it kills them: the time they
        # have to finish the step in flight and save and upload its checkpoint (torch's default is 30 s).
        shutdown_timeout=shutdown_timeout(),
    )
    failures: dict[int, int] = {}
    first: int | None = None
    detail = ""
    try:
        elastic_launch(config, entrypoint=sys.executable)("-m", "ftc_trainer", *argv)
    except ChildFailedError as err:
        first_rank, first_failure = err.get_first_failure()
        first = first_rank
        failures = {rank: failure.exitcode for rank, failure in err.failures.items()}
        detail = f"training process rank {first_rank} exited with code {first_failure.exitcode}"
    except Exception as err:  # the rendezvous or the agent itself failed (or a signal stopped it)
        failures, first, detail = {0: 1}, 0, f"the torchrun agent failed: {type(err).__name__}: {err}"
    summaries = {
        int(path.stem.split("-", 1)[1]): path.read_text() for path in summaries_dir.glob("rank-*.json") if path.stat().st_size
    }
    shutil.rmtree(summaries_dir, ignore_errors=True)
    code, summary = pick_outcome(failures, first, summaries)
    if summary is None:
        error = detail or "no summary from rank 0"
        summary = json.dumps({"step": "train", "ok": code == 0, "error": error, "model": _model(argv)})
    write_termination_log(summary)  # the agent is no worker: this is the container's termination log
    return code


def _model(argv: list[str]) -> str:
    """The model's name from the step input (for a summary no worker wrote)."""
    from ftc_step.runtime import input_path

    try:
        index = argv.index("--input")
        explicit: str | None = argv[index + 1]
    except (ValueError, IndexError):
        explicit = None
    try:
        doc: Any = json.loads(input_path(explicit).read_text())
        return str(doc["model"]["name"])
    except (OSError, ValueError, KeyError, TypeError):
        return "unknown"
