"""`mbsec` command line: a thin dispatcher, each subcommand owns its own argument parser.

Every ``main`` returns an exit code instead of calling ``sys.exit`` so tests can call it.
User mistakes end with a one-line message and a non-zero exit, never a traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from collections.abc import Callable, Sequence

from mbsec import __version__

#: subcommand -> (module, function, one-line help). Imported lazily: `mbsec --help` stays fast.
SUBCOMMANDS: dict[str, tuple[str, str, str]] = {
    "serve": ("mbsec.cli_proxy", "serve_main", "run the proxy (mutual TLS in, Modbus/TCP out)"),
    "config": ("mbsec.cli_proxy", "config_main", "validate a configuration file (config check)"),
    "policy": ("mbsec.policy.cli", "main",
               "check, test, explain, diff, evaluate, learn, replay and report on policies"),
    "connect": ("mbsec.connect", "main",
                "client side: plain Modbus/TCP on this host -> Modbus/TCP Security to mbsec"),
    "ctl": ("mbsec.ctl", "main", "ask a running proxy: status, freeze/thaw writes, connections, "
            "drop, reload (admin socket)"),
    "demo": ("mbsec.demo", "main", "throw-away PKI + simulated PLC + proxy + client, end to end"),
}


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="mbsec",
        description="Mutual-TLS Modbus/TCP Security proxy with per-request policy.",
        epilog="Run 'mbsec COMMAND --help' for the options of one command.",
    )
    p.add_argument("--version", action="version", version=f"mbsec {__version__}")
    p.add_argument("command", choices=sorted(SUBCOMMANDS), metavar="COMMAND",
                   help="; ".join(f"{k}: {v[2]}" for k, v in SUBCOMMANDS.items()))
    return p


def main(argv: Sequence[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    parser = _parser()
    if not args:
        parser.print_help()
        return 2
    ns = parser.parse_args(args[:1])  # the subcommand parses the rest itself
    module, func, _ = SUBCOMMANDS[ns.command]
    entry: Callable[[list[str]], int] = getattr(importlib.import_module(module), func)
    try:
        return entry(args[1:])
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
