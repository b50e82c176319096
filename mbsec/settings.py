"""The proxy's configuration: one TOML file plus ``MBSEC_*`` environment overrides.

Every model forbids unknown keys, so a typo is an error at start instead of a silently ignored
setting. Relative paths are resolved against the directory of the configuration file, so a
config directory can be moved as a whole. ``load_settings`` turns every problem into one line
``FILE: dotted.key: what is wrong`` (:class:`SettingsError`), never a traceback.
"""

from __future__ import annotations

import difflib
import ipaddress
import os
import tomllib
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any, ClassVar, Literal, get_args, get_origin

import idna
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator
from pydantic_settings import BaseSettings, PydanticBaseSettingsSource, SettingsConfigDict

if TYPE_CHECKING:
    from mbsec.path.plc import UpstreamTarget

DEFAULT_PORT = 802


class SettingsError(Exception):
    """The configuration cannot be used; ``problems`` holds one human-readable line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems


def check_host_name(host: str, where: str) -> None:
    """A name the resolver can take: an IP address, or labels IDNA can encode (``a..b`` or a
    label over 63 characters would otherwise fail later, inside ``getaddrinfo``)."""
    try:
        ipaddress.ip_address(host)
        return
    except ValueError:
        pass
    try:
        host.encode("idna")  # what the standard library resolver does (IDNA 2003)
        if not host.isascii():
            idna.encode(host, uts46=True)  # what trio's resolver does (IDNA 2008)
    except (UnicodeError, idna.IDNAError):
        prefix = f"{where}: " if where else ""
        raise ValueError(f"{prefix}{host!r} is not a valid host name") from None


def parse_hostport(value: str, *, default_port: int | None = None) -> tuple[str, int]:
    """``host:port``, ``[v6]:port`` or ``:port`` (all addresses) -> ``(host, port)``."""
    value = value.strip()
    if value.startswith("["):
        host, sep, rest = value[1:].partition("]")
        if not sep:
            raise ValueError(f"unbalanced '[' in address {value!r}")
        port_s = rest[1:] if rest.startswith(":") else ""
    elif value.count(":") == 1:
        host, _, port_s = value.partition(":")
    elif ":" in value:  # bare IPv6 without brackets: no port
        host, port_s = value, ""
    else:
        host, port_s = value, ""
    if host:
        check_host_name(host, f"address {value!r}")
    if not port_s:
        if default_port is None:
            raise ValueError(f"address {value!r} needs a port (host:port)")
        return host, default_port
    try:
        port = int(port_s)
    except ValueError:
        raise ValueError(f"port {port_s!r} in {value!r} is not a number") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"port {port} in {value!r} is out of range 0..65535")
    return host, port


class _Model(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class TlsSettings(_Model):
    """Server identity and how clients are verified (Modbus/TCP Security, server side)."""

    cert: Path  # PEM: server certificate, its intermediates, the root (all of it is sent, R-46)
    key: Path  # PEM private key of the server certificate
    client_ca: Path  # PEM bundle of the CAs that issue client certificates
    crl: list[Path] = Field(default_factory=list)  # PEM or DER CRL files
    min_version: Literal["1.2", "1.3"] = "1.2"
    handshake_timeout: float = Field(default=10.0, gt=0)
    crl_warn_days: float = Field(default=2.0, ge=0)  # warn this long before a CRL's nextUpdate
    #: name the presented certificate on TLS 1.3 handshake rejections too (OpenSSL's key log
    #: over an in-process pipe, mbsec/tls_keylog.py); false: they name none
    name_tls13_rejections: bool = True


class UpstreamSettings(_Model):
    """One PLC (or gateway) reached over plain Modbus/TCP."""

    host: str
    port: int = Field(default=502, ge=1, le=65535)
    unit_ids: list[int] = Field(min_length=1)
    unit_rewrite: dict[int, int] = Field(default_factory=dict)
    #: 2: a slow register or a retransmission on one link does not stall every client
    #: (docs/config.md, "Availability rules"); 1 for a PLC that takes one connection only
    pool_size: int = Field(default=2, ge=1, le=16)
    depth: int = Field(default=1, ge=1, le=16)
    connect_timeout: float = Field(default=3.0, gt=0)
    request_timeout: float = Field(default=2.0, gt=0)
    backoff_initial: float = Field(default=0.2, gt=0)
    backoff_max: float = Field(default=10.0, gt=0)
    late_reply_wait: float = Field(default=10.0, gt=0)
    resets_before_backoff: int = Field(default=3, ge=0)
    reset_window: float = Field(default=10.0, ge=0)
    breaker_resets: int = Field(default=3, ge=1)
    breaker_window: float = Field(default=60.0, ge=0)
    breaker_hold: float = Field(default=30.0, ge=0)

    @field_validator("host")
    @classmethod
    def _bare_host(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("host is empty")
        if ":" in v:
            try:
                ipaddress.IPv6Address(v.strip("[]"))
            except ValueError:
                raise ValueError(f"{v!r}: give the port in 'port', not in 'host'") from None
        check_host_name(v.strip("[]"), "")  # pydantic names the key
        return v.strip("[]")

    @field_validator("unit_ids")
    @classmethod
    def _unit_range(cls, v: list[int]) -> list[int]:
        bad = [u for u in v if not 0 <= u <= 255]
        if bad:
            raise ValueError(f"unit ids must be 0..255, got {bad}")
        if len(set(v)) != len(v):
            raise ValueError("unit ids are listed twice")
        return v

    @model_validator(mode="after")
    def _rewrite_known(self) -> UpstreamSettings:
        for src, dst in self.unit_rewrite.items():
            if src not in self.unit_ids:
                raise ValueError(f"unit_rewrite: unit {src} is not in unit_ids")
            if not 0 <= dst <= 255:
                raise ValueError(f"unit_rewrite: target unit {dst} is not 0..255")
            if dst != src and dst in self.unit_ids:
                # clients also reach `dst` directly, and the policy judges the two unit ids
                # separately: a rewrite onto it would let a grant for `src` read/write `dst`
                raise ValueError(
                    f"unit_rewrite: {src} -> {dst} aliases unit {dst}, which clients of this "
                    f"upstream also address directly; rewrite onto a unit id not in unit_ids"
                )
        return self


class LimitsSettings(_Model):
    """Resource bounds per proxy, per client identity, per source address and per connection."""

    max_connections: int = Field(default=512, ge=1)
    max_per_identity: int = Field(default=16, ge=1)
    max_per_source: int = Field(default=64, ge=1)
    idle_timeout: float = Field(default=300.0, gt=0)
    max_pipelined: int = Field(default=8, ge=1, le=256)
    drain_timeout: float = Field(default=10.0, ge=0)
    #: a request must be complete this long after its first byte (a trickling client is closed)
    request_complete_timeout: float = Field(default=5.0, gt=0)
    #: connections still in their TLS handshake (below max_connections: the rest is reserved
    #: for authenticated sessions); docs/config.md, "Handshake admission"
    max_handshakes: int = Field(default=128, ge=1)
    #: new connections per second per source prefix (IPv4 /24, IPv6 /64), and the bucket
    #: depth; enforced while at least half of max_handshakes are taken
    prefix_connection_rate: float = Field(default=50.0, gt=0)
    prefix_connection_burst: int = Field(default=100, ge=1)
    #: nice steps the thread that runs the handshakes (trio: accept, TLS, admin, metrics)
    #: runs below the data-plane thread, which keeps the process's own value; 0: no change
    #: (docs/config.md, "handshake_nice"; mbsec/threads.py)
    handshake_nice: int = 0

    @field_validator("handshake_nice")
    @classmethod
    def _nice_steps(cls, v: int) -> int:
        if not 0 <= v <= 19:
            raise ValueError(f"{v} is not 0..19 (nice steps of the handshake thread below the "
                             "data plane; 0: the same priority)")
        return v

    @model_validator(mode="after")
    def _handshakes_below_connections(self) -> LimitsSettings:
        if self.max_handshakes >= self.max_connections:
            if "max_handshakes" in self.model_fields_set:
                raise ValueError(
                    f"max_handshakes ({self.max_handshakes}) must be below max_connections "
                    f"({self.max_connections}): the difference is reserved for authenticated "
                    "sessions")
            # the default, with a small max_connections: half of it
            object.__setattr__(self, "max_handshakes", max(1, self.max_connections // 2))
        return self


class SyslogSettings(_Model):
    address: str = "/dev/log"  # a unix socket path, or host:port (UDP)
    facility: str = "local0"


class SinkSettings(_Model):
    """One ``[[logging.sinks]]`` entry: where events go, in which format, from which level.

    ``tcp`` and ``tls`` send RFC 5424 frames with octet counting (RFC 6587, RFC 5425) from a
    sender thread of their own, through a bounded in-memory spool (mbsec/sink_remote.py)."""

    type: Literal["stdout", "file", "tcp", "tls"]
    #: json: the ECS line; rfc5424: syslog with structured data; cef: ArcSight CEF.
    #: Unset: json for stdout/file, rfc5424 for tcp/tls
    format: Literal["json", "rfc5424", "cef"] | None = None
    #: minimum level of this sink; unset: ``logging.level``
    level: Literal["debug", "info", "warning"] | None = None
    name: str | None = Field(default=None, min_length=1, max_length=64)
    path: Path | None = None  # file
    address: str | None = None  # tcp/tls: host:port (default port 514 tcp, 6514 tls)
    facility: str = "local0"
    hostname: str | None = Field(default=None, min_length=1, max_length=255)
    #: the private enterprise number in the SD-IDs (``event@32473``); 32473 is the number
    #: RFC 5612 reserves for documentation: an organisation with its own PEN sets it
    enterprise_number: int = Field(default=32473, ge=1)
    ca: Path | None = None  # tls: PEM CA bundle the collector's certificate must chain to
    cert: Path | None = None  # tls: optional client certificate (PEM chain)
    key: Path | None = None  # tls: its private key
    server_name: str | None = None  # tls: name checked in the collector's certificate
    #: tcp/tls: RFC 6587 octet counting (RFC 5425 over TLS), or one message per line (LF)
    framing: Literal["octet-counting", "lf"] = "octet-counting"
    spool_events: int = Field(default=10000, ge=1, le=1_000_000)
    reconnect_initial: float = Field(default=0.5, gt=0)
    reconnect_max: float = Field(default=30.0, gt=0)
    connect_timeout: float = Field(default=5.0, gt=0)
    send_timeout: float = Field(default=10.0, gt=0)
    close_timeout: float = Field(default=2.0, ge=0)

    @field_validator("facility")
    @classmethod
    def _facility(cls, v: str) -> str:
        import logging.handlers

        if v not in logging.handlers.SysLogHandler.facility_names:
            raise ValueError(f"unknown syslog facility {v!r}")
        return v

    @field_validator("hostname")
    @classmethod
    def _hostname(cls, v: str | None) -> str | None:
        if v is not None and not all(33 <= ord(c) <= 126 for c in v):
            raise ValueError("hostname: printable ASCII without spaces (RFC 5424 HOSTNAME)")
        return v

    @model_validator(mode="after")
    def _keys_for_type(self) -> SinkSettings:
        t = self.type
        if t == "file" and self.path is None:
            raise ValueError("a file sink needs 'path'")
        if t in ("tcp", "tls"):
            if self.address is None:
                raise ValueError(f"a {t} sink needs 'address' (host:port)")
            host, _port = parse_hostport(self.address, default_port=514)
            if not host:
                raise ValueError(f"address {self.address!r} needs a host")
        elif self.address is not None:
            raise ValueError(f"'address' is for tcp/tls sinks, not {t}")
        if t != "file" and self.path is not None:
            raise ValueError(f"'path' is for file sinks, not {t}")
        tls_keys = [k for k in ("ca", "cert", "key", "server_name") if getattr(self, k)]
        if t != "tls" and tls_keys:
            raise ValueError(f"{', '.join(tls_keys)}: only for tls sinks")
        if t == "tls" and self.ca is None:
            raise ValueError("a tls sink needs 'ca' (the CA that signed the collector)")
        if self.server_name is not None:
            check_host_name(self.server_name, "server_name")
        if (self.cert is None) != (self.key is None):
            raise ValueError("'cert' and 'key' go together")
        if self.reconnect_max < self.reconnect_initial:
            raise ValueError("reconnect_max is below reconnect_initial")
        return self

    def host_port(self) -> tuple[str, int]:
        assert self.address is not None
        return parse_hostport(self.address, default_port=6514 if self.type == "tls" else 514)

    def effective_format(self) -> str:
        return self.format or ("rfc5424" if self.type in ("tcp", "tls") else "json")

    def label(self, index: int) -> str:
        """How alarms and metrics name this sink: ``name``, else ``TYPE-INDEX``."""
        return self.name or f"{self.type}-{index}"


class LoggingSettings(_Model):
    format: Literal["json", "console"] = "json"
    level: Literal["debug", "info", "warning"] = "info"
    #: level of the per-request event for allowed requests; "off" skips building it at all
    allowed_requests: Literal["off", "debug", "info"] = "debug"
    #: what a forwarded request gets while no sink can take events (docs/config.md)
    on_sink_failure: Literal["refuse_writes", "refuse", "serve"] = "refuse_writes"
    #: budget of rejection events of peers without a certificate (first events and
    #: summaries); per prefix and reason one event, then one summary per interval
    rejections_per_second: float = Field(default=5.0, gt=0, le=1000)
    rejection_interval: float = Field(default=10.0, gt=0, le=3600)
    stdout: bool = True
    file: Path | None = None
    syslog: SyslogSettings | None = None
    #: further sinks, each with its own format and minimum level (docs/config.md)
    sinks: list[SinkSettings] = Field(default_factory=list)

    @model_validator(mode="after")
    def _sink_names_unique(self) -> LoggingSettings:
        names = [sink.label(i) for i, sink in enumerate(self.sinks)]
        twice = sorted({n for n in names if names.count(n) > 1})
        if twice:
            raise ValueError(f"sinks: name {', '.join(twice)} is used twice (alarms and "
                             "metrics tell the sinks apart by it)")
        return self


class MetricsSettings(_Model):
    listen: str | None = None  # e.g. "127.0.0.1:9802"; unset: no HTTP endpoint

    @field_validator("listen")
    @classmethod
    def _addr(cls, v: str | None) -> str | None:
        if v is not None:
            parse_hostport(v)
        return v


class AutoFreezeSettings(_Model):
    """Freeze writes to a PLC whose link flaps (mbsec.flap): off by default."""

    enabled: bool = False
    drops: int = Field(default=5, ge=1)  # link drops no client was charged with ...
    window: float = Field(default=60.0, gt=0)  # ... within this many seconds
    stable_for: float = Field(default=300.0, gt=0)  # thaw after a link was up this long


class AdminSettings(_Model):
    """The admin socket (``mbsec ctl``) and the node state file (docs/config.md)."""

    #: unix socket; its permissions decide who may use it; "" turns it off
    socket: Path | None = Path("/run/mbsec/admin.sock")
    socket_mode: str = "0660"
    socket_group: str | None = None
    #: freezes and (workers > 1) rate buckets shared by the workers; kept across restarts
    state_file: Path = Path("/run/mbsec/state")
    #: the exception a frozen write gets (01 illegal function, as a policy deny)
    freeze_exception: int = Field(default=1, ge=1, le=255)
    auto_freeze: AutoFreezeSettings = Field(default_factory=AutoFreezeSettings)

    @field_validator("socket", mode="before")
    @classmethod
    def _off(cls, v: Any) -> Any:
        return None if v == "" else v

    @field_validator("socket_mode")
    @classmethod
    def _mode(cls, v: str) -> str:
        try:
            mode = int(v, 8)
        except ValueError:
            raise ValueError(f"{v!r} is not an octal file mode such as \"0660\"") from None
        if not 0 <= mode <= 0o777:
            raise ValueError(f"{v!r} is not a file mode (0000..0777)")
        if mode & 0o002:
            raise ValueError(f"{v!r} lets every local user write (freeze, drop): leave out "
                             "the 'other' write bit")
        return v

    @property
    def mode(self) -> int:
        return int(self.socket_mode, 8)


class Settings(BaseSettings):
    """The whole configuration tree."""

    model_config = SettingsConfigDict(
        env_prefix="MBSEC_",
        env_nested_delimiter="__",
        extra="forbid",
        frozen=True,
    )
    #: False in :class:`FileOnlySettings`: only the file counts, MBSEC_* is ignored
    _read_environment: ClassVar[bool] = True

    listen: list[str] = Field(default_factory=lambda: [f"0.0.0.0:{DEFAULT_PORT}"], min_length=1)
    tls: TlsSettings
    policy: Path
    upstreams: dict[str, UpstreamSettings] = Field(default_factory=dict)
    limits: LimitsSettings = Field(default_factory=LimitsSettings)
    logging: LoggingSettings = Field(default_factory=LoggingSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    #: proxy processes sharing the listen ports (SO_REUSEPORT); each has its own upstream pools
    workers: int = Field(default=1, ge=1, le=64)
    #: client and PLC sockets after the handshake run in one epoll thread; the all-trio data
    #: plane ("trio") was removed (docs/config.md says why)
    data_plane: Literal["thread"] = "thread"
    #: data plane: spin this long for a PLC reply before sleeping (0: never spin)
    busy_poll_us: int = Field(default=0, ge=0, le=1000)
    admin: AdminSettings = Field(default_factory=AdminSettings)

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        # The file arrives as init kwargs; the environment must win over it.
        return (env_settings, init_settings) if cls._read_environment else (init_settings,)

    @field_validator("listen")
    @classmethod
    def _listen(cls, v: list[str]) -> list[str]:
        for addr in v:
            parse_hostport(addr, default_port=DEFAULT_PORT)
        return v

    @model_validator(mode="after")
    def _units_unique(self) -> Settings:
        owner: dict[int, str] = {}
        for name, up in self.upstreams.items():
            for u in up.unit_ids:
                if u in owner:
                    raise ValueError(
                        f"unit id {u} is routed to both upstreams {owner[u]!r} and {name!r}"
                    )
                owner[u] = name
        return self

    @model_validator(mode="after")
    def _metrics_ports(self) -> Settings:
        if self.metrics.listen and self.workers > 1:
            _host, port = parse_hostport(self.metrics.listen)
            if port and port + self.workers - 1 > 65535:
                raise ValueError(
                    f"metrics.listen port {port} with workers = {self.workers}: worker i serves "
                    f"its metrics on port {port} + i, which passes 65535; choose a lower port"
                )
        return self

    # -- derived views --------------------------------------------------------------------

    def metrics_address(self, worker: int = 0) -> tuple[str, int] | None:
        """Where worker ``worker`` serves /metrics: ``metrics.listen`` plus the worker index
        (each worker has its own counters; port 0 gives each a free port)."""
        if not self.metrics.listen:
            return None
        host, port = parse_hostport(self.metrics.listen)
        return host, (port + worker if port else 0)

    def listen_addresses(self) -> list[tuple[str, int]]:
        return [parse_hostport(a, default_port=DEFAULT_PORT) for a in self.listen]

    def upstream_targets(self) -> list[UpstreamTarget]:
        from mbsec.path.plc import UpstreamTarget

        # every [upstreams.NAME] key is an UpstreamTarget field of the same name
        return [
            UpstreamTarget(name=name, **{**u.model_dump(), "unit_ids": frozenset(u.unit_ids)})
            for name, u in self.upstreams.items()
        ]

    def with_paths_resolved(self, base: Path) -> Settings:
        """Relative file paths are relative to the config file, not to the working directory."""

        def r(p: Path) -> Path:
            return p if p.is_absolute() else (base / p)

        tls = self.tls.model_copy(
            update={
                "cert": r(self.tls.cert),
                "key": r(self.tls.key),
                "client_ca": r(self.tls.client_ca),
                "crl": [r(p) for p in self.tls.crl],
            }
        )
        logging = self.logging
        if logging.file is not None:
            logging = logging.model_copy(update={"file": r(logging.file)})
        if logging.sinks:
            paths = ("path", "ca", "cert", "key")
            logging = logging.model_copy(update={"sinks": [
                sink.model_copy(update={k: r(getattr(sink, k)) for k in paths
                                        if getattr(sink, k) is not None})
                for sink in logging.sinks]})
        admin = self.admin.model_copy(update={
            "socket": r(self.admin.socket) if self.admin.socket is not None else None,
            "state_file": r(self.admin.state_file)})
        return self.model_copy(update={"tls": tls, "policy": r(self.policy), "logging": logging,
                                       "admin": admin})


class FileOnlySettings(Settings):
    """The same tree without the environment: the demo and tests must not pick up MBSEC_*."""

    _read_environment: ClassVar[bool] = False


def _loc(loc: tuple[int | str, ...]) -> str:
    return ".".join(str(p) for p in loc) or "(top level)"


def _keys_at(loc: tuple[int | str, ...]) -> list[str]:
    """The keys the configuration allows at ``loc`` (a table's dotted path), [] if unknown."""
    model: Any = Settings
    skip_key = False
    for part in loc:
        if skip_key:  # the NAME of [upstreams.NAME]
            skip_key = False
            continue
        field = model.model_fields.get(part) if isinstance(part, str) else None
        if field is None:
            return []
        ann = field.annotation
        args = [a for a in get_args(ann) if a is not type(None)]
        if get_origin(ann) is dict and args and isinstance(args[-1], type):
            model, skip_key = args[-1], True
        elif isinstance(ann, type) and issubclass(ann, BaseModel):
            model = ann
        elif len(args) == 1 and isinstance(args[0], type) and issubclass(args[0], BaseModel):
            model = args[0]  # Optional[Model]
        else:
            return []
    return sorted(model.model_fields)


def _unknown_key(loc: tuple[int | str, ...]) -> str:
    """``unknown key``, with the close name when there is one (``limit`` -> ``limits``)."""
    known = _keys_at(loc[:-1])
    close = difflib.get_close_matches(str(loc[-1]), known, n=1, cutoff=0.6) if loc else []
    if close:
        return f"unknown key; did you mean {close[0]!r}? (docs/config.md)"
    return "unknown key (typo?)" + (f"; allowed here: {', '.join(known)}" if known else "")


def format_validation_error(source: str, exc: ValidationError) -> list[str]:
    lines = []
    for err in exc.errors():
        msg = err["msg"]
        if msg.startswith("Value error, "):
            msg = msg[len("Value error, "):]
        if err["type"] == "extra_forbidden":
            msg = _unknown_key(tuple(err["loc"]))
        elif err["type"] == "missing":
            msg = "required key is missing (docs/config.md)"
        lines.append(f"{source}: {_loc(tuple(err['loc']))}: {msg}")
    return lines


def build_settings(
    data: Mapping[str, Any],
    *,
    source: str = "<config>",
    base: Path | None = None,
    environment: bool = True,
) -> Settings:
    """Validate an already parsed tree; ``environment=False`` ignores ``MBSEC_*`` variables."""
    cls = Settings if environment else FileOnlySettings
    try:
        s = cls(**dict(data))
    except ValidationError as exc:
        raise SettingsError(format_validation_error(source, exc)) from None
    return s.with_paths_resolved(base) if base is not None else s


def load_settings(path: str | os.PathLike[str]) -> Settings:
    """Read, validate and path-resolve a TOML configuration; raise :class:`SettingsError`."""
    p = Path(path)
    try:
        with p.open("rb") as fh:
            data = tomllib.load(fh)
    except FileNotFoundError:
        raise SettingsError([f"{p}: file not found"]) from None
    except OSError as exc:
        raise SettingsError([f"{p}: cannot read: {exc.strerror}"]) from None
    except tomllib.TOMLDecodeError as exc:
        raise SettingsError([f"{p}: not valid TOML: {exc}"]) from None
    except UnicodeDecodeError as exc:
        raise SettingsError([f"{p}: not valid TOML: not UTF-8 text (byte {exc.start})"]) \
            from None
    return build_settings(data, source=str(p), base=p.resolve().parent)


def is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return host == "localhost"
