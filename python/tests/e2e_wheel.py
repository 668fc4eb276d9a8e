"""End to end through the installed wheel (run by .ci/run from a fresh venv; not pytest):

    VENV/bin/python python/tests/e2e_wheel.py

1. `portshare --version` and `python -m portshare --version` from the venv work.
2. `portshare --workers 2 -- python examples/python/server.py` (the example, built on the
   helper) serves Greeter calls from a grpcio client, spread over both workers.
3. SIGTERM: portshare exits 0, and both workers exit 0 (its "worker stopped" log lines).
4. A helper-based worker whose parent (PORTSHARE_PID) is SIGKILLed exits within 2 s.

Loopback only, ports picked by the OS, every wait a poll with a deadline.
"""

from __future__ import annotations

import json
import os
import queue
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import IO

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "python"
START_TIMEOUT = 60.0
BIN = Path(sys.executable).parent  # the venv's bin/ (Scripts\ on Windows)


def step(message: str) -> None:
    print(f"e2e: {message}", flush=True)


def fail(message: str) -> None:
    sys.exit(f"e2e: FAILED: {message}")


def clean_env(**extra: str) -> dict[str, str]:
    """The venv first on PATH; no PORTSHARE_* from outside (portshare reads them as config)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PORTSHARE_")}
    env.pop("PYTHONPATH", None)  # the wheel's helper, not a checkout's
    env["PATH"] = str(BIN) + os.pathsep + env.get("PATH", "")
    env["PYTHONUNBUFFERED"] = "1"
    env.update(extra)
    return env


class Lines:
    """A pipe followed on a thread: every line kept, new ones awaited with a deadline."""

    def __init__(self, pipe: IO[str], echo: str) -> None:
        self.all: list[str] = []
        self._new: queue.Queue[str | None] = queue.Queue()
        threading.Thread(target=self._follow, args=(pipe, echo), daemon=True).start()

    def _follow(self, pipe: IO[str], echo: str) -> None:
        for raw in pipe:
            line = raw.rstrip("\n")
            print(f"{echo} {line}", flush=True)
            self.all.append(line)
            self._new.put(line)
        self._new.put(None)

    def next(self, deadline: float) -> str | None:
        """The next line; None at EOF; "" if the deadline passed first."""
        try:
            return self._new.get(timeout=max(0.0, deadline - time.monotonic()))
        except queue.Empty:
            return ""


def check_version() -> None:
    exe = BIN / ("portshare.exe" if os.name == "nt" else "portshare")
    if not exe.is_file():
        fail(f"the wheel put no executable at {exe}")
    import portshare

    if not Path(portshare.__file__).is_relative_to(Path(sys.prefix)):
        fail(f"portshare imported from {portshare.__file__}, not from the venv {sys.prefix}")
    direct = subprocess.run([str(exe), "--version"], capture_output=True, text=True, check=True)
    via_m = subprocess.run(
        [sys.executable, "-m", "portshare", "--version"],
        capture_output=True,
        text=True,
        check=True,
        env=clean_env(),
    )
    if portshare.__version__ not in direct.stdout or direct.stdout != via_m.stdout:
        fail(f"versions: {direct.stdout!r} / -m: {via_m.stdout!r} / {portshare.__version__}")
    step(f"portshare --version: {direct.stdout.strip()}; python -m portshare: the same")


def http_get(addr: str, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://{addr}{path}", timeout=2) as reply:
            return reply.status, reply.read().decode()
    except urllib.error.HTTPError as err:
        return err.code, ""
    except OSError:
        return 0, ""


def json_events(lines: list[str]) -> list[dict[str, object]]:
    """The lines that are JSON objects (portshare's log lines), parsed."""
    events = []
    for line in lines:
        try:
            event = json.loads(line)
        except ValueError:
            continue
        if isinstance(event, dict):
            events.append(event)
    return events


def check_serving_and_drain() -> None:
    import grpc

    cmd = [
        "portshare",
        "--listen", "127.0.0.1:0",
        "--admin", "127.0.0.1:0",
        "--log-format", "json",
        "--health", "grpc",
        "--workers", "2",
        "--worker-port-base", "0",
        "--",
        sys.executable, str(EXAMPLE / "server.py"),
    ]  # fmt: skip
    proc = subprocess.Popen(
        cmd,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=clean_env(PORTSHARE_LOG="info"),
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        Lines(proc.stdout, "[portshare stdout]")
        log = Lines(proc.stderr, "[portshare]")
        addrs: dict[str, str] = {}
        deadline = time.monotonic() + START_TIMEOUT
        while len(addrs) < 2:
            line = log.next(deadline)
            if not line:
                fail(f"portshare did not log both listening addresses: {log.all}")
            for event in json_events([line]):
                if event.get("message") == "listening":
                    addrs[event["listener"]] = event["addr"]
        proxy, admin = addrs["proxy"], addrs["admin"]
        step(f"portshare listens on {proxy}, admin on {admin}")

        while http_get(admin, "/readyz")[0] != 200:
            if time.monotonic() > deadline or proc.poll() is not None:
                fail("/readyz did not turn 200")
            time.sleep(0.1)
        while True:  # both workers ready, so that the calls can reach both
            status, body = http_get(admin, "/backends")
            if status == 200 and sum(b["ready"] for b in json.loads(body)) == 2:
                break
            if time.monotonic() > deadline:
                fail(f"the 2 workers did not become ready: {body}")
            time.sleep(0.1)
        step("/readyz is 200 and both workers are ready")

        sys.path.insert(0, str(EXAMPLE))  # protos_and_services finds the .proto on sys.path
        protos, services = grpc.protos_and_services("greeter.proto")
        pids = set()
        for i in range(20):
            # A channel per call: each is a new connection for portshare to place.
            with grpc.insecure_channel(
                proxy, options=[("grpc.use_local_subchannel_pool", 1)]
            ) as channel:
                stub = services.GreeterStub(channel)
                reply = stub.SayHello(protos.HelloRequest(name=f"e2e {i}"), timeout=10)
            if reply.message != f"Hello, e2e {i}!":
                fail(f"unexpected reply {reply}")
            pids.add(reply.pid)
        if len(pids) != 2:
            fail(f"20 calls reached workers {pids}, want 2 distinct ones")
        step(f"20 calls answered, by both workers (pids {sorted(pids)})")

        proc.send_signal(signal.SIGTERM)
        code = proc.wait(timeout=60)
        if code != 0:
            fail(f"portshare exited {code} after SIGTERM")
        # portshare has exited, so its stderr is at EOF: wait for the reader to get there.
        while log.next(time.monotonic() + 5) not in (None, ""):
            pass
        stopped = [
            e.get("exit") for e in json_events(log.all) if e.get("message") == "worker stopped"
        ]
        if stopped != ["exit status: 0", "exit status: 0"]:
            fail(f"want both workers stopped with exit status 0, portshare logged {stopped}")
        step("SIGTERM: portshare exited 0, both workers exited 0")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


# The worker's parent, standing in for portshare: starts the example server with
# PORTSHARE_PID set to its own pid (its output goes to the same pipe) and waits.
PARENT = """
import os, subprocess, sys, time
env = dict(os.environ, PORTSHARE_PID=str(os.getpid()))
child = subprocess.Popen([sys.executable, sys.argv[1], "--port", "0"], env=env)
print(f"CHILD {child.pid}", flush=True)
time.sleep(120)
"""


def check_orphan_stops() -> None:
    parent = subprocess.Popen(
        [sys.executable, "-c", PARENT, str(EXAMPLE / "server.py")],
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        env=clean_env(),
    )
    try:
        assert parent.stdout is not None
        out = Lines(parent.stdout, "[orphan]")
        deadline = time.monotonic() + START_TIMEOUT
        while not any("serving on" in line for line in out.all):
            if not out.next(deadline):
                fail(f"the worker did not start serving: {out.all}")
        parent.kill()  # SIGKILL: the stand-in portshare is gone without a word
        killed = time.monotonic()
        parent.wait()
        while True:  # EOF: the worker, the pipe's last holder, has exited
            line = out.next(killed + 2.0)
            if line is None:
                break
            if line == "":
                fail(f"the worker was still running 2 s after its parent was killed: {out.all}")
        took = time.monotonic() - killed
        if not any("is gone: stopping" in line for line in out.all):
            fail(f"the worker did not say why it stopped: {out.all}")
        step(f"a worker whose parent was SIGKILLed stopped by itself after {took:.2f} s")
    finally:
        if parent.poll() is None:
            parent.kill()
            parent.wait()


def main() -> int:
    check_version()
    check_serving_and_drain()
    check_orphan_stops()
    step("all checks passed")
    return 0


if __name__ == "__main__":
    sys.exit(main())
