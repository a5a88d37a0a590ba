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
from typing import Any, cast

from ftc_api.base import API_GROUP, API_VERSION, KIND, PLURAL
from kubernetes import client, config
from kubernetes.client.rest import ApiException

log = logging.getLogger("ftc.operator.kube")
COMPONENT = "ftc-operator"


class Conflict(Exception):
    """The object changed since it was read (HTTP 409 on update): read again and re-plan."""


def new_api_client() -> client.ApiClient:
    """An API client from the pod's ServiceAccount, else from $KUBECONFIG / ~/.kube/config."""
    try:
        config.load_incluster_config()
        return client.ApiClient()
    except config.ConfigException:
        return config.new_client_from_config(config_file=os.environ.get("KUBECONFIG"))


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
        try:
            return cast(dict[str, Any], self.custom.get_namespaced_custom_object(API_GROUP, API_VERSION, namespace, PLURAL, name))
        except ApiException as e:
            if e.status == 404:
                return None
            raise

    def list_comparisons(self, namespaces: list[str] | None = None) -> list[dict[str, Any]]:
        if not namespaces:
            return cast(dict[str, Any], self.custom.list_cluster_custom_object(API_GROUP, API_VERSION, PLURAL)).get("items", [])
        out: list[dict[str, Any]] = []
        for ns in namespaces:
            out += cast(dict[str, Any], self.custom.list_namespaced_custom_object(API_GROUP, API_VERSION, ns, PLURAL)).get(
                "items", []
            )
        return out

    def list_jobs(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        resp = self.batch.list_namespaced_job(namespace, label_selector=selector, _preload_content=False)
        return self._raw(resp).get("items", [])

    def list_pods(self, namespace: str, selector: str) -> list[dict[str, Any]]:
        resp = self.core.list_namespaced_pod(namespace, label_selector=selector, _preload_content=False)
        return self._raw(resp).get("items", [])

    # -------------------------------------------------------------------------------------- writes

    def create(self, obj: dict[str, Any]) -> bool:
        """Create a ConfigMap or Job; False when it already exists (409 is fine: names are deterministic)."""
        ns = obj["metadata"]["namespace"]
        try:
            if obj["kind"] == "ConfigMap":
                self.core.create_namespaced_config_map(ns, obj, _preload_content=False)  # type: ignore[arg-type]
            elif obj["kind"] == "Job":
                self.batch.create_namespaced_job(ns, obj, _preload_content=False)  # type: ignore[arg-type]
            else:
                raise ValueError(f"cannot create {obj['kind']}")
        except ApiException as e:
            if e.status == 409:
                return False
            raise
        return True

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
                self.core.create_namespaced_event(meta["namespace"], body, _preload_content=False)  # type: ignore[arg-type]
            except ApiException as e:
                if e.status != 409:
                    raise
                seen = self.core.read_namespaced_event(name, meta["namespace"])
                patch = {"count": (seen.count or 1) + 1, "lastTimestamp": stamp}
                self.core.patch_namespaced_event(name, meta["namespace"], patch)
        except ApiException as e:
            log.warning("could not record event %s on %s/%s: %s", reason, meta["namespace"], meta["name"], e.reason)
