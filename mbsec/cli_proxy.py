"""``mbsec serve --config FILE`` and ``mbsec config check FILE``.

Both print one line per configuration problem (``FILE: key: what is wrong``) and exit 1; a
traceback is never the answer to a user mistake. ``serve`` handles SIGHUP (reload; a failed
reload keeps running with the old state) and SIGTERM/SIGINT (stop accepting, drain, exit 0).
"""

from __future__ import annotations

import argparse
import gc
import signal
import sys
from pathlib import Path

import trio

from mbsec.audit import check_sinks, close_logger, make_logger
from mbsec.metrics import Metrics
from mbsec.settings import Settings, SettingsError, load_settings
from mbsec.tls import chain_warnings, crl_warnings


def _problems(lines: list[str]) -> int:
    for line in lines:
        print(f"error: {line}", file=sys.stderr)
    return 1


def _first_oserror(exc: BaseException) -> OSError | None:
    """Binding a port fails inside trio nurseries, so the OSError may come wrapped in groups."""
    if isinstance(exc, OSError):
        return exc
    if isinstance(exc, BaseExceptionGroup):
        for sub in exc.exceptions:
            found = _first_oserror(sub)
            if found is not None:
                return found
    return None


def _load(path: str) -> tuple[Settings | None, list[str]]:
    try:
        return load_settings(path), []
    except SettingsError as exc:
        return None, exc.problems


def serve_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mbsec serve", description="Run the Modbus/TCP Security proxy."
    )
    p.add_argument("--config", "-c", required=True, metavar="FILE", help="TOML configuration")
    args = p.parse_args(argv)
    settings, problems = _load(args.config)
    if settings is None:
        return _problems(problems)
    from mbsec.server import (
        Proxy,
        StartupError,
        bind_metrics_sockets,
        bind_worker_sockets,
        build_state,
        close_all,
        run_workers,
        worker_from_environment,
    )

    sink_problems = check_sinks(settings.logging)
    if sink_problems:
        return _problems([f"{args.config}: {line}" for line in sink_problems])
    worker = worker_from_environment()
    if worker is None and settings.workers > 1:
        # main process of a worker set: check everything, bind, then start the workers
        try:
            build_state(settings)
        except StartupError as exc:
            return _problems([f"{args.config}: {line}" for line in exc.problems])
        try:
            per_worker = bind_worker_sockets(settings, settings.workers)
        except OSError as exc:
            where = ", ".join(settings.listen)
            return _problems([f"{args.config}: cannot listen ({where}): {exc.strerror or exc}"])
        try:
            metrics_socks = bind_metrics_sockets(settings, settings.workers)
        except OSError as exc:
            close_all(per_worker)
            where = f"metrics.listen {settings.metrics.listen}"
            if settings.metrics_address(1) != settings.metrics_address(0):  # not port 0
                where += f" and the next {settings.workers - 1} port(s), one per worker"
            return _problems([f"{args.config}: cannot listen ({where}): {exc.strerror or exc}"])
        return run_workers(args.config, per_worker, metrics_socks)
    try:
        log = make_logger(settings.logging)
    except (OSError, ValueError) as exc:
        return _problems([f"{args.config}: logging: {exc}"])
    metrics = Metrics()
    try:
        proxy = Proxy(settings, log=log, metrics=metrics, config_path=Path(args.config),
                      listen_sockets=worker.listen if worker is not None else None,
                      metrics_sockets=worker.metrics if worker is not None else None)
    except StartupError as exc:
        close_logger(log)
        return _problems([f"{args.config}: {line}" for line in exc.problems])

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    async for sig in signals:
                        if sig == signal.SIGHUP:
                            proxy.reload()
                        else:
                            proxy.request_shutdown()
                            return

                nursery.start_soon(watch)
                await proxy.serve()
                nursery.cancel_scope.cancel()  # the proxy may also stop on its own (fatal)

    try:
        # everything built so far (modules, settings, policy, contexts) lives until exit: out of
        # the collector's way, so the collections that per-connection garbage triggers do not
        # walk it again each time (a measurable share of a handshake's CPU)
        gc.freeze()
        trio.run(run)
    except (OSError, BaseExceptionGroup) as exc:
        oserr = _first_oserror(exc)
        if oserr is None:
            raise
        close_logger(log)
        where = ", ".join(settings.listen) + (
            f"; metrics.listen {settings.metrics.listen}" if settings.metrics.listen else "")
        return _problems([f"{args.config}: cannot listen ({where}): {oserr.strerror or oserr}"])
    close_logger(log)
    return 1 if proxy.failed else 0


def config_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mbsec config",
        description="Validate a configuration: TOML keys, TLS material, CRLs, the policy, and "
        "policy targets against [upstreams]. Nothing is served.",
    )
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser("check", help="validate FILE and exit (0 ok, 1 problems)")
    c.add_argument("file", metavar="FILE", help="the TOML configuration (docs/config.md)")
    args = p.parse_args(argv)
    settings, problems = _load(args.file)
    if settings is None:
        return _problems(problems)
    from mbsec.server import StartupError, build_state

    problems = []
    try:
        state = build_state(settings)
    except StartupError as exc:
        problems = [f"{args.file}: {line}" for line in exc.problems]
    problems.extend(f"{args.file}: {line}" for line in check_sinks(settings.logging))
    if problems:
        return _problems(problems)
    for line in chain_warnings(settings.tls.cert):
        print(f"warning: {line}", file=sys.stderr)
    if not state.tls.session_cache_off:
        print("warning: tls: OpenSSL's session cache could not be turned off on this Python "
              "build; a client that resumes a TLS session is refused (session_resumed)",
              file=sys.stderr)
    for line in crl_warnings(state.tls.crls, warn_days=settings.tls.crl_warn_days):
        print(f"warning: {line}", file=sys.stderr)
    units = sum(len(u.unit_ids) for u in settings.upstreams.values())
    print(
        f"{args.file}: ok (listen {', '.join(settings.listen)}; {len(settings.upstreams)} "
        f"upstream(s), {units} unit id(s); policy {settings.policy})"
    )
    return 0
