# shellcheck shell=bash
# Bazel peers: two real REAPI clients of different ages, both speaking API 2.0.
#   Bazel 2.1.0  from the npm package @bazel/bazel-linux_x64@2.1.0 (a self-contained
#                binary that embeds its own JDK), cached under $CASFS_PEER_CACHE/bazel-2.1.0;
#   Bazel 4.2.3  from the Debian 12 package bazel-bootstrap (/usr/bin/bazel-4; uses the
#                system JDK that the package depends on).
#
#   source scripts/peers/bazel.sh
#   bazel_install                       # sets/exports BAZEL2, BAZEL4
#   bazel_offline_flags                 # prints the --override_repository flags
#   bazel_run 4 OUTPUT_BASE build //...  # one Bazel command with the common startup flags
#   bazel_shutdown 4 OUTPUT_BASE
#
# BAZEL_TIMEOUT=SECONDS makes bazel_run give up on a command (timeout(1)) after that long.
#
# Both versions build the sample workspace (tests/bazel/workspace) fully offline: the
# external repositories Bazel would download for C++ builds and tests (rules_cc, rules_java
# and remote_coverage_tools, found by building with the network unplugged) are replaced by
# the local stubs under tests/bazel/stubs.
#
# Environment knobs:
#   CASFS_PEER_CACHE   cache for Bazel 2.1.0 and the output_user_roots
#                      (default: $HOME/.cache/casfs-peers)
#   BAZEL2, BAZEL4     use these binaries instead of installing

_BAZEL_SH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
BAZEL_STUBS="${BAZEL_STUBS:-$(cd "$_BAZEL_SH_DIR/../../tests/bazel/stubs" && pwd)}"
BAZEL_WORKSPACE="${BAZEL_WORKSPACE:-$(cd "$_BAZEL_SH_DIR/../../tests/bazel/workspace" && pwd)}"
BAZEL2_VERSION=2.1.0
BAZEL4_VERSION=4.2.3
# The stubs every supported version needs to build and test C++ offline.
BAZEL_STUB_REPOS=(rules_cc rules_java remote_coverage_tools)

_bazel_cache() {
    echo "${CASFS_PEER_CACHE:-$HOME/.cache/casfs-peers}"
}

# bazel_install_2: the npm tarball holds one file, the bazel binary. `npm pack` fetches it
# (integrity-checked by npm) without creating a node_modules tree or running any script.
bazel_install_2() {
    if [ -n "${BAZEL2:-}" ] && [ -x "$BAZEL2" ]; then
        export BAZEL2
        return 0
    fi
    local dir
    dir="$(_bazel_cache)/bazel-$BAZEL2_VERSION"
    if [ ! -f "$dir/.casfs-installed" ] || [ ! -x "$dir/bazel" ]; then
        if ! command -v npm >/dev/null 2>&1; then
            # shellcheck source=scripts/lib/install.sh
            source "$_BAZEL_SH_DIR/../lib/install.sh"
            apt_install npm || return 1
        fi
        echo "bazel_install: fetching Bazel $BAZEL2_VERSION into $dir" >&2
        local tmp
        tmp="$(mktemp -d)" || return 1
        local tgz
        if ! tgz="$(cd "$tmp" && npm pack --silent "@bazel/bazel-linux_x64@$BAZEL2_VERSION" 2>"$tmp/npm.log")" \
            || [ ! -f "$tmp/$tgz" ]; then
            echo "bazel_install: npm pack @bazel/bazel-linux_x64@$BAZEL2_VERSION failed:" >&2
            cat "$tmp/npm.log" >&2
            rm -rf "$tmp"
            return 1
        fi
        if ! { mkdir -p "$tmp/x" && tar -xzf "$tmp/$tgz" -C "$tmp/x"; }; then
            rm -rf "$tmp"
            return 1
        fi
        local bin="$tmp/x/package/bazel-$BAZEL2_VERSION-linux-x86_64"
        if [ ! -f "$bin" ]; then
            echo "bazel_install: $tgz has no bazel-$BAZEL2_VERSION-linux-x86_64" >&2
            rm -rf "$tmp"
            return 1
        fi
        rm -rf "$dir"
        mkdir -p "$dir" || { rm -rf "$tmp"; return 1; }
        install -m 0755 "$bin" "$dir/bazel" || { rm -rf "$tmp"; return 1; }
        rm -rf "$tmp"
        local v
        v="$("$dir/bazel" --version 2>/dev/null)"
        if [ "$v" != "bazel $BAZEL2_VERSION" ]; then
            echo "bazel_install: $dir/bazel --version says '$v', expected 'bazel $BAZEL2_VERSION'" >&2
            return 1
        fi
        echo "$v" > "$dir/.casfs-installed"
    fi
    BAZEL2="$dir/bazel"
    export BAZEL2
}

# bazel_install_4: Debian's build reports "bazel no_version", so the version is checked
# through the package instead.
bazel_install_4() {
    if [ -n "${BAZEL4:-}" ] && [ -x "$BAZEL4" ]; then
        export BAZEL4
        return 0
    fi
    if ! dpkg -s bazel-bootstrap >/dev/null 2>&1 || [ ! -x /usr/bin/bazel-4 ]; then
        # shellcheck source=scripts/lib/install.sh
        source "$_BAZEL_SH_DIR/../lib/install.sh"
        apt_install bazel-bootstrap || return 1
    fi
    local v
    v="$(dpkg-query -W -f='${Version}' bazel-bootstrap 2>/dev/null)"
    case "$v" in
        "$BAZEL4_VERSION"*) ;;
        *) echo "bazel_install: bazel-bootstrap is '$v', expected $BAZEL4_VERSION" >&2; return 1 ;;
    esac
    BAZEL4=/usr/bin/bazel-4
    export BAZEL4
}

bazel_install() {
    bazel_install_2 || return 1
    bazel_install_4 || return 1
}

# bazel_bin 2|4: the binary for a major version.
bazel_bin() {
    case "$1" in
        2) echo "$BAZEL2" ;;
        4) echo "$BAZEL4" ;;
        *) echo "bazel_bin: unknown version $1" >&2; return 2 ;;
    esac
}

# bazel_user_root 2|4: output_user_root (install base + output bases), outside the repo and
# kept between runs so the install base is extracted once.
bazel_user_root() {
    local v
    case "$1" in
        2) v="$BAZEL2_VERSION" ;;
        4) v="$BAZEL4_VERSION" ;;
        *) echo "bazel_user_root: unknown version $1" >&2; return 2 ;;
    esac
    echo "$(_bazel_cache)/bazel-root-$v"
}

# bazel_offline_flags: build/test flags that keep Bazel off the network.
bazel_offline_flags() {
    local r
    for r in "${BAZEL_STUB_REPOS[@]}"; do
        echo "--override_repository=$r=$BAZEL_STUBS/$r"
    done
}

# bazel_run 2|4 OUTPUT_BASE COMMAND [ARGS...]: runs Bazel in the sample workspace with no
# rc files, a private output base, and no convenience symlinks in the source tree. The
# server quits by itself after 10 idle minutes if nobody calls bazel_shutdown.
bazel_run() {
    local ver="$1" ob="$2"
    shift 2
    local bin root
    bin="$(bazel_bin "$ver")" || return 2
    root="$(bazel_user_root "$ver")" || return 2
    mkdir -p "$root" "$ob" || return 1
    local startup=(--nohome_rc --nosystem_rc --noworkspace_rc
        --output_user_root="$root" --output_base="$ob" --max_idle_secs=600)
    # Debian's bazel-4 is not a self-extracting binary: its install base is unpacked under
    # /usr/share/bazel, which its /etc/bazel/bazelrc (skipped by --nosystem_rc, as it also
    # turns on the noisy --sandbox_debug) points at.
    [ "$ver" = 4 ] && startup+=(--install_base=/usr/share/bazel --trust_install_base)
    local to=()
    # --foreground: stay in the caller's process group, so Ctrl-C reaches the Bazel client.
    [ -n "${BAZEL_TIMEOUT:-}" ] && to=(timeout --foreground -k 10 "$BAZEL_TIMEOUT")
    (cd "$BAZEL_WORKSPACE" && "${to[@]}" "$bin" "${startup[@]}" "$@")
}

# bazel_shutdown 2|4 OUTPUT_BASE: stops that output base's server (if any); if it has not
# gone after `bazel shutdown`, kills exactly the PID it recorded.
bazel_shutdown() {
    local ver="$1" ob="$2"
    local pidfile="$ob/server/server.pid.txt"
    [ -f "$pidfile" ] || return 0
    local pid
    pid="$(cat "$pidfile" 2>/dev/null)"
    BAZEL_TIMEOUT=60 bazel_run "$ver" "$ob" shutdown >/dev/null 2>&1 || true
    case "$pid" in
        '' | *[!0-9]*) return 0 ;;
    esac
    local _
    for _ in $(seq 1 50); do   # up to 5s
        kill -0 "$pid" 2>/dev/null || return 0
        sleep 0.1
    done
    kill -TERM "$pid" 2>/dev/null || true
}
