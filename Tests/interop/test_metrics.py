"""The `http` listener (`/metrics`, `/health`), the Prometheus counters after a known load sent by
mosquitto_pub, the `$SYS/broker/...` topics read by mosquitto_sub (and kept from `#` subscribers),
hostile HTTP peers, and the config errors of http listeners and `sys_interval`."""
import re
import socket
import subprocess
import time
import urllib.error
import urllib.request

import pytest

from conftest import BINARY, Broker, wait_for
from test_hostile import rss_kib


def metrics_config(sys_interval=1, extra=""):
    """A TCP listener, then an http one; both on ephemeral ports."""
    return (f'[server]\nworkers = 2\nsys_interval = {sys_interval}\n'
            '[[listener]]\nbind = "127.0.0.1:0"\n[[listener]]\nbind = "127.0.0.1:0"\nprotocol = "http"\n' + extra)


@pytest.fixture
def mbroker():
    b = Broker([], config_text=metrics_config(), listeners=2)
    assert "(HTTP: /metrics, /health)" in b.log()
    yield b
    b.stop()


def get(port, path, method="GET"):
    req = urllib.request.Request(f"http://127.0.0.1:{port}{path}", method=method)
    try:
        with urllib.request.urlopen(req, timeout=10) as r:
            return r.status, r.headers, r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers, e.read().decode()


def scrape(port):
    status, headers, body = get(port, "/metrics")
    assert status == 200, body
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4"), headers["Content-Type"]
    values = {}
    for line in body.splitlines():
        if not line or line.startswith("#"):
            continue
        name, value = line.rsplit(" ", 1)
        values[name] = float(value)
    return values


def delta(after, before, name):
    return after.get(name, 0) - before.get(name, 0)


def test_metrics_count_a_known_load_exactly(mbroker):
    mqtt, http = mbroker.ports
    before = scrape(http)
    for name in ['mqlite_messages_received_total{qos="0"}', 'mqlite_sessions{state="online"}', "mqlite_subscriptions",
                 'mqlite_connects_refused_total{reason="not_authorized"}', 'mqlite_messages_dropped_total{reason="queue_full"}',
                 "mqlite_retained_messages", "mqlite_inflight_messages", "mqlite_queued_messages"]:
        assert name in before, name

    sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(mqtt), "-i", "counter-sub", "-q", "1",
                            "-t", "load/#", "-C", "15", "-W", "20"], stdout=subprocess.PIPE, text=True)
    assert wait_for(lambda: scrape(http).get("mqlite_subscriptions", 0) == 1, 10)
    pub = ["mosquitto_pub", "-h", "127.0.0.1", "-p", str(mqtt), "-t", "load/x", "-l"]
    subprocess.run(pub + ["-q", "0", "-i", "pub0"], input="hello\n" * 10, text=True, check=True, timeout=20)
    subprocess.run(pub + ["-q", "1", "-i", "pub1"], input="world\n" * 5, text=True, check=True, timeout=20)
    out, _ = sub.communicate(timeout=30)
    assert out.split() == ["hello"] * 10 + ["world"] * 5
    def all_gone():
        m = scrape(http)
        return m.get('mqlite_sessions{state="online"}') == 0 and m.get('mqlite_connections{listener="127.0.0.1:0"}') == 0
    assert wait_for(all_gone, 10)
    after = scrape(http)

    assert delta(after, before, 'mqlite_messages_received_total{qos="0"}') == 10
    assert delta(after, before, 'mqlite_messages_received_total{qos="1"}') == 5
    assert delta(after, before, 'mqlite_messages_received_total{qos="2"}') == 0
    assert delta(after, before, 'mqlite_bytes_received_total{qos="0"}') == 50
    assert delta(after, before, 'mqlite_bytes_received_total{qos="1"}') == 25
    # The subscriber (QoS 1) gets QoS 0 messages at QoS 0 and QoS 1 ones at QoS 1.
    assert delta(after, before, 'mqlite_messages_sent_total{qos="0"}') == 10
    assert delta(after, before, 'mqlite_messages_sent_total{qos="1"}') == 5
    assert delta(after, before, 'mqlite_bytes_sent_total{qos="1"}') == 25
    assert delta(after, before, 'mqlite_connections_total{listener="127.0.0.1:0"}') == 3
    assert after['mqlite_connections{listener="127.0.0.1:0"}'] == 0
    assert after["mqlite_subscriptions"] == 0
    assert after['mqlite_sessions{state="offline"}'] == 0

    # A refused CONNECT is counted by reason: an empty client id with clean session 0 gets CONNACK 2.
    c = socket.create_connection(("127.0.0.1", mqtt))
    c.sendall(bytes([0x10, 12, 0, 4]) + b"MQTT" + bytes([4, 0, 0, 60, 0, 0]))
    assert c.recv(4) == b"\x20\x02\x00\x02"
    c.close()
    refused = scrape(http)
    assert delta(refused, after, 'mqlite_connects_refused_total{reason="identifier_rejected"}') == 1


def test_health_and_other_paths(mbroker):
    _, http = mbroker.ports
    status, headers, body = get(http, "/health")
    assert (status, body) == (200, "ok\n")
    assert headers["Connection"] == "close"
    assert get(http, "/nope")[0] == 404
    assert get(http, "/")[0] == 404
    assert get(http, "/metrics", method="POST")[0] == 405
    # curl, as an operator would run it.
    r = subprocess.run(["curl", "-sf", f"http://127.0.0.1:{http}/metrics"], capture_output=True, text=True, timeout=20)
    assert r.returncode == 0 and "mqlite_uptime_seconds" in r.stdout


def test_sys_topics_for_sys_subscribers_only(mbroker):
    mqtt, http = mbroker.ports
    everything = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(mqtt), "-t", "#", "-v", "-W", "4"],
                                  stdout=subprocess.PIPE, text=True)
    time.sleep(0.5)
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(mqtt), "-t", "plain/topic", "-m", "hi"], check=True, timeout=20)
    # The retained round, then a fresh one (30 topics each); later values replace earlier ones.
    r = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(mqtt), "-t", "$SYS/#", "-F", "%t\t%p", "-C", "60",
                        "-W", "10"], capture_output=True, text=True, timeout=30)
    topics = {}
    for line in r.stdout.splitlines():
        topic, _, value = line.partition("\t")
        topics[topic] = value
    for name in ["version", "uptime", "clients/connected", "clients/total", "clients/maximum", "messages/received",
                 "messages/sent", "load/messages/received/1min", "load/messages/received/5min",
                 "load/messages/received/15min", "subscriptions/count", "retained messages/count", "bytes/received",
                 "bytes/sent"]:
        assert f"$SYS/broker/{name}" in topics, (name, r.stdout)
    assert topics["$SYS/broker/version"].startswith("mqlite ")
    assert re.fullmatch(r"\d+ seconds", topics["$SYS/broker/uptime"])
    assert int(topics["$SYS/broker/clients/connected"]) >= 2  # the two subscribers
    assert int(topics["$SYS/broker/clients/maximum"]) >= 2
    assert int(topics["$SYS/broker/messages/received"]) >= 1
    assert int(topics["$SYS/broker/subscriptions/count"]) >= 1
    assert int(topics["$SYS/broker/retained messages/count"]) >= 10  # the $SYS topics themselves
    float(topics["$SYS/broker/load/messages/received/1min"])
    out, _ = everything.communicate(timeout=20)
    assert out.splitlines() == ["plain/topic hi"], out


def test_sys_interval_zero_publishes_nothing():
    b = Broker([], config_text=metrics_config(sys_interval=0), listeners=2)
    try:
        mqtt, _ = b.ports
        r = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(mqtt), "-t", "$SYS/#", "-v", "-W", "2"],
                           capture_output=True, text=True, timeout=20)
        assert r.stdout == "", r.stdout
    finally:
        b.stop()


def read_until_closed(s, timeout):
    s.settimeout(timeout)
    data = b""
    try:
        while True:
            chunk = s.recv(65536)
            if not chunk:
                return data, True
            data += chunk
    except (socket.timeout, TimeoutError):
        return data, False
    except ConnectionResetError:
        return data, True


def test_request_then_half_close_is_answered(mbroker):
    # A client that shuts its sending side right after the request (nc -N, HTTP/1.0 tools) still
    # gets the answer (RFC 9112 section 9.6); /metrics answers after every worker reported.
    _, http = mbroker.ports
    for request in (b"GET /metrics HTTP/1.0\r\n\r\n", b"GET /metrics HTTP/1.1\r\nHost: x\r\n\r\n", b"GET /health HTTP/1.0\r\n\r\n"):
        s = socket.create_connection(("127.0.0.1", http))
        s.sendall(request)
        s.shutdown(socket.SHUT_WR)
        data, closed = read_until_closed(s, 5)
        assert closed and data.startswith(b"HTTP/1.1 200"), (request, data[:100])
        s.close()
    # HTTP/1.1 without Host, or with two: 400 (RFC 9112 section 3.2); HTTP/1.0 needs none.
    for request in (b"GET /metrics HTTP/1.1\r\n\r\n", b"GET /health HTTP/1.1\r\nHost: a\r\nHost: b\r\n\r\n"):
        s = socket.create_connection(("127.0.0.1", http))
        s.sendall(request)
        data, closed = read_until_closed(s, 5)
        assert closed and data.startswith(b"HTTP/1.1 400"), (request, data[:100])
        s.close()
    # A request cut short by the client's shutdown is closed without an answer.
    s = socket.create_connection(("127.0.0.1", http))
    s.sendall(b"GET /metrics HTTP/1.1\r\nHost: x\r\n")
    s.shutdown(socket.SHUT_WR)
    data, closed = read_until_closed(s, 5)
    assert closed and not data.startswith(b"HTTP/1.1 200"), data[:100]
    s.close()


def test_hostile_http_peers_are_closed(mbroker):
    _, http = mbroker.ports
    # A header that never ends: 400 and closed once over the request limit.
    s = socket.create_connection(("127.0.0.1", http))
    try:
        s.sendall(b"GET /metrics HTTP/1.1\r\nX-Long: " + b"a" * 100_000)
    except (BrokenPipeError, ConnectionResetError):
        pass
    data, closed = read_until_closed(s, 5)
    assert closed, data
    assert data == b"" or data.startswith(b"HTTP/1.1 400"), data
    s.close()

    # Many connections sending endless headers: memory stays bounded.
    time.sleep(0.3)
    before = rss_kib(mbroker.proc.pid)
    for _ in range(200):
        s = socket.create_connection(("127.0.0.1", http))
        try:
            for _ in range(8):
                s.sendall(b"X-Junk: " + b"b" * 4000 + b"\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        s.close()
    time.sleep(0.5)
    assert rss_kib(mbroker.proc.pid) - before < 20_000

    # A request that never completes is closed by the request timeout (10 s).
    s = socket.create_connection(("127.0.0.1", http))
    s.sendall(b"GET /health HTTP/1.1\r\n")
    started = time.monotonic()
    data, closed = read_until_closed(s, 15)
    assert closed and data == b"", data
    assert 8 <= time.monotonic() - started <= 14
    s.close()


@pytest.mark.parametrize("key,value", [("certfile", '"server.crt"'), ("keyfile", '"server.key"'), ("cafile", '"ca.crt"'),
                                       ("require_certificate", "true"), ("use_identity_as_username", "false"),
                                       ("proxy_protocol", "true")])
def test_tls_or_proxy_keys_on_http_listener_exit_2(tmp_path, key, value):
    conf = tmp_path / "http.conf"
    conf.write_text(f'[[listener]]\nbind = "127.0.0.1:0"\n[[listener]]\nbind = "127.0.0.1:0"\nprotocol = "http"\n{key} = {value}\n')
    r = subprocess.run([BINARY, "-c", str(conf)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r.stderr
    assert str(conf) in r.stderr and f"listener[1].{key}" in r.stderr and "not allowed on an http listener" in r.stderr, r.stderr


def test_bad_sys_interval_exits_2(tmp_path):
    for value, problem in [("-1", "from 0 to 86400"), ('"10"', "must be of type int"), ("86401", "from 0 to 86400")]:
        conf = tmp_path / "sys.conf"
        conf.write_text(f"[server]\nsys_interval = {value}\n")
        r = subprocess.run([BINARY, "-c", str(conf), "--check"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "server.sys_interval" in r.stderr and problem in r.stderr, (value, r.stderr)


LUA = """
mqlite.on_publish("lua/#", function(m)
  if m.payload == "boom" then error("boom") end
  if m.payload == "spin" then while true do end end
  if m.payload == "bad" then return 42 end
  if m.payload == "drop" then return false end
  return true
end)
"""


def test_lua_hook_calls_failures_and_durations(tmp_path):
    script = tmp_path / "counted.lua"
    script.write_text(LUA)
    b = Broker([], config_text=metrics_config(extra=f'[[plugin]]\nscript = "{script}"\n[scripting]\ninstruction_limit = 100000\n'),
               listeners=2)
    try:
        mqtt, http = b.ports
        for payload in ["ok", "ok", "boom", "spin", "bad", "drop"]:
            subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(mqtt), "-t", "lua/x", "-m", payload, "-q", "1"],
                           check=True, timeout=20)
        labels = 'script="counted.lua",hook="on_publish"'
        m = scrape(http)
        assert m[f"mqlite_lua_hook_calls_total{{{labels}}}"] == 6
        assert m[f'mqlite_lua_hook_failures_total{{{labels},kind="error"}}'] == 1
        assert m[f'mqlite_lua_hook_failures_total{{{labels},kind="instruction_limit"}}'] == 1
        assert m[f'mqlite_lua_hook_failures_total{{{labels},kind="bad_return"}}'] == 1
        assert m[f'mqlite_lua_hook_failures_total{{{labels},kind="time_limit"}}'] == 0
        assert m[f"mqlite_lua_hook_duration_seconds_count{{{labels}}}"] == 6
        assert m[f'mqlite_lua_hook_duration_seconds_bucket{{{labels},le="+Inf"}}'] == 6
        # The hook's drops (its false, and its three failures) are messages dropped by a hook.
        assert m['mqlite_messages_dropped_total{reason="hook"}'] == 4
    finally:
        b.stop()


def test_max_retained_with_mosquitto_clients():
    """Past `max_retained`, mosquitto_pub's retained messages on new topics are delivered but not
    kept: a later mosquitto_sub gets only the first ones; counted and logged once."""
    b = Broker([], config_text=metrics_config(extra="[limits]\nmax_retained = 3\n"), listeners=2)
    try:
        mqtt, http = b.ports
        live = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(mqtt), "-t", "r/#", "-C", "5", "-W", "20", "-v"],
                                stdout=subprocess.PIPE, text=True)
        assert wait_for(lambda: scrape(http).get("mqlite_subscriptions", 0) == 1, 10)
        for i in range(5):
            subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(mqtt), "-q", "1", "-r", "-t", f"r/{i}", "-m", f"m{i}"],
                           check=True, timeout=20)
        out, _ = live.communicate(timeout=30)
        assert out.splitlines() == [f"r/{i} m{i}" for i in range(5)]
        # (Line-buffered: mosquitto_sub leaves on its -W timeout without flushing a pipe.)
        late = subprocess.run(["stdbuf", "-oL", "mosquitto_sub", "-h", "127.0.0.1", "-p", str(mqtt), "-t", "r/#", "-v", "-W", "2"],
                              capture_output=True, text=True, timeout=20)
        assert sorted(late.stdout.splitlines()) == [f"r/{i} m{i}" for i in range(3)]
        m = scrape(http)
        assert m["mqlite_retained_refused_total"] == 2
        assert m["mqlite_retained_messages"] >= 3 and m["mqlite_retained_bytes"] > 0
        assert b.log().count("retained messages at their limit") == 1, b.log()
    finally:
        b.stop()
