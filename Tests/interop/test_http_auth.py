"""plugins/http_auth.lua against a real HTTP service process, with mosquitto clients and paho-mqtt:
hooks that wait on HTTP (mqlite.http.request) while the broker serves everyone else."""
import json
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import ROOT, Broker, wait_for
from test_interop import paho_client, start

HERE = Path(__file__).resolve().parent


class AuthService:
    """tests/interop/authservice.py in its own process."""

    def __init__(self, tmp_path, delay):
        portfile = tmp_path / f"auth-port-{time.monotonic_ns()}"
        self.proc = subprocess.Popen([sys.executable, str(HERE / "authservice.py"), str(portfile), str(delay)])
        assert wait_for(lambda: portfile.exists() and portfile.read_text().strip() != "", 10)
        self.port = int(portfile.read_text())
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.proc.terminate()
        self.proc.wait(5)


@pytest.fixture
def service(tmp_path):
    s = AuthService(tmp_path, 0.1)
    yield s
    s.stop()


def broker_with(tmp_path, options, workers=2, extra=""):
    text = (f'[server]\nworkers = {workers}\n[[listener]]\nbind = "127.0.0.1:0"\n{extra}'
            f'[[plugin]]\nscript = "{ROOT / "plugins" / "http_auth.lua"}"\noptions = {options}\n')
    path = tmp_path / "mqlite.conf"
    path.write_text(text)
    return Broker(["-c", str(path)])


def mosquitto_pub(port, *args):
    return subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), *args],
                          capture_output=True, text=True, timeout=15)


def test_accepts_refuses_and_applies_the_acl(tmp_path, service):
    b = broker_with(tmp_path, f'{{ url = "{service.url}/auth", timeout = 2 }}')
    try:
        ok = mosquitto_pub(b.port, "-i", "dev1", "-u", "alice", "-P", "secret", "-t", "dev/dev1/x", "-m", "hi", "-q", "1")
        assert ok.returncode == 0, ok.stderr
        bad = mosquitto_pub(b.port, "-i", "dev2", "-u", "alice", "-P", "wrong", "-t", "dev/dev2/x", "-m", "hi")
        assert bad.returncode != 0 and "not authori" in bad.stderr.lower()

        # The ACL the service answered: dev/<client id>/# and cmd/<user name>/#.
        c = paho_client("dev3")
        c.username_pw_set("bob", "secret")
        start(c, b.port)
        granted = []
        c.on_subscribe = lambda client, userdata, mid, codes, props: granted.extend(codes)
        c.subscribe([("dev/dev3/#", 1), ("cmd/bob/#", 0), ("dev/other/#", 0)])
        assert wait_for(lambda: len(granted) == 3)
        assert [code.value for code in granted] == [1, 0, 0x80]
        c.publish("dev/dev3/t", "mine", qos=1).wait_for_publish(5)
        c.publish("cmd/bob/t", "denied: publish is dev/%c/# only", qos=1).wait_for_publish(5)
        assert wait_for(lambda: len(c.messages) >= 1)
        time.sleep(0.3)
        assert [m.payload for m in c.messages] == [b"mine"]
        # A reload runs on_authorize again: the same rules, not none and not all.
        b.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "scripts reloaded" in b.log())
        c.publish("dev/dev3/t", "still mine", qos=1).wait_for_publish(5)
        c.publish("cmd/bob/t", "still denied", qos=1).wait_for_publish(5)
        assert wait_for(lambda: len(c.messages) >= 2)
        time.sleep(0.3)
        assert [m.payload for m in c.messages] == [b"mine", b"still mine"]
        c.disconnect()
        c.loop_stop()

        # A 200 without a body: no restriction.
        free = paho_client("anything")
        free.username_pw_set("free", "secret")
        start(free, b.port)
        free.subscribe("other/#", 0)
        time.sleep(0.3)
        free.publish("other/x", "open", qos=1).wait_for_publish(5)
        assert wait_for(lambda: [m.payload for m in free.messages] == [b"open"])
        free.disconnect()
        free.loop_stop()
    finally:
        b.stop()


def test_a_malformed_acl_answer_never_allows_everything(tmp_path, service):
    b = broker_with(tmp_path, f'{{ url = "{service.url}/auth" }}')
    try:
        # A key the broker does not know: connected, but allowed nothing.
        c = paho_client("typo-client")
        c.username_pw_set("typo", "secret")
        start(c, b.port)
        granted = []
        c.on_subscribe = lambda client, userdata, mid, codes, props: granted.extend(codes)
        c.subscribe("#", 0)
        assert wait_for(lambda: len(granted) == 1)
        assert granted[0].value == 0x80
        c.disconnect()
        c.loop_stop()
        # Not a JSON object: refused.
        r = mosquitto_pub(b.port, "-u", "array", "-P", "secret", "-t", "t", "-m", "x")
        assert r.returncode != 0 and "not authori" in r.stderr.lower()
        assert wait_for(lambda: "is not a JSON object" in b.log())
    finally:
        b.stop()


def test_packets_sent_behind_connect_wait_for_the_hooks_in_order(tmp_path, service):
    """CONNECT, SUBSCRIBE and three PUBLISHes in one write: the packets after CONNECT wait for
    on_connect (an HTTP call of 100 ms), then are handled in order, under the ACL it answered."""
    b = broker_with(tmp_path, f'{{ url = "{service.url}/auth" }}')
    try:
        def s(data):
            return struct.pack("!H", len(data)) + data
        connect = s(b"MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 60) + s(b"dev5") + s(b"u") + s(b"secret")
        subscribe = b"\x00\x01" + s(b"dev/dev5/#") + b"\x00"
        data = bytes([0x10, len(connect)]) + connect + bytes([0x82, len(subscribe)]) + subscribe
        for i in range(3):
            body = s(b"dev/dev5/n") + str(i).encode()
            data += bytes([0x30, len(body)]) + body
        c = socket.create_connection(("127.0.0.1", b.port))
        c.settimeout(5)
        start_time = time.monotonic()
        c.sendall(data)
        got = b""
        expected = 4 + 5 + 3 * (2 + 2 + 10 + 1)
        while len(got) < expected:
            chunk = c.recv(4096)
            assert chunk, f"closed after {got!r}"
            got += chunk
        assert time.monotonic() - start_time >= 0.1, "answered before the HTTP call could have"
        assert got[:4] == b"\x20\x02\x00\x00"               # CONNACK accepted
        assert got[4:9] == b"\x90\x03\x00\x01\x00"         # SUBACK: granted QoS 0
        payloads = [got[9 + i * 15 + 14:9 + i * 15 + 15] for i in range(3)]
        assert payloads == [b"0", b"1", b"2"]
        c.close()
    finally:
        b.stop()


def down_service_url(tmp_path):
    """The URL of a service that was there and is gone (its port refuses connections)."""
    service = AuthService(tmp_path, 0)
    service.stop()
    return service.url


def test_service_down_refuses_with_on_error_deny_and_says_why(tmp_path):
    b = broker_with(tmp_path, f'{{ url = "{down_service_url(tmp_path)}/auth" }}')
    try:
        start_time = time.monotonic()
        r = mosquitto_pub(b.port, "-u", "alice", "-P", "secret", "-t", "t", "-m", "x")
        assert r.returncode != 0 and "not authori" in r.stderr.lower()
        assert time.monotonic() - start_time < 2, "a refused connection fails at once, not after the timeout"
        assert wait_for(lambda: "Lua hook failed" in b.log() and "Connection refused" in b.log())
    finally:
        b.stop()


def test_service_down_with_on_error_allow_is_no_opinion(tmp_path):
    b = broker_with(tmp_path, f'{{ url = "{down_service_url(tmp_path)}/auth" }}', extra='[scripting]\non_error = "allow"\n[auth]\nallow_anonymous = false\n')
    try:
        # No opinion: a client with a user name is accepted, an anonymous one is not.
        assert mosquitto_pub(b.port, "-u", "alice", "-P", "whatever", "-t", "t", "-m", "x").returncode == 0
        assert mosquitto_pub(b.port, "-t", "t", "-m", "x").returncode != 0
    finally:
        b.stop()


def test_slow_service_times_out_and_keep_alive_is_not_counted_while_waiting(tmp_path):
    slow = AuthService(tmp_path, 3)
    b = broker_with(tmp_path, f'{{ url = "{slow.url}/auth", timeout = 0.5 }}')
    try:
        r = mosquitto_pub(b.port, "-u", "alice", "-P", "secret", "-t", "t", "-m", "x")
        assert r.returncode != 0
        assert wait_for(lambda: "timeout" in b.log())
    finally:
        b.stop()
        slow.stop()


def percentile(values, p):
    values = sorted(values)
    return values[min(len(values) - 1, int(len(values) * p))]


def test_thousand_clients_connect_at_once_while_another_client_is_served(tmp_path, service):
    """The issue's measure: an auth service answering after 100 ms; 1,000 clients connecting at
    once are all accepted together (one after another would take 100 s), and a client already
    connected keeps its publish round trip short meanwhile (the workers are not blocked). The
    bounds here leave room for a debug build on a loaded 2-core machine; `make bench`'s numbers
    come from the release build."""
    b = broker_with(tmp_path, f'{{ url = "{service.url}/auth", timeout = 10 }}', extra="[limits]\nmax_connections = 5000\n")
    probe = None
    try:
        probe = subprocess.Popen([sys.executable, str(HERE / "rttprobe.py"), str(b.port), "free", "secret", "probe/rtt", "6"],
                                 stdout=subprocess.PIPE, text=True)
        assert probe.stdout.readline().strip() == "ready"
        time.sleep(0.5)
        window_start = time.time()
        storm = subprocess.run([sys.executable, str(HERE / "connectstorm.py"), str(b.port), "1000", "secret"],
                               capture_output=True, text=True, timeout=60)
        window_end = time.time()
        result = json.loads(storm.stdout)
        samples = json.loads(probe.communicate(timeout=20)[0])
        during = [rtt for t, rtt in samples if window_start <= t <= window_end]
        print(f"1000 connects in {result['seconds']:.2f} s; probe during: n={len(during)} "
              f"p50={percentile(during, 0.5):.2f} ms p99={percentile(during, 0.99):.2f} ms max={max(during):.2f} ms")
        assert result["codes"] == {"0": 1000}
        assert result["seconds"] < 8
        assert len(during) > 20, "the probe was stalled for the whole storm"
        assert percentile(during, 0.5) < 20
    finally:
        if probe and probe.poll() is None:
            probe.kill()
            probe.wait()
        b.stop()


def test_a_password_that_is_not_utf8_is_refused_not_a_service_failure(tmp_path, service):
    """MQTT passwords are bytes; the plugin's JSON request cannot carry one that is not UTF-8.
    json.encode failed, the hook failed, and with on_error = "allow" that client was let in without
    the service being asked (and could take over another client's id). Now it is refused
    (CONNACK 4) whatever on_error says; the others still go through the service."""
    b = broker_with(tmp_path, f'{{ url = "{service.url}/auth" }}', extra='[scripting]\non_error = "allow"\n')
    try:
        def connect(password):
            s = socket.create_connection(("127.0.0.1", b.port), timeout=10)
            cid, user = b"intruder", b"nobody"
            body = (b"\x00\x04MQTT\x04\xc2\x00\x3c" + struct.pack(">H", len(cid)) + cid
                    + struct.pack(">H", len(user)) + user + struct.pack(">H", len(password)) + password)
            s.sendall(bytes([0x10, len(body)]) + body)
            answer = s.recv(4)
            s.close()
            return answer
        assert connect(b"\xff\xfe") == b"\x20\x02\x00\x04"
        assert "Lua hook failed" not in b.log()
        # A UTF-8 password still asks the service, which refuses this user (401 -> CONNACK 5).
        assert connect("ü-secret".encode()) == b"\x20\x02\x00\x05"
    finally:
        b.stop()


def test_refusals_are_not_cached_so_wrong_passwords_cannot_fill_the_cache(tmp_path, service):
    """With cache_ttl, admissions are kept in mqlite.kv; refusals are not: clients with wrong
    passwords (60 here) would fill a small kv_max_bytes, after which nobody else could be admitted."""
    b = broker_with(tmp_path, f'{{ url = "{service.url}/auth", timeout = 2, cache_ttl = 600 }}', workers=1,
                    extra="[scripting]\nkv_max_bytes = 4096\n")
    try:
        for i in range(60):
            bad = mosquitto_pub(b.port, "-i", f"guess{i}", "-u", "mallory", "-P", f"guess{i}", "-t", "x", "-m", "x")
            assert bad.returncode != 0
        ok = mosquitto_pub(b.port, "-i", "dev9", "-u", "alice", "-P", "secret", "-t", "dev/dev9/x", "-m", "hi", "-q", "1")
        assert ok.returncode == 0, ok.stderr + b.log()[-2000:]
        assert "kv_max_bytes reached" not in b.log()
    finally:
        b.stop()
