# shellcheck shell=bash
# casfs_binary: the casfs binary a script runs is never older than the sources it is meant to
# test or measure. Sourced by the demo, the interop scripts and the benches.
#
#   source scripts/lib/binary.sh
#   casfs_binary release || exit 1    # sets and exports CASFS
#
# Without CASFS: <repo>/target/PROFILE/casfs (PROFILE release or debug; CARGO_TARGET_DIR is
# honoured), built with
# `cargo build [--release] --locked --bin casfs` when it is missing or older than any file
# of src/, proto/, build.rs, Cargo.toml or Cargo.lock.
# With CASFS set: that binary, if it is at least as new as those files; otherwise it is
# refused (status 1, with the newest source named): a stale binary would test old code.

_CASFS_BINARY_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"

# casfs_stale_source BINARY: prints the first source file newer than BINARY (nothing when
# the binary is current); status 1 when BINARY is missing.
casfs_stale_source() {
    local bin="$1"
    [ -e "$bin" ] || return 1
    (cd "$_CASFS_BINARY_ROOT" \
        && find src proto build.rs Cargo.toml Cargo.lock -newer "$bin" \( -type f -o -type l \) -print -quit 2>/dev/null)
}

casfs_binary() {
    local profile="${1:-release}" newer
    case "$profile" in
        release | debug) ;;
        *) echo "casfs_binary: profile must be release or debug, not $profile" >&2; return 2 ;;
    esac
    if [ -n "${CASFS:-}" ]; then
        if [ ! -x "$CASFS" ]; then
            echo "casfs_binary: CASFS=$CASFS is not an executable file" >&2
            return 1
        fi
        newer="$(casfs_stale_source "$CASFS")"
        if [ -n "$newer" ]; then
            echo "casfs_binary: refusing CASFS=$CASFS: it is older than $newer (and maybe more of the" >&2
            echo "  sources), so it would not test this tree. Rebuild it (cargo build --release --locked" >&2
            echo "  --bin casfs), or unset CASFS to have it built." >&2
            return 1
        fi
        export CASFS
        return 0
    fi
    local bin="${CARGO_TARGET_DIR:-$_CASFS_BINARY_ROOT/target}/$profile/casfs" flags=(--locked --bin casfs)
    [ "$profile" = release ] && flags=(--release "${flags[@]}")
    if [ ! -x "$bin" ] || [ -n "$(casfs_stale_source "$bin")" ]; then
        echo "casfs_binary: building $bin (cargo build ${flags[*]})" >&2
        (cd "$_CASFS_BINARY_ROOT" && cargo build "${flags[@]}") >&2 || return 1
        # Cargo leaves a binary alone when nothing it was built from changed (a touched
        # file, a file no target uses): it is current, so say so by its time.
        touch "$bin" || return 1
    fi
    CASFS="$bin"
    export CASFS
}
