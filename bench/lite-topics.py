#!/usr/bin/env python3
"""What lite topics cost on the embedded store (BENCHMARKS.md): the server's memory with N lite
topics holding one message each, and the rate at which lite topics are consumed next to the
rate of the normal queues, measured in one run with the same client.

    bench/lite-topics.py MQPROXY_BINARY [--topics 100000] [--threads 8] [--compare 5000]

Starts the binary on a fresh data dir (a lite parent topic with 4 queues, a producer, a
clustering consumer; rate limit raised), then:
1. produces N messages, message i with `liteTopics=lt<i>` (THREADS keep-alive connections):
   N lite topics, one message each; the server's RSS (VmRSS) after, and its peak (VmHWM);
2. consumes COMPARE lite topics (pull with `liteTopic`, then `/mq/ack`) and COMPARE messages
   of the parent's normal queues (pull with `maxPullSize=1`, then `/mq/ack`), one connection
   each, alternating in blocks: messages per second of each and their ratio;
3. consumes every other lite topic (THREADS connections): RSS with N lite consumer contexts.
Each answer is checked (status 200, one message, ack committed). Loopback only.
"""
import argparse, http.client, json, os, re, subprocess, sys, tempfile, threading, time

TOPIC, CONSUMER, PRODUCER = "lite-parent", "lite-consumer", "lite-producer"


def status_kib(pid, key):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith(key + ":"):
            return int(line.split()[1])
    return 0


def mib(pid):
    return f"RSS {status_kib(pid, 'VmRSS') / 1024:.0f} MiB (peak {status_kib(pid, 'VmHWM') / 1024:.0f} MiB)"


class Client:
    def __init__(self, port):
        self.conn = http.client.HTTPConnection("127.0.0.1", port)

    def call(self, method, path, form=None):
        headers = {"Content-Type": "application/x-www-form-urlencoded"} if form else {}
        self.conn.request(method, path, body=form, headers=headers)
        v = json.loads(self.conn.getresponse().read())
        if v.get("status") != 200:
            sys.exit(f"{method} {path} {form or ''}: {v}")
        return v


def pull_and_ack(c, query, lite=None):
    """One pull (`query`, plus the lite topic if any) that must bring one message, and its ack."""
    where = f"&liteTopic={lite}" if lite else ""
    v = c.call("GET", f"/mq/message?topic={TOPIC}&consumer={CONSUMER}&{query}{where}")
    got = v["result"].get("msgList") or []
    if len(got) != 1:
        sys.exit(f"expected one message for {query}{where}: {v}")
    rid = v["result"]["requestId"]
    a = c.call("GET", f"/mq/ack?topic={TOPIC}&consumer={CONSUMER}&requestId={rid}{where}")
    if "ok" not in a.get("message", ""):
        sys.exit(f"ack not committed for {query}: {a}")


def in_threads(port, threads, items, work):
    def run(part):
        c = Client(port)
        for i in part:
            work(c, i)
    ts = [threading.Thread(target=run, args=(items[k::threads],)) for k in range(threads)]
    for t in ts:
        t.start()
    for t in ts:
        t.join()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--topics", type=int, default=100_000)
    ap.add_argument("--threads", type=int, default=8)
    ap.add_argument("--compare", type=int, default=5_000)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="mqproxy-lite-", dir=os.environ.get("MQPROXY_BENCH_DIR"))
    config = os.path.join(work, "config.toml")
    with open(config, "w") as f:
        f.write('listen = "127.0.0.1:0"\nadmin_listen = "off"\nconsume.default_rate_limit = 1000000\n'
                f'[[topic]]\nname = "{TOPIC}"\nqueues = 4\nlite = true\n'
                f'[[producer]]\nname = "{PRODUCER}"\ntopic = "{TOPIC}"\n'
                f'[[consumer]]\nname = "{CONSUMER}"\ntopic = "{TOPIC}"\n')
    proc = subprocess.Popen([args.binary, "serve", "--config", config, "--data-dir", os.path.join(work, "data")],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", proc.stdout.readline()).group(1))
        print(f"started: {mib(proc.pid)}")
        t0 = time.monotonic()
        in_threads(port, args.threads, list(range(args.topics)),
                   lambda c, i: c.call("POST", "/mq/produce", f"producer={PRODUCER}&message=m{i}&liteTopics=lt{i}"))
        took = time.monotonic() - t0
        print(f"{args.topics} lite topics, one message each: {args.topics / took:.0f} produces/s; {mib(proc.pid)}")

        # Lite topics against the normal queues, one connection each, alternating blocks of 500.
        lite_c, normal_c = Client(port), Client(port)
        spent = {"lite": 0.0, "normal": 0.0}
        block = 500
        for start in range(0, args.compare, block):
            n = min(block, args.compare - start)
            t = time.monotonic()
            for i in range(start, start + n):
                pull_and_ack(lite_c, "maxPullSize=1", f"lt{i}")
            spent["lite"] += time.monotonic() - t
            t = time.monotonic()
            for _ in range(n):
                pull_and_ack(normal_c, "maxPullSize=1")
            spent["normal"] += time.monotonic() - t
        lite_rate, normal_rate = args.compare / spent["lite"], args.compare / spent["normal"]
        print(f"consume, pull + ack, one connection: lite topics {lite_rate:.0f} msg/s, "
              f"normal queues {normal_rate:.0f} msg/s: {lite_rate / normal_rate:.2f}x")

        rest = list(range(args.compare, args.topics))
        t0 = time.monotonic()
        in_threads(port, args.threads, rest, lambda c, i: pull_and_ack(c, "maxPullSize=1", f"lt{i}"))
        took = time.monotonic() - t0
        print(f"the other {len(rest)} lite topics consumed ({args.threads} connections): "
              f"{len(rest) / took:.0f} msg/s; {args.topics} lite consumer contexts: {mib(proc.pid)}")
        print(f"data dir: {sum(os.path.getsize(os.path.join(d, f)) for d, _, fs in os.walk(work) for f in fs) >> 20} MiB")
    finally:
        proc.terminate()
        proc.wait()


if __name__ == "__main__":
    main()
