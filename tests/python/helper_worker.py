#!/usr/bin/env python3
"""Echo worker built on the portshare helper (python/portshare): worker.py's Echo service
served by portshare.serve, which binds the worker's own port and, in portshare's reuseport
mode, the shared public address too.

Protocol with the tests: stdout "PORT <n>" once serving (its own port); the Echo replies
name the worker "w<PORTSHARE_WORKER_INDEX>"; SIGTERM: graceful stop, exit 0.
"""

import logging
import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
# worker.py beside this file, and the checkout's helper (not an installed one).
for path in (HERE, os.path.join(HERE, "..", "..", "python")):
    if path not in sys.path:
        sys.path.insert(0, path)

from worker import MAX_MESSAGE, EchoWorker, services  # noqa: E402

import portshare  # noqa: E402


def main():
    # The helper's own lines ("serving on ...", "left the shared port ...") go to stderr,
    # which portshare copies into its log, where the tests look for them.
    logging.basicConfig(level=logging.INFO, format="%(name)s: %(message)s")
    name = f"w{os.environ.get('PORTSHARE_WORKER_INDEX', os.getpid())}"
    server = portshare.server(
        max_workers=16,
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
        ],
    )
    services.add_EchoServicer_to_server(EchoWorker(name), server)
    return portshare.serve(
        server,
        health_services=["portshare.test.Echo"],
        on_serving=lambda port: print(f"PORT {port}", flush=True),
    )


if __name__ == "__main__":
    sys.exit(main())
