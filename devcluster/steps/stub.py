"""Test-only stand-in step for the operator's tests and benchmark: reads the step input, writes a canned,
deterministic result. Not part of any image: tests deliver it into step pods from the ConfigMap that
``devcluster.steps.step_scripts_configmap`` builds, mounted at /ftc-test, and run it with the step image's
interpreter (its venv holds ftc_api and, in the trainer image, the kubernetes client):

    python /ftc-test/stub.py              # reads $FTC_STEP_INPUT, writes the termination message

A single file: it imports nothing but ftc_api, the standard library and (for progress) kubernetes.
Knobs (env): FTC_STUB_SECONDS (sleep before finishing, default 0), FTC_STUB_FAIL (comma-separated model
names whose train step fails with exit 1), FTC_STUB_OOM (model names whose train step allocates 4 GiB, so a
memory limit OOM-kills it), FTC_STUB_GENERATE_FAIL (model names whose generate step fails with exit 1), a
judge key (FTC_JUDGE_API_KEY) of "judge-down" leaves every judgment missing (an inconclusive evaluation), a
judge model (evaluation.judge.model) of "no-such-model" fails evaluation with exit 2 as a 404 would, a
judge key (FTC_JUDGE_API_KEY) of "rejected" fails score (and the one-step evaluate) with exit 2 as a 401 would,
FTC_STUB_PROGRESS=1 (patch the pod's progress annotation while sleeping, with the pod's ServiceAccount token,
else $KUBECONFIG). It never touches S3.
"""

from __future__ import annotations

import hashlib
import json
import os
import signal
import sys
import time

from ftc_api.status import INCONCLUSIVE, Progress
from ftc_api.steps import (
    EXIT_BAD_INPUT,
    JUDGE_API_KEY_ENV,
    PROGRESS_ANNOTATION,
    EvaluatedModelResult,
    EvaluateResult,
    GenerateResult,
    LossPoint,
    MemoryEstimate,
    MetricScore,
    PreparedModel,
    PrepareResult,
    TrainResult,
)
from ftc_step.runtime import input_path, write_summary

REJECTED_KEY = "rejected"  # a judge key the stub's evaluate step refuses
UNKNOWN_JUDGE_MODEL = "no-such-model"  # a judge model the stub's judge does not serve: evaluation fails as bad input
DOWN_KEY = "judge-down"  # a judge key with which every judgment is missing: the evaluation is inconclusive


def _unit(text: str) -> float:
    return int(hashlib.sha256(text.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def _progress(step: int, total: int) -> None:
    if os.environ.get("FTC_STUB_PROGRESS") != "1":
        return
    try:
        from kubernetes import client, config

        try:
            config.load_incluster_config()  # in a pod: the mounted ServiceAccount token
        except config.ConfigException:
            config.load_kube_config()  # a local process: $KUBECONFIG or ~/.kube/config
        api = client.CoreV1Api()
        doc = Progress(step=step, total_steps=total, train_loss=round(3 - step * 0.1, 3)).to_json()
        api.patch_namespaced_pod(
            os.environ["FTC_POD_NAME"],
            os.environ["FTC_POD_NAMESPACE"],
            {"metadata": {"annotations": {PROGRESS_ANNOTATION: doc}}},
            _request_timeout=5,
        )
    except Exception as e:  # progress is best effort
        print(f"stub: progress not reported: {e}", file=sys.stderr)


def _stop(signum: int, frame: object) -> None:
    """SIGTERM (a preemption, an eviction, a deletion) ends the stub at once, as it ends a process with no handler:
    the stub runs as PID 1 of its container, for which the kernel drops a signal without a handler, so without this a
    preempted stub pod would hold its GPUs for the whole grace period."""
    print(f"stub: {signal.Signals(signum).name}: stopping", file=sys.stderr, flush=True)
    sys.exit(128 + signum)


def main() -> int:
    signal.signal(signal.SIGTERM, _stop)
    doc = json.loads(input_path().read_text())
    seconds = float(os.environ.get("FTC_STUB_SECONDS", "0"))
    step = doc["step"]
    if step == "prepare":
        time.sleep(seconds)
        write_summary(
            PrepareResult(
                ok=True,
                counts={"read": 120, "usable": 100, "train": 80, "eval": 10, "test": 10},
                dropped={"duplicate": 20},
                manifest_uri=f"s3://{doc['location']['bucket']}/{doc['location']['prefix']}/data/manifest.json",
                dataset_sha256=hashlib.sha256(json.dumps(doc["dataset"], sort_keys=True).encode()).hexdigest(),
                models=[
                    PreparedModel(
                        name=m["name"],
                        token_counts={"train": 8000 + len(m["name"]), "eval": 1000, "test": 1000},
                        memory=MemoryEstimate(
                            weights_gib=0.1, lora_gib=0.01, activations_gib=0.1, total_gib=0.21, available_gib=80, fits=True
                        ),
                    )
                    for m in doc["models"]
                ],
            )
        )
        return 0
    if step == "train":
        name = doc["model"]["name"]
        for i in range(1, 4):
            _progress(i, 3)
            time.sleep(seconds / 3)
        if name in os.environ.get("FTC_STUB_OOM", "").split(","):
            hog = b"\x01" * (4 * 2**30)  # written, so resident: far over any limit a test sets
            print(f"stub: {name} allocated {len(hog)} bytes", flush=True)
        if name in os.environ.get("FTC_STUB_FAIL", "").split(","):
            write_summary(TrainResult(ok=False, model=name, error=f"stub: {name} was told to fail"))
            return 1
        u = _unit(name)
        history = [
            LossPoint(step=s, train_loss=round(2.5 - s * (0.1 + u / 10), 4), eval_loss=round(2.6 - s * 0.08, 4))
            for s in (1, 2, 3)
        ]
        base = f"s3://{doc['location']['bucket']}/{doc['location']['prefix']}/models/{name}"
        from ftc_api.overfitting import overfitting_verdict

        write_summary(
            TrainResult(
                ok=True,
                model=name,
                train_seconds=round(10 + 20 * u, 2),
                tokens_per_second=round(1000 + 500 * u, 1),
                trained_tokens=8000,
                trainable_parameters=4096,
                adapted_modules=["q_proj", "v_proj"],
                final_train_loss=history[-1].train_loss,
                best_eval_loss=history[-1].eval_loss,
                best_step=3,
                final_eval_loss=history[-1].eval_loss,
                total_steps=3,
                overfitting=overfitting_verdict(history),
                adapter_uri=f"{base}/adapter",
                best_adapter_uri=f"{base}/adapter-best",
                metrics_uri=f"{base}/metrics.json",
            )
        )
        return 0
    if step == "generate":
        time.sleep(seconds)
        name = doc["model"]["model"]["name"]
        uri = f"s3://{doc['location']['bucket']}/{doc['location']['prefix']}/eval/{name}/predictions.jsonl"
        if name in os.environ.get("FTC_STUB_GENERATE_FAIL", "").split(","):
            write_summary(GenerateResult(ok=False, model=name, error=f"stub: {name} was told to fail in generation"))
            return 1
        write_summary(GenerateResult(ok=True, model=name, predictions_uri=uri, answers=10, seconds=seconds, devices="cpu"))
        return 0
    if step in ("evaluate", "score"):
        time.sleep(seconds)
        if os.environ.get(JUDGE_API_KEY_ENV) == REJECTED_KEY:  # as the real evaluator: a refused key is bad input
            write_summary(EvaluateResult(ok=False, error="stub: the judge endpoint answered 401 Unauthorized to the key"))
            return EXIT_BAD_INPUT
        judge_model = doc.get("evaluation", {}).get("judge", {}).get("model")
        if judge_model == UNKNOWN_JUDGE_MODEL:  # as OpenAI answers a model name it does not serve
            error = f"stub: the judge endpoint answered 404 to evaluation.judge.model {judge_model!r}: model not found"
            write_summary(EvaluateResult(ok=False, error=error))
            return EXIT_BAD_INPUT
        models = [m["model"]["name"] for m in doc["models"]]
        if os.environ.get(JUDGE_API_KEY_ENV) == DOWN_KEY:  # the judge unreachable for every item: no verdict
            write_summary(
                EvaluateResult(
                    ok=True,
                    models=[EvaluatedModelResult(model=m, checkpoint=doc.get("checkpoint", "best"), scores=[]) for m in models],
                    primary_metric="judge",
                    winner=INCONCLUSIVE,
                    judge_missing=10 * len(models),
                )
            )
            return 0
        means = {m: round(5 + 4 * _unit(m), 3) for m in models}
        winner = max(means, key=lambda m: means[m]) if len(models) > 1 else models[0]
        base = f"s3://{doc['location']['bucket']}/{doc['location']['prefix']}"
        write_summary(
            EvaluateResult(
                ok=True,
                models=[
                    EvaluatedModelResult(
                        model=m,
                        checkpoint=doc.get("checkpoint", "best"),
                        scores=[MetricScore(metric="judge", mean=means[m], ci_low=means[m] - 0.5, ci_high=means[m] + 0.5, n=10)],
                    )
                    for m in models
                ],
                primary_metric="judge",
                winner=winner,
                p_value=0.01,
                failed_models=doc.get("failedModels", {}),
                scores_uri=f"{base}/eval/scores.json",
                report_uri=f"{base}/report/index.html",
            )
        )
        return 0
    print(f"stub: unknown step {step!r}", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main())
