"""The TLS front of Modbus/TCP Security: server context, CRLs, handshake failure reasons.

Choices and why:

* TLS 1.2 is the floor, 1.3 is allowed; ``min_version = "1.3"`` raises the floor.
* The two mandatory suites (ECDHE-RSA/ECDSA-AES128-GCM-SHA256) lead the TLS 1.2 list.
* ``CERT_REQUIRED``: a client without a certificate fails the handshake with a fatal alert.
* Renegotiation is refused (``OP_NO_RENEGOTIATION``).
* No session resumption: no tickets (``OP_NO_TICKET``, ``num_tickets = 0``) and OpenSSL's
  server session cache turned off (:func:`disable_session_cache`), because a resumed handshake
  verifies nothing (not the chain's CAs, not the CRLs' freshness). A resumed handshake, only
  possible where turning the cache off failed, is refused (``session_resumed``). In addition
  every session re-checks the peer serial against the CRLs loaded now
  (:meth:`TlsMaterial.is_revoked`) and the leaf's notAfter after the handshake.
* CRLs are loaded into the context with ``VERIFY_CRL_CHECK_CHAIN`` (a revoked intermediate
  takes its clients with it; every CA in ``client_ca`` then needs a CRL, checked at start).
  An expired CRL makes OpenSSL reject every client, so :func:`crl_warnings` reports CRLs
  whose nextUpdate is near or past.
"""

from __future__ import annotations

import _ssl
import ctypes
import datetime as dt
import ssl
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

from cryptography import x509
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.serialization import Encoding

from mbsec.pki.verify import parse_crls
from mbsec.settings import TlsSettings
from mbsec.tls_keylog import KeyLog

TLS12_CIPHERS = ":".join(
    [
        "ECDHE-ECDSA-AES128-GCM-SHA256",  # mandatory (Modbus/TCP Security)
        "ECDHE-RSA-AES128-GCM-SHA256",  # mandatory
        "ECDHE-ECDSA-AES256-GCM-SHA384",
        "ECDHE-RSA-AES256-GCM-SHA384",
        "ECDHE-ECDSA-CHACHA20-POLY1305",
        "ECDHE-RSA-CHACHA20-POLY1305",
    ]
)


class TlsConfigError(Exception):
    """TLS material cannot be loaded; ``problems`` holds one line per problem."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


@dataclass(frozen=True, slots=True)
class CrlInfo:
    path: Path
    issuer: str
    next_update: dt.datetime | None
    revoked: frozenset[int]


@dataclass(frozen=True, slots=True)
class TlsMaterial:
    """One consistent set: the context and the CRL facts it was built from."""

    context: ssl.SSLContext
    crls: tuple[CrlInfo, ...] = ()
    handshake_timeout: float = 10.0
    _revoked: frozenset[tuple[str, int]] = field(default=frozenset())
    #: False only where OpenSSL's session cache could not be turned off (see
    #: :func:`disable_session_cache`): a resumed handshake is then refused
    session_cache_off: bool = True
    #: subject -> (issuer, serial) of every CA certificate in ``client_ca`` (RFC 4514 names)
    _cas: dict[str, tuple[str, int]] = field(default_factory=dict)
    #: where TLS 1.3 handshake secrets come from for naming rejected certificates; None: off
    keylog: KeyLog | None = None

    def is_revoked(self, issuer: str, serial: int) -> bool:
        """Whether a (RFC 4514 issuer, serial) pair is on a currently loaded CRL."""
        return (issuer, serial) in self._revoked

    def knows_ca(self, name: str) -> bool:
        """Whether ``client_ca`` holds a CA certificate with this (RFC 4514) subject."""
        return name in self._cas

    def issuer_revoked(self, issuer: str) -> bool:
        """Whether a CA above a leaf issued by ``issuer`` is on a currently loaded CRL, as far
        as ``client_ca`` holds those CAs (the peer's own chain is not available after the
        handshake in Python 3.11): a reload must also end the connections under a revoked
        intermediate."""
        name = issuer
        for _ in range(len(self._cas)):
            up = self._cas.get(name)
            if up is None or up[0] == name:  # unknown, or the self-signed root
                return False
            if up in self._revoked:
                return True
            name = up[0]
        return False


def _read(path: Path, what: str, problems: list[str]) -> bytes | None:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        problems.append(f"{what}: file not found: {path}")
    except OSError as exc:
        problems.append(f"{what}: cannot read {path}: {exc.strerror}")
    return None


def _pem_problem(key: str, data: bytes) -> str | None:
    """What is wrong with the content of ``tls.cert`` / ``tls.key`` / ``tls.client_ca``."""
    if key == "key":
        if b"ENCRYPTED" in data:
            return ("the private key is encrypted; mbsec needs it unencrypted (protect it with "
                    "file mode 0600 instead, see docs/pki.md)")
        try:
            serialization.load_pem_private_key(data, password=None)
        except (ValueError, TypeError, UnsupportedAlgorithm):
            return "not a PEM private key"
        return None
    try:
        x509.load_pem_x509_certificates(data)
    except ValueError:
        return ("not a PEM certificate chain" if key == "cert"
                else "not a PEM bundle of CA certificates")
    return None


def _ca_certificates(client_ca: Path) -> list[x509.Certificate]:
    """The CA certificates of the client CA bundle; [] when it cannot be read (OpenSSL's load
    of the same file reports why)."""
    try:
        return x509.load_pem_x509_certificates(client_ca.read_bytes())
    except (OSError, ValueError):
        return []


def _uncovered_cas(cas: list[x509.Certificate], crls: list[CrlInfo], what: str) -> list[str]:
    """CAs in the client CA bundle that no configured CRL covers.

    With CRLs on, OpenSSL checks revocation along the whole chain and rejects every client
    whose chain holds a CA without a CRL; say so at start instead of failing each handshake.
    """
    issuers = {c.issuer for c in crls}
    return [
        f"{what}.crl: no CRL for CA '{ca.subject.rfc4514_string()}' in {what}.client_ca: with "
        "CRLs on, revocation is checked along the whole chain, so every CA needs its CRL "
        "(mbsec-pki crl writes one per CA)"
        for ca in cas
        if ca.subject.rfc4514_string() not in issuers
    ]


def crl_warnings(
    crls: tuple[CrlInfo, ...], *, warn_days: float, now: dt.datetime | None = None
) -> list[str]:
    """Human lines for CRLs that are expired or will expire within ``warn_days``."""
    now = now or dt.datetime.now(dt.UTC)
    out = []
    for c in crls:
        if c.next_update is None:
            continue
        left = c.next_update - now
        if left.total_seconds() <= 0:
            out.append(
                f"{c.path}: CRL of {c.issuer} EXPIRED at {c.next_update.isoformat()}: "
                "OpenSSL rejects every client of this CA until a fresh CRL is loaded (SIGHUP)"
            )
        elif left <= dt.timedelta(days=warn_days):
            out.append(
                f"{c.path}: CRL of {c.issuer} expires at {c.next_update.isoformat()} "
                f"(in {left.total_seconds() / 3600:.1f} h): publish a new CRL and reload"
            )
    return out


def chain_warnings(cert_path: Path, *, what: str = "tls") -> list[str]:
    """A server chain that stops short of its root CA works (clients hold the root), but R-46
    (v36) asks for the entire chain down to the root; ``mbsec config check`` says so."""
    try:
        chain = x509.load_pem_x509_certificates(cert_path.read_bytes())
    except (OSError, ValueError):
        return []  # unreadable or broken: build_material reports it as an error
    last = chain[-1]
    if last.issuer == last.subject:
        return []
    return [
        f"{what}.cert: {cert_path} ends with {last.subject.rfc4514_string()} (issued by "
        f"{last.issuer.rfc4514_string()}), not with a self-signed root CA; R-46 asks for the "
        "whole chain down to the root: append the missing CA certificates, or re-issue with "
        "mbsec-pki (its chain files end with the root)"
    ]


def build_material(tls: TlsSettings, *, what: str = "tls", keylog: KeyLog | None = None
                   ) -> TlsMaterial:
    """Build the server context, or raise :class:`TlsConfigError` listing every problem.
    ``keylog``: where the context's TLS 1.3 handshake secrets go (naming rejected certificates)."""
    problems: list[str] = []
    for key in ("cert", "key", "client_ca"):
        p: Path = getattr(tls, key)
        if not p.is_file():
            problems.append(f"{what}.{key}: file not found: {p}")
            continue
        data = _read(p, f"{what}.{key}", problems)
        if data is not None:
            problem = _pem_problem(key, data)
            if problem:
                problems.append(f"{what}.{key}: {p}: {problem}")
    crl_infos: list[CrlInfo] = []
    crl_pem: list[str] = []
    for i, p in enumerate(tls.crl):
        data = _read(p, f"{what}.crl[{i}]", problems)
        if data is None:
            continue
        try:
            crls = parse_crls(data)  # a PEM file may hold several (issuing CA's + root's)
        except ValueError:
            problems.append(f"{what}.crl[{i}]: {p}: not a PEM or DER CRL")
            continue
        for crl in crls:
            crl_pem.append(crl.public_bytes(Encoding.PEM).decode("ascii"))
            crl_infos.append(
                CrlInfo(
                    path=p,
                    issuer=crl.issuer.rfc4514_string(),
                    next_update=crl.next_update_utc,
                    revoked=frozenset(r.serial_number for r in crl),
                )
            )
    if problems:
        raise TlsConfigError(problems)

    ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    ctx.minimum_version = (
        ssl.TLSVersion.TLSv1_3 if tls.min_version == "1.3" else ssl.TLSVersion.TLSv1_2
    )
    ctx.maximum_version = ssl.TLSVersion.MAXIMUM_SUPPORTED
    ctx.verify_mode = ssl.CERT_REQUIRED
    ctx.options |= ssl.OP_NO_RENEGOTIATION | ssl.OP_NO_TICKET | ssl.OP_NO_COMPRESSION
    ctx.options |= ssl.OP_CIPHER_SERVER_PREFERENCE
    ctx.num_tickets = 0
    try:
        ctx.set_ciphers(TLS12_CIPHERS)
    except ssl.SSLError as exc:  # pragma: no cover - depends on the OpenSSL build
        problems.append(f"{what}: cipher list rejected by OpenSSL: {exc}")
    try:
        # never let OpenSSL prompt for a passphrase on the terminal (start or SIGHUP reload)
        ctx.load_cert_chain(certfile=str(tls.cert), keyfile=str(tls.key), password=b"")
    except ssl.SSLError as exc:
        problems.append(
            f"{what}.cert/{what}.key: cannot load the server chain and key "
            f"({exc.reason or exc}): does the key match the certificate?"
        )
    except OSError as exc:
        problems.append(f"{what}.cert/{what}.key: cannot load: {exc}")
    try:
        n_before = ctx.cert_store_stats()["x509_ca"]
        ctx.load_verify_locations(cafile=str(tls.client_ca))
        if ctx.cert_store_stats()["x509_ca"] == n_before:
            problems.append(f"{what}.client_ca: {tls.client_ca} holds no CA certificate")
    except (ssl.SSLError, OSError) as exc:
        problems.append(f"{what}.client_ca: cannot load {tls.client_ca}: {exc}")
    ca_certs = _ca_certificates(tls.client_ca)
    if crl_pem:
        problems.extend(_uncovered_cas(ca_certs, crl_infos, what))
        # cadata= only takes certificates; a PEM *file* may hold CRLs (X509_load_cert_crl_file)
        try:
            with tempfile.TemporaryDirectory(prefix="mbsec-crl-") as tmp:
                bundle = Path(tmp) / "crls.pem"
                bundle.write_text("".join(crl_pem), encoding="ascii")
                try:
                    ctx.load_verify_locations(cafile=str(bundle))
                except ssl.SSLError as exc:
                    problems.append(f"{what}.crl: OpenSSL rejected a CRL: {exc}")
        except OSError as exc:
            problems.append(f"{what}.crl: cannot stage the CRLs for OpenSSL in a temporary "
                            f"directory ({exc.strerror or exc}): check TMPDIR")
        # the whole chain, not only the leaf: a CRL revoking an intermediate CA must take every
        # client it issued with it
        ctx.verify_flags |= ssl.VERIFY_CRL_CHECK_CHAIN
    if problems:
        raise TlsConfigError(problems)
    revoked = frozenset((c.issuer, s) for c in crl_infos for s in c.revoked)
    if keylog is not None:
        keylog.attach(ctx)
    return TlsMaterial(
        context=ctx,
        crls=tuple(crl_infos),
        handshake_timeout=tls.handshake_timeout,
        _revoked=revoked,
        session_cache_off=disable_session_cache(ctx),
        _cas={c.subject.rfc4514_string(): (c.issuer.rfc4514_string(), c.serial_number)
              for c in ca_certs},
        keylog=keylog,
    )


_SSL_CTRL_SET_SESS_CACHE_MODE = 44  # OpenSSL's ssl.h; SSL_SESS_CACHE_OFF is 0
_SSL_CTRL_GET_SESS_CACHE_MODE = 45
_VERIFY_PEER_AND_REQUIRE = 0x03  # SSL_VERIFY_PEER | SSL_VERIFY_FAIL_IF_NO_PEER_CERT


def disable_session_cache(ctx: ssl.SSLContext) -> bool:
    """Turn OpenSSL's server session cache off, so that no TLS 1.2 session is ever resumed
    (tickets are off already): OpenSSL verifies nothing on a resumed handshake, neither the
    chain's CAs nor CRL freshness, and Python 3.11 exposes neither the cache mode nor the
    peer's chain to check it by hand. Python's ``ssl`` has no API for the mode, so this calls
    ``SSL_CTX_ctrl`` through ctypes on the context's ``SSL_CTX``, found right after the object
    header (the layout of ``PySSLContext``), and checks that pointer against the options and
    verify mode Python reports before it writes anything. True when the cache is off."""
    try:
        lib = ctypes.CDLL(_ssl.__file__)  # AttributeError where _ssl is built in
        ctrl = lib.SSL_CTX_ctrl
        ctrl.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_long, ctypes.c_void_p]
        ctrl.restype = ctypes.c_long
        get_options = lib.SSL_CTX_get_options
        get_options.argtypes = [ctypes.c_void_p]
        get_options.restype = ctypes.c_uint64
        get_verify_mode = lib.SSL_CTX_get_verify_mode
        get_verify_mode.argtypes = [ctypes.c_void_p]
        get_verify_mode.restype = ctypes.c_int
        ptr = ctypes.c_void_p.from_address(id(ctx) + object.__basicsize__).value
        if not ptr or ptr % ctypes.alignment(ctypes.c_void_p):
            return False
        if (get_options(ptr) != int(ctx.options)
                or get_verify_mode(ptr) != _VERIFY_PEER_AND_REQUIRE):
            return False  # not the SSL_CTX we think: write nothing
        ctrl(ptr, _SSL_CTRL_SET_SESS_CACHE_MODE, 0, None)
        return int(ctrl(ptr, _SSL_CTRL_GET_SESS_CACHE_MODE, 0, None)) == 0
    except (OSError, AttributeError, ValueError, TypeError):
        return False


# OpenSSL X509_V_ERR_* codes -> event reason slugs
_VERIFY_REASONS = {
    2: "unknown_ca",  # unable to get issuer certificate
    3: "crl_unavailable",
    7: "bad_signature",
    9: "certificate_not_yet_valid",
    10: "certificate_expired",
    11: "crl_not_yet_valid",
    12: "crl_expired",
    18: "self_signed_certificate",
    19: "unknown_ca",  # self-signed certificate in chain
    20: "unknown_ca",  # unable to get local issuer certificate
    21: "unknown_ca",
    23: "certificate_revoked",
    24: "invalid_ca",
    26: "invalid_purpose",
    34: "unhandled_critical_extension",
}

_SSL_REASONS = {
    "PEER_DID_NOT_RETURN_A_CERTIFICATE": "no_certificate",
    "UNSUPPORTED_PROTOCOL": "unsupported_protocol_version",
    "WRONG_VERSION_NUMBER": "not_tls",
    "HTTP_REQUEST": "not_tls",
    "NO_SHARED_CIPHER": "no_shared_cipher",
    "NO_CIPHERS_AVAILABLE": "no_shared_cipher",
    "TLSV1_ALERT_UNKNOWN_CA": "client_rejected_server_ca",
    "SSLV3_ALERT_BAD_CERTIFICATE": "client_rejected_server_certificate",
    "SSLV3_ALERT_CERTIFICATE_UNKNOWN": "client_rejected_server_certificate",
    "UNEXPECTED_EOF_WHILE_READING": "client_closed",
    "NO_RENEGOTIATION": "renegotiation_refused",
    "UNSAFE_LEGACY_RENEGOTIATION_DISABLED": "renegotiation_refused",
}


def handshake_failure_reason(exc: BaseException | None) -> tuple[str, str]:
    """Map the OpenSSL error behind a failed handshake to ``(reason slug, detail)``."""
    if isinstance(exc, ssl.SSLCertVerificationError):
        code = exc.verify_code
        return _VERIFY_REASONS.get(code, "certificate_verify_failed"), str(exc.verify_message)
    if isinstance(exc, ssl.SSLError):
        r = exc.reason or ""
        if r in _SSL_REASONS:
            return _SSL_REASONS[r], r
        if "VERSION" in r or "PROTOCOL" in r:
            return "unsupported_protocol_version", r
        return (r.lower() or "tls_error"), str(exc)
    if exc is None:
        return "client_closed", "connection closed during handshake"
    return "tls_error", repr(exc)
