"""A worker built on the portshare helper, for the helper's tests (not a test module).

    python worker_app.py sync|aio [--grace S] [--port P]

Serves ``/portshare.test.Slow/Sleep``: the request is a number of seconds as ASCII; the
call writes ``CALL`` to stderr when it starts, sleeps that long (or until it is
cancelled), and answers ``slept``. stdout: ``PORT <n>`` once serving, ``EXIT <code>`` when
``serve`` returned.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import sys
import threading
from typing import Any

import grpc

import portshare

SERVICE = "portshare.test.Slow"


def _sync_sleep(request: bytes, context: grpc.ServicerContext) -> bytes:
    ended = threading.Event()
    context.add_callback(ended.set)  # the call ended early: cancelled or the grace ran out
    print("CALL", file=sys.stderr, flush=True)
    ended.wait(float(request))
    return b"slept"


async def _async_sleep(request: bytes, context: Any) -> bytes:
    print("CALL", file=sys.stderr, flush=True)
    await asyncio.sleep(float(request))
    return b"slept"


def _report_port(port: int) -> None:
    print(f"PORT {port}", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("mode", choices=["sync", "aio"])
    parser.add_argument("--grace", type=float, default=5.0)
    parser.add_argument("--port", type=int, default=0)
    args = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")

    if args.mode == "sync":
        server = portshare.server(max_workers=4)
        handler = grpc.unary_unary_rpc_method_handler(_sync_sleep)
        server.add_generic_rpc_handlers(
            (grpc.method_handlers_generic_handler(SERVICE, {"Sleep": handler}),)
        )
        code = portshare.serve(
            server, args.port, grace=args.grace, health_services=[SERVICE], on_serving=_report_port
        )
    else:

        async def run() -> int:
            server = portshare.aio_server()
            handler = grpc.unary_unary_rpc_method_handler(_async_sleep)
            server.add_generic_rpc_handlers(
                (grpc.method_handlers_generic_handler(SERVICE, {"Sleep": handler}),)
            )
            return await portshare.serve_async(
                server,
                args.port,
                grace=args.grace,
                health_services=[SERVICE],
                on_serving=_report_port,
            )

        code = asyncio.run(run())
    print(f"EXIT {code}", flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
