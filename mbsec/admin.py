"""The admin socket: a unix socket on which ``mbsec ctl`` asks the running proxy things.

Nothing on the network: the socket's file permissions decide who may use it (``admin.socket``,
mode ``admin.socket_mode``, group ``admin.socket_group``), and every request is logged with
the peer's uid and pid (``SO_PEERCRED``, the ``admin-command`` event). One request per
connection: a JSON object on one line (``{"command": "freeze", "target": "plc"}``), one JSON
object back (``{"ok": true, ...}`` or ``{"ok": false, "error": "..."}``).

With ``workers > 1`` worker 0 owns ``admin.socket``; every worker also listens on
``admin.socket`` + ``.w<index>`` (mode 0600: the proxy's own user), and worker 0 asks the
others for what only they know (their connections, a drop, a reload) and merges the answers.
Freezes need no relay: they live in the node state every worker reads per write request.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import struct
import time
from pathlib import Path
from typing import TYPE_CHECKING, Any

import trio

from mbsec import events
from mbsec.ctl import REQUEST_MAX, short_path
from mbsec.nodestate import ALL

if TYPE_CHECKING:
    from mbsec.server import Proxy

REQUEST_TIMEOUT = 5.0
RELAY_TIMEOUT = 10.0
COMMANDS = ("status", "freeze", "thaw", "connections", "drop", "reload")


class AdminSocketError(Exception):
    """The admin socket cannot be bound (one line for the operator)."""


def worker_socket_path(path: Path, index: int) -> Path:
    return path.with_name(f"{path.name}.w{index}")


def bind_admin_socket(path: Path, mode: int, group: str | None = None) -> socket.socket:
    """Bind and listen on ``path``: its directory is made (0750) when missing; a socket file
    nobody listens on (left by a killed proxy) is replaced, a live one is an error."""
    try:
        path.parent.mkdir(mode=0o750, parents=True, exist_ok=True)
    except OSError as exc:
        raise AdminSocketError(f"admin.socket {path}: {exc.strerror or exc}") from None
    name, dirfd = short_path(path)
    try:
        if path.exists() or path.is_symlink():
            if not path.is_socket():
                raise AdminSocketError(f"admin.socket {path}: exists and is not a socket")
            probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            try:
                probe.connect(name)
            except OSError:
                path.unlink()  # stale: nobody listens
            else:
                raise AdminSocketError(
                    f"admin.socket {path}: another process listens on it (a second mbsec "
                    "serve? give each its own admin.socket)")
            finally:
                probe.close()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        old = os.umask(0o177)  # nobody but us between bind and chmod
        try:
            sock.bind(name)
        finally:
            os.umask(old)
        try:
            os.chmod(path, mode)
            if group:
                import grp

                os.chown(path, -1, grp.getgrnam(group).gr_gid)
            sock.listen(16)
        except (OSError, KeyError) as exc:
            sock.close()
            with contextlib.suppress(OSError):
                path.unlink()
            if isinstance(exc, KeyError):
                raise AdminSocketError(f"admin.socket_group {group!r}: no such group") from None
            raise
        return sock
    except OSError as exc:
        raise AdminSocketError(f"admin.socket {path}: {exc.strerror or exc}") from None
    finally:
        if dirfd is not None:
            os.close(dirfd)


def peer_credentials(sock: Any) -> tuple[int | None, int | None]:
    """(pid, uid) of the process at the other end of a unix socket."""
    try:
        raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, struct.calcsize("3i"))
    except OSError:
        return None, None
    pid, uid, _gid = struct.unpack("3i", raw)
    return pid, uid


async def read_line(stream: trio.abc.ReceiveStream) -> bytes:
    buf = b""
    while b"\n" not in buf:
        chunk = await stream.receive_some(4096)
        if not chunk:
            break
        buf += chunk
        if len(buf) > REQUEST_MAX:
            raise ValueError("request too long")
    return buf.split(b"\n", 1)[0]


async def ask(path: Path, request: dict[str, Any]) -> dict[str, Any]:
    """One request to an admin socket (trio); the answer (within ``RELAY_TIMEOUT``)."""
    name, dirfd = short_path(path)
    try:
        with trio.fail_after(RELAY_TIMEOUT):
            stream = await trio.open_unix_socket(name)
            async with stream:
                await stream.send_all(json.dumps(request).encode() + b"\n")
                line = await read_line(stream)
    finally:
        if dirfd is not None:
            os.close(dirfd)
    answer = json.loads(line)
    if not isinstance(answer, dict):
        raise ValueError("answer is not a JSON object")
    return answer


class AdminServer:
    """Serves the admin socket(s) of one worker for its :class:`~mbsec.server.Proxy`."""

    def __init__(self, proxy: Proxy, path: Path, *, index: int = 0, count: int = 1) -> None:
        self.proxy = proxy
        self.path = path
        self.index = index
        self.count = count

    def bind(self, mode: int, group: str | None) -> list[socket.socket]:
        """The sockets this worker serves: ``path`` (worker 0) and, with several workers,
        its own ``path.w<index>``."""
        socks: list[socket.socket] = []
        try:
            if self.index == 0:
                socks.append(bind_admin_socket(self.path, mode, group))
            if self.count > 1:
                socks.append(bind_admin_socket(worker_socket_path(self.path, self.index), 0o600))
        except AdminSocketError:
            for s in socks:
                s.close()
            raise
        return socks

    async def serve(self, socks: list[socket.socket], *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        paths = [self.path] if self.index == 0 else []
        if self.count > 1:
            paths.append(worker_socket_path(self.path, self.index))
        listeners = [trio.SocketListener(trio.socket.from_stdlib_socket(s)) for s in socks]
        try:
            async with trio.open_nursery() as n:
                task_status.started()
                for ln in listeners:
                    n.start_soon(self._accept, ln, n)
        finally:
            for p in paths:  # ours: a stale file would make the next start probe it
                with contextlib.suppress(OSError):
                    p.unlink()

    async def _accept(self, listener: trio.SocketListener, nursery: trio.Nursery) -> None:
        while True:
            try:
                stream = await listener.accept()
            except OSError as exc:
                if exc.errno in (errno.EMFILE, errno.ENFILE, errno.ENOMEM, errno.ENOBUFS):
                    await trio.sleep(0.1)
                    continue
                raise
            nursery.start_soon(self._one, stream)

    async def _one(self, stream: trio.SocketStream) -> None:
        pid, uid = peer_credentials(stream.socket)
        async with stream:
            answer: dict[str, Any]
            try:
                with trio.fail_after(REQUEST_TIMEOUT):
                    line = await read_line(stream)
                req = json.loads(line)
                if not isinstance(req, dict) or not isinstance(req.get("command"), str):
                    raise ValueError("expected a JSON object with a 'command'")
            except (ValueError, trio.TooSlowError, UnicodeDecodeError) as exc:
                events.emit(self.proxy.log, events.admin_command(
                    "", None, uid, pid, "bad_request", str(exc) or "timeout"))
                answer = {"ok": False, "error": f"bad request: {exc or 'timeout'}"}
            except (trio.BrokenResourceError, trio.ClosedResourceError):
                return
            else:
                try:
                    answer = await self.handle(req, uid, pid)
                except Exception as exc:  # a bug in a command must not stop the proxy
                    events.emit(self.proxy.log, events.admin_command(
                        str(req["command"]), None, uid, pid, "internal_error",
                        f"{type(exc).__name__}: {exc}"))
                    answer = {"ok": False, "error": f"internal error ({type(exc).__name__}), "
                              "logged"}
            with contextlib.suppress(trio.BrokenResourceError, trio.ClosedResourceError):
                await stream.send_all(json.dumps(answer).encode() + b"\n")

    # -- commands ---------------------------------------------------------------------------

    async def handle(self, req: dict[str, Any], uid: int | None, pid: int | None
                     ) -> dict[str, Any]:
        command = str(req["command"])
        local = bool(req.get("local"))  # relayed by worker 0: answer for this worker only
        arg = req.get("target", req.get("conn_id"))
        argument = None if arg is None else str(arg)
        answer = await self._dispatch(command, req, local)
        if not local:  # the relayed half is logged once, by worker 0
            error = None if answer.get("ok") else str(answer.get("reason", "bad_request"))
            events.emit(self.proxy.log, events.admin_command(
                command, argument, uid, pid, error, answer.get("error")))
        return answer

    async def _dispatch(self, command: str, req: dict[str, Any], local: bool
                        ) -> dict[str, Any]:
        proxy = self.proxy
        if command == "status":
            mine = self._status()
            if local or self.count == 1:
                return mine
            others = await self._relay({"command": "status"})
            return {"ok": True, **self._node_status(),
                    "workers": [mine, *(o for o in others if o.get("ok"))]}
        if command in ("freeze", "thaw"):
            target = req.get("target")
            if target is not None and target not in proxy.settings.upstreams:
                names = ", ".join(sorted(proxy.settings.upstreams)) or "none"
                return {"ok": False, "reason": "unknown_target",
                        "error": f"unknown target {target!r} (upstreams: {names})"}
            if command == "freeze":
                entry = proxy.write_freeze.freeze(target or ALL)
                return {"ok": True, "target": target or ALL, "changed": entry is not None,
                        "frozen": self._frozen()}
            kinds = (proxy.write_freeze.thaw(target) if target is not None
                     else proxy.write_freeze.thaw_all())
            return {"ok": True, "target": target or ALL, "thawed": kinds,
                    "frozen": self._frozen()}
        if command == "connections":
            conns = self._connections()
            if not local and self.count > 1:
                for o in await self._relay({"command": "connections"}):
                    conns.extend(o.get("connections", []))
            conns.sort(key=lambda c: int(c["conn_id"]))
            return {"ok": True, "connections": conns}
        if command == "drop":
            try:
                conn_id = int(req.get("conn_id", ""))
            except (TypeError, ValueError):
                return {"ok": False, "reason": "bad_request",
                        "error": "drop needs a connection id (a number, see 'connections')"}
            if self._drop(conn_id):
                return {"ok": True, "conn_id": conn_id, "worker": self.index}
            if not local and self.count > 1:
                for o in await self._relay({"command": "drop", "conn_id": conn_id}):
                    if o.get("ok"):
                        return o
            return {"ok": False, "reason": "unknown_connection",
                    "error": f"no connection {conn_id} (see 'mbsec ctl connections')"}
        if command == "reload":
            ok = proxy.reload()
            mine = {"ok": ok, "worker": self.index, "generation": proxy.state.generation,
                    "problems": list(proxy.last_reload_problems)}
            if local or self.count == 1:
                return mine if ok else {**mine, "reason": "reload_failed",
                                        "error": "; ".join(mine["problems"])}
            results = [mine, *await self._relay({"command": "reload"})]
            all_ok = all(r.get("ok") for r in results) and len(results) == self.count
            out = {"ok": all_ok, "workers": results}
            if not all_ok:
                problems = sorted({p for r in results for p in r.get("problems", [])})
                out.update(reason="reload_failed",
                           error="; ".join(problems) or "a worker did not reload")
            return out
        return {"ok": False, "reason": "unknown_command",
                "error": f"unknown command {command!r} (one of: {', '.join(COMMANDS)})"}

    async def _relay(self, req: dict[str, Any]) -> list[dict[str, Any]]:
        out: list[dict[str, Any]] = []
        for i in range(self.count):
            if i == self.index:
                continue
            try:
                out.append(await ask(worker_socket_path(self.path, i), {**req, "local": True}))
            except (OSError, ValueError, trio.TooSlowError) as exc:
                out.append({"ok": False, "worker": i, "error": f"worker {i}: {exc}"})
        return out

    def _frozen(self) -> list[dict[str, Any]]:
        return [{"target": e.target, "kinds": e.kinds, "since": e.since, "reason": e.reason,
                 **({"worker": e.owner} if e.owner >= 0 else {})}
                for e in self.proxy.write_freeze.node.freezes().values()]

    def _node_status(self) -> dict[str, Any]:
        proxy = self.proxy
        rule = proxy.write_freeze.rule
        return {
            "frozen": self._frozen(),
            "upstreams": sorted(proxy.settings.upstreams),
            "auto_freeze": {"enabled": rule.enabled, "drops": rule.drops,
                            "window": rule.window, "stable_for": rule.stable_for},
            "state_file": str(proxy.write_freeze.node.path or ""),
            "rate_limits": "node" if self.count > 1 else "process",
        }

    def _status(self) -> dict[str, Any]:
        proxy = self.proxy
        return {"ok": True, **self._node_status(), "worker": self.index, "pid": os.getpid(),
                "generation": proxy.state.generation, "connections": len(proxy.sessions),
                "healthy": proxy.healthy()}

    def _connections(self) -> list[dict[str, Any]]:
        out = []
        mono = time.monotonic()
        for s in self.proxy.sessions:
            ident = s.identity
            d = s.decisions
            out.append({
                "conn_id": s.conn_id, "worker": self.index,
                "source": f"{s.peer_ip}:{s.peer_port}",
                "common_name": ident.common_name if ident else None,
                "fingerprint": ident.fingerprint_sha256 if ident else None,
                "role": ident.role if ident else None,
                "age": round(mono - s.started, 3),
                "requests": d.requests if d else 0,
                "denied": d.denied if d else 0,
                "state": "serving" if ident else "handshake",
            })
        return out

    def _drop(self, conn_id: int) -> bool:
        for s in self.proxy.sessions:
            if s.conn_id == conn_id:
                s.stop_reading("dropped_by_operator")
                return True
        return False
