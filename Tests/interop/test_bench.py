"""The benchmark's load generator against the real broker: each scenario runs, counts and reports.

Short runs of the debug build: these check that `make bench` can rely on the tool, not speed.
"""
import json
import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from test_tls import certs, tls_config  # noqa: F401 (certs is a fixture)
from test_tls import start as start_tls

ROOT = Path(__file__).resolve().parents[2]
BENCH = os.environ.get("MQLITE_BENCH_BIN", str(ROOT / ".build" / "debug" / "mqlite-bench"))


def bench(port, *args):
    r = subprocess.run([BENCH, *args, "--port", str(port), "--duration", "0.3", "--warmup", "0.1"],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


@pytest.mark.parametrize("scenario,qos,payload", [
    ("pairs", 0, 16), ("pairs", 1, 1024), ("fan-in", 1, 16), ("fan-out", 0, 65536),
])
def test_throughput_counts_every_delivery(broker, scenario, qos, payload):
    r = bench(broker.port, scenario, "--qos", str(qos), "--payload", str(payload), "--clients", "3")
    assert r["scenario"] == scenario and r["qos"] == qos and r["payload"] == payload
    assert r["rate"] > 0
    assert r["lost"] == 0
    fanout = 3 if scenario == "fan-out" else 1
    assert r["delivered"] == r["expected"] == r["published"] * fanout > 0


def test_persistent_subscribers_and_a_bridge(tmp_path):
    """--persistent (clean session 0 subscribers, on a broker with a store) and --subscribe-port
    (subscribers on another broker: an edge bridging to a core)."""
    from conftest import Broker
    from test_persistence import free_port
    core_port = free_port()
    core = Broker([], config_text=f'[[listener]]\nbind = "127.0.0.1:{core_port}"\n[persistence]\npath = "{tmp_path}/core.db"\n')
    edge = Broker([], config_text=f'[[listener]]\nbind = "127.0.0.1:0"\n[[bridge]]\nname = "core"\naddress = "127.0.0.1:{core_port}"\n'
                                  '[[bridge.topic]]\npattern = "bench/#"\nqos = 1\n')
    try:
        r = bench(core_port, "fan-out", "--qos", "1", "--clients", "3", "--persistent")
        assert r["lost"] == 0 and r["delivered"] == r["expected"] > 0
        time.sleep(0.5)  # (the bridge connects)
        r = bench(edge.port, "pairs", "--qos", "1", "--clients", "2", "--subscribe-port", str(core_port))
        assert r["lost"] == 0 and r["delivered"] == r["expected"] > 0
    finally:
        edge.stop()
        core.stop()


def test_latency_reports_percentiles(broker):
    r = bench(broker.port, "latency", "--clients", "2", "--rate", "500")
    assert r["lost"] == 0
    assert 0 < r["p50_us"] <= r["p99_us"] <= r["max_us"]


def test_connections_reads_the_broker_memory(broker):
    # Each of the 200 gets CONNACK 0 before it counts (else the tool fails).
    r = bench(broker.port, "connections", "--connections", "200", "--pid", str(broker.proc.pid))
    assert r["connections"] == 200
    assert r["rss_before"] > 0 and r["rss_after"] > 0
    assert r["bytes_per_connection"] == (r["rss_after"] - r["rss_before"]) / 200


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_bare(mode):
    """`mqlite-bench bare-nio-server` or `bare-nio-relay` on a free port, once it listens."""
    port = free_port()
    server = subprocess.Popen([BENCH, mode, "--port", str(port)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, port
        except OSError:
            if time.monotonic() >= deadline or server.poll() is not None:
                server.kill()
                raise AssertionError(f"{mode} did not start")
            time.sleep(0.1)


def test_bare_nio_server_holds_sockets():
    server, port = start_bare("bare-nio-server")
    try:
        r = bench(port, "connections", "--connections", "200", "--tcp-only", "--pid", str(server.pid))
        assert r["connections"] == 200 and r["rss_after"] > 0
        # Idle MQTT clients: each CONNECT is answered as a broker would (the floor after one exchange).
        r = bench(port, "connections", "--connections", "200", "--pid", str(server.pid))
        assert r["connections"] == 200 and r["rss_after"] > 0
        # The storm's clients get their CONNACKs from it too (NIO's floor for that row).
        r = bench(port, "storm", "--connections", "300")
        assert r["connected"] == 300 and r["lost"] == 0
        assert server.poll() is None
    finally:
        server.terminate()
        server.wait(10)


def test_bare_nio_relay_forwards_by_topic():
    """NIO's floor for the many-slow-clients row: as many of the latency clients' messages arrive as
    were sent (none lost; one forwarded to every subscriber would arrive 20 times), and its CPU is read."""
    server, port = start_bare("bare-nio-relay")
    try:
        r = bench(port, "latency", "--clients", "20", "--rate", "50", "--pid", str(server.pid))
        assert r["lost"] == 0 and r["received"] > 0 and r["broker_cpu_seconds"] >= 0
        assert server.poll() is None
    finally:
        server.terminate()
        server.wait(10)


def test_pairs_over_tls(certs):
    """--tls-ca: every connection over TLS, the broker's certificate checked against the CA."""
    b = start_tls(tls_config(certs))
    try:
        secure = b.ports[1]
        r = bench(secure, "pairs", "--qos", "0", "--payload", "1024", "--clients", "3", "--tls-ca", str(certs / "ca.crt"))
        assert r["tls"] is True and r["lost"] == 0
        assert r["delivered"] == r["expected"] == r["published"] > 0
        # A CA that did not sign the broker's certificate: the handshake fails, and so does the run.
        r = subprocess.run([BENCH, "pairs", "--port", str(secure), "--clients", "1", "--duration", "0.3", "--warmup", "0.1",
                            "--tls-ca", str(certs / "other-ca.crt")], capture_output=True, text=True, timeout=60)
        assert r.returncode != 0
    finally:
        b.stop()
