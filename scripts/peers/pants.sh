# shellcheck shell=bash
# Pants 2.17.1 peer: a REAPI client (remote execution and remote cache) that sends only the
# old Command.output_files / output_directories fields.
#
#   source scripts/peers/pants.sh
#   pants_install                 # sets/exports PANTS (the venv's `pants` console script)
#   cd some/workspace && "$PANTS" --no-pantsd --no-watch-filesystem export-codegen ::
#
# Pants is run from a venv, not through the `pants` launcher binary (which downloads a
# Pants distribution and a Python at run time). The venv's console script runs the
# installed pantsbuild.pants directly and works offline; the workspace's pants.toml must
# say pants_version = "2.17.1" (or leave it out). Running this way prints a deprecation
# warning that a workspace can silence with
#   [GLOBAL] ignore_warnings = ["DEPRECATED: Running Pants in an external Python interpreter"]
# Offline, a workspace also needs [shell-setup] dependency_inference = false (inference
# downloads shellcheck).
#
# Environment knobs:
#   CASFS_PEER_CACHE  cache for the venv (default: $HOME/.cache/casfs-peers)
#   PANTS_VERSION_PIN default 2.17.1
#   PANTS_PYTHON      interpreter for the venv (default: the pyenv's 3.9.x; Pants 2.17 runs
#                     on CPython 3.7-3.9 only)

# peer_venv comes from the shared install library.
# shellcheck source=scripts/lib/install.sh
declare -F peer_venv >/dev/null || source "$(dirname "${BASH_SOURCE[0]}")/../lib/install.sh"

PANTS_VERSION_PIN="${PANTS_VERSION_PIN:-2.17.1}"
if [ -z "${PANTS_PYTHON:-}" ]; then
    for _py in "$HOME"/.pyenv/versions/3.9*/bin/python3 /usr/bin/python3.9; do
        [ -x "$_py" ] && PANTS_PYTHON="$_py"
    done
    unset _py
fi

pants_install() {
    local cache="${CASFS_PEER_CACHE:-$HOME/.cache/casfs-peers}"
    local venv="$cache/pants-$PANTS_VERSION_PIN"

    # pantsbuild.pants ships manylinux wheels with its Rust engine inside: no apt packages.
    if [ ! -f "$venv/.casfs-installed" ] || [ ! -x "$venv/bin/pants" ]; then
        # Python 3.9: set PANTS_PYTHON; pyenv 3.9.x is looked for.
        peer_venv pants_install "${PANTS_PYTHON:-}" "$venv" "pantsbuild.pants==$PANTS_VERSION_PIN" || return 1
    fi
    PANTS="$venv/bin/pants"
    export PANTS
    # The launcher's variable would make Pants think it was started by the launcher.
    unset PANTS_VERSION 2>/dev/null || true
}
