#!/usr/bin/env bash
# portshare's benchmark: portshare (l4 and h2) against HAProxy, nginx, a direct connection and
# Linux SO_REUSEPORT, with h2load sending real gRPC unary calls. One command does it all:
#
#   bench/run.sh                  # full run: 3 rounds (about 25 minutes on 2 cores)
#   BENCH_QUICK=1 bench/run.sh    # 1 round, a quarter of the calls (a few minutes)
#   BENCH_REV=HEAD bench/run.sh   # measure a commit's portshare, not the working tree's
#   BENCH_BASELINE=HEAD~1 bench/run.sh  # also measure that commit's portshare, side by side
#   bench/run.sh --help           # the harness's own options (sets, targets, ...)
#
# BENCH_BASELINE=<commit> adds the targets portshare-l4@base and portshare-h2@base: that
# commit's portshare (built like BENCH_REV's, each commit keeping its own binary), run with
# the same configuration in the same interleaved rounds, so a change is checked for
# regressions against peers of the same run. It combines with BENCH_REV (which sets the
# build under test; otherwise that is the working tree's). For example:
#   BENCH_REV=HEAD BENCH_BASELINE=HEAD~1 bench/run.sh --sets bench_backend \
#       --targets portshare-l4,portshare-h2,portshare-l4@base,portshare-h2@base
#
# Writes bench/results.md (the table, also printed), bench/results.json and bench/chart.svg.
# Not part of `cargo test`: it takes minutes and needs root for apt-get. See bench/README.md.
set -euo pipefail
cd "$(dirname "$0")/.."

log() { echo "[bench/run.sh] $*" >&2; }

# Help needs nothing installed or built.
case "${1:-}" in -h | --help) exec "${PYTHON:-python3}" bench/bench.py --help ;; esac

# 1. Tools, from Debian's packages. The nginx stream module is a separate package there.
missing=()
command -v h2load >/dev/null || missing+=(nghttp2-client)
command -v haproxy >/dev/null || missing+=(haproxy)
command -v nginx >/dev/null || missing+=(nginx)
[ -e /usr/lib/nginx/modules/ngx_stream_module.so ] || missing+=(libnginx-mod-stream)
if [ ${#missing[@]} -gt 0 ]; then
    log "installing ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    # The package lists may be missing or stale on a fresh machine: update once, only if needed.
    if ! apt-get install -y -qq "${missing[@]}" >/dev/null; then
        apt-get update -qq
        apt-get install -y -qq "${missing[@]}" >/dev/null
    fi
fi

# 2. The binaries under test, optimized: a debug build would measure the wrong thing.
#    BENCH_REV=<commit>: measure that commit's portshare instead of the working tree's (which
#    may hold someone's half-done edits), built from `git archive` in directories of its
#    own, so neither the working tree's sources nor target/release are used or touched. The
#    harness's bench_backend is this checkout's, copied in (it may be newer than the commit).
#    BENCH_BASELINE=<commit>: a second portshare, built the same way, measured as the
#    `@base` targets. Both builds share one CARGO_TARGET_DIR (the dependencies compile once)
#    and each commit's binary is copied to target/bench-build/bin/<commit>/, so neither
#    build overwrites the other's.
build_dir=target/bench-build
# build_rev SPEC VAR [EXTRA CARGO ARGS]: builds portshare at commit SPEC (named by VAR in
# the log) from `git archive`; sets $built_rev (the short hash) and $built_bin (its copy).
build_rev() {
    local spec=$1 var=$2 src
    shift 2
    built_rev=$(git rev-parse --short "$spec^{commit}")
    src="target/bench-src/$built_rev"
    if [ ! -f "$src/Cargo.toml" ]; then
        rm -rf "$src"
        mkdir -p "$src"
        git archive "$built_rev" | tar -x -C "$src"
    fi
    mkdir -p "$src/examples"
    cp examples/bench_backend.rs "$src/examples/bench_backend.rs"
    log "building portshare at $built_rev ($var=$spec)${*:+ and bench_backend} (release)"
    # Removed first, so that a copy can only be of the binary this build put there.
    rm -f "$build_dir/release/portshare"
    CARGO_TARGET_DIR=$build_dir cargo build --release --quiet \
        --manifest-path "$src/Cargo.toml" --bin portshare "$@"
    built_bin="$build_dir/bin/$built_rev/portshare"
    mkdir -p "$(dirname "$built_bin")"
    cp "$build_dir/release/portshare" "$built_bin.tmp"
    mv -f "$built_bin.tmp" "$built_bin"
}
extra=()
if [ -n "${BENCH_REV:-}" ]; then
    build_rev "$BENCH_REV" BENCH_REV --example bench_backend
    extra=(--portshare "$built_bin" --portshare-rev "$built_rev"
        --bench-backend "$build_dir/release/examples/bench_backend")
else
    log "building portshare and the bench_backend example (release)"
    cargo build --release --quiet --bin portshare --example bench_backend
fi
if [ -n "${BENCH_BASELINE:-}" ]; then
    build_rev "$BENCH_BASELINE" BENCH_BASELINE
    extra+=(--baseline-portshare "$built_bin" --baseline-rev "$built_rev")
fi

# 3. The Python venv for the grpcio workers: the same one, made the same way, as the tests'
#    (tests/support/mod.rs), so `cargo test` and this share it instead of fighting over it.
#    Their lock (flock on target/tmp/pyenv.lock) keeps a concurrent `cargo test` from
#    rebuilding it under our feet.
venv=target/tmp/pyenv
requirements=tests/python/requirements.txt
mkdir -p target/tmp
exec 9>target/tmp/pyenv.lock
flock 9
if ! cmp -s "$requirements" "$venv/requirements.installed" 2>/dev/null; then
    log "creating the Python venv in $venv (once)"
    rm -rf "$venv"
    "${PYTHON:-python3}" -m venv "$venv"
    "$venv/bin/python" -m pip install --quiet --disable-pip-version-check -r "$requirements"
    cp "$requirements" "$venv/requirements.installed"
fi
flock -u 9
exec 9>&-

# 4. File descriptors: 5,000 idle connections through an l4 proxy are 10,000 sockets in the
#    proxy, and every child inherits this limit. As root the hard limit can be raised too.
ulimit -n 65536 2>/dev/null || ulimit -n "$(ulimit -Hn)"

# 5. The harness itself (standard library only; run by the venv's Python, which the workers
#    need anyway).
exec "$venv/bin/python" bench/bench.py --command "bench/run.sh${*:+ $*}" "${extra[@]}" "$@"
