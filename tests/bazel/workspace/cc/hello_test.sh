#!/bin/sh
# Runs the binary (a data dependency) and checks its output.
set -eu
out="$("$1" tester)"
echo "$out"
case "$out" in
    "hello, tester!"*) echo "PASS" ;;
    *) echo "unexpected output"; exit 1 ;;
esac
