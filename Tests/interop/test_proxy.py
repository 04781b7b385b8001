"""PROXY protocol listeners (`proxy_protocol = true`) of the real binary: v1 and v2 headers over raw
sockets (before MQTT, TLS and WebSocket), the address scripts see, refusals, and hostile peers."""
import json
import socket
import ssl
import struct
import subprocess
import time

import pytest

import wsclient
from conftest import Broker, wait_for
from test_hostile import rss_kib, settle
from test_interop import paho_client, start
from test_tls import certs  # noqa: F401 (the module's certificate fixture)

CONNACK_OK = b"\x20\x02\x00\x00"
SIG = b"\r\n\r\n\x00\r\nQUIT\n"

RECORDER = """
-- Publishes (retained) the address and listener each client is seen with.
mqlite.on_connect(function(c)
  mqlite.publish("seen/" .. c.client_id, mqlite.json.encode({ address = c.address, listener = c.listener }), 1, true)
  return nil
end)
"""


def connect_packet(client_id):
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02\x00\x3c" + struct.pack("!H", len(cid)) + cid
    return bytes([0x10, len(body)]) + body


def v2(command, family, body):
    return SIG + bytes([0x20 | command, family]) + struct.pack("!H", len(body)) + body


def v2_inet(src, sport, dst="10.0.0.1", dport=1883, command=1):
    return v2(command, 0x11, socket.inet_aton(src) + socket.inet_aton(dst) + struct.pack("!HH", sport, dport))


def v2_inet6(src, sport, dst="2001:db8::1", dport=1883):
    body = socket.inet_pton(socket.AF_INET6, src) + socket.inet_pton(socket.AF_INET6, dst) + struct.pack("!HH", sport, dport)
    # A TLV after the addresses (PP2_TYPE_AUTHORITY), as load balancers add.
    return v2(1, 0x21, body + b"\x02\x00\x0cmqtt.example")


def proxy_config(tmp_path, certs_dir=None, extra=""):
    """listener 0: plain (to read what the script saw); 1: MQTT with PROXY; 2: WebSocket with PROXY;
    3 (with `certs_dir`): MQTT over TLS with PROXY."""
    script = tmp_path / "recorder.lua"
    script.write_text(RECORDER)
    text = ('[server]\nworkers = 2\n'
            '[[listener]]\nbind = "127.0.0.1:0"\n'
            '[[listener]]\nbind = "127.0.0.1:0"\nproxy_protocol = true\n'
            '[[listener]]\nbind = "127.0.0.1:0"\nprotocol = "websockets"\nproxy_protocol = true\n')
    if certs_dir:
        text += f'[[listener]]\nbind = "127.0.0.1:0"\nproxy_protocol = true\ncertfile = "{certs_dir}/server.crt"\nkeyfile = "{certs_dir}/server.key"\n'
    text += extra
    text += f'[[plugin]]\nscript = "{script}"\n'
    return text


@pytest.fixture
def pbroker(tmp_path):
    b = Broker([], config_text=proxy_config(tmp_path), listeners=3)
    assert "(PROXY protocol)" in b.log() and "(WebSocket, PROXY protocol)" in b.log()
    yield b
    b.stop()


def read_seen(port, client_id):
    r = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-t", f"seen/{client_id}", "-C", "1", "-W", "5"],
                       capture_output=True, text=True, timeout=15)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def recv_exactly(s, n):
    data = b""
    while len(data) < n:
        chunk = s.recv(n - len(data))
        if not chunk:
            break
        data += chunk
    return data


def proxied_connect(port, header, client_id, byte_at_a_time=False, packet=None):
    """`header`, then CONNECT (`packet`, or a plain one for `client_id`); waits for CONNACK 0."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    data = header + (packet or connect_packet(client_id))
    if byte_at_a_time:
        for i in range(len(data)):
            s.sendall(data[i:i + 1])
            time.sleep(0.002)
    else:
        s.sendall(data)  # header and CONNECT in one segment
    assert recv_exactly(s, 4) == CONNACK_OK
    return s


def closed(s, timeout=5):
    s.settimeout(timeout)
    try:
        while True:
            if not s.recv(4096):
                return True
    except socket.timeout:
        return False
    except (ConnectionResetError, ssl.SSLError):  # a reset, or TLS's ragged EOF
        return True


def test_v1_and_v2_addresses_reach_scripts(pbroker):
    plain, proxied = pbroker.ports[0], pbroker.ports[1]
    cases = [
        ("v1-tcp4", b"PROXY TCP4 203.0.113.9 10.0.0.1 51234 1883\r\n", "203.0.113.9:51234", False),
        ("v1-tcp6", b"PROXY TCP6 2001:db8::9 2001:db8::1 51235 1883\r\n", "2001:db8::9:51235", False),
        ("v2-inet", v2_inet("198.51.100.20", 40000), "198.51.100.20:40000", False),
        ("v2-inet6", v2_inet6("2001:db8::20", 40001), "2001:db8::20:40001", False),
        ("v2-bytewise", v2_inet("198.51.100.21", 40002), "198.51.100.21:40002", True),
        ("v1-bytewise", b"PROXY TCP4 203.0.113.10 10.0.0.1 51236 1883\r\n", "203.0.113.10:51236", True),
    ]
    socks = []
    for client_id, header, expected, bytewise in cases:
        socks.append(proxied_connect(proxied, header, client_id, bytewise))
        seen = read_seen(plain, client_id)
        assert seen == {"address": expected, "listener": "127.0.0.1:0"}, client_id
    for s in socks:
        s.close()


def test_local_and_unknown_keep_the_socket_address(pbroker):
    plain, proxied = pbroker.ports[0], pbroker.ports[1]
    for client_id, header in (("v2-local", v2_inet("192.0.2.1", 1, command=0)), ("v1-unknown", b"PROXY UNKNOWN\r\n")):
        s = proxied_connect(proxied, header, client_id)
        local_port = s.getsockname()[1]
        assert read_seen(plain, client_id)["address"] == f"127.0.0.1:{local_port}"
        s.close()


def proxied_websocket(port, header, packet):
    """`header`, the WebSocket upgrade, then CONNECT (`packet`) in a frame; waits for CONNACK 0."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    s.sendall(header)
    status, _, _, rest = wsclient.handshake(s)
    assert status.startswith("HTTP/1.1 101"), status
    ws = wsclient.WS(s, rest)
    ws.send(packet)
    assert ws.recv_mqtt(4) == CONNACK_OK
    return s, ws


def test_proxy_header_before_websocket_upgrade(pbroker):
    plain, ws_port = pbroker.ports[0], pbroker.ports[2]
    s, _ = proxied_websocket(ws_port, b"PROXY TCP4 203.0.113.77 10.0.0.1 61000 443\r\n", connect_packet("ws-proxied"))
    assert read_seen(plain, "ws-proxied")["address"] == "203.0.113.77:61000"
    s.close()


def test_proxy_header_before_tls(certs, tmp_path):  # noqa: F811
    b = Broker([], config_text=proxy_config(tmp_path, certs), listeners=4)
    try:
        plain, tls_port = b.ports[0], b.ports[3]
        raw = socket.create_connection(("127.0.0.1", tls_port), timeout=5)
        raw.sendall(v2_inet6("2001:db8::77", 443))
        context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        s = context.wrap_socket(raw, server_hostname="127.0.0.1")
        s.sendall(connect_packet("tls-proxied"))
        assert recv_exactly(s, 4) == CONNACK_OK
        assert read_seen(plain, "tls-proxied")["address"] == "2001:db8::77:443"
        s.close()
    finally:
        b.stop()


@pytest.mark.parametrize("first", [
    connect_packet("no-header"),                       # MQTT straight away
    b"GET / HTTP/1.1\r\n\r\n",                         # not a PROXY header at all
    b"PROXY TCP4 1.2.3.4 5.6.7.8 1 99999\r\n",        # bad port
    b"PROXY TCP4 " + b"1" * 200,                       # no end of line within 107 bytes
    SIG + b"\x21\x11\xff\xff",                         # a v2 header announcing 65535 bytes
    SIG[:6] + b"X",                                    # a broken signature
])
def test_connection_without_a_valid_header_is_closed(pbroker, first):
    s = socket.create_connection(("127.0.0.1", pbroker.ports[1]), timeout=5)
    s.sendall(first)
    assert closed(s, 5)
    assert wait_for(lambda: "PROXY protocol" in pbroker.log())


def test_incomplete_header_times_out(tmp_path):
    b = Broker([], config_text=proxy_config(tmp_path, extra="[limits]\nconnect_timeout = 1\n"), listeners=3)
    try:
        s = socket.create_connection(("127.0.0.1", b.ports[1]), timeout=5)
        s.sendall(b"PROXY TCP4 1.2.3.4")
        start = time.monotonic()
        assert closed(s, 5)
        assert time.monotonic() - start < 3
        assert wait_for(lambda: "not complete within 1000 ms" in b.log() or "no CONNECT within" in b.log())
    finally:
        b.stop()


def test_proxy_header_on_a_normal_listener_is_a_malformed_packet(pbroker):
    plain = pbroker.ports[0]
    # v2: its first byte (0x0D) is MQTT packet type 0, reserved: closed at once.
    s = socket.create_connection(("127.0.0.1", plain), timeout=5)
    s.sendall(v2_inet("203.0.113.1", 1) + connect_packet("v2-on-plain"))
    assert closed(s, 5)
    # v1: "P" (0x50) is a PUBREC announcing 82 bytes ("R"): not a CONNECT, and not a PUBREC's 2.
    s = socket.create_connection(("127.0.0.1", plain), timeout=5)
    s.sendall(b"PROXY TCP4 203.0.113.1 10.0.0.1 1 1883\r\n" + connect_packet("v1-on-plain") + b"\x00" * 60)
    assert closed(s, 5)
    log = pbroker.log()
    assert "v2-on-plain" not in subprocess.run(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(plain), "-t", "seen/#", "-W", "1", "-v"], capture_output=True, text=True).stdout
    # (Closes before CONNECT are logged at most once per 10 s per listener: the first one.)
    assert wait_for(lambda: "first packet is reserved type 0" in pbroker.log()), log


def test_many_idle_proxy_connections_give_memory_back(tmp_path):
    b = Broker([], config_text=proxy_config(tmp_path, extra="[limits]\nconnect_timeout = 2\n"), listeners=3)
    try:
        port, pid = b.ports[1], b.proc.pid
        # A first round warms up (thread stacks, allocator arenas, NIO's pools).
        hold_one_byte_connections(port, 1000)
        time.sleep(0.5)
        before = rss_kib(pid)
        # 1,000 connections that send one byte of a header, then nothing: the time limit (2 s
        # here) closes every one of them.
        start = time.monotonic()
        during = hold_one_byte_connections(port, 1000, pid)
        elapsed = time.monotonic() - start
        after = settle(b, before, 4096)
        print(f"\n1,000 one-byte PROXY connections: RSS before {before} KiB, open {during} KiB, after {after} KiB;"
              f" all closed by the broker within {elapsed:.1f} s")
        assert after - before < 4096, (before, during, after)
        assert during - before < 40_000, (before, during)
        # Refusals and timeouts are logged with the listener's rate limit, not a line each.
        assert len(b.lines) < 100, "".join(b.lines[-20:])
    finally:
        b.stop()


def hold_one_byte_connections(port, n, pid=None):
    """`n` connections sending the first byte of a v1 or v2 header and nothing more; returns the
    broker's RSS while they are open, after waiting for the broker to close every one."""
    socks = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=10)
        s.sendall(b"P" if i % 2 else b"\r")
        socks.append(s)
    during = rss_kib(pid) if pid else None
    assert all(closed(s, 10) for s in socks)
    for s in socks:
        s.close()
    return during


def connect_with_will(client_id):
    """CONNECT, keep-alive 0 (nothing but the socket ends it), with a will on gone/<client_id>."""
    def s(b):
        return struct.pack("!H", len(b)) + b
    body = (s(b"MQTT") + bytes([4, 0x06]) + struct.pack("!H", 0) + s(client_id.encode())
            + s(f"gone/{client_id}".encode()) + s(b"bye"))
    return bytes([0x10, len(body)]) + body


def test_a_client_that_half_closes_is_lost_on_every_listener_kind(certs, tmp_path):  # noqa: F811
    """A client that sends FIN (shutdown of its sending side) and waits: the broker closes the
    connection and publishes its will, on a plain listener, behind a PROXY header, over WebSocket
    and over TLS; and a FIN in the middle of a PROXY header, an HTTP upgrade or a CONNECT closes
    the connection too. (The broker lets NIO report the FIN and closes when its loop has room.)"""
    b = Broker([], config_text=proxy_config(tmp_path, certs), listeners=4)
    try:
        plain, proxied, ws_port, tls_port = b.ports
        watcher = paho_client("watcher")
        start(watcher, plain)
        watcher.subscribe("gone/#", qos=0)
        time.sleep(0.3)

        def half_close(s):
            socket.socket.shutdown(s, socket.SHUT_WR)  # the socket's own (an SSLSocket's drops its TLS)
            return closed(s)

        s = proxied_connect(plain, b"", "plain", packet=connect_with_will("plain"))
        assert half_close(s), "plain"

        s = proxied_connect(proxied, v2_inet("198.51.100.30", 40030), "proxied", packet=connect_with_will("proxied"))
        assert half_close(s), "PROXY"

        raw, ws = proxied_websocket(ws_port, b"PROXY TCP4 203.0.113.30 10.0.0.1 61030 80\r\n", connect_with_will("websocket"))
        socket.socket.shutdown(raw, socket.SHUT_WR)
        assert ws.closed(5)[0], "WebSocket"

        raw = socket.create_connection(("127.0.0.1", tls_port), timeout=5)
        raw.sendall(v2_inet("198.51.100.31", 40031))
        s = ssl.create_default_context(cafile=str(certs / "ca.crt")).wrap_socket(raw, server_hostname="127.0.0.1")
        s.sendall(connect_with_will("tls"))
        assert recv_exactly(s, 4) == CONNACK_OK
        assert half_close(s), "TLS"

        assert wait_for(lambda: len(watcher.messages) >= 4), [m.topic for m in watcher.messages]
        assert sorted(m.topic for m in watcher.messages) == ["gone/plain", "gone/proxied", "gone/tls", "gone/websocket"]

        # Half-sent, then FIN: closed all the same.
        for port, first in ((plain, connect_with_will("half")[:9]), (proxied, b"PROXY TCP4 1.2"),
                            (ws_port, b"PROXY TCP4 203.0.113.32 10.0.0.1 61032 80\r\nGET /mqtt HTTP/1.1\r\nHost: x\r\n")):
            s = socket.create_connection(("127.0.0.1", port), timeout=5)
            s.sendall(first)
            assert half_close(s), first
        watcher.loop_stop()
        watcher.disconnect()
    finally:
        b.stop()
