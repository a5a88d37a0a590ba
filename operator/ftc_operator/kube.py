"""Kubernetes I/O of the operator: read comparisons, Jobs and pods; create ConfigMaps and Jobs; write
status; record Events. The only module besides the handlers that imports the Kubernetes client.

Never reads a Secret: credentials reach the step pods through ``secretKeyRef`` only.
"""

from __future__ import annotations

import datetime as dt
import hashlib
import json
import logging
import os
import socket
from dataclasses import dataclass
from typing import Any, cast

from ftc_api.base import API_GROUP, API_VERSION, KIND, PLURAL
from kubernetes import client, config
from kubernetes.client.rest import ApiException

from . import metrics

log = logging.getLogger("ftc.operator.kube")
COMPONENT = "ftc-operator"
JOBSET_GROUP, JOBSET_VERSION, JOBSETS = "jobset.x-k8s.io", "v1alpha2", "jobsets"


class Conflict(Exception):
    """The object changed since it was read (HTTP 409 on update): read again and re-plan."""


def new_api_client(connections: int = 0) -> client.ApiClient:
    """An API client from the pod's ServiceAccount, else from $KUBECONFIG / ~/.kube/config, keeping up to
    `connections` connections open (0: the client's default, 5 per CPU): one per reconcile worker and watch."""
    try:
        config.load_incluster_config()
        api = client.ApiClient()
    except config.ConfigException:
        api = config.new_client_from_config(config_file=os.environ.get("KUBECONFIG"))
    if connections:
        api.configuration.connection_pool_maxsize = connections
        api.rest_client = type(api.rest_client)(api.configuration)  # the pool is sized when it is made
    return api


@dataclass(frozen=True)
class Created:
    """What `Kube.create` did: `created`, or not (already there); `blocked` says why the existing object is not
    this comparison's (None: it is, and it is used as is)."""

    created: bool
    blocked: str | None = None


def controller_ref(obj: dict[str, Any]) -> dict[str, Any] | None:
    """The ownerReference marked controller, if any."""
    refs = (obj.get("metadata") or {}).get("ownerReferences") or []
    return next((r for r in refs if r.get("controller")), None)


def foreign_owner(wanted: dict[str, Any], existing: dict[str, Any]) -> str | None:
    """None when `existing` has the same controller owner as `wanted`; else a message naming who holds the name."""
    mine, theirs = controller_ref(wanted), controller_ref(existing)
    if mine is not None and theirs is not None and mine.get("uid") is not None and mine.get("uid") == theirs.get("uid"):
        return None
    meta = existing.get("metadata") or {}
    where = f"{wanted['kind']} {meta.get('namespace')}/{meta.get('name')}"
    if theirs is None:
        return f"{where} exists and has no controller owner; delete it, or rename this comparison"
    holder = f"{theirs.get('kind')} {theirs.get('name')} (uid {theirs.get('uid')})"
    gone = " (being deleted)" if meta.get("deletionTimestamp") else ""
    return (
        f"{where}{gone} belongs to {holder}, not to this comparison; waiting for it to go (delete it, or rename this comparison)"
    )


def count(verb: str, resource: str) -> None:
    """One request to the API server, in ftc_api_requests_total."""
    metrics.API_REQUESTS.labels(verb=verb, resource=resource).inc()


class Kube:
    """Thin, synchronous wrapper over the API calls the operator makes (one shared ApiClient)."""

    def __init__(self, api: client.ApiClient):
        self.api = api
        self.core = client.CoreV1Api(api)
        self.batch = client.BatchV1Api(api)
        self.custom = client.CustomObjectsApi(api)
        self.instance = socket.gethostname()

    @staticmethod
    def _raw(resp: Any) -> Any:
        return json.loads(resp.data)

    # -------------------------------------------------------------------------------------- reads

    def get_comparison(self, namespace: str, name: str) -> dict[str, Any] | None:
        count("get", PLURAL)
        try:
            return cast(dict[str, Any], self.custom.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def list_comparisons(self, namespaces: list[str] | None = None) -> list[dict[str, Any]]:
        count("list", PLURAL)
        if not namespaces:
            return cast(dict[str, Any], self.custom.list_cluster_custom_object(API_GROUP, API_VERSION, PLURAL)).get("items", [])
        out: list[dict[str, Any]] = []
        for ns in namespaces:
            out += cast(dict[str, Any], self.custom.list_namespaced_custom_object(API_GROUP, API_VERSION, ns, PLURAL)).get(
                "items", []
            )
        return out

    def list_jobs(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        count("list", "jobs")
        resp = self.batch.list_namespaced_job(namespace, label_selector=selector, _preload_content=False)
        return self._raw(resp).get("items", [])

    def list_jobsets(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        count("list", JOBSETS)
        resp = self.custom.list_namespaced_custom_object(
            JOBSET_GROUP, JOBSET_VERSION, namespace, JOBSETS, label_selector=selector, _preload_content=False
        )
        return self._raw(resp).get("items", [])

    def jobsets_served(self) -> bool:
        """Whether the API server serves JobSets (jobset.x-k8s.io/v1alpha2: JobSet's CRD is installed)."""
        count("get", "apiresources")
        try:
            resources = self.custom.get_api_resources(JOBSET_GROUP, JOBSET_VERSION)
        except ApiException as e:
            if e.status == 404:
                return False
            raise
        return any(r.name == JOBSETS for r in (resources.resources if resources else None) or [])

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        count("list", "pods")
        resp = self.core.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False)
        return self._raw(resp).get("items", [])

    def workloads_version(self) -> str | None:
        """The version of Kueue's API (kueue.x-k8s.io) whose Workloads the API server serves, newest first; None
        without Kueue. Discovery is open to every authenticated client: no RBAC needed."""
        from .workloads import KUEUE_GROUP, WORKLOAD_VERSIONS, WORKLOADS

        for version in WORKLOAD_VERSIONS:
            count("get", "apiresources")
            try:
                resources = self.custom.get_api_resources(KUEUE_GROUP, version)
            except ApiException as e:
                if e.status == 404:
                    continue
                raise
            if any(r.name == WORKLOADS for r in (resources.resources if resources else None) or []):
                return version
        return None

    def list_workloads(self, namespace: str, version: str) -> list[dict[str, Any]]:
        """Kueue's Workloads in a namespace (they carry no ftc label: the caller matches their owners)."""
        from .workloads import KUEUE_GROUP, WORKLOADS

        count("list", WORKLOADS)
        resp = self.custom.list_namespaced_custom_object(KUEUE_GROUP, version, namespace, WORKLOADS, _preload_content=False)
        return self._raw(resp).get("items", [])

    # -------------------------------------------------------------------------------------- writes

    def create(self, obj: dict[str, Any]) -> Created:
        """Create a ConfigMap, Job or JobSet. On 409 the existing object is read: it is used only when its controller
        owner is the same object (UID) as `obj`'s; otherwise the result names who holds the name."""
        ns, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        try:
            count("create", obj["kind"].lower() + "s")
            if obj["kind"] == "ConfigMap":
                self.core.create_namespaced_config_map(ns, obj, _preload_content=False)  # type: ignore[arg-type]
            elif obj["kind"] == "Job":
                self.batch.create_namespaced_job(ns, obj, _preload_content=False)  # type: ignore[arg-type]
            elif obj["kind"] == "JobSet":
                self.custom.create_namespaced_custom_object(
                    JOBSET_GROUP, JOBSET_VERSION, ns, JOBSETS, obj, _preload_content=False
                )
            else:
                raise ValueError(f"cannot create {obj['kind']}")
        except ApiException as e:
            if e.status != 409:
                raise
            count("get", obj["kind"].lower() + "s")
            try:
                if obj["kind"] == "JobSet":
                    resp = self.custom.get_namespaced_custom_object(
                        JOBSET_GROUP, JOBSET_VERSION, ns, JOBSETS, name, _preload_content=False
                    )
                else:
                    read = self.core.read_namespaced_config_map if obj["kind"] == "ConfigMap" else self.batch.read_namespaced_job
                    resp = read(name, ns, _preload_content=False)
                existing = self._raw(resp)
            except ApiException as gone:
                if gone.status == 404:  # deleted meanwhile: the next pass creates it
                    return Created(False, f"{obj['kind']} {ns}/{name} was being deleted; retrying")
                raise
            return Created(False, foreign_owner(obj, existing))
        return Created(True)

    def delete_job(self, namespace: str, name: str) -> None:
        """Delete a Job and, in the background, its pods (a retry); one already gone is fine."""
        count("delete", "jobs")
        try:
            self.batch.delete_namespaced_job(name, namespace, propagation_policy="Background", _preload_content=False)
        except ApiException as e:
            if e.status != 404:
                raise

    def delete_jobset(self, namespace: str, name: str) -> None:
        """Delete a JobSet and, in the background, its Jobs and pods (a retry); one already gone is fine."""
        count("delete", JOBSETS)
        try:
            self.custom.delete_namespaced_custom_object(
                JOBSET_GROUP, JOBSET_VERSION, namespace, JOBSETS, name, propagation_policy="Background", _preload_content=False
            )
        except ApiException as e:
            if e.status != 404:
                raise

    def replace_status(self, obj: dict[str, Any], status: dict[str, Any]) -> dict[str, Any]:
        """PUT the status subresource with the read resourceVersion (optimistic concurrency)."""
        meta = obj["metadata"]
        body = {
            "apiVersion": f"{API_GROUP}/{API_VERSION}",
            "kind": KIND,
            "metadata": {"name": meta["name"], "namespace": meta["namespace"], "resourceVersion": meta["resourceVersion"]},
            "spec": obj.get("spec"),
            "status": status,
        }
        count("update", PLURAL + "/status")
        try:
            return cast(
                dict[str, Any],
                self.custom.replace_namespaced_custom_object_status(
                    API_GROUP, API_VERSION, meta["namespace"], PLURAL, meta["name"], body
                ),
            )
        except ApiException as e:
            if e.status == 409:
                raise Conflict(f"{meta['namespace']}/{meta['name']} changed; re-planning") from e
            raise

    def event(self, obj: dict[str, Any], type_: str, reason: str, message: str, now: dt.datetime) -> None:
        """Record a core/v1 Event on the comparison (best effort: failures are logged, not raised).

        Aggregated as kubectl shows them: the same type, reason and message on the same comparison is one
        Event (named by their hash) whose `count` and `lastTimestamp` go up, not a new object each time."""
        meta = obj["metadata"]
        stamp = now.astimezone(dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
        key = hashlib.sha256(f"{meta['uid']}|{type_}|{reason}|{message}".encode()).hexdigest()[:16]
        name = f"{meta['name'][:200]}.{key}"
        body = {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"name": name, "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": f"{API_GROUP}/{API_VERSION}",
                "kind": KIND,
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "reason": reason[:128],
            "message": message[:1024],
            "type": type_,
            "source": {"component": COMPONENT},
            "reportingComponent": COMPONENT,
            "reportingInstance": self.instance[:128],
            "firstTimestamp": stamp,
            "lastTimestamp": stamp,
            "count": 1,
        }
        try:
            try:
                count("create", "events")
                self.core.create_namespaced_event(meta["namespace"], body, _preload_content=False)  # type: ignore[arg-type]
            except ApiException as e:
                if e.status != 409:
                    raise
                count("get", "events")
                count("patch", "events")
                seen = self.core.read_namespaced_event(name, meta["namespace"])
                patch = {"count": (seen.count or 1) + 1, "lastTimestamp": stamp}
                self.core.patch_namespaced_event(name, meta["namespace"], patch)
        except ApiException as e:
            log.warning("could not record event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], e.reason)
