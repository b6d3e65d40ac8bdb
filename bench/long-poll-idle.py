#!/usr/bin/env python3
"""What long polling costs while nothing happens: the server's CPU with N pulls waiting
(`waitMs`), next to the same server idle, measured in one run (BENCHMARKS.md).

    bench/long-poll-idle.py MQPROXY_BINARY [--pulls 1000] [--seconds 10]

Starts the binary on a fresh data dir (the demo's names, rate limit raised so the N first
pulls are not refused), measures its CPU time (utime + stime from /proc) over SECONDS idle, then
opens N HTTP connections each sending one `GET /mq/message?...&waitMs=30000`, checks that all
of them are still waiting, measures again over SECONDS, and checks that each answers
NO_NEW_MSG or (after one produce) that exactly one pull got the message. Loopback only.
"""
import argparse, json, os, re, signal, socket, subprocess, sys, tempfile, time

TOPIC, CONSUMER, PRODUCER = "mqcloud-http-test-topic", "http-clustering-consumer", "mqcloud-http-test-topic-producer"


def cpu_seconds(pid):
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def request(port, path, form=None):
    s = socket.create_connection(("127.0.0.1", port))
    if form is None:
        s.sendall(f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
    else:
        s.sendall(f"POST {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  f"Content-Type: application/x-www-form-urlencoded\r\nContent-Length: {len(form)}\r\n\r\n{form}".encode())
    return s


def answer(s):
    data = b""
    while chunk := s.recv(65536):
        data += chunk
    s.close()
    return json.loads(data.split(b"\r\n\r\n", 1)[1])


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("binary")
    ap.add_argument("--pulls", type=int, default=1000)
    ap.add_argument("--seconds", type=float, default=10.0)
    args = ap.parse_args()
    work = tempfile.mkdtemp(prefix="mqproxy-long-poll-")
    config = os.path.join(work, "config.toml")
    with open(config, "w") as f:
        f.write('listen = "127.0.0.1:0"\nadmin_listen = "off"\nconsume.default_rate_limit = 1000000\n'
                f'[[topic]]\nname = "{TOPIC}"\nqueues = 4\n[[producer]]\nname = "{PRODUCER}"\ntopic = "{TOPIC}"\n'
                f'[[consumer]]\nname = "{CONSUMER}"\ntopic = "{TOPIC}"\n')
    proc = subprocess.Popen([args.binary, "serve", "--config", config, "--data-dir", os.path.join(work, "data")],
                            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)
    try:
        line = proc.stdout.readline()
        port = int(re.search(r"http://127\.0\.0\.1:(\d+)", line).group(1))
        time.sleep(1.0)  # let start-up work (store open, first commit) settle before measuring
        c0 = cpu_seconds(proc.pid)
        time.sleep(args.seconds)
        idle = cpu_seconds(proc.pid) - c0
        pull = f"/mq/message?topic={TOPIC}&consumer={CONSUMER}&waitMs=30000"
        socks = [request(port, pull) for _ in range(args.pulls)]
        time.sleep(1.0)  # every request read and its first pull done
        c0 = cpu_seconds(proc.pid)
        time.sleep(args.seconds)
        waiting = cpu_seconds(proc.pid) - c0
        for s in socks:
            s.setblocking(False)
            try:
                early = s.recv(4096)
                if early:
                    sys.exit(f"a waiting pull answered early: {early[-300:]!r}")
            except BlockingIOError:
                pass
            s.setblocking(True)
        t0 = time.monotonic()
        produced = answer(request(port, "/mq/produce", f"producer={PRODUCER}&message=wake"))
        if produced.get("status") != 200:
            sys.exit(f"produce failed: {produced}")
        answers = [answer(s) for s in socks]
        found = sum(1 for a in answers if a["result"]["status"] == "FOUND")
        print(f"mqproxy with {args.pulls} pulls waiting (waitMs=30000), {args.seconds:.0f} s each:")
        print(f"  idle server:            {idle:.3f} CPU s ({100 * idle / args.seconds:.2f}% of a core)")
        print(f"  {args.pulls} pulls waiting:     {waiting:.3f} CPU s ({100 * waiting / args.seconds:.2f}% of a core)")
        print(f"  one produce then: {found} pull(s) FOUND, {len(answers) - found} NO_NEW_MSG at their time "
              f"(all answered {time.monotonic() - t0:.1f} s after the produce)")
        if found != 1:
            sys.exit(f"expected exactly one pull to get the message, got {found}")
    finally:
        proc.send_signal(signal.SIGTERM)
        proc.wait(timeout=30)


if __name__ == "__main__":
    main()
