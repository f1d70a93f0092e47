#!/usr/bin/env bash
# A throwaway PostgreSQL cluster for tests and benchmarks.
#   scripts/pg_cluster.sh install          install Debian's postgresql if no server binaries are found
#   scripts/pg_cluster.sh start DIR [PORT] initdb DIR, start a server on 127.0.0.1:PORT (default: a
#                                          free port); prints its URL
#   scripts/pg_cluster.sh stop DIR         stop it (DIR can then be removed)
# As root, the server runs as the 'postgres' user (initdb refuses root).
set -euo pipefail

pg_bindir() {
    local d
    for d in "$(dirname "$(command -v pg_ctl 2>/dev/null || echo /nonexistent/x)")" \
             $(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -rV); do
        if [ -x "$d/initdb" ] && [ -x "$d/pg_ctl" ]; then
            dirname "$(readlink -f "$d/pg_ctl")"  # the real bin directory, with psql beside it
            return 0
        fi
    done
    return 1
}

as_pg() {
    if [ "$(id -u)" = 0 ]; then
        runuser -u postgres -- "$@"
    else
        "$@"
    fi
}

case "${1:-}" in
install)
    if pg_bindir >/dev/null; then
        exit 0
    fi
    sudo=""
    [ "$(id -u)" = 0 ] || sudo="sudo"
    $sudo apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq postgresql >/dev/null
    pg_bindir >/dev/null
    ;;
start)
    dir=$2
    port=${3:-$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
    bin=$(pg_bindir) || { echo "no PostgreSQL server binaries (run: $0 install)" >&2; exit 1; }
    mkdir -p "$dir"
    dir=$(readlink -f "$dir")
    if [ "$(id -u)" = 0 ]; then
        id postgres >/dev/null 2>&1 || useradd --system --no-create-home postgres
        chown postgres "$dir"
    fi
    as_pg "$bin/initdb" -D "$dir/data" -A trust -U evomerge --no-sync -E UTF8 >"$dir/initdb.log" 2>&1 \
        || { cat "$dir/initdb.log" >&2; exit 1; }
    as_pg "$bin/pg_ctl" -D "$dir/data" -l "$dir/server.log" -w -t 60 \
        -o "-p $port -k $dir -c listen_addresses=127.0.0.1 -c fsync=off -c max_connections=200" start >/dev/null \
        || { cat "$dir/server.log" >&2; exit 1; }
    as_pg "$bin/psql" -q -h 127.0.0.1 -p "$port" -U evomerge -d postgres -c "CREATE DATABASE evomerge" >/dev/null
    echo "postgresql+psycopg2://evomerge@127.0.0.1:$port/evomerge"
    ;;
stop)
    dir=$2
    bin=$(pg_bindir)
    if [ -d "$dir/data" ]; then
        as_pg "$bin/pg_ctl" -D "$dir/data" -m fast -w stop >/dev/null || true
    fi
    ;;
*)
    echo "usage: $0 install | start DIR [PORT] | stop DIR" >&2
    exit 2
    ;;
esac
