#!/usr/bin/env python3
"""tests/python/worker.py with one more flag, --reuseport, for the SO_REUSEPORT baseline.

The test worker sets grpc.so_reuseport to 0 on purpose (so a test never shares a port by
accident). The baseline needs the opposite: N processes bound to ONE port, with the Linux
kernel hashing each new connection to one of them. Rather than copy the servicer, this runs
the test worker's own main() and only flips that one server option, so the baseline serves
exactly the same code (including its per-call "CALL ..." stderr line, which the harness
counts to see how calls spread) as the workers behind the proxies.

Usage: reuseport_worker.py [--reuseport] --port P --name N   (all other flags as worker.py)
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
TESTS_PYTHON = os.path.join(os.path.dirname(HERE), "tests", "python")
sys.path.insert(0, TESTS_PYTHON)

# Take our flag out before worker.py's argparse sees it (it would reject it).
REUSEPORT = "--reuseport" in sys.argv[1:]
sys.argv = [a for a in sys.argv if a != "--reuseport"]

import grpc  # noqa: E402

import worker  # noqa: E402  (tests/python/worker.py)

if REUSEPORT:
    _real_server = grpc.server

    def _server_with_reuseport(*args, options=None, **kwargs):
        # worker.py passes ("grpc.so_reuseport", 0); turn exactly that option on.
        options = [(k, 1 if k == "grpc.so_reuseport" else v) for k, v in (options or ())]
        return _real_server(*args, options=options, **kwargs)

    # worker.main() looks grpc.server up at call time, so patching the module attribute is
    # enough; nothing else in the process creates a server.
    grpc.server = _server_with_reuseport

if __name__ == "__main__":
    sys.exit(worker.main())
