#!/usr/bin/env python3
"""Echo worker for portshare's integration tests: a plain grpcio server.

Protocol with the tests:
  stdout: exactly one line "PORT <n>" once the server is listening.
  stderr: "CALL <Method> <peer>" when a call starts,
          "INFLIGHT <n>" right after it: the calls this worker has in flight then, and
          "CANCELLED <Method>" when the client cancels it or its deadline hits,
          so a test can tell when a call is in flight or was torn down.
  SIGTERM/SIGINT: graceful stop (in-flight calls get --grace seconds), exit 0.
  SIGUSR1 / SIGUSR2 (Unix): the health service turns NOT_SERVING / SERVING.
  Metadata x-grow-mb: N on a call: the worker allocates N MiB more and keeps it (a worker
          that leaks memory).
  --stall-index N: the worker whose PORTSHARE_WORKER_INDEX is N never listens
          (a worker that never becomes ready).
  --crash-index N: the worker whose PORTSHARE_WORKER_INDEX is N exits with code 3 at
          once (a worker in a crash loop).
  --bind-delay S: wait S seconds before listening (a worker that is slow to boot).
  --stall-if-exists PATH: never listen if PATH exists when the worker starts (a
          replacement that never becomes ready, while the first process serves).
  --address ADDR: bind ADDR (unix:PATH, unix-abstract:NAME) instead of --host/--port;
          by default unix:$PORTSHARE_SOCKET when portshare gives the worker a socket.
"""

import argparse
import os
import signal
import sys
import threading
from concurrent import futures

# protos_and_services finds echo.proto through sys.path, so make it work
# whatever the current directory is.
HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:
    sys.path.insert(0, HERE)

import grpc  # noqa: E402
from grpc_health.v1 import health, health_pb2, health_pb2_grpc  # noqa: E402

protos, services = grpc.protos_and_services("echo.proto")

MAX_MESSAGE = 64 * 1024 * 1024
STATUS_BY_NUMBER = {code.value[0]: code for code in grpc.StatusCode}
_PATTERN_UNIT = bytes(range(251))
_log_lock = threading.Lock()


def log(line):
    # One write per line under a lock: handler threads must not interleave
    # partial lines, since tests parse stderr line by line.
    with _log_lock:
        sys.stderr.write(line + "\n")
        sys.stderr.flush()


def pattern(n):
    """bytes(i % 251 for i in range(n)), without a per-byte Python loop (8 MiB)."""
    return (_PATTERN_UNIT * (n // 251 + 1))[:n]


class Call:
    """Per-call bookkeeping: tells a cancellation apart from a normal end.

    grpc runs add_callback callbacks whenever the RPC terminates, for any
    reason, so we mark the call finished just before handing back the last
    answer; if the callback fires while it is still unfinished, the client
    (or its deadline, or the server's shutdown) tore the call down.
    """

    def __init__(self, worker, method, context, headers_first=True):
        self.worker = worker
        self.method = method
        self.context = context
        self.finished = False
        self.cancelled = threading.Event()
        log(f"CALL {method} {context.peer()}")
        log(f"INFLIGHT {worker.enter()}")
        if not context.add_callback(self._on_done):
            self._on_done()  # already terminated: the callback would never run
        # Headers first, so a client learns which worker took the call even if
        # it later fails or times out (unless the test wants a Trailers-Only error).
        if headers_first:
            context.send_initial_metadata((("x-worker", worker.name),))
        context.set_trailing_metadata((("x-trailer", f"done-{worker.name}"),))

    def _on_done(self):
        self.worker.leave()
        if not self.finished:
            self.cancelled.set()
            log(f"CANCELLED {self.method}")

    def alive(self):
        return not self.cancelled.is_set() and self.context.is_active()

    def sleep(self, request):
        # Waiting on the event (not time.sleep) lets a cancelled call stop at once.
        if request.sleep_ms > 0:
            self.cancelled.wait(request.sleep_ms / 1000.0)
        return self.alive()

    def maybe_fail(self, request):
        if request.fail_code == 0:
            return
        self.finished = True  # a deliberate failure is not a cancellation
        self.context.set_trailing_metadata((
            ("x-trailer", f"done-{self.worker.name}"),
            ("x-error-detail", request.fail_message),
            ("x-error-bin", b"\x00\x01\xfe\xff"),
        ))
        code = STATUS_BY_NUMBER.get(request.fail_code, grpc.StatusCode.UNKNOWN)
        self.context.abort(code, request.fail_message)  # raises

    def reply(self, request, seq, payload=None):
        if payload is None:
            payload = pattern(request.reply_size) if request.reply_size > 0 else request.payload
        return protos.EchoReply(
            payload=payload,
            worker=self.worker.name,
            pid=os.getpid(),
            metadata=self.worker.metadata_of(self.context),
            seq=seq,
        )


class EchoWorker(services.EchoServicer):
    def __init__(self, name):
        self.name = name
        self.ballast = []  # memory kept on purpose (x-grow-mb)
        self._in_flight = 0
        self._in_flight_lock = threading.Lock()

    def enter(self):
        """Counts a call in; returns how many are in flight now."""
        with self._in_flight_lock:
            self._in_flight += 1
            return self._in_flight

    def leave(self):
        with self._in_flight_lock:
            self._in_flight -= 1

    @staticmethod
    def metadata_of(context):
        out = {}
        for key, value in context.invocation_metadata():
            if key.endswith("-bin"):
                continue  # binary values do not fit a map<string, string>
            out[key] = f"{out[key]},{value}" if key in out else value
        return out

    def grow(self, context):
        for key, value in context.invocation_metadata():
            if key == "x-grow-mb":
                # Written, not just reserved, so that it is resident.
                self.ballast.append(b"x" * (int(value) * 1024 * 1024))
                log(f"GREW {value} MiB")

    def Unary(self, request, context):
        self.grow(context)
        call = Call(self, "Unary", context, headers_first=not request.trailers_only)
        call.maybe_fail(request)
        if not call.sleep(request):
            return protos.EchoReply()  # nobody is listening any more
        call.finished = True
        return call.reply(request, 0)

    def ServerStream(self, request, context):
        call = Call(self, "ServerStream", context)
        call.maybe_fail(request)
        if not call.sleep(request):
            return
        count = request.count if request.count > 0 else 1
        for seq in range(count):
            if not call.alive():
                return
            if seq == count - 1:
                call.finished = True
            yield call.reply(request, seq)

    def ClientStream(self, request_iterator, context):
        call = Call(self, "ClientStream", context)
        chunks, first = [], None
        try:
            for request in request_iterator:
                if first is None:
                    first = request
                    call.maybe_fail(request)
                if not call.sleep(request):
                    return protos.EchoReply()
                chunks.append(request.payload)
        except grpc.RpcError:
            return protos.EchoReply()  # the client went away mid-stream
        call.finished = True
        # The reply reflects the first request's options (reply_size etc.).
        return call.reply(first or protos.EchoRequest(), len(chunks), payload=b"".join(chunks))

    def Bidi(self, request_iterator, context):
        call = Call(self, "Bidi", context)
        seq = 0
        try:
            for request in request_iterator:
                if seq == 0:
                    call.maybe_fail(request)
                if not call.sleep(request):
                    return
                yield call.reply(request, seq)
                seq += 1
        except grpc.RpcError:
            return
        call.finished = True


def main():
    env_port = os.environ.get("PORTSHARE_PORT")
    env_index = os.environ.get("PORTSHARE_WORKER_INDEX")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, default=int(env_port) if env_port else 0,
                        help="port to listen on (default: $PORTSHARE_PORT, else a free one)")
    parser.add_argument("--host", default="127.0.0.1")
    env_socket = os.environ.get("PORTSHARE_SOCKET")
    parser.add_argument("--address", default=f"unix:{env_socket}" if env_socket else None,
                        help="bind this instead of HOST:PORT (default: unix:$PORTSHARE_SOCKET)")
    parser.add_argument("--name", default=f"w{env_index}" if env_index else f"w{os.getpid()}")
    parser.add_argument("--grace", type=float, default=5.0,
                        help="seconds in-flight calls get to finish on SIGTERM/SIGINT")
    parser.add_argument("--stall-index", default=None,
                        help="if PORTSHARE_WORKER_INDEX equals this, never start listening")
    parser.add_argument("--crash-index", default=None,
                        help="if PORTSHARE_WORKER_INDEX equals this, exit 3 at once")
    parser.add_argument("--bind-delay", type=float, default=0.0,
                        help="seconds to wait before listening")
    parser.add_argument("--stall-if-exists", default=None,
                        help="never listen if this path exists at start")
    args = parser.parse_args()

    index = os.environ.get("PORTSHARE_WORKER_INDEX")
    stall = args.stall_index is not None and index == args.stall_index
    stall = stall or (args.stall_if_exists is not None and os.path.exists(args.stall_if_exists))

    if args.crash_index is not None and index == args.crash_index:
        print(f"worker {args.name}: crashing on purpose", file=sys.stderr, flush=True)
        return 3

    if stall:
        print(
            f"worker {args.name}: stalling on purpose, never listening", file=sys.stderr, flush=True
        )
        stalled = threading.Event()
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, lambda *_: stalled.set())
        while not stalled.wait(1.0):
            pass
        return 0

    # Signals only set a flag; the main thread does the (blocking) stop.
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())

    server = grpc.server(
        futures.ThreadPoolExecutor(max_workers=16),
        options=[
            ("grpc.max_send_message_length", MAX_MESSAGE),
            ("grpc.max_receive_message_length", MAX_MESSAGE),
            # Without this, a second worker on the same port would bind fine
            # and the kernel would split connections between them silently.
            ("grpc.so_reuseport", 0),
        ],
    )
    services.add_EchoServicer_to_server(EchoWorker(args.name), server)
    health_servicer = health.HealthServicer()
    health_servicer.set("", health_pb2.HealthCheckResponse.SERVING)
    health_servicer.set("portshare.test.Echo", health_pb2.HealthCheckResponse.SERVING)
    health_pb2_grpc.add_HealthServicer_to_server(health_servicer, server)

    def set_health(status):
        for service in ("", "portshare.test.Echo"):
            health_servicer.set(service, status)
        print(f"HEALTH {health_pb2.HealthCheckResponse.ServingStatus.Name(status)}",
              file=sys.stderr, flush=True)

    if hasattr(signal, "SIGUSR1"):
        signal.signal(signal.SIGUSR1,
                      lambda *_: set_health(health_pb2.HealthCheckResponse.NOT_SERVING))
        signal.signal(signal.SIGUSR2,
                      lambda *_: set_health(health_pb2.HealthCheckResponse.SERVING))

    if args.bind_delay > 0:
        if stop.wait(args.bind_delay):
            return 0

    address = args.address or f"{args.host}:{args.port}"
    try:
        port = server.add_insecure_port(address)
    except RuntimeError as exc:  # recent grpcio raises; older ones returned 0
        port, reason = 0, exc
    else:
        reason = "add_insecure_port returned 0"
    if port == 0:
        print(f"worker {args.name}: cannot bind {address}: {reason}", file=sys.stderr, flush=True)
        return 1

    server.start()
    print(f"PORT {port}", flush=True)

    while not stop.wait(1.0):
        pass
    server.stop(args.grace).wait()
    return 0


if __name__ == "__main__":
    sys.exit(main())
