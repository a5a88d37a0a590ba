"""The flagship example runs as written: examples/llama2-vs-mixtral.yaml, loaded from the file with only its
endpoints pointed at local servers (a local hub serving `meta-llama/Llama-2-7b-hf` gated, as the real one is,
a local S3 holding the example's bucket and dataset, and a local OpenAI-compatible judge that, like OpenAI,
refuses JSON mode for `gpt-4`), gets past prepare, its judge checked and RAGAS' mode chosen.

The operator's own planner renders the prepare Job from the example; the Job's container runs as its pod
would (the image's entry point as a process of its own, its env with every `secretKeyRef` filled from the
Secrets the example's header tells the user to create, the input document where the ConfigMap is mounted);
its termination message goes back to the planner, which then creates the train Jobs. Without
`spec.hub.tokenSecretRef` the same prepare fails at once as bad input, naming the setting and the Secret to
create. The hub's repos are the tiny models under the real names (the memory pre-flight sees tiny configs).
"""

from __future__ import annotations

import datetime as dt
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import uuid
from pathlib import Path
from typing import Any

import pytest
import yaml
from ftc_api.steps import EXIT_BAD_INPUT

from devcluster.models.tiny import TinyAssets
from devcluster.servers.hub_server import FakeHub
from devcluster.servers.openai_server import FakeOpenAI

ROOT = Path(__file__).resolve().parents[1]
EXAMPLE = ROOT / "examples" / "llama2-vs-mixtral.yaml"
HF_TOKEN = "hf_flagship_canary_7c1d"  # the token of an account that accepted the Llama 2 licence
OPENAI_KEY = "sk-flagship-canary-3e9a"  # the only key the local judge accepts


def secrets_created_by(text: str) -> dict[str, dict[str, str]]:
    """The Secrets that the `kubectl create secret generic NAME --from-literal=KEY=VALUE` commands in `text`
    create (a command may continue over `\\`-ended lines; `#` starts a comment)."""
    joined = re.sub(r"\\\n\s*", " ", text)
    secrets: dict[str, dict[str, str]] = {}
    for line in joined.splitlines():
        command = line.lstrip("# ").split(" #")[0]
        if "create secret generic" not in command:
            continue
        words = shlex.split(command)
        name = words[words.index("generic") + 1]
        literals = (w.removeprefix("--from-literal=") for w in words if w.startswith("--from-literal="))
        secrets[name] = dict(literal.split("=", 1) for literal in literals)
    return secrets


@pytest.mark.unit
def test_the_example_and_the_install_docs_create_every_secret_the_example_names() -> None:
    """The example's header, the README's GPU quick start and docs/install.md create the same Secrets, with
    the keys the example's secretKeyRefs name (the hub token among them)."""
    text = EXAMPLE.read_text()
    created = secrets_created_by(text)
    assert created["hf-token"] == {"token": "hf_..."}
    spec = yaml.safe_load(text)["spec"]
    refs = [spec["hub"]["tokenSecretRef"], spec["evaluation"]["judge"]["apiKeySecretRef"]]
    assert all(ref["key"] in created[ref["name"]] for ref in refs)
    assert set(created[spec["storage"]["credentialsSecretRef"]["name"]]) == {"AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY"}
    for page in (ROOT / "README.md", ROOT / "docs" / "install.md"):
        assert secrets_created_by(page.read_text()) == created, page.name
    assert "accepted" in text and "licence" in text  # the account behind the token must have accepted it


# ---------------------------------------------------------------------------------------------- the pod, locally


def _env(container: dict[str, Any], secrets: dict[str, dict[str, str]], input_path: Path, log: Path) -> dict[str, str]:
    """The container's env as the kubelet would set it: values, fieldRefs, secretKeyRefs from `secrets` (a
    missing one fails here, as it would keep the pod in CreateContainerConfigError), and the mounted input
    and termination-log paths moved into the test's directory."""
    from ftc_api.steps import INPUT_PATH_ENV, TERMINATION_LOG_ENV

    env: dict[str, str] = {}
    for var in container["env"]:
        source = var.get("valueFrom", {})
        if "secretKeyRef" in source:
            ref = source["secretKeyRef"]
            assert ref["key"] in secrets.get(ref["name"], {}), f"{var['name']}: Secret {ref['name']}/{ref['key']} not created"
            env[var["name"]] = secrets[ref["name"]][ref["key"]]
        elif "fieldRef" in source:
            env[var["name"]] = "llama2-vs-mixtral-prepare-pod"
        else:
            env[var["name"]] = var["value"]
    env[INPUT_PATH_ENV], env[TERMINATION_LOG_ENV] = str(input_path), str(log)
    return env


def _run_pod(create: Any, secrets: dict[str, dict[str, str]], where: Path) -> tuple[int, dict[str, Any], str]:
    """Run a planned step's container as a process of its own: the trainer image's entry point
    (`python -m ftc_trainer`) with the Job's args and env. Returns the exit code, the termination message
    (the step's summary) and what the step logged."""
    where.mkdir(parents=True)
    [container] = create.job["spec"]["template"]["spec"]["containers"]
    (where / "input.json").write_text(create.configmap["data"]["input.json"])
    env = _env(container, secrets, where / "input.json", where / "termination-log")
    env |= {"PATH": os.environ["PATH"], "HOME": str(where), "TMPDIR": str(where), "HF_HOME": str(where / "hf")}
    proc = subprocess.run(
        [sys.executable, "-m", "ftc_trainer", *container["args"]], env=env, capture_output=True, text=True, timeout=300
    )
    return proc.returncode, json.loads((where / "termination-log").read_text()), proc.stderr


@pytest.fixture
def flagship(
    hub_server: FakeHub,
    local_s3: Any,
    openai_server: FakeOpenAI,
    tiny_assets: TinyAssets,
    tmp_path: Path,
    request: pytest.FixtureRequest,
) -> dict[str, Any]:
    """The example's spec with only its endpoints rewritten (hub, S3 and judge on this host), its two models on the
    local hub under their real names (Llama 2 gated by HF_TOKEN), its bucket and dataset in the local S3, its judge
    model the only one the local judge serves, with OPENAI_KEY the only key it accepts."""
    import boto3

    doc = yaml.safe_load(EXAMPLE.read_text())
    spec = doc["spec"]
    spec["hub"]["endpoint"] = hub_server.endpoint
    spec["storage"]["endpointUrl"] = local_s3.endpoint_url
    assert spec["evaluation"]["judge"]["baseUrl"] == "https://api.openai.com/v1"
    spec["evaluation"]["judge"]["baseUrl"] = openai_server.base_url
    openai_server.known_models = {spec["evaluation"]["judge"]["model"]}
    openai_server.api_keys = {OPENAI_KEY}
    llama, mixtral = (m["baseModel"] for m in spec["models"])
    assert llama == "meta-llama/Llama-2-7b-hf"
    # Each test's repos differ by a README naming the test: a copy staged by an earlier test (same commit sha)
    # is never what lets this one through.
    for repo, model, token in ((llama, tiny_assets.llama, HF_TOKEN), (mixtral, tiny_assets.mixtral, None)):
        files = shutil.copytree(model, tmp_path / "hub" / repo)
        (files / "README.md").write_text(f"{repo} as served to {request.node.name}\n")
        hub_server.add(repo, files, gated_token=token)

    creds = local_s3.env()
    s3 = boto3.client(
        "s3",
        endpoint_url=local_s3.endpoint_url,
        region_name=spec["storage"]["region"],
        aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
    )
    bucket, key = spec["dataset"]["source"].removeprefix("s3://").split("/", 1)
    assert bucket == spec["storage"]["bucket"]
    if bucket not in [b["Name"] for b in s3.list_buckets()["Buckets"]]:
        s3.create_bucket(Bucket=bucket)
    rows = [{"instruction": f"What is {i} plus {i}?", "input": "", "output": f"{i} plus {i} is {2 * i}."} for i in range(400)]
    s3.put_object(Bucket=bucket, Key=key, Body="".join(json.dumps(r) + "\n" for r in rows).encode())
    doc["metadata"]["uid"] = str(uuid.uuid5(uuid.NAMESPACE_URL, request.node.nodeid))  # a comparison of its own
    return doc


def _secrets(local_s3: Any, token: str = HF_TOKEN) -> dict[str, dict[str, str]]:
    """The Secrets of the example's header, with this test's values for its placeholders."""
    creds = local_s3.env()
    secrets = secrets_created_by(EXAMPLE.read_text())
    secrets["ftc-s3"] = {k: creds[k] for k in secrets["ftc-s3"]}
    secrets["openai"] = {"api-key": OPENAI_KEY}
    secrets["hf-token"] = {"token": token}
    return secrets


def _plan(doc: dict[str, Any], observed: list[Any]) -> Any:
    from ftc_operator.comparison import Owner, parse_spec
    from ftc_operator.config import OperatorConfig
    from ftc_operator.planning import plan

    owner = Owner(doc["metadata"]["name"], "ml-team", doc["metadata"]["uid"], 1)
    now = dt.datetime(2026, 12, 3, tzinfo=dt.UTC)
    return plan(parse_spec(doc["spec"]), None, observed, now, owner=owner, config=OperatorConfig())


@pytest.mark.ml
def test_the_flagship_example_gets_past_prepare_with_its_gated_model(
    flagship: dict[str, Any], hub_server: FakeHub, local_s3: Any, tmp_path: Path
) -> None:
    from ftc_operator.observe import JobState, ObservedJob

    [prepare] = _plan(flagship, []).creates
    assert prepare.step == "prepare"
    code, summary, logged = _run_pod(prepare, _secrets(local_s3), tmp_path / "prepare")
    assert code == 0, f"{summary}\n{logged[-4000:]}"
    staged = {m["name"]: m for m in summary["models"]}
    assert set(staged) == {"llama2-7b", "mixtral-8x7b"}
    llama = hub_server.repos["meta-llama/Llama-2-7b-hf"]
    assert staged["llama2-7b"]["revision"] == llama.sha and staged["llama2-7b"]["stagedUri"]
    assert all(m["memory"]["fits"] for m in staged.values())
    downloads = [r for r in hub_server.requests if "/meta-llama/Llama-2-7b-hf/resolve/" in r["path"]]
    assert downloads and all(r["token"] for r in downloads)
    assert HF_TOKEN not in json.dumps(summary) + logged
    # The judge was checked before any weight moved: gpt-4 has no JSON mode (HTTP 400, as OpenAI answers), so
    # RAGAS is driven with tool calls.
    [judge] = summary["endpoints"]
    assert (judge["setting"], judge["ok"], judge["mode"]) == ("evaluation.judge", True, "tools"), judge
    assert "400" in judge["refused"].get("json", ""), judge
    assert OPENAI_KEY not in json.dumps(summary) + logged

    # What the operator makes of it: prepare succeeded, both models go on to train.
    done = ObservedJob(name=prepare.name, step="prepare", model=None, state=JobState.SUCCEEDED, result=json.dumps(summary))
    after = _plan(flagship, [done])
    assert sorted(c.model for c in after.creates if c.step == "train") == ["llama2-7b", "mixtral-8x7b"]


@pytest.mark.ml
def test_without_the_hub_token_the_flagship_fails_prepare_at_once_naming_the_setting(
    flagship: dict[str, Any], local_s3: Any, tmp_path: Path
) -> None:
    del flagship["spec"]["hub"]["tokenSecretRef"]  # the example as it was: no token for the gated Llama 2
    [prepare] = _plan(flagship, []).creates
    code, summary, logged = _run_pod(prepare, _secrets(local_s3), tmp_path / "prepare")
    assert code == EXIT_BAD_INPUT, f"{summary}\n{logged[-4000:]}"
    assert "base model meta-llama/Llama-2-7b-hf is gated or private and no token was given" in summary["error"]
    assert "kubectl create secret generic hf-token --from-literal=token=hf_..." in summary["error"]
    assert "spec.hub.tokenSecretRef" in summary["error"]
