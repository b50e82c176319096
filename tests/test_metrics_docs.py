"""Every metric name is documented (docs/events.md, section Metrics) with its HELP text in
mbsec/metrics.py, and nothing is documented that mbsec does not expose; the label helpers
that bound cardinality behave as docs/metrics.md says."""

from __future__ import annotations

import re
import sys
from pathlib import Path

from mbsec import tcp_info
from mbsec.metrics import HELP
from mbsec.policy import load_policy
from mbsec.role_labels import role_labels

ROOT = Path(__file__).resolve().parents[1]


def documented() -> set[str]:
    text = (ROOT / "docs" / "events.md").read_text(encoding="utf-8")
    section = text.split("\n## Metrics\n", 1)[1].split("\n## ", 1)[0]
    return set(re.findall(r"^\| `(mbsec_[a-z_]+)` \|", section, re.M))


def test_every_metric_has_help_and_a_documented_row_and_back() -> None:
    assert sorted(set(HELP) - documented()) == []
    assert sorted(documented() - set(HELP)) == []


def test_every_metric_the_code_names_has_help() -> None:
    src = "\n".join(p.read_text(encoding="utf-8") for p in (ROOT / "mbsec").rglob("*.py"))
    named = set(re.findall(r'"(mbsec_[a-z_]+)"', src))
    assert sorted(named - set(HELP)) == []


def test_role_labels_are_bounded_by_the_policy(tmp_path: Path) -> None:
    policy_file = tmp_path / "p.yaml"
    policy_file.write_text("""\
version: 1
default: deny
targets:
  plc: {unit_ids: [1]}
identities:
  - match: {subject_cn: historian-01}
    roles: [historian]
rules:
  - id: op
    description: operators read
    roles: [operator, engineer]
    functions: [read_holding_registers]
""", encoding="utf-8")
    policy = load_policy(policy_file)
    assert role_labels(policy, ["operator"]) == ("operator",)
    assert role_labels(policy, ["historian", "engineer"]) == ("engineer", "historian")
    # a role string only a certificate carries is not a new series
    assert role_labels(policy, ["x-" + "a" * 50]) == ("other",)
    assert role_labels(policy, ["x1", "x2", "operator"]) == ("operator", "other")
    assert role_labels(policy, []) == ("none",)


def test_tcp_info_layout() -> None:
    """The offsets docs/metrics.md and mbsec/tcp_info.py give, on bytes built field by field."""
    raw = bytearray(tcp_info.SIZE + 16)  # newer kernels append fields: ignored
    raw[0] = 1  # ESTABLISHED
    raw[2] = 3  # tcpi_retransmits
    for offset, value in ((8, 204000), (24, 2), (32, 1), (36, 1), (68, 51234), (72, 800),
                          (80, 10), (100, 17)):
        raw[offset:offset + 4] = value.to_bytes(4, sys.byteorder)  # the host's order
    info = tcp_info.parse(bytes(raw))
    assert info == tcp_info.TcpInfo(state=1, retransmits=3, rto=0.204, unacked=2, lost=1,
                                    retrans=1, rtt=0.051234, rtt_var=0.0008, snd_cwnd=10,
                                    total_retrans=17)
    assert tcp_info.parse(bytes(raw[:100])) is None  # too short: no figures, no guess
