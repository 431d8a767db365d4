# shellcheck shell=bash
# Installs what the demo and the tests need on a fresh Debian 12 with only Rust: Debian
# packages (skipped when present) and the rustfmt/clippy components. Sourced by scripts.

apt_install() {
    local missing=()
    for p in "$@"; do
        dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    echo "installing: ${missing[*]}" >&2
    local sudo=""
    [ "$(id -u)" -eq 0 ] || sudo="sudo"
    local log
    log="$(mktemp)"
    if ! { $sudo apt-get update -qq && DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}"; } >"$log" 2>&1; then
        cat "$log" >&2
        rm -f "$log"
        return 1
    fi
    rm -f "$log"
}

install_prerequisites() {
    # diffutils for diff -r, python3-venv for the BuildGrid peer, fuse3 for fusermount3,
    # ca-certificates for TLS roots, gcc for -sys crates.
    apt_install diffutils python3 python3-venv fuse3 ca-certificates gcc libc6-dev pkg-config bc
    if command -v rustup >/dev/null 2>&1; then
        rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt >&2
        rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy >&2
    fi
}
