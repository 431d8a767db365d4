# shellcheck shell=bash
# Skips in the scripts follow the rule of the Rust tests: CI never skips (a missing peer or
# capability is a failure there); elsewhere a skip is printed and counted.
#
#   source scripts/lib/skip.sh
#   if ! have_python; then suite_skip "interop-pants" "no Python 3.9" || exit 1; fi
#
# CI is on when the variable CI is set to anything but "", "0" or "false".
# CASFS_SKIP_FILE, when set, gets one line "WHAT: WHY" per skip (scripts/test counts them).

# in_ci: status 0 when running in CI.
in_ci() {
    case "${CI:-}" in
        "" | 0 | false | FALSE | False) return 1 ;;
        *) return 0 ;;
    esac
}

# suite_skip WHAT WHY: in CI prints "FAIL  WHAT: WHY" and returns 1; elsewhere prints
# "SKIP  WHAT: WHY", records it in CASFS_SKIP_FILE and returns 0.
suite_skip() {
    local what="$1" why="$2"
    if in_ci; then
        printf 'FAIL  %s: %s (CI never skips)\n' "$what" "$why"
        return 1
    fi
    printf 'SKIP  %s: %s\n' "$what" "$why"
    if [ -n "${CASFS_SKIP_FILE:-}" ]; then
        printf '%s: %s\n' "$what" "$why" >>"$CASFS_SKIP_FILE"
    fi
    return 0
}

# skip_script WHAT WHY: the whole script cannot run here. Ends it with its summary line:
# "0 passed, 0 failed" (status 0) after a counted skip, "0 passed, 1 failed" (status 1) in CI.
skip_script() {
    if suite_skip "$1" "$2"; then
        echo "0 passed, 0 failed"
        exit 0
    fi
    echo "0 passed, 1 failed"
    exit 1
}
