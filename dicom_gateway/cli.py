"""`dicom-gateway` command: run | health | sweep.

Settings come from `TRIAGE_*` environment variables; the few flags here override them
for convenience (port, spool) and are turned into the same frozen settings object.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import queue
import signal
import sys
from typing import Any, Sequence

from pydantic import ValidationError
from pydantic_settings import SettingsError

from dicom_gateway import logs
from dicom_gateway.config import GatewaySettings, StartupError, ae_title_argument, load_settings
from worker.arguments import CENTURY_SECONDS, number_in
from worker.config import WorkerSettings, invalid_settings_message, setting_names, unread_variables

log = logging.getLogger("dicom_gateway.cli")


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="dicom-gateway", description="DICOM C-STORE/C-ECHO gateway for pneumonia triage")
    parser.add_argument("--port", type=int, help="override TRIAGE_GATEWAY_PORT")
    parser.add_argument("--spool-dir", help="override TRIAGE_SPOOL_DIR")
    sub = parser.add_subparsers(dest="command", required=True)
    run = sub.add_parser("run", help="start the listener (foreground; SIGTERM/SIGINT stop it)")
    run.add_argument("--http-port", type=int, help="serve /healthz /readyz /status /metrics here (TRIAGE_GATEWAY_HTTP_PORT)")
    health = sub.add_parser("health", help="C-ECHO the listener, check broker, spool and disk; exit 1 if unhealthy")
    health.add_argument("--host", default=None, help="address of the listener (default: TRIAGE_GATEWAY_BIND, "
                        "or 127.0.0.1 when that is 0.0.0.0 or ::)")
    health.add_argument("--calling-ae", type=ae_title_argument, default=None, help="calling AE for the C-ECHO (must be allowed)")
    sweep = sub.add_parser("sweep", help="publish pending spool instances once (use while the gateway is stopped)")
    sweep.add_argument("--min-age", type=number_in(0, CENTURY_SECONDS, "seconds"), default=0.0, help="only instances older than this many seconds")
    return parser


def _settings(args: argparse.Namespace) -> GatewaySettings:
    overrides: dict[str, Any] = {}
    if args.port is not None:
        overrides["gateway_port"] = args.port
    if args.spool_dir is not None:
        overrides["spool_dir"] = args.spool_dir
    if getattr(args, "http_port", None) is not None:
        overrides["gateway_http_port"] = args.http_port
    return load_settings(**overrides)


def cmd_run(settings: GatewaySettings) -> int:
    """Run until SIGTERM/SIGINT; exit code 0 on a clean stop."""
    from dicom_gateway.service import Gateway
    from worker.contract import quiet_pydicom

    quiet_pydicom()  # a malformed element's warning would quote its value outside the JSON log
    gateway = Gateway(settings)
    try:
        gateway.start()
    except Exception as exc:  # a taken port, an unreadable certificate...: one log line, not a traceback
        # a StartupError already says which setting and value, and the underlying error's class
        log.error("cannot start", extra={"error": str(exc) if isinstance(exc, StartupError) else f"{type(exc).__name__}: {exc}"})
        return 2
    wait_for_stop_signal()
    gateway.stop()
    return 0


def wait_for_stop_signal() -> int:
    """Block until SIGTERM or SIGINT and return its number.

    The handler only puts into a `queue.SimpleQueue`, whose put is documented as reentrant. A handler
    that set a `threading.Event` deadlocked when a second signal came while the main thread, waking from
    the first, held the event's lock (`deploy/run_local.sh` and supervisors repeat their SIGTERM): the
    gateway never stopped. Signals after the first are ignored; the stop is already under way.
    """
    received: queue.SimpleQueue[int] = queue.SimpleQueue()
    for signum in (signal.SIGTERM, signal.SIGINT):
        signal.signal(signum, lambda number, _frame: received.put(number))
    return received.get()


def cmd_health(settings: GatewaySettings, host: str | None, calling_ae: str | None) -> int:
    from dicom_gateway import health

    report = health.check(settings, host, calling_ae=calling_ae or health.HEALTH_CALLING_AE)
    print(json.dumps(report, indent=2))
    return 0 if report["healthy"] else 1


def cmd_sweep(settings: GatewaySettings, min_age: float) -> int:
    """One-shot outbox publish (operators: after fixing a broker outage with the gateway down)."""
    from dicom_gateway.queue import Outbox, TaskPublisher
    from dicom_gateway.spool import Spool

    spool = Spool(settings.spool_dir)
    if not spool.pending.is_dir():  # a typo or another working directory: "nothing to send" would be false comfort
        print(f"dicom-gateway sweep: no spool at {spool.root} (no pending/ folder): set TRIAGE_SPOOL_DIR or "
              "--spool-dir to the gateway's", file=sys.stderr)
        return 2
    publisher = TaskPublisher(settings)
    try:
        outbox = Outbox(spool, publisher, min_age, settings.gateway_requeue_after_seconds)
        counts = outbox.sweep(min_age_s=min_age)
    finally:
        publisher.close()
    print(json.dumps(counts))
    return 0 if counts["failed"] == 0 else 1


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    try:
        settings = _settings(args)
    except (ValidationError, SettingsError) as exc:
        print(invalid_settings_message("dicom-gateway", exc), file=sys.stderr)
        return 2
    logs.configure(settings.gateway_log_level)
    for warning in unread_variables(os.environ, setting_names(GatewaySettings) | setting_names(WorkerSettings),
                                    gateway=True):
        log.warning(warning)
    if args.command == "run":
        return cmd_run(settings)
    if args.command == "health":
        return cmd_health(settings, args.host, args.calling_ae)
    return cmd_sweep(settings, args.min_age)


if __name__ == "__main__":
    sys.exit(main())
