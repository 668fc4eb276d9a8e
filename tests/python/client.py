#!/usr/bin/env python3
"""grpcio client for portshare's integration tests: prints ONE JSON object.

RPC failures are data, not crashes: they are reported in the JSON (status
codes by name) and the exit code stays 0. A non-zero exit means a usage error
or a bug in this script.
"""

import argparse
import json
import os
import sys
from collections import Counter

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import grpc  # noqa: E402

protos, services = grpc.protos_and_services("echo.proto")

MAX_MESSAGE = 64 * 1024 * 1024
CHANNEL_OPTIONS = [
    ("grpc.max_send_message_length", MAX_MESSAGE),
    ("grpc.max_receive_message_length", MAX_MESSAGE),
    # A retried call could land on another backend and hide the failure the
    # test is looking for.
    ("grpc.enable_retries", 0),
    # grpcio shares subchannels (TCP connections) between all channels to the
    # same target by default; a private pool makes "new channel" mean
    # "new connection", which is what a load balancer test needs.
    ("grpc.use_local_subchannel_pool", 1),
]
_PATTERN_UNIT = bytes(range(251))


def pattern(n):
    """The worker's reply pattern: bytes(i % 251 for i in range(n))."""
    return (_PATTERN_UNIT * (n // 251 + 1))[:n]


# Set from --ca/--cert/--key/--server-name: TLS (and client certificates) for every channel.
TLS = None


def channel(target):
    if TLS is None:
        return grpc.insecure_channel(target, options=CHANNEL_OPTIONS)
    credentials, server_name = TLS
    options = CHANNEL_OPTIONS + [("grpc.ssl_target_name_override", server_name)]
    return grpc.secure_channel(target, credentials, options=options)


def read(path):
    if path is None:
        return None
    with open(path, "rb") as f:
        return f.read()


def metadata_dict(metadata):
    """Call metadata as a JSON-able dict; -bin values as hex, repeats joined by ','."""
    out = {}
    for key, value in metadata or ():
        if isinstance(value, bytes):
            value = value.hex()
        out[key] = f"{out[key]},{value}" if key in out else value
    return out


def status(call):
    """(code name, details) of a finished call or an RpcError."""
    code = call.code()
    return (code.name if code is not None else None), (call.details() or "")


def first_worker(replies, call):
    # The reply names the worker; if there is none (the call failed), the
    # x-worker header the worker sends first may still tell who took it.
    if replies:
        return replies[0].worker
    try:
        return metadata_dict(call.initial_metadata()).get("x-worker")
    except Exception:  # no headers ever arrived (e.g. connection refused)
        return None


def in_order(replies, expected_payloads=None):
    return all(
        r.seq == i and (expected_payloads is None or r.payload == expected_payloads[i])
        for i, r in enumerate(replies)
    )


def cmd_unary(args, stub):
    payload = os.urandom(args.payload_size)
    request = protos.EchoRequest(
        payload=payload, reply_size=args.reply_size, sleep_ms=args.sleep_ms,
        fail_code=args.fail_code, fail_message=args.fail_message,
        trailers_only=args.trailers_only,
    )
    reply = None
    if args.cancel_after is not None:
        # The client gives up on its own (not a deadline): the call is cancelled.
        import time
        future = stub.Unary.future(request, timeout=args.timeout, metadata=args.metadata)
        time.sleep(args.cancel_after)
        future.cancel()
        call = future
        try:
            reply = future.result()
        except (grpc.RpcError, grpc.FutureCancelledError):
            pass
        code = "CANCELLED" if future.cancelled() else status(future)[0]
        return {"code": code, "details": "", "worker": None, "pid": None, "metadata": {},
                "initial_metadata": {}, "trailing_metadata": {}, "payload_len": None,
                "payload_ok": False}
    try:
        reply, call = stub.Unary.with_call(request, timeout=args.timeout, metadata=args.metadata)
    except grpc.RpcError as err:
        call = err  # the error is also the finished Call, metadata included
    code, details = status(call)
    expected = pattern(args.reply_size) if args.reply_size > 0 else payload
    return {
        "code": code,
        "details": details,
        "worker": first_worker([reply] if reply else [], call),
        "pid": reply.pid if reply else None,
        "metadata": dict(reply.metadata) if reply else {},
        "initial_metadata": metadata_dict(call.initial_metadata()),
        "trailing_metadata": metadata_dict(call.trailing_metadata()),
        "payload_len": len(reply.payload) if reply else None,
        "payload_ok": reply is not None and reply.payload == expected,
    }


def cmd_server_stream(args, stub):
    request = protos.EchoRequest(payload=b"s", count=args.count)
    call = stub.ServerStream(request, timeout=args.timeout)
    replies = []
    try:
        for reply in call:
            replies.append(reply)
    except grpc.RpcError:
        pass  # the status is read from the call below
    code, details = status(call)
    return {"code": code, "details": details, "received": len(replies),
            "in_order": in_order(replies), "worker": first_worker(replies, call)}


def cmd_client_stream(args, stub):
    payloads = [os.urandom(args.payload_size) for _ in range(args.count)]
    requests = (protos.EchoRequest(payload=p) for p in payloads)
    reply = None
    try:
        reply, call = stub.ClientStream.with_call(requests, timeout=args.timeout)
    except grpc.RpcError as err:
        call = err
    code, details = status(call)
    return {
        "code": code, "details": details,
        "seq": reply.seq if reply else None,
        "payload_ok": reply is not None and reply.payload == b"".join(payloads),
        "worker": first_worker([reply] if reply else [], call),
    }


def cmd_bidi(args, stub):
    # Payloads differ per message so in_order also catches mixed-up replies.
    payloads = [i.to_bytes(4, "big") for i in range(args.count)]
    call = stub.Bidi((protos.EchoRequest(payload=p) for p in payloads), timeout=args.timeout)
    replies = []
    try:
        for reply in call:
            replies.append(reply)
    except grpc.RpcError:
        pass
    code, details = status(call)
    return {"code": code, "details": details, "received": len(replies),
            "in_order": in_order(replies, payloads), "worker": first_worker(replies, call)}


def unary_tally(stub, timeout, workers, errors):
    try:
        reply = stub.Unary(protos.EchoRequest(payload=b"x"), timeout=timeout)
        workers[reply.worker] += 1
    except grpc.RpcError as err:
        errors.append(err.code().name)


def cmd_spread(args, _stub):
    workers, errors = Counter(), []
    for _ in range(args.channels):
        with channel(args.target) as ch:  # a new channel (and connection) per call
            unary_tally(services.EchoStub(ch), args.timeout, workers, errors)
    return {"workers": dict(workers), "errors": errors, "calls": args.channels}


def cmd_one_channel(args, stub):
    workers, errors = Counter(), []
    for _ in range(args.calls):
        unary_tally(stub, args.timeout, workers, errors)
    return {"workers": dict(workers), "errors": errors, "calls": args.calls}


def cmd_parallel(args, stub):
    """--calls unary calls at once on one channel, each sleeping --sleep-ms in the worker."""
    import threading
    import time
    workers, errors = Counter(), []
    lock = threading.Lock()

    def one():
        try:
            reply = stub.Unary(protos.EchoRequest(payload=b"x", sleep_ms=args.sleep_ms),
                               timeout=args.timeout)
            with lock:
                workers[reply.worker] += 1
        except grpc.RpcError as err:
            with lock:
                errors.append(f"{err.code().name}: {err.details()}")

    started = time.monotonic()
    threads = [threading.Thread(target=one) for _ in range(args.calls)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return {"workers": dict(workers), "errors": errors, "calls": args.calls,
            "seconds": time.monotonic() - started}


def cmd_steady(args, stub):
    """A steady client: one channel, unary calls back to back for --seconds (at most
    --calls), as a long-lived production client would make them; with --fresh-channels,
    a new channel (so a new connection) for every call, as short-lived clients do."""
    import time
    workers, errors = Counter(), []
    fresh = None
    deadline = time.monotonic() + args.seconds
    made = 0
    kinds = ["unary", "server", "client", "bidi"] if args.all_kinds else ["unary"]
    while made < args.calls and time.monotonic() < deadline:
        if args.until_file and os.path.exists(args.until_file):
            break
        kind = kinds[made % len(kinds)]
        if args.fresh_channels:
            if fresh is not None:
                fresh.close()
            fresh = channel(args.target)
            stub = services.EchoStub(fresh)
        try:
            if kind == "unary":
                replies = [stub.Unary(protos.EchoRequest(payload=b"x"), timeout=args.timeout)]
            elif kind == "server":
                replies = list(stub.ServerStream(protos.EchoRequest(payload=b"x", count=10),
                                                 timeout=args.timeout))
                assert len(replies) == 10, "server stream cut short"
            elif kind == "client":
                replies = [stub.ClientStream((protos.EchoRequest(payload=b"x") for _ in range(10)),
                                             timeout=args.timeout)]
                assert replies[0].seq == 10, "client stream cut short"
            else:
                replies = list(stub.Bidi((protos.EchoRequest(payload=b"x") for _ in range(10)),
                                         timeout=args.timeout))
                assert len(replies) == 10, "bidi stream cut short"
            workers[replies[0].worker] += 1
        except grpc.RpcError as err:
            errors.append(f"{kind}: {err.code().name}: {err.details()}")
        made += 1
        if args.progress_file:
            # Replaced whole, so a reader never sees a half-written number.
            with open(args.progress_file + ".tmp", "w") as f:
                f.write(str(made))
            os.replace(args.progress_file + ".tmp", args.progress_file)
        time.sleep(args.pause_ms / 1000)
    if fresh is not None:
        fresh.close()
    return {"workers": dict(workers), "errors": errors, "calls": made}


def key_value(text):
    key, sep, value = text.partition("=")
    if not sep or not key:
        raise argparse.ArgumentTypeError(f"expected key=value, got {text!r}")
    return key.lower(), value  # grpc rejects upper-case metadata keys


def parse_args(argv):
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--target", required=True, help="HOST:PORT")
    common.add_argument("--timeout", type=float, default=10.0, help="per-call deadline in seconds")
    common.add_argument("--ca", help="TLS: PEM CA certificate(s) to trust (enables TLS)")
    common.add_argument("--cert", help="TLS: PEM client certificate chain")
    common.add_argument("--key", help="TLS: PEM client private key")
    common.add_argument("--server-name", default="localhost", help="TLS: name to verify")

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("unary", parents=[common])
    p.add_argument("--payload-size", type=int, default=0)
    p.add_argument("--reply-size", type=int, default=0)
    p.add_argument("--sleep-ms", type=int, default=0)
    p.add_argument("--fail-code", type=int, default=0)
    p.add_argument("--fail-message", default="")
    p.add_argument("--metadata", action="append", default=[], type=key_value, metavar="K=V")
    p.add_argument("--trailers-only", action="store_true",
                   help="with --fail-code: the worker fails before sending any header")
    p.add_argument("--cancel-after", type=float, default=None,
                   help="cancel the call after this many seconds")
    p.set_defaults(run=cmd_unary)

    p = sub.add_parser("server-stream", parents=[common])
    p.add_argument("--count", type=int, default=1)
    p.set_defaults(run=cmd_server_stream)

    p = sub.add_parser("client-stream", parents=[common])
    p.add_argument("--count", type=int, default=1)
    p.add_argument("--payload-size", type=int, default=16)
    p.set_defaults(run=cmd_client_stream)

    p = sub.add_parser("bidi", parents=[common])
    p.add_argument("--count", type=int, default=1)
    p.set_defaults(run=cmd_bidi)

    p = sub.add_parser("spread", parents=[common])
    p.add_argument("--channels", type=int, default=10)
    p.set_defaults(run=cmd_spread)

    p = sub.add_parser("steady", parents=[common])
    p.add_argument("--seconds", type=float, default=5.0)
    p.add_argument("--calls", type=int, default=100000)
    p.add_argument("--pause-ms", type=float, default=5.0)
    p.add_argument("--all-kinds", action="store_true",
                   help="rotate unary, server-, client- and bidi-streaming calls")
    p.add_argument("--fresh-channels", action="store_true",
                   help="a new channel (connection) for every call")
    p.add_argument("--until-file", default=None,
                   help="stop early once this path exists")
    p.add_argument("--progress-file", default=None,
                   help="after each call, the number of calls made so far is written here")
    p.set_defaults(run=cmd_steady)

    p = sub.add_parser("parallel", parents=[common])
    p.add_argument("--calls", type=int, default=4)
    p.add_argument("--sleep-ms", type=int, default=500)
    p.set_defaults(run=cmd_parallel)
    p = sub.add_parser("one-channel", parents=[common])
    p.add_argument("--calls", type=int, default=10)
    p.set_defaults(run=cmd_one_channel)
    return parser.parse_args(argv)


def main(argv=None):
    global TLS
    args = parse_args(argv)
    if args.ca:
        credentials = grpc.ssl_channel_credentials(
            root_certificates=read(args.ca), private_key=read(args.key),
            certificate_chain=read(args.cert))
        TLS = (credentials, args.server_name)
    with channel(args.target) as ch:
        result = args.run(args, services.EchoStub(ch))
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
