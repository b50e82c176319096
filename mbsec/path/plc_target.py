"""The settings of one PLC target (an ``[upstreams.NAME]`` section) and their checks.

No I/O. Re-exported by :mod:`mbsec.path.plc`, where the request path imports them from. A module
of its own because mypyc compiles ``plc.py`` (setup.py) and this class must stay a plain
Python dataclass: ``__post_init__`` replaces frozen fields and takes any set for ``unit_ids``,
and the router compares targets on a reload (``==``), which stopped holding for equal targets
when mypyc built the class (tests/path/test_router.py).
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType


@dataclass(frozen=True, slots=True)
class UpstreamTarget:
    """One PLC (or gateway), the unit ids routed to it and its availability rules.

    ``unit_rewrite`` maps the client's unit id to the PLC's; the reply must carry the
    rewritten unit and goes back to the client with its original one. The rules are explained
    in docs/config.md ("Availability rules").
    """

    name: str
    host: str
    port: int
    unit_ids: frozenset[int]
    unit_rewrite: Mapping[int, int] = field(default_factory=dict)
    pool_size: int = 2
    depth: int = 1
    connect_timeout: float = 3.0
    request_timeout: float = 2.0
    backoff_initial: float = 0.2
    backoff_max: float = 10.0
    #: a request answered 0x0B keeps its slot this long for its late reply, then the link resets
    late_reply_wait: float = 10.0
    #: resets no client is blamed for: this many within ``reset_window`` reconnect at once,
    #: more are throttled by the backoff
    resets_before_backoff: int = 3
    reset_window: float = 10.0
    #: a client charged with this many resets within ``breaker_window`` is refused (0x0A) by
    #: this target for ``breaker_hold`` seconds
    breaker_resets: int = 3
    breaker_window: float = 60.0
    breaker_hold: float = 30.0

    def __post_init__(self) -> None:
        problems: list[str] = []
        if not 0 < self.port < 65536:
            problems.append(f"port {self.port} is not in 1..65535")
        if not self.unit_ids:
            problems.append("no unit ids")
        for unit in self.unit_ids:
            if not 0 <= unit <= 255:
                problems.append(f"unit id {unit} is not in 0..255")
        for src, dst in self.unit_rewrite.items():
            if not (0 <= src <= 255 and 0 <= dst <= 255):
                problems.append(f"unit rewrite {src}->{dst} is outside 0..255")
        if self.pool_size < 1:
            problems.append("pool_size must be at least 1")
        if self.depth < 1:
            problems.append("depth must be at least 1")
        if self.connect_timeout <= 0 or self.request_timeout <= 0 or self.late_reply_wait <= 0:
            problems.append("timeouts must be positive")
        if self.backoff_initial < 0 or self.backoff_max < self.backoff_initial:
            problems.append("backoff must satisfy 0 <= backoff_initial <= backoff_max")
        if self.resets_before_backoff < 0 or self.reset_window < 0:
            problems.append("resets_before_backoff and reset_window must not be negative")
        if self.breaker_resets < 1 or self.breaker_window < 0 or self.breaker_hold < 0:
            problems.append("breaker_resets must be at least 1, breaker_window and "
                            "breaker_hold not negative")
        if problems:
            raise ValueError(f"upstream target {self.name!r}: " + "; ".join(problems))
        # Freeze the mapping so a shared target cannot change under a running pool.
        object.__setattr__(self, "unit_ids", frozenset(self.unit_ids))
        object.__setattr__(self, "unit_rewrite", MappingProxyType(dict(self.unit_rewrite)))


def check_targets(targets: list[UpstreamTarget]) -> None:
    """Names unique, every unit id routed to one target; ``ValueError`` otherwise."""
    names: set[str] = set()
    owner: dict[int, str] = {}
    for t in targets:
        if t.name in names:
            raise ValueError(f"duplicate upstream target name {t.name!r}")
        names.add(t.name)
        for unit in t.unit_ids:
            if unit in owner:
                raise ValueError(
                    f"unit id {unit} is routed to both {owner[unit]!r} and {t.name!r}")
            owner[unit] = t.name
