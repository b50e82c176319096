"""Policy: what each client may do, decided per request, default deny (pure, no I/O).

``load_policy`` validates and compiles a YAML file; ``Policy.principal`` resolves a
connection's identity once; ``Policy.evaluate`` decides each request; ``RateLimiter`` keeps
the only mutable state (token buckets, in-flight counts) outside the decision.
"""

from mbsec.policy.engine import Decision, Policy, Principal, RateLimit
from mbsec.policy.loader import Diagnostic, PolicyError, load_policy, load_policy_text
from mbsec.policy.ratelimit import RateLimiter

__all__ = [
    "Decision",
    "Diagnostic",
    "Policy",
    "PolicyError",
    "Principal",
    "RateLimit",
    "RateLimiter",
    "load_policy",
    "load_policy_text",
]
