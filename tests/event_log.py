"""Event-log lines as the proxy writes them, built with mbsec.events' own constructors.

For the learn/replay unit tests that need many or unusual requests; the end-to-end test
records a real proxy's log instead (tests/test_policy_learn.py).
"""

from __future__ import annotations

import datetime as dt
import json
from dataclasses import dataclass, field
from typing import Any

from mbsec import events
from mbsec.audit import ECS_VERSION, nest_dotted
from mbsec.modbus.access import Access
from mbsec.policy.cases import Who

T0 = dt.datetime(2026, 12, 1, 8, 0, tzinfo=dt.UTC)


@dataclass
class EventLog:
    """Appends events; ``lines`` are JSON lines. Each ``who`` gets one connection."""

    lines: list[str] = field(default_factory=list)
    conns: dict[Who, int] = field(default_factory=dict)
    tid: int = 0
    seconds: int = 0

    def _line(self, ev: events.Event, ctx: dict[str, Any]) -> None:
        stamp = (T0 + dt.timedelta(seconds=self.seconds)).isoformat().replace("+00:00", "Z")
        flat = {"@timestamp": stamp, "message": ev.message, **ctx, **ev.fields,
                "log.level": ev.level, "ecs.version": ECS_VERSION, "service.name": "mbsec"}
        self.lines.append(json.dumps(nest_dotted(flat), separators=(",", ":")))

    def request(self, who: Who, roles: list[str], unit: int, access: Access, decision: str,
                rule: str, *, target: str = "plc", source: str = "10.0.0.5",
                outcome_logged: bool = True, role_in_context: bool = True) -> None:
        """One request as the proxy logs it: ``decision`` allow, deny or would_deny (monitor
        mode: the would_deny event, then its outcome when ``outcome_logged``)."""
        self.seconds += 1
        self.tid = (self.tid + 1) & 0xFFFF
        identity = who.identity()
        assert identity is not None
        conn = self.conns.setdefault(who, len(self.conns) + 1)
        ctx = {**events.connection_context(conn, source, 40000 + conn, "127.0.0.1", 802),
               **events.peer_context(identity, roles)}
        if not role_in_context:
            ctx.pop("mbsec.role")
        fc = access.function_code
        if decision == "deny":
            self._line(events.modbus_request_denied(self.tid, unit, fc, access, 0.0, rule,
                                                    "no_matching_rule", 1), ctx)
            return
        if decision == "would_deny":
            self._line(events.modbus_request_would_deny(self.tid, unit, fc, access, 0.0, rule,
                                                        "no_matching_rule"), ctx)
            if not outcome_logged:
                return
        self._line(events.modbus_request_allowed(self.tid, unit, fc, access, 0.001, rule,
                                                 decision, target, level="info"), ctx)

    def handshake(self, who: Who) -> None:
        identity = who.identity()
        assert identity is not None
        conn = self.conns.setdefault(who, len(self.conns) + 1)
        self._line(events.tls_handshake_accepted(0.01, identity, "TLSv1.3", "X", False),
                   events.connection_context(conn, "10.0.0.5", 40000, "127.0.0.1", 802))

    def text(self) -> str:
        return "\n".join(self.lines) + "\n"
