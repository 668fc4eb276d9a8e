#!/usr/bin/env python3
"""A Greeter worker to run behind portshare.

Each reply carries this process's pid and port, so the client can show how
portshare spread the calls. Run several of these on different ports (or let
portshare start them with PORTSHARE_PORT set) and point the client at
portshare's listening address.
"""

import argparse
import os
import signal
import sys
import threading
from concurrent import futures

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)  # so greeter.proto is found from any directory

import grpc  # noqa: E402
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # noqa: E402

protos, services = grpc.protos_and_services("greeter.proto")


class Greeter(services.GreeterServicer):
    def __init__(self, port):
        self.port = port

    def SayHello(self, request, context):
        return protos.HelloReply(
            message=f"Hello, {request.name or 'stranger'}!",
            pid=os.getpid(),
            port=self.port,
        )


def main():
    env_port = os.environ.get("PORTSHARE_PORT")
    parser = argparse.ArgumentParser(description="portshare example Greeter worker")
    parser.add_argument("--port", type=int, default=int(env_port) if env_port else None,
                        help="port to listen on (default: $PORTSHARE_PORT)")
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--grace", type=float, default=5.0,
                        help="seconds in-flight calls get to finish on SIGTERM/SIGINT")
    args = parser.parse_args()
    if args.port is None:
        parser.error("give --port or set PORTSHARE_PORT")

    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    # so_reuseport 0: a second worker on a taken port fails loudly instead of
    # quietly sharing it with the first.
    server = grpc.server(futures.ThreadPoolExecutor(max_workers=8),
                         options=[("grpc.so_reuseport", 0)])
    services.add_GreeterServicer_to_server(Greeter(args.port), server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("portshare.example.Greeter", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)

    try:
        server.add_insecure_port(f"{args.host}:{args.port}")
    except RuntimeError as exc:
        print(f"worker pid={os.getpid()}: cannot listen on {args.host}:{args.port}: {exc}",
              file=sys.stderr, flush=True)
        return 1
    server.start()
    print(f"worker pid={os.getpid()} listening on {args.host}:{args.port}", file=sys.stderr, flush=True)

    # Started by portshare: if it goes away without stopping us (on Linux and Windows the OS
    # kills us with it; macOS has no such mechanism), our parent changes; stop then too.
    parent = os.environ.get("PORTSHARE_PID")
    while not stop.wait(1.0):
        if parent and os.getppid() != int(parent):
            print(f"worker pid={os.getpid()}: portshare is gone; stopping", file=sys.stderr, flush=True)
            break
    server.stop(args.grace).wait()  # finish in-flight calls, refuse new ones
    return 0


if __name__ == "__main__":
    sys.exit(main())
