"""``mbsec connect``: the client side, for masters that speak plain Modbus/TCP only.

On the master's host it listens for plain Modbus/TCP (loopback unless told otherwise) and
carries each accepted connection over Modbus/TCP Security (TLS 1.2+, the master's certificate)
to the DMZ mbsec, after verifying the server by name or by a pinned SHA-256 fingerprint. One
TLS connection per plain connection: the master's connection *is* the session mbsec serve
sees, so its policy, limits and events apply per master connection, as for a TLS-capable
master. Anchor: ghostunnel's client mode (``ghostunnel client --listen --target``): like it,
the listener is limited to loopback unless asked (its ``--unsafe-listen``, our
``--allow-remote``) and the name checked can be set apart from the address dialled (its
``--override-server-name``, our ``--server-name``).

Choices and why:

* Bytes are relayed, not parsed: mbsec serve validates every ADU; a second parser here would
  only add a place for the two to disagree.
* Nothing is replayed. A TLS connection that breaks after bytes went through closes the
  master's connection (as a PLC's reset would): a replayed write moves real equipment.
* Reconnect with backoff: while the server cannot be reached, an accepted plain connection
  tries again, spaced by one backoff shared by every connection (a master that reconnects in
  a loop cannot hammer the DMZ), for at most ``retry_for`` seconds, then it is closed.
* A server certificate that fails verification (wrong name, fingerprint, CA, purpose) is
  refused at once and never retried on that connection: fail closed.
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import signal
import ssl
import sys
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import trio
from cryptography import x509
from cryptography.hazmat.primitives.serialization import Encoding
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from mbsec import events
from mbsec.audit import check_sinks, close_logger, make_logger
from mbsec.metrics import Metrics, MetricsLike, NullMetrics
from mbsec.settings import LoggingSettings, is_loopback, parse_hostport
from mbsec.tls import TLS12_CIPHERS

DEFAULT_LISTEN = "127.0.0.1:502"
SERVER_PORT = 802
RECEIVE_SIZE = 65536


class ConnectConfigError(Exception):
    """The options cannot be used; ``problems`` holds one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


# -- backoff (pure: the caller passes the clock) ------------------------------------------------


class Backoff:
    """Spacing of connection attempts to the server, shared by every plain connection.

    A failure pushes the earliest next attempt ``initial * 2**(n-1)`` seconds out (capped at
    ``maximum``), ``n`` the failures in a row; a success clears it. Only failed attempts are
    throttled (design guide: backoff throttles connect attempts that fail, nothing else).
    """

    def __init__(self, initial: float, maximum: float) -> None:
        self.initial = initial
        self.maximum = maximum
        self.failures = 0
        self.not_before = 0.0

    def wait(self, now: float) -> float:
        """Seconds to wait before the next attempt may start."""
        return max(0.0, self.not_before - now)

    def failed(self, now: float) -> float:
        """Record a failure at ``now``; the delay it imposes."""
        delay = min(self.maximum, self.initial * 2.0 ** min(self.failures, 62))
        self.failures += 1
        self.not_before = max(self.not_before, now + delay)
        return delay

    def succeeded(self) -> None:
        self.failures = 0
        self.not_before = 0.0


# -- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class ConnectConfig:
    listen: tuple[str, int]
    server: tuple[str, int]
    cert: Path
    key: Path
    ca: Path
    #: the name the server's certificate must carry (DNS or IP SAN); None: not checked
    server_name: str | None
    #: the server certificate's pinned SHA-256 (lowercase hex, no colons); None: not pinned
    server_sha256: str | None
    min_version: str = "1.2"
    connect_timeout: float = 5.0
    handshake_timeout: float = 10.0
    retry_for: float = 10.0
    backoff_initial: float = 0.2
    backoff_max: float = 10.0
    max_connections: int = 64
    metrics_listen: tuple[str, int] | None = None


def normalize_fingerprint(value: str) -> str:
    """``AB:CD:..`` or ``abcd..`` -> 64 lowercase hex digits, or ValueError."""
    hexa = value.replace(":", "").strip().lower()
    if len(hexa) != 64 or any(c not in "0123456789abcdef" for c in hexa):
        raise ValueError(f"{value!r} is not a SHA-256 fingerprint (64 hex digits, colons "
                         "allowed): mbsec-pki show CERT prints it")
    return hexa


def client_context(cfg: ConnectConfig) -> tuple[ssl.SSLContext, x509.Certificate]:
    """The TLS client context (TLS >= 1.2, the mandatory suites first, CERT_REQUIRED against
    ``cfg.ca``, hostname checked when a name is to be verified) and the master's leaf."""
    problems: list[str] = []
    leaf: x509.Certificate | None = None
    try:
        chain = x509.load_pem_x509_certificates(cfg.cert.read_bytes())
        leaf = chain[0]
    except FileNotFoundError:
        problems.append(f"--cert: file not found: {cfg.cert}")
    except OSError as exc:
        problems.append(f"--cert: cannot read {cfg.cert}: {exc.strerror}")
    except ValueError:
        problems.append(f"--cert: {cfg.cert}: not a PEM certificate chain")
    if leaf is not None:
        try:
            eku = leaf.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
            if ExtendedKeyUsageOID.CLIENT_AUTH not in eku:
                problems.append(
                    f"--cert: {cfg.cert} is not a client certificate (no clientAuth in its "
                    "extended key usage): issue one with `mbsec-pki issue client NAME "
                    "--profile hmi-operator`")
        except x509.ExtensionNotFound:
            pass
    for what, path in (("--key", cfg.key), ("--ca", cfg.ca)):
        if not path.is_file():
            problems.append(f"{what}: file not found: {path}")
    if problems:
        raise ConnectConfigError(problems)
    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    ctx.minimum_version = (ssl.TLSVersion.TLSv1_3 if cfg.min_version == "1.3"
                           else ssl.TLSVersion.TLSv1_2)
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_COMPRESSION
    ctx.set_ciphers(TLS12_CIPHERS)
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.check_hostname = cfg.server_name is not None
    try:
        ctx.load_cert_chain(str(cfg.cert), str(cfg.key), password=b"")
    except (ssl.SSLError, OSError) as exc:
        problems.append(f"--cert/--key: cannot load the certificate and key "
                        f"({getattr(exc, 'reason', None) or exc}): does the key match the "
                        "certificate, and is it unencrypted?")
    try:
        ctx.load_verify_locations(cafile=str(cfg.ca))
        if ctx.cert_store_stats()["x509_ca"] == 0:
            problems.append(f"--ca: {cfg.ca} holds no CA certificate")
    except (ssl.SSLError, OSError) as exc:
        problems.append(f"--ca: cannot load {cfg.ca}: {exc}")
    if problems:
        raise ConnectConfigError(problems)
    assert leaf is not None
    return ctx, leaf


# -- failures, mapped to reasons ----------------------------------------------------------------


class UpstreamFailure(Exception):
    """An attempt to reach the server failed: ``reason`` (event slug), ``retry`` whether the
    same plain connection may try again."""

    def __init__(self, reason: str, detail: str, *, retry: bool) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.retry = retry


_VERIFY = {  # OpenSSL X509_V_ERR_* -> reason
    2: "server_unknown_ca", 18: "server_unknown_ca", 19: "server_unknown_ca",
    20: "server_unknown_ca", 21: "server_unknown_ca",
    9: "server_certificate_not_yet_valid", 10: "server_certificate_expired",
    26: "server_certificate_wrong_purpose",
    62: "server_name_mismatch", 64: "server_name_mismatch",  # hostname / IP address mismatch
}

#: alerts the server sends when it refuses the master's certificate
_REJECTED_US = ("CERTIFICATE_REQUIRED", "BAD_CERTIFICATE", "CERTIFICATE_UNKNOWN",
                "UNKNOWN_CA", "CERTIFICATE_REVOKED", "CERTIFICATE_EXPIRED",
                "UNSUPPORTED_CERTIFICATE", "ACCESS_DENIED")


def _ssl_error(exc: BaseException) -> BaseException:
    """trio wraps ssl errors in BrokenResourceError; the cause says what happened."""
    while isinstance(exc, trio.BrokenResourceError) and exc.__cause__ is not None:
        exc = exc.__cause__
    return exc


def classify(exc: BaseException) -> UpstreamFailure:
    """A failed TLS handshake with the server, as a reason; verification failures of the
    server's certificate are final (``retry=False``)."""
    err = _ssl_error(exc)
    if isinstance(err, ssl.SSLCertVerificationError):
        reason = _VERIFY.get(err.verify_code, "server_certificate_invalid")
        return UpstreamFailure(reason, f"the server's certificate: {err.verify_message}",
                               retry=False)
    if isinstance(err, ssl.SSLError):
        r = err.reason or ""
        if r.startswith(("SSLV3_ALERT_", "TLSV1_ALERT_", "TLSV13_ALERT_")) and \
                r.endswith(_REJECTED_US):
            return UpstreamFailure(
                "client_certificate_rejected",
                f"the server refused this host's certificate ({r}): is it issued by the "
                "plant CA, unexpired and not revoked?", retry=False)
        if "VERSION" in r or "PROTOCOL" in r:
            return UpstreamFailure("unsupported_protocol_version", r or str(err), retry=False)
        if r == "UNEXPECTED_EOF_WHILE_READING":
            return UpstreamFailure("server_closed", "the server closed during the handshake",
                                   retry=True)
        return UpstreamFailure("tls_error", r or str(err), retry=True)
    if isinstance(err, (trio.BrokenResourceError, trio.ClosedResourceError, OSError)):
        return UpstreamFailure("server_closed", f"the server closed during the handshake "
                               f"({err or type(err).__name__})", retry=True)
    return UpstreamFailure("tls_error", repr(err), retry=True)


def closed_reason(exc: BaseException) -> tuple[str, str]:
    """Why the server side of an established tunnel ended (TLS 1.3: a server that refuses the
    master's certificate says so only after the client's handshake completed)."""
    err = _ssl_error(exc)
    if isinstance(err, ssl.SSLError):
        r = err.reason or ""
        if r.endswith(_REJECTED_US):
            return "client_certificate_rejected", (
                f"the server refused this host's certificate ({r}): is it issued by the plant "
                "CA, unexpired and not revoked?")
        return "server_reset", r or str(err)
    return "server_reset", str(err) or type(err).__name__


# -- the tunnel ---------------------------------------------------------------------------------


class Connector:
    """Listens for plain Modbus/TCP and carries each connection to the server over TLS."""

    def __init__(self, cfg: ConnectConfig, *, log: Any, metrics: MetricsLike | None = None,
                 clock: Callable[[], float] = trio.current_time) -> None:
        self.cfg = cfg
        self.log = log
        self.metrics: MetricsLike = metrics if metrics is not None else NullMetrics()
        self.ctx, self.leaf = client_context(cfg)
        self.backoff = Backoff(cfg.backoff_initial, cfg.backoff_max)
        self.clock = clock
        self._conn_ids = 0
        self._active = 0
        self.listen_port: int | None = None
        self.metrics_port: int | None = None

    # -- server side of one plain connection ------------------------------------------------

    async def _attempt(self) -> trio.SSLStream[trio.SocketStream]:
        host, port = self.cfg.server
        try:
            with trio.fail_after(self.cfg.connect_timeout):
                tcp = await trio.open_tcp_stream(host, port)
        except trio.TooSlowError:
            raise UpstreamFailure("connect_timeout", f"no TCP connection to {host}:{port} "
                                  f"within {self.cfg.connect_timeout:g} s", retry=True) from None
        except OSError as exc:
            raise UpstreamFailure("connect_failed", f"{host}:{port}: "
                                  f"{exc.strerror or exc}", retry=True) from None
        name = self.cfg.server_name or host
        stream = trio.SSLStream(tcp, self.ctx, server_hostname=name)
        try:
            with trio.fail_after(self.cfg.handshake_timeout):
                await stream.do_handshake()
        except trio.TooSlowError:
            await trio.aclose_forcefully(tcp)
            raise UpstreamFailure("handshake_timeout", "no TLS handshake within "
                                  f"{self.cfg.handshake_timeout:g} s", retry=True) from None
        except (trio.BrokenResourceError, OSError, ssl.SSLError) as exc:
            await trio.aclose_forcefully(tcp)
            raise classify(exc) from None
        der = stream.getpeercert(binary_form=True)
        fingerprint = hashlib.sha256(der or b"").hexdigest()
        if self.cfg.server_sha256 is not None and fingerprint != self.cfg.server_sha256:
            await trio.aclose_forcefully(stream)
            raise UpstreamFailure(
                "server_fingerprint_mismatch",
                f"the server's certificate has SHA-256 {fingerprint}, not the pinned "
                f"{self.cfg.server_sha256} (a renewed certificate needs a new pin: "
                "mbsec-pki show CERT)", retry=False)
        return stream

    async def _open(self, started: float, log: Any) -> trio.SSLStream[trio.SocketStream]:
        """Reach the server, retrying with the shared backoff until ``retry_for`` is spent."""
        attempt = 0
        while True:
            wait = self.backoff.wait(self.clock())
            if self.clock() + wait - started > self.cfg.retry_for:
                raise UpstreamFailure("server_unreachable", f"the server was not reached "
                                      f"within {self.cfg.retry_for:g} s", retry=False)
            await trio.sleep(wait)
            attempt += 1
            t0 = self.clock()
            try:
                stream = await self._attempt()
            except UpstreamFailure as f:
                delay = self.backoff.failed(self.clock())
                self.metrics.inc("mbsec_connect_upstream_total", outcome="failure",
                                 reason=f.reason)
                events.emit(log, events.connect_upstream_failed(
                    f.reason, f.detail, attempt, delay, f.retry))
                if not f.retry:
                    raise UpstreamFailure("server_refused", f"{f.reason}: {f.detail}",
                                          retry=False) from None
                continue
            self.backoff.succeeded()
            took = self.clock() - t0
            der = stream.getpeercert(binary_form=True) or b""
            cert = x509.load_der_x509_certificate(der)
            cns = cert.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            cipher = stream.cipher()
            self.metrics.inc("mbsec_connect_upstream_total", outcome="success", reason="")
            self.metrics.observe("mbsec_connect_handshake_seconds", took)
            events.emit(log, events.connect_upstream_ok(
                took, attempt, stream.version() or "", cipher[0] if cipher else "",
                str(cns[0].value) if cns else None, hashlib.sha256(der).hexdigest()))
            return stream

    # -- one plain connection -------------------------------------------------------------

    async def _handle(self, plain: trio.SocketStream) -> None:
        self._conn_ids += 1
        try:
            peer = plain.socket.getpeername()
            src_ip, src_port = str(peer[0]), int(peer[1])
        except OSError:
            src_ip, src_port = None, None
        host, port = self.cfg.server
        log = self.log.bind(**events.tunnel_context(self._conn_ids, src_ip, src_port, host,
                                                    port))
        started = self.clock()
        counts = [0, 0]  # bytes from the master, bytes to the master
        if self._active >= self.cfg.max_connections:
            self.metrics.inc("mbsec_connect_connections_total", outcome="too_many_connections")
            events.emit(log, events.connect_closed(
                "too_many_connections", 0.0, 0, 0,
                f"{self.cfg.max_connections} connections open (--max-connections)"))
            await trio.aclose_forcefully(plain)
            return
        self.metrics.inc("mbsec_connect_connections_total", outcome="accepted")
        self._active += 1
        self.metrics.set("mbsec_connect_connections_active", self._active)
        reason, detail = "shutdown", None
        try:
            try:
                upstream = await self._open(started, log)
            except UpstreamFailure as f:
                reason, detail = f.reason, f.detail
                return
            reason, detail = await self._relay(plain, upstream, counts)
        except Exception as exc:  # a bug in one connection: log it, keep serving the others
            reason, detail = "internal_error", f"{type(exc).__name__}: {exc}"
        finally:
            self._active -= 1
            self.metrics.set("mbsec_connect_connections_active", self._active)
            self.metrics.inc("mbsec_connect_bytes_total", counts[0], direction="to_server")
            self.metrics.inc("mbsec_connect_bytes_total", counts[1], direction="to_client")
            events.emit(log, events.connect_closed(reason, self.clock() - started, counts[0],
                                                   counts[1], detail))
            await trio.aclose_forcefully(plain)

    async def _relay(self, plain: trio.SocketStream, tls: trio.SSLStream[trio.SocketStream],
                     counts: list[int]) -> tuple[str, str | None]:
        """Move bytes both ways until one side ends; that side names the reason."""
        outcome: list[tuple[str, str | None]] = []

        def broke(master_side: bool, exc: BaseException) -> tuple[str, str | None]:
            if master_side:
                return "client_reset", str(_ssl_error(exc)) or None
            return closed_reason(exc)

        async def pump(src: trio.abc.Stream, dst: trio.abc.Stream, index: int,
                       from_master: bool, cancel: trio.CancelScope) -> None:
            try:
                while True:
                    try:
                        data = await src.receive_some(RECEIVE_SIZE)
                    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                        outcome.append(broke(from_master, exc))
                        return
                    if not data:
                        outcome.append(("client_closed" if from_master else "server_closed",
                                        None))
                        return
                    counts[index] += len(data)
                    try:
                        await dst.send_all(data)
                    except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
                        outcome.append(broke(not from_master, exc))
                        return
            finally:
                cancel.cancel()

        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(pump, plain, tls, 0, True, nursery.cancel_scope)
                nursery.start_soon(pump, tls, plain, 1, False, nursery.cancel_scope)
        finally:
            with trio.move_on_after(1) as cs:
                cs.shield = True
                with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                    await tls.aclose()  # close_notify, so mbsec serve logs client_closed
            await trio.aclose_forcefully(tls)
        return outcome[0] if outcome else ("shutdown", None)

    # -- serving ------------------------------------------------------------------------------

    async def serve(self, *, task_status: trio.TaskStatus[int] = trio.TASK_STATUS_IGNORED,
                    ) -> None:
        host, port = self.cfg.listen
        listeners = await trio.open_tcp_listeners(port, host=host)
        self.listen_port = int(listeners[0].socket.getsockname()[1])
        async with trio.open_nursery() as nursery:
            if self.cfg.metrics_listen is not None and isinstance(self.metrics, Metrics):
                from mbsec.metrics_http import serve_metrics

                mhost, mport = self.cfg.metrics_listen
                self.metrics_port = await nursery.start(serve_metrics, self.metrics,
                                                        mhost or None, mport)
            cn = self.leaf.subject.get_attributes_for_oid(NameOID.COMMON_NAME)
            events.emit(self.log, events.connect_start(
                [_fmt(host, self.listen_port)], self.cfg.server[0], self.cfg.server[1],
                self.cfg.server_name, self.cfg.server_sha256, str(cn[0].value) if cn else None,
                hashlib.sha256(self.leaf.public_bytes(Encoding.DER)).hexdigest(),
                self.metrics_port))
            await nursery.start(trio.serve_listeners, self._handle, listeners)
            task_status.started(self.listen_port)

    @property
    def active(self) -> int:
        return self._active


def _fmt(host: str, port: int) -> str:
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


# -- command line -------------------------------------------------------------------------------

EPILOG = """\
examples:
  mbsec connect --server mbsec.plant.local:802 --cert tls/hmi-01-chain.pem \\
      --key tls/hmi-01.key --ca tls/ca.crt
  mbsec connect --listen 127.0.0.1:1502 --server 10.20.0.2:802 \\
      --server-sha256 3f:9a:...:c1 --cert hmi.pem --key hmi.key --ca ca.crt

Point the master at the --listen address. SIGTERM/SIGINT stop it. Events: docs/events.md
(connect-*); how to connect a master: docs/clients.md.
"""


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mbsec connect",
        description="Client side for masters that speak plain Modbus/TCP only: listen for "
        "plain Modbus/TCP on this host and carry each connection over Modbus/TCP Security "
        "(TLS, this host's certificate) to the DMZ mbsec, verifying the server by name or a "
        "pinned fingerprint.",
        epilog=EPILOG, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--listen", default=DEFAULT_LISTEN, metavar="HOST:PORT",
                   help=f"where masters connect (default {DEFAULT_LISTEN}); only loopback "
                   "unless --allow-remote")
    p.add_argument("--allow-remote", action="store_true",
                   help="allow a --listen address other than loopback: anyone who reaches it "
                   "acts with this host's certificate (firewall it)")
    p.add_argument("--server", required=True, metavar="HOST[:PORT]",
                   help=f"the DMZ mbsec (port default {SERVER_PORT})")
    p.add_argument("--cert", required=True, metavar="FILE",
                   help="this master's certificate chain (PEM, leaf first: NAME-chain.pem)")
    p.add_argument("--key", required=True, metavar="FILE", help="its private key (PEM)")
    p.add_argument("--ca", required=True, metavar="FILE",
                   help="the plant CA bundle that issued the server's certificate (ca.crt)")
    p.add_argument("--server-name", metavar="NAME",
                   help="the DNS name or IP address the server's certificate must carry "
                   "(default: HOST of --server, unless --server-sha256 is given)")
    p.add_argument("--server-sha256", metavar="HEX",
                   help="pin the server certificate's SHA-256 fingerprint (mbsec-pki show); "
                   "the name is then checked only with --server-name")
    p.add_argument("--min-version", choices=("1.2", "1.3"), default="1.2")
    p.add_argument("--connect-timeout", type=float, default=5.0, metavar="S")
    p.add_argument("--handshake-timeout", type=float, default=10.0, metavar="S")
    p.add_argument("--retry-for", type=float, default=10.0, metavar="S",
                   help="how long an accepted connection waits for the server before it is "
                   "closed (default 10)")
    p.add_argument("--backoff-initial", type=float, default=0.2, metavar="S")
    p.add_argument("--backoff-max", type=float, default=10.0, metavar="S")
    p.add_argument("--max-connections", type=int, default=64, metavar="N")
    p.add_argument("--metrics-listen", metavar="HOST:PORT",
                   help="serve /metrics and /healthz here (default: none)")
    p.add_argument("--log-format", choices=("json", "console"), default="json")
    p.add_argument("--log-level", choices=("debug", "info", "warning"), default="info")
    p.add_argument("--log-file", metavar="FILE", help="also append the events to FILE")
    return p


def config_from_args(args: argparse.Namespace) -> ConnectConfig:
    problems: list[str] = []
    listen: tuple[str, int] = ("127.0.0.1", 502)
    server: tuple[str, int] = ("", SERVER_PORT)
    metrics: tuple[str, int] | None = None
    try:
        listen = parse_hostport(args.listen)
        if not listen[0]:
            problems.append(f"--listen {args.listen}: give an address (127.0.0.1:PORT)")
        elif not is_loopback(listen[0]) and not args.allow_remote:
            problems.append(
                f"--listen {args.listen}: not a loopback address; anyone who reaches it "
                "would act with this host's certificate: add --allow-remote if that is "
                "intended (and firewall it)")
    except ValueError as exc:
        problems.append(f"--listen: {exc}")
    try:
        server = parse_hostport(args.server, default_port=SERVER_PORT)
        if not server[0]:
            problems.append(f"--server {args.server}: give the host")
    except ValueError as exc:
        problems.append(f"--server: {exc}")
    pin = None
    if args.server_sha256 is not None:
        try:
            pin = normalize_fingerprint(args.server_sha256)
        except ValueError as exc:
            problems.append(f"--server-sha256: {exc}")
    if args.metrics_listen:
        try:
            metrics = parse_hostport(args.metrics_listen)
        except ValueError as exc:
            problems.append(f"--metrics-listen: {exc}")
    for opt in ("connect_timeout", "handshake_timeout", "retry_for", "backoff_initial",
                "backoff_max"):
        if getattr(args, opt) <= 0:
            problems.append(f"--{opt.replace('_', '-')}: must be > 0")
    if args.max_connections < 1:
        problems.append("--max-connections: must be >= 1")
    if problems:
        raise ConnectConfigError(problems)
    name = args.server_name if args.server_name is not None else (
        None if pin is not None else server[0])
    return ConnectConfig(
        listen=listen, server=server, cert=Path(args.cert), key=Path(args.key),
        ca=Path(args.ca), server_name=name, server_sha256=pin, min_version=args.min_version,
        connect_timeout=args.connect_timeout, handshake_timeout=args.handshake_timeout,
        retry_for=args.retry_for, backoff_initial=args.backoff_initial,
        backoff_max=args.backoff_max, max_connections=args.max_connections,
        metrics_listen=metrics)


def _problems(lines: list[str]) -> int:
    for line in lines:
        print(f"mbsec connect: error: {line}", file=sys.stderr)
    return 1


def main(argv: list[str]) -> int:
    args = _parser().parse_args(argv)
    try:
        cfg = config_from_args(args)
        logging = LoggingSettings(format=args.log_format, level=args.log_level,
                                  file=Path(args.log_file) if args.log_file else None)
        sink_problems = check_sinks(logging)
        if sink_problems:
            raise ConnectConfigError([f"--log-file: {p.split(': ', 1)[1]}"
                                      for p in sink_problems])
        metrics = Metrics()
        log = make_logger(logging)
        try:
            connector = Connector(cfg, log=log, metrics=metrics)
        except ConnectConfigError:
            close_logger(log)
            raise
    except ConnectConfigError as exc:
        return _problems(exc.problems)

    async def run() -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT) as signals:
            async with trio.open_nursery() as nursery:
                await nursery.start(connector.serve)
                async for _ in signals:
                    break
                cut = connector.active
                nursery.cancel_scope.cancel()  # each open tunnel logs connect-closed: shutdown
            events.emit(log, events.connect_stopped(cut))

    try:
        trio.run(run)
    except (OSError, BaseExceptionGroup) as exc:
        from mbsec.cli_proxy import _first_oserror

        oserr = _first_oserror(exc)
        if oserr is None:
            raise
        close_logger(log)
        where = _fmt(*cfg.listen) + (f" (or --metrics-listen {_fmt(*cfg.metrics_listen)})"
                                     if cfg.metrics_listen else "")
        hint = (": ports below 1024 need root or CAP_NET_BIND_SERVICE (the systemd unit "
                "grants it)" if oserr.errno == 13 else "")
        return _problems([f"cannot listen on {where}: {oserr.strerror or oserr}{hint}"])
    close_logger(log)
    return 0
