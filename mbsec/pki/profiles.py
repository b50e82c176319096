"""Certificate profiles: readable YAML files (``pki/profiles/*.yaml``) that fix the kind, role,
lifetime and key type of a class of certificates, so an operator types a name, not a policy.

Unknown keys are errors: a typo must not silently issue a certificate without its role.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml

from mbsec.pki.files import KEY_TYPES, PKIError, read_bytes

_KEYS = {"description", "kind", "role", "days", "key_type", "organization",
         "organizational_units"}


@dataclass(frozen=True, slots=True)
class Profile:
    name: str
    path: Path
    description: str
    kind: str
    role: str | None
    days: int | None
    key_type: str | None
    organization: str | None
    organizational_units: tuple[str, ...]


def builtin_profile_dir() -> Path:
    """The profiles shipped with mbsec (package data; ``pki/profiles`` in the repository links
    here), so ``--profile`` works from an installed wheel too, not only from a checkout."""
    return Path(__file__).resolve().parent / "profiles"


def search_path(ca_dir: Path | None = None, extra: Path | None = None) -> list[Path]:
    """Where ``--profile NAME`` is looked up, first match wins."""
    dirs: list[Path] = []
    if extra is not None:
        dirs.append(extra)
    if env := os.environ.get("MBSEC_PKI_PROFILES"):
        dirs.extend(Path(p) for p in env.split(os.pathsep) if p)
    if ca_dir is not None:
        dirs.append(ca_dir / "profiles")
    dirs.append(builtin_profile_dir())
    return dirs


def load_profile(name: str, dirs: list[Path]) -> Profile:
    """A profile by name (searched in ``dirs``) or by path (anything with a slash or .yaml)."""
    if "/" in name or name.endswith((".yaml", ".yml")):
        return parse_profile(Path(name))
    for d in dirs:
        for ext in (".yaml", ".yml"):
            p = d / f"{name}{ext}"
            if p.is_file():
                return parse_profile(p)
    known = sorted({p.stem for d in dirs if d.is_dir() for p in d.glob("*.y*ml")})
    raise PKIError(f"unknown profile {name!r} (known: {', '.join(known) or 'none'})")


def list_profiles(dirs: list[Path]) -> list[Profile]:
    seen: dict[str, Profile] = {}
    for d in dirs:
        if d.is_dir():
            for p in sorted(d.glob("*.y*ml")):
                seen.setdefault(p.stem, parse_profile(p))
    return sorted(seen.values(), key=lambda p: p.name)


def parse_profile(path: Path) -> Profile:
    try:
        data: Any = yaml.safe_load(read_bytes(path, "profile"))
    except yaml.YAMLError as exc:
        raise PKIError(f"{path}: not valid YAML ({exc})".replace("\n", " ")) from None
    if not isinstance(data, dict):
        raise PKIError(f"{path}: a profile is a mapping of keys")
    unknown = set(data) - _KEYS
    if unknown:
        raise PKIError(f"{path}: unknown key(s) {', '.join(sorted(map(str, unknown)))} "
                       f"(allowed: {', '.join(sorted(_KEYS))})")
    kind = data.get("kind")
    if kind not in ("server", "client"):
        raise PKIError(f"{path}: kind must be 'server' or 'client'")
    role = data.get("role")
    if role is not None and (not isinstance(role, str) or kind != "client"):
        raise PKIError(f"{path}: role must be a string, and only client profiles carry one")
    days = data.get("days")
    if days is not None and (not isinstance(days, int) or isinstance(days, bool) or days < 1):
        raise PKIError(f"{path}: days must be a positive integer")
    key_type = data.get("key_type")
    if key_type is not None and key_type not in KEY_TYPES:
        raise PKIError(f"{path}: key_type must be one of {', '.join(KEY_TYPES)}")
    ous = data.get("organizational_units", [])
    if not isinstance(ous, list) or not all(isinstance(o, str) for o in ous):
        raise PKIError(f"{path}: organizational_units must be a list of strings")
    org = data.get("organization")
    if org is not None and not isinstance(org, str):
        raise PKIError(f"{path}: organization must be a string")
    return Profile(name=path.stem, path=path, description=str(data.get("description", "")),
                   kind=kind, role=role, days=days, key_type=key_type, organization=org,
                   organizational_units=tuple(ous))
