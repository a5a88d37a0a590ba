"""Prometheus metrics of the operator (served on /metrics by prometheus-client)."""

from __future__ import annotations

from prometheus_client import Counter, Gauge, Histogram, start_http_server

COMPARISONS = Gauge("ftc_comparisons", "FineTuneComparisons by phase, as of the last resync.", ["phase"])
RECONCILE_SECONDS = Histogram(
    "ftc_reconcile_duration_seconds",
    "Time to reconcile one comparison (read, plan, create, write status).",
    buckets=(0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30),
)
JOBS_CREATED = Counter("ftc_jobs_created_total", "Step Jobs created (409 AlreadyExists not counted).", ["step"])
STATUS_WRITES = Counter("ftc_status_writes_total", "Status updates written (only when the status changed).")
STATUS_WRITES_HELD = Counter(
    "ftc_status_writes_held_total", "Status updates held back because only live progress changed (progressWriteSeconds)."
)
RECONCILE_ERRORS = Counter("ftc_reconcile_errors_total", "Reconciles that raised (retried with backoff).", ["kind"])
LEADER = Gauge("ftc_leader", "1 while this replica reconciles (holds the Lease, or runs without leader election).")
QUEUE_DEPTH = Gauge("ftc_queue_depth", "Comparisons waiting to be reconciled.")
WATCH_EVENTS = Counter(
    "ftc_watch_events_total", "Watch events the informers received (only objects ftc made are selected).", ["resource"]
)
API_REQUESTS = Counter(
    "ftc_api_requests_total",
    "Requests the operator made to the API server (kopf's own comparison watch not included).",
    ["verb", "resource"],
)


def serve(port: int, addr: str = "0.0.0.0") -> None:
    """Serve /metrics on `port` in a daemon thread (0 disables it)."""
    if port:
        start_http_server(port, addr=addr)
