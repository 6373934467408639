"""The floor of a paced fan-out: what one write of one frame to one subscriber costs the server.

Usage::

    python bench/loopback_writes.py [--subscribers 100] [--messages 3000] [--frame-bytes 300]

A message published to N subscribers is N writes, one per connection (no system call writes
to many sockets at once). When messages come faster than the server can write them, a
connection's frames of several messages share a write (``bench/fanout.py``'s saturated rows);
when they come one at a time, each message costs N writes. This measures that write alone:
``os.write`` of one frame to each of N loopback TCP connections, a reader process draining
them all (as the bench's client does), in the server process's CPU time per write — messages
back to back (the baseline: the reader stays busy) and paced (``--pace-ms`` between messages:
the reader sleeps between them and each write must wake it, which the writer pays for).
Multiplied by the subscribers, it is most of what a paced message costs ``aivad serve``
(docs/performance.md, "The hot paths after stop 22").
"""

from __future__ import annotations

import argparse
import os
import socket
import subprocess
import sys
import time

READER = """
import selectors, socket, sys
sel = selectors.DefaultSelector()
for _ in range(int(sys.argv[2])):
    s = socket.create_connection(("127.0.0.1", int(sys.argv[1])))
    s.setblocking(False)
    sel.register(s, selectors.EVENT_READ)
while sel.get_map():
    for key, _ in sel.select():
        if not key.fileobj.recv(1 << 20):
            sel.unregister(key.fileobj)
"""


def cpu_per_write(conns: list[socket.socket], messages: int, frame: bytes, pace_s: float) -> float:
    """µs of this process's CPU per write: ``messages`` rounds of one write to every connection."""
    started = time.process_time()
    for _ in range(messages):
        for conn in conns:
            os.write(conn.fileno(), frame)
        if pace_s:
            time.sleep(pace_s)
    return (time.process_time() - started) / messages / len(conns) * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--subscribers", type=int, default=100)
    p.add_argument("--messages", type=int, default=3000, help="messages per measurement")
    p.add_argument("--frame-bytes", type=int, default=300)
    p.add_argument("--pace-ms", type=float, default=0.4, help="between paced messages (default 0.4: 2,500/s)")
    p.add_argument("--runs", type=int, default=3, help="interleaved runs of each; the median is shown")
    args = p.parse_args()
    with socket.create_server(("127.0.0.1", 0), backlog=args.subscribers) as server:
        port = server.getsockname()[1]
        reader = subprocess.Popen([sys.executable, "-c", READER, str(port), str(args.subscribers)])
        conns = [server.accept()[0] for _ in range(args.subscribers)]
        try:
            for conn in conns:
                conn.setblocking(False)
            frame = b"x" * args.frame_bytes
            back_to_back, paced = [], []
            for _ in range(args.runs):
                back_to_back.append(cpu_per_write(conns, args.messages, frame, 0.0))
                paced.append(cpu_per_write(conns, args.messages, frame, args.pace_ms / 1000))
        finally:
            for conn in conns:
                conn.close()
            reader.wait(30)
    base, slow = sorted(back_to_back)[len(back_to_back) // 2], sorted(paced)[len(paced) // 2]
    print(f"{args.subscribers} loopback connections, {args.frame_bytes}-byte frames, median of {args.runs}:")
    print(f"  messages back to back: {base:5.2f} µs of CPU per write (baseline)")
    print(f"  paced, {args.pace_ms:g} ms apart:  {slow:5.2f} µs per write ({slow / base:.2f}x); "
          f"{slow * args.subscribers:.0f} µs per message to all {args.subscribers}")


if __name__ == "__main__":
    main()
