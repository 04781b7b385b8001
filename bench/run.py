#!/usr/bin/env python3
"""Side-by-side benchmark: mqlite and Mosquitto, configured alike, pinned to the same cores.

Every scenario runs against each broker in turn, alternating, ROUNDS times; the table shows the
medians, the ratio mqlite / Mosquitto, loss, and whether the target of issue 4 is met.
Run through `make bench`; the table is printed and written to bench/results.md.
"""
import json
import os
import platform
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from datetime import datetime, timezone
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BENCH = ROOT / ".build" / "release" / "mqlite-bench"
MQLITE = ROOT / ".build" / "release" / "mqlite"
ROUNDS = int(os.environ.get("ROUNDS", "3"))
DURATION = os.environ.get("DURATION", "2")
WARMUP = os.environ.get("WARMUP", "0.5")
BROKER_CPUS = os.environ.get("BROKER_CPUS", "0")   # both brokers get these cores
CLIENT_CPUS = os.environ.get("CLIENT_CPUS", "1")   # the load generator gets these
CONNECTIONS = os.environ.get("CONNECTIONS", "10000")
REPEATS = int(os.environ.get("REPEATS", "3"))  # runs per round of the noisiest rows (latency, Lua)
OUT = Path(os.environ.get("OUT", ROOT / "bench" / "results.md"))

# Identical limits for both brokers: in-flight window, queue, no persistence, TCP_NODELAY, quiet logs.
MOSQUITTO_CONF = """listener {port} 127.0.0.1
allow_anonymous true
persistence false
max_inflight_messages 32
max_queued_messages 1000
set_tcp_nodelay true
log_type error
"""
MQLITE_CONF = """[server]
workers = {workers}
log_level = "warning"
[[listener]]
bind = "127.0.0.1:{port}"
[limits]
max_inflight = 32
max_queued = 1000
"""
# TLS: one more listener on each broker, with the same certificate and key (made below with
# openssl), TLS 1.3 with TLS_AES_128_GCM_SHA256 on both (Mosquitto restricted to it; BoringSSL, in
# mqlite and in the load generator, picks it first on CPUs with AES instructions).
MOSQUITTO_TLS = """listener {port} 127.0.0.1
certfile {dir}/server.crt
keyfile {dir}/server.key
tls_version tlsv1.3
ciphers_tls1.3 TLS_AES_128_GCM_SHA256
"""
MQLITE_TLS = """[[listener]]
bind = "127.0.0.1:{port}"
certfile = "{dir}/server.crt"
keyfile = "{dir}/server.key"
"""
TLS_PORTS = {"mqlite": 18904, "mosquitto": 18905}
PLUGIN = """[[plugin]]
script = "{script}"
"""
# A trivial transform on the hooked topic, and hooks loaded on other topics only.
HOOKED_LUA = 'mqlite.on_publish("bench/#", function(m) return { payload = m.payload } end)\n'
OTHER_LUA = ('mqlite.on_publish("other/#", function(m) return { payload = m.payload } end)\n'
             'mqlite.on_deliver("other/#", function(d) return { payload = d.payload } end)\n'
             'mqlite.on_unsubscribe(function(u) end)\n'
             'mqlite.every(1, function() end)\n'
             'mqlite.on_subscribe(function(s) return nil end)\n')
# Persistence (issue 14): mqlite with a store, sync "full" and "batch", beside Mosquitto with
# `persistence true` (which writes only snapshots, every autosave_interval: 30 minutes by default).
STORE = """[persistence]
path = "{path}"
sync = "{sync}"
"""
MOSQUITTO_PERSIST = """persistence true
persistence_location {dir}/
"""
# Bridges (issue 15): an edge bridging bench/# out to a core (an mqlite on the load generator's
# CPU, the same for both); publishers on the edge, subscribers on the core. Both edges may queue
# 20,000 messages (one link carries every pair's messages).
BRIDGE_CORE_PORT = 18920
BRIDGE_EDGE_PORTS = {"mqlite": 18921, "mosquitto": 18922}
MQLITE_BRIDGE = """[[bridge]]
name = "core"
address = "127.0.0.1:{core}"
[[bridge.topic]]
pattern = "bench/#"
direction = "out"
qos = 1
"""
MOSQUITTO_BRIDGE = """connection core
address 127.0.0.1:{core}
topic bench/# out 1
try_private false
"""
PERSIST_PORTS = {"mqlite+store-full": 18914, "mqlite+store-batch": 18915, "mosquitto+persistence": 18916}
# Metrics on (issue 11): an http listener scraped every second during the row, $SYS every second.
METRICS_PORT = 18907
METRICS = """[[listener]]
bind = "127.0.0.1:{port}"
protocol = "http"
"""


class Scraper:
    """GETs /metrics every `period` seconds until stopped; counts the scrapes that answered 200."""
    def __init__(self, port, period=1.0):
        self.url, self.period = f"http://127.0.0.1:{port}/metrics", period
        self.ok = 0
        self.done = threading.Event()
        self.thread = threading.Thread(target=self.run, daemon=True)
        self.thread.start()

    def run(self):
        while not self.done.is_set():
            try:
                with urllib.request.urlopen(self.url, timeout=5) as r:
                    r.read()
                    self.ok += r.status == 200
            except OSError:
                pass
            self.done.wait(self.period)

    def stop(self):
        self.done.set()
        self.thread.join(10)
        return self.ok


def cpu_count(cpus):
    n = 0
    for part in cpus.split(","):
        a, _, b = part.partition("-")
        n += int(b) - int(a) + 1 if b else 1
    return n


class Broker:
    def __init__(self, name, cmd, port):
        self.name, self.port = name, port
        self.proc = subprocess.Popen(["taskset", "-c", BROKER_CPUS, *cmd], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.time() + 20
        while time.time() < deadline:
            try:  # listening: every server here binds only once it is ready
                socket.create_connection(("127.0.0.1", port), timeout=1).close()
                return
            except OSError:
                time.sleep(0.2)
        raise RuntimeError(f"{name} did not start")

    def stop(self):
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()


def fresh_broker(name, tmp, workers):
    if name == "bare-nio":
        return Broker("bare SwiftNIO server", [str(BENCH), "bare-nio-server", "--port", "18912"], 18912)
    if name == "bare-nio-relay":
        return Broker("bare SwiftNIO relay", [str(BENCH), "bare-nio-relay", "--port", "18913"], 18913)
    if name == "mosquitto":
        (tmp / "fresh-mosquitto.conf").write_text(MOSQUITTO_CONF.format(port=18910))
        return Broker("fresh mosquitto", ["mosquitto", "-c", str(tmp / "fresh-mosquitto.conf")], 18910)
    (tmp / "fresh-mqlite.conf").write_text(MQLITE_CONF.format(workers=workers, port=18911))
    return Broker("fresh mqlite", [str(MQLITE), "-c", str(tmp / "fresh-mqlite.conf")], 18911)


def make_certificates(tmp):
    """A CA and a server certificate for 127.0.0.1 (EC P-256), for both brokers' TLS listeners."""
    def openssl(*args):
        subprocess.run(["openssl", *args], check=True, capture_output=True, cwd=tmp)
    ec = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
    openssl("req", "-x509", *ec, "-keyout", "ca.key", "-out", "ca.crt", "-days", "2", "-subj", "/CN=mqlite bench CA")
    openssl("req", *ec, "-keyout", "server.key", "-out", "server.csr", "-subj", "/CN=127.0.0.1")
    (tmp / "server.ext").write_text("subjectAltName=IP:127.0.0.1,DNS:localhost\n")
    openssl("x509", "-req", "-in", "server.csr", "-CA", "ca.crt", "-CAkey", "ca.key", "-CAcreateserial",
            "-out", "server.crt", "-days", "2", "-extfile", "server.ext")
    # Mosquitto started as root reads its key after switching to the mosquitto user: a throwaway
    # key in a folder that user can read.
    os.chmod(tmp, 0o755)
    os.chmod(tmp / "server.key", 0o644)
    return tmp / "ca.crt"


class Port:
    """A broker's other listener (its TLS one)."""
    def __init__(self, port):
        self.port = port


def run_bench(broker, args):
    cmd = ["taskset", "-c", CLIENT_CPUS, str(BENCH), *args, "--port", str(broker.port),
           "--duration", DURATION, "--warmup", WARMUP]
    r = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    lines = [l for l in r.stdout.splitlines() if l.startswith("{")]
    if not lines:
        return {"error": (r.stderr or r.stdout).strip()[-200:], "lost": -1}
    return json.loads(lines[-1])


BRIDGE_ROWS = [(f"bridge: pairs qos{q} {p}B forwarded edge -> core", ["pairs", "--qos", str(q), "--payload", str(p)])
               for q in (0, 1) for p in (16, 1024)]
PERSIST_ROW = "fan-out qos1 16B to 20 persistent subscribers"
PERSIST_ARGS = ["fan-out", "--qos", "1", "--payload", "16", "--clients", "20", "--persistent"]
CLEAN_ROW = "pairs qos1 16B"
CLEAN_ARGS = ["pairs", "--qos", "1", "--payload", "16"]


def main():
    for tool in ("mosquitto", "taskset", "openssl"):
        if not shutil.which(tool):
            sys.exit(f"bench: {tool} is missing (make bench installs it)")
    tmp = Path(tempfile.mkdtemp(prefix="mqlite-bench-"))
    workers = cpu_count(BROKER_CPUS)
    (tmp / "hooked.lua").write_text(HOOKED_LUA)
    (tmp / "other.lua").write_text(OTHER_LUA)
    ca = make_certificates(tmp)
    configs = {
        "mqlite": MQLITE_CONF.format(workers=workers, port=18901) + MQLITE_TLS.format(port=TLS_PORTS["mqlite"], dir=tmp),
        "mqlite+lua-other": MQLITE_CONF.format(workers=workers, port=18902) + PLUGIN.format(script=tmp / "other.lua"),
        "mqlite+lua-hooked": MQLITE_CONF.format(workers=workers, port=18903) + PLUGIN.format(script=tmp / "hooked.lua"),
        "mqlite+metrics": (MQLITE_CONF.format(workers=workers, port=18906).replace("[server]\n", "[server]\nsys_interval = 1\n")
                           + METRICS.format(port=METRICS_PORT)),
    }
    for sync in ("full", "batch"):
        name = f"mqlite+store-{sync}"
        configs[name] = MQLITE_CONF.format(workers=workers, port=PERSIST_PORTS[name]) + STORE.format(path=tmp / f"{sync}.db", sync=sync)
    configs["mqlite+bridge"] = (MQLITE_CONF.format(workers=workers, port=BRIDGE_EDGE_PORTS["mqlite"]).replace("max_queued = 1000", "max_queued = 20000")
                                + MQLITE_BRIDGE.format(core=BRIDGE_CORE_PORT))
    brokers = {}
    (tmp / "core.conf").write_text(MQLITE_CONF.format(workers=1, port=BRIDGE_CORE_PORT).replace("max_queued = 1000", "max_queued = 20000"))
    core = subprocess.Popen(["taskset", "-c", CLIENT_CPUS, str(MQLITE), "-c", str(tmp / "core.conf")], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    time.sleep(1)
    for name, port in (("mqlite", 18901), ("mqlite+lua-other", 18902), ("mqlite+lua-hooked", 18903), ("mqlite+metrics", 18906),
                       ("mqlite+store-full", PERSIST_PORTS["mqlite+store-full"]), ("mqlite+store-batch", PERSIST_PORTS["mqlite+store-batch"]),
                       ("mqlite+bridge", BRIDGE_EDGE_PORTS["mqlite"])):
        path = tmp / f"{name}.conf"
        path.write_text(configs[name])
        brokers[name] = Broker(name, [str(MQLITE), "-c", str(path)], port)
    (tmp / "mosquitto.conf").write_text(MOSQUITTO_CONF.format(port=18900) + MOSQUITTO_TLS.format(port=TLS_PORTS["mosquitto"], dir=tmp))
    brokers["mosquitto"] = Broker("mosquitto", ["mosquitto", "-c", str(tmp / "mosquitto.conf")], 18900)
    (tmp / "mosquitto-persist.conf").write_text(
        MOSQUITTO_CONF.format(port=PERSIST_PORTS["mosquitto+persistence"]).replace("persistence false\n", "") + MOSQUITTO_PERSIST.format(dir=tmp))
    (tmp / "mosquitto-bridge.conf").write_text(
        MOSQUITTO_CONF.format(port=BRIDGE_EDGE_PORTS["mosquitto"]).replace("max_queued_messages 1000", "max_queued_messages 20000")
        + MOSQUITTO_BRIDGE.format(core=BRIDGE_CORE_PORT))
    brokers["mosquitto+bridge"] = Broker("mosquitto+bridge", ["mosquitto", "-c", str(tmp / "mosquitto-bridge.conf")], BRIDGE_EDGE_PORTS["mosquitto"])
    time.sleep(1)  # the bridges connect
    brokers["mosquitto+persistence"] = Broker("mosquitto+persistence", ["mosquitto", "-c", str(tmp / "mosquitto-persist.conf")],
                                              PERSIST_PORTS["mosquitto+persistence"])

    # (label, bench arguments, metric, target kind)
    scenarios = []
    for shape in ("fan-in", "fan-out", "pairs"):
        for qos in (0, 1):
            for payload in (16, 1024, 65536):
                target = (1.2 if shape == "fan-out" and qos == 0 else None) if payload == 65536 else (1.5 if qos == 0 else 1.3)
                scenarios.append((f"{shape} qos{qos} {payload}B", [shape, "--qos", str(qos), "--payload", str(payload)], "rate", target))
    # MQTT 5.0 clients (issue 13: at least 3x Mosquitto's MQTT 5 at QoS 0; the 3.1.1 rows above unchanged).
    for qos in (0, 1):
        for payload in (16, 1024):
            scenarios.append((f"pairs qos{qos} {payload}B MQTT 5", ["pairs", "--qos", str(qos), "--payload", str(payload), "--mqtt", "5"],
                              "rate", 3.0 if qos == 0 else None))
            # The same with publishers that send a topic alias instead of the topic (both brokers
            # accept 10).
            scenarios.append((f"pairs qos{qos} {payload}B MQTT 5 topic alias",
                              ["pairs", "--qos", str(qos), "--payload", str(payload), "--mqtt", "5", "--topic-alias"],
                              "rate", 3.0 if qos == 0 else None))
    # Throughput over TLS, each broker's TLS listener (issue 11: at least 1.5x Mosquitto).
    tls_label = "pairs qos0 1024B TLS"
    scenarios.append((tls_label, ["pairs", "--qos", "0", "--payload", "1024", "--tls-ca", str(ca)], "rate", 1.5))
    # Large payloads to a few subscribers (issue 10: at least 1.2x, as to ten).
    scenarios.append(("fan-out qos0 65536B x4", ["fan-out", "--qos", "0", "--payload", "65536", "--clients", "4"], "rate", 1.2))
    # Many slow clients, the IoT shape (issue 10): the broker's CPU time per 100k messages.
    pairs_1000, pairs_1000_args = "1000 pairs x 25 msg/s: broker CPU s per 100k msgs", ["latency", "--clients", "1000", "--rate", "25"]
    scenarios.append((pairs_1000, pairs_1000_args, "cpu_seconds_per_100k", "0.85x"))
    # A reconnect storm (issue 10: under 1 s): 15,000 clients connect at once, 1,000 under way at a time.
    storm, storm_args = "reconnect storm: 15000 clients, s to the last CONNACK", ["storm", "--connections", "15000"]
    scenarios.append((storm, storm_args, "seconds", "under 1 s"))
    # NIO's floor under both (measured in mqlite's column, beside the same runs of Mosquitto): the
    # same clients against the least a SwiftNIO server does for them, on one loop on the same core.
    relay_floor = "1000 pairs x 25 msg/s: bare SwiftNIO relay (forwards each PUBLISH to its topic's subscribers) vs Mosquitto"
    scenarios.append((relay_floor, pairs_1000_args, "cpu_seconds_per_100k", None))
    storm_floor = "reconnect storm: bare SwiftNIO server (answers each read with a CONNACK) vs Mosquitto"
    scenarios.append((storm_floor, storm_args, "seconds", None))
    # Subscription churn beside full-rate traffic (issue 10): 200 more clients connect, subscribe
    # and disconnect in a loop; the rate must stay within 10% of the same run without them.
    churn_base, churn_label = "pairs qos0 16B x20", "pairs qos0 16B x20, 200 clients churning"
    scenarios.append((churn_base, ["pairs", "--qos", "0", "--payload", "16", "--clients", "20"], "rate", None))
    scenarios.append((churn_label, ["pairs", "--qos", "0", "--payload", "16", "--clients", "20", "--churn", "200"], "rate", None))
    scenarios.append(("latency p99 (10 x 2000/s)", ["latency"], "p99_us", "lower"))
    scenarios.append(("latency p50 (10 x 2000/s)", ["latency"], "p50_us", None))
    scenarios.append((f"memory/idle connection ({CONNECTIONS})", ["connections", "--connections", CONNECTIONS], "bytes_per_connection", "lower"))
    # What the transport alone holds: sockets that never send CONNECT, and, as the reference for
    # mqlite's floor, sockets held by a SwiftNIO server that does nothing else: the same idle
    # clients (their CONNECT read with mqlite's receive options, 4 bytes answered: what NIO keeps
    # of a socket that has carried a packet each way, its last receive buffer among it), and
    # sockets never read from.
    tcp_only = ["connections", "--connections", CONNECTIONS, "--tcp-only"]
    scenarios.append((f"memory/idle TCP socket, no CONNECT ({CONNECTIONS})", tcp_only, "bytes_per_connection", None))
    nio_floor = f"memory/idle connection: bare SwiftNIO server (reads the CONNECT, answers 4 bytes) vs Mosquitto ({CONNECTIONS})"
    scenarios.append((nio_floor, ["connections", "--connections", CONNECTIONS], "bytes_per_connection", None))
    nio_unread = f"memory/idle TCP socket: bare SwiftNIO server vs Mosquitto ({CONNECTIONS})"
    scenarios.append((nio_unread, tcp_only, "bytes_per_connection", None))
    # measured in mqlite's column instead of mqlite
    stand_in = {nio_floor: "bare-nio", nio_unread: "bare-nio", relay_floor: "bare-nio-relay", storm_floor: "bare-nio"}

    results = {}  # (label, broker) -> [values]
    losses = {}
    try:
        for rnd in range(ROUNDS):
            order = ["mqlite", "mosquitto"] if rnd % 2 == 0 else ["mosquitto", "mqlite"]
            # Rows that need the same run (latency p99 and p50; Mosquitto's idle TCP sockets) share it.
            shared_runs = {}
            for label, args, metric, _ in scenarios:
                repeats = REPEATS if args[0] == "latency" and "--rate" not in args else 1
                for rep, name in ((r, n) for r in range(repeats) for n in (order if r % 2 == 0 else order[::-1])):
                    process = stand_in.get(label, name) if name == "mqlite" else name
                    key = (tuple(args), process, rep)
                    if key in shared_runs:
                        res = shared_runs[key]
                    elif args[0] == "connections" or process.startswith("bare-nio"):
                        # Memory is measured on a fresh process: one whose heap earlier scenarios
                        # grew would absorb new connections without its resident size moving.
                        # The bare servers run only for their rows.
                        fresh = fresh_broker(process, tmp, workers)
                        try:
                            res = run_bench(fresh, args + ["--pid", str(fresh.proc.pid)])
                        finally:
                            fresh.stop()
                    elif label == tls_label:
                        res = run_bench(Port(TLS_PORTS[name]), args)
                    elif "--rate" in args:
                        res = run_bench(brokers[name], args + ["--pid", str(brokers[name].proc.pid)])
                    else:
                        res = run_bench(brokers[name], args)
                    shared_runs[key] = res
                    results.setdefault((label, name), []).append(res.get(metric))
                    if res.get("churn"):
                        results.setdefault(("churn cycles", name), []).append(res.get("churn_cycles_per_second"))
                    losses[(label, name)] = losses.get((label, name), 0) + (res.get("lost") or 0)
                    print(f"round {rnd + 1} {label:32} {name:10} {res.get(metric)} lost={res.get('lost')}", flush=True)
            # The Lua layer, and metrics on (scraped every second): pairs, QoS 0, 16 B, against the
            # same build without, REPEATS times per round in rotating order.
            variants = ["mqlite", "mqlite+lua-other", "mqlite+lua-hooked", "mqlite+metrics"]
            for rep in range(REPEATS):
                shift = (rnd * REPEATS + rep) % len(variants)
                for name in variants[shift:] + variants[:shift]:
                    scraper = Scraper(METRICS_PORT) if name == "mqlite+metrics" else None
                    try:
                        res = run_bench(brokers[name], ["pairs", "--qos", "0", "--payload", "16"])
                    finally:
                        if scraper and scraper.stop() == 0:
                            res = {"error": "no scrape of /metrics answered", "lost": -1}
                    results.setdefault(("lua", name), []).append(res.get("rate"))
                    losses[("lua", name)] = losses.get(("lua", name), 0) + (res.get("lost") or 0)
                    print(f"round {rnd + 1} lua pairs qos0 16B {name:20} {res.get('rate')} lost={res.get('lost')}", flush=True)
            # Bridges: forwarded messages per second, edge to core.
            for label, args in BRIDGE_ROWS:
                for name in (("mqlite", "mosquitto") if rnd % 2 == 0 else ("mosquitto", "mqlite")):
                    res = run_bench(brokers[f"{name}+bridge"], args + ["--subscribe-port", str(BRIDGE_CORE_PORT)])
                    results.setdefault((label, name), []).append(res.get("rate"))
                    losses[(label, name)] = losses.get((label, name), 0) + (res.get("lost") or 0)
                    print(f"round {rnd + 1} {label} {name:10} {res.get('rate')} lost={res.get('lost')}", flush=True)
            # Persistence: QoS 1 to 20 persistent subscribers (each broker keeping them), and
            # clean sessions on a broker with a store against the same without.
            persist_runs = [(PERSIST_ROW, name, PERSIST_ARGS) for name in PERSIST_PORTS]
            persist_runs += [(CLEAN_ROW, name, CLEAN_ARGS) for name in ("mqlite", "mqlite+store-full")]
            shift = rnd % len(persist_runs)
            for row, name, args in persist_runs[shift:] + persist_runs[:shift]:
                res = run_bench(brokers[name], args)
                results.setdefault((row, name), []).append(res.get("rate"))
                losses[(row, name)] = losses.get((row, name), 0) + (res.get("lost") or 0)
                print(f"round {rnd + 1} {row} {name:22} {res.get('rate')} lost={res.get('lost')}", flush=True)
    finally:
        for b in brokers.values():
            b.stop()
        core.terminate()
        core.wait(10)
        shutil.rmtree(tmp, ignore_errors=True)

    def median(label, name):
        values = [v for v in results.get((label, name), []) if v is not None]
        return statistics.median(values) if values else None

    rows = []
    for label, _, metric, target in scenarios:
        a, b = median(label, "mqlite"), median(label, "mosquitto")
        ratio = a / b if a and b else None
        loss = f"{losses.get((label, 'mqlite'), 0)} / {losses.get((label, 'mosquitto'), 0)}"
        if target == "lower":
            goal, ok = "<= Mosquitto", (a is not None and b is not None and a <= b)
        elif target == "0.85x":
            goal, ok = "<= 0.85x Mosquitto", (ratio is not None and ratio <= 0.85)
        elif target == "under 1 s":
            goal, ok = "< 1 s", (a is not None and a < 1)
        elif target:
            goal, ok = f">= {target}x", (ratio is not None and ratio >= target)
        else:
            goal, ok = "", None
        unit = (" us" if metric.endswith("_us") else " B" if metric.startswith("bytes")
                else " s" if metric == "seconds" or metric.startswith("cpu") else "/s")
        rows.append((label, fmt(a, unit), fmt(b, unit), f"{ratio:.2f}" if ratio else "-", loss, goal, mark(ok)))
    # Memory per idle connection, issue 10's measure: mqlite's own share on top of NIO's floor (the
    # bare SwiftNIO server's socket after the same exchange); beside it Mosquitto's client on top
    # of its idle socket. The share over the never-read socket (NIO's last receive buffer in it) follows.
    idle, tcp = f"memory/idle connection ({CONNECTIONS})", f"memory/idle TCP socket, no CONNECT ({CONNECTIONS})"
    floor, unread, mosq_idle, mosq_tcp = (median(nio_floor, "mqlite"), median(nio_unread, "mqlite"),
                                          median(idle, "mosquitto"), median(tcp, "mosquitto"))
    mqlite_idle = median(idle, "mqlite")
    share = mqlite_idle - floor if mqlite_idle and floor else None
    mosq_share = fmt(mosq_idle - mosq_tcp if mosq_idle and mosq_tcp else None, " B")
    rows.append(("memory/idle connection: mqlite's share over the bare SwiftNIO server's socket after the same exchange (Mosquitto: over its idle TCP socket)",
                 fmt(share, " B"), mosq_share, "-", "", "< 300 B", mark(share is not None and share < 300)))
    rows.append(("memory/idle connection: mqlite's share over the bare SwiftNIO server's never-read socket",
                 fmt(mqlite_idle - unread if mqlite_idle and unread else None, " B"), mosq_share, "-", "", "", ""))
    # mqlite against NIO's floor for the same clients: what mqlite itself adds.
    for label, floor_label, server in ((pairs_1000, relay_floor, "relay"), (storm, storm_floor, "server")):
        a, f = median(label, "mqlite"), median(floor_label, "mqlite")
        rows.append((f"{label.split(':')[0]}: mqlite against the bare SwiftNIO {server}",
                     f"{a / f:.2f}x" if a and f else "-", "-", "-", "", "", ""))
    # Churn: each broker's rate with churn against its own rate without, and the churn achieved.
    with_churn = {n: median(churn_label, n) for n in ("mqlite", "mosquitto")}
    without = {n: median(churn_base, n) for n in ("mqlite", "mosquitto")}
    kept = {n: with_churn[n] / without[n] if with_churn[n] and without[n] else None for n in with_churn}
    cycles = {n: median("churn cycles", n) for n in with_churn}
    rows.append(("churn: rate with / without 200 churning clients (pairs qos0 16B x20)",
                 f"{kept['mqlite']:.2f} ({fmt(cycles['mqlite'], '/s')} cycles)" if kept["mqlite"] else "-",
                 f"{kept['mosquitto']:.2f} ({fmt(cycles['mosquitto'], '/s')} cycles)" if kept["mosquitto"] else "-",
                 "-", "", ">= 0.9 of mqlite without churn", mark(kept["mqlite"] is not None and kept["mqlite"] >= 0.9)))
    base = median("lua", "mqlite")
    for name, target in (("mqlite+lua-other", 0.97), ("mqlite+lua-hooked", 0.5), ("mqlite+metrics", 0.97)):
        v = median("lua", name)
        ratio = v / base if v and base else None
        desc = {"mqlite+lua-other": "unhooked topic, hooks on other topics", "mqlite+lua-hooked": "hooked topic, trivial transform",
                "mqlite+metrics": "metrics on: /metrics scraped every 1 s, $SYS every 1 s"}[name]
        if name == "mqlite+metrics":
            rows.append((f"{desc} (pairs qos0 16B)", fmt(v, "/s"), f"{fmt(base, '/s')} (mqlite: no http listener, $SYS every 10 s)",
                         f"{ratio:.3f}" if ratio else "-", f"{losses.get(('lua', name), 0)}", f">= {target}x of that",
                         mark(ratio is not None and ratio >= target)))
            continue
        rows.append((f"lua: {desc} (pairs qos0 16B)", fmt(v, "/s"), f"{fmt(base, '/s')} (mqlite, no plugins)",
                     f"{ratio:.3f}" if ratio else "-", f"{losses.get(('lua', name), 0)}", f">= {target}x of no plugins", mark(ratio is not None and ratio >= target)))

    for label, _ in BRIDGE_ROWS:
        a, b = median(label, "mqlite"), median(label, "mosquitto")
        ratio = a / b if a and b else None
        rows.append((label, fmt(a, "/s"), fmt(b, "/s"), f"{ratio:.2f}" if ratio else "-",
                     f"{losses.get((label, 'mqlite'), 0)} / {losses.get((label, 'mosquitto'), 0)}", ">= 3x", mark(ratio is not None and ratio >= 3)))
    mosq = median(PERSIST_ROW, "mosquitto+persistence")
    for sync, target in (("full", 1.0), ("batch", 2.0)):
        v = median(PERSIST_ROW, f"mqlite+store-{sync}")
        ratio = v / mosq if v and mosq else None
        loss = f"{losses.get((PERSIST_ROW, f'mqlite+store-{sync}'), 0)} / {losses.get((PERSIST_ROW, 'mosquitto+persistence'), 0)}"
        rows.append((f"{PERSIST_ROW}, sync {sync} (Mosquitto: persistence true)", fmt(v, "/s"), fmt(mosq, "/s"),
                     f"{ratio:.2f}" if ratio else "-", loss, f">= {target:g}x", mark(ratio is not None and ratio >= target)))
    v, base = median(CLEAN_ROW, "mqlite+store-full"), median(CLEAN_ROW, "mqlite")
    ratio = v / base if v and base else None
    rows.append((f"{CLEAN_ROW}, clean sessions, store on (sync full)", fmt(v, "/s"), f"{fmt(base, '/s')} (mqlite, no store)",
                 f"{ratio:.3f}" if ratio else "-", f"{losses.get((CLEAN_ROW, 'mqlite+store-full'), 0)}", ">= 0.97x of no store",
                 mark(ratio is not None and ratio >= 0.97)))

    rows += http_auth_rows(tmp_parent=Path(tempfile.mkdtemp(prefix="mqlite-bench-auth-")), workers=workers)

    header = ("scenario", "mqlite", "Mosquitto", "ratio", "lost (mqlite / Mosquitto)", "target", "met")
    table = [header, tuple("---" for _ in header)] + rows
    text = "\n".join("| " + " | ".join(str(c) for c in row) + " |" for row in table)
    machine = f"{platform.machine()}, {os.cpu_count()} cores, {platform.platform()}"
    mosq = subprocess.run(["mosquitto", "-h"], capture_output=True, text=True).stdout.splitlines()[0]
    report = (f"# mqlite vs Mosquitto — {datetime.now(timezone.utc).strftime('%Y-%m-%d %H:%M UTC')}\n\n"
              f"Machine: {machine}. {mosq}. Brokers pinned to CPU {BROKER_CPUS} (mqlite with {workers} worker(s)), "
              f"load generator to CPU {CLIENT_CPUS}. Medians of {ROUNDS} rounds ({ROUNDS * REPEATS} runs for the latency and Lua rows), "
              f"{DURATION} s measured after {WARMUP} s warm-up. "
              f"Rates are deliveries per second (messages received by subscribers).\n\n{text}\n")
    print("\n" + report)
    OUT.write_text(report)
    print(f"written to {OUT}")


def http_auth_rows(tmp_parent, workers):
    """Issue 12's measure: plugins/http_auth.lua against an HTTP service that answers after 100 ms
    (Tests/interop/authservice.py, on the load generator's CPU); 1,000 clients connect at once
    (the load generator's storm), while one client already connected publishes to itself in a loop
    (Tests/interop/rttprobe.py): the round trips that fall within the storm. Mosquitto has no HTTP
    auth of its own: no column for it."""
    interop = ROOT / "Tests" / "interop"
    portfile = tmp_parent / "auth-port"
    service = subprocess.Popen(["taskset", "-c", CLIENT_CPUS, sys.executable, str(interop / "authservice.py"), str(portfile), "0.1", "any"])
    seconds, rtts, refused = [], [], 0
    broker = None
    try:
        deadline = time.time() + 10
        while not (portfile.exists() and portfile.read_text().strip()) and time.time() < deadline:
            time.sleep(0.1)
        url = f"http://127.0.0.1:{portfile.read_text().strip()}/auth"
        conf = tmp_parent / "mqlite-http-auth.conf"
        conf.write_text(MQLITE_CONF.format(workers=workers, port=18907)
                        + f'[[plugin]]\nscript = "{ROOT / "plugins" / "http_auth.lua"}"\noptions = {{ url = "{url}", timeout = 10 }}\n')
        broker = Broker("mqlite+http-auth", [str(MQLITE), "-c", str(conf)], 18907)
        for rnd in range(ROUNDS):
            probe = subprocess.Popen(["taskset", "-c", CLIENT_CPUS, sys.executable, str(interop / "rttprobe.py"), "18907", "probe", "x",
                                      "probe/rtt", "4"], stdout=subprocess.PIPE, text=True)
            probe.stdout.readline()
            time.sleep(0.5)
            start = time.time()
            res = run_bench(broker, ["storm", "--connections", "1000"])
            end = time.time()
            try:
                samples = json.loads(probe.communicate(timeout=30)[0] or "[]")
            except (subprocess.TimeoutExpired, json.JSONDecodeError):
                probe.kill()
                probe.wait()
                samples = []
            during = sorted(rtt for t, rtt in samples if start <= t <= end)
            if res.get("seconds") is not None:
                seconds.append(res["seconds"])
            refused += res.get("lost") or 0
            if during:
                rtts.append(during[min(len(during) - 1, int(len(during) * 0.99))])
            print(f"round {rnd + 1} http auth storm 1000: {res.get('seconds')} s, probe p99 {rtts[-1] if rtts else None} ms "
                  f"({len(during)} round trips)", flush=True)
    finally:
        if broker:
            broker.stop()
        service.terminate()
        service.wait(5)
        shutil.rmtree(tmp_parent, ignore_errors=True)
    s = statistics.median(seconds) if seconds else None
    p99 = statistics.median(rtts) if rtts else None
    return [
        ("http auth (100 ms service): 1000 clients at once, s to the last CONNACK", fmt(s, " s"), "-", "-", f"{refused}", "< 2 s",
         mark(s is not None and s < 2)),
        ("http auth: another client's publish round trip p99 during that storm", f"{p99:.1f} ms" if p99 is not None else "-", "-", "-",
         "", "< 5 ms", mark(p99 is not None and p99 < 5)),
    ]


def fmt(v, unit):
    if v is None:
        return "-"
    if unit == " s":
        return f"{v:.2f} s"
    if unit == "/s":
        return f"{v / 1e6:.2f}M/s" if v >= 1e6 else f"{v / 1e3:.1f}k/s"
    return f"{v:.0f}{unit}"


def mark(ok):
    return "" if ok is None else ("yes" if ok else "NO")


if __name__ == "__main__":
    main()
