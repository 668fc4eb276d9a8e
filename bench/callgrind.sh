#!/usr/bin/env bash
# Instructions per call through portshare, counted by valgrind's callgrind: repeatable to a
# fraction of a percent whatever else the machine does (unlike calls/s or CPU time), so a
# change to the call path can be judged in a minute, on a busy machine too.
#
#   bench/callgrind.sh [BINARY] [MODE] [CALLS] [STREAMS]
#   bench/callgrind.sh target/release/portshare h2 20000 32     # the defaults
#   CG_OUT=/tmp/h2.cg bench/callgrind.sh ...                   # keep the profile, then:
#   callgrind_annotate --inclusive=yes /tmp/h2.cg | head -60
#
# One bench_backend (examples/), one h2load client connection with STREAMS calls in flight,
# CALLS unary calls; prints the process's instructions divided by the calls (start-up and
# the health checks of a few seconds are included: a few hundred instructions per call).
# Needs valgrind and h2load (Debian: valgrind, nghttp2-client); builds what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."

bin=${1:-target/release/portshare}
mode=${2:-h2}
calls=${3:-20000}
streams=${4:-32}
for tool in valgrind h2load; do
    command -v "$tool" >/dev/null || { echo "bench/callgrind.sh: $tool is missing" >&2; exit 1; }
done
[ -x "$bin" ] || cargo build --release --quiet --bin portshare
backend=target/release/examples/bench_backend
[ -x "$backend" ] || cargo build --release --quiet --example bench_backend

work=$(mktemp -d)
trap 'kill "${backend_pid:-}" "${proxy_pid:-}" 2>/dev/null || true; rm -rf "$work"' EXIT
# One gRPC message: EchoRequest { payload: "hello" }.
printf '\x00\x00\x00\x00\x07\x0a\x05hello' >"$work/request"

mkfifo "$work/backend.out"
# Its stdin stays open (end of stdin stops it) and empty.
tail -f /dev/null | "$backend" --port 0 >"$work/backend.out" &
backend_pid=$!
read -r line <"$work/backend.out"
backend_port=${line#PORT }

free_port() { python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])'; }
port=$(free_port)
profile=${CG_OUT:-$work/callgrind.out}
valgrind --tool=callgrind --callgrind-out-file="$profile" "$bin" --listen "127.0.0.1:$port" \
    --mode "$mode" --backend "127.0.0.1:$backend_port" >"$work/proxy.log" 2>&1 &
proxy_pid=$!
for _ in $(seq 1 300); do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then break; fi
    sleep 0.1
done
h2load -n "$calls" -c 1 -m "$streams" -H 'content-type: application/grpc' -H 'te: trailers' \
    -d "$work/request" "http://127.0.0.1:$port/portshare.test.Echo/Unary" | grep -E '^requests:'
kill -TERM "$proxy_pid"
wait "$proxy_pid" || true
proxy_pid=
total=$(awk '/^summary:/ {print $2}' "$profile")
echo "$bin $mode ${calls} calls x${streams}: $((total / calls)) instructions per call ($total in all)"
