#!/usr/bin/env bash
# Benchmarks with their ceilings, measured in the same run (see BENCHMARKS.md):
#   scripts/bench.sh            quick mode (under 2 minutes after the build)
#   scripts/bench.sh --full     full mode (3 rounds of 10 s, 3 message sizes, backlogs up to
#                               50M messages: ~25 GiB free disk under MQPROXY_BENCH_DIR)
#   scripts/bench.sh --quick --debug   every scenario once with small counts on the debug
#                               binaries `cargo test` built: a smoke test (CI), no figures
# Extra arguments go to `mqproxy-bench all` (e.g. --server-toml 'store.group_commit_max = 256').
# With MQPROXY_BENCH_NAMESRV=host:port (a cluster from scripts/rocketmq-local.sh) it also
# compares mqproxy on the RocketMQ backend with the direct client on the same broker.
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-$PWD/target}"
mode=--quick
if [ "${1:-}" = --full ] || [ "${1:-}" = --quick ]; then
  mode=$1
  shift
fi
profile=release
if [ "${1:-}" = --debug ]; then
  # Debug binaries measure nothing worth keeping: the smoke plan (small counts) checks that
  # every scenario runs.
  profile=debug
  mode=--smoke
  shift
  # The suite's one debug build (crates/bench/tests makes it build mqproxy-bench too).
  cargo test --workspace --locked --tests --no-run
else
  cargo build --release --locked --workspace --bins
fi
# The data directories go on the disk being measured (not a tmpfs).
data_root="${MQPROXY_BENCH_DIR:-${TMPDIR:-/var/tmp}/mqproxy-bench}"
mkdir -p "$data_root"
exec "$CARGO_TARGET_DIR/$profile/mqproxy-bench" all "$mode" --data-root "$data_root" "$@"
