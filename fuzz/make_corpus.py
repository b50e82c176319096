"""Write the seed corpus of every fuzz target into fuzz/corpus/<target>/ (deterministic names).

    .venv/bin/python fuzz/make_corpus.py

The seeds are valid inputs (one request per function code, a reply to each, the example
policies, the sample configuration, real certificates and a real TLS 1.2 client flight) plus a
few known-bad ones; libFuzzer mutates from there. Rerun after a protocol change and commit the
result; libFuzzer adds what it finds to the first corpus directory it is given.
"""

from __future__ import annotations

import contextlib
import hashlib
import ssl
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from mbsec.identity import encode_role  # noqa: E402
from mbsec.modbus import encode_adu  # noqa: E402
from mbsec.pki.ca import CertificateAuthority  # noqa: E402

CORPUS = ROOT / "fuzz" / "corpus"

REQUESTS = [
    "0100000010", "0200100007", "030064000a", "0400000001", "050010ff00", "0500100000",
    "0600640123", "07", "0800001234", "08000a0000", "0b", "0c", "0f0013000a02cd01",
    "1000640002040001000a", "11", "140e0600040001000206000300090002", "150d06000400070003"
    "06af04be100d", "16000400120025", "17000300060008000306000a000b000c", "180004",
    "2b0e0100", "2b0e0403", "2b0d0102", "41010203", "8101", "", "0300fff00020",
]

#: request PDU hex -> a reply PDU hex that answers it
REPLIES = {
    "0100000010": "0102cd6b", "0200100007": "020135", "030064000a":
        "0314" + "00010002000300040005000600070008000900" + "0a",
    "0400000001": "04020007", "050010ff00": "050010ff00", "0600640123": "0600640123",
    "07": "076d", "0800001234": "0800001234", "08000a0000": "08000a0000", "0b": "0bffff0108",
    "0c": "0c080000010801210020", "0f0013000a02cd01": "0f0013000a",
    "1000640002040001000a": "1000640002", "11": "11030aff00",
    "140e0600040001000206000300090002": "140c050600010002050600030004",
    "16000400120025": "16000400120025",
    "17000300060008000306000a000b000c": "170c000100020003000400050006",
    "180004": "1800060002000100ff",
    "2b0e0100": "2b0e010100000300034162630103312e3002025638", "2b0e0403": "2b0e0401000001030141",
    "2b0d0102": "2b0d0102aa", "41010203": "4101",
}


def write(target: str, name: str, data: bytes) -> None:
    d = CORPUS / target
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{name}-{hashlib.sha1(data).hexdigest()[:12]}").write_bytes(data)


def tls12_client_flight(ca: CertificateAuthority, tmp: Path) -> bytes:
    """The bytes a TLS 1.2 client with a certificate sends during the handshake."""
    server = ca.issue("server", "fuzz-server", dns=("localhost",), out_dir=tmp, name="server")
    client = ca.issue("client", "fuzz-client", role="operator", out_dir=tmp, name="client")
    sctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    sctx.load_cert_chain(str(server.chain), str(server.key))
    sctx.load_verify_locations(str(ca.trust_bundle))
    sctx.verify_mode = ssl.CERT_REQUIRED
    cctx = ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT)
    cctx.maximum_version = ssl.TLSVersion.TLSv1_2
    cctx.load_verify_locations(str(ca.trust_bundle))
    cctx.load_cert_chain(str(client.chain), str(client.key))
    bios = [ssl.MemoryBIO() for _ in range(4)]
    s = sctx.wrap_bio(bios[0], bios[1], server_side=True)
    c = cctx.wrap_bio(bios[2], bios[3], server_hostname="localhost")
    sent = b""
    for _ in range(10):
        for obj in (c, s):
            with contextlib.suppress(ssl.SSLWantReadError):
                obj.do_handshake()
        out = bios[3].read()
        sent += out
        bios[0].write(out)
        bios[2].write(bios[1].read())
    return sent


def main() -> None:
    for hexpdu in REQUESTS:
        write("request", f"fc{hexpdu[:2] or 'empty'}", bytes.fromhex(hexpdu))
    for req, rep in REPLIES.items():
        r = bytes.fromhex(req)
        write("response", f"fc{req[:2]}", bytes((len(r),)) + r + b"\x01" + bytes.fromhex(rep))
        write("response", f"fc{req[:2]}-exc", bytes((len(r),)) + r + b"\x01"
              + bytes((r[0] | 0x80, 2)))
    adus = [encode_adu(i, 1, bytes.fromhex(h)) for i, h in enumerate(REQUESTS) if h]
    write("mbap", "one", b"\x00" + adus[2])
    write("mbap", "pipelined", b"\x03" + b"".join(adus))
    write("mbap", "bad-pid", b"\x00" + adus[0][:2] + b"\x00\x01" + adus[0][4:])
    write("mbap", "bad-length", b"\x00\x00\x01\x00\x00\x01\x00\x01")
    for role in ("operator", "engineer", "x" * 128, "Betriebsführer"):
        write("role", "role", encode_role(role))
    write("role", "long-form", b"\x0c\x81\x80" + b"a" * 128)
    for policy in sorted((ROOT / "policies").glob("*.yaml")):
        write("policy", policy.stem, policy.read_bytes())
    write("settings", "sample", (ROOT / "deploy" / "mbsec.toml").read_bytes())
    write("settings", "minimal", b'listen = ["127.0.0.1:8802"]\npolicy = "p.yaml"\n[tls]\n'
          b'cert = "c.pem"\nkey = "k.pem"\nclient_ca = "ca.pem"\n[upstreams.plc]\n'
          b'host = "10.0.0.5"\nunit_ids = [1, 2]\nunit_rewrite = {2 = 7}\n')
    with tempfile.TemporaryDirectory() as tmp:
        t = Path(tmp)
        ca = CertificateAuthority.init(t / "ca", common_name="Fuzz CA")
        for kind, cn, role in (("client", "op-1", "operator"), ("client", "norole", None),
                               ("server", "srv", None)):
            files = ca.issue(kind, cn, role=role, out_dir=t / "out", name=cn)
            der = ssl.PEM_cert_to_DER_cert(files.cert.read_text())
            write("certificate", cn, der)
        flight = tls12_client_flight(ca, t / "tls")
        for size in (0, 3, 255):
            write("tls_sniff", f"tls12-flight-{size}", bytes((size,)) + flight)
    print(f"corpus written to {CORPUS}")


if __name__ == "__main__":
    main()
