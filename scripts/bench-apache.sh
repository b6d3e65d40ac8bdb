#!/usr/bin/env bash
# mqproxy in front of the local Apache RocketMQ cluster, next to the official clients on the
# same cluster, measured in one run (BENCHMARKS.md, "Against Apache RocketMQ"):
#   scripts/bench-apache.sh                  release build; 3 rounds of 10 s per row
#   scripts/bench-apache.sh --debug          the debug binaries, one short round: a smoke test
# Extra arguments go to `mqproxy-bench apache` (e.g. --connections 16,64). Starts the cluster
# (scripts/rocketmq-apache.sh start) and the RocketMQ 5 proxy (start-proxy) when not running;
# RMQ_APACHE_NAMESRV_PORT and RMQ_APACHE_PROXY_PORT choose other ports, as there.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
profile=release
plan=(--rounds 3 --warmup 2 --duration 10)
if [ "${1:-}" = --debug ]; then
  profile=debug
  plan=(--rounds 1 --warmup 0.5 --duration 1 --connections 1,16 --consume-messages 2000 --e2e-count 50)
  shift
  # The suite's one debug build (crates/bench/tests makes it build mqproxy-bench too).
  cargo test --workspace --locked --tests --no-run
else
  cargo build --release --locked --workspace --bins
fi
./scripts/rocketmq-apache.sh start
./scripts/rocketmq-apache.sh start-proxy
classpath=$(./scripts/rocketmq-apache.sh tool-classpath)
data_root="${MQPROXY_BENCH_DIR:-${TMPDIR:-/var/tmp}/mqproxy-bench}"
mkdir -p "$data_root"
exec "$CARGO_TARGET_DIR/$profile/mqproxy-bench" apache "${plan[@]}" --data-root "$data_root" \
  --namesrv "127.0.0.1:${RMQ_APACHE_NAMESRV_PORT:-9876}" --proxy "127.0.0.1:${RMQ_APACHE_PROXY_PORT:-8091}" \
  --java-classpath "$classpath" "$@"
