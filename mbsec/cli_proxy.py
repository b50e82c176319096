"""``mbsec serve --config FILE`` and ``mbsec config check FILE``.

Both print one line per configuration problem (``FILE: key: what is wrong``) and exit 1; a
traceback is never the answer to a user mistake. ``serve`` handles SIGHUP (reload; a failed
reload keeps running with the old state) and SIGTERM/SIGINT (stop accepting, drain, exit 0).
Under systemd (``$NOTIFY_SOCKET``) it speaks the notify protocol, watchdog included
(:mod:`mbsec.sdnotify`).
"""

from __future__ import annotations

import argparse
import gc
import signal
import socket
import sys
from pathlib import Path

import trio

from mbsec.admin import AdminServer, AdminSocketError
from mbsec.audit import check_sinks, close_logger, make_logger
from mbsec.config_checks import expired_crl_problems, no_crl_warnings, server_usage_problems
from mbsec.metrics import Metrics
from mbsec.nodestate import NodeState, NodeStateError
from mbsec.sdnotify import Notifier, PlaneProbe, keep_watchdog, listen_sockets
from mbsec.settings import DEFAULT_PORT, Settings, SettingsError, load_settings, parse_hostport
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


def _which_address(settings: Settings) -> str:
    """The configured addresses that cannot be bound now (a port clash names the one taken,
    not every address); all of them when none fails a second time."""
    import socket

    named = [(a, parse_hostport(a, default_port=DEFAULT_PORT)) for a in settings.listen]
    if settings.metrics.listen:
        named.append((f"metrics.listen {settings.metrics.listen}",
                       parse_hostport(settings.metrics.listen)))
    taken = []
    for label, (host, port) in named:
        if port == 0:
            continue
        try:
            infos = socket.getaddrinfo(host or None, port, type=socket.SOCK_STREAM,
                                       flags=socket.AI_PASSIVE)
        except OSError:
            continue
        for family, kind, proto, _, sockaddr in infos:
            with socket.socket(family, kind, proto) as probe:
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                if family == socket.AF_INET6:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1)
                try:
                    probe.bind(sockaddr)
                except OSError:
                    taken.append(label)
                    break
    return ", ".join(taken) if taken else "; ".join(label for label, _ in named)


def _load(path: str) -> tuple[Settings | None, list[str]]:
    try:
        return load_settings(path), []
    except SettingsError as exc:
        return None, exc.problems


def serve_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mbsec serve",
        description="Run the Modbus/TCP Security proxy. Signals: SIGHUP reloads the "
        "configuration, policy, certificates and CRLs (a failed reload keeps the running "
        "state); SIGTERM or SIGINT stop accepting, drain the open connections for "
        "limits.drain_timeout, and exit 0.",
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
    try:  # systemd socket activation (deploy/systemd/mbsec.socket) replaces `listen`
        activated = listen_sockets()
    except (OSError, ValueError) as exc:
        return _problems([f"{args.config}: {exc}"])
    worker = worker_from_environment()
    if worker is None and settings.workers > 1 and activated:
        # every worker accepts on the sockets systemd bound (the kernel wakes one per connection)
        try:
            build_state(settings)
            metrics_socks = bind_metrics_sockets(settings, settings.workers)
        except StartupError as exc:
            return _problems([f"{args.config}: {line}" for line in exc.problems])
        except OSError as exc:
            where = f"metrics.listen {settings.metrics.listen}"
            return _problems([f"{args.config}: cannot listen ({where}): {exc.strerror or exc}"])
        return run_workers(args.config, [activated] * settings.workers, metrics_socks)
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
        try:  # the node state: kept freezes, fresh rate buckets (docs/config.md, [admin])
            NodeState.open(settings.admin.state_file, reset_buckets=True).close()
        except NodeStateError as exc:
            close_all(per_worker)
            close_all(metrics_socks)
            return _problems([f"{args.config}: {exc}"])
        return run_workers(args.config, per_worker, metrics_socks)
    try:
        node = NodeState.open(settings.admin.state_file, reset_buckets=worker is None)
    except NodeStateError as exc:
        return _problems([f"{args.config}: {exc}"])
    try:
        log = make_logger(settings.logging)
    except (OSError, ValueError) as exc:
        return _problems([f"{args.config}: logging: {exc}"])
    metrics = Metrics()
    try:
        proxy = Proxy(settings, log=log, metrics=metrics, config_path=Path(args.config),
                      listen_sockets=worker.listen if worker is not None else activated or None,
                      metrics_sockets=worker.metrics if worker is not None else None,
                      node=node, worker=worker.index if worker is not None else 0,
                      workers=worker.count if worker is not None else 1)
    except StartupError as exc:
        close_logger(log)
        return _problems([f"{args.config}: {line}" for line in exc.problems])
    admin = None
    admin_socks: list[socket.socket] = []
    if settings.admin.socket is not None:
        admin = AdminServer(proxy, settings.admin.socket,
                            index=worker.index if worker is not None else 0,
                            count=worker.count if worker is not None else 1)
        try:
            admin_socks = admin.bind(settings.admin.mode, settings.admin.socket_group)
        except AdminSocketError as exc:
            close_logger(log)
            return _problems([f"{args.config}: {exc}"])

    notifier = Notifier.from_environment()  # systemd Type=notify (mbsec/sdnotify.py)

    def status() -> str:
        where = ", ".join(f"{h}:{p}" for h, p in proxy.addresses)
        return f"serving {where} (configuration generation {proxy.state.generation})"

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGHUP, signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:

                async def watch() -> None:
                    async for sig in signals:
                        if sig == signal.SIGHUP:
                            notifier.reloading()
                            ok = proxy.reload()
                            notifier.ready(status() if ok else
                                           f"{status()}; the last reload failed (see the log)")
                        else:
                            notifier.stopping()
                            proxy.request_shutdown()
                            return

                async def serve(task_status: trio.TaskStatus[list[tuple[str, int]]]) -> None:
                    await proxy.serve(task_status=task_status)
                    nursery.cancel_scope.cancel()  # the proxy may also stop on its own (fatal)

                nursery.start_soon(watch)
                if admin is not None:
                    await nursery.start(admin.serve, admin_socks)
                await nursery.start(serve)
                notifier.ready(status())
                nursery.start_soon(lambda: keep_watchdog(
                    notifier, PlaneProbe(proxy.data_plane).answers, serving_status=status))

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
        return _problems([f"{args.config}: cannot listen ({_which_address(settings)}): "
                          f"{oserr.strerror or oserr}"])
    notifier.stopping("stopped (data plane failed)" if proxy.failed else "stopped")
    notifier.close()
    close_logger(log)
    return 1 if proxy.failed else 0


def key_mode_warning(path: Path) -> str | None:
    """One line when the server's private key is readable by its group or by others: anyone who
    reads it can impersonate the proxy to every HMI (the fix is on the same line)."""
    try:
        mode = path.stat().st_mode & 0o777
    except OSError:
        return None  # missing or unreadable: build_state already said so
    who = [w for w, bits in (("group", 0o040), ("others", 0o004)) if mode & bits]
    if not who:
        return None
    return (f"tls.key: {path} is readable by {' and '.join(who)} (mode {mode:04o}); "
            f"fix: chmod 600 {path} (owner: the user mbsec runs as)")


def config_main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mbsec config",
        description="Validate a configuration: TOML keys, TLS material, CRLs, the policy, and "
        "policy targets against [upstreams]. Nothing is served.",
    )
    sub = p.add_subparsers(dest="action", required=True)
    c = sub.add_parser(
        "check", help="validate FILE and exit (0 ok, 1 problems)",
        description="Load everything `mbsec serve` would (TOML keys, TLS material, CRLs, the "
        "policy) and cross-check the policy's targets against [upstreams]; refuse what cannot "
        "work (a server certificate without serverAuth, an expired CRL). Prints one line per "
        "problem and exits 1, or 'ok' and exits 0; warnings (CRL expiring soon, no CRL, "
        "chain without its root) go to stderr. Nothing is served.")
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
    if not problems:
        problems.extend(f"{args.file}: {line}" for line in
                        server_usage_problems(settings.tls.cert)
                        + expired_crl_problems(state.tls.crls))
    if problems:
        return _problems(problems)
    for line in chain_warnings(settings.tls.cert) + no_crl_warnings(settings.tls):
        print(f"warning: {line}", file=sys.stderr)
    key_warning = key_mode_warning(Path(settings.tls.key))
    if key_warning is not None:
        print(f"warning: {key_warning}", file=sys.stderr)
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
