#!/usr/bin/env python3
"""portshare benchmark: portshare (l4, h2, reuseport) against HAProxy, nginx, direct, SO_REUSEPORT.

Run it through bench/run.sh, which installs the tools, builds the binaries and the Python
venv first. Only the standard library is used here; the Python gRPC workers run in the venv.

What one run does (see bench/README.md for how to read the output):
  for each backend set (4 x bench_backend, 4 x Python grpcio workers, then 2 of them):
    start the backends once (and, for the Python sets, the raw SO_REUSEPORT group and
    portshare's reuseport mode with its own workers, which are targets of their own);
    for each round: for each target (order rotated per round): for each workload:
      start the proxy as a child (fresh, so its peak RSS belongs to this workload alone),
      warm it up, read its CPU time, run h2load for a fixed number of gRPC unary calls,
      read its CPU time again, its peak RSS, the backends' call counters and (portshare)
      its /metrics; stop it and check how it exited;
    (bench_backend set) hold 5,000 idle HTTP/2 connections through each proxy to get its
    memory per idle connection;
  then medians over rounds -> bench/results.md, bench/results.json, bench/chart.svg.

Everything listens on 127.0.0.1 only, on ports the OS picks; every child is killed at exit.
"""

import argparse
import datetime
import json
import math
import os
import re
import resource
import shlex
import shutil
import signal
import socket
import statistics
import string
import subprocess
import sys
import tempfile
import time
import urllib.request

BENCH = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(BENCH)
PORTSHARE = os.path.join(ROOT, "target", "release", "portshare")
PORTSHARE_REV = None  # set from --portshare-rev
# A second portshare to measure side by side (run.sh's BENCH_BASELINE), from
# --baseline-portshare and --baseline-rev; None: no baseline targets.
BASELINE = None
BASELINE_REV = None
BENCH_BACKEND = os.path.join(ROOT, "target", "release", "examples", "bench_backend")
WORKER = os.path.join(ROOT, "tests", "python", "worker.py")
# The same Echo servicer and server options as worker.py, served by the portshare helper
# (portshare.serve): what portshare's reuseport mode runs as its workers.
HELPER_WORKER = os.path.join(ROOT, "tests", "python", "helper_worker.py")
REUSEPORT_WORKER = os.path.join(BENCH, "reuseport_worker.py")
IDLE_CONNS = os.path.join(BENCH, "idle_conns.py")
NGINX_STREAM_MODULE = "/usr/lib/nginx/modules/ngx_stream_module.so"

# EchoRequest{payload="x"} for portshare.test.Echo/Unary, with gRPC's 5-byte prefix
# (compressed flag 0, big-endian length 3).
REQUEST = bytes([0x00, 0x00, 0x00, 0x00, 0x03, 0x0A, 0x01, 0x78])
CALL_PATH = "/portshare.test.Echo/Unary"
BACKENDS = 4
# Backends per set: the python2 set is the Python workers again, only 2 of them (where a
# proxy's CPU weighs most against the workers' on a 2-core machine).
SET_BACKENDS = {"bench_backend": BACKENDS, "python": BACKENDS, "python2": 2}

# (name, connections, streams per connection)
WORKLOADS = [("1x1", 1, 1), ("1x32", 1, 32), ("16x4", 16, 4)]
# For the SO_REUSEPORT pair only: 16x4 for a fixed time instead of a fixed count. With a
# fixed count the run lasts until the busiest worker has answered its connections' share,
# so calls/s follows how the kernel happened to hash those 16 connections (a 69/31 split
# halves it) more than anything the target does; for a fixed time every worker that holds
# a connection stays busy to the end, and the figure is the workers' own.
TIMED_WORKLOADS = [("16x4-10s", 16, 4, 10)]

# Calls per measured run, sized so a proxied run takes roughly 1-4 s on a 2-core machine
# (h2load -n: a fixed count, so every call must come back -- a lost one shows as a hang,
# which the timeout below turns into a reported failure instead of a stuck harness).
CALLS = {
    "bench_backend": {"1x1": 20000, "1x32": 100000, "16x4": 100000},
    "python": {"1x1": 6000, "1x32": 20000, "16x4": 20000},
    "python2": {"1x1": 6000, "1x32": 20000, "16x4": 20000},
}
# Calls sent before measuring: opens the proxy's backend connections and warms caches.
WARMUP = {"bench_backend": 2000, "python": 400, "python2": 400}

# A target named with this suffix runs the same proxy configuration in front of the same
# kind of backends listening on Unix domain sockets instead of TCP ports (HAProxy
# `server s /path`, nginx `server unix:/path`, portshare `--backend unix:/path`).
UNIX_SUFFIX = "-unix"
TCP_PROXIES = ["portshare-l4", "portshare-h2", "haproxy-tcp", "haproxy-h2", "nginx-stream",
               "nginx-grpc"]
UNIX_TARGETS = [t + UNIX_SUFFIX for t in TCP_PROXIES]
# portshare's reuseport mode: no proxy at all; portshare supervises Python workers that
# share the port with SO_REUSEPORT, as the "reuseport" baseline's do unsupervised.
SUPERVISED = "portshare-reuseport"
# On request only (--targets): the SO_REUSEPORT group again, unsupervised, but of the
# helper-based workers portshare-reuseport runs (its public address set by hand), so that
# the two differ only by portshare being there; against "reuseport" it shows what the
# helper's worker costs beside worker.py.
HELPER_GROUP = "reuseport-helper"
ALL_TARGETS = ["direct", *TCP_PROXIES, "reuseport", SUPERVISED, *UNIX_TARGETS]
# Targets that need Python workers (the SO_REUSEPORT group serves the Echo service).
PYTHON_ONLY = ["reuseport", HELPER_GROUP, SUPERVISED]
# What the python2 set runs by default: the reuseport pair, with portshare's two proxy
# modes beside them for scale.
SET_DEFAULT_TARGETS = {"python2": ["portshare-l4", "portshare-h2", "reuseport", SUPERVISED]}
# With a baseline, each portshare target also runs with the baseline binary, under this
# name and with exactly the same configuration: portshare-l4@base, portshare-h2@base.
BASE_SUFFIX = "@base"
BASE_TARGETS = [t + BASE_SUFFIX for t in TCP_PROXIES if t.startswith("portshare-")]
# Targets with a process of their own to measure (direct and reuseport have none); for
# portshare-reuseport that is the supervisor alone, which no call passes through.
PROXIES = TCP_PROXIES + UNIX_TARGETS + BASE_TARGETS + [SUPERVISED]
# The idle-connection test: every proxy on TCP backends (the brief's four plus the two
# HTTP/2 terminators); an idle connection costs the same whatever the backend socket.
IDLE_TARGETS = TCP_PROXIES + BASE_TARGETS

# A run during which processes other than the harness's kept this many cores busy is
# flagged (kernel work for our own loopback traffic counts as "other" too: about 0.1).
OTHER_LOAD_FLAG = 0.3

CLK_TCK = int(subprocess.run(["getconf", "CLK_TCK"], capture_output=True, text=True,
                             check=True).stdout.strip())


def _die_with_us():
    """Runs in each child before exec: SIGTERM it when this harness dies, however it dies
    (a killed harness must not leave proxies or workers behind on a shared machine). SIGTERM
    rather than SIGKILL so that nginx's master still takes its workers down with it."""
    try:
        import ctypes
        ctypes.CDLL(None, use_errno=True).prctl(1, signal.SIGTERM)  # PR_SET_PDEATHSIG = 1
    except (OSError, AttributeError):
        pass


def log(msg):
    # Progress goes to stderr so stdout carries only the final table.
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def free_port():
    """A port the OS picks (bound and released at once; nothing else here takes ports)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_until(check, timeout, what, interval=0.02):
    deadline = time.monotonic() + timeout
    while True:
        try:
            if check():
                return
        except OSError:
            pass
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def port_open(port):
    with socket.create_connection(("127.0.0.1", port), timeout=1):
        return True


# ---------------------------------------------------------------------------------------
# /proc readings

def children_of(pid):
    """Direct children of pid (nginx's workers), from /proc/*/stat's ppid field."""
    kids = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        if int(fields[1]) == pid:
            kids.append(int(entry))
    return kids


def cpu_ticks(pids):
    """utime + stime of the processes (all their threads), in clock ticks."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/stat") as f:
            # The command name may contain spaces: split after its closing parenthesis.
            fields = f.read().rsplit(")", 1)[1].split()
        total += int(fields[11]) + int(fields[12])  # fields 14 and 15 of stat(5)
    return total


def system_busy_ticks():
    """CPU ticks the whole machine spent busy (all cores), from /proc/stat's "cpu" line:
    user, nice, system, irq, softirq, steal; not idle or iowait."""
    with open("/proc/stat") as f:
        v = [int(x) for x in f.readline().split()[1:9]]
    return v[0] + v[1] + v[2] + v[5] + v[6] + v[7]


class Quiet:
    """Waits (bounded) for the machine to be free of other work before a run.

    On a shared machine someone's build can take a core for minutes. Waiting a little for it
    to finish gives cleaner numbers; the per-run limit and the overall budget keep the whole
    benchmark bounded in time even if the machine never goes quiet (then runs are flagged).
    """

    def __init__(self, per_run, budget):
        self.per_run, self.budget, self.waited = per_run, budget, 0.0

    def wait(self, our_pids):
        started = time.monotonic()
        limit = min(self.per_run, self.budget - self.waited)
        while True:
            sys0, ours0 = system_busy_ticks(), cpu_ticks(our_pids)
            time.sleep(0.5)
            other = (system_busy_ticks() - sys0) - (cpu_ticks(our_pids) - ours0)
            spent = time.monotonic() - started
            if other / CLK_TCK / 0.5 < OTHER_LOAD_FLAG / 2 or spent >= limit:
                self.waited += spent
                return spent


def children_cpu_seconds():
    """utime + stime of reaped children (h2load, once subprocess.run has waited for it)."""
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def status_kib(pids, key):
    """Sum of a /proc/PID/status field (VmHWM, VmRSS) over the processes, in KiB."""
    total = 0
    for pid in pids:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith(key + ":"):
                    total += int(line.split()[1])
    return total


# ---------------------------------------------------------------------------------------
# Backends

class BenchBackends:
    """4 x examples/bench_backend; call counts come from its `stats` line protocol."""

    name = "bench_backend"

    def __init__(self, tmp, unix_dir=None):
        self.procs = []
        self.ports = []
        # What a proxy is given: 127.0.0.1:PORT, or unix:PATH with unix_dir.
        self.addrs = []
        # The Unix-socket twin of this set, for the -unix targets (see main).
        self.unix = None
        for i in range(BACKENDS):
            if unix_dir:
                path = os.path.join(unix_dir, f"bench_backend{i}.sock")
                where, addr = ["--unix", path], f"unix:{path}"
            else:
                where, addr = ["--port", "0"], None
            p = subprocess.Popen([BENCH_BACKEND, *where], preexec_fn=_die_with_us,
                                 stdin=subprocess.PIPE,
                                 stdout=subprocess.PIPE,
                                 stderr=open(os.path.join(tmp, f"bench_backend{i}.err"), "w"),
                                 text=True, bufsize=1)
            self.procs.append(p)
            self.addrs.append(addr)
        for i, p in enumerate(self.procs):
            line = p.stdout.readline()
            if not line.startswith("PORT "):
                raise RuntimeError(f"bench_backend did not report its port: {line!r}")
            if not unix_dir:
                self.ports.append(int(line.split()[1]))
                self.addrs[i] = f"127.0.0.1:{self.ports[-1]}"


    def counts(self):
        out = []
        for p in self.procs:
            p.stdin.write("stats\n")
            p.stdin.flush()
            line = p.stdout.readline()
            if not line.startswith("CALLS "):
                raise RuntimeError(f"bench_backend stats: {line!r}")
            out.append(int(line.split()[1]))
        return out

    def alive(self):
        return all(p.poll() is None for p in self.procs)

    def pids(self):
        return [p.pid for p in self.procs]

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.stdin.close()  # end of stdin stops it
        for p in self.procs:
            try:
                p.wait(timeout=5)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


def count_calls(paths, offsets, seen):
    """Adds the "CALL Unary " lines the worker logs at `paths` gained since the last look
    to `seen` (offsets: where the last look ended); returns a copy of `seen`."""
    # Count new lines only: the logs grow by thousands of lines per run.
    for i, path in enumerate(paths):
        with open(path, "rb") as f:
            f.seek(offsets[i])
            data = f.read()
        cut = data.rfind(b"\n") + 1  # a line still being written is counted next time
        seen[i] += data[:cut].count(b"CALL Unary ")
        offsets[i] += cut
    return list(seen)


class PythonWorkers:
    """`count` x tests/python/worker.py (or the reuseport copy on one shared port, or with
    `helper` tests/python/helper_worker.py on one shared port).

    Call counts come from the worker's own per-call "CALL Unary ..." stderr line, which goes
    to a file per worker: the same counter for every target, proxies included.
    """

    def __init__(self, tmp, python, tag, reuseport=False, unix_dir=None, name="python",
                 count=BACKENDS, helper=False):
        self.name = name
        self.procs, self.ports, self.logs, self.offsets, self.seen = [], [], [], [], []
        self.addrs, self.unix = [], None  # as in BenchBackends
        # helper: tests/python/helper_worker.py told the shared address as portshare's
        # reuseport mode tells it; it prints its own (private) port, not the shared one.
        shared = free_port() if helper else None
        for i in range(count):
            errpath = os.path.join(tmp, f"{tag}{i}.err")
            env = None
            if helper:
                argv = [python, HELPER_WORKER]
                env = dict(os.environ, PORTSHARE_SHARED_ADDR=f"127.0.0.1:{shared}",
                           PORTSHARE_PORT="0", PORTSHARE_WORKER_INDEX=str(i))
            elif reuseport:
                # The first one takes a free port; the others join it through SO_REUSEPORT.
                port = self.ports[0] if self.ports else 0
                argv = [python, REUSEPORT_WORKER, "--reuseport", "--port", str(port)]
            elif unix_dir:
                address = f"unix:{os.path.join(unix_dir, f'{tag}{i}.sock')}"
                argv = [python, WORKER, "--address", address]
            else:
                argv = [python, WORKER, "--port", "0"]
            if not helper:
                argv += ["--name", f"{tag}{i}"]
            p = subprocess.Popen(argv, preexec_fn=_die_with_us, stdin=subprocess.DEVNULL,
                                 stdout=subprocess.PIPE, stderr=open(errpath, "wb"), text=True,
                                 env=env)
            line = p.stdout.readline()  # one at a time: the first must hold the port
            if not line.startswith("PORT "):
                raise RuntimeError(f"worker {tag}{i} did not start: {line!r}, see {errpath}")
            self.procs.append(p)
            if helper:
                self.ports.append(shared)
                self.addrs.append(f"127.0.0.1:{shared}")
            elif unix_dir and not reuseport:
                self.addrs.append(address)
            else:
                self.ports.append(int(line.split()[1]))
                self.addrs.append(f"127.0.0.1:{self.ports[-1]}")
            self.logs.append(errpath)
            self.offsets.append(0)
            self.seen.append(0)

    def counts(self):
        return count_calls(self.logs, self.offsets, self.seen)

    def alive(self):
        return all(p.poll() is None for p in self.procs)

    def pids(self):
        return [p.pid for p in self.procs]

    def stop(self):
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=10)
            except subprocess.TimeoutExpired:
                p.kill()
                p.wait()


class Supervised:
    """portshare in reuseport mode with `count` helper-based Python workers
    (tests/python/helper_worker.py: worker.py's Echo service and server options), started
    once per set like the raw SO_REUSEPORT group it is compared with.

    Each worker's stderr (its per-call "CALL Unary" lines) goes to a file of its own, not
    through portshare, so that portshare does no per-call work here either: what it spends is
    the supervisor's own (health checks, the admin server), which is its figure.
    """

    def __init__(self, tmp, python, count):
        self.port, self.admin = free_port(), free_port()
        self.count = count
        self.logs = [os.path.join(tmp, f"supervised{i}.err") for i in range(count)]
        for path in self.logs:
            open(path, "wb").close()
        self.offsets, self.seen = [0] * count, [0] * count
        self.logpath = os.path.join(tmp, "portshare-reuseport.log")
        # Appends: a worker restarted during the run (it should not be) counts on.
        redirect = f'exec "$0" "$@" 2>>"{tmp}/supervised$PORTSHARE_WORKER_INDEX.err"'
        argv = [PORTSHARE, "--mode", "reuseport", "--listen", f"127.0.0.1:{self.port}",
                "--admin", f"127.0.0.1:{self.admin}", "--workers", str(count),
                "--worker-port-base", "0", "--", "sh", "-c", redirect, python, HELPER_WORKER]
        env = dict(os.environ, PORTSHARE_WORKERS__OUTPUT="inherit")
        with open(self.logpath, "ab") as logfile:
            self.proc = subprocess.Popen(argv, preexec_fn=_die_with_us,
                                         stdin=subprocess.DEVNULL, stdout=logfile,
                                         stderr=subprocess.STDOUT, env=env)
        try:
            wait_until(lambda: self._ready() == count, 60,
                       f"portshare-reuseport: all {count} workers ready")
        except Exception:
            self.stop()
            raise
        self.ports = [self.port]

    def _ready(self):
        if self.proc.poll() is not None:
            with open(self.logpath, "rb") as f:
                tail = f.read().decode(errors="replace")[-1500:]
            raise RuntimeError(f"portshare-reuseport exited with {self.proc.returncode}: {tail}")
        with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}/backends", timeout=5) as r:
            return sum(1 for b in json.loads(r.read().decode()) if b.get("ready"))

    def counts(self):
        return count_calls(self.logs, self.offsets, self.seen)

    def proxy_pids(self):
        return [self.proc.pid]

    def pids(self):
        """The workers (`sh -c exec` leaves the Python process as portshare's child)."""
        return children_of(self.proc.pid)

    def alive(self):
        return self.proc.poll() is None and len(self.pids()) == self.count

    def warn_lines(self):
        with open(self.logpath, "rb") as f:
            text = f.read().decode(errors="replace")
        return [line for line in text.splitlines() if re.search(r"\b(WARN|ERROR)\b", line)]

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        return self.proc.returncode


# ---------------------------------------------------------------------------------------
# Proxies

class Peer:
    """A proxy run in the foreground as our child, killed after its measurement."""

    def __init__(self, target, argv, port, tmp, admin=None, stop_signal=signal.SIGTERM,
                 backends=BACKENDS):
        self.target, self.argv, self.port, self.admin = target, argv, port, admin
        self.stop_signal = stop_signal
        self.logpath = os.path.join(tmp, f"{target}.log")
        self.logfile = open(self.logpath, "ab")
        self.logfile.write(f"\n=== {time.strftime('%H:%M:%S')} {shlex.join(argv)}\n".encode())
        self.logfile.flush()
        self.log_start = self.logfile.tell()
        self.proc = subprocess.Popen(argv, preexec_fn=_die_with_us,
                                     stdin=subprocess.DEVNULL, stdout=self.logfile,
                                     stderr=subprocess.STDOUT)
        try:
            wait_until(lambda: self._check_alive() and port_open(port), 15,
                       f"{target} to listen on {port}")
            if admin is not None:
                # portshare: ready means every backend passed its first health check.
                wait_until(lambda: self.http_get("/readyz")[0] == 200, 15,
                           f"{target} /readyz")
                wait_until(lambda: self.ready_backends() == backends, 15,
                           f"{target}: all {backends} backends ready")
        except Exception:
            self.stop()
            raise

    def _check_alive(self):
        if self.proc.poll() is not None:
            raise RuntimeError(f"{self.target} exited with {self.proc.returncode} at start; "
                               f"log: {self.log_tail()}")
        return True

    def http_get(self, path):
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{self.admin}{path}",
                                        timeout=5) as r:
                return r.status, r.read().decode()
        except urllib.error.HTTPError as e:
            return e.code, ""

    def ready_backends(self):
        return sum(1 for b in json.loads(self.http_get("/backends")[1]) if b.get("ready"))

    def pids(self):
        # nginx: master plus its worker processes; the others are one process.
        return [self.proc.pid] + children_of(self.proc.pid)

    def alive(self):
        return self.proc.poll() is None

    def log_tail(self, n=2000):
        with open(self.logpath, "rb") as f:
            f.seek(self.log_start)
            return f.read().decode(errors="replace")[-n:]

    def log_lines(self):
        with open(self.logpath, "rb") as f:
            f.seek(self.log_start)
            return f.read().decode(errors="replace").splitlines()

    def stop(self):
        """Stops it; returns its exit code (negative: killed by that signal), or 'killed'
        if it needed SIGKILL after 10 s."""
        if self.proc.poll() is None:
            self.proc.send_signal(self.stop_signal)
            try:
                self.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                self.logfile.close()
                return "killed"
        self.logfile.close()
        return self.proc.returncode


def fd_limits():
    """Connection limits that fit this process's descriptor limit (children inherit it).

    HAProxy refuses to start when 2 x maxconn does not fit; nginx only warns but would fail
    connections later. Without CAP_SYS_RESOURCE (containers) the hard limit is what it is,
    so the configs follow it rather than the other way round.
    """
    nofile = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    return {"nofile": nofile, "maxconn": min(20000, (nofile - 200) // 2),
            "worker_connections": nofile - 100}


def render(template, tmp, **values):
    with open(os.path.join(BENCH, "templates", template)) as f:
        text = string.Template(f.read()).substitute(tmp=tmp, **fd_limits(), **values)
    path = os.path.join(tmp, template)
    with open(path, "w") as f:
        f.write(text)
    return path


def config_of(target):
    """The target whose configuration `target` runs: portshare-l4@base runs portshare-l4's,
    haproxy-tcp-unix haproxy-tcp's (with socket backends)."""
    return target.removesuffix(BASE_SUFFIX).removesuffix(UNIX_SUFFIX)


def build_of(target):
    """Which portshare build a portshare target runs, for the report: a commit, the working
    tree's target/release, or the path given."""
    if target.endswith(BASE_SUFFIX):
        return BASELINE_REV or os.path.relpath(BASELINE, ROOT)
    if PORTSHARE_REV:
        return PORTSHARE_REV
    if os.path.abspath(PORTSHARE) == os.path.join(ROOT, "target", "release", "portshare"):
        return "working tree"
    return os.path.relpath(PORTSHARE, ROOT)


def label(target):
    """The target as the table names it: with a baseline, portshare's say which build."""
    if BASELINE and target.startswith("portshare-"):
        return f"{target} ({build_of(target)})"
    return target


def start_peer(target, backend_addrs, tmp):
    """Starts one proxy target in front of backend_addrs (127.0.0.1:PORT or unix:PATH);
    returns a Peer."""
    port = free_port()
    listen = f"127.0.0.1:{port}"
    config = config_of(target)
    if target.startswith("portshare-"):
        admin = free_port()
        binary = BASELINE if target.endswith(BASE_SUFFIX) else PORTSHARE
        argv = [binary, "--listen", listen, "--mode", config.split("-")[1],
                "--admin", f"127.0.0.1:{admin}"]
        for a in backend_addrs:
            argv += ["--backend", a]
        return Peer(target, argv, port, tmp, admin=admin, backends=len(backend_addrs))
    if target.startswith("haproxy-"):
        proto = " proto h2" if config == "haproxy-h2" else ""
        # HAProxy takes a Unix socket as an absolute path.
        servers = "\n".join(f"    server b{i} {a.removeprefix('unix:')}{proto}"
                            for i, a in enumerate(backend_addrs))
        cfg = render(f"{config}.cfg", tmp, listen=listen, servers=servers)
        # -db: stay in the foreground (no daemon), so it is our child and dies with us.
        return Peer(target, ["haproxy", "-db", "-f", cfg], port, tmp)
    if target.startswith("nginx-"):
        # nginx writes a Unix socket upstream as unix:PATH, as portshare does.
        servers = "\n".join(f"        server {a};" for a in backend_addrs)
        cfg = render(f"{config}.conf", tmp, listen=listen, servers=servers,
                     stream_module=NGINX_STREAM_MODULE)
        for d in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"):
            os.makedirs(os.path.join(tmp, d), exist_ok=True)
        # -e: the error log before the config is read; -g 'daemon off;': stay our child.
        argv = ["nginx", "-p", tmp, "-c", cfg, "-e", os.path.join(tmp, "nginx-error.log"),
                "-g", "daemon off;"]
        return Peer(target, argv, port, tmp)
    raise ValueError(target)


def parse_metrics(text):
    """Prometheus text -> {(name, frozenset(labels)): value}."""
    out = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r'^([a-zA-Z_:][\w:]*)(?:\{(.*)\})?\s+(\S+)', line)
        if not m:
            continue
        labels = frozenset(re.findall(r'(\w+)="((?:[^"\\]|\\.)*)"', m.group(2) or ""))
        out[(m.group(1), labels)] = float(m.group(3))
    return out


def metric_by(metrics, name, key, where=None):
    """Sums metric `name` by the value of label `key`, optionally filtered by labels."""
    out = {}
    for (n, labels), v in metrics.items():
        if n != name:
            continue
        d = dict(labels)
        if where and any(d.get(k) != val for k, val in where.items()):
            continue
        out[d.get(key)] = out.get(d.get(key), 0) + v
    return out


def metric_total(metrics, name):
    return sum(v for (n, _), v in metrics.items() if n == name)


# ---------------------------------------------------------------------------------------
# Load

def h2load(port, n, conns, streams, reqfile, logfile, timeout, duration=None):
    """h2load's figures for `n` calls, or (duration) for as many as `duration` seconds take."""
    amount = ["-D", str(duration)] if duration else ["-n", str(n)]
    argv = ["h2load", *amount, "-c", str(conns), "-m", str(streams), "-t", "1",
            "-H", "content-type: application/grpc", "-H", "te: trailers",
            "-d", reqfile, f"http://127.0.0.1:{port}{CALL_PATH}"]
    if logfile:
        # h2load appends to its log file: start each run with an empty one.
        if os.path.exists(logfile):
            os.remove(logfile)
        argv[1:1] = ["--log-file", logfile]
    started = time.monotonic()
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=timeout,
                             preexec_fn=_die_with_us).stdout
    except subprocess.TimeoutExpired as e:
        return {"hung": True, "seconds": time.monotonic() - started,
                "argv": argv, "output": (e.stdout or b"")[-500:]}
    res = {"hung": False, "seconds": time.monotonic() - started, "argv": argv}
    m = re.search(r"finished in ([\d.]+)(m?s), ([\d.]+) req/s", out)
    res["rps"] = float(m.group(3)) if m else 0.0
    m = re.search(r"requests: (\d+) total, (\d+) started, (\d+) done, (\d+) succeeded, "
                  r"(\d+) failed, (\d+) errored, (\d+) timeout", out)
    keys = ("total", "started", "done", "succeeded", "failed", "errored", "timeout")
    res.update(dict(zip(keys, map(int, m.groups()))) if m else {k: 0 for k in keys})
    m = re.search(r"status codes: (\d+) 2xx, (\d+) 3xx, (\d+) 4xx, (\d+) 5xx", out)
    res["status_2xx"] = int(m.group(1)) if m else 0
    if not m:
        res["output"] = out[-1000:]
    return res


def percentiles(logfile):
    """p50 and p99 of the per-request durations in h2load's --log-file, in ms.

    Each line is "<start, us since epoch>\t<status>\t<duration, us>"; h2load's own summary
    only has min/max/mean/sd.
    """
    durations = []
    with open(logfile) as f:
        for line in f:
            parts = line.split()
            if len(parts) == 3:
                durations.append(int(parts[2]))
    if not durations:
        return None, None
    durations.sort()

    def pct(p):  # nearest rank
        return durations[min(len(durations) - 1, max(0, -(-len(durations) * p // 100) - 1))]
    return pct(50) / 1000.0, pct(99) / 1000.0


# ---------------------------------------------------------------------------------------
# Measurements

def measure(bset, standing, target, workload, round_no, tmp, reqfile, calls, warmup, timeout,
            quiet):
    """One run of one workload against one target; returns a result dict. `standing`: the
    sets started once per set beside bset, by target ("reuseport", "portshare-reuseport")."""
    wname, conns, streams, *timed = workload
    duration = timed[0] if timed else None
    if target.endswith(UNIX_SUFFIX):
        bset = bset.unix
    counted = standing.get(target, bset)
    sup = standing.get(SUPERVISED)
    # Every process of ours that stays up between runs.
    backends = bset.pids() + [pid for s in standing.values() for pid in s.pids()] \
        + (sup.proxy_pids() if sup else [])
    res = {"set": bset.name, "target": target, "workload": wname, "round": round_no,
           "calls": calls, "notes": []}
    res["waited_for_quiet"] = round(quiet.wait(backends), 1)
    peer = None
    if target == "direct":
        port = bset.ports[0]
    elif target in standing:
        port = standing[target].ports[0]
    else:
        peer = start_peer(target, bset.addrs, tmp)
        port = peer.port
    try:
        w = h2load(port, max(warmup, conns * streams), conns, streams, reqfile, None, timeout)
        if w["hung"] or w["status_2xx"] != w["total"]:
            res["notes"].append(f"warm-up: {w.get('status_2xx')} of {w.get('total')} calls "
                                f"returned 200{' (h2load hung)' if w['hung'] else ''}")
        # The process whose CPU is the target's own: the proxy, or reuseport mode's
        # supervisor; none for direct and the raw SO_REUSEPORT group.
        pids = peer.pids() if peer else sup.proxy_pids() if target == SUPERVISED else []
        alive = (lambda: peer.alive()) if peer else (lambda: counted.alive())
        # Everything this run consists of: the proxy, every backend, and h2load (a child
        # reaped by subprocess.run, so it shows up in RUSAGE_CHILDREN).
        ours = list(dict.fromkeys((peer.pids() if peer else []) + backends))
        before = counted.counts()
        cpu0 = cpu_ticks(pids) if pids else 0
        # The backends' own CPU: what a proxy adds to the workers' work shows here too
        # (more system calls, smaller reads), and for the reuseport pair it is the figure.
        workers = counted.pids()
        workers0 = cpu_ticks(workers)
        ours0, sys0, kids0 = cpu_ticks(ours), system_busy_ticks(), children_cpu_seconds()
        m0 = parse_metrics(peer.http_get("/metrics")[1]) if peer and peer.admin else None
        logfile = os.path.join(tmp, "h2load-requests.log")
        r = h2load(port, calls, conns, streams, reqfile, logfile, timeout, duration)
        if duration:
            # As many as came back in the time; those still in flight at the end are not
            # counted by h2load, and the workers' CALL lines may include them.
            # (h2load's status counts can run one or two past its "done".)
            calls = res["calls"] = max(r.get("done", 0), r.get("status_2xx", 0))
        cpu1 = cpu_ticks(pids) if pids and alive() else None
        workers1 = cpu_ticks(workers) if counted.alive() else None
        if not peer or peer.alive():
            # CPU the machine spent on anything else during the run, in cores (a shared
            # machine: someone's build or tests). It moves calls/s and latency, and even
            # the CPU per call of a 1x1 run (a busy machine turns cross-core wake-ups into
            # cheap same-core ones), so it is recorded and flagged.
            wall = max(r["seconds"], 0.001)
            other = (system_busy_ticks() - sys0) - (cpu_ticks(ours) - ours0) \
                - (children_cpu_seconds() - kids0) * CLK_TCK
            res["other_cores"] = round(other / CLK_TCK / wall, 2)
            if res["other_cores"] > OTHER_LOAD_FLAG:
                res["notes"].append(f"other work on the machine used about "
                                    f"{res['other_cores']:.2f} cores during this run")
        after = counted.counts()
        m1 = parse_metrics(peer.http_get("/metrics")[1]) if peer and peer.admin \
            and peer.alive() else None
        res["rps"] = r.get("rps")
        res["seconds"] = round(r["seconds"], 2)
        res["hung"] = r["hung"]
        if r["hung"]:
            res["notes"].append(f"h2load did not finish {calls} calls within {timeout}s "
                                f"(killed): calls lost or stuck")
        res["ok_2xx"] = r.get("status_2xx", 0)
        res["p50"], res["p99"] = percentiles(logfile) if not r["hung"] else (None, None)
        per_backend = [b - a for a, b in zip(before, after)]
        res["backend_calls"] = per_backend
        answered = sum(per_backend)
        # Errors: calls that did not come back as HTTP 200, plus 200s that no backend
        # answered (h2load does not read grpc-status; a proxy's own Trailers-Only error, e.g.
        # UNAVAILABLE, is a 200 that never reached a backend).
        http_errors = calls - res["ok_2xx"]
        never_answered = max(0, res["ok_2xx"] - answered)
        res["errors"] = http_errors + never_answered
        if http_errors and not r["hung"]:
            res["notes"].append(f"h2load: {r.get('succeeded')} succeeded, {r.get('failed')} "
                                f"failed, {r.get('errored')} errored, {r.get('timeout')} "
                                f"timed out, {res['ok_2xx']} x 200 of {calls}")
        if never_answered:
            res["notes"].append(f"{never_answered} calls got HTTP 200 but no backend answered "
                                f"them (a proxy-made gRPC error)")
        if answered > calls and not duration:
            res["notes"].append(f"backends answered {answered} calls for {calls} sent "
                                f"(duplicates: a call sent twice)")
        if workers1 is not None:
            res["backend_cpu_ms_per_1k"] = ((workers1 - workers0) * 1000.0 / CLK_TCK) / \
                (max(res["ok_2xx"], 1) / 1000.0)
        if pids:
            if cpu1 is not None:
                res["cpu_ms_per_1k"] = ((cpu1 - cpu0) * 1000.0 / CLK_TCK) / \
                    (max(res["ok_2xx"], 1) / 1000.0)
            res["peak_rss_mib"] = status_kib(pids, "VmHWM") / 1024.0 if alive() else None
            res["processes"] = len(pids)
        if target == SUPERVISED and not sup.alive():
            res["notes"].append(f"{target}: portshare or a worker died during the run")
        if peer:
            if m0 is not None and m1 is not None:
                check_portshare_metrics(res, target, m0, m1, calls, bset.addrs)
            if not peer.alive():
                res["notes"].append(f"{target} died during the run: exit "
                                    f"{peer.proc.returncode}; log: {peer.log_tail(800)}")
    finally:
        if peer:
            code = peer.stop()
            res["exit"] = code
            # portshare drains and exits 0 on SIGTERM; HAProxy and nginx too (nginx's
            # master exits 0 on SIGTERM after its workers). Anything else is worth a look.
            if code not in (0, -signal.SIGTERM):
                res["notes"].append(f"{target} exited with {code} when stopped")
            if peer.target.startswith("portshare"):
                bad = [line for line in peer.log_lines()
                       if re.search(r"\b(WARN|ERROR)\b", line)]
                if bad:
                    res["notes"].append(f"{len(bad)} WARN/ERROR log lines, first: {bad[0][:300]}")
    return res


def check_portshare_metrics(res, target, m0, m1, calls, addrs):
    """portshare's own view of the run: per-backend calls (h2) or connections (l4), and any
    shed, retried or failed calls and connections."""
    keys = list(addrs)  # portshare labels a backend with the name it was given

    def delta(name, key, where=None):
        a = metric_by(m0, name, key, where)
        b = metric_by(m1, name, key, where)
        return {k: b.get(k, 0) - a.get(k, 0) for k in set(a) | set(b)}

    h2 = config_of(target) == "portshare-h2"
    if h2:
        # h2 mode pools its backend connections: they open during the warm-up and carry the
        # whole run, so count them over portshare's life (it started fresh for this run)
        # rather than as a delta, which would be 0 when all is well.
        conns = metric_by(m1, "portshare_backend_connections_total", "backend")
    else:
        conns = delta("portshare_backend_connections_total", "backend")
    res["ps_conns"] = [int(conns.get(k, 0)) for k in keys]
    if h2:
        ok = delta("portshare_calls_total", "backend", {"grpc_status": "0"})
        res["ps_calls"] = [int(ok.get(k, 0)) for k in keys]
        statuses = delta("portshare_calls_total", "grpc_status")
        bad = {s: int(v) for s, v in statuses.items() if s != "0" and v}
        if bad:
            res["notes"].append(f"portshare_calls_total by non-OK grpc_status: {bad}")
        if sum(res["ps_calls"]) != calls:
            res["notes"].append(f"portshare counted {sum(res['ps_calls'])} OK calls of {calls}")
    for name in ("portshare_calls_shed_total", "portshare_call_retries_total",
                 "portshare_connect_retries_total", "portshare_connections_failed_total",
                 "portshare_backend_connect_errors_total", "portshare_backend_ejections_total",
                 "portshare_accept_errors_total"):
        d = metric_total(m1, name) - metric_total(m0, name)
        if d:
            res["notes"].append(f"{name} +{int(d)}")


def measure_idle(bset, target, round_no, tmp, count, python):
    """RSS per idle connection: proxy RSS with `count` idle HTTP/2 connections held, minus
    its RSS before they were opened, divided by the count."""
    res = {"set": bset.name, "target": target, "round": round_no, "count": count, "notes": []}
    peer = start_peer(target, bset.addrs, tmp)
    holder = None
    try:
        time.sleep(0.3)  # let start-up allocations settle before the baseline
        pids = peer.pids()
        rss0 = status_kib(pids, "VmRSS")
        holder = subprocess.Popen([python, IDLE_CONNS, "--port", str(peer.port), "--count",
                                   str(count), "--timeout", "60"], preexec_fn=_die_with_us,
                                  stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, text=True)
        line = holder.stdout.readline()
        fields = dict(kv.split("=") for kv in line.split()[1:]) if line.startswith("OPEN") \
            else {}
        answered = int(fields.get("answered", 0))
        res["opened"], res["answered"] = int(fields.get("opened", 0)), answered
        res["open_seconds"] = float(fields.get("seconds", 0))
        if answered < count:
            res["notes"].append(f"idle: only {answered} of {count} connections answered "
                                f"({line.strip()})")
        time.sleep(1.0)  # lazily-touched pages show up in RSS after the burst
        rss1 = status_kib(pids, "VmRSS")
        if peer.admin:
            m = parse_metrics(peer.http_get("/metrics")[1])
            res["ps_active"] = int(metric_total(m, "portshare_connections_active"))
            if res["ps_active"] != answered:
                res["notes"].append(f"idle: portshare_connections_active "
                                    f"{res['ps_active']}, {answered} held")
        res["rss_before_mib"], res["rss_held_mib"] = rss0 / 1024.0, rss1 / 1024.0
        res["kib_per_conn"] = (rss1 - rss0) / max(answered, 1)
        holder.stdin.write("close\n")
        holder.stdin.flush()
        closed = holder.stdout.readline()
        if "dropped=0" not in closed:
            res["notes"].append(f"idle: the proxy closed held connections: {closed.strip()}")
        if not peer.alive():
            res["notes"].append(f"{target} died holding idle connections: exit "
                                f"{peer.proc.returncode}; log: {peer.log_tail(800)}")
    finally:
        if holder and holder.poll() is None:
            try:
                holder.stdin.close()
                holder.wait(timeout=10)
            except (OSError, subprocess.TimeoutExpired):
                holder.kill()
                holder.wait()
        code = peer.stop()
        if code not in (0, -signal.SIGTERM):
            res["notes"].append(f"{target} exited with {code} when stopped after the idle test")
    return res


# ---------------------------------------------------------------------------------------
# Report

def median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def fmt(v, digits=0):
    if v is None:
        return "n/a"
    return f"{v:,.{digits}f}"


def shares(counts):
    """Per-backend share in %, busiest first (which backend it was does not matter)."""
    total = sum(counts)
    if not total:
        return "n/a"
    return "/".join(str(round(100.0 * c / total)) for c in sorted(counts, reverse=True))


def summarize(runs, idles, targets_by_set):
    rows = []
    for set_name, targets in targets_by_set:
        idle_by_target = {}
        for t in targets:
            vals = [i["kib_per_conn"] for i in idles
                    if i["set"] == set_name and i["target"] == t and "kib_per_conn" in i]
            idle_by_target[t] = median(vals)
        for t in targets:
            for wname, *_ in WORKLOADS + TIMED_WORKLOADS:
                rs = [r for r in runs if r["set"] == set_name and r["target"] == t
                      and r["workload"] == wname]
                if not rs:
                    continue
                # The spread and portshare's view come from the median-throughput round, so
                # the columns of one row describe one real run.
                mid = sorted(rs, key=lambda r: r.get("rps") or 0)[len(rs) // 2]
                ps = "n/a"
                if "ps_calls" in mid:
                    ps = (f"calls {shares(mid['ps_calls'])} %; pool conns "
                          + "/".join(str(c) for c in sorted(mid["ps_conns"], reverse=True)))
                elif "ps_conns" in mid:
                    ps = "conns " + "/".join(str(c) for c in sorted(mid["ps_conns"],
                                                                     reverse=True))
                row = {
                    "set": set_name, "target": t, "workload": wname, "rounds": len(rs),
                    "rps": median([r.get("rps") for r in rs]),
                    "p50": median([r.get("p50") for r in rs]),
                    "p99": median([r.get("p99") for r in rs]),
                    "errors": sum(r.get("errors", 0) for r in rs),
                    "calls": sum(r["calls"] for r in rs),
                    "hung": sum(1 for r in rs if r.get("hung")),
                    "failed": sum(1 for r in rs if r.get("failed")),
                    "cpu": median([r.get("cpu_ms_per_1k") for r in rs]),
                    "backend_cpu": median([r.get("backend_cpu_ms_per_1k") for r in rs]),
                    "rss": median([r.get("peak_rss_mib") for r in rs]),
                    "idle": idle_by_target.get(t),
                    "spread": shares(mid.get("backend_calls", [])),
                    "portshare": ps,
                }
                if BASELINE and t.startswith("portshare-"):
                    row["build"] = build_of(t)
                rows.append(row)
    return rows


def table(rows):
    head = ("| backends | target | load (conns x streams) | calls/s | p50 ms | p99 ms "
            "| errors / calls | proxy CPU ms per 1k calls | backend CPU ms per 1k calls "
            "| peak RSS MiB | idle KiB/conn | calls per backend % (busiest first) "
            "| portshare /metrics |")
    lines = [head, "|---|---|---|--:|--:|--:|--:|--:|--:|--:|--:|---|---|"]
    for r in rows:
        proxy = r["target"] in PROXIES
        errors = f"{r['errors']} / {r['calls']:,}"
        if r["hung"]:
            errors += f" ({r['hung']} runs hung)"
        if r["failed"]:
            errors += f" ({r['failed']} runs could not start)"
        lines.append("| " + " | ".join([
            r["set"], label(r["target"]), r["workload"], fmt(r["rps"]), fmt(r["p50"], 2),
            fmt(r["p99"], 2), errors,
            fmt(r["cpu"], 1) if proxy else "—",
            fmt(r.get("backend_cpu"), 1),
            fmt(r["rss"], 1) if proxy else "—",
            fmt(r["idle"], 1) if proxy and r["idle"] is not None else "—",
            r["spread"], r["portshare"]]) + " |")
    return "\n".join(lines)


def change(new, base):
    """The change from base to new, in % of base; "n/a" if either is missing."""
    if new is None or not base:
        return "n/a"
    return f"{100.0 * (new - base) / base:+.1f} %"


def baseline_table(rows):
    """Each portshare row against its @base peer of the same run: the change of each median,
    in % of the baseline's."""
    base = {(r["set"], config_of(r["target"]), r["workload"]): r for r in rows
            if r["target"].endswith(BASE_SUFFIX)}
    lines = ["| backends | target | load (conns x streams) | calls/s | p50 ms | p99 ms "
             "| proxy CPU ms per 1k calls | errors (this / base) |",
             "|---|---|---|--:|--:|--:|--:|--:|"]
    for r in rows:
        b = base.get((r["set"], r["target"], r["workload"]))
        if b is None:
            continue
        lines.append("| " + " | ".join([
            r["set"], r["target"], r["workload"], change(r["rps"], b["rps"]),
            change(r["p50"], b["p50"]), change(r["p99"], b["p99"]),
            change(r["cpu"], b["cpu"]), f"{r['errors']} / {b['errors']}"]) + " |")
    return "\n".join(lines) if len(lines) > 2 else ""


def paired_ratio(runs, set_name, wname, target, base):
    """The geometric mean over rounds of `target`'s calls/s over `base`'s in the same round,
    with its 95 % interval: (mean, low, high), or None below 3 rounds.

    The two runs of a round are back to back (order rotated per round), so each round's
    ratio cancels the machine's slow drift; what is left varies a lot from run to run on a
    shared 2-core machine (a standard deviation of 15-20 % at 16x4), which the interval shows.
    Logarithms make the figure the same whichever target is on top of the ratio.
    """
    by_round = {}
    for r in runs:
        if r["set"] == set_name and r["workload"] == wname and r.get("rps"):
            by_round.setdefault(r["round"], {})[r["target"]] = r["rps"]
    logs = [math.log(v[target] / v[base]) for v in by_round.values()
            if target in v and base in v]
    if len(logs) < 3:
        return None
    mean, spread = statistics.mean(logs), 1.96 * statistics.stdev(logs) / math.sqrt(len(logs))
    return math.exp(mean), math.exp(mean - spread), math.exp(mean + spread)


def reuseport_text(rows, runs):
    """portshare's reuseport mode against the raw SO_REUSEPORT group (and, if it ran, the
    unsupervised group of helper workers), per set and load: the ratio of the medians of
    calls/s (the issue's bar: at least 0.97 against "reuseport" at 16x4), and the paired
    per-round ratio with its interval (see paired_ratio)."""
    by = {(r["set"], r["target"], r["workload"]): r for r in rows}
    lines = []
    for (set_name, target, wname), r in by.items():
        if target != SUPERVISED or not r["rps"]:
            continue
        for base in ("reuseport", HELPER_GROUP):
            raw = by.get((set_name, base, wname))
            if raw is None or not raw["rps"]:
                continue
            cpu, raw_cpu = r.get("backend_cpu"), raw.get("backend_cpu")
            cpu_ratio = f"{cpu / raw_cpu:.2f}" if cpu and raw_cpu else "n/a"
            paired = paired_ratio(runs, set_name, wname, target, base)
            paired_text = "n/a" if paired is None else "{:.2f} ({:.2f}–{:.2f})".format(*paired)
            lines.append(f"| {set_name} | {SET_BACKENDS[set_name]} | {wname} | {base} "
                         f"| {fmt(r['rps'])} | {fmt(raw['rps'])} | {r['rps'] / raw['rps']:.2f} "
                         f"| {paired_text} | {fmt(cpu, 1)} | {fmt(raw_cpu, 1)} | {cpu_ratio} |")
    if not lines:
        return ""
    return ("\nportshare-reuseport against the unsupervised SO_REUSEPORT group of the same run "
            "(medians of calls/s, and of the workers' CPU ms per 1,000 calls; paired: the "
            "geometric mean of the two's ratio round by round, with its 95 % interval):\n\n"
            "| backends | workers | load | against | calls/s portshare-reuseport | against "
            "| ratio | paired ratio | worker CPU portshare-reuseport | against | ratio |\n"
            "|---|--:|---|---|--:|--:|--:|--:|--:|--:|--:|\n" + "\n".join(lines) + "\n")


def versions():
    def first_line(argv):
        try:
            p = subprocess.run(argv, capture_output=True, text=True, timeout=10)
            return (p.stdout or p.stderr).strip().splitlines()[0]
        except (OSError, IndexError, subprocess.TimeoutExpired):
            return "?"
    rev = first_line(["git", "-C", ROOT, "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", ROOT, "status", "--porcelain", "src"],
                           capture_output=True, text=True).stdout.strip()
    built = f"{rev}{' + uncommitted changes in src/' if dirty else ''}"
    if PORTSHARE_REV:
        built = f"{PORTSHARE_REV} (BENCH_REV: built from git archive, not the working tree)"
    elif os.path.abspath(PORTSHARE) != os.path.join(ROOT, "target", "release", "portshare"):
        built = f"{PORTSHARE} (given with --portshare)"
    found = {
        "portshare": built,
        "haproxy": first_line(["haproxy", "-v"]),
        "nginx": first_line(["nginx", "-v"]),
        "h2load": first_line(["h2load", "--version"]),
    }
    if BASELINE:
        how = "BENCH_BASELINE: built from git archive" if BASELINE_REV \
            else "given with --baseline-portshare"
        found["baseline"] = f"{BASELINE_REV or BASELINE} ({how}; the {BASE_SUFFIX} targets)"
    return found


def machine():
    model = "?"
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    return {
        "nproc": subprocess.run(["nproc"], capture_output=True, text=True).stdout.strip(),
        "kernel": subprocess.run(["uname", "-sr"], capture_output=True, text=True).stdout.strip(),
        "cpu": model,
        "clk_tck": CLK_TCK,
    }


def loadavg():
    with open("/proc/loadavg") as f:
        return " ".join(f.read().split()[:3])


NO_ANOMALIES = "None: every run returned every call, and every proxy exited cleanly."


def write_report(path, command, started, elapsed, info, rows, runs, idles, quick):
    notes = [f"- {n}" for n in info.get("set_notes", [])]
    for r in runs + idles:
        for n in r["notes"]:
            what = r.get("workload", f"idle x{r.get('count')}")
            notes.append(f"- {r['set']} / {r['target']} / {what} / round {r['round']}: {n}")
    idle_lines = []
    for i in idles:
        if "kib_per_conn" in i:
            idle_lines.append(
                f"| {i['target']} | {i['round']} | {i['answered']} | {i['open_seconds']:.1f} "
                f"| {i['rss_before_mib']:.1f} | {i['rss_held_mib']:.1f} "
                f"| {i['kib_per_conn']:.1f} |")
    m = info["machine"]
    v = info["versions"]
    busy_runs = sum(1 for r in runs if (r.get("other_cores") or 0) > OTHER_LOAD_FLAG)
    versions_text = f"portshare {v['portshare']}; "
    compared = ""
    if "baseline" in v:
        versions_text += f"baseline portshare {v['baseline']}; "
        against = baseline_table(rows)
        one_round = " One round: no median damps it." if info["rounds"] == 1 else ""
        if against:
            compared = f"""
## Against the baseline

Each portshare target against its `{BASE_SUFFIX}` peer of the same run (same configuration,
same rounds): the change of each median from the baseline's, in %: {build_of("portshare-l4")}
against {build_of("portshare-l4" + BASE_SUFFIX)}. Lower is better for latency and CPU, higher
for calls/s. CPU per call is the figure to trust (README.md, Caveats); differences under
10-20 % are within its noise.{one_round}

{against}
"""
    versions_text += f"{v['haproxy']}; {v['nginx']}; {v['h2load']}"
    backends_text = ", ".join(f"{name} {SET_BACKENDS[name]}" for name in info["calls"])
    calls_text = "; ".join(
        f"{set_name}: " + ", ".join(f"{w} {n:,}" for w, n in per.items())
        for set_name, per in info["calls"].items())
    text = f"""# portshare benchmark results

- command: `{command}`{' (quick mode: 1 round, fewer calls)' if quick else ''}
- date: {started} (took {elapsed / 60:.1f} min)
- machine: `nproc` = {m['nproc']}, kernel {m['kernel']}, {m['cpu']}; CLK_TCK {m['clk_tck']}
- load average before / after: {info['load_before']} / {info['load_after']}; runs during
  which other work kept more than {OTHER_LOAD_FLAG} of a core busy: {busy_runs} of {len(runs)}
  (listed under Anomalies; the 1x1 rows are the most sensitive to it); waited
  {info['waited_for_quiet_s']} s in all for the machine to go quiet before runs
- versions: {versions_text}
- workers: portshare 2 runtime threads (tokio default = cores), HAProxy `nbthread 2`,
  nginx `worker_processes 2`; backends per set: {backends_text}; h2load 1 thread (`-t 1`)
- rounds: {info['rounds']}, targets interleaved (order rotated per round); figures are
  medians over rounds, errors are summed over rounds; calls per run (h2load `-n`):
  {calls_text}

{table(rows)}
{reuseport_text(rows, runs)}
Columns: see [README.md](README.md#reading-the-table). "—": not a proxy (nothing to
measure). Spread: the share of calls each backend answered (busiest first), counted by the
backends themselves; for portshare also its own `/metrics` (h2: calls and pooled
connections per backend; l4: connections per backend).
{compared}
## Idle connections (bench_backend set, every round)

| target | round | held | seconds to open | RSS before MiB | RSS held MiB | KiB per connection |
|---|--:|--:|--:|--:|--:|--:|
{chr(10).join(idle_lines) if idle_lines else '| (none) | | | | | | |'}

## Anomalies

{chr(10).join(notes) if notes else NO_ANOMALIES}
"""
    with open(path, "w") as f:
        f.write(text)
    return text


# ---------------------------------------------------------------------------------------

def main():
    # --portshare and --bench-backend replace the binaries the harness runs.
    global PORTSHARE, PORTSHARE_REV, BENCH_BACKEND, BASELINE, BASELINE_REV
    # SIGTERM/SIGHUP unwind like Ctrl-C, so every `finally` stops its children.
    for sig in (signal.SIGTERM, signal.SIGHUP):
        signal.signal(sig, lambda signum, _frame: sys.exit(128 + signum))
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", default=os.environ.get("BENCH_QUICK") == "1",
                    help="1 round and a quarter of the calls (also BENCH_QUICK=1)")
    ap.add_argument("--rounds", type=int, default=None,
                    help="rounds over every target (default 3, quick 1)")
    ap.add_argument("--sets", default="bench_backend,python,python2",
                    help="comma-separated backend sets to run: bench_backend, python (4 "
                         "Python workers), python2 (2 of them; by default only "
                         f"{', '.join(SET_DEFAULT_TARGETS['python2'])})")
    ap.add_argument("--targets", default=None,
                    help=f"comma-separated targets (default: all but {HELPER_GROUP}; with "
                         f"a baseline also {', '.join(BASE_TARGETS)})")
    ap.add_argument("--workloads", default=None,
                    help="comma-separated loads to run (default: all: "
                         f"{', '.join(w[0] for w in WORKLOADS + TIMED_WORKLOADS)}; "
                         f"{', '.join(w[0] for w in TIMED_WORKLOADS)} for the SO_REUSEPORT "
                         "pair only)")
    ap.add_argument("--idle", type=int, default=5000, help="idle connections (0: skip)")
    ap.add_argument("--timeout", type=float, default=90.0,
                    help="seconds one h2load run may take before it counts as hung")
    ap.add_argument("--quiet-wait", type=float, default=10.0,
                    help="seconds to wait, before each run, for other work on the machine "
                         "to stop (0: never wait)")
    ap.add_argument("--quiet-budget", type=float, default=120.0,
                    help="total seconds all those waits may take")
    ap.add_argument("--portshare", default=PORTSHARE,
                    help="the portshare binary to measure (default: target/release/portshare)")
    ap.add_argument("--portshare-rev", default=None,
                    help="the commit --portshare was built from, for the report (run.sh's "
                         "BENCH_REV sets it)")
    ap.add_argument("--baseline-portshare", default=None, metavar="BIN",
                    help="a second portshare binary, measured side by side as the targets "
                         f"{', '.join(BASE_TARGETS)} (run.sh's BENCH_BASELINE sets it)")
    ap.add_argument("--baseline-rev", default=None, metavar="REV",
                    help="the commit --baseline-portshare was built from, for the report")
    ap.add_argument("--bench-backend", default=BENCH_BACKEND,
                    help="the bench_backend binary (default: target/release/examples/...)")
    ap.add_argument("--out", default=BENCH, help="where results.md/json and chart.svg go")
    ap.add_argument("--keep", action="store_true",
                    help="keep the temp dir (configs, proxy logs, worker logs) after success")
    ap.add_argument("--command", default="bench/run.sh",
                    help="the command to record in results.md (run.sh passes its own)")
    args = ap.parse_args()

    PORTSHARE = os.path.abspath(args.portshare)
    PORTSHARE_REV = args.portshare_rev
    BENCH_BACKEND = os.path.abspath(args.bench_backend)
    if args.baseline_rev and not args.baseline_portshare:
        ap.error("--baseline-rev needs --baseline-portshare")
    if args.baseline_portshare:
        BASELINE = os.path.abspath(args.baseline_portshare)
        BASELINE_REV = args.baseline_rev
        if not os.access(BASELINE, os.X_OK):
            ap.error(f"--baseline-portshare: {BASELINE} is not an executable")
    python = sys.executable  # the venv's: the workers need grpcio
    # HAProxy sizes its own descriptor limit from maxconn (about 2 per connection) and
    # refuses to start if it cannot; 5,000 idle l4 connections are 10,000 sockets in a
    # proxy. Children inherit this. Root may raise the hard limit too; others keep theirs.
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    for want in ((65536, max(hard, 65536)), (hard, hard)):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, want)
            break
        except (ValueError, OSError):
            continue
    rounds = args.rounds or (1 if args.quick else 3)
    scale = 0.25 if args.quick else 1.0
    known = ALL_TARGETS + [HELPER_GROUP] + (BASE_TARGETS if BASELINE else [])
    if args.targets is None:
        # Each baseline target right after its peer, so the two run close together in time.
        targets = []
        for t in ALL_TARGETS:
            targets += [t] + ([t + BASE_SUFFIX] if t + BASE_SUFFIX in known else [])
    else:
        targets = [t for t in args.targets.split(",") if t]
    for t in targets:
        if t in BASE_TARGETS and not BASELINE:
            sys.exit(f"target {t!r} needs a baseline: BENCH_BASELINE=<commit> for run.sh, "
                     f"--baseline-portshare for bench.py")
        if t not in known:
            sys.exit(f"unknown target {t!r}; known: {', '.join(known)}")
    every_load = [w[0] for w in WORKLOADS + TIMED_WORKLOADS]
    loads = every_load if args.workloads is None else [w for w in args.workloads.split(",") if w]
    for w in loads:
        if w not in every_load:
            sys.exit(f"unknown workload {w!r}; known: {', '.join(every_load)}")
    sets = [s for s in args.sets.split(",") if s]
    for s in sets:
        if s not in SET_BACKENDS:
            sys.exit(f"unknown set {s!r}; known: {', '.join(SET_BACKENDS)}")
    calls = {s: {w: max(int(n * scale), 64) for w, n in CALLS[s].items()} for s in sets}

    started_wall = datetime.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z")
    started = time.monotonic()
    info = {"machine": machine(), "versions": versions(), "load_before": loadavg(),
            "rounds": rounds, "calls": calls,
            "set_backends": {name: SET_BACKENDS[name] for name in sets}}
    log(f"{rounds} round(s); sets {sets}; targets {targets}; load average {info['load_before']}")

    tmp = tempfile.mkdtemp(prefix="portshare-bench-")
    reqfile = os.path.join(tmp, "request.bin")
    with open(reqfile, "wb") as f:
        f.write(REQUEST)
    log(f"configs, logs and per-request logs in {tmp}")

    width = max([13] + [len(t) for t in targets])  # of the target column in the progress log
    runs, idles, targets_by_set = [], [], []
    supervised_notes = info["set_notes"] = []
    quiet = Quiet(args.quiet_wait, args.quiet_budget)
    for set_name in sets:
        python_set = set_name != "bench_backend"
        set_targets = [t for t in targets if t not in PYTHON_ONLY or python_set]
        if args.targets is None and set_name in SET_DEFAULT_TARGETS:
            set_targets = [t for t in set_targets if t in SET_DEFAULT_TARGETS[set_name]]
        targets_by_set.append((set_name, set_targets))
        standing = {}
        unix_dir = None
        if any(t.endswith(UNIX_SUFFIX) for t in set_targets):
            unix_dir = os.path.join(tmp, f"sockets-{set_name}")
            os.makedirs(unix_dir, mode=0o700, exist_ok=True)
        if set_name == "bench_backend":
            bset = BenchBackends(tmp)
            if unix_dir:
                bset.unix = BenchBackends(tmp, unix_dir=unix_dir)
        else:
            n = SET_BACKENDS[set_name]
            bset = PythonWorkers(tmp, python, set_name, name=set_name, count=n)
            if unix_dir:
                bset.unix = PythonWorkers(tmp, python, f"{set_name}unix", unix_dir=unix_dir,
                                          name=set_name, count=n)
            if "reuseport" in set_targets:
                standing["reuseport"] = PythonWorkers(tmp, python, f"{set_name}reuseport",
                                                      reuseport=True, name=set_name, count=n)
            if HELPER_GROUP in set_targets:
                standing[HELPER_GROUP] = PythonWorkers(tmp, python, f"{set_name}helper",
                                                       name=set_name, count=n, helper=True)
            if SUPERVISED in set_targets:
                standing[SUPERVISED] = Supervised(tmp, python, n)
        log(f"{set_name}: backends on ports {bset.ports}"
            + (f", and on sockets {bset.unix.addrs}" if bset.unix else "")
            + "".join(f", {t} on {g.ports[0]}" for t, g in standing.items()))
        try:
            # First calls to a fresh grpcio server are slow (thread pool, lazy init); keep
            # them out of every target's numbers. (A shared port's warm-up reaches the
            # workers its connections happen to be hashed to; the runs' own warm-up the rest.)
            for p in bset.ports + [g.ports[0] for g in standing.values()]:
                h2load(p, 2 * WARMUP[set_name], 4, 4, reqfile, None, args.timeout)
            for rnd in range(1, rounds + 1):
                # Rotate the order each round so slow drift (thermal, other load on the
                # machine) does not always hit the same target.
                k = (rnd - 1) % len(set_targets)
                order = set_targets[k:] + set_targets[:k]
                for target in order:
                    timed = TIMED_WORKLOADS if target in PYTHON_ONLY else []
                    for workload in [w for w in WORKLOADS + timed if w[0] in loads]:
                        try:
                            r = measure(bset, standing, target, workload, rnd, tmp, reqfile,
                                        calls[set_name].get(workload[0], 0), WARMUP[set_name],
                                        args.timeout, quiet)
                        except (RuntimeError, OSError, ValueError) as e:
                            # A peer that will not start (bad config, port taken) is a
                            # result to report, not a reason to lose the other targets.
                            r = {"set": set_name, "target": target, "workload": workload[0],
                                 "round": rnd, "calls": 0, "failed": True,
                                 "notes": [f"run failed: {e}"]}
                        runs.append(r)
                        log(f"{set_name} r{rnd} {target:{width}} {workload[0]:5} "
                            f"{fmt(r.get('rps')):>9} calls/s  p50 {fmt(r.get('p50'), 2)} ms  "
                            f"p99 {fmt(r.get('p99'), 2)} ms  cpu/1k "
                            f"{fmt(r.get('cpu_ms_per_1k'), 1)} ms  backend cpu/1k "
                            f"{fmt(r.get('backend_cpu_ms_per_1k'), 1)} ms  "
                            f"errors {r.get('errors')}  "
                            f"spread {shares(r.get('backend_calls', []))}  "
                            f"other load {fmt(r.get('other_cores'), 2)} cores"
                            + (f"  NOTES: {r['notes']}" if r["notes"] else ""))
                if set_name == "bench_backend" and args.idle > 0:
                    for target in [t for t in order if t in IDLE_TARGETS]:
                        try:
                            i = measure_idle(bset, target, rnd, tmp, args.idle, python)
                        except (RuntimeError, OSError, ValueError) as e:
                            i = {"set": set_name, "target": target, "round": rnd,
                                 "count": args.idle, "notes": [f"idle test failed: {e}"]}
                        idles.append(i)
                        log(f"{set_name} r{rnd} {target:{width}} idle x{args.idle}: "
                            f"{fmt(i.get('kib_per_conn'), 1)} KiB/conn"
                            + (f"  NOTES: {i['notes']}" if i["notes"] else ""))
                if not bset.alive() or not all(g.alive() for g in standing.values()) \
                        or (bset.unix and not bset.unix.alive()):
                    raise RuntimeError(f"a {set_name} backend died; see {tmp}")
        finally:
            bset.stop()
            if bset.unix:
                bset.unix.stop()
            for g in standing.values():
                g.stop()
            if SUPERVISED in standing:
                bad = standing[SUPERVISED].warn_lines()
                if bad:
                    supervised_notes.append(f"{set_name}: {len(bad)} WARN/ERROR lines in "
                                            f"portshare-reuseport's log, first: {bad[0][:300]}")

    elapsed = time.monotonic() - started
    info["load_after"] = loadavg()
    info["waited_for_quiet_s"] = round(quiet.waited, 1)
    rows = summarize(runs, idles, targets_by_set)
    command = args.command
    for var in ("BENCH_BASELINE", "BENCH_REV", "BENCH_QUICK"):
        if os.environ.get(var):
            command = f"{var}={os.environ[var]} {command}"
    os.makedirs(args.out, exist_ok=True)
    text = write_report(os.path.join(args.out, "results.md"), command, started_wall, elapsed,
                        info, rows, runs, idles, args.quick)
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"info": info, "command": command, "date": started_wall, "rows": rows,
                   "runs": runs, "idle": idles}, f, indent=1, default=str)
    subprocess.run([python, os.path.join(BENCH, "chart.py"), os.path.join(args.out,
                    "results.json"), os.path.join(args.out, "chart.svg")], check=True)
    print(text)
    if args.keep:
        where = f"configs and logs kept in {tmp}"
    else:
        # Tens of MB of per-call logs per run; results.json holds every figure. (After a
        # failure the directory stays, for the logs.)
        shutil.rmtree(tmp, ignore_errors=True)
        where = "temp dir removed (--keep keeps it)"
    log(f"done in {elapsed / 60:.1f} min: {args.out}/results.md, results.json, chart.svg; "
        f"{where}")


if __name__ == "__main__":
    main()
