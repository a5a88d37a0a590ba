"""`ftc-operator`: run the FineTuneComparison operator.

ftc-operator --config /etc/ftc-operator/config.yaml --all-namespaces
ftc-operator -n team-a -n team-b --liveness http://0.0.0.0:8080/healthz
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from .config import CONFIG_ENV, load_config


def make_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="ftc-operator", description="Run the FineTuneComparison operator.")
    p.add_argument("--config", default=os.environ.get(CONFIG_ENV), help=f"YAML configuration (default ${CONFIG_ENV}).")
    scope = p.add_mutually_exclusive_group()
    scope.add_argument("-n", "--namespace", action="append", default=[], help="watch this namespace (repeatable).")
    scope.add_argument("-A", "--all-namespaces", action="store_true", help="watch every namespace (the default).")
    p.add_argument(
        "--liveness",
        default=os.environ.get("FTC_LIVENESS", "http://0.0.0.0:8080/healthz"),
        help="kopf liveness/readiness endpoint URL ('' disables it).",
    )
    p.add_argument(
        "--leader-elect",
        action="store_true",
        help="with several replicas: only the holder of a coordination.k8s.io Lease reconciles (the others wait).",
    )
    p.add_argument("--lease-name", default="ftc-operator", help="the Lease's name (in $POD_NAMESPACE).")
    p.add_argument("--metrics-port", type=int, default=None, help="Prometheus port (overrides the config; 0 disables).")
    p.add_argument("--verbose", "-v", action="store_true", help="debug logging.")
    return p


def lease_settings(args: argparse.Namespace) -> object | None:
    """The Lease to campaign for with --leader-elect (None: this replica reconciles at once)."""
    if not args.leader_elect:
        return None
    import socket

    from .leader import LeaseSettings

    namespace = os.environ.get("POD_NAMESPACE")
    if not namespace:
        raise SystemExit("--leader-elect needs $POD_NAMESPACE (the chart sets it from the downward API)")
    return LeaseSettings(name=args.lease_name, namespace=namespace, identity=os.environ.get("POD_NAME") or socket.gethostname())


def main(argv: list[str] | None = None) -> int:
    args = make_parser().parse_args(argv)
    config = load_config(args.config)
    if args.metrics_port is not None:
        config = config.model_copy(update={"metrics_port": args.metrics_port})
    import kopf

    from . import handlers  # noqa: F401  (registers the handlers)

    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    if not args.verbose:
        logging.getLogger("kopf").setLevel(logging.WARNING)
        logging.getLogger("kopf.activities.startup").setLevel(logging.INFO)
    kopf.run(
        standalone=True,
        clusterwide=not args.namespace,
        namespaces=args.namespace,
        liveness_endpoint=args.liveness or None,
        memo=kopf.Memo(config=config, namespaces=args.namespace, lease=lease_settings(args)),
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
