#!/usr/bin/env bash
# portshare's main job, for real: build it, install what the Python workers need (a venv
# under target/), start 4 Python gRPC workers on their own ports, put portshare in front of
# them, and run a client whose calls visibly spread over the workers.
#
#   examples/demo.sh            # proxy on 127.0.0.1:21051, workers on 21052-21055
#   DEMO_PORT=23051 examples/demo.sh
#
# Ports stay below 32768 so they never collide with the kernel's outgoing (ephemeral) ports.
set -euo pipefail
cd "$(dirname "$0")/.."

port=${DEMO_PORT:-21051}
workers=4
first=$((port + 1))
last=$((port + workers))
admin=$((port - 1))
venv=target/demo-venv
pids=()

cleanup() {
    # SIGTERM: portshare drains, the workers stop gracefully.
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
}
trap cleanup EXIT INT TERM

echo "== building portshare (release)"
cargo build --release --quiet

echo "== installing the Python gRPC packages the workers need (once, into $venv)"
requirements=examples/python/requirements.txt
if ! cmp -s "$requirements" "$venv/requirements.installed" 2>/dev/null; then
    rm -rf "$venv"
    python3 -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$venv/requirements.installed"
fi
py="$venv/bin/python"

echo "== starting $workers Python gRPC workers on ports $first-$last"
for p in $(seq "$first" "$last"); do
    "$py" examples/python/server.py --port "$p" &
    pids+=($!)
done

wait_for_port() { # bounded: 30 s
    for _ in $(seq 300); do
        if "$py" -c "import socket; socket.create_connection(('127.0.0.1', $1), 0.2)" 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "nothing listens on port $1 after 30 s" >&2
    exit 1
}
for p in $(seq "$first" "$last"); do wait_for_port "$p"; done

echo "== starting portshare on 127.0.0.1:$port (admin on 127.0.0.1:$admin)"
target/release/portshare --listen "127.0.0.1:$port" --backend "127.0.0.1:$first-$last" \
    --admin "127.0.0.1:$admin" &
pids+=($!)
wait_for_port "$admin"

echo "== 40 calls, each on a new client connection, through portshare"
"$py" examples/python/client.py --target "127.0.0.1:$port" --calls 40

echo "== what portshare counted (portshare_backend_connections_total on its admin /metrics)"
"$py" - "$admin" <<'PY'
import re, sys, urllib.request
with urllib.request.urlopen(f"http://127.0.0.1:{sys.argv[1]}/metrics", timeout=5) as r:
    text = r.read().decode()
for backend, n in sorted(re.findall(r'^portshare_backend_connections_total\{backend="([^"]+)"\} (\S+)$', text, re.M)):
    print(f"  {backend:<18} {int(float(n)):>3} connections")
PY
echo "== done; stopping portshare and the workers"
