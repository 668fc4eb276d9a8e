"""Leaving the shared port of portshare's reuseport mode (Linux) before the server stops.

Every worker of a reuseport group listens on the same public port, and the kernel hands
each new connection to one of them. grpcio's ``server.stop()`` closes the listener and
shuts down in one step: a connection the worker had just accepted, whose first call
arrives a moment later, then ends ``UNAVAILABLE`` ("Socket closed") or ``CANCELLED``,
although the other workers could have served it.

So a stopping worker first leaves the group: ``shutdown()`` on its listening socket
takes it out of the kernel's reuseport group at once (and, with
``net.ipv4.tcp_migrate_req=1``, moves the connections queued on it to the others) while
the connections it has already accepted go on being served. It then waits, bounded, for
those connections to close (a client on a fresh channel closes after its call), and only
then calls ``server.stop()``, whose GOAWAY sends the long-lived channels elsewhere.

grpcio has no API for one listening socket, so the sockets are found among the process's
open files (``/proc/self/fd``). grpcio logs one "Closing acceptor" error when its
listener goes; that line is expected here.
"""

from __future__ import annotations

import logging
import os
import socket
import sys
import time
from collections.abc import Iterator

log = logging.getLogger("portshare")

#: The longest a stopping worker waits, after it left the shared port, for the
#: connections it has to close before it stops (and sends GOAWAY to those still open).
#: Bounded by the stop's grace as well; portshare's own ``stop_grace`` (10 s) covers both.
SHARED_DRAIN = 2.0

#: How often that wait looks.
DRAIN_POLL_INTERVAL = 0.02

_FD_DIR = "/proc/self/fd"


def _tcp_sockets(port: int) -> Iterator[socket.socket]:
    """This process's TCP sockets whose local port is ``port``, each once (grpcio keeps
    more than one descriptor for a socket), as duplicates the caller closes."""
    if not sys.platform.startswith("linux"):
        return
    try:
        names = os.listdir(_FD_DIR)
    except OSError:
        return
    seen: set[str] = set()
    for name in names:
        try:
            link = os.readlink(f"{_FD_DIR}/{name}")
        except OSError:
            continue  # closed meanwhile, or the directory's own descriptor
        if not link.startswith("socket:") or link in seen:
            continue
        seen.add(link)
        try:
            sock = socket.socket(fileno=os.dup(int(name)))
        except (OSError, ValueError):
            continue
        try:
            local = sock.getsockname()
            mine = (
                sock.family in (socket.AF_INET, socket.AF_INET6)
                and sock.type == socket.SOCK_STREAM
                and local[1] == port
            )
        except OSError:
            mine = False
        if mine:
            yield sock
        sock.close()


def _listening(sock: socket.socket) -> bool:
    try:
        return sock.getsockopt(socket.SOL_SOCKET, socket.SO_ACCEPTCONN) == 1
    except OSError:
        return False


def leave_shared(port: int) -> int:
    """Stops this process listening on the shared ``port``: the kernel sends new
    connections to the other workers from now on, and the connections already accepted
    stay. Returns how many listening sockets it shut down (0 when not on Linux)."""
    left = 0
    for sock in _tcp_sockets(port):
        if _listening(sock):
            try:
                sock.shutdown(socket.SHUT_RD)  # on a listener: stop listening, as close() does
                left += 1
            except OSError as exc:
                log.warning("could not leave the shared port %d: %s", port, exc)
    return left


def _connected(sock: socket.socket) -> bool:
    try:
        sock.getpeername()
    except OSError:
        return False  # a listener, also one that was shut down (no longer listening)
    return True


def shared_connections(port: int) -> int:
    """How many accepted connections this process still has on the shared ``port``."""
    return sum(1 for sock in _tcp_sockets(port) if _connected(sock))


def drain_budget(grace: float | None) -> float:
    """How long a stop waits for the shared port's connections: ``SHARED_DRAIN``, but
    never longer than the calls' own grace (``None``: no wait at all)."""
    return 0.0 if grace is None else min(SHARED_DRAIN, grace)


def begin_drain(port: int, grace: float | None) -> float:
    """``leave_shared``, logged; returns how many seconds to wait for the connections
    still open (``drain_budget``)."""
    left = leave_shared(port)
    budget = drain_budget(grace)
    log.info(
        "left the shared port %d (%d listener(s)); up to %s s for its %d open connection(s)",
        port,
        left,
        budget,
        shared_connections(port),
    )
    return budget


def leave_and_drain(port: int, grace: float | None) -> None:
    """``begin_drain``, then waits for the port's connections to close. Blocks: for the
    threaded server; ``serve_async`` waits on its event loop instead."""
    deadline = time.monotonic() + begin_drain(port, grace)
    while shared_connections(port) and time.monotonic() < deadline:
        time.sleep(DRAIN_POLL_INTERVAL)
