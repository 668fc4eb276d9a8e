"""What the blocking and the asyncio variants share: which port (or Unix socket) and
address to bind, the check that the port is really free, which signals mean "stop", and
the parent watch."""

from __future__ import annotations

import errno
import logging
import os
import signal
import socket
import sys
from collections.abc import Mapping, Sequence
from typing import Protocol

log = logging.getLogger("portshare")

#: portshare connects to its workers on 127.0.0.1 only, so a worker has no reason to listen
#: on every interface: that would only open an unbalanced side door to it.
DEFAULT_HOST = "127.0.0.1"

#: Seconds the calls in flight get to finish once a stop begins. Below portshare's own
#: `[workers] stop_grace` (10 s), after which it sends SIGKILL.
DEFAULT_GRACE = 5.0

#: How often the parent watch looks: twice a second keeps "portshare was SIGKILLed" to
#: "this worker is stopping" well under 2 s on every OS, at no measurable cost.
PARENT_POLL_INTERVAL = 0.5

#: The channel option that makes grpcio set SO_REUSEPORT on its listening socket (on by
#: default on Linux): two servers then silently share a port instead of the second failing.
REUSEPORT_OFF = ("grpc.so_reuseport", 0)

#: The same option on: under portshare's reuseport mode (Linux), every worker binds the
#: public address with SO_REUSEPORT and the kernel spreads the connections over them.
REUSEPORT_ON = ("grpc.so_reuseport", 1)

#: Set by portshare in reuseport mode: the public ``HOST:PORT`` every worker binds too,
#: beside its own ``PORTSHARE_PORT``, which portshare keeps for its health checks.
SHARED_ADDR_ENV = "PORTSHARE_SHARED_ADDR"


class BindError(RuntimeError):
    """The server could not listen on its address (most often: the port is taken).

    A ``RuntimeError``, which is what grpcio itself raises for a failed bind.
    """

    def __init__(self, address: str, reason: str) -> None:
        super().__init__(f"cannot listen on {address}: {reason}")
        #: The address that could not be bound, as ``HOST:PORT``.
        self.address = address
        #: Why, in words.
        self.reason = reason


def resolve_port(
    port: int | None = None,
    *,
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """The port to listen on: ``port`` if given, else ``--port N`` (or ``--port=N``) from
    the command line, else ``$PORTSHARE_PORT`` (set by portshare for every worker).

    Flags before the environment, as in portshare itself. ``0`` lets the OS pick a free
    port. Raises ``ValueError`` when there is no port, or it is not one.
    """
    if port is not None:
        return _check_port(port, "port argument")
    flag = _port_flag(argv)
    if flag is not None:
        return _parse_port(flag, "--port")
    env = os.environ if environ is None else environ
    value = env.get("PORTSHARE_PORT")
    if value:
        return _parse_port(value, "PORTSHARE_PORT")
    raise ValueError(
        "no port to listen on: pass port=..., give --port N, "
        "or run under portshare (which sets PORTSHARE_PORT)"
    )


def resolve_shared(environ: Mapping[str, str] | None = None) -> str | None:
    """The public address to share with the other workers (``$PORTSHARE_SHARED_ADDR``, set
    by portshare in reuseport mode), or None when this worker has its own port only.

    Raises ``ValueError`` when it is set but not ``HOST:PORT`` with a port from 1 to 65535.
    """
    env = os.environ if environ is None else environ
    value = env.get(SHARED_ADDR_ENV, "").strip()
    if not value:
        return None
    host, sep, port = value.rpartition(":")
    if not sep or not host:
        raise ValueError(f"{SHARED_ADDR_ENV}: {value!r} is not HOST:PORT")
    if _parse_port(port, SHARED_ADDR_ENV) == 0:
        raise ValueError(f"{SHARED_ADDR_ENV}: {value!r} has port 0")
    return value


def reuseport_option() -> tuple[str, int]:
    """The ``grpc.so_reuseport`` option a worker's server is built with: on in portshare's
    reuseport mode (``$PORTSHARE_SHARED_ADDR`` set), off otherwise."""
    return REUSEPORT_ON if resolve_shared() is not None else REUSEPORT_OFF


def _port_flag(argv: Sequence[str] | None) -> str | None:
    """The value of ``--port N`` or ``--port=N`` on the command line, if given."""
    args = sys.argv[1:] if argv is None else argv
    for i, arg in enumerate(args):
        if arg == "--port" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--port="):
            return arg.removeprefix("--port=")
    return None


def resolve_socket(
    port: int | None = None,
    *,
    argv: Sequence[str] | None = None,
    environ: Mapping[str, str] | None = None,
) -> str | None:
    """The Unix socket path to listen on instead of a port: ``$PORTSHARE_SOCKET``, which
    portshare sets (and ``PORTSHARE_PORT`` not) for workers it runs on sockets
    (``--worker-socket-dir``), unless ``port`` or ``--port N`` asks for a port. ``None``:
    listen on a port (see ``resolve_port``).
    """
    if port is not None or _port_flag(argv) is not None:
        return None
    env = os.environ if environ is None else environ
    return env.get("PORTSHARE_SOCKET") or None


def _parse_port(value: str, source: str) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ValueError(f"{source}: {value!r} is not a port number") from None
    return _check_port(number, source)


def _check_port(port: int, source: str) -> int:
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ValueError(f"{source}: {port!r} is not a port number (0-65535)")
    return port


def format_address(host: str, port: int) -> str:
    """``HOST:PORT`` as grpcio wants it, with an IPv6 literal in brackets."""
    if ":" in host and not host.startswith("["):
        host = f"[{host}]"
    return f"{host}:{port}"


def check_port_free(host: str, port: int) -> None:
    """Raises ``BindError`` if something already listens on ``host:port``.

    grpcio binds with SO_REUSEPORT unless the server was built with
    ``("grpc.so_reuseport", 0)``, and then quietly *shares* a port another such server
    holds. This probe binds the address once without SO_REUSEPORT (and closes it at once),
    so a taken port is refused whatever options the user's server was built with.
    SO_REUSEADDR is set on Unix so that connections of a previous worker lingering in
    TIME_WAIT do not count as "taken"; a listening socket still does. Windows has no
    SO_REUSEPORT for grpcio to set, and its bind refuses a taken port by itself.
    """
    if port == 0:
        return
    name = host[1:-1] if host.startswith("[") and host.endswith("]") else host
    try:
        infos = socket.getaddrinfo(name, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except OSError:
        return  # let grpcio report the unresolvable name in its own words
    for family, kind, proto, _, sockaddr in infos:
        try:
            probe = socket.socket(family, kind, proto)
        except OSError:
            continue  # e.g. no IPv6 here: grpcio falls back the same way
        with probe:
            if os.name != "nt":
                probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if family == socket.AF_INET6 and hasattr(socket, "IPV6_V6ONLY"):
                # grpcio's [::] listens on IPv4 too; probe both, as it will.
                try:
                    probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
                except OSError:
                    pass
            try:
                probe.bind(sockaddr)
            except OSError as exc:
                if exc.errno in (errno.EADDRINUSE, getattr(errno, "WSAEADDRINUSE", -1)):
                    raise BindError(
                        format_address(host, port),
                        "the port is already in use (another process listens on it)",
                    ) from exc
                # Anything else (EADDRNOTAVAIL, EACCES, ...) is grpcio's to report.


class _Server(Protocol):
    def add_insecure_port(self, address: str) -> int: ...


def _add_port(server: _Server, address: str, hint: str) -> int:
    """``server.add_insecure_port(address)``, returning the bound port. grpcio reports a
    failed bind by returning 0 (older releases) or by raising ``RuntimeError`` (newer
    ones): both become ``BindError``, with ``hint`` on what to look at."""
    try:
        bound = server.add_insecure_port(address)
    except RuntimeError as exc:
        raise BindError(address, f"grpcio could not bind it ({exc}); {hint}") from exc
    if not bound:
        raise BindError(address, f"grpcio could not bind it; {hint}")
    return bound


def bind(server: _Server, host: str, port: int) -> int:
    """Checks the port is free, binds ``server`` to ``host:port``, returns the bound port."""
    check_port_free(host, port)
    return _add_port(server, format_address(host, port), "is the port taken?")


def bind_shared(server: _Server, address: str) -> int:
    """Binds ``server`` to the public ``address`` it shares with the other workers
    (portshare's reuseport mode); returns the port.

    No free-port check here: portshare itself holds the address (bound, not listening) so
    that nobody else takes it. The bind succeeds only with SO_REUSEPORT on, as
    ``portshare.server()`` builds the server when ``$PORTSHARE_SHARED_ADDR`` is set.
    """
    return _add_port(
        server,
        address,
        "the shared address needs the server built with grpc.so_reuseport on "
        "(portshare.server() does so when PORTSHARE_SHARED_ADDR is set)",
    )


def bind_socket(server: _Server, path: str) -> str:
    """Binds ``server`` to the Unix socket at ``path``; returns the address bound,
    ``unix:PATH``. A failed bind becomes ``BindError``. (No check that the path is free:
    portshare gives each worker process a path of its own, and removes stale ones.)
    """
    address = f"unix:{path}"
    _add_port(server, address, "can this process create a socket in that directory?")
    return address


def listen(server: _Server, host: str, port: int | None) -> tuple[str, int]:
    """Binds ``server`` where it is to listen: the socket portshare gave it (see
    ``resolve_socket``), else ``host`` and the port ``resolve_port`` finds. Returns the
    address bound, for the log, and the port (0 on a socket), for ``on_serving``.
    """
    path = resolve_socket(port)
    if path is not None:
        return bind_socket(server, path), 0
    bound = bind(server, host, resolve_port(port))
    return format_address(host, bound), bound


def stop_signals() -> list[signal.Signals]:
    """The signals that mean "stop gracefully": SIGTERM and SIGINT (Ctrl-C), plus
    SIGBREAK (Ctrl-Break) on Windows, where console programs get no real SIGTERM."""
    signals = [signal.SIGTERM, signal.SIGINT]
    if sys.platform == "win32":
        signals.append(signal.SIGBREAK)
    return signals


def grace_seconds(grace: float | None) -> float | None:
    """Validates a grace period: ``None`` (cancel calls in flight at once) or >= 0."""
    if grace is not None and grace < 0:
        raise ValueError(f"grace: {grace!r} is negative")
    return grace


class ParentWatch:
    """Tells when the portshare that started this worker is gone.

    On Linux portshare's workers get a parent-death signal and on Windows they are in a
    kill-on-close Job Object, so they die with it; macOS has neither, and a worker there
    would live on, holding its port. Polled every ``PARENT_POLL_INTERVAL``:

    - Unix: gone when this process's parent changes (it was reparented: the parent,
      portshare or a wrapper between them, exited) or when pid ``PORTSHARE_PID`` no
      longer exists. Comparing with the parent at start, not with ``PORTSHARE_PID``
      itself, keeps a worker run through a wrapper (``sh -c``, ``uv run``) from stopping
      at once.
    - Windows: a handle to ``PORTSHARE_PID`` is opened at start (so a reused pid cannot
      fool it) and is gone once that process has exited.
    """

    def __init__(self, pid: int) -> None:
        #: portshare's pid, from ``PORTSHARE_PID``.
        self.pid = pid
        #: Our parent when the watch began.
        self._parent = os.getppid()
        #: Windows: a SYNCHRONIZE handle to portshare, or None if it could not be opened.
        self._handle: int | None = None
        #: Windows: set when portshare was already gone (or unknown) at start.
        self._gone_at_start = False
        if sys.platform == "win32":
            self._open_handle()

    @classmethod
    def from_environ(cls, environ: Mapping[str, str] | None = None) -> ParentWatch | None:
        """A watch on ``$PORTSHARE_PID``, or None when not started by portshare."""
        env = os.environ if environ is None else environ
        value = env.get("PORTSHARE_PID", "")
        try:
            pid = int(value)
        except ValueError:
            if value:
                log.warning("PORTSHARE_PID=%r is not a pid; not watching for portshare", value)
            return None
        return cls(pid) if pid > 0 else None

    if sys.platform == "win32":

        def _open_handle(self) -> None:
            import ctypes

            synchronize = 0x00100000
            kernel32 = ctypes.windll.kernel32
            kernel32.OpenProcess.restype = ctypes.c_void_p
            handle = kernel32.OpenProcess(synchronize, False, self.pid)
            if handle:
                self._handle = handle
            elif kernel32.GetLastError() == 87:  # ERROR_INVALID_PARAMETER: no such process
                self._gone_at_start = True
            else:
                log.warning("cannot watch portshare (pid %d) on this system", self.pid)

        def gone(self) -> bool:
            """Whether portshare has exited."""
            import ctypes

            if self._gone_at_start:
                return True
            if self._handle is None:
                return False
            wait_object_0 = 0
            kernel32 = ctypes.windll.kernel32
            return bool(
                kernel32.WaitForSingleObject(ctypes.c_void_p(self._handle), 0) == wait_object_0
            )

    else:

        def gone(self) -> bool:
            """Whether portshare (or the wrapper between it and us) has exited."""
            if os.getppid() != self._parent:
                return True
            try:
                os.kill(self.pid, 0)
            except ProcessLookupError:
                return True
            except PermissionError:
                pass  # it exists; it is just not ours to signal
            return False
