#!/usr/bin/env bash
# Runs every test of the workspace on a fresh Debian/Ubuntu machine.
#
# The integration tests start throwaway Postgres servers (initdb/postgres) and Redis servers
# (redis-server); this installs the Debian packages when those programs are missing, then runs
# `cargo test` for the whole workspace, the JavaScript client's tests against the binary that
# built (clients/js: npm ci && npm test), the offline checks of the deployment files
# (deploy/validate.sh), a short fuzz run (fuzz/run.sh) and the benchmark suite's smoke run
# (scripts/bench.sh --smoke). It fails when any step fails.
set -euo pipefail
cd "$(dirname "$0")/.."

# Debian puts the Postgres server programs outside PATH, under /usr/lib/postgresql/VERSION/bin.
postgres_bin_dir() {
    local dir
    for dir in $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V -r); do
        if [ -x "$dir/initdb" ] && [ -x "$dir/postgres" ]; then
            echo "$dir"
            return 0
        fi
    done
    return 1
}

have_postgres() {
    { command -v initdb && command -v postgres; } >/dev/null 2>&1 || postgres_bin_dir >/dev/null
}

missing=()
have_postgres || missing+=(postgresql)
command -v redis-server >/dev/null 2>&1 || missing+=(redis-server)
# The token tests (server/tests/auth.rs) generate RSA and EC keys with it.
command -v openssl >/dev/null 2>&1 || missing+=(openssl)
# libfuzzer-sys (fuzz/run.sh) compiles libFuzzer's C++ sources.
command -v c++ >/dev/null 2>&1 || missing+=(g++)
# deploy/validate.sh checks the nginx configuration with `nginx -t` (Debian's is /usr/sbin/nginx,
# outside a non-root PATH) and installs its Python validators into a virtualenv (ensurepip).
{ command -v nginx || [ -x /usr/sbin/nginx ]; } >/dev/null 2>&1 || missing+=(nginx)
python3 -c 'import ensurepip, venv' >/dev/null 2>&1 || missing+=(python3-venv)
# The JavaScript client's tests (clients/js); Debian's nodejs (18 on bookworm) is enough.
command -v node >/dev/null 2>&1 || missing+=(nodejs npm)
# The demo page's browser test (e2e/) drives Debian's Chromium.
[ -x /usr/bin/chromium ] || missing+=(chromium)

if [ "${#missing[@]}" -gt 0 ]; then
    echo "scripts/test.sh: installing ${missing[*]}" >&2
    sudo=()
    if [ "$(id -u)" -ne 0 ]; then
        sudo=(sudo)
    fi
    "${sudo[@]}" apt-get update
    "${sudo[@]}" env DEBIAN_FRONTEND=noninteractive \
        apt-get install -y --no-install-recommends "${missing[@]}"
fi

# Make initdb/postgres findable on PATH when they only exist under /usr/lib/postgresql.
if ! command -v initdb >/dev/null 2>&1; then
    if dir="$(postgres_bin_dir)"; then
        export PATH="$PATH:$dir"
    fi
fi

cargo test --workspace --locked

# The JavaScript client library against real nodes of the debug binary just built
# (target/debug/seqcast): single SQLite nodes, and a 3-node cluster with Postgres, Redis and
# nginx (deploy/local/cluster.sh) whose nodes are killed and drained mid-stream.
(cd clients/js && npm ci --no-audit --no-fund && npm test)

# The demo page at / in a real browser (Chromium through playwright-core) against a 2-node cluster;
# screenshots in e2e/artifacts/.
(cd e2e && npm ci --no-audit --no-fund && npm test)

# The deployment files (Dockerfile, docker-compose.yml, deploy/nginx, deploy/k8s), checked offline:
# schemas, `nginx -t`, documented settings, existing subcommands (deploy/validate.sh).
bash deploy/validate.sh

# The fuzz smoke run: both libFuzzer targets, 15 s each, on the stable toolchain (fuzz/run.sh).
bash fuzz/run.sh 15

# The benchmark smoke run: every loadtest scenario for seconds against a throwaway 2-node cluster
# (its own Postgres and Redis); fails on any lost, duplicate or out-of-order message, never on
# timing (scripts/bench.sh, docs/benchmarks.md).
bash scripts/bench.sh --smoke
