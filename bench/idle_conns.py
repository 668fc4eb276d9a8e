#!/usr/bin/env python3
"""Opens N idle HTTP/2 client connections to HOST:PORT and holds them until told to close.

Used by bench/bench.py to measure a proxy's memory per idle connection. Each connection does
what an idle gRPC channel does: sends the HTTP/2 preface and an empty SETTINGS frame, and
acknowledges the server's SETTINGS. A bare TCP connection that never speaks would not do:
portshare's h2 mode (rightly) drops connections that send no preface within 10 s, and an l4
proxy only reaches the backend's HTTP/2 layer once bytes flow. Getting the server's SETTINGS
back also proves that, for an l4 proxy, the connection to the backend exists too.

Protocol with the harness:
  stdout "OPEN opened=<n> answered=<m> failed=<k> closed=<c> seconds=<s>" once every
         connection is up and answered (or the --timeout passed); failed: connects that did
         not succeed; closed: connections the far side closed before answering;
  then it holds them, reading and discarding whatever arrives, until a line (or EOF) on stdin;
  stdout "CLOSED dropped=<d>": connections the far side closed while they were held.
"""

import argparse
import resource
import selectors
import socket
import sys
import time

PREFACE = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n"
# An HTTP/2 frame header: 24-bit length, type, flags, 31-bit stream id.
SETTINGS = b"\x00\x00\x00\x04\x00\x00\x00\x00\x00"
SETTINGS_ACK = b"\x00\x00\x00\x04\x01\x00\x00\x00\x00"
# Connects in flight at once: a burst of thousands of SYNs would overflow the proxy's listen
# backlog and turn into 1-second SYN retransmits, measuring the backlog instead of memory.
BATCH = 200


class Conn:
    __slots__ = ("sock", "buf", "answered", "closed")

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""
        self.answered = False  # the server's SETTINGS arrived and was acknowledged
        self.closed = False


def raise_fd_limit(need):
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < need:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(need, hard), hard))


def on_readable(sel, conn):
    try:
        data = conn.sock.recv(65536)
    except BlockingIOError:
        return
    except OSError:
        data = b""
    if not data:
        conn.closed = True
        sel.unregister(conn.sock)
        return
    if conn.answered:
        return  # pings, window updates, our SETTINGS' ack: nothing to do
    conn.buf += data
    # Walk whole frames until the server's (non-ack) SETTINGS shows up.
    while len(conn.buf) >= 9:
        length = int.from_bytes(conn.buf[0:3], "big")
        if len(conn.buf) < 9 + length:
            break
        ftype, flags = conn.buf[3], conn.buf[4]
        conn.buf = conn.buf[9 + length:]
        if ftype == 4 and not flags & 1:
            conn.sock.sendall(SETTINGS_ACK)
            conn.answered = True
            conn.buf = b""
            break


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, required=True)
    p.add_argument("--count", type=int, default=5000)
    p.add_argument("--timeout", type=float, default=60.0)
    args = p.parse_args()
    raise_fd_limit(args.count + 100)

    sel = selectors.DefaultSelector()
    conns = []
    failed = 0
    started = time.monotonic()
    deadline = started + args.timeout
    while len(conns) + failed < args.count and time.monotonic() < deadline:
        batch = []
        for _ in range(min(BATCH, args.count - len(conns) - failed)):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.setblocking(False)
            s.connect_ex((args.host, args.port))
            batch.append(s)
        pending = set(batch)
        for s in batch:
            sel.register(s, selectors.EVENT_WRITE)
        while pending and time.monotonic() < deadline:
            for key, _ in sel.select(timeout=0.5):
                if key.data is not None:  # an earlier batch's connection has data
                    on_readable(sel, key.data)
                    continue
                s = key.fileobj
                pending.discard(s)
                sel.unregister(s)
                if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) != 0:
                    failed += 1
                    s.close()
                    continue
                # Small enough never to block on a fresh connection.
                s.sendall(PREFACE + SETTINGS)
                c = Conn(s)
                conns.append(c)
                sel.register(s, selectors.EVENT_READ, c)
        for s in pending:  # never connected within the deadline
            sel.unregister(s)
            s.close()
            failed += 1

    def answered():
        return sum(c.answered for c in conns)

    while answered() < len(conns) and time.monotonic() < deadline:
        for key, _ in sel.select(timeout=0.5):
            if key.data is not None:
                on_readable(sel, key.data)
        if all(c.answered or c.closed for c in conns):
            break
    elapsed = time.monotonic() - started
    print(f"OPEN opened={len(conns)} answered={answered()} failed={failed} "
          f"closed={sum(c.closed for c in conns)} seconds={elapsed:.2f}", flush=True)

    # Hold: keep reading (so closes are noticed) until the harness says so.
    sel.register(sys.stdin, selectors.EVENT_READ, None)
    closed_before = sum(c.closed for c in conns)
    done = False
    while not done:
        for key, _ in sel.select(timeout=1.0):
            if key.data is None:
                sys.stdin.readline()
                done = True
            else:
                on_readable(sel, key.data)
    dropped = sum(c.closed for c in conns) - closed_before
    for c in conns:
        c.sock.close()
    print(f"CLOSED dropped={dropped}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
