"""How the driver packs the replies of one pass into TLS records (mbsec.path.epoll.records)."""

from __future__ import annotations

from hypothesis import given
from hypothesis import strategies as st

from mbsec.modbus.mbap import encode_adu
from mbsec.path.epoll import TLS_RECORD_MAX, records


def test_replies_of_a_pass_share_one_record_up_to_the_record_size() -> None:
    replies = [encode_adu(t, 1, bytes([3, 2, 0, t])) for t in range(16)]
    assert records(replies) == [b"".join(replies)]
    big = [encode_adu(t, 1, bytes([3, 250]) + bytes(250)) for t in range(256)]  # 259 bytes
    out = records(big)
    assert b"".join(out) == b"".join(big)
    assert all(len(r) <= TLS_RECORD_MAX for r in out)
    assert [len(r) // 259 for r in out] == [63, 63, 63, 63, 4]  # split between ADUs only


@given(st.lists(st.binary(min_size=1, max_size=260), max_size=40),
       st.integers(min_value=260, max_value=2000))
def test_records_keep_order_and_never_split_a_reply(replies: list[bytes], limit: int) -> None:
    out = records(replies, limit)
    assert b"".join(out) == b"".join(replies)
    assert all(len(r) <= limit for r in out)
    assert all(out)
    # every record boundary is a reply boundary, and a record ends only where the next reply
    # would not fit (as few records as possible)
    starts = {sum(len(r) for r in replies[:i]): i for i in range(len(replies) + 1)}
    pos = 0
    for r in out[:-1]:
        pos += len(r)
        assert pos in starts
        assert len(r) + len(replies[starts[pos]]) > limit
