"""Linux ``TCP_INFO`` for a PLC link: round-trip time, RTO, retransmissions, lost segments.

On a Modbus link one lost segment costs a retransmission timeout (200 ms or more with Linux's
minimum RTO) while the client waits, so these figures, per PLC connection, are what tells an
OT engineer whether a slow PLC is slow or its network drops packets.

``getsockopt(IPPROTO_TCP, TCP_INFO)`` returns ``struct tcp_info`` (include/uapi/linux/tcp.h).
Its first 104 bytes have had this layout since Linux 2.6.x (later kernels only append
fields), in the host's byte order, without padding:

======  ====  =========================  ==================================================
offset  type  field                      what mbsec reads it as
======  ====  =========================  ==================================================
0       u8    tcpi_state                 TCP state (1 = ESTABLISHED)
1       u8    tcpi_ca_state              congestion-avoidance state
2       u8    tcpi_retransmits           RTO expiries in a row for the current segment
                                         (``retransmits``; 0 when the link is healthy)
3..7    u8    probes, backoff, options, wscale, flags
8       u32   tcpi_rto                   retransmission timeout, microseconds (``rto``)
12..23  u32   ato, snd_mss, rcv_mss
24      u32   tcpi_unacked               segments sent and not yet acknowledged
28      u32   tcpi_sacked
32      u32   tcpi_lost                  segments currently presumed lost (``lost``)
36      u32   tcpi_retrans               retransmitted segments not yet acknowledged
40..59  u32   fackets, last_data_sent/ack_sent/data_recv/ack_recv (ms)
60..67  u32   pmtu, rcv_ssthresh
68      u32   tcpi_rtt                   smoothed RTT, microseconds (``rtt``)
72      u32   tcpi_rttvar                RTT mean deviation, microseconds (``rtt_var``)
76..99  u32   snd_ssthresh, snd_cwnd, advmss, reordering, rcv_rtt, rcv_space
100     u32   tcpi_total_retrans         segments retransmitted over the connection's life
                                         (``total_retrans``; a counter, it restarts at 0
                                         with a new connection)
======  ====  =========================  ==================================================

No I/O here: :func:`read` takes the socket and is called by the thread that owns it (the
data-plane thread for PLC links), :func:`parse` only decodes bytes.
"""

from __future__ import annotations

import socket
import struct
from dataclasses import dataclass

#: the 104 bytes read: 8 u8 then 24 u32, host byte order, no padding
_LAYOUT = struct.Struct("=8B24I")
SIZE = _LAYOUT.size  # 104
TCP_INFO = getattr(socket, "TCP_INFO", 11)  # Linux's value; Python names it on Linux


@dataclass(frozen=True, slots=True)
class TcpInfo:
    """The figures of one TCP connection; times in seconds."""

    state: int
    retransmits: int
    rto: float
    unacked: int
    lost: int
    retrans: int
    rtt: float
    rtt_var: float
    snd_cwnd: int
    total_retrans: int


def parse(raw: bytes) -> TcpInfo | None:
    """Decode ``struct tcp_info``; None when fewer than :data:`SIZE` bytes came back (not
    Linux, or a kernel too old to have ``tcpi_total_retrans``)."""
    if len(raw) < SIZE:
        return None
    v = _LAYOUT.unpack_from(raw)
    u32 = v[8:]
    return TcpInfo(
        state=v[0],
        retransmits=v[2],
        rto=u32[0] / 1e6,
        unacked=u32[4],
        lost=u32[6],
        retrans=u32[7],
        rtt=u32[15] / 1e6,
        rtt_var=u32[16] / 1e6,
        snd_cwnd=u32[18],
        total_retrans=u32[23],
    )


def read(sock: socket.socket) -> bytes | None:
    """The raw ``TCP_INFO`` of ``sock`` (call it from the thread that owns the socket: a file
    descriptor read from elsewhere may have been closed and reused meanwhile); None when the
    kernel refuses."""
    try:
        return sock.getsockopt(socket.IPPROTO_TCP, TCP_INFO, SIZE)
    except OSError:
        return None
