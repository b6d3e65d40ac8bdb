#!/usr/bin/env bash
# mqproxy against the RocketMQ 5 gRPC proxy (`rocketmq-proxy-rust`, crate rocketmq-proxy
# 1.0.0) on the same broker: produce of 1 KiB at 1, 16 and 64 concurrent producers.
#   1. `mqproxy-bench rocketmq`: the direct rocketmq-client-rust producer and mqproxy
#      (RocketMQ backend), alternating; it creates the topic `rmq5-bench-topic`;
#   2. the official Rust 5.x gRPC client (bench/rocketmq5-produce) through rocketmq-proxy-rust.
# Produce only: that client cannot receive through this proxy (see BENCHMARKS.md).
# Needs a cluster: scripts/rocketmq-local.sh start. Builds (once, ~10 min, cached in
# ~/.cache/mqproxy-rocketmq-proxy): rocketmq-proxy-rust (needs protoc) and the client.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
root="${MQPROXY_RMQ_PROXY_ROOT:-$HOME/.cache/mqproxy-rocketmq-proxy}"
namesrv="${MQPROXY_BENCH_NAMESRV:-127.0.0.1:9876}"
port="${MQPROXY_RMQ_PROXY_PORT:-8081}"
seconds="${BENCH_SECONDS:-10}"
if ! command -v protoc >/dev/null 2>&1; then
  apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq protobuf-compiler >/dev/null
fi
if [ ! -x "$root/bin/rocketmq-proxy-rust" ]; then
  CARGO_TARGET_DIR="$root/target" cargo install rocketmq-proxy --version 1.0.0 --locked --root "$root"
fi
(cd bench/rocketmq5-produce && CARGO_TARGET_DIR="$root/client-target" cargo build --release --locked)
cargo build --release --locked --workspace --bins
RUST_LOG=warn "$root/bin/rocketmq-proxy-rust" --mode cluster --namesrvAddr "$namesrv" \
  --grpcListenAddr "127.0.0.1:$port" >"$root/proxy.log" 2>&1 &
proxy=$!
trap 'kill -9 $proxy 2>/dev/null || true' EXIT
"$CARGO_TARGET_DIR/release/mqproxy-bench" rocketmq --namesrv "$namesrv" --topic-prefix rmq5- \
  --rounds 3 --warmup 1 --duration "$seconds" --data-root "${TMPDIR:-/var/tmp}"
for writers in 1 16 64; do
  for round in 1 2 3; do
    "$root/client-target/release/rocketmq5-produce" "127.0.0.1:$port" rmq5-bench-topic "$writers" "$seconds" 2>/dev/null |
      grep "^rocketmq-proxy-rust" |
      sed "s/^/round $round: /"
  done
done
