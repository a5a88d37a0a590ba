"""The operator end to end with the REAL trainer and evaluator on the local control plane.

`helm install` of the chart runs the operator Deployment; the step pods run the trainer and evaluator
images built from their Dockerfiles (`ftc-trainer prepare|train`, `ftc-evaluator`) in containers on the
real nodes, locked down to the restricted Pod Security Standard, on tiny Llama and Mixtral models from the
S3 server, judged by the local OpenAI-compatible server. Slow (minutes), but the product's real path.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from devcluster.harness import (
    Comparisons,
    apply_crd,
    secret_leaks,
    start_operator,
    tiny_spec,
    wait_for,
)
from devcluster.kube.typed import body, present

pytestmark = pytest.mark.cluster

SMALL = {"requests": {"cpu": "100m", "memory": "256Mi"}}
JUDGE_KEY = "sk-canary-real-steps-3b71"  # must appear nowhere but in its Secret


@pytest.fixture(scope="module")
def crd(control_plane):
    apply_crd(control_plane.kubectl)


@pytest.fixture(scope="module")
def assets_in_s3(tiny_assets, s3_server):
    """examples/tiny.yaml's inputs: the tiny models and dataset under s3://ftc/assets/."""
    client = s3_server.client()
    for kind in ("tiny-llama", "tiny-mixtral"):
        root = Path(tiny_assets.model(kind))
        for path in sorted(p for p in root.rglob("*") if p.is_file()):
            client.upload_file(str(path), s3_server.bucket, f"assets/models/{kind}/{path.relative_to(root)}")
    client.upload_file(str(tiny_assets.dataset), s3_server.bucket, "assets/data/tiny-alpaca.jsonl")
    return s3_server


@pytest.fixture
def judge_secret(control_plane, namespace):
    from kubernetes import client

    client.CoreV1Api(control_plane.api_client()).create_namespaced_secret(
        namespace, body(client.V1Secret, {"metadata": {"name": "ftc-judge"}, "stringData": {"api-key": JUDGE_KEY}})
    )


def real_values(allow_cpu: bool = True) -> dict:
    """The chart's values for the real steps; the local GPU node's GPUs are fake, so GPU steps run on the CPU."""
    return {
        "config": {
            "resyncSeconds": 5,
            "progressWriteSeconds": 1,
            "allowCpuExecution": allow_cpu,
            "prepare": {"resources": SMALL},
            "score": {"resources": SMALL},
            "extraEnv": {"FTC_PROGRESS_INTERVAL": "1", "OMP_NUM_THREADS": "1"},  # no HF_HUB_OFFLINE: prepare stages
        }
    }


@pytest.fixture
def real_operator(control_plane, namespace, crd, tmp_path):
    return start_operator(control_plane, namespace, real_values(), tmp_path)


def test_gpu_steps_that_see_no_gpu_fail_at_once_naming_what_they_see(
    control_plane, namespace, crd, tmp_path, assets_in_s3, openai_server, judge_secret
):
    start_operator(control_plane, namespace, real_values(allow_cpu=False), tmp_path)
    ftc = Comparisons(control_plane.api_client())
    ftc.create("nogpu", namespace, tiny_spec(assets_in_s3.cluster_endpoint_url, openai_server.cluster_base_url))

    st = ftc.wait_phase("nogpu", namespace, ("Succeeded", "Failed"), timeout=300)

    assert st["phase"] == "Failed"
    for m in st["models"]:
        assert m["phase"] == "Failed"
        assert "(PodFailurePolicy)" in m["message"], m["message"]  # exit code 2: no retries
        assert "placed on 1 GPU(s) but sees 0" in m["message"] and "torch.cuda.is_available()=False" in m["message"]
        assert "config.allowCpuExecution=true" in m["message"]
    jobs = [j for j in ftc.jobs(namespace, "nogpu") if "train" in j.metadata.name]
    assert len(jobs) == 2 and all((j.status.failed or 0) == 1 for j in jobs)


def test_a_gated_hub_model_without_a_token_fails_prepare_at_once_naming_the_secret_to_create(
    control_plane, real_operator, namespace, assets_in_s3, openai_server, judge_secret, hub_server, tiny_assets
):
    hub_server.add("ftc-test/tiny-llama", Path(tiny_assets.model("tiny-llama")), gated_token=HF_TOKEN)
    spec = tiny_spec(assets_in_s3.cluster_endpoint_url, openai_server.cluster_base_url)
    spec["models"][0]["baseModel"] = "ftc-test/tiny-llama"
    spec["hub"] = {"endpoint": hub_server.cluster_endpoint}
    ftc = Comparisons(control_plane.api_client())
    ftc.create("gated", namespace, spec)
    st = ftc.wait_phase("gated", namespace, ("Succeeded", "Failed"), timeout=300)
    assert st["phase"] == "Failed"
    prepared = next(c for c in st["conditions"] if c["type"] == "Prepared")
    assert prepared["status"] == "False" and "(PodFailurePolicy)" in prepared["message"], prepared  # exit 2, no retry
    assert "ftc-test/tiny-llama is gated or private and no token was given" in prepared["message"]
    assert "spec.hub.tokenSecretRef" in prepared["message"]
    assert not [j for j in ftc.jobs(namespace, "gated") if "train" in j.metadata.name]


def step_logs(control_plane, namespace) -> str:
    """The logs of every step pod in the namespace (through the kubelets)."""
    from kubernetes import client

    core = client.CoreV1Api(control_plane.api_client())
    pods = core.list_namespaced_pod(namespace, label_selector="app.kubernetes.io/managed-by=ftc-operator").items
    names = (present(p.metadata).name for p in pods)
    return "\n".join(f"--- {name}\n{control_plane.pod_log(namespace, name)}" for name in names)


HF_TOKEN = "hf_canary_gated_5e02"  # the local hub's token for its gated repo: must appear nowhere but in its Secret


def test_tiny_comparison_with_real_steps(
    control_plane, real_operator, namespace, assets_in_s3, openai_server, judge_secret, hub_server, tiny_assets
):
    from kubernetes import client

    # tiny-llama comes from the local hub (gated: the token is in a Secret), staged once by prepare.
    repo = hub_server.add("ftc-test/tiny-llama", Path(tiny_assets.model("tiny-llama")), gated_token=HF_TOKEN)
    client.CoreV1Api(control_plane.api_client()).create_namespaced_secret(
        namespace, body(client.V1Secret, {"metadata": {"name": "hf-token"}, "stringData": {"token": HF_TOKEN}})
    )
    spec = tiny_spec(assets_in_s3.cluster_endpoint_url, openai_server.cluster_base_url)
    spec["models"][0]["baseModel"] = "ftc-test/tiny-llama"
    spec["hub"] = {"endpoint": hub_server.cluster_endpoint, "tokenSecretRef": {"name": "hf-token", "key": "token"}}
    # Who must win: tiny-mixtral trains at a learning rate 50,000 times smaller (a per-model override, recorded as a
    # deviation), so its adapter stays next to zero and it answers as its random base model; tiny-llama learns the
    # templated answers, which the local judge rates by their overlap with the reference.
    spec["models"][1]["training"] = {"learningRate": 1e-7}
    ftc = Comparisons(control_plane.api_client())
    ftc.create("tiny", namespace, spec)
    progress: list[dict[str, Any]] = []  # status.models[].progress
    tables: list[str] = []  # `kubectl get ftc` while a model trains with a time left (the PROGRESS column)

    def training_progress():  # until a model has an estimated time left, or training is over
        st = ftc.status("tiny", namespace)
        progress.extend(m["progress"] for m in st.get("models", []) if m.get("progress"))
        if "%" in (st.get("progress") or "") and "~" in st["progress"] and not tables:
            tables.append(control_plane.kubectl("get", "ftc", "tiny", "-n", namespace))
        return tables or st.get("phase") in ("Evaluating", "Succeeded", "Failed")

    wait_for(training_progress, 600, "live training progress with a time left", interval=1)
    try:
        st = ftc.wait_phase("tiny", namespace, ("Succeeded", "Failed"), timeout=1500)
    except TimeoutError:
        raise AssertionError(step_logs(control_plane, namespace)[-12000:]) from None
    assert st["phase"] == "Succeeded", json.dumps(st, indent=1) + step_logs(control_plane, namespace)[-12000:]
    assert st["winner"] == "tiny-llama", json.dumps(st["models"], indent=1)
    assert {(d["model"], d["field"]) for d in st["fairness"]["deviations"]} >= {("tiny-mixtral", "training.learningRate")}
    assert progress and progress[0]["totalSteps"] > 0
    # Trainer-style fields: percentage, time left from the measured step time, metrics by name, when copied
    timed = [p for p in progress if p.get("estimatedRemainingSeconds") is not None]
    assert timed and all(p["secondsPerStep"] > 0 and 0 <= p["progressPercentage"] <= 100 for p in timed), progress
    names = {m["name"] for p in progress for m in p.get("metrics") or []}
    assert {"train_loss", "epoch"} <= names and all(p["lastUpdatedTime"] for p in timed), progress
    header, row = tables[0].splitlines()[:2]
    print(tables[0])
    assert header.split()[:4] == ["NAME", "PHASE", "MODELS", "PROGRESS"] and "%" in row and "~" in row, tables[0]
    assert st["progress"] == "2/2 trained"
    for m in st["models"]:
        assert m["phase"] == "Trained"
        assert m["train"]["finalTrainLoss"] > 0 and m["train"]["bestEvalLoss"] > 0
        assert m["train"]["overfitting"]["verdict"] in ("ok", "overfitting", "unknown")
        scored = [s for s in m["scores"] if s.get("mean") is not None]
        assert scored and all(s["ciLow"] <= s["mean"] <= s["ciHigh"] for s in scored)
    assert st["fairness"]["datasetSha256"]
    # Each model answered on its own GPU and released it before scoring began; the score pod asked for none.
    generated, scored = ftc.evaluation_pods(namespace, "tiny")
    assert sorted(g.model or "" for g in generated) == ["tiny-llama", "tiny-mixtral"] and len(scored) == 1, generated
    assert all(g.gpus == 1 and g.finished is not None for g in generated), generated
    assert scored[0].gpus == 0 and scored[0].started is not None, scored
    assert all(g.finished is not None and g.finished <= scored[0].started for g in generated), (generated, scored)
    llama = next(m for m in st["models"] if m["name"] == "tiny-llama")
    staged = f"/ftc-cache/models/hf/ftc-test--tiny-llama/{repo.sha}"  # the bucket's shared copy of that commit
    assert llama["baseModelRevision"] == repo.sha and llama["stagedBaseModel"].endswith(staged)
    assert [r["path"] for r in hub_server.requests if r["method"] == "GET" and "/resolve/" in r["path"]], "staged"
    key = st["reportUri"].removeprefix(f"s3://{assets_in_s3.bucket}/")
    report = assets_in_s3.client().get_object(Bucket=assets_in_s3.bucket, Key=key)["Body"].read()
    assert b"<html" in report.lower()
    # The real steps saw the judge key and the S3 credentials; none of them may surface anywhere.
    scores_key = st["scoresUri"].removeprefix(f"s3://{assets_in_s3.bucket}/")
    scores = assets_in_s3.client().get_object(Bucket=assets_in_s3.bucket, Key=scores_key)["Body"].read().decode()
    secrets = [JUDGE_KEY, HF_TOKEN, assets_in_s3.secret_access_key, assets_in_s3.access_key_id]
    leaks = secret_leaks(
        control_plane.api_client(),
        namespace,
        st,
        secrets,
        operator_log=real_operator.log(),
        step_logs=step_logs(control_plane, namespace),
        report=report.decode(errors="replace"),
        scores=scores,
    )
    assert not leaks, leaks


@pytest.fixture
def model_cache_claim(control_plane, namespace, tmp_path):
    """A PersistentVolumeClaim `ftc-model-cache` bound to a static PersistentVolume on a host directory (an
    administrator's local volume; the pods only name the claim, which `restricted` allows)."""
    from kubernetes import client

    directory = tmp_path / "model-cache"
    directory.mkdir()
    directory.chmod(0o777)  # written by the steps' UID 65532
    core = client.CoreV1Api(control_plane.api_client())
    pv = f"ftc-model-cache-{namespace}"
    core.create_persistent_volume(
        body(
            client.V1PersistentVolume,
            {
                "metadata": {"name": pv},
                "spec": {
                    "capacity": {"storage": "1Gi"},
                    "accessModes": ["ReadWriteOnce"],
                    "persistentVolumeReclaimPolicy": "Retain",
                    "storageClassName": "",
                    "hostPath": {"path": str(directory), "type": "Directory"},
                    "claimRef": {"namespace": namespace, "name": "ftc-model-cache"},
                },
            },
        )
    )
    core.create_namespaced_persistent_volume_claim(
        namespace,
        body(
            client.V1PersistentVolumeClaim,
            {
                "metadata": {"name": "ftc-model-cache"},
                "spec": {
                    "accessModes": ["ReadWriteOnce"],
                    "storageClassName": "",
                    "volumeName": pv,
                    "resources": {"requests": {"storage": "1Gi"}},
                },
            },
        ),
    )
    try:
        yield directory
    finally:
        core.delete_persistent_volume(pv)


def test_train_pod_deleted_mid_run_resumes_from_checkpoint_and_reads_no_base_weight_again(
    control_plane,
    namespace,
    crd,
    tmp_path,
    assets_in_s3,
    openai_server,
    judge_secret,
    tiny_assets,
    model_cache_claim,
    monkeypatch,
):
    """A train pod killed after it loaded its model: the Job's replacement resumes from the checkpoint and,
    with the chart's model cache (config.modelCache.claimName), reads the base model from the cache: the S3
    server (behind a counting proxy) serves the base weights once for the whole comparison (train, the
    replacement and evaluate)."""
    from ftc_step.storage import Storage
    from kubernetes import client

    from devcluster.kube.node import host_ip
    from devcluster.servers.faulty_s3 import FaultyS3

    values = real_values()
    values["config"]["modelCache"] = {"claimName": "ftc-model-cache"}
    start_operator(control_plane, namespace, values, tmp_path)
    # An s3:// base (uploaded with a manifest): prepare stages it by content into the shared cache
    # (models/sha256/SHA, the key the node cache goes by) and train and evaluate read only that copy.
    for key, value in assets_in_s3.env().items():
        monkeypatch.setenv(key, value)
    store = Storage(endpoint_url=assets_in_s3.endpoint_url)
    base_key = f"assets/cached/{namespace}/tiny-llama"
    store.upload_tree(Path(tiny_assets.model("tiny-llama")), f"s3://{assets_in_s3.bucket}/{base_key}")
    weights = sorted(p.name for p in Path(tiny_assets.model("tiny-llama")).iterdir() if p.suffix == ".safetensors")
    assert weights
    proxy = FaultyS3(upstream=assets_in_s3.endpoint_url, listen="0.0.0.0")  # counts what pods ask S3 for

    staged: list[str] = []  # the content-addressed copy's key, once prepare recorded it

    def weight_gets() -> int:
        keys = [base_key, *staged]
        return sum(proxy.gets(f"/{assets_in_s3.bucket}/{key}/{name}") for key in keys for name in weights)

    try:
        api = control_plane.api_client()
        core = client.CoreV1Api(api)
        ftc = Comparisons(api)
        spec = tiny_spec(proxy.cluster_endpoint_url(host_ip()), openai_server.cluster_base_url)
        spec["training"]["saveSteps"] = 4
        spec["models"][0]["baseModel"] = f"s3://{assets_in_s3.bucket}/{base_key}"
        ftc.create("resume", namespace, spec)
        selector = "ftc.dev/comparison=resume,ftc.dev/model=tiny-llama,ftc.dev/step=train"  # (its generate pod: same model)

        def past_a_checkpoint():
            st = ftc.status("resume", namespace)
            llama: dict[str, Any] = next((m for m in st.get("models", []) if m["name"] == "tiny-llama"), {})
            return (llama.get("progress") or {}).get("step", 0) >= 6

        wait_for(past_a_checkpoint, 900, "tiny-llama past its first checkpoint", interval=0.5)
        st = ftc.status("resume", namespace)
        uri = next(m for m in st["models"] if m["name"] == "tiny-llama").get("stagedBaseModel") or ""
        assert uri.startswith(f"s3://{assets_in_s3.bucket}/ftc-cache/models/sha256/"), uri
        staged.append(uri.removeprefix(f"s3://{assets_in_s3.bucket}/").rstrip("/"))
        pods = core.list_namespaced_pod(namespace, label_selector=selector).items
        running = [p for p in pods if present(p.status).phase == "Running"]
        assert running, [present(p.status).phase for p in pods]
        deleted = present(present(running[0].metadata).name)
        served_before = weight_gets()
        assert served_before >= len(weights)  # the first pod (and prepare) read the base model through the proxy
        core.delete_namespaced_pod(deleted, namespace)
        st = ftc.wait_phase("resume", namespace, ("Succeeded", "Failed"), timeout=1500)
        assert st["phase"] == "Succeeded", json.dumps(st, indent=1)
        pods = core.list_namespaced_pod(namespace, label_selector=selector).items
        done = [p for p in pods if present(p.status).phase == "Succeeded"]
        assert len(done) == 1 and present(done[0].metadata).name != deleted  # the Job's retry, not the deleted pod
        container = present(present(done[0].status).container_statuses)[0]
        terminated = present(present(container.state).terminated)
        result = json.loads(present(terminated.message))  # the train step's result
        assert result["resumedFromStep"] >= 4
        assert len([j for j in ftc.jobs(namespace, "resume") if "train-tiny-llama" in j.metadata.name]) == 1
        # The replacement pod and the evaluate pod read no base-model weight from S3: the cache served them.
        assert weight_gets() == served_before, (served_before, weight_gets(), step_logs(control_plane, namespace)[-6000:])
        entries = [p for p in model_cache_claim.iterdir() if p.is_dir() and not p.name.startswith(".")]
        assert any(sorted(x.name for x in e.iterdir() if x.suffix == ".safetensors") == weights for e in entries)
    finally:
        proxy.close()
