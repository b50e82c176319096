"""The ``role`` label of per-role metrics, bounded by the policy.

A certificate's Modbus role extension is free text a CA wrote; used as a label as it is, every
new role string would be a new time series. So a role counts under its own name only when the
policy names it (in a rule, an ``identities:`` entry or ``limits.roles``), else under
``other``; a client with no role (the NULL role) counts under ``none``. The label values are
therefore the policy's roles plus two, whatever certificates arrive.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

NO_ROLE = "none"
OTHER_ROLE = "other"


def policy_roles(policy: Any) -> frozenset[str]:
    """Every role a policy names (cached on the policy: :meth:`Policy.named_roles`)."""
    return policy.named_roles()  # type: ignore[no-any-return]


def role_labels(policy: Any, roles: Iterable[str]) -> tuple[str, ...]:
    """The label values a principal with ``roles`` counts under (one per role, sorted)."""
    known = policy_roles(policy)
    labels = {r if r in known else OTHER_ROLE for r in roles}
    return tuple(sorted(labels)) if labels else (NO_ROLE,)
