"""Handshake and record benchmark: stdlib ``ssl`` (as mbsec builds it) vs pyOpenSSL (issue 11,
item 2), plus a probe of what pyOpenSSL's verify callback sees on each rejection.

Plain script (no pytest), everything in one thread over memory BIOs: no sockets, no ports.

* A throw-away PKI from :mod:`mbsec.pki.ca` (ECDSA P-256, mbsec-pki's default): a root with an
  issuing intermediate, a server certificate, a client with the role extension, a revoked
  client, an expired one, a not-yet-valid one, one from a rogue CA, and a client under an
  intermediate that its root's CRL revokes. The clients present their chain files (leaf,
  intermediate, root), as mbsec-pki writes them.
* (a) **stdlib**: the server context of :func:`mbsec.tls.build_material` (TLS >= 1.2,
  ``CERT_REQUIRED``, CRLs with ``VERIFY_CRL_CHECK_CHAIN``, tickets off, the ctypes session-cache
  switch) driven as ``SSLObject`` over ``MemoryBIO``.
  (b) **pyOpenSSL**: an equivalent ``OpenSSL.SSL.Context`` (same options and TLS 1.2 suites,
  ``VERIFY_PEER | VERIFY_FAIL_IF_NO_PEER_CERT`` with a verify callback that records every
  (depth, error, certificate) it is given and returns OpenSSL's own verdict, CRLs in the
  store with ``CRL_CHECK | CRL_CHECK_ALL``, ``set_session_cache_mode(SESS_CACHE_OFF)``) driven
  as ``Connection(ctx, None)`` (memory BIOs).
  The client is always the stdlib ``ssl`` with a real client certificate.
* ``handshakes``: full mutual-TLS handshakes, TLS 1.2 and 1.3; the time spent in the *server's*
  calls (``do_handshake`` + moving its BIO bytes) is summed per handshake, so the rate printed
  is server CPU only (the client's work is excluded). Median of ``--runs`` runs.
* ``records``: per application record, server side, as the data plane drives it: decrypt
  (``MemoryBIO.write`` + ``SSLObject.read`` vs ``Connection.bio_write`` + ``recv``) and
  encrypt (``SSLObject.write`` + ``MemoryBIO.read`` vs ``Connection.send`` + ``bio_read``) of a
  12-byte and a 260-byte payload (a small Modbus request and the largest ADU).
* ``--probe``: each rejection case against both servers: the alert the client receives, what
  the pyOpenSSL callback saw, and what ``get_peer_cert_chain`` gives.

pyOpenSSL is not a dependency of mbsec; install it somewhere throw-away and put it on the path:

    .venv/bin/pip install --target /tmp/pyossl --no-deps pyOpenSSL
    PYTHONPATH=/tmp/pyossl .venv/bin/python benchmarks/bench_handshake.py [--runs 7 --n 300]
    PYTHONPATH=/tmp/pyossl .venv/bin/python benchmarks/bench_handshake.py --probe

Results and the decision: docs/tls-library.md.
"""

from __future__ import annotations

import argparse
import datetime as dt
import hashlib
import platform
import ssl
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import serialization

from mbsec.pki.ca import CertificateAuthority, IssuedFiles
from mbsec.pki.verify import parse_crls
from mbsec.settings import TlsSettings
from mbsec.tls import TLS12_CIPHERS, build_material

sys.path.insert(0, str(Path(__file__).resolve().parent))

from memory_handshake import HandshakeResult, StdServer, run_handshake

warnings.filterwarnings("ignore", category=DeprecationWarning)
try:
    import cryptography.utils

    warnings.filterwarnings("ignore", category=cryptography.utils.CryptographyDeprecationWarning)
    from OpenSSL import SSL
    from OpenSSL import crypto as ocrypto
except ImportError:  # pragma: no cover - the message is the point
    sys.exit("pyOpenSSL is not importable: pip install --target /tmp/pyossl --no-deps "
             "pyOpenSSL, then run with PYTHONPATH=/tmp/pyossl (see the module docstring)")

RECEIVE_SIZE = 65536  # mbsec.path.epoll.RECEIVE_SIZE is of the same order; only one record here


# -- PKI --------------------------------------------------------------------------------------


@dataclass
class Pki:
    dir: Path
    ca: CertificateAuthority
    server: IssuedFiles
    crl: Path
    clients: dict[str, IssuedFiles]
    #: client_ca and CRL file of the CA whose intermediate the root revoked
    revoked_int_ca: Path
    revoked_int_crl: Path


def build_pki(d: Path) -> Pki:
    now = dt.datetime.now(dt.UTC)
    ca = CertificateAuthority.init(d / "ca", common_name="Bench Plant CA", intermediate=True)
    out = d / "certs"
    server = ca.issue("server", "mbsec-bench", dns=("localhost",), out_dir=out, name="server")
    clients = {
        "good": ca.issue("client", "op-1", role="operator", out_dir=out, name="good"),
        "revoked": ca.issue("client", "op-revoked", role="operator", out_dir=out,
                            name="revoked"),
        "expired": ca.issue("client", "op-old", role="operator", out_dir=out, name="expired",
                            not_before=now - dt.timedelta(days=30),
                            not_after=now - dt.timedelta(days=1)),
        "not_yet_valid": ca.issue("client", "op-future", role="operator", out_dir=out,
                                  name="future", not_before=now + dt.timedelta(days=2),
                                  not_after=now + dt.timedelta(days=30)),
    }
    ca.revoke(clients["revoked"].serial)
    crl = ca.write_crl(d / "crl.pem")
    rogue = CertificateAuthority.init(d / "rogue", common_name="Rogue CA")
    clients["unknown_ca"] = rogue.issue("client", "rogue-1", role="operator", out_dir=out,
                                        name="rogue")
    # a second plant CA whose root revokes its (compromised) intermediate
    ica = CertificateAuthority.init(d / "ica", common_name="Other Plant CA", intermediate=True)
    assert ica.intermediate is not None
    clients["revoked_intermediate"] = ica.issue("client", "via-bad-int", role="operator",
                                                out_dir=out, name="viabad")
    int_crl = ica.write_crl(d / "ica-crl.pem")
    root_crl = CertificateAuthority._crl(
        ica.root, ica._root_key(),
        [{"serial": format(ica.intermediate.serial_number, "x"),
          "revoked_at": (now - dt.timedelta(minutes=5)).isoformat(),
          "revocation_reason": "ca_compromise"}], 99, now, 7)
    end = b"-----END X509 CRL-----\n"
    both = d / "ica-both.pem"
    both.write_bytes(int_crl.read_bytes().split(end)[0] + end
                     + root_crl.public_bytes(serialization.Encoding.PEM))
    return Pki(d, ca, server, crl, clients, ica.trust_bundle, both)


# -- the two servers --------------------------------------------------------------------------


def stdlib_context(pki: Pki, client_ca: Path | None = None,
                   crl: Path | None = None) -> ssl.SSLContext:
    material = build_material(TlsSettings(cert=pki.server.chain, key=pki.server.key,
                                          client_ca=client_ca or pki.ca.trust_bundle,
                                          crl=[crl or pki.crl]))
    assert material.session_cache_off
    return material.context


@dataclass
class Seen:
    """What the verify callback was given during one handshake."""

    calls: list[tuple[int, int, int, Any]] = field(default_factory=list)  # depth, errno, ok, cert

    def leaf(self) -> Any | None:
        return next((c for depth, _, _, c in self.calls if depth == 0), None)

    def first_error(self) -> tuple[int, int, Any] | None:
        return next(((d, e, c) for d, e, ok, c in self.calls if not ok), None)


def pyopenssl_context(pki: Pki, client_ca: Path | None = None,
                      crl: Path | None = None) -> SSL.Context:
    ctx = SSL.Context(SSL.TLS_SERVER_METHOD)
    ctx.set_min_proto_version(SSL.TLS1_2_VERSION)
    ctx.set_options(SSL.OP_NO_RENEGOTIATION | SSL.OP_NO_TICKET | SSL.OP_NO_COMPRESSION
                    | SSL.OP_CIPHER_SERVER_PREFERENCE)
    ctx.set_cipher_list(TLS12_CIPHERS.encode())
    ctx.use_certificate_chain_file(str(pki.server.chain))
    ctx.use_privatekey_file(str(pki.server.key))
    ctx.check_privatekey()
    ctx.load_verify_locations(str(client_ca or pki.ca.trust_bundle))
    store = ctx.get_cert_store()
    assert store is not None
    for one in parse_crls((crl or pki.crl).read_bytes()):
        store.add_crl(one)
    store.set_flags(ocrypto.X509StoreFlags.CRL_CHECK | ocrypto.X509StoreFlags.CRL_CHECK_ALL)
    ctx.set_session_cache_mode(SSL.SESS_CACHE_OFF)

    def verify(conn: SSL.Connection, cert: Any, errno: int, depth: int, ok: int) -> bool:
        seen = conn.get_app_data()
        if seen is not None:
            seen.calls.append((depth, errno, ok, cert))
        return bool(ok)  # OpenSSL's own verdict: its error, hence its fatal alert, stays

    ctx.set_verify(SSL.VERIFY_PEER | SSL.VERIFY_FAIL_IF_NO_PEER_CERT, verify)
    return ctx


class PyoServer:
    def __init__(self, ctx: SSL.Context, seen: Seen | None = None) -> None:
        self.conn = SSL.Connection(ctx, None)
        self.conn.set_accept_state()
        self.conn.set_app_data(seen)

    def step(self) -> bool:
        try:
            self.conn.do_handshake()
            return True
        except SSL.WantReadError:
            return False

    def feed(self, data: bytes) -> None:
        if data:
            self.conn.bio_write(data)

    def take(self) -> bytes:
        out = b""
        while True:
            try:
                out += self.conn.bio_read(RECEIVE_SIZE)
            except SSL.WantReadError:
                return out

    def peer_der(self) -> bytes | None:
        c = self.conn.get_peer_certificate(as_cryptography=True)
        return c.public_bytes(serialization.Encoding.DER) if c else None


# -- the client and the handshake loop --------------------------------------------------------


def client_context(pki: Pki, who: IssuedFiles, version: str) -> ssl.SSLContext:
    ctx = ssl.create_default_context(cafile=str(pki.ca.trust_bundle))
    if version == "1.2":
        ctx.maximum_version = ssl.TLSVersion.TLSv1_2
    else:
        ctx.minimum_version = ssl.TLSVersion.TLSv1_3
    ctx.load_cert_chain(str(who.chain), str(who.key))
    return ctx


def handshake(server: StdServer | PyoServer, client_ctx: ssl.SSLContext) -> HandshakeResult:
    """One full handshake against either server (:func:`memory_handshake.run_handshake`);
    only the server's calls are timed, in nanoseconds."""
    return run_handshake(server, client_ctx, server_errors=(ssl.SSLError, SSL.Error))


# -- benchmarks -------------------------------------------------------------------------------


def bench_handshakes(pki: Pki, runs: int, n: int) -> dict[tuple[str, str], list[float]]:
    ctxs: dict[str, Callable[[], StdServer | PyoServer]] = {}
    std_ctx = stdlib_context(pki)
    pyo_ctx = pyopenssl_context(pki)
    ctxs["stdlib ssl"] = lambda: StdServer(std_ctx)
    ctxs["pyOpenSSL"] = lambda: PyoServer(pyo_ctx, Seen())
    rates: dict[tuple[str, str], list[float]] = {}
    for version in ("1.2", "1.3"):
        cctx = client_context(pki, pki.clients["good"], version)
        for _ in range(runs):
            for name, make in ctxs.items():  # interleaved, so drifts hit both alike
                total = 0
                for _ in range(n):
                    r = handshake(make(), cctx)
                    if not r.ok:
                        raise SystemExit(f"{name} TLS {version}: handshake failed: "
                                         f"{r.server_error or r.client_error}")
                    total += int(r.server_time)
                rates.setdefault((name, version), []).append(n / (total / 1e9))
    return rates


def bench_records(pki: Pki, runs: int, n: int) -> dict[tuple[str, str, int], list[float]]:
    """ns per record on the server: decrypt a client record, encrypt a reply record."""
    out: dict[tuple[str, str, int], list[float]] = {}
    cctx = client_context(pki, pki.clients["good"], "1.3")
    clock = time.perf_counter_ns
    for _ in range(runs):
        for name, make in (("stdlib ssl", lambda: StdServer(stdlib_context_cached)),
                           ("pyOpenSSL", lambda: PyoServer(pyo_context_cached))):
            r = handshake(make(), cctx)
            assert r.ok and r.client is not None and r.c_out is not None
            srv = r.server
            for size in (12, 260):
                payload = bytes(range(size % 256)) * (size // 256) + bytes(size % 256)
                payload = payload[:size].ljust(size, b"\x01")
                cts = []
                for _ in range(n):
                    r.client.write(payload)
                    cts.append(r.c_out.read())
                if isinstance(srv, StdServer):
                    inc, obj, outb = srv.inc, srv.obj, srv.out
                    t0 = clock()
                    for ct in cts:
                        inc.write(ct)
                        obj.read(RECEIVE_SIZE)
                    t1 = clock()
                    for _ in range(n):
                        obj.write(payload)
                        outb.read()
                    t2 = clock()
                else:
                    conn = srv.conn
                    t0 = clock()
                    for ct in cts:
                        conn.bio_write(ct)
                        conn.recv(RECEIVE_SIZE)
                    t1 = clock()
                    for _ in range(n):
                        conn.send(payload)
                        conn.bio_read(RECEIVE_SIZE)
                    t2 = clock()
                out.setdefault((name, "decrypt", size), []).append((t1 - t0) / n)
                out.setdefault((name, "encrypt", size), []).append((t2 - t1) / n)
    return out


# -- probe ------------------------------------------------------------------------------------


def facts(cert: Any) -> str:
    c = cert.to_cryptography() if hasattr(cert, "to_cryptography") else cert
    fp = hashlib.sha256(c.public_bytes(serialization.Encoding.DER)).hexdigest()
    return (f"subject={c.subject.rfc4514_string()} issuer={c.issuer.rfc4514_string()} "
            f"serial={c.serial_number:x} sha256={fp[:16]}... "
            f"not_after={c.not_valid_after_utc.isoformat()}")


def probe(pki: Pki) -> int:
    cases = ["good", "revoked", "expired", "not_yet_valid", "unknown_ca",
             "revoked_intermediate"]
    want = {"good": None, "revoked": "SSLV3_ALERT_CERTIFICATE_REVOKED",
            "expired": "SSLV3_ALERT_CERTIFICATE_EXPIRED",
            "not_yet_valid": "SSLV3_ALERT_BAD_CERTIFICATE",
            "unknown_ca": "TLSV1_ALERT_UNKNOWN_CA",
            "revoked_intermediate": "SSLV3_ALERT_CERTIFICATE_REVOKED"}
    failures = 0
    for case in cases:
        who = pki.clients[case]
        leaf_serial = x509.load_pem_x509_certificate(who.cert.read_bytes()).serial_number
        ca = pki.revoked_int_ca if case == "revoked_intermediate" else None
        crl = pki.revoked_int_crl if case == "revoked_intermediate" else None
        for version in ("1.2", "1.3"):
            cctx = client_context(pki, who, version)
            std = handshake(StdServer(stdlib_context(pki, ca, crl)), cctx)
            seen = Seen()
            pyo = handshake(PyoServer(pyopenssl_context(pki, ca, crl), seen), cctx)
            print(f"\n== {case}, TLS {version}")
            print(f"  client got, stdlib server:    {std.client_error or 'handshake ok'}")
            print(f"  client got, pyOpenSSL server: {pyo.client_error or 'handshake ok'}")
            if std.client_error != pyo.client_error or pyo.client_error != want[case]:
                failures += 1
                print(f"  !! expected {want[case]}")
            if isinstance(std.server_error, ssl.SSLCertVerificationError):
                print(f"  stdlib server error: verify_code={std.server_error.verify_code} "
                      f"({std.server_error.verify_message}); presented certificate: none "
                      "available (ssl has no callback, getpeercert() is empty on failure)")
            for depth, errno, ok, cert in seen.calls:
                print(f"  callback: depth={depth} errno={errno} ok={ok} {facts(cert)}")
            leaf = seen.leaf()
            got_leaf = leaf is not None and leaf.to_cryptography().serial_number == leaf_serial
            print(f"  leaf seen by the callback: {'yes' if got_leaf else 'NO'}")
            conn = pyo.server.conn
            chain = conn.get_peer_cert_chain(as_cryptography=True) or []
            print(f"  get_peer_cert_chain after the handshake: {len(chain)} certificate(s)"
                  + "".join(f"\n      [{i}] {facts(c)}" for i, c in enumerate(chain)))
            if pyo.ok:
                vchain = conn.get_verified_chain(as_cryptography=True) or []
                print("  get_verified_chain: "
                      + " <- ".join(c.subject.rfc4514_string() for c in vchain))
    print(f"\n{failures} case(s) where the alert differs from the stdlib server or the "
          "expected one")
    return 1 if failures else 0


# -- main -------------------------------------------------------------------------------------

stdlib_context_cached: ssl.SSLContext
pyo_context_cached: SSL.Context


def main() -> int:
    global stdlib_context_cached, pyo_context_cached
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--runs", type=int, default=7)
    ap.add_argument("--n", type=int, default=300, help="handshakes per run")
    ap.add_argument("--records", type=int, default=20000, help="records per run and size")
    ap.add_argument("--probe", action="store_true", help="the rejection probe only")
    args = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="mbsec-bench-hs-") as tmp:
        pki = build_pki(Path(tmp))
        if args.probe:
            return probe(pki)
        stdlib_context_cached = stdlib_context(pki)
        pyo_context_cached = pyopenssl_context(pki)
        cpu = next((ln.split(":", 1)[1].strip() for ln in
                    Path("/proc/cpuinfo").read_text().splitlines()
                    if ln.startswith("model name")), platform.processor())
        print(f"CPU: {cpu}; Python {platform.python_version()}")
        print(f"stdlib ssl: {ssl.OPENSSL_VERSION}")
        print(f"pyOpenSSL {SSL.__version__ if hasattr(SSL, '__version__') else ''}"
              f"{__import__('OpenSSL').__version__}: "
              f"{SSL.OpenSSL_version(SSL.OPENSSL_VERSION).decode()}")
        rates = bench_handshakes(pki, args.runs, args.n)
        print(f"\nfull mutual-TLS handshakes, server CPU only, ECDSA P-256, "
              f"median of {args.runs} runs x {args.n}:")
        print(f"  {'server':12} {'TLS':4} {'handshakes/s':>13} {'min':>8} {'max':>8}")
        for (name, version), vals in rates.items():
            print(f"  {name:12} {version:4} {statistics.median(vals):13.0f} "
                  f"{min(vals):8.0f} {max(vals):8.0f}")
        recs = bench_records(pki, args.runs, args.records)
        print(f"\nper application record on the server, TLS 1.3 (AES-128-GCM), "
              f"median of {args.runs} runs x {args.records}:")
        print(f"  {'server':12} {'op':8} {'bytes':>5} {'ns/record':>10}")
        for (name, op, size), vals in sorted(recs.items(), key=lambda kv: (kv[0][1],
                                                                              kv[0][2])):
            print(f"  {name:12} {op:8} {size:5d} {statistics.median(vals):10.0f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
