#!/usr/bin/env bash
# A local Apache RocketMQ cluster for tests and benchmarks: the Java name server and two
# brokers (broker-a, broker-b, cluster DefaultCluster) on loopback, from Maven Central
# (tests/apache-rocketmq/pom.xml; jars cached in ~/.m2), with CI-sized settings.
#
#   scripts/rocketmq-apache.sh install           resolve the jars, compile the Java tool (cached)
#   scripts/rocketmq-apache.sh start             start what is not running, wait until both
#                                                brokers are registered (prints the time it took)
#   scripts/rocketmq-apache.sh stop              kill -9 everything (its data is throw-away)
#   scripts/rocketmq-apache.sh status            running or not, and the ports
#   scripts/rocketmq-apache.sh kill broker-a     kill -9 one broker (fault tests); `start` brings it back
#   scripts/rocketmq-apache.sh pid broker-a      a process's pid (fault tests)
#   scripts/rocketmq-apache.sh start-proxy       the RocketMQ 5 proxy (gRPC) in front of the cluster
#   scripts/rocketmq-apache.sh tool ARGS...      run the Java tool (tests/apache-rocketmq/src)
#   scripts/rocketmq-apache.sh tool-classpath    print the Java tool's classpath
#
# Env: RMQ_APACHE=5 (default: 5.x, see the pom) or 4 (4.9.x brokers, the smoke pass; own ports
# and run dir, so both can run at once; its name server is 5.x unless RMQ_APACHE_NAMESRV=4); RMQ_APACHE_RUN (configs, stores, logs, pids; default
# ~/.cache/mqproxy-apache/run<5|4>); RMQ_APACHE_HEAP (each JVM's heap, default 1g);
# RMQ_APACHE_NAMESRV_PORT (5: 9876, 4: 9766); broker-a and broker-b listen on the name server's
# port + 1035 and + 1045 (5: 10911, 10921; 4: 10801, 10811; each also binds port-2 and the HA port port+1);
# the proxy's gRPC port is 8091 (RMQ_APACHE_PROXY_PORT).
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT="$PWD"
MAJOR="${RMQ_APACHE:-5}"
case "$MAJOR" in
  5) default_ns=9876 ;;
  4) default_ns=9766 ;;
  *) echo "rocketmq-apache: RMQ_APACHE must be 5 or 4, got $MAJOR" >&2; exit 2 ;;
esac
CACHE="${RMQ_APACHE_CACHE:-$HOME/.cache/mqproxy-apache}"
RUN="${RMQ_APACHE_RUN:-$CACHE/run$MAJOR}"
HEAP="${RMQ_APACHE_HEAP:-1g}"
# The 4.9 mode's name server is a 5.x one unless asked: rocketmq-client-rust 1.0.0 cannot read
# a 4.x name server's routes (no `enableActingMaster`); 4.x brokers register with a 5.x one.
NAMESRV_MAJOR="${RMQ_APACHE_NAMESRV:-5}"
NAMESRV_PORT="${RMQ_APACHE_NAMESRV_PORT:-$default_ns}"
PROXY_PORT="${RMQ_APACHE_PROXY_PORT:-8091}"
POM="$ROOT/tests/apache-rocketmq/pom.xml"
BROKERS=(broker-a broker-b)

broker_port() { case "$1" in broker-a) echo $((NAMESRV_PORT + 1035)) ;; broker-b) echo $((NAMESRV_PORT + 1045)) ;; esac; }

# JDK 17: RocketMQ reaches into NIO internals (unmapping its mapped files, direct buffers).
JAVA_FLAGS=(
  -XX:+UseG1GC -XX:-OmitStackTraceInFastThrow
  --add-opens=java.base/java.nio=ALL-UNNAMED
  --add-opens=java.base/sun.nio.ch=ALL-UNNAMED
  --add-opens=java.base/java.lang=ALL-UNNAMED
  --add-opens=java.base/java.util=ALL-UNNAMED
  --add-exports=java.base/sun.nio.ch=ALL-UNNAMED
  --add-exports=java.base/jdk.internal.ref=ALL-UNNAMED
)

key() { sha256sum "$POM" | cut -c1-16; }

# The classpath of a Maven profile of the pom, resolved once per pom version.
classpath() { # profile
  local file
  file="$CACHE/classpath-$(key)-$1.txt"
  if [ ! -s "$file" ]; then
    mkdir -p "$CACHE"
    echo "rocketmq-apache: resolving the $1 jars from Maven Central (cached in ~/.m2)" >&2
    mvn -q -B -Dstyle.color=never -f "$POM" -P "$1" -Dmqproxy.build.dir="$CACHE/build" \
      dependency:build-classpath -Dmdep.outputFile="$file.tmp" >&2
    mv "$file.tmp" "$file"
  fi
  cat "$file"
}

# The Java tool: compiled into the cache (never into the clone) when its sources change.
tool_classpath() {
  local stamp="$CACHE/build/tool-$(key)-$(cat "$ROOT"/tests/apache-rocketmq/src/main/java/mqproxy/apache/*.java | sha256sum | cut -c1-16)"
  if [ ! -f "$stamp" ]; then
    echo "rocketmq-apache: compiling the Java tool" >&2
    mvn -q -B -Dstyle.color=never -f "$POM" -P clients -Dmqproxy.build.dir="$CACHE/build" compile >&2
    touch "$stamp"
  fi
  echo "$CACHE/build/classes:$(classpath clients)"
}

server_profile() { if [ "$MAJOR" = 4 ]; then echo broker4; else echo broker5; fi; }

install() {
  classpath "$(server_profile)" >/dev/null
  if [ "$NAMESRV_MAJOR" = 5 ]; then classpath broker5 >/dev/null; fi
  tool_classpath >/dev/null
}

port_open() { (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; }
# Running: the pid lives and is no zombie (a killed JVM whose parent has not reaped it yet).
running() {
  [ -f "$RUN/$1.pid" ] || return 1
  local pid state
  pid=$(cat "$RUN/$1.pid")
  state=$(awk '{print $3}' "/proc/$pid/stat" 2>/dev/null) || return 1
  [ -n "$state" ] && [ "$state" != Z ]
}

# RocketMQ 4.9 reads its logback config from $ROCKETMQ_HOME/conf (5.x ships one in its jars).
write_logback() { # dir name
  mkdir -p "$1/conf"
  cat >"$1/conf/logback_$2.xml" <<XML
<configuration>
  <appender name="file" class="ch.qos.logback.core.FileAppender">
    <file>$1/logs/$2.log</file>
    <encoder><pattern>%d{yyyy-MM-dd HH:mm:ss.SSS} %-5level %logger{36} - %msg%n</pattern></encoder>
  </appender>
  <root level="INFO"><appender-ref ref="file"/></root>
</configuration>
XML
}

launch() { # name main-class args...
  local name=$1 main=$2; shift 2
  local dir="$RUN/$name" profile
  profile=$(server_profile)
  if [ "$name" = namesrv ] && [ "$NAMESRV_MAJOR" = 5 ]; then profile=broker5; fi
  mkdir -p "$dir/logs"
  write_logback "$dir" "$([ "$name" = namesrv ] && echo namesrv || echo broker)"
  ROCKETMQ_HOME="$dir" java -Xms"$HEAP" -Xmx"$HEAP" -XX:MaxDirectMemorySize=512m "${JAVA_FLAGS[@]}" \
    -Duser.home="$dir" -Drocketmq.home.dir="$dir" \
    -cp "$(classpath "$profile")" "$main" "$@" >>"$dir/logs/stdout.log" 2>&1 &
  echo $! >"$RUN/$name.pid"
}

write_broker_config() { # name
  local name=$1 port dir="$RUN/$1"
  port=$(broker_port "$name")
  mkdir -p "$dir"
  # Store settings for CI: 128 MiB commit-log files and small index files instead of 1 GiB
  # plus 400 MB; disk watermarks at RocketMQ's maximum (it refuses sends above 90% used).
  cat >"$dir/broker.properties" <<PROPS
brokerClusterName=DefaultCluster
brokerName=$name
brokerId=0
namesrvAddr=127.0.0.1:$NAMESRV_PORT
brokerIP1=127.0.0.1
bindAddress=127.0.0.1
listenPort=$port
haListenPort=$((port + 1))
storePathRootDir=$dir/store
storePathCommitLog=$dir/store/commitlog
mappedFileSizeCommitLog=134217728
mappedFileSizeConsumeQueue=600000
maxHashSlotNum=50000
maxIndexNum=200000
flushDiskType=ASYNC_FLUSH
diskMaxUsedSpaceRatio=95
diskSpaceWarningLevelRatio=90
diskSpaceCleanForciblyRatio=85
autoCreateTopicEnable=true
autoCreateSubscriptionGroup=true
timerWheelEnable=true
enableLmq=true
enableMultiDispatch=true
PROPS
}

wait_for() { # what seconds command...
  local what=$1 secs=$2; shift 2
  for _ in $(seq $((secs * 10))); do
    if "$@"; then return 0; fi
    sleep 0.1
  done
  echo "rocketmq-apache: $what did not come up within ${secs}s; logs in $RUN/*/logs" >&2
  tail -n 20 "$RUN"/*/logs/stdout.log >&2 || true
  return 1
}

start() {
  install
  local started
  started=$(date +%s%N)
  mkdir -p "$RUN/namesrv"
  if ! running namesrv; then
    printf 'listenPort=%s\nbindAddress=127.0.0.1\n' "$NAMESRV_PORT" >"$RUN/namesrv/namesrv.properties"
    launch namesrv org.apache.rocketmq.namesrv.NamesrvStartup -c "$RUN/namesrv/namesrv.properties"
  fi
  for name in "${BROKERS[@]}"; do
    if ! running "$name"; then
      write_broker_config "$name"
      launch "$name" org.apache.rocketmq.broker.BrokerStartup -c "$RUN/$name/broker.properties"
    fi
  done
  wait_for "name server" 60 port_open "$NAMESRV_PORT"
  for name in "${BROKERS[@]}"; do
    wait_for "$name" 90 port_open "$(broker_port "$name")"
  done
  java -cp "$(tool_classpath)" mqproxy.apache.Tool wait-cluster "127.0.0.1:$NAMESRV_PORT" DefaultCluster \
    "${#BROKERS[@]}" 90 >/dev/null
  echo "rocketmq-apache: Apache RocketMQ $MAJOR.x brokers, $NAMESRV_MAJOR.x name server 127.0.0.1:$NAMESRV_PORT, broker-a :$(broker_port broker-a), broker-b :$(broker_port broker-b); registered $(( ($(date +%s%N) - started) / 1000000 )) ms after start"
}

start_proxy() {
  if [ "$MAJOR" != 5 ]; then echo "rocketmq-apache: the proxy is RocketMQ 5's" >&2; exit 2; fi
  mkdir -p "$RUN/proxy"
  cat >"$RUN/proxy/rmq-proxy.json" <<JSON
{"rocketMQClusterName": "DefaultCluster", "namesrvAddr": "127.0.0.1:$NAMESRV_PORT",
 "grpcServerPort": $PROXY_PORT, "remotingListenPort": $((PROXY_PORT + 1)),
 "metricsPromExporterPort": $((PROXY_PORT + 2))}
JSON
  if ! running proxy; then
    launch proxy org.apache.rocketmq.proxy.ProxyStartup -pc "$RUN/proxy/rmq-proxy.json" -pm cluster
  fi
  wait_for "proxy" 90 port_open "$PROXY_PORT"
  echo "rocketmq-apache: RocketMQ 5 proxy gRPC 127.0.0.1:$PROXY_PORT"
}

stop() {
  for name in proxy "${BROKERS[@]}" namesrv; do
    if running "$name"; then kill -9 "$(cat "$RUN/$name.pid")" 2>/dev/null || true; fi
    rm -f "$RUN/$name.pid"
  done
  echo "rocketmq-apache: stopped"
}

kill_one() { # name
  if running "$1"; then kill -9 "$(cat "$RUN/$1.pid")"; fi
  rm -f "$RUN/$1.pid"
}

status() {
  local rc=0
  for name in namesrv "${BROKERS[@]}" proxy; do
    if running "$name"; then echo "$name: running (pid $(cat "$RUN/$name.pid"))"; else echo "$name: stopped"; rc=1; fi
  done
  return $rc
}

case "${1:-}" in
  install) install ;;
  start) start ;;
  start-proxy) start_proxy ;;
  stop) stop ;;
  status) status ;;
  kill) kill_one "${2:?which: broker-a or broker-b}" ;;
  pid) cat "$RUN/${2:?which: namesrv, broker-a, broker-b or proxy}.pid" ;;
  tool) shift; exec java -Drocketmq.client.logRoot="$CACHE/client-logs" -cp "$(tool_classpath)" mqproxy.apache.Tool "$@" ;;
  tool-classpath) tool_classpath ;;
  *) echo "usage: $0 install|start|stop|status|kill NAME|pid NAME|start-proxy|tool ARGS|tool-classpath" >&2; exit 2 ;;
esac
