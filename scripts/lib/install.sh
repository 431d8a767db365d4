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
    # ca-certificates for TLS roots, gcc for -sys crates (and the sandbox tests' hostile
    # program), bubblewrap for the --sandbox=bwrap tests, b3sum for the BLAKE3 golden test.
    apt_install diffutils python3 python3-venv fuse3 ca-certificates gcc libc6-dev pkg-config bc bubblewrap b3sum
    if command -v rustup >/dev/null 2>&1; then
        rustup component list --installed 2>/dev/null | grep -q '^rustfmt' || rustup component add rustfmt >&2
        rustup component list --installed 2>/dev/null | grep -q '^clippy' || rustup component add clippy >&2
    fi
}

# peer_venv WHO PYTHON VENV PIP-ARGS...: (re)creates the virtualenv VENV with PYTHON and
# pip-installs PIP-ARGS into it, then stamps it with `pip freeze` (VENV/.casfs-installed).
# The peers' install functions call it when their stamp or entry point is missing.
peer_venv() {
    local who="$1" python="$2" venv="$3"
    shift 3
    if [ -z "$python" ] || [ ! -x "$python" ]; then
        echo "$who: python not found: ${python:-(none)}" >&2
        return 1
    fi
    echo "$who: creating $venv with $python" >&2
    mkdir -p "$(dirname "$venv")" || return 1
    rm -rf "$venv"
    "$python" -m venv "$venv" || return 1
    "$venv/bin/pip" install -q --disable-pip-version-check "$@" || {
        echo "$who: pip install $* failed" >&2
        return 1
    }
    "$venv/bin/pip" freeze --disable-pip-version-check > "$venv/.casfs-installed"
}
