"""The compiled, pure policy engine: first match wins, default deny, every decision names its rule.

Nothing here does I/O or keeps mutable state, so a decision depends only on the policy, the
principal and the request. Speed comes from work done once: rules are bucketed per function
code at load time, and per connection :meth:`Policy.principal` keeps only the rules whose
*who* part (roles, source CIDRs) matches, so a request walks a short list of plain tuples.
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from mypy_extensions import mypyc_attr

from mbsec.identity import PeerIdentity
from mbsec.modbus.access import Access

if TYPE_CHECKING:  # runtime imports would be circular; these modules build a Policy
    from mbsec.policy.cases import Case
    from mbsec.policy.loader import Diagnostic

Network = ipaddress.IPv4Network | ipaddress.IPv6Network
IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
Outcome = Literal["allow", "deny", "would_deny"]
Interval = tuple[int, int]  # inclusive (low, high)



def merge_intervals(ranges: Iterable[Interval]) -> tuple[Interval, ...]:
    """Sorted, with overlapping and adjacent intervals joined: ``[(5, 9), (0, 4)] -> ((0, 9),)``."""
    out: list[Interval] = []
    for lo, hi in sorted(ranges):
        if out and lo <= out[-1][1] + 1:
            out[-1] = (out[-1][0], max(out[-1][1], hi))
        else:
            out.append((lo, hi))
    return tuple(out)


LIMIT_CACHE_MAX = 4096  # role sets whose rate limit is remembered (a handful in practice)
PRINCIPAL_CACHE_MAX = 4096  # (certificate, address) pairs whose principal is remembered

REASON_ALLOWED = "allowed_by_rule"
REASON_RULE_DENY = "denied_by_rule"
REASON_DEFAULT = "no_matching_rule"


@dataclass(frozen=True, slots=True)
class Decision:
    """What to do with one request.

    ``allowed`` is True for "allow" and for monitor-mode "would_deny" (the request goes
    through, the event says it would have been denied). ``exception_code`` is what a denial
    answers (or would answer). ``max_response_bytes`` is the allowing rule's limit on the
    response PDU, checked by the proxy on the PLC's answer.
    """

    allowed: bool
    outcome: Outcome
    rule_id: str
    exception_code: int
    reason: str
    target: str | None
    max_response_bytes: int | None


@dataclass(frozen=True, slots=True)
class ValueBound:
    """Allowed values for writes to the addresses ``low..high``."""

    low: int
    high: int
    vmin: int
    vmax: int
    signed: bool


@dataclass(frozen=True, slots=True)
class IdentityRule:
    """Maps certificate facts to roles (``identities:``); every field given must match."""

    fields: tuple[tuple[str, frozenset[str]], ...]
    roles: frozenset[str]
    line: int

    def matches(self, identity: PeerIdentity) -> bool:
        for name, wanted in self.fields:
            got = _identity_values(identity, name)
            if not any(g in wanted for g in got):
                return False
        return True


def _identity_values(identity: PeerIdentity, name: str) -> tuple[str, ...]:
    match name:
        case "subject_cn":
            return (identity.common_name,) if identity.common_name is not None else ()
        case "subject_ou":
            return identity.organizational_units
        case "san_dns":
            return tuple(d.lower() for d in identity.san_dns)
        case "san_ip":
            return tuple(_canonical_ip(i) for i in identity.san_ip)
        case "san_uri":
            return identity.san_uri
        case "issuer":
            return (identity.issuer,)
        case "fingerprint_sha256":
            return (identity.fingerprint_sha256.lower().replace(":", ""),)
    raise ValueError(name)  # pragma: no cover - the loader only builds known names


def _canonical_ip(text: str) -> str:
    """``2001:DB8::1`` and ``2001:db8:0::1`` compare equal; an unparsable SAN stays as is."""
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        return text


@dataclass(frozen=True, slots=True)
class RateLimit:
    """Token buckets and an in-flight cap for one identity; None means unlimited."""

    requests_per_second: float | None
    burst: float
    writes_per_second: float | None
    write_burst: float
    max_in_flight: int | None


@dataclass(eq=False, slots=True)
class Rule:
    """One compiled rule. ``None`` in a condition means "no restriction"."""

    index: int  # 1-based position in the file
    id: str
    description: str
    allow: bool
    monitor: bool
    exception_code: int
    line: int
    roles: frozenset[str] | None  # None = any principal ("*" or omitted on a deny rule)
    sources: tuple[Network, ...] | None
    units: frozenset[int] | None
    target_names: tuple[str, ...]
    functions: Mapping[int, frozenset[int] | None]  # code -> allowed sub-function/MEI, None=any
    read_ranges: tuple[Interval, ...] | None
    write_ranges: tuple[Interval, ...] | None
    max_quantity: int | None
    max_request_bytes: int | None
    max_response_bytes: int | None
    values: tuple[ValueBound, ...] | None
    coil_states: frozenset[int] | None
    _decisions: dict[str | None, Decision] = field(default_factory=dict, repr=False)

    def matches_who(self, roles: frozenset[str], source: IPAddress) -> bool:
        if self.roles is not None and self.roles.isdisjoint(roles):
            return False
        return self.sources is None or any(source in net for net in self.sources)

    def matches_what(self, a: Access) -> bool:
        """Everything after who/where/function code: sub-functions, ranges, sizes, values."""
        subs = self.functions.get(a.function_code)
        if subs is not None and a.subfunction not in subs:
            return False
        if self.max_quantity is not None and a.quantity > self.max_quantity:
            return False
        if self.max_request_bytes is not None and a.pdu_length > self.max_request_bytes:
            return False
        if self.read_ranges is not None and a.read is not None \
                and not _covered(self.read_ranges, a.read):
            return False
        if a.write is not None:
            if self.write_ranges is not None and not _covered(self.write_ranges, a.write):
                return False
            if self.values is not None and a.function_code in (6, 16, 23) \
                    and not _values_ok(self.values, a.write[0], a.values):
                return False
            if self.coil_states is not None and a.function_code in (5, 15) \
                    and not all(v in self.coil_states for v in a.values):
                return False
        return True

    def decision(self, target: str | None) -> Decision:
        """The (pre-built, shared) decision this rule makes for a unit of ``target``."""
        d = self._decisions.get(target)
        if d is None:
            if self.allow:
                d = Decision(True, "allow", self.id, self.exception_code, REASON_ALLOWED,
                             target, self.max_response_bytes)
            elif self.monitor:
                d = Decision(True, "would_deny", self.id, self.exception_code,
                             REASON_RULE_DENY, target, None)
            else:
                d = Decision(False, "deny", self.id, self.exception_code, REASON_RULE_DENY,
                             target, None)
            self._decisions[target] = d
        return d


def _covered(ranges: tuple[Interval, ...], span: tuple[int, int]) -> bool:
    start, qty = span
    end = start + qty - 1
    # a plain loop, not any(genexpr): building a generator per request costs more than the walk
    for lo, hi in ranges:  # noqa: SIM110
        if lo <= start and end <= hi:
            return True
    return False


def _values_ok(bounds: tuple[ValueBound, ...], start: int, values: tuple[int, ...]) -> bool:
    for i, v in enumerate(values):
        addr = start + i
        for b in bounds:
            if b.low <= addr <= b.high:
                x = v - 0x10000 if b.signed and v >= 0x8000 else v
                if not b.vmin <= x <= b.vmax:
                    return False
                break
        else:
            return False  # a written address no value range covers: not allowed by this rule
    return True


@dataclass(frozen=True, slots=True)
class Principal:
    """Who is asking, resolved once per connection.

    ``key`` identifies the client for rate limiting: the certificate's SHA-256 fingerprint, or
    ``ip:<address>`` for a client without a certificate.
    """

    key: str
    roles: frozenset[str]
    source_ip: str
    identity: PeerIdentity | None
    #: the Policy that built it (``Any``, not ``object``: mypyc's dataclass support fails on an
    #: ``object`` annotation)
    _policy: Any = field(repr=False, compare=False)
    _plan: Mapping[int, tuple[Rule, ...]] = field(repr=False, compare=False)

    @property
    def common_name(self) -> str | None:
        return self.identity.common_name if self.identity is not None else None


def parse_source(source_ip: str) -> IPAddress:
    """Parse a peer address; IPv4-mapped IPv6 (``::ffff:10.0.0.1``) becomes IPv4."""
    text = source_ip.strip().strip("[]").split("%", 1)[0]
    addr = ipaddress.ip_address(text)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


@mypyc_attr(allow_interpreted_subclasses=True)  # tests subclass it to count evaluations
@dataclass(eq=False)
class Policy:
    """A validated, compiled policy file. Build it with :func:`mbsec.policy.load_policy`."""

    path: str
    digest: str  # SHA-256 of the file text, for events ("which policy decided this")
    monitor: bool
    rules: tuple[Rule, ...]
    targets: Mapping[str, tuple[frozenset[int], str | None]]  # name -> (unit ids, upstream)
    identities: tuple[IdentityRule, ...]
    default_limit: RateLimit | None
    role_limits: tuple[tuple[str, RateLimit], ...]
    cases: tuple[Case, ...] = ()  # inline tests: cases
    warnings: tuple[Diagnostic, ...] = ()
    _by_function: dict[int, tuple[Rule, ...]] = field(default_factory=dict, repr=False)
    _unit_target: dict[int, str] = field(default_factory=dict, repr=False)
    _default: dict[str | None, Decision] = field(default_factory=dict, repr=False)
    _limits: dict[frozenset[str], RateLimit | None] = field(
        default_factory=dict, init=False, repr=False
    )
    _principals: dict[tuple[str | None, str], Principal] = field(
        default_factory=dict, init=False, repr=False
    )
    #: set in __post_init__ (a compiled dataclass leaves a plain default unset when init=False)
    _named_roles: frozenset[str] | None = field(default=None, init=False, repr=False)

    def __post_init__(self) -> None:
        self._named_roles = None
        buckets: dict[int, list[Rule]] = {}
        for r in self.rules:
            for code in r.functions:
                buckets.setdefault(code, []).append(r)
        self._by_function = {code: tuple(rs) for code, rs in buckets.items()}
        for name, (units, _) in self.targets.items():
            for u in sorted(units):
                self._unit_target.setdefault(u, name)
        for r in self.rules:  # build every decision now: evaluate() then only reads
            for target in (None, *self.targets):
                r.decision(target)
        outcome: Outcome = "would_deny" if self.monitor else "deny"
        for target in (None, *self.targets):
            self._default[target] = Decision(self.monitor, outcome, "default", 1,
                                             REASON_DEFAULT, target, None)

    # -- who ------------------------------------------------------------------------------
    def named_roles(self) -> frozenset[str]:
        """Every role this policy names (mbsec.role_labels: the bounded ``role`` label);
        kept on the policy, which never changes once built."""
        found = self._named_roles
        if found is None:
            names: set[str] = set()
            for rule in self.rules:
                names |= rule.roles or frozenset()
            for ident in self.identities:
                names |= ident.roles
            names.update(role for role, _limit in self.role_limits)
            names.discard("*")
            found = self._named_roles = frozenset(names)
        return found

    def roles_for(self, identity: PeerIdentity | None) -> frozenset[str]:
        """The certificate's role (if any) plus every role an ``identities`` entry grants."""
        if identity is None:
            return frozenset()
        roles = {identity.role} if identity.role else set()
        for m in self.identities:
            if m.matches(identity):
                roles |= m.roles
        return frozenset(roles)

    def principal(self, identity: PeerIdentity | None, source_ip: str) -> Principal:
        """Resolve a connection's principal once: roles, rate-limit key, pre-filtered rules.

        Raises ``ValueError`` if ``source_ip`` is not an IP address.

        Remembered per (certificate fingerprint, address), at most ``PRINCIPAL_CACHE_MAX`` (then
        forgotten all at once: the data-plane thread asks too, after a reload, and a dict's
        clear is one atomic step where evicting the oldest is not): a principal is a pure
        function of the identity (itself a pure function of the certificate,
        :func:`mbsec.identity.parse_verified_identity`), the address and this policy, which
        never changes once built (a reload builds a new one), and a plant's masters reconnect
        from the same addresses with the same certificates (the roles and plan walk were a
        measurable share of a handshake's Python work, benchmarks/README.md, "Issue 10 item 3:
        handshake rate rounds").
        """
        cache_key = (identity.fingerprint_sha256 if identity is not None else None, source_ip)
        found = self._principals.get(cache_key)
        if found is not None and (found.identity is identity or found.identity == identity):
            return found
        source = parse_source(source_ip)
        roles = self.roles_for(identity)
        key = (identity.fingerprint_sha256.lower() if identity is not None
               else f"ip:{source}")
        made = Principal(key, roles, str(source), identity, self, self._plan(roles, source))
        if len(self._principals) >= PRINCIPAL_CACHE_MAX:
            self._principals.clear()
        self._principals[cache_key] = made
        return made

    def _plan(self, roles: frozenset[str], source: IPAddress) -> dict[int, tuple[Rule, ...]]:
        return {code: kept for code, rules in self._by_function.items()
                if (kept := tuple(r for r in rules if r.matches_who(roles, source)))}

    # -- decide ---------------------------------------------------------------------------
    def evaluate(self, principal: Principal, unit_id: int, access: Access) -> Decision:
        """Decide one request: the first rule whose who/where/what all hold, else default."""
        plan = principal._plan if principal._policy is self else \
            self._plan(principal.roles, parse_source(principal.source_ip))
        target = self._unit_target.get(unit_id)
        for r in plan.get(access.function_code, ()):
            if r.units is not None and unit_id not in r.units:
                continue
            if r.matches_what(access):
                return r.decision(target)
        return self._default[target]

    def rule(self, rule_id: str) -> Rule | None:
        for r in self.rules:
            if r.id == rule_id:
                return r
        return None

    def limit_for(self, roles: frozenset[str]) -> RateLimit | None:
        """Rate limit of the first ``limits.roles`` entry the principal holds, else default.

        Cached per role set (asked once per request): the answer depends only on this
        policy, which does not change once built.
        """
        try:
            return self._limits[roles]
        except KeyError:
            pass
        found = self.default_limit
        for role, lim in self.role_limits:
            if role in roles:
                found = lim
                break
        if len(self._limits) < LIMIT_CACHE_MAX:
            self._limits[roles] = found
        return found
