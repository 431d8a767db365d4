# delay-proxy.sh: a user-space TCP delay proxy for benchmarks (this kernel has no netem).
#   source scripts/lib/delay-proxy.sh
#   delay_proxy_start 127.0.0.1:PORT 1     # 1 ms each way = 2 ms RTT; sets DELAY_PROXY_ADDR
#   ...  (clients use $DELAY_PROXY_ADDR instead of the server's address)
#   delay_proxy_stop                        # also done by the caller's cleanup
# Builds examples/delay_proxy.rs (release) on first use.
DELAY_PROXY_PIDS=""

delay_proxy_start() {
    local target="$1" ms="$2" out
    cargo build --release --locked --quiet --example delay_proxy || return 1
    out="$(mktemp /tmp/casfs-delay-proxy.XXXXXX)"
    "${CARGO_TARGET_DIR:-target}/release/examples/delay_proxy" "$target" "$ms" >"$out" 2>&1 &
    DELAY_PROXY_PIDS="$DELAY_PROXY_PIDS $!"
    for _ in $(seq 100); do grep -q "^listening on" "$out" && break; sleep 0.05; done
    DELAY_PROXY_ADDR="$(sed -n 's/^listening on //p' "$out")"
    rm -f "$out"
    if [ -z "$DELAY_PROXY_ADDR" ]; then
        echo "delay proxy did not start" >&2
        return 1
    fi
    export DELAY_PROXY_ADDR
}

delay_proxy_stop() {
    local p
    for p in $DELAY_PROXY_PIDS; do kill "$p" 2>/dev/null; wait "$p" 2>/dev/null; done
    DELAY_PROXY_PIDS=""
    return 0
}
