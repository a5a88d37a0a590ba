"""Leader election over a coordination.k8s.io Lease, so that of several operator replicas one reconciles.

The kubernetes client's LeaderElection runs in a daemon thread: a follower retries every `retry` seconds;
whoever holds the Lease renews it, and a replica that stops renewing (killed, partitioned) loses it after
`duration` seconds, when a follower takes over. A leader that fails to renew exits the process (as
controller-runtime does), so two replicas never reconcile at once; the Deployment restarts it as a follower.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger("ftc.operator.leader")


@dataclass(frozen=True)
class LeaseSettings:
    """Where the Lease lives and its timing (controller-runtime's defaults: 15 s, 10 s, 2 s)."""

    name: str
    namespace: str
    identity: str
    duration: int = 15  # whole seconds: the Lease's leaseDurationSeconds
    renew_deadline: int = 10
    retry: int = 2


def elect(
    api: object, settings: LeaseSettings, on_leading: Callable[[], object], on_lost: Callable[[], object] | None = None
) -> threading.Thread:
    """Start campaigning in a daemon thread; `on_leading` runs once this replica holds the Lease."""
    from kubernetes import client
    from kubernetes.leaderelection import electionconfig, leaderelection
    from kubernetes.leaderelection.resourcelock.leaselock import LeaseLock

    lock = LeaseLock(settings.name, settings.namespace, settings.identity)
    lock.api_instance = client.CoordinationV1Api(api)  # the operator's client, not the global default

    def lost() -> None:
        log.error("lost the Lease %s/%s: exiting so that one replica reconciles at a time", settings.namespace, settings.name)
        if on_lost is not None:
            on_lost()
        os._exit(1)

    def leading() -> None:
        log.info("%s holds the Lease %s/%s: reconciling", settings.identity, settings.namespace, settings.name)
        on_leading()

    config = electionconfig.Config(
        lock,
        lease_duration=settings.duration,
        renew_deadline=settings.renew_deadline,
        retry_period=settings.retry,
        onstarted_leading=leading,
        onstopped_leading=lost,
    )
    election = leaderelection.LeaderElection(config)

    def campaign() -> None:  # a campaign that dies must not leave a replica that neither leads nor follows
        try:
            election.run()
        except Exception:
            log.exception("leader election failed: exiting")
            os._exit(1)

    thread = threading.Thread(target=campaign, name="ftc-leader-election", daemon=True)
    thread.start()
    log.info("%s campaigns for the Lease %s/%s", settings.identity, settings.namespace, settings.name)
    return thread
