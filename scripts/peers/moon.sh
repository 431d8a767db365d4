# shellcheck shell=bash
# moon peer: the moon build system's native binary (moon 2.5.5 by default), a client of
# the Bazel remote cache protocol (`remote: {host: 'grpc://HOST:PORT'}` in
# .moon/workspace.yml).
#
#   source scripts/peers/moon.sh
#   moon_install                     # sets/exports MOON (and runs moon once, see below)
#   moon_env                         # exports MOON_HOME, PROTO_HOME (the cache below)
#   moon_exec run app:build          # $MOON with its caches (wasmtime's too) in there
#
# The npm package @moonrepo/cli only picks one of its platform packages; the binary is the
# platform package @moonrepo/core-linux-x64-gnu itself. `npm pack` fetches that tarball
# (integrity-checked by npm) without a node_modules tree or any install script, and the
# binary goes to $CASFS_PEER_CACHE/moon-VERSION/moon.
#
# Facts found by running moon 2.5.5 (see also the CONFORMANCE guide):
# - the workspace must be a git repository; tasks with `outputs:` and `options: {cache:
#   true}` are cached, remotely under the instance name `moon-outputs`; a run served from
#   the remote cache prints "cached from remote".
# - at its first run moon downloads a toolchain plugin (a .wasm file) into MOON_HOME
#   (default ~/.moon; moon_install has it fetched), creates PROTO_HOME (~/.proto) and wasmtime's compile cache
#   ($XDG_CACHE_HOME/wasmtime); moon_env and moon_exec put them all in the peer cache so
#   that reruns are offline and $HOME stays clean.
#
# Environment knobs:
#   CASFS_PEER_CACHE   cache (default: $HOME/.cache/casfs-peers)
#   MOON_VERSION       default 2.5.5
#   MOON               use this binary instead of installing
#   MOON_TIMEOUT       seconds for one moon_exec (default 300)

MOON_VERSION="${MOON_VERSION:-2.5.5}"
_MOON_SH_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"

_moon_cache() {
    echo "${CASFS_PEER_CACHE:-$HOME/.cache/casfs-peers}"
}

moon_install() {
    if [ -n "${MOON:-}" ] && [ -x "$MOON" ]; then
        export MOON
        return 0
    fi
    if [ "$(uname -m)" != x86_64 ]; then
        echo "moon_install: only x86_64 is wired up (not $(uname -m))" >&2
        return 1
    fi
    local dir pkg="@moonrepo/core-linux-x64-gnu@$MOON_VERSION"
    dir="$(_moon_cache)/moon-$MOON_VERSION"
    if [ ! -f "$dir/.casfs-installed" ] || [ ! -x "$dir/moon" ]; then
        if ! command -v npm >/dev/null 2>&1; then
            # shellcheck source=scripts/lib/install.sh
            source "$_MOON_SH_DIR/../lib/install.sh"
            apt_install npm || return 1
        fi
        echo "moon_install: fetching moon $MOON_VERSION into $dir" >&2
        local tmp tgz
        tmp="$(mktemp -d)" || return 1
        if ! tgz="$(cd "$tmp" && npm pack --silent "$pkg" 2>"$tmp/npm.log")" || [ ! -f "$tmp/$tgz" ]; then
            echo "moon_install: npm pack $pkg failed:" >&2
            cat "$tmp/npm.log" >&2
            rm -rf "$tmp"
            return 1
        fi
        if ! { mkdir -p "$tmp/x" && tar -xzf "$tmp/$tgz" -C "$tmp/x"; } || [ ! -f "$tmp/x/package/moon" ]; then
            echo "moon_install: $tgz has no package/moon" >&2
            rm -rf "$tmp"
            return 1
        fi
        rm -rf "$dir"
        mkdir -p "$dir" || { rm -rf "$tmp"; return 1; }
        install -m 0755 "$tmp/x/package/moon" "$dir/moon" || { rm -rf "$tmp"; return 1; }
        rm -rf "$tmp"
        local v
        v="$(MOON_HOME="$dir/home/moon" PROTO_HOME="$dir/home/proto" "$dir/moon" --version 2>/dev/null)"
        if [ "$v" != "moon $MOON_VERSION" ]; then
            echo "moon_install: $dir/moon --version says '$v', expected 'moon $MOON_VERSION'" >&2
            return 1
        fi
        echo "$v" > "$dir/.casfs-installed"
    fi
    MOON="$dir/moon"
    export MOON
    _moon_warm
}

# _moon_warm: moon fetches its toolchain plugin at its first run in a workspace; fetch it
# now, in an empty workspace, so that a missing network is an install failure, not a
# failed run later.
_moon_warm() {
    moon_env || return 1
    if [ -z "$(find "$MOON_HOME/plugins" -name '*.wasm' -print -quit 2>/dev/null)" ]; then
        local ws
        ws="$(mktemp -d)" || return 1
        mkdir -p "$ws/.moon"
        printf 'projects: {}\n' >"$ws/.moon/workspace.yml"
        { git -C "$ws" init -q && git -C "$ws" add -A \
            && git -C "$ws" -c user.email=peer@casfs -c user.name=peer commit -qm warm; } >/dev/null 2>&1
        (cd "$ws" && MOON_TIMEOUT=120 moon_exec sync) >"$ws.log" 2>&1
        rm -rf "$ws"
        if [ -z "$(find "$MOON_HOME/plugins" -name '*.wasm' -print -quit 2>/dev/null)" ]; then
            echo "moon_install: moon did not fetch its toolchain plugin into $MOON_HOME:" >&2
            tail -n 20 "$ws.log" >&2
            rm -f "$ws.log"
            return 1
        fi
        rm -f "$ws.log"
    fi
}

# moon_env: moon's own homes (downloaded plugins, ids) in the peer cache, not in $HOME.
moon_env() {
    local home
    home="$(_moon_cache)/moon-$MOON_VERSION/home"
    mkdir -p "$home/moon" "$home/proto" "$home/cache" || return 1
    export MOON_HOME="$home/moon" PROTO_HOME="$home/proto"
}

# moon_exec ARGS...: $MOON ARGS with the homes of moon_env and XDG_CACHE_HOME (where
# wasmtime caches compiled plugins) in the peer cache, killed after MOON_TIMEOUT seconds
# (default 300; status 124).
moon_exec() {
    [ -n "${MOON_HOME:-}" ] || moon_env || return 1
    XDG_CACHE_HOME="${MOON_HOME%/moon}/cache" timeout "${MOON_TIMEOUT:-300}" "$MOON" "$@"
}
