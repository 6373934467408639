"""The AMQP frame reader alone: aivad's (aivad/amqp_frames.py) beside aiormq's, on the same bytes.

Usage::

    python bench/amqp_frames.py [--deliveries 30000] [--runs 3]

Feeds N deliveries as a broker sends them (method, content header and a 200-byte body
frame each, marshalled by pamqp) from memory, in 64 KiB chunks, to each reader and
times reading every frame; pamqp's unmarshalling of the same frames alone is printed as
the floor both share. No broker, no socket: this isolates the reader; the end-to-end
figure is bench/amqp_ingest.py's.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import aiormq.connection
import pamqp.body
import pamqp.frame
import pamqp.header
from pamqp import commands

from aivad.amqp_frames import LeanFrameReceiver

BODY = b'{"n": 1, "text": "' + b"x" * 180 + b'"}'


def frames(n: int) -> list[bytes]:
    props = commands.Basic.Properties(delivery_mode=2, message_id="bench-1", content_type="application/json")
    out = []
    for i in range(n):
        out.append(pamqp.frame.marshal(commands.Basic.Deliver("ctag1.abcdef", i + 1, False, "bench-ev",
                                                              "bench.ingest.msg"), 1))
        out.append(pamqp.frame.marshal(pamqp.header.ContentHeader(0, len(BODY), props), 1))
        out.append(pamqp.frame.marshal(pamqp.body.ContentBody(BODY), 1))
    return out


def read_us(receiver_class: Any, stream: bytes, n: int) -> float:
    """µs per delivery to read every frame of ``stream`` with ``receiver_class``."""

    async def main() -> float:
        reader = asyncio.StreamReader(limit=2**20)
        for i in range(0, len(stream), 65536):
            reader.feed_data(stream[i:i + 65536])
        reader.feed_eof()
        receiver = receiver_class(reader)
        started = time.perf_counter()
        for _ in range(3 * n):
            await receiver.get_frame()
        return (time.perf_counter() - started) / n * 1e6

    return asyncio.run(main())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--deliveries", type=int, default=30_000)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    parts = frames(args.deliveries)
    stream = b"".join(parts)
    theirs, ours, floor = [], [], []
    for _ in range(args.runs):
        theirs.append(read_us(aiormq.connection.FrameReceiver, stream, args.deliveries))
        ours.append(read_us(LeanFrameReceiver, stream, args.deliveries))
        started = time.perf_counter()
        for part in parts:
            pamqp.frame.unmarshal(part)
        floor.append((time.perf_counter() - started) / args.deliveries * 1e6)
    a, b, f = statistics.median(theirs), statistics.median(ours), statistics.median(floor)
    print(f"amqp_frames: {args.deliveries} deliveries x 3 frames, median of {args.runs}: "
          f"aiormq's FrameReceiver {a:.1f} us per delivery; aivad's {b:.1f} us, {a / b:.2f}x as fast; "
          f"pamqp's unmarshalling alone {f:.1f} us")


if __name__ == "__main__":
    main()
