"""Progress without churn: live training progress is written at most every progressWriteSeconds per comparison,
while a phase change, a condition or a finished step is written at once."""

from __future__ import annotations

import asyncio
import datetime as dt
from typing import Any

import ftc_operator.reconcile as reconcile
import pytest
from ftc_api.status import FineTuneComparisonStatus, ModelPhase, ModelStatus, Phase, Progress
from ftc_operator.config import OperatorConfig
from ftc_operator.kube import Kube
from ftc_operator.planning import Plan, only_progress_changed
from ftc_operator.workqueue import WorkQueue

pytestmark = pytest.mark.unit


def status(
    phase: Phase = Phase.TRAINING, step: int | None = 10, model_phase: ModelPhase = ModelPhase.TRAINING, line: str | None = None
):
    progress = Progress(step=step, total_steps=100, train_loss=1.0) if step is not None else None
    return FineTuneComparisonStatus(
        phase=phase,
        models=[ModelStatus(name="a", phase=model_phase, progress=progress), ModelStatus(name="b")],
        progress=line,  # the PROGRESS column
    )


@pytest.mark.parametrize(
    ("old", "new", "expected"),
    [
        pytest.param(None, status(), False, id="first-write"),
        pytest.param(status(), status(), False, id="unchanged"),
        pytest.param(status(step=10), status(step=20), True, id="progress-only"),
        pytest.param(status(step=None), status(step=5), True, id="first-progress"),
        pytest.param(status(step=10), status(step=20, line="a 20% ~1m · b Pending"), True, id="the-progress-column-too"),
        pytest.param(status(step=10), status(Phase.EVALUATING, step=20), False, id="phase-too"),
        pytest.param(status(step=10), status(step=20, model_phase=ModelPhase.TRAINED), False, id="model-finished"),
    ],
)
def test_only_progress_changed(old, new, expected):
    assert only_progress_changed(old, new) is expected


class FakeKube(Kube):
    """The calls the reconciler makes, in memory; Kube's __init__ (an API client) is not run, so anything not
    overridden here fails rather than reaching a cluster."""

    def __init__(self) -> None:
        self.obj: dict[str, Any] = {"metadata": {"name": "c", "namespace": "ns", "uid": "u", "generation": 1}, "spec": {}}
        self.writes: list[dict[str, Any]] = []
        self.events: list[tuple[str, str, str]] = []

    def get_comparison(self, namespace: str, name: str) -> dict[str, Any]:
        return self.obj

    def list_jobs(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        return []

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        return []

    def replace_status(self, obj: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        self.writes.append(status)
        self.obj = {**obj, "status": status}
        return self.obj

    def event(self, obj: dict[str, Any], type_: str, reason: str, message: str, now: Any = None) -> None:
        self.events.append((type_, reason, message))


def test_progress_writes_are_held_for_the_interval_and_the_rest_goes_out_at_once(monkeypatch):
    planned: list[FineTuneComparisonStatus] = []
    monkeypatch.setattr(reconcile, "plan", lambda *args, **kwargs: Plan(status=planned[-1]))
    clock = [1000.0]
    kube = FakeKube()
    reconciler = reconcile.Reconciler(kube, OperatorConfig(progress_write_seconds=15), monotonic=lambda: clock[0])

    def step(st: FineTuneComparisonStatus, at: float) -> float | None:
        planned.append(st)
        clock[0] = at
        return reconciler.reconcile("ns", "c")

    assert step(status(step=1), 1000) is None and len(kube.writes) == 1  # the first status: at once
    assert step(status(step=2), 1005) == pytest.approx(10) and len(kube.writes) == 1  # progress only: held
    assert step(status(step=3), 1010) == pytest.approx(5) and len(kube.writes) == 1
    assert step(status(step=4), 1015) is None and len(kube.writes) == 2  # the interval is up: written
    assert kube.writes[-1]["models"][0]["progress"]["step"] == 4
    assert step(status(step=5, model_phase=ModelPhase.TRAINED), 1016) is None and len(kube.writes) == 3  # at once
    assert step(status(Phase.EVALUATING, step=5, model_phase=ModelPhase.TRAINED), 1017) is None and len(kube.writes) == 4
    every = reconcile.Reconciler(kube, OperatorConfig(progress_write_seconds=0), monotonic=lambda: clock[0])
    planned.append(status(Phase.EVALUATING, step=6, model_phase=ModelPhase.TRAINED))
    assert every.reconcile("ns", "c") is None and len(kube.writes) == 5  # 0: every change


def test_a_held_write_is_looked_at_again_when_its_interval_is_up():
    async def main() -> list[float]:
        seen: list[float] = []
        loop = asyncio.get_running_loop()

        async def process(key: Any) -> float | None:
            seen.append(loop.time())
            return 0.2 if len(seen) == 1 else None

        q = WorkQueue(process, workers=1)
        q.start()
        q.add(("ns", "c"))
        await asyncio.sleep(0.5)
        await q.stop()
        return seen

    seen = asyncio.run(main())
    assert len(seen) == 2 and seen[1] - seen[0] >= 0.19


# ---------------------------------------------------------------------------------------------- names taken


def _owned(uid: str | None, kind: str = "ConfigMap", deleting: bool = False) -> dict[str, Any]:
    refs = [{"kind": "FineTuneComparison", "name": "other", "uid": uid, "controller": True}] if uid else []
    meta: dict[str, Any] = {"name": "c-prepare", "namespace": "ns", "ownerReferences": refs}
    if deleting:
        meta["deletionTimestamp"] = "2026-01-01T00:00:00Z"
    return {"kind": kind, "metadata": meta}


@pytest.mark.parametrize(
    ("existing", "expected"),
    [
        pytest.param(_owned("u"), None, id="ours"),
        pytest.param(_owned("old"), "ConfigMap ns/c-prepare belongs to FineTuneComparison other (uid old)", id="theirs"),
        pytest.param(_owned("old", deleting=True), "ConfigMap ns/c-prepare (being deleted) belongs to", id="going"),
        pytest.param(_owned(None), "ConfigMap ns/c-prepare exists and has no controller owner", id="unowned"),
    ],
)
def test_an_existing_object_is_used_only_when_this_comparison_controls_it(existing, expected):
    from ftc_operator.kube import foreign_owner

    wanted = _owned("u")
    message = foreign_owner(wanted, existing)
    if expected is None:
        assert message is None
    else:
        assert message is not None and message.startswith(expected), message


def test_a_taken_name_creates_no_job_and_says_which_object_holds_it():
    import datetime as dt
    from pathlib import Path

    import yaml
    from ftc_operator.kube import Created

    spec = yaml.safe_load((Path(__file__).resolve().parents[1] / "examples" / "tiny.yaml").read_text())["spec"]
    created: list[str] = []
    blocker = "ConfigMap ns/c-prepare belongs to FineTuneComparison other (uid old), not to this comparison"

    class TakenNameKube(FakeKube):
        def create(self, obj: dict[str, Any]) -> Created:
            created.append(obj["kind"])
            return Created(False, blocker) if obj["kind"] == "ConfigMap" else Created(True)

    kube = TakenNameKube()
    kube.obj["spec"] = spec
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    reconciler = reconcile.Reconciler(kube, OperatorConfig(resync_seconds=30), clock=lambda: now)
    assert reconciler.reconcile("ns", "c") == pytest.approx(5)  # looked at again soon
    assert created == ["ConfigMap"]  # no Job reads another comparison's input
    prepared = next(c for c in kube.writes[-1]["conditions"] if c["type"] == "Prepared")
    assert (prepared["status"], prepared["reason"]) == ("Unknown", "NameTaken") and prepared["message"].startswith(blocker)
    assert ("Warning", "NameTaken", blocker) in kube.events
    assert not any(reason == "JobCreated" for _, reason, _ in kube.events)  # nothing was created: nothing announced


@pytest.mark.parametrize(
    ("blocked", "prepared", "events"),
    [
        pytest.param(None, ("Unknown", "JobCreated"), ["SpecValid", "PhasePreparing", "JobCreated"], id="created"),
        pytest.param("ours", ("Unknown", "JobCreated"), ["SpecValid", "PhasePreparing"], id="already-ours"),
        pytest.param("theirs", ("Unknown", "NameTaken"), ["SpecValid", "PhasePreparing", "NameTaken"], id="taken"),
    ],
)
def test_what_a_create_met_is_an_observation_for_the_next_plan(blocked, prepared, events):
    from ftc_operator.comparison import Owner, parse_spec
    from ftc_operator.planning import plan

    doc = {
        "models": [{"name": m, "baseModel": f"s3://ftc/assets/{m}"} for m in ("a", "b")],
        "dataset": {"source": "s3://ftc/assets/data/train.jsonl"},
        "storage": {"bucket": "ftc"},
        "evaluation": {"judge": {"baseUrl": "https://judge.example/v1"}},
    }
    now = dt.datetime(2026, 1, 1, tzinfo=dt.UTC)
    owner = Owner(name="c", namespace="ns", uid="u")
    first = plan(parse_spec(doc), None, [], now, owner=owner, config=OperatorConfig())
    assert first.status.phase == "Preparing", first.status.conditions
    [create] = first.creates
    assert (create.configmap["kind"], create.job["kind"]) == ("ConfigMap", "Job")  # rendered: the reconciler only applies
    assert create.configmap["data"]["input.json"] == create.input_json
    not_created = {} if blocked is None else {create.name: "someone else holds it" if blocked == "theirs" else None}
    again = plan(parse_spec(doc), None, [], now, owner=owner, config=OperatorConfig(), not_created=not_created)
    assert again.creates == first.creates  # the same decisions: only what is reported differs
    assert next((c.status, c.reason) for c in again.status.conditions if c.type == "Prepared") == prepared
    assert [e.reason for e in again.events] == events
    if blocked == "theirs":
        assert (again.events[-1].type, again.events[-1].message) == ("Warning", "someone else holds it")


def test_the_lease_timings_are_whole_seconds_that_the_client_accepts():
    from ftc_operator.leader import LeaseSettings
    from kubernetes.leaderelection.leaderelectionrecord import LeaderElectionRecord
    from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

    settings = LeaseSettings(name="ftc-operator", namespace="ns", identity="pod-a")
    import datetime as dt

    now = str(dt.datetime.now())  # as the client writes it
    record = LeaderElectionRecord("pod-a", str(settings.duration), now, now)
    spec = LeaseLock(settings.name, settings.namespace, settings.identity).get_lease_spec(record)
    assert spec.lease_duration_seconds == 15 and settings.renew_deadline > 1.2 * settings.retry
