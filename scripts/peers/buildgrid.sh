# shellcheck shell=bash
# BuildGrid cache-only peer (CAS + ByteStream + ActionCache + Capabilities).
# No execution service and no PostgreSQL.
#
#   source scripts/peers/buildgrid.sh
#   buildgrid_install                      # sets/exports BGD
#   buildgrid_start_cas 50051 /tmp/bgdata  # exports BUILDGRID_PID, BUILDGRID_REMOTE
#   "$BGD" cas --remote "$BUILDGRID_REMOTE" upload-dir some/dir
#   buildgrid_stop
#
# Environment knobs:
#   CASFS_PEER_CACHE   cache for the venv (default: $HOME/.cache/casfs-peers)
#   BUILDGRID_VERSION  default 0.9.1 with Python >= 3.13, else 0.4.4
#   BUILDGRID_PYTHON   interpreter for the venv (default: pyenv 3.13.x, else /usr/bin/python3)

# BuildGrid 0.9.x needs Python >= 3.13 (the image's pyenv has it); a plain Debian 12 has
# 3.11, where pip resolves 0.4.4, which serves the same cache-only config.
# peer_venv comes from the shared install library.
# shellcheck source=scripts/lib/install.sh
declare -F peer_venv >/dev/null || source "$(dirname "${BASH_SOURCE[0]}")/../lib/install.sh"

if [ -z "${BUILDGRID_PYTHON:-}" ]; then
    for _py in "$HOME"/.pyenv/versions/3.13*/bin/python3; do
        [ -x "$_py" ] && BUILDGRID_PYTHON="$_py"
    done
fi
if [ -n "${BUILDGRID_PYTHON:-}" ]; then
    BUILDGRID_VERSION="${BUILDGRID_VERSION:-0.9.1}"
else
    BUILDGRID_PYTHON=/usr/bin/python3
    BUILDGRID_VERSION="${BUILDGRID_VERSION:-0.4.4}"
fi
_BUILDGRID_SH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BUILDGRID_CONFIG_TEMPLATE="${BUILDGRID_CONFIG_TEMPLATE:-$_BUILDGRID_SH_DIR/../../tests/peers/buildgrid-cas.yml}"

buildgrid_install() {
    local cache="${CASFS_PEER_CACHE:-$HOME/.cache/casfs-peers}"
    local venv="$cache/buildgrid-$BUILDGRID_VERSION"

    # No apt packages are needed: buildgrid and all its deps ship as wheels.
    if [ ! -f "$venv/.casfs-installed" ] || [ ! -x "$venv/bin/bgd" ]; then
        peer_venv buildgrid_install "$BUILDGRID_PYTHON" "$venv" "buildgrid==$BUILDGRID_VERSION" || return 1
    fi
    BGD="$venv/bin/bgd"
    export BGD
}

# buildgrid_start_cas PORT DATADIR
buildgrid_start_cas() {
    local port="$1" datadir="$2"
    if [ -z "$port" ] || [ -z "$datadir" ]; then
        echo "usage: buildgrid_start_cas PORT DATADIR" >&2
        return 2
    fi
    if [ -n "${BUILDGRID_PID:-}" ] && kill -0 "$BUILDGRID_PID" 2>/dev/null; then
        echo "buildgrid_start_cas: already running (pid $BUILDGRID_PID); call buildgrid_stop first" >&2
        return 1
    fi
    [ -n "${BGD:-}" ] && [ -x "$BGD" ] || buildgrid_install || return 1

    mkdir -p "$datadir/cas" || return 1
    datadir="$(cd "$datadir" && pwd)"
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
        echo "buildgrid_start_cas: 127.0.0.1:$port is already in use" >&2
        return 1
    fi

    local cfg="$datadir/bgd.yml"
    sed -e "s|@PORT@|$port|g" -e "s|@DATADIR@|$datadir|g" "$BUILDGRID_CONFIG_TEMPLATE" > "$cfg" || return 1

    "$BGD" server start "$cfg" > "$datadir/bgd.log" 2>&1 &
    BUILDGRID_PID=$!
    export BUILDGRID_PID
    export BUILDGRID_REMOTE="http://127.0.0.1:$port"

    local i
    for i in $(seq 1 600); do   # 600 * 0.1s = 60s
        if ! kill -0 "$BUILDGRID_PID" 2>/dev/null; then
            echo "buildgrid_start_cas: bgd exited during startup; log $datadir/bgd.log:" >&2
            tail -n 30 "$datadir/bgd.log" >&2
            unset BUILDGRID_PID
            return 1
        fi
        if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then
            return 0
        fi
        sleep 0.1
    done
    echo "buildgrid_start_cas: port $port not open after 60s; log $datadir/bgd.log:" >&2
    tail -n 30 "$datadir/bgd.log" >&2
    buildgrid_stop
    return 1
}

buildgrid_stop() {
    local pid="${BUILDGRID_PID:-}"
    [ -n "$pid" ] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        local i
        for i in $(seq 1 100); do   # up to 10s
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            kill -KILL "$pid" 2>/dev/null
        fi
    fi
    wait "$pid" 2>/dev/null || true
    unset BUILDGRID_PID
    return 0
}
