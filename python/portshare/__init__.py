"""The worker side of portshare, for grpcio servers.

portshare (https://pypi.org/project/portshare/) starts N copies of a gRPC server on their
own ports and balances one public port over them. Each copy has to bind the port it is
given without SO_REUSEPORT (in portshare's reuseport mode on Linux: that port and the
public address ``$PORTSHARE_SHARED_ADDR``, shared with SO_REUSEPORT), answer
``grpc.health.v1``, and stop gracefully on SIGTERM or when portshare is gone. ``serve``
does all of that::

    import portshare

    server = portshare.server()  # grpc.server(ThreadPoolExecutor(8)), SO_REUSEPORT off
    add_GreeterServicer_to_server(Greeter(), server)
    portshare.serve(server)  # until SIGTERM, Ctrl-C, or portshare's exit

``serve_async`` is the same for ``grpc.aio``. The wheel also holds the ``portshare``
command itself (``python -m portshare`` runs it too).
"""

from __future__ import annotations

from importlib import metadata

from ._aio import AsyncHealth, aio_server, serve_async
from ._common import (
    DEFAULT_GRACE,
    DEFAULT_HOST,
    BindError,
    ParentWatch,
    check_port_free,
    resolve_port,
    resolve_shared,
    resolve_socket,
)
from ._find import find_executable
from ._sync import SyncHealth, serve, server, with_reuseport_off, with_worker_reuseport

try:
    __version__ = metadata.version("portshare")
except metadata.PackageNotFoundError:  # run from a checkout, not installed
    __version__ = "0+unknown"

__all__ = [
    "DEFAULT_GRACE",
    "DEFAULT_HOST",
    "AsyncHealth",
    "BindError",
    "ParentWatch",
    "SyncHealth",
    "__version__",
    "aio_server",
    "check_port_free",
    "find_executable",
    "resolve_port",
    "resolve_shared",
    "resolve_socket",
    "serve",
    "serve_async",
    "server",
    "with_reuseport_off",
    "with_worker_reuseport",
]
