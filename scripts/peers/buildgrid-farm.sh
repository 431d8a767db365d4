# shellcheck shell=bash
# A small build farm on one machine: BuildGrid 0.9.1 (CAS, ActionCache, Execution, Bots)
# with its job state in a private PostgreSQL 15 cluster on 127.0.0.1, and N casfs workers
# attached to its Bots service. Everything lives under one folder and listens on loopback.
#
#   source scripts/peers/buildgrid-farm.sh
#   farm_start DIR 2            # PostgreSQL, BuildGrid, 2 workers; exports FARM_URL
#   bazel build --remote_executor="$FARM_URL" ...
#   farm_worker_kill w1         # SIGKILL one worker;  farm_worker_start w1  brings it back
#   farm_bgd_restart            # restart BuildGrid (the database survives)
#   farm_stop                   # workers (drained), BuildGrid, PostgreSQL; DIR stays
#
# Environment knobs:
#   CASFS                     casfs binary (default: <repo>/target/release/casfs)
#   FARM_KEEPALIVE            BuildGrid's bot-session-keepalive-timeout in seconds (default 10;
#                             a killed worker's leases are re-queued after about this long)
#   FARM_WORKER_ARGS          extra arguments for every `casfs worker` (e.g. "--concurrency 2")
#   FARM_PG_BIN               PostgreSQL binaries (default /usr/lib/postgresql/15/bin)
#   FARM_PG_USER              user that owns the cluster when running as root (default postgres)
# BuildGrid itself comes from scripts/peers/buildgrid.sh (a cached venv under ~/.cache).

_FARM_SH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
_FARM_ROOT="$(cd "$_FARM_SH_DIR/../.." && pwd)"
# shellcheck source=scripts/peers/buildgrid.sh
source "$_FARM_SH_DIR/buildgrid.sh"

FARM_PG_BIN="${FARM_PG_BIN:-/usr/lib/postgresql/15/bin}"
FARM_KEEPALIVE="${FARM_KEEPALIVE:-10}"
FARM_CONFIG_TEMPLATE="${FARM_CONFIG_TEMPLATE:-$_FARM_ROOT/tests/peers/buildgrid-farm.yml}"
declare -gA FARM_WORKER_PIDS=() FARM_WORKER_METRICS=()

_farm_free_port() {
    python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1]); s.close()'
}

_farm_port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

# Runs a PostgreSQL tool as the cluster's owner (initdb refuses to run as root).
_farm_pg() {
    if [ "$(id -u)" -eq 0 ]; then
        runuser -u "${FARM_PG_USER:-postgres}" -- "$@"
    else
        "$@"
    fi
}

# farm_pg_start DIR: a fresh cluster in DIR/pg on a free port; exports FARM_DB. As root the
# cluster belongs to FARM_PG_USER; when that user cannot reach DIR, the cluster goes to a
# folder of its own under /tmp (DIR/pg links to it; farm_pg_stop removes it).
farm_pg_start() {
    local dir="$1" port pgdir
    [ -x "$FARM_PG_BIN/initdb" ] || { echo "farm: no PostgreSQL in $FARM_PG_BIN (apt-get install postgresql-15)" >&2; return 1; }
    mkdir -p "$dir" || return 1
    dir="$(cd "$dir" && pwd)"
    pgdir="$dir/pg"
    FARM_PG_OWN_TMP=""
    if [ "$(id -u)" -eq 0 ]; then
        local user="${FARM_PG_USER:-postgres}"
        id -u "$user" >/dev/null 2>&1 || { echo "farm: user $user missing (set FARM_PG_USER)" >&2; return 1; }
        if ! runuser -u "$user" -- test -x "$dir"; then
            pgdir="$(mktemp -d /tmp/casfs-farm-pg.XXXXXX)" || return 1
            FARM_PG_OWN_TMP="$pgdir"
            ln -sfn "$pgdir" "$dir/pg"
        fi
        mkdir -p "$pgdir" && chown "$user" "$pgdir" && chmod 700 "$pgdir" || return 1
    fi
    _farm_pg "$FARM_PG_BIN/initdb" -D "$pgdir" -U bgd --auth=trust -E UTF8 --no-sync >"$dir/pg-init.log" 2>&1 \
        || { cat "$dir/pg-init.log" >&2; return 1; }
    port="$(_farm_free_port)"
    _farm_pg "$FARM_PG_BIN/pg_ctl" -D "$pgdir" -l "$pgdir/server.log" -w -t 60 \
        -o "-c listen_addresses=127.0.0.1 -p $port -k $pgdir -c fsync=off -c max_connections=200" start >/dev/null \
        || { tail -n 20 "$pgdir/server.log" >&2; return 1; }
    FARM_PG_DIR="$pgdir"
    _farm_pg "$FARM_PG_BIN/createdb" -h 127.0.0.1 -p "$port" -U bgd bgd || { farm_pg_stop; return 1; }
    export FARM_PG_DIR FARM_PG_OWN_TMP FARM_DB="postgresql://bgd@127.0.0.1:$port/bgd"
}

farm_pg_stop() {
    [ -n "${FARM_PG_DIR:-}" ] || return 0
    _farm_pg "$FARM_PG_BIN/pg_ctl" -D "$FARM_PG_DIR" -m fast -w -t 30 stop >/dev/null 2>&1 || true
    if [ -n "${FARM_PG_OWN_TMP:-}" ]; then
        rm -rf "$FARM_PG_OWN_TMP"
        unset FARM_PG_OWN_TMP
    fi
    unset FARM_PG_DIR
}

# farm_bgd_start DIR [PORT]: migrates the database, writes DIR/bgd/bgd.yml, starts
# BuildGrid; exports FARM_BGD_PID and FARM_URL (grpc://127.0.0.1:PORT).
farm_bgd_start() {
    local dir="$1" port="${2:-${FARM_BGD_PORT:-}}" i
    [ -n "${BGD:-}" ] && [ -x "$BGD" ] || buildgrid_install || return 1
    [ -n "$port" ] || port="$(_farm_free_port)"
    mkdir -p "$dir/bgd/cas" || return 1
    dir="$(cd "$dir" && pwd)"
    if [ ! -f "$dir/bgd/.migrated" ]; then
        "$BGD" migrate apply "$FARM_DB" >"$dir/bgd/migrate.log" 2>&1 || { cat "$dir/bgd/migrate.log" >&2; return 1; }
        touch "$dir/bgd/.migrated"
    fi
    sed -e "s|@PORT@|$port|g" -e "s|@DATADIR@|$dir/bgd|g" -e "s|@DB@|$FARM_DB|g" \
        -e "s|@KEEPALIVE@|$FARM_KEEPALIVE|g" "$FARM_CONFIG_TEMPLATE" >"$dir/bgd/bgd.yml" || return 1
    # Its own session: a Ctrl-C meant for the calling script must not stop BuildGrid before
    # the workers have drained (farm_stop does things in order).
    setsid "$BGD" server start -v "$dir/bgd/bgd.yml" >>"$dir/bgd/bgd.log" 2>&1 &
    FARM_BGD_PID=$!
    FARM_BGD_PORT="$port"
    FARM_DIR="$dir"
    export FARM_BGD_PID FARM_BGD_PORT FARM_DIR FARM_URL="grpc://127.0.0.1:$port"
    for i in $(seq 1 600); do
        if ! kill -0 "$FARM_BGD_PID" 2>/dev/null; then
            echo "farm: BuildGrid exited during startup; $dir/bgd/bgd.log:" >&2
            tail -n 30 "$dir/bgd/bgd.log" >&2
            return 1
        fi
        _farm_port_open "$port" && return 0
        sleep 0.1
    done
    echo "farm: BuildGrid not listening on $port after 60 s" >&2
    return 1
}

farm_bgd_stop() {
    local pid="${FARM_BGD_PID:-}" i
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    unset FARM_BGD_PID
    return 0
}

# farm_bgd_restart: stop BuildGrid and start it again on the same port and database.
farm_bgd_restart() {
    farm_bgd_stop
    farm_bgd_start "$FARM_DIR" "$FARM_BGD_PORT"
}

# farm_metrics NAME: a worker's Prometheus text.
farm_metrics() {
    local port="${FARM_WORKER_METRICS[$1]:-}"
    [ -n "$port" ] || return 1
    exec 3<>"/dev/tcp/127.0.0.1/$port" || return 1
    printf 'GET /metrics HTTP/1.0\r\n\r\n' >&3
    sed -n '/^\r\{0,1\}$/,$p' <&3 | tail -n +2
    exec 3<&-
}

# farm_metric NAME METRIC: one value. A worker that does not answer or does not export
# METRIC is a failure (status 1, nothing printed): never a silent 0.
farm_metric() {
    local v
    if ! v="$(farm_metrics "$1" 2>/dev/null | awk -v m="$2" '$1 == m { print $2; found = 1 } END { exit !found }')"; then
        echo "farm_metric: worker $1 exports no $2" >&2
        return 1
    fi
    echo "$v"
}

# farm_worker_start NAME [ARGS...]: starts `casfs worker` with its own work folder, blob
# cache and metrics port under DIR/workers/NAME, and waits until it holds a session.
farm_worker_start() {
    local name="$1" i
    shift
    local wdir="$FARM_DIR/workers/$name" port
    mkdir -p "$wdir" || return 1
    port="${FARM_WORKER_METRICS[$name]:-$(_farm_free_port)}"
    local casfs="${CASFS:-$_FARM_ROOT/target/release/casfs}"
    # shellcheck disable=SC2086
    CASFS_LOG="${CASFS_LOG:-info}" setsid "$casfs" worker --scheduler "$FARM_URL" \
        --bot-id "farm-$name" --work-dir "$wdir/work" --cache-dir "$wdir/cache" \
        --metrics-listen "127.0.0.1:$port" ${FARM_WORKER_ARGS:-} "$@" \
        >>"$wdir/worker.log" 2>&1 &
    FARM_WORKER_PIDS[$name]=$!
    FARM_WORKER_METRICS[$name]=$port
    for i in $(seq 1 300); do
        if ! kill -0 "${FARM_WORKER_PIDS[$name]}" 2>/dev/null; then
            echo "farm: worker $name exited; $wdir/worker.log:" >&2
            tail -n 20 "$wdir/worker.log" >&2
            return 1
        fi
        [ "$(farm_metric "$name" casfs_worker_connected 2>/dev/null)" = 1 ] && return 0
        sleep 0.1
    done
    echo "farm: worker $name did not attach within 30 s" >&2
    return 1
}

# farm_worker_stop NAME: SIGTERM (drain: running actions finish), then a second SIGTERM
# after 60 s, then SIGKILL.
farm_worker_stop() {
    local pid="${FARM_WORKER_PIDS[$1]:-}" i
    [ -n "$pid" ] || return 0
    kill -TERM "$pid" 2>/dev/null || true
    for i in $(seq 1 600); do
        kill -0 "$pid" 2>/dev/null || break
        if [ "$i" = 600 ]; then kill -TERM "$pid" 2>/dev/null || true; fi
        sleep 0.1
    done
    for i in $(seq 1 100); do
        kill -0 "$pid" 2>/dev/null || break
        sleep 0.1
    done
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    unset "FARM_WORKER_PIDS[$1]"
    return 0
}

# farm_worker_kill NAME: SIGKILL, as a crash would.
farm_worker_kill() {
    local pid="${FARM_WORKER_PIDS[$1]:-}"
    [ -n "$pid" ] || return 0
    kill -KILL "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    unset "FARM_WORKER_PIDS[$1]"
    return 0
}

# farm_start DIR N: PostgreSQL, BuildGrid and N workers (w1..wN).
farm_start() {
    local dir="$1" n="${2:-2}" i
    mkdir -p "$dir" || return 1
    dir="$(cd "$dir" && pwd)"
    farm_pg_start "$dir" || return 1
    farm_bgd_start "$dir" || return 1
    for i in $(seq 1 "$n"); do
        farm_worker_start "w$i" || return 1
    done
}

# farm_stop: workers, BuildGrid, PostgreSQL (each only if this shell started it).
# Like every function here, safe under `set -e`.
farm_stop() {
    local name
    for name in "${!FARM_WORKER_PIDS[@]}"; do
        farm_worker_stop "$name"
    done
    farm_bgd_stop
    farm_pg_stop
}
