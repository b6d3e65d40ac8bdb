#!/usr/bin/env bash
# A local RocketMQ cluster for tests: the Rust name server and broker (rocketmq-rust 1.0.0) on
# loopback, with CI-sized store settings (~110 MB on disk instead of 1.5 GB).
#
#   scripts/rocketmq-local.sh install  build the name server and broker once (cached)
#   scripts/rocketmq-local.sh start    install once (cached), start, wait until a route lookup works
#   scripts/rocketmq-local.sh stop     stop both (kill -9: a broker that had clients can take 45 s
#                                      to stop gracefully; its data is throw-away)
#   scripts/rocketmq-local.sh status   running or not, and the ports
#   scripts/rocketmq-local.sh pid      the broker's pid (fault tests)
#
# Env: RMQ_ROOT (binaries, default ~/.cache/mqproxy-rocketmq), RMQ_RUN (config, data, logs,
# pids; default ~/.cache/mqproxy-rocketmq/run), RMQ_NAMESRV_PORT (9876), RMQ_BROKER_PORT (10911;
# the broker also binds port-2 and the HA port port+1).
set -euo pipefail
RMQ_VERSION=1.0.0
RMQ_ROOT="${RMQ_ROOT:-$HOME/.cache/mqproxy-rocketmq}"
RMQ_RUN="${RMQ_RUN:-$RMQ_ROOT/run}"
NAMESRV_PORT="${RMQ_NAMESRV_PORT:-9876}"
BROKER_PORT="${RMQ_BROKER_PORT:-10911}"
NAMESRV_BIN="$RMQ_ROOT/bin/rocketmq-namesrv-rust"
BROKER_BIN="$RMQ_ROOT/bin/rocketmq-broker-rust"

install() {
  if [ -x "$NAMESRV_BIN" ] && [ -x "$BROKER_BIN" ]; then return; fi
  echo "rocketmq-local: building rocketmq-namesrv and rocketmq-broker $RMQ_VERSION (about 15 minutes on 2 cores, once)"
  CARGO_TARGET_DIR="$RMQ_ROOT/target" cargo install --locked --root "$RMQ_ROOT" \
    "rocketmq-namesrv@$RMQ_VERSION" "rocketmq-broker@$RMQ_VERSION"
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }

running() { [ -f "$RMQ_RUN/$1.pid" ] && kill -0 "$(cat "$RMQ_RUN/$1.pid")" 2>/dev/null; }

write_config() {
  mkdir -p "$RMQ_RUN/home/conf" "$RMQ_RUN/store" "$RMQ_RUN/logs"
  cat >"$RMQ_RUN/home/conf/broker.toml" <<TOML
[broker]
namesrvAddr = "127.0.0.1:$NAMESRV_PORT"
brokerIp1 = "127.0.0.1"
listenPort = $BROKER_PORT
storePathRootDir = "$RMQ_RUN/store"
autoCreateTopicEnable = true
autoCreateSubscriptionGroup = true
enableControllerMode = false
[broker.brokerServerConfig]
bindAddress = "127.0.0.1"
[broker.brokerIdentity]
brokerName = "broker-a"
brokerClusterName = "DefaultCluster"
brokerId = 0
[store]
storePathRootDir = "$RMQ_RUN/store"
storePathCommitLog = "$RMQ_RUN/store/commitlog"
mappedFileSizeCommitLog = 67108864
maxHashSlotNum = 50000
maxIndexNum = 200000
mappedFileSizeConsumeQueue = 120000
haListenPort = $((BROKER_PORT + 1))
TOML
}

wait_for() { # what, seconds, command...
  local what=$1 secs=$2; shift 2
  for _ in $(seq $((secs * 10))); do
    if "$@"; then return 0; fi
    sleep 0.1
  done
  echo "rocketmq-local: $what did not come up within ${secs}s; logs in $RMQ_RUN/logs" >&2
  tail -n 20 "$RMQ_RUN/logs/"*.log >&2 || true
  return 1
}

registered() { grep -qi "register broker.*success" "$RMQ_RUN/logs/broker.log" 2>/dev/null; }

start() {
  install
  write_config
  if ! running namesrv; then
    HOME="$RMQ_RUN/home" ROCKETMQ_HOME="$RMQ_RUN/home" \
      "$NAMESRV_BIN" --bindAddress 127.0.0.1 --listenPort "$NAMESRV_PORT" >"$RMQ_RUN/logs/namesrv.log" 2>&1 &
    echo $! >"$RMQ_RUN/namesrv.pid"
  fi
  wait_for "name server" 20 port_open "$NAMESRV_PORT"
  # A broker killed with live client connections may find its port still held for a moment
  # after a restart (it exits at once on "address in use"): try again a few times.
  for attempt in 1 2 3 4 5 6; do
    if ! running broker; then
      HOME="$RMQ_RUN/home" ROCKETMQ_HOME="$RMQ_RUN/home" \
        "$BROKER_BIN" -c "$RMQ_RUN/home/conf/broker.toml" >"$RMQ_RUN/logs/broker.log" 2>&1 &
      echo $! >"$RMQ_RUN/broker.pid"
    fi
    for _ in $(seq 100); do
      if port_open "$BROKER_PORT" || ! running broker; then break; fi
      sleep 0.1
    done
    if running broker && port_open "$BROKER_PORT"; then break; fi
    echo "rocketmq-local: broker did not start (attempt $attempt): $(grep -m1 -i -E "error|in use" "$RMQ_RUN/logs/broker.log" | cut -c1-200)" >&2
    cp "$RMQ_RUN/logs/broker.log" "$RMQ_RUN/logs/broker-failed-$attempt.log" 2>/dev/null || true
    kill -9 "$(cat "$RMQ_RUN/broker.pid")" 2>/dev/null || true
    sleep 2
  done
  wait_for "broker" 30 port_open "$BROKER_PORT"
  wait_for "broker registration" 30 registered
  echo "rocketmq-local: name server 127.0.0.1:$NAMESRV_PORT, broker-a 127.0.0.1:$BROKER_PORT"
}

stop() {
  for name in broker namesrv; do
    if running "$name"; then kill -9 "$(cat "$RMQ_RUN/$name.pid")" 2>/dev/null || true; fi
    rm -f "$RMQ_RUN/$name.pid"
  done
  echo "rocketmq-local: stopped"
}

status() {
  local rc=0
  for name in namesrv broker; do
    if running "$name"; then echo "$name: running (pid $(cat "$RMQ_RUN/$name.pid"))"; else echo "$name: stopped"; rc=1; fi
  done
  return $rc
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  stop) stop ;;
  status) status ;;
  pid) cat "$RMQ_RUN/broker.pid" ;;  # the one broker (any name: it is broker-a)
  *) echo "usage: $0 start|stop|status|pid" >&2; exit 2 ;;
esac
