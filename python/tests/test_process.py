"""serve() and serve_async() in real worker processes: health, signals, grace, parent watch."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from conftest import WORKER_APP, Lines, Worker, spawn

SERVICE = "portshare.test.Slow"
Start = Callable[..., Worker]
SERVING = health_pb2.HealthCheckResponse.SERVING
NOT_SERVING = health_pb2.HealthCheckResponse.NOT_SERVING


def sleep_call(channel: grpc.Channel, seconds: float) -> grpc.Future:
    """Starts a Sleep call; its result is the worker's answer."""
    method = channel.unary_unary(f"/{SERVICE}/Sleep")
    return method.future(str(seconds).encode(), timeout=30)


def test_health_serving_once_started(start_worker: Start) -> None:
    worker = start_worker()
    with grpc.insecure_channel(worker.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        for service in ("", SERVICE):
            reply = stub.Check(health_pb2.HealthCheckRequest(service=service), timeout=10)
            assert reply.status == SERVING, service
        assert sleep_call(channel, 0).result() == b"slept"
    worker.terminate()
    assert worker.wait(timeout=15) == 0


def test_health_not_serving_as_soon_as_stop_begins(start_worker: Start) -> None:
    worker = start_worker("--grace", "10")
    with grpc.insecure_channel(worker.target) as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        watch = stub.Watch(health_pb2.HealthCheckRequest(service=SERVICE), timeout=20)
        assert next(watch).status == SERVING
        worker.terminate()
        # The Watch is a call in flight: it sees the flip, then the stop waits for it.
        assert next(watch).status == NOT_SERVING
        watch.cancel()
    assert worker.wait(timeout=15) == 0
    worker.stdout.wait_for("EXIT 0")


def test_sigterm_lets_a_call_in_flight_finish_within_the_grace(start_worker: Start) -> None:
    worker = start_worker("--grace", "10")
    with grpc.insecure_channel(worker.target) as channel:
        call = sleep_call(channel, 1.0)
        worker.stderr.wait_for("CALL")
        signalled = time.monotonic()
        worker.terminate()
        assert call.result() == b"slept"
        assert worker.wait(timeout=15) == 0
    # It stopped once the call was done, not at the end of the grace (10 s).
    assert time.monotonic() - signalled < 8.0
    worker.stdout.wait_for("EXIT 0")


def test_a_call_past_the_grace_is_cancelled_and_the_worker_exits_0(start_worker: Start) -> None:
    worker = start_worker("--grace", "0.5")
    with grpc.insecure_channel(worker.target) as channel:
        call = sleep_call(channel, 25)
        worker.stderr.wait_for("CALL")
        signalled = time.monotonic()
        worker.terminate()
        with pytest.raises(grpc.RpcError) as failed:
            call.result()
        assert failed.value.code() in (grpc.StatusCode.CANCELLED, grpc.StatusCode.UNAVAILABLE)
        assert worker.wait(timeout=15) == 0
    assert time.monotonic() - signalled < 10.0


# The worker's parent, standing in for portshare: starts the worker with PORTSHARE_PID set to
# its own pid, passes its stdout on, and waits to be killed.
_PARENT = """
import os, subprocess, sys, time
env = dict(os.environ, PORTSHARE_PID=str(os.getpid()))
subprocess.Popen([sys.executable, *sys.argv[1:]], env=env)
time.sleep(120)
"""


def test_stops_by_itself_within_2s_when_portshare_is_killed(mode: str) -> None:
    parent = spawn(["-c", _PARENT, str(WORKER_APP), mode, "--grace", "0.5"])
    try:
        assert parent.stdout is not None
        out = Lines(parent.stdout)
        port = int(out.wait_for("PORT ").split()[1])
        killed = time.monotonic()
        parent.kill()  # SIGKILL; TerminateProcess on Windows
        parent.wait()
        # The pipe closes when the worker (its last holder) has exited.
        assert out.wait_eof(timeout=2.0), f"worker on port {port} still running after 2 s"
        assert time.monotonic() - killed < 2.0
        assert "EXIT 0" in out.seen
    finally:
        if parent.poll() is None:
            parent.kill()
        parent.wait()


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT is a console event on Windows")
def test_sigint_stops_gracefully_too(start_worker: Start) -> None:
    import signal

    worker = start_worker()
    worker.proc.send_signal(signal.SIGINT)
    assert worker.wait(timeout=15) == 0
    worker.stdout.wait_for("EXIT 0")
