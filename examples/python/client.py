#!/usr/bin/env python3
"""Call the Greeter through portshare and show which worker answered each call."""

import argparse
import os
import sys
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import grpc  # noqa: E402

protos, services = grpc.protos_and_services("greeter.proto")

CHANNEL_OPTIONS = [
    # A private subchannel pool per channel: every call below opens its own
    # TCP connection, which is what portshare balances.
    ("grpc.use_local_subchannel_pool", 1),
    # Show failures as they are instead of letting grpc retry them away.
    ("grpc.enable_retries", 0),
]


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--target", required=True, help="HOST:PORT of portshare (or of one worker)")
    parser.add_argument("--calls", type=int, default=40)
    parser.add_argument("--timeout", type=float, default=5.0)
    args = parser.parse_args()

    answers, failures = Counter(), 0
    for i in range(1, args.calls + 1):
        # A new channel per call: one channel would keep one connection, and
        # a connection-level balancer would send every call to the same worker.
        with grpc.insecure_channel(args.target, options=CHANNEL_OPTIONS) as channel:
            try:
                reply = services.GreeterStub(channel).SayHello(
                    protos.HelloRequest(name=f"call {i}"), timeout=args.timeout
                )
            except grpc.RpcError as err:
                failures += 1
                print(f"{i:4d}: FAILED {err.code().name}: {err.details()}")
                continue
        answers[(reply.pid, reply.port)] += 1
        print(f"{i:4d}: {reply.message}  (pid {reply.pid}, port {reply.port})")

    print()
    print(f"{'pid/port':>16}  calls")
    for (pid, port), n in sorted(answers.items()):
        print(f"{f'{pid}/{port}':>16}  {n:5d} {'#' * n}")
    if failures:
        print(f"{'FAILED':>16}  {failures:5d} {'!' * failures}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
