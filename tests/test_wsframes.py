"""aivad.wsframes: RFC 6455 framing round trips, and every violation answered with its close code."""

from __future__ import annotations

import struct

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aivad.wsframes import (
    OP_BINARY,
    OP_CLOSE,
    OP_PING,
    OP_PONG,
    OP_TEXT,
    FrameError,
    FrameReader,
    close_payload,
    encode_frame,
    parse_close,
)


def raw_frame(b0: int, payload: bytes, *, mask: bool, declared: int | None = None) -> bytes:
    """A frame with any first byte (fin, rsv, opcode) and, optionally, a lying length."""
    n = len(payload) if declared is None else declared
    bit = 0x80 if mask else 0
    if n < 126:
        head = bytes((b0, bit | n))
    elif n < 65536:
        head = bytes((b0, bit | 126)) + struct.pack("!H", n)
    else:
        head = bytes((b0, bit | 127)) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = b"\x01\x02\x03\x04"
    return head + key + bytes(c ^ key[i % 4] for i, c in enumerate(payload))


def read_all(reader: FrameReader, data: bytes, chunk: int) -> list[tuple[int, str | bytes]]:
    out = []
    for i in range(0, len(data), chunk):
        reader.feed(data[i : i + chunk])
        out.extend(reader.events())
    return out


@settings(max_examples=200, deadline=None)
@given(
    texts=st.lists(st.text(max_size=300) | st.sampled_from(["x" * 125, "y" * 126, "z" * 65535, "w" * 65536]),
                   min_size=1, max_size=6),
    masked=st.booleans(),
    chunk=st.integers(1, 70000),
)
def test_round_trip_in_any_chunking(texts: list[str], masked: bool, chunk: int) -> None:
    data = b"".join(encode_frame(OP_TEXT, t.encode(), mask=masked) for t in texts)
    reader = FrameReader(masked=masked, max_message_bytes=1 << 20)
    assert read_all(reader, data, chunk) == [(OP_TEXT, t) for t in texts]


def test_fragments_reassembled_with_a_ping_between() -> None:
    data = (
        raw_frame(0x01, b"hel", mask=True)  # text, not final
        + raw_frame(0x89, b"are you there", mask=True)  # ping inside the message
        + raw_frame(0x00, "lo ✓".encode()[:3], mask=True)
        + raw_frame(0x80, "lo ✓".encode()[3:], mask=True)  # final continuation
        + raw_frame(0x82, b"\x00\xff", mask=True)
    )
    reader = FrameReader(masked=True, max_message_bytes=100)
    assert read_all(reader, data, 5) == [(OP_PING, b"are you there"), (OP_TEXT, "hello ✓"), (OP_BINARY, b"\x00\xff")]


@pytest.mark.parametrize(
    ("data", "code"),
    [
        (raw_frame(0xC1, b"x", mask=True), 1002),  # RSV1 without an extension
        (raw_frame(0x81, b"x", mask=False), 1002),  # a client frame must be masked
        (raw_frame(0x83, b"x", mask=True), 1002),  # reserved data opcode
        (raw_frame(0x8B, b"", mask=True), 1002),  # reserved control opcode
        (raw_frame(0x89, b"p" * 126, mask=True), 1002),  # control frame over 125 bytes
        (raw_frame(0x09, b"p", mask=True), 1002),  # fragmented control frame
        (raw_frame(0x80, b"x", mask=True), 1002),  # continuation with nothing to continue
        (raw_frame(0x01, b"a", mask=True) + raw_frame(0x81, b"b", mask=True), 1002),  # new message mid-message
        (raw_frame(0x01, b"a", mask=True) + raw_frame(0x81, b"b" * 120, mask=True), 1002),  # ... even a big one
        (raw_frame(0x81, b"\xff\xfe", mask=True), 1007),  # text that is not UTF-8
        (raw_frame(0x81, b"", mask=True, declared=1 << 40), 1009),  # a lying header: refused before any payload
        (raw_frame(0x01, b"a" * 60, mask=True) + raw_frame(0x80, b"b" * 60, mask=True), 1009),  # too big reassembled
    ],
)
def test_violations_carry_their_close_code(data: bytes, code: int) -> None:
    reader = FrameReader(masked=True, max_message_bytes=100)
    reader.feed(data)
    with pytest.raises(FrameError) as caught:
        reader.events()
    assert caught.value.code == code


def test_frames_before_a_violation_come_first() -> None:
    reader = FrameReader(masked=False, max_message_bytes=100)
    reader.feed(encode_frame(OP_TEXT, b"ok", mask=False) + raw_frame(0x81, b"x", mask=True))
    assert reader.events() == [(OP_TEXT, "ok")]
    with pytest.raises(FrameError) as caught:
        reader.events()
    assert caught.value.code == 1002
    with pytest.raises(FrameError):  # and it stays broken: nothing after a violation is trusted
        reader.events()


def test_size_limit_can_change_live() -> None:
    reader = FrameReader(masked=False, max_message_bytes=10)
    reader.feed(encode_frame(OP_TEXT, b"x" * 20, mask=False))
    reader.max_message_bytes = 20
    assert reader.events() == [(OP_TEXT, "x" * 20)]


def test_close_payloads() -> None:
    assert parse_close(b"") == (1005, "")
    assert parse_close(close_payload(4008, "slow consumer")) == (4008, "slow consumer")
    long_reason = "é" * 100  # 200 bytes: cut on a character boundary to fit a control frame
    payload = close_payload(1001, long_reason)
    assert len(payload) <= 125
    assert parse_close(payload)[1] == long_reason[: (len(payload) - 2) // 2]
    for bad, code in [(b"\x03", 1002), (struct.pack("!H", 999), 1002), (struct.pack("!H", 1006), 1002),
                      (struct.pack("!H", 2000), 1002), (struct.pack("!H", 1000) + b"\xff", 1007)]:
        with pytest.raises(FrameError) as caught:
            parse_close(bad)
        assert caught.value.code == code
    frame = encode_frame(OP_CLOSE, close_payload(1000), mask=True)
    reader = FrameReader(masked=True, max_message_bytes=10)
    reader.feed(frame + encode_frame(OP_PONG, b"", mask=True))
    assert reader.events() == [(OP_CLOSE, close_payload(1000)), (OP_PONG, b"")]


@settings(max_examples=300, deadline=None)
@given(garbage=st.binary(max_size=400), masked=st.booleans())
def test_garbage_raises_only_frame_errors(garbage: bytes, masked: bool) -> None:
    reader = FrameReader(masked=masked, max_message_bytes=200)
    reader.feed(garbage)
    code = None
    events: list[tuple[int, str | bytes]] = []
    try:
        events = reader.events()
    except FrameError as exc:
        code = exc.code
    assert code in (None, 1002, 1007, 1009)
    assert all(op in (OP_TEXT, OP_BINARY, OP_PING, OP_PONG, OP_CLOSE) for op, _ in events)
