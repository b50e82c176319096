"""``mbsec ctl``: ask a running proxy through its admin socket (mbsec.admin).

Imports nothing but the standard library unless ``--config`` is given (an operator's command
should answer at once, also on a loaded box).

``status | freeze [TARGET] | thaw [TARGET] | connections | drop CONN_ID | reload``; readable
text by default, the proxy's JSON answer with ``--json``. Exit 0 when the proxy did it, 1 when
it refused (the reason is printed), 2 for a usage error; a missing socket or a permission
problem is one line saying what to check, never a traceback.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any

DEFAULT_SOCKET = Path("/run/mbsec/admin.sock")
TIMEOUT = 15.0
REQUEST_MAX = 65536  # bytes of one request line (the admin socket's limit)


def short_path(path: Path) -> tuple[str, int | None]:
    """A path ``bind``/``connect`` accept (at most 107 bytes): a longer one is reached through
    ``/proc/self/fd/N/`` of its directory (the fd is returned for the caller to close)."""
    s = str(path)
    if len(s.encode()) < 100:
        return s, None
    fd = os.open(path.parent, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    return f"/proc/self/fd/{fd}/{path.name}", fd


class CtlError(Exception):
    """One line for the operator."""


def request(path: Path, req: dict[str, Any], timeout: float = TIMEOUT) -> dict[str, Any]:
    """Send ``req`` to the admin socket at ``path``; the proxy's answer."""
    try:
        name, dirfd = short_path(path)
    except FileNotFoundError:
        raise CtlError(f"no admin socket at {path}: its directory does not exist (is mbsec "
                       "serve running? see [admin] socket in its configuration)") from None
    except PermissionError:
        raise CtlError(f"permission denied: {path.parent} (run as root or as a member of "
                       "the socket's group)") from None
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        try:
            sock.connect(name)
        except FileNotFoundError:
            raise CtlError(f"no admin socket at {path} (is mbsec serve running? see [admin] "
                           "socket in its configuration, or give --socket)") from None
        except PermissionError:
            raise CtlError(f"permission denied: {path} (the socket's mode and group decide "
                           "who may use it: run as root or as a member of its group)") from None
        except ConnectionRefusedError:
            raise CtlError(f"nothing listens on {path} (a stale socket: mbsec serve is not "
                           "running)") from None
        sock.sendall(json.dumps(req).encode() + b"\n")
        buf = b""
        while b"\n" not in buf and len(buf) < 16 * REQUEST_MAX:
            chunk = sock.recv(65536)
            if not chunk:
                break
            buf += chunk
    except TimeoutError:
        raise CtlError(f"no answer on {path} within {timeout:g} s") from None
    except OSError as exc:
        raise CtlError(f"{path}: {exc.strerror or exc}") from None
    finally:
        sock.close()
        if dirfd is not None:
            os.close(dirfd)
    try:
        answer = json.loads(buf.split(b"\n", 1)[0])
    except ValueError:
        raise CtlError(f"{path}: not an mbsec admin socket (no JSON answer)") from None
    if not isinstance(answer, dict):
        raise CtlError(f"{path}: not an mbsec admin socket (no JSON object)")
    return answer


def _socket_path(args: argparse.Namespace) -> Path:
    if args.socket:
        return Path(args.socket)
    if args.config:
        from mbsec.settings import SettingsError, load_settings

        try:
            settings = load_settings(args.config)
        except SettingsError as exc:
            raise CtlError("; ".join(exc.problems)) from None
        if settings.admin.socket is None:
            raise CtlError(f"{args.config}: the admin socket is turned off (admin.socket = \"\")")
        return settings.admin.socket
    env = os.environ.get("MBSEC_ADMIN__SOCKET")
    return Path(env) if env else DEFAULT_SOCKET


def _when(stamp: float) -> str:
    return dt.datetime.fromtimestamp(stamp, dt.UTC).strftime("%Y-%m-%d %H:%M:%S UTC")


def _frozen_lines(frozen: list[dict[str, Any]]) -> list[str]:
    if not frozen:
        return ["writes: not frozen"]
    out = []
    for f in frozen:
        who = "all targets" if f["target"] == "*" else f"target {f['target']}"
        out.append(f"writes FROZEN: {who} ({', '.join(f['kinds'])}, since "
                   f"{_when(f['since'])}, reason {f['reason']})")
    return out


def render(command: str, answer: dict[str, Any]) -> str:
    """The readable form of an answer."""
    lines: list[str] = []
    if command == "status":
        lines += _frozen_lines(answer.get("frozen", []))
        af = answer.get("auto_freeze", {})
        lines.append("auto freeze: " + (
            f"on ({af['drops']} drops within {af['window']:g} s; thaw after "
            f"{af['stable_for']:g} s stable)" if af.get("enabled") else "off"))
        lines.append(f"upstreams: {', '.join(answer.get('upstreams', [])) or 'none'}")
        lines.append(f"rate limits: per {answer.get('rate_limits', 'process')}")
        for w in answer.get("workers", [answer]):
            serving = "serving" if w.get("healthy") else "not serving"
            lines.append(f"worker {w.get('worker', 0)}: pid {w.get('pid')}, "
                         f"{w.get('connections', 0)} connection(s), policy generation "
                         f"{w.get('generation')}, {serving}")
    elif command in ("freeze", "thaw"):
        target = answer.get("target", "*")
        who = "all targets" if target == "*" else target
        if command == "freeze":
            lines.append(f"writes frozen: {who}" + ("" if answer.get("changed")
                                                    else " (was frozen already)"))
        else:
            kinds = answer.get("thawed", [])
            if kinds:
                lines.append(f"thawed: {'every freeze' if target == '*' else who} "
                             f"({', '.join(kinds)})")
            else:
                lines.append("nothing was frozen" if target == "*" else f"{who} was not frozen")
        lines += _frozen_lines(answer.get("frozen", []))
    elif command == "connections":
        conns = answer.get("connections", [])
        lines.append(f"{'ID':>6} {'WORKER':>6} {'SOURCE':<22} {'ROLE':<12} {'REQS':>7} "
                     f"{'AGE':>8}  NAME")
        for c in conns:
            lines.append(f"{c['conn_id']:>6} {c['worker']:>6} {c['source']:<22} "
                         f"{c.get('role') or '-':<12} {c['requests']:>7} {c['age']:>7.0f}s  "
                         f"{c.get('common_name') or '(handshake)'}")
        lines.append(f"{len(conns)} connection(s)")
    elif command == "drop":
        lines.append(f"connection {answer['conn_id']} closes (its requests in flight are "
                     "answered first)")
    elif command == "reload":
        gens = [w.get("generation") for w in answer.get("workers", [answer])]
        lines.append(f"reloaded (policy generation {', '.join(str(g) for g in gens)})")
    return "\n".join(lines)


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(
        prog="mbsec ctl",
        description="Control a running proxy through its admin socket (a unix socket: its "
        "file permissions decide who may use it).",
    )
    where = p.add_mutually_exclusive_group()
    where.add_argument("--socket", "-s", metavar="PATH",
                       help=f"the admin socket (default: admin.socket of --config, else "
                       f"$MBSEC_ADMIN__SOCKET, else {DEFAULT_SOCKET})")
    where.add_argument("--config", "-c", metavar="FILE", help="read admin.socket from FILE")
    p.add_argument("--json", action="store_true", help="print the proxy's JSON answer")
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("status", help="freezes, workers, connections, policy generation")
    f = sub.add_parser("freeze", help="refuse writes (exception 01) to TARGET, or to all")
    f.add_argument("target", nargs="?", metavar="TARGET", help="an [upstreams.NAME] name")
    t = sub.add_parser("thaw", help="allow writes to TARGET again, or every freeze")
    t.add_argument("target", nargs="?", metavar="TARGET", help="an [upstreams.NAME] name")
    sub.add_parser("connections", help="the open client connections of every worker")
    d = sub.add_parser("drop", help="close a client connection (after its in-flight requests)")
    d.add_argument("conn_id", type=int, metavar="CONN_ID", help="from 'connections'")
    sub.add_parser("reload", help="reload TLS material, CRLs, policy and upstreams (SIGHUP)")
    args = p.parse_args(argv)
    req: dict[str, Any] = {"command": args.command}
    if getattr(args, "target", None) is not None:
        req["target"] = args.target
    if args.command == "drop":
        req["conn_id"] = args.conn_id
    try:
        answer = request(_socket_path(args), req)
    except CtlError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps(answer, indent=2, sort_keys=True))
    elif answer.get("ok"):
        print(render(args.command, answer))
    if not answer.get("ok"):
        if not args.json:
            print(f"error: {answer.get('error', 'refused')}", file=sys.stderr)
        return 1
    return 0
