"""Key generation and careful file writing.

Private keys are written 0600 through a temporary file that is fsynced and then linked into place,
so a crash never leaves half a key and an existing file is never replaced unless asked to.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import TypeAlias

from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec, rsa

PrivateKey: TypeAlias = ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey

#: key type names accepted everywhere (CLI, profiles, library)
KEY_TYPES: tuple[str, ...] = ("ec-p256", "ec-p384", "rsa-2048", "rsa-3072", "rsa-4096")
DEFAULT_KEY_TYPE = "ec-p256"


class PKIError(Exception):
    """A user-facing failure: the CLI prints the message on one line and exits 1."""


def generate_key(key_type: str = DEFAULT_KEY_TYPE) -> PrivateKey:
    """A fresh private key; ECDSA P-256 unless another type is asked for."""
    if key_type == "ec-p256":
        return ec.generate_private_key(ec.SECP256R1())
    if key_type == "ec-p384":
        return ec.generate_private_key(ec.SECP384R1())
    if key_type.startswith("rsa-") and key_type in KEY_TYPES:
        return rsa.generate_private_key(public_exponent=65537, key_size=int(key_type[4:]))
    raise PKIError(f"unknown key type {key_type!r} (choose from {', '.join(KEY_TYPES)})")


def key_type_of(key: PrivateKey | object) -> str:
    """The key type name of a private or public key (so renewals keep the same kind of key)."""
    if isinstance(key, ec.EllipticCurvePrivateKey | ec.EllipticCurvePublicKey):
        return {"secp256r1": "ec-p256", "secp384r1": "ec-p384"}.get(key.curve.name, "ec-p256")
    if isinstance(key, rsa.RSAPrivateKey | rsa.RSAPublicKey):
        return f"rsa-{key.key_size}" if f"rsa-{key.key_size}" in KEY_TYPES else "rsa-3072"
    raise PKIError("unsupported key algorithm (use ECDSA P-256/P-384 or RSA)")


def key_pem(key: PrivateKey, passphrase: bytes | None = None) -> bytes:
    """PKCS#8 PEM, encrypted with the best available scheme when a passphrase is given."""
    enc: serialization.KeySerializationEncryption = (
        serialization.BestAvailableEncryption(passphrase) if passphrase
        else serialization.NoEncryption()
    )
    return key.private_bytes(serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, enc)


def load_key(path: Path, passphrase: bytes | None = None) -> PrivateKey:
    """Load a PEM private key with a message that says what went wrong, not a traceback."""
    data = read_bytes(path, "private key")
    try:
        key = serialization.load_pem_private_key(data, password=passphrase)
    except TypeError:
        if passphrase is None:
            raise PKIError(f"{path}: private key is encrypted; give its passphrase") from None
        raise PKIError(f"{path}: private key is not encrypted; drop the passphrase") from None
    except ValueError as exc:
        if passphrase is not None and "password" in str(exc).lower():
            raise PKIError(f"{path}: wrong passphrase for the private key") from None
        raise PKIError(f"{path}: not a readable PEM private key") from None
    if not isinstance(key, ec.EllipticCurvePrivateKey | rsa.RSAPrivateKey):
        raise PKIError(f"{path}: unsupported key algorithm (use ECDSA or RSA)")
    return key


def key_is_encrypted(path: Path) -> bool:
    """Whether a PEM key file needs a passphrase (decides if the CLI should prompt)."""
    data = read_bytes(path, "private key")
    return b"ENCRYPTED" in data.split(b"\n", 1)[0] or b"Proc-Type: 4,ENCRYPTED" in data


def read_bytes(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise PKIError(f"{path}: {what} file not found") from None
    except IsADirectoryError:
        raise PKIError(f"{path}: is a directory, expected a {what} file") from None
    except PermissionError:
        raise PKIError(f"{path}: permission denied reading the {what}") from None


def load_certificates(path: Path, what: str = "certificate") -> list[x509.Certificate]:
    """All certificates of a PEM (or single DER) file, in order; an error if there are none."""
    data = read_bytes(path, what)
    try:
        if b"-----BEGIN" in data:
            certs = x509.load_pem_x509_certificates(data)
        else:
            certs = [x509.load_der_x509_certificate(data)]
    except ValueError:
        raise PKIError(f"{path}: not a readable {what} (expected PEM or DER)") from None
    if not certs:
        raise PKIError(f"{path}: contains no certificate")
    return certs


def load_certificate(path: Path, what: str = "certificate") -> x509.Certificate:
    """The first certificate of a file (the leaf of a chain file)."""
    return load_certificates(path, what)[0]


def cert_pem(*certs: x509.Certificate) -> bytes:
    return b"".join(c.public_bytes(serialization.Encoding.PEM) for c in certs)


def ensure_dir(path: Path, mode: int = 0o755) -> None:
    path.mkdir(parents=True, exist_ok=True, mode=mode)


def write_file(path: Path, data: bytes, *, mode: int = 0o644, overwrite: bool = False) -> None:
    """Atomically write ``data`` with ``mode``: temp file, fsync, then link (no clobber) or replace.

    Without ``overwrite`` an existing ``path`` is an error, checked atomically by ``link``.
    """
    directory = path.parent
    if not directory.is_dir():
        raise PKIError(f"{directory}: directory does not exist")
    tmp = directory / f".{path.name}.{os.getpid()}.tmp"
    with contextlib.suppress(FileNotFoundError):
        tmp.unlink()
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, mode)
    except PermissionError:
        raise PKIError(f"{directory}: permission denied writing {path.name}") from None
    try:
        with os.fdopen(fd, "wb") as fh:
            os.fchmod(fh.fileno(), mode)  # umask must not loosen or tighten what we asked for
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        if overwrite:
            os.replace(tmp, path)
        else:
            try:
                os.link(tmp, path)  # atomic "create if absent"
            except FileExistsError:
                raise PKIError(f"{path}: already exists (use --force to overwrite)") from None
            except OSError:
                # no hard links (FAT-formatted USB stick, some FUSE mounts): check, then rename
                if path.exists():
                    raise PKIError(f"{path}: already exists (use --force to overwrite)") from None
                os.rename(tmp, path)
            finally:
                with contextlib.suppress(FileNotFoundError):
                    tmp.unlink()
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()
        raise
    _fsync_dir(directory)


def write_key(path: Path, key: PrivateKey, *, passphrase: bytes | None = None,
              overwrite: bool = False) -> None:
    """Write a private key 0600, atomically, never over an existing file unless ``overwrite``."""
    write_file(path, key_pem(key, passphrase), mode=0o600, overwrite=overwrite)


def _fsync_dir(directory: Path) -> None:
    try:
        fd = os.open(directory, os.O_RDONLY)
    except OSError:  # pragma: no cover - platforms without directory fds
        return
    try:
        os.fsync(fd)
    except OSError:  # pragma: no cover
        pass
    finally:
        os.close(fd)
