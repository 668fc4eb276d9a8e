#!/usr/bin/env python3
"""A Greeter worker to run behind portshare.

    portshare --workers 4 -- python server.py

Each reply carries this process's pid and port, so the client can show how portshare
spread the calls. portshare.serve() does the rest of a worker's job: it listens on
$PORTSHARE_PORT (or --port N) without SO_REUSEPORT, or on the Unix socket $PORTSHARE_SOCKET
under --worker-socket-dir (the replies' port is then 0), answers grpc.health.v1, and stops
gracefully on SIGTERM or Ctrl-C, or when portshare is gone.
"""

import logging
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # so greeter.proto is found from any directory

import grpc  # noqa: E402

import portshare  # noqa: E402

protos, services = grpc.protos_and_services("greeter.proto")


class Greeter(services.GreeterServicer):
    def __init__(self, port: int) -> None:
        self.port = port

    def SayHello(self, request, context):  # noqa: N802 (the gRPC method's name)
        return protos.HelloReply(
            message=f"Hello, {request.name or 'stranger'}!",
            pid=os.getpid(),
            port=self.port,
        )


if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO, format=f"pid {os.getpid()}: %(message)s")
    # On a socket portshare gave it (--worker-socket-dir), or else on its port.
    on_socket = portshare.resolve_socket() is not None
    port = None if on_socket else portshare.resolve_port()
    server = portshare.server()  # grpc.server(ThreadPoolExecutor(8)), SO_REUSEPORT off
    services.add_GreeterServicer_to_server(Greeter(port or 0), server)
    sys.exit(portshare.serve(server, port, health_services=["portshare.example.Greeter"]))
