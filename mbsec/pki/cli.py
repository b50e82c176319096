"""``mbsec-pki``: the certificate lifecycle of a plant, from an offline host.

Exit codes (also in docs/pki.md):
  0  success (renew: renewed, or nothing due)
  1  error: a clear one-line message on stderr, never a traceback
  2  usage error (bad option)
  3  renew --check: at least one certificate is due for renewal
  4  verify: the certificate does not verify
"""

from __future__ import annotations

import argparse
import datetime as dt
import getpass
import json
import os
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization

from mbsec.identity import IdentityError, read_role
from mbsec.pki.ca import (
    DEFAULT_RENEW_THRESHOLD,
    REVOCATION_REASONS,
    CertificateAuthority,
    create_csr,
    csr_requested_role,
    renewal_due,
    renewal_time,
    san_values,
    serial_hex,
)
from mbsec.pki.files import (
    KEY_TYPES,
    PKIError,
    ensure_dir,
    generate_key,
    key_is_encrypted,
    load_certificate,
    read_bytes,
    write_file,
    write_key,
)
from mbsec.pki.profiles import Profile, list_profiles, load_profile, search_path
from mbsec.pki.verify import verify_certificate

EXIT_OK, EXIT_ERROR, EXIT_USAGE, EXIT_DUE, EXIT_INVALID = 0, 1, 2, 3, 4
DEFAULT_DIR = "ca"


class _Parser(argparse.ArgumentParser):
    """Keeps argparse's messages but lets main() return the exit code instead of exiting."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        kwargs.setdefault("formatter_class", argparse.RawDescriptionHelpFormatter)
        super().__init__(*args, **kwargs)


def _examples(*lines: str) -> str:
    return "examples:\n" + "\n".join(f"  {line}" for line in lines)


def _now(text: str | None) -> dt.datetime:
    if text is None:
        return dt.datetime.now(dt.UTC)
    try:
        t = dt.datetime.fromisoformat(text)
    except ValueError:
        raise PKIError(f"--now {text!r} is not an ISO 8601 time (2030-01-31T12:00:00Z)") from None
    return t if t.tzinfo else t.replace(tzinfo=dt.UTC)


def _read_passphrase(path: str | None, prompt: bool, what: str, *, confirm: bool) -> bytes | None:
    """A passphrase from a file or the terminal, never from the command line (ps shows argv)."""
    if path is not None:
        data = read_bytes(Path(path), "passphrase").rstrip(b"\r\n")
        if not data:
            raise PKIError(f"{path}: passphrase file is empty")
        return data
    if not prompt:
        return None
    if not sys.stdin.isatty():
        raise PKIError(f"no terminal to ask for the {what} passphrase: use a --*passphrase-file")
    first = getpass.getpass(f"{what} passphrase: ")
    if not first:
        raise PKIError("empty passphrase")
    if confirm and getpass.getpass(f"{what} passphrase (again): ") != first:
        raise PKIError("passphrases do not match")
    return first.encode()


def _open_ca(args: argparse.Namespace, *, signing: bool = True) -> CertificateAuthority:
    directory = Path(args.dir)
    ca = CertificateAuthority.open(directory)
    if signing and ca.keys_encrypted:
        pw = _read_passphrase(args.ca_passphrase_file, True, "CA key", confirm=False)
        ca = CertificateAuthority.open(directory, passphrase=pw)
    return ca


def _profile(args: argparse.Namespace, kind: str | None) -> Profile | None:
    if not getattr(args, "profile", None):
        return None
    dirs = search_path(Path(args.dir), Path(args.profiles_dir) if args.profiles_dir else None)
    prof = load_profile(args.profile, dirs)
    if kind is not None and prof.kind != kind:
        raise PKIError(f"profile {prof.name!r} is for {prof.kind} certificates, not {kind}")
    return prof


def _days_left(cert: x509.Certificate, now: dt.datetime) -> float:
    return (cert.not_valid_after_utc - now).total_seconds() / 86400


# --- commands -------------------------------------------------------------------------------

def cmd_init(args: argparse.Namespace) -> int:
    pw = _read_passphrase(args.ca_passphrase_file, args.encrypt_keys, "CA key", confirm=True)
    ca = CertificateAuthority.init(Path(args.dir), common_name=args.cn, key_type=args.key_type,
                                   days=args.days, intermediate=args.intermediate, passphrase=pw,
                                   organization=args.org, now=_now(args.now))
    print(f"created CA '{ca.root.subject.rfc4514_string()}' in {ca.directory}")
    if ca.intermediate is not None:
        print(f"  issuing CA: {ca.intermediate.subject.rfc4514_string()} (intermediate.crt)")
    print(f"  trust bundle (give to verifiers): {ca.trust_bundle}")
    print(f"  private keys (back up offline):   {ca.directory / 'private'}"
          + (" [encrypted]" if pw else " [not encrypted]"))
    return EXIT_OK


def _key_pw(args: argparse.Namespace) -> bytes | None:
    return _read_passphrase(args.key_passphrase_file, args.key_passphrase_prompt, "new key",
                            confirm=True)


@dataclass(frozen=True)
class _LeafChoices:
    """What a new leaf gets: the command line wins over the profile (issue and sign)."""

    profile: Profile | None
    role: str | None
    days: int | None
    organization: str | None
    organizational_units: tuple[str, ...]


def _leaf_choices(args: argparse.Namespace) -> _LeafChoices:
    prof = _profile(args, args.kind)
    role = args.role if args.role is not None else (prof.role if prof else None)
    return _LeafChoices(
        profile=prof,
        role=None if args.no_role else role,
        days=args.days if args.days is not None else (prof.days if prof else None),
        organization=args.org or (prof.organization if prof else None),
        organizational_units=tuple(args.ou) or (prof.organizational_units if prof else ()),
    )


def cmd_issue(args: argparse.Namespace) -> int:
    leaf = _leaf_choices(args)
    prof, role = leaf.profile, leaf.role
    key_pw = _key_pw(args)
    ca = _open_ca(args)
    files = ca.issue(
        args.kind, args.common_name, role=role, dns=args.dns, ips=args.ip, days=leaf.days,
        out_dir=Path(args.out_dir) if args.out_dir else None, name=args.name,
        key_type=args.key_type or (prof.key_type if prof else None),
        organization=leaf.organization, organizational_units=leaf.organizational_units,
        key_passphrase=key_pw, force=args.force, now=_now(args.now))
    cert = load_certificate(files.cert)
    print(f"issued {args.kind} certificate serial {serial_hex(files.serial)}"
          f" for '{cert.subject.rfc4514_string()}'"
          + (f" role={role}" if role else " (no role)")
          + f", valid until {cert.not_valid_after_utc:%Y-%m-%d}")
    print(f"  certificate: {files.cert}\n  chain:       {files.chain}\n  key (0600):  {files.key}")
    return EXIT_OK


def cmd_csr(args: argparse.Namespace) -> int:
    key_out = Path(args.key_out or f"{args.common_name}.key")
    csr_out = Path(args.csr_out or f"{args.common_name}.csr")
    if not args.force:
        for p in (key_out, csr_out):
            if p.exists():
                raise PKIError(f"{p}: already exists (use --force to overwrite)")
    key_pw = _key_pw(args)
    key = generate_key(args.key_type)
    csr = create_csr(args.common_name, key=key, dns=args.dns, ips=args.ip, role=args.role,
                     organization=args.org, organizational_units=args.ou)
    for p in (key_out, csr_out):
        ensure_dir(p.parent)
    write_key(key_out, key, passphrase=key_pw, overwrite=args.force)
    write_file(csr_out, csr.public_bytes(serialization.Encoding.PEM), overwrite=args.force)
    print(f"key (0600, stays on this device): {key_out}\nCSR (send to the CA): {csr_out}")
    return EXIT_OK


def cmd_sign(args: argparse.Namespace) -> int:
    leaf = _leaf_choices(args)
    role = leaf.role
    data = read_bytes(Path(args.csr), "CSR")
    try:
        csr = (x509.load_pem_x509_csr(data) if b"-----BEGIN" in data
               else x509.load_der_x509_csr(data))
    except ValueError:
        raise PKIError(f"{args.csr}: not a readable CSR (expected PEM 'BEGIN CERTIFICATE "
                       "REQUEST' or DER; create one with 'mbsec-pki csr')") from None
    asked = csr_requested_role(csr)
    if asked is not None and asked != role:
        print(f"note: the CSR asks for role {asked!r}; ignored (the role comes from --role or "
              f"--profile, now: {role!r})", file=sys.stderr)
    out = Path(args.out) if args.out else Path(args.csr).with_suffix(".crt")
    ca = _open_ca(args)
    signed = ca.sign_csr(
        data, args.kind, out=out, role=role, days=leaf.days,
        common_name=args.cn, dns=args.dns, ips=args.ip, use_csr_sans=args.use_csr_sans,
        organization=leaf.organization, organizational_units=leaf.organizational_units,
        force=args.force, now=_now(args.now))
    cert = load_certificate(signed.cert)
    dns, ips, _ = san_values(cert)
    print(f"signed {args.kind} certificate serial {serial_hex(signed.serial)} for "
          f"'{cert.subject.rfc4514_string()}'" + (f" role={role}" if role else " (no role)")
          + (f" names={','.join(dns + ips)}" if dns or ips else ""))
    print(f"  certificate: {signed.cert}\n  chain:       {signed.chain}")
    return EXIT_OK


def cmd_renew(args: argparse.Namespace) -> int:
    now = _now(args.now)
    if not 0 < args.threshold <= 1:
        raise PKIError("--threshold must be a fraction in (0, 1], e.g. 0.667")
    if len(args.cert) > 1 and (args.key or args.chain):
        raise PKIError("--key/--chain only work with a single certificate")
    due: list[Path] = []
    for c in args.cert:
        cert = load_certificate(Path(c))
        when = renewal_time(cert, args.threshold)
        cn = cert.subject.rfc4514_string()
        if renewal_due(cert, now=now, threshold=args.threshold) or (args.force and not args.check):
            due.append(Path(c))
            print(f"{c}: due ({cn}, expires {cert.not_valid_after_utc:%Y-%m-%d}, "
                  f"{_days_left(cert, now):.0f} days left)")
        else:
            print(f"{c}: not due ({cn}, renews from {when:%Y-%m-%d %H:%M} UTC)")
    if args.check:
        return EXIT_DUE if due else EXIT_OK
    if not due:
        return EXIT_OK
    key_pw = _read_passphrase(args.key_passphrase_file, False, "key", confirm=False)
    ca = _open_ca(args)
    renewed: list[str] = []
    for path in due:
        if key_pw is None and not args.reuse_key:
            key_p = Path(args.key) if args.key else path.with_suffix(".key")
            if key_p.exists() and key_is_encrypted(key_p):
                raise PKIError(f"{key_p}: is encrypted; give --key-passphrase-file to "
                               "encrypt the new key the same way")
        result = ca.renew(path, key_path=args.key, chain_path=args.chain, now=now,
                          threshold=args.threshold, force=True, reuse_key=args.reuse_key,
                          days=args.days, key_passphrase=key_pw)
        assert result is not None  # force=True always renews
        renewed.append(str(result.cert))
        print(f"{path}: renewed, serial {serial_hex(result.old_serial)} -> "
              f"{serial_hex(result.serial)}" + (" (new key)" if result.new_key else ""))
    if args.exec:
        env = {**os.environ, "MBSEC_PKI_RENEWED": " ".join(renewed)}
        proc = subprocess.run(args.exec, shell=True, env=env, check=False)
        if proc.returncode != 0:
            raise PKIError(f"--exec hook failed with exit code {proc.returncode}: {args.exec}")
    return EXIT_OK


def cmd_revoke(args: argparse.Namespace) -> int:
    ca = _open_ca(args, signing=not args.no_crl)
    target: str | Path = Path(args.target) if Path(args.target).is_file() else args.target
    serial = ca.revoke(target, args.reason, now=_now(args.now))
    print(f"revoked serial {serial_hex(serial)} (reason {args.reason})")
    if not args.no_crl:
        out = ca.write_crl(next_update_days=args.next_update_days, now=_now(args.now))
        print(f"CRL updated: {out} (publish it to the proxy and reload it)")
    return EXIT_OK


def cmd_crl(args: argparse.Namespace) -> int:
    ca = _open_ca(args)
    out = ca.write_crl(Path(args.out) if args.out else None,
                       next_update_days=args.next_update_days, now=_now(args.now))
    n = sum(1 for e in ca.entries() if e.get("status") == "revoked")
    print(f"wrote {out}: {n} revoked certificate(s), next update in {args.next_update_days} days")
    return EXIT_OK


def _status(entry: dict[str, Any], now: dt.datetime, within: int) -> str:
    if entry.get("status") == "revoked":
        return "revoked"
    end = dt.datetime.fromisoformat(entry["not_after"])
    if now > end:
        return "expired"
    if entry.get("renewed_by"):
        return "superseded"  # still valid, but a renewal replaced it in the field
    if end - now < dt.timedelta(days=within):
        return "expiring"
    return "valid"


def cmd_list(args: argparse.Namespace) -> int:
    ca = _open_ca(args, signing=False)
    now = _now(args.now)
    rows = []
    for e in ca.entries():
        st = _status(e, now, args.within)
        if args.status in ("all", st):
            rows.append({**e, "state": st})
    if args.json:
        print(json.dumps(rows, indent=2))
        return EXIT_OK
    if not rows:
        print("no certificates" + ("" if args.status == "all" else f" with status {args.status}"))
        return EXIT_OK
    print(f"{'SERIAL':<42} {'KIND':<6} {'STATE':<10} {'EXPIRES':<10} {'ROLE':<12} COMMON NAME")
    for r in rows:
        print(f"{r['serial']:<42} {r['kind']:<6} {r['state']:<10} {r['not_after'][:10]:<10} "
              f"{(r.get('role') or '-'):<12} {r.get('common_name') or '-'}")
    return EXIT_OK


def cmd_show(args: argparse.Namespace) -> int:
    cert = load_certificate(Path(args.cert))
    now = _now(args.now)
    try:
        role: str | None = read_role(cert)
        role_text = role if role is not None else "(none: the NULL role, R-23)"
    except IdentityError as exc:
        role_text = f"INVALID: {exc.message} ({exc.reason})"
    dns, ips, uris = san_values(cert)
    try:
        eku = [o._name for o in
               cert.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value]
    except (x509.ExtensionNotFound, x509.DuplicateExtension, ValueError):
        eku = []
    left = _days_left(cert, now)
    state = "EXPIRED" if left < 0 else ("not yet valid" if now < cert.not_valid_before_utc
                                        else f"{left:.0f} days left")
    lines = [
        f"subject:     {cert.subject.rfc4514_string()}",
        f"role:        {role_text}",
        f"DNS names:   {', '.join(dns) or '-'}",
        f"IP addresses: {', '.join(ips) or '-'}",
    ]
    if uris:
        lines.append(f"URIs:        {', '.join(uris)}")
    lines += [
        f"usage:       {', '.join(eku) or '-'}",
        f"valid:       {cert.not_valid_before_utc:%Y-%m-%d %H:%M} .. "
        f"{cert.not_valid_after_utc:%Y-%m-%d %H:%M} UTC ({state})",
        f"renew from:  {renewal_time(cert):%Y-%m-%d %H:%M} UTC (2/3 of the lifetime)",
        f"serial:      {serial_hex(cert.serial_number)}",
        f"sha256:      {cert.fingerprint(hashes.SHA256()).hex()}",
        f"issuer:      {cert.issuer.rfc4514_string()}",
    ]
    print("\n".join(lines))
    return EXIT_OK


def cmd_verify(args: argparse.Namespace) -> int:
    if args.ca is not None:  # the old spelling, kept working
        print("warning: --ca is deprecated, use --dir (a CA directory or a CA bundle)",
              file=sys.stderr)
    trust = args.ca if args.ca is not None else args.dir
    report = verify_certificate(
        Path(args.cert), Path(trust), chain_path=Path(args.chain) if args.chain else None,
        crl_paths=[Path(c) for c in args.crl], purpose=args.purpose, now=_now(args.now))
    for w in report.warnings:
        print(f"warning: {w}", file=sys.stderr)
    if report.ok:
        role = report.identity.role if report.identity else None
        print(f"{args.cert}: OK ({report.leaf.subject.rfc4514_string()}"
              + (f", role {role}" if role else ", no role")
              + (", not revoked" if args.crl else ", revocation not checked: no --crl") + ")")
        return EXIT_OK
    for p in report.problems:
        print(f"{args.cert}: FAILED: {p}", file=sys.stderr)
    return EXIT_INVALID


def cmd_profiles(args: argparse.Namespace) -> int:
    dirs = search_path(Path(args.dir), Path(args.profiles_dir) if args.profiles_dir else None)
    for p in list_profiles(dirs):
        print(f"{p.name:<26} {p.kind:<6} role={p.role or '-':<10} days={p.days or '-':<5} "
              f"{p.description}")
    return EXIT_OK


# --- parser ---------------------------------------------------------------------------------

def _dir_opt(p: argparse.ArgumentParser, *, passphrase: bool = True) -> None:
    p.add_argument("--dir", default=os.environ.get("MBSEC_PKI_DIR", DEFAULT_DIR),
                   help="CA directory (default: $MBSEC_PKI_DIR or ./ca)")
    if passphrase:
        p.add_argument("--ca-passphrase-file", metavar="FILE",
                       help="file holding the CA key passphrase (else prompted if encrypted)")


def _now_opt(p: argparse.ArgumentParser) -> None:
    p.add_argument("--now", metavar="ISO8601",
                   help="pretend the current time is this (planning and tests); default: now")


def _key_pw_opts(p: argparse.ArgumentParser) -> None:
    g = p.add_mutually_exclusive_group()
    g.add_argument("--key-passphrase-file", metavar="FILE",
                   help="encrypt the new private key with the passphrase in FILE")
    g.add_argument("--key-passphrase-prompt", action="store_true",
                   help="encrypt the new private key with a passphrase typed at a prompt")


def _names_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--dns", action="append", default=[], metavar="NAME",
                   help="DNS subject alternative name (repeatable)")
    p.add_argument("--ip", action="append", default=[], metavar="ADDR",
                   help="IP subject alternative name (repeatable)")
    p.add_argument("--org", help="organization (O) of the subject")
    p.add_argument("--ou", action="append", default=[], metavar="UNIT",
                   help="organizational unit (OU) of the subject (repeatable)")


def _role_opts(p: argparse.ArgumentParser) -> None:
    p.add_argument("--profile", metavar="NAME",
                   help="profile from pki/profiles (or a .yaml path): kind, role, days, key type")
    p.add_argument("--profiles-dir", metavar="DIR", help="look for profiles here first")
    g = p.add_mutually_exclusive_group()
    g.add_argument("--role", help="Modbus role written in the non-critical role extension "
                   "(client certificates only)")
    g.add_argument("--no-role", action="store_true", help="no role even if the profile has one")
    p.add_argument("--days", type=int, help="lifetime in days (default: profile, else "
                   "397 server / 365 client)")


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="mbsec-pki",
        description="Certificates for Modbus/TCP Security: a small offline CA, the role "
                    "extension, renewal, revocation.",
        epilog=_examples(
            "mbsec-pki init --dir ca --cn 'Plant 1 CA' --intermediate",
            "mbsec-pki issue server mbsec.plant.example --profile proxy-server --ip 10.20.0.2",
            "mbsec-pki issue client hmi-01 --profile hmi-operator --out-dir certs",
            "mbsec-pki renew /etc/mbsec/tls/server.crt --exec 'systemctl reload mbsec'",
            "",
            "exit codes: 0 ok, 1 error, 2 usage, 3 renewal due (renew --check), "
            "4 verification failed",
        ))
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help_: str, func: Callable[[argparse.Namespace], int],
            *examples: str) -> argparse.ArgumentParser:
        p = sub.add_parser(name, help=help_, description=help_, epilog=_examples(*examples),
                           formatter_class=argparse.RawDescriptionHelpFormatter)
        p.set_defaults(func=func)
        return p

    p = add("init", "create a CA (root, optionally an issuing intermediate)", cmd_init,
            "mbsec-pki init --dir ca --cn 'Plant 1 CA'",
            "mbsec-pki init --dir ca --cn 'Plant 1 CA' --intermediate --key-type rsa-3072",
            "mbsec-pki init --dir ca --encrypt-keys --ca-passphrase-file /media/usb/ca.pass")
    _dir_opt(p)
    p.add_argument("--cn", default="mbsec CA", help="common name of the root (default: mbsec CA)")
    p.add_argument("--org", help="organization (O) of the CA subject")
    p.add_argument("--key-type", choices=KEY_TYPES, default="ec-p256",
                   help="CA key type (default ec-p256)")
    p.add_argument("--days", type=int, default=3650, help="CA lifetime in days (default 3650)")
    p.add_argument("--intermediate", action="store_true",
                   help="also create an intermediate CA that signs the leaves")
    p.add_argument("--encrypt-keys", action="store_true",
                   help="encrypt the CA keys (passphrase from --ca-passphrase-file or a prompt)")
    _now_opt(p)

    p = add("issue", "issue a server or client certificate with a new key", cmd_issue,
            "mbsec-pki issue server mbsec.plant.example --dns mbsec.plant.example --ip 10.20.0.2",
            "mbsec-pki issue client hmi-01 --role operator --out-dir certs",
            "mbsec-pki issue client eng-ws-03 --profile engineering-workstation",
            "mbsec-pki issue client historian-01 --profile historian   # no role: policy uses CN")
    _dir_opt(p)
    p.add_argument("kind", choices=("server", "client"))
    p.add_argument("common_name", metavar="CN", help="subject common name")
    _role_opts(p)
    _names_opts(p)
    p.add_argument("--key-type", choices=KEY_TYPES, help="key type (default: profile or CA's)")
    p.add_argument("--out-dir", metavar="DIR", help="where to write the files (default DIR/issued)")
    p.add_argument("--name", help="base file name (default: the CN)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    _key_pw_opts(p)
    _now_opt(p)

    p = add("csr", "on a device: create a key and a signing request (the key stays here)",
            cmd_csr,
            "mbsec-pki csr hmi-07 --key-out /etc/hmi/tls.key --csr-out hmi-07.csr",
            "mbsec-pki csr plc-gw.plant.example --dns plc-gw.plant.example --key-type rsa-2048")
    p.add_argument("common_name", metavar="CN", help="subject common name")
    _names_opts(p)
    p.add_argument("--role", help="role to ask for (the CA decides; it is only a hint)")
    p.add_argument("--key-type", choices=KEY_TYPES, default="ec-p256")
    p.add_argument("--key-out", metavar="FILE", help="private key file (default CN.key)")
    p.add_argument("--csr-out", metavar="FILE", help="CSR file (default CN.csr)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    _key_pw_opts(p)

    p = add("sign", "sign a device's CSR; role, usage and lifetime come from here, never from "
            "the CSR", cmd_sign,
            "mbsec-pki sign client hmi-07.csr --profile hmi-operator --out hmi-07.crt",
            "mbsec-pki sign server gw.csr --dns plc-gw.plant.example",
            "mbsec-pki sign server gw.csr --use-csr-sans   # accept the names the CSR asks for")
    _dir_opt(p)
    p.add_argument("kind", choices=("server", "client"))
    p.add_argument("csr", metavar="CSR", help="PEM or DER certificate signing request")
    _role_opts(p)
    _names_opts(p)
    p.add_argument("--cn", help="override the CSR's common name")
    p.add_argument("--use-csr-sans", action="store_true",
                   help="copy the DNS/IP names the CSR asks for (default: only --dns/--ip)")
    p.add_argument("--out", metavar="FILE", help="certificate file (default: CSR name + .crt)")
    p.add_argument("--force", action="store_true", help="overwrite existing files")
    _now_opt(p)

    p = add("renew", "re-issue certificates in place (same subject, SANs, role) when due",
            cmd_renew,
            "mbsec-pki renew --check /etc/mbsec/tls/server.crt     # exit 3 when due",
            "mbsec-pki renew /etc/mbsec/tls/server.crt --exec 'systemctl reload mbsec'",
            "mbsec-pki renew certs/hmi-01.crt --force --reuse-key")
    _dir_opt(p)
    p.add_argument("cert", nargs="+", metavar="CERT", help="certificate file(s) to renew")
    p.add_argument("--check", action="store_true",
                   help="only report; exit 3 if any certificate is due, 0 if none")
    p.add_argument("--threshold", type=float, default=DEFAULT_RENEW_THRESHOLD,
                   help="renew once this fraction of the lifetime has passed (default 0.667)")
    p.add_argument("--force", action="store_true", help="renew even if not due")
    p.add_argument("--reuse-key", action="store_true", help="keep the existing key (default: new)")
    p.add_argument("--key", metavar="FILE", help="key file (default: CERT with .key)")
    p.add_argument("--chain", metavar="FILE", help="chain file (default: CERT stem + -chain.pem)")
    p.add_argument("--days", type=int, help="new lifetime (default: same as the old one)")
    p.add_argument("--exec", metavar="CMD",
                   help="shell command run after a renewal ($MBSEC_PKI_RENEWED lists the files)")
    p.add_argument("--key-passphrase-file", metavar="FILE",
                   help="passphrase of the (new or reused) key")
    _now_opt(p)

    p = add("revoke", "revoke a certificate (by serial or file) and update the CRL", cmd_revoke,
            "mbsec-pki revoke certs/vendor-acme.crt --reason cessation_of_operation",
            "mbsec-pki revoke 5F3A9C... --reason key_compromise")
    _dir_opt(p)
    p.add_argument("target", metavar="SERIAL|CERT", help="hex serial (as 'list' shows) or file")
    p.add_argument("--reason", choices=REVOCATION_REASONS, default="unspecified")
    p.add_argument("--no-crl", action="store_true", help="do not rewrite the CRL now")
    p.add_argument("--next-update-days", type=int, default=7,
                   help="CRL nextUpdate in days (default 7)")
    _now_opt(p)

    p = add("crl", "write a fresh CRL (do it before nextUpdate: an expired CRL blocks every "
            "client)", cmd_crl,
            "mbsec-pki crl", "mbsec-pki crl --next-update-days 30 --out /etc/mbsec/tls/crl.pem")
    _dir_opt(p)
    p.add_argument("--out", metavar="FILE", help="output file (default DIR/crl.pem)")
    p.add_argument("--next-update-days", type=int, default=7, help="nextUpdate in days (default 7)")
    _now_opt(p)

    p = add("list", "list issued certificates: valid, expiring, expired, revoked", cmd_list,
            "mbsec-pki list", "mbsec-pki list --status expiring --within 60",
            "mbsec-pki list --json")
    _dir_opt(p, passphrase=False)
    p.add_argument("--status", choices=("all", "valid", "expiring", "expired", "revoked",
                                        "superseded"),
                   default="all")
    p.add_argument("--within", type=int, default=30, metavar="DAYS",
                   help="'expiring' means expiring within DAYS (default 30)")
    p.add_argument("--json", action="store_true", help="machine-readable output")
    _now_opt(p)

    p = add("show", "show a certificate: subject, role, SANs, validity, fingerprint", cmd_show,
            "mbsec-pki show certs/hmi-01.crt")
    p.add_argument("cert", metavar="CERT")
    _now_opt(p)

    p = add("verify", "verify chain, usage, role extension, expiry and revocation", cmd_verify,
            "mbsec-pki verify certs/hmi-01-chain.pem --dir ca --crl ca/crl.pem",
            "mbsec-pki verify server.crt --dir ca/ca.crt --chain ca/intermediate.crt "
            "--purpose server")
    p.add_argument("cert", metavar="CERT", help="certificate or chain file (leaf first)")
    trust = p.add_mutually_exclusive_group()
    trust.add_argument("--dir", default=os.environ.get("MBSEC_PKI_DIR", DEFAULT_DIR),
                       metavar="DIR|BUNDLE",
                       help="the CA directory (as for every other command; default: "
                       "$MBSEC_PKI_DIR or ./ca), or a PEM bundle of trusted CA certificates")
    trust.add_argument("--ca", metavar="BUNDLE|DIR", help="deprecated spelling of --dir")
    p.add_argument("--chain", metavar="FILE", help="intermediate certificates")
    p.add_argument("--crl", action="append", default=[], metavar="FILE",
                   help="CRL file(s) to check revocation against (repeatable)")
    p.add_argument("--purpose", choices=("server", "client"), help="require this usage")
    _now_opt(p)

    p = add("profiles", "list the available certificate profiles", cmd_profiles,
            "mbsec-pki profiles")
    _dir_opt(p, passphrase=False)
    p.add_argument("--profiles-dir", metavar="DIR", help="look for profiles here first")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    try:
        args = parser.parse_args(list(sys.argv[1:] if argv is None else argv))
    except SystemExit as exc:  # --help (0) or a usage error (2)
        return exc.code if isinstance(exc.code, int) else EXIT_USAGE
    try:
        result: int = args.func(args)
        return result
    except PKIError as exc:
        print(f"mbsec-pki {args.command}: error: {exc}", file=sys.stderr)
        return EXIT_ERROR
    except KeyboardInterrupt:
        return 130



if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
