#!/usr/bin/env bash
# Run by the shell_command target src:gen (from the build root, in Pants' sandbox or on
# the remote executor).
set -euo pipefail
sleep 1
mkdir -p out/tree/nested/deeper out/tree/empty
sort src/inputs/fruits.txt > out/tree/sorted.txt
tr 'a-z' 'A-Z' < src/inputs/greeting.txt > out/tree/nested/upper.txt
wc -l < src/inputs/fruits.txt | tr -d ' ' > out/tree/nested/deeper/count.txt
{
    echo "fruits: $(sha256sum src/inputs/fruits.txt | cut -d' ' -f1)"
    echo "greeting: $(cat src/inputs/greeting.txt)"
} > out/summary.txt
printf '#!/bin/sh\necho %s\n' "$(tr 'a-z' 'A-Z' < src/inputs/greeting.txt)" > out/upper.sh
chmod 0755 out/upper.sh
