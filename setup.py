"""Build hook: compile the request path (the sans-IO core in mbsec/path/ and its epoll driver)
and what it runs for every request (the MBAP framing and the PDU parsers in mbsec/modbus/,
the rate limiter in mbsec/policy/ratelimit.py) with mypyc.

Why: the data plane runs every request through a few dozen Python-level calls; compiled, the
same code needs about a quarter less CPU per request (benchmarks/README.md). Everything else
stays interpreted.

The extension is optional: without a C compiler or Python headers (or with MBSEC_PURE=1 in
the environment) the build falls back to the pure-Python module, which behaves the same,
only slower. ``mbsec serve`` says which one runs (``mbsec.data_plane_compiled`` in its
``server-start`` event).
"""

from __future__ import annotations

import os

from setuptools import setup

#: the request path: core state machines and the driver, and the request side they call for
#: every request (decide.py, plc.py, the PDU parsers, the limiter, and with ``workers > 1`` the
#: node-wide limiter in nodestate.py: -25 % per request, benchmarks/README.md "Issue 14:
#: workers = 2") compiled together, so that
#: those calls stay native-to-native (decide.py compiled alone did not pay: benchmarks/README.md,
#: issue 14 rounds 2 and 7), and the policy engine with the Access record it decides on, so
#: that a request's decision, rate limit and access fields are native attribute reads (round
#: 11). The policy loader, the metrics registry and the logger stay interpreted, but for
#: audit_fast, the allowed-request line that decide.py renders on the data-plane thread (and
#: the two lines of each connection the session renders from its templates), and
#: metrics_core, the counter cell and histogram the path updates per request.
CORE = [*(f"mbsec/path/{name}.py" for name in
          ("timers", "exchange", "link", "fair", "pool", "target", "router", "client", "spin",
           "epoll", "plc", "decide")),
        "mbsec/modbus/mbap.py", "mbsec/modbus/pdu.py", "mbsec/modbus/access.py",
        "mbsec/policy/engine.py", "mbsec/policy/ratelimit.py",
        "mbsec/audit_fast.py", "mbsec/nodestate.py", "mbsec/metrics_core.py"]

ext_modules = []
if os.environ.get("MBSEC_PURE") != "1":
    try:
        from mypyc.build import mypycify
    except ImportError:  # pragma: no cover - build requirements not honoured
        print("mbsec: mypyc not available, installing the pure-Python data plane")
    else:
        # Only these modules are compiled; what they import is type-checked silently, and the
        # third-party packages (not installed in pip's isolated build environment) are Any.
        # No cache: the result must not depend on a .mypy_cache left in the checkout.
        ext_modules = mypycify(
            ["--ignore-missing-imports", "--follow-imports=silent", "--cache-dir=/dev/null",
             *CORE],
            opt_level="3",
        )
        for ext in ext_modules:
            ext.optional = True  # a failed compile leaves the pure-Python module in place

setup(ext_modules=ext_modules)
