"""MQTT over WebSocket listeners (`protocol = "websockets"`) of the real binary: paho-mqtt over ws://
and wss:// with mosquitto_pub/mosquitto_sub on a TCP listener, raw handshakes and frames (text
frames, other subprotocols, huge lengths, half requests), and a real browser (headless Chromium)."""
import http.server
import os
import shutil
import socket
import ssl
import struct
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

import wsclient
from conftest import Broker, wait_for
from test_hostile import rss_kib, settle
from test_interop import paho_client, subscriber
from test_tls import certs  # noqa: F401 (the module's certificate fixture)

CONNACK_OK = b"\x20\x02\x00\x00"


def ws_config(certs_dir=None, extra=""):
    """A TCP listener, then a WebSocket one (wss:// with `certs_dir`); both on ephemeral ports."""
    text = '[server]\nworkers = 2\n[[listener]]\nbind = "127.0.0.1:0"\n[[listener]]\nbind = "127.0.0.1:0"\nprotocol = "websockets"\n'
    if certs_dir:
        text += f'certfile = "{certs_dir}/server.crt"\nkeyfile = "{certs_dir}/server.key"\n'
    return text + extra


@pytest.fixture
def wsbroker():
    b = Broker([], config_text=ws_config(), listeners=2)
    assert "(WebSocket)" in b.log()
    yield b
    b.stop()


def paho_ws(client_id, port, tls_ca=None):
    c = paho_client(client_id, transport="websockets")
    c.ws_set_options(path="/mqtt")
    if tls_ca:
        c.tls_set(ca_certs=str(tls_ca))
    c.connect("127.0.0.1", port, keepalive=30)
    c.loop_start()
    assert c.connected.wait(10), "paho did not connect over WebSocket"
    assert c.connect_rc == 0
    return c


def round_trip(tcp_port, ws_port, tls_ca=None):
    """paho over WebSocket subscribes; mosquitto_pub publishes on TCP; and the other way round."""
    c = paho_ws("paho-ws", ws_port, tls_ca)
    try:
        subscribed = threading.Event()
        c.on_subscribe = lambda *a: subscribed.set()
        c.subscribe("ws/#", qos=1)
        assert subscribed.wait(5)
        big = "x" * 200_000  # larger than one read, and sent by the broker as header + payload frames
        for payload in ("hello over websockets", big):
            subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(tcp_port), "-t", "ws/in", "-s", "-q", "1"],
                           input=payload, text=True, check=True, timeout=10)
        assert wait_for(lambda: len(c.messages) >= 2, 10), [m.payload[:40] for m in c.messages]
        assert [m.payload.decode() for m in c.messages] == ["hello over websockets", big]
        assert c.messages[0].topic == "ws/in"
        sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(tcp_port), "-t", "back/#", "-C", "1", "-W", "10", "-v"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        c.publish("back/ws", "from paho", qos=1).wait_for_publish(5)
        out, err = sub.communicate(timeout=15)
        assert out.strip() == "back/ws from paho", err
    finally:
        c.loop_stop()
        c.disconnect()


def test_paho_over_ws_with_mosquitto_clients_on_tcp(wsbroker):
    tcp, ws = wsbroker.ports
    round_trip(tcp, ws)


def test_paho_over_wss(certs):  # noqa: F811
    b = Broker([], config_text=ws_config(certs), listeners=2)
    try:
        assert "(WebSocket, TLS)" in b.log()
        tcp, wss = b.ports
        round_trip(tcp, wss, tls_ca=certs / "ca.crt")
        # TLS is first: a plain HTTP upgrade on the wss:// port is not answered.
        s = socket.create_connection(("127.0.0.1", wss), timeout=5)
        req, _ = wsclient.request()
        s.sendall(req)
        s.settimeout(5)
        try:
            data = s.recv(100)
        except ConnectionResetError:
            data = b""
        assert b"HTTP/1.1 101" not in data
        s.close()
    finally:
        b.stop()


def test_any_path_and_no_subprotocol_are_accepted(wsbroker):
    s = socket.create_connection(("127.0.0.1", wsbroker.ports[1]), timeout=5)
    status, headers, key, _ = wsclient.handshake(s, path="/some/other/path?x=1", protocols=None)
    assert status.startswith("HTTP/1.1 101"), status
    assert "sec-websocket-protocol" not in headers
    ws = wsclient.WS(s)
    ws.send(wsclient.mqtt_connect("nosub"))
    assert ws.recv_mqtt(4) == CONNACK_OK
    s.close()


def test_mqtt_is_chosen_among_offered_subprotocols(wsbroker):
    s = socket.create_connection(("127.0.0.1", wsbroker.ports[1]), timeout=5)
    status, headers, _, _ = wsclient.handshake(s, protocols="chat, mqtt")
    assert status.startswith("HTTP/1.1 101") and headers["sec-websocket-protocol"] == "mqtt"
    s.close()


def test_upgrade_offering_only_another_subprotocol_is_refused(wsbroker):
    s = socket.create_connection(("127.0.0.1", wsbroker.ports[1]), timeout=5)
    status, headers, _, _ = wsclient.handshake(s, protocols="chat")
    assert status.startswith("HTTP/1.1 400"), status
    assert wsclient.WS(s).closed()[0]
    assert wait_for(lambda: "no MQTT subprotocol offered" in wsbroker.log())


def test_plain_http_request_gets_426_and_is_closed(wsbroker):
    s = socket.create_connection(("127.0.0.1", wsbroker.ports[1]), timeout=5)
    s.sendall(b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
    data = wsclient.read_until(s, b"\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 426"), data
    assert b"upgrade: websocket" in data.lower()
    assert wsclient.WS(s).closed()[0]


def test_mqtt_without_websocket_on_a_websocket_listener_is_refused(wsbroker):
    s = socket.create_connection(("127.0.0.1", wsbroker.ports[1]), timeout=5)
    s.sendall(wsclient.mqtt_connect("raw"))
    data = wsclient.read_until(s, b"\r\n\r\n")
    assert data.startswith(b"HTTP/1.1 400"), data
    assert wsclient.WS(s).closed()[0]


def test_text_frame_closes_the_connection(wsbroker):
    ws = wsclient.connect(wsbroker.ports[1])
    ws.send(wsclient.mqtt_connect("texter"))
    assert ws.recv_mqtt(4) == CONNACK_OK
    ws.send(b"\x10\x00", opcode=0x1)
    closed, frames = ws.closed()
    assert closed
    assert frames and frames[-1][0] == 0x8 and frames[-1][1][:2] == b"\x03\xeb"  # close, 1003
    assert wait_for(lambda: "text frame" in wsbroker.log())


def test_close_frame_comes_after_the_answers_of_the_same_read(wsbroker):
    """CONNECT and a text frame in one write: the CONNACK, then the close frame (RFC 6455 section
    5.5.1: no data frame after a close frame)."""
    ws = wsclient.connect(wsbroker.ports[1])
    ws.sock.sendall(wsclient.frame(wsclient.mqtt_connect("ordered")) + wsclient.frame(b"{}", opcode=0x1))
    closed, frames = ws.closed()
    assert closed
    assert [f[0] for f in frames] == [0x2, 0x8], frames
    assert frames[0][1] == CONNACK_OK and frames[1][1][:2] == b"\x03\xeb"


def early_client(port, client_id, body=b"", tls_ca=None):
    """The upgrade request and frames in one write, without waiting for 101 (browsers wait; some
    embedded clients do not)."""
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    if tls_ca:
        context = ssl.create_default_context(cafile=str(tls_ca))
        s = context.wrap_socket(s, server_hostname="127.0.0.1")
    req, _ = wsclient.request()
    s.sendall(req + wsclient.frame(wsclient.mqtt_connect(client_id)) + body)
    return s


def test_frames_sent_with_the_upgrade_request_are_answered_on_wss(certs):  # noqa: F811
    """The CONNACK comes at once (NIOSSL passes on no read-complete of its own after the upgrade:
    it waited for the client's next packet, or for keep-alive)."""
    b = Broker([], config_text=ws_config(certs), listeners=2)
    try:
        s = early_client(b.ports[1], "early-wss", tls_ca=certs / "ca.crt")
        data = wsclient.read_until(s, b"\r\n\r\n")
        head, _, rest = data.partition(b"\r\n\r\n")
        assert head.startswith(b"HTTP/1.1 101"), head
        s.settimeout(3)
        assert wsclient.WS(s, rest).recv_mqtt(4) == CONNACK_OK
        s.close()
    finally:
        b.stop()


@pytest.mark.parametrize("end", ["close frame", "eof"])
def test_fire_and_forget_websocket_clients_in_a_storm_lose_nothing(wsbroker, end):
    """300 WebSocket clients each write the upgrade request, CONNECT and a QoS 1 PUBLISH (half of
    them DISCONNECT too) at once, then end with a close frame (as MQTT.js's end() does) or an EOF,
    all together: the CONNECTs wait for later ticks (the storm's pacing), and the close waits
    behind what came before it. Every message goes out, and every client reads its CONNACK and
    PUBACK, then (after a close frame) the answer with its status code."""
    tcp, ws = wsbroker.ports
    sub = subscriber(tcp, "ff-ws-sub", "ff/#")
    sockets = []
    try:
        count = 300
        requests = []
        for i in range(count):
            topic = f"ff/{i}".encode()
            publish = bytes([0x32, 5 + len(topic), 0, len(topic)]) + topic + b"\x00\x01x"
            disconnect = wsclient.frame(b"\xe0\x00") if i % 2 else b""
            closing = wsclient.frame(b"\x03\xe9", opcode=0x8) if end == "close frame" else b""
            req, _ = wsclient.request()
            body = wsclient.frame(wsclient.mqtt_connect(f"ff-ws-{i}")) + wsclient.frame(publish) + disconnect + closing
            sockets.append(socket.create_connection(("127.0.0.1", ws), timeout=10))
            requests.append(req + body)
        for s, data in zip(sockets, requests):
            s.sendall(data)
            if end == "eof":
                s.shutdown(socket.SHUT_WR)
        assert wait_for(lambda: len({m.topic for m in sub.messages}) == count, timeout=20), len(sub.messages)
        for i, s in enumerate(sockets):  # the acknowledgements, then the broker's close
            head, _, rest = wsclient.read_until(s, b"\r\n\r\n").partition(b"\r\n\r\n")
            assert head.startswith(b"HTTP/1.1 101"), head
            closed, frames = wsclient.WS(s, rest).closed(timeout=10)
            assert closed, i
            assert b"".join(p for op, p in frames if op == 0x2) == b"\x20\x02\x00\x00\x40\x02\x00\x01", (i, frames)
            # The client's code when its close frame ended it; 1000 when the broker closed first
            # (at a DISCONNECT, at an EOF).
            codes = {b"\x03\xe8"} if end == "eof" else {b"\x03\xe9"} if i % 2 == 0 else {b"\x03\xe8", b"\x03\xe9"}
            assert frames[-1][0] == 0x8 and frames[-1][1] in codes, (i, frames)
    finally:
        for s in sockets:
            s.close()
        sub.loop_stop()
        sub.disconnect()


def test_frames_sent_with_the_upgrade_request_then_eof_are_served(wsbroker):
    """Upgrade request, CONNECT, PUBLISH and DISCONNECT in one write, then the client's EOF: the
    EOF waits behind the frames (the HTTP decoder drops what it holds once it has seen EOF)."""
    tcp, ws = wsbroker.ports
    sub = subscriber(tcp, "early-sub", "early/#", qos=1)
    try:
        for i in range(10):
            topic = f"early/{i}".encode()
            publish = bytes([0x30, 2 + len(topic) + 1]) + bytes([0, len(topic)]) + topic + b"x"
            s = early_client(ws, f"early-{i}", body=wsclient.frame(publish) + wsclient.frame(b"\xe0\x00"))
            s.shutdown(socket.SHUT_WR)
            wsclient.read_until(s, b"never")  # to the broker's close
            s.close()
        assert wait_for(lambda: len(sub.messages) == 10, timeout=5), [m.topic for m in sub.messages]
    finally:
        sub.loop_stop()
        sub.disconnect()


def test_ping_is_answered_and_close_frame_closes(wsbroker):
    ws = wsclient.connect(wsbroker.ports[1])
    ws.send(wsclient.mqtt_connect("pinger"))
    assert ws.recv_mqtt(4) == CONNACK_OK
    ws.send(b"are you there", opcode=0x9)
    assert ws.recv_frame() == (0xA, b"are you there")
    ws.send(b"\x03\xe8", opcode=0x8)
    closed, frames = ws.closed()
    assert closed and frames == [(0x8, b"\x03\xe8")]


def test_ping_flood_gets_one_pong_per_read(wsbroker):
    # RFC 6455 section 5.5.3: pings not yet answered may get one pong, for the most recent. A
    # flood in one write is answered a few times at most (one pong per read), not 5,000 times.
    ws = wsclient.connect(wsbroker.ports[1])
    ws.send(wsclient.mqtt_connect("flooder"))
    assert ws.recv_mqtt(4) == CONNACK_OK
    ws.sock.sendall(b"".join(wsclient.frame(b"p%d" % i, opcode=0x9) for i in range(5000)))
    pongs = []
    while not pongs or pongs[-1] != b"p4999":
        opcode, payload = ws.recv_frame()
        assert opcode == 0xA
        pongs.append(payload)
    assert len(pongs) < 100, len(pongs)
    ws.sock.settimeout(0.5)
    with pytest.raises((socket.timeout, TimeoutError)):
        ws.recv_frame()  # nothing more: every ping was answered by the last pong


def test_upgrade_without_host_is_refused(wsbroker):
    # RFC 6455 section 4.1: the request has a Host header (HTTP/1.1 requires exactly one).
    for extra_host in ("", "Host: second\r\n"):
        s = socket.create_connection(("127.0.0.1", wsbroker.ports[1]), timeout=5)
        req, _ = wsclient.request()
        if extra_host:
            req = req.replace(b"\r\n\r\n", b"\r\n" + extra_host.encode() + b"\r\n")
        else:
            req = b"\r\n".join(line for line in req.split(b"\r\n") if not line.startswith(b"Host:"))
        s.sendall(req)
        assert wsclient.read_until(s, b"\r\n\r\n").startswith(b"HTTP/1.1 400"), extra_host
        s.close()


def test_packet_split_across_frames_and_two_packets_in_one_frame(wsbroker):
    ws = wsclient.connect(wsbroker.ports[1])
    connect = wsclient.mqtt_connect("splitter")
    for i in range(len(connect)):  # one byte per frame
        ws.send(connect[i:i + 1])
    assert ws.recv_mqtt(4) == CONNACK_OK
    sub = b"\x82\x08\x00\x01\x00\x03a/b\x00"
    pub = b"\x30\x07\x00\x03a/bhi"
    ws.send(sub + pub + b"\xc0")  # SUBSCRIBE, PUBLISH, half a PINGREQ
    ws.send(b"\x00")
    data = ws.recv_mqtt(5 + len(pub) + 2)
    assert data == b"\x90\x03\x00\x01\x00" + pub + b"\xd0\x00"


def test_huge_frame_lengths_are_refused_before_buffering(wsbroker):
    pid = wsbroker.proc.pid
    for length in (2**63, 2**63 - 1, 2**32, (1 << 20) + 5 + 65536 + 1):
        ws = wsclient.connect(wsbroker.ports[1])
        ws.sock.sendall(wsclient.frame(b"", length=length))
        closed, frames = ws.closed()
        assert closed, length
        assert frames and frames[-1][0] == 0x8 and frames[-1][1][:2] == b"\x03\xf1", (length, frames)  # 1009 message too big
    assert wait_for(lambda: "frame longer than" in wsbroker.log())
    # Many at once, each announcing 2^63 - 1 bytes and sending 64 KB of it: nothing is kept. The
    # first round warms up (thread stacks, allocator arenas, NIO's pools).
    hold_huge_frames(wsbroker.ports[1], 300)
    time.sleep(0.5)
    before = rss_kib(pid)
    during = hold_huge_frames(wsbroker.ports[1], 300, pid)
    after = settle(wsbroker, before, 4096)
    print(f"\nhuge frame lengths x300: RSS before {before} KiB, with them open {during} KiB, after {after} KiB")
    assert during - before < 30_000 and after - before < 4096, (before, during, after)


def hold_huge_frames(port, n, pid=None):
    """`n` connections that each announce a frame of 2^63 - 1 bytes and send 64 KB of it; returns
    the broker's RSS with them all open, then closes them."""
    socks = []
    for _ in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        wsclient.handshake(s)
        try:
            s.sendall(wsclient.frame(b"", length=2**63 - 1) + b"x" * 65536)
        except (BrokenPipeError, ConnectionResetError):
            pass
        socks.append(s)
    during = rss_kib(pid) if pid else None
    for s in socks:
        s.close()
    return during


def hold_half_requests(port, n, pid=None):
    """`n` connections holding most of an upgrade request open; the broker's RSS with them open."""
    socks = []
    req, _ = wsclient.request()
    for _ in range(n):
        c = socket.create_connection(("127.0.0.1", port), timeout=5)
        c.sendall(req[:-10])
        socks.append(c)
    time.sleep(0.2)
    during = rss_kib(pid) if pid else None
    for c in socks:
        c.close()
    return during


def cycle_hostile(port, n):
    """Half-sent upgrade requests, closed at once."""
    req, _ = wsclient.request()
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
        s.sendall(req[: (i * 7) % len(req)])
        s.close()


def test_hostile_handshakes_leave_nothing_behind(wsbroker):
    port = wsbroker.ports[1]
    pid = wsbroker.proc.pid
    cycle_hostile(port, 500)
    hold_half_requests(port, 300)
    time.sleep(0.5)
    before = rss_kib(pid)
    # 1. Half-sent upgrade requests, then close: 5,000 of them.
    cycle_hostile(port, 5000)
    # 2. Endless header lines: the connection is refused within the request limit (16 KiB). (The
    # kernel takes megabytes into its buffers before the reset comes back, so: 64 KB, then wait.)
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.sendall(b"GET /mqtt HTTP/1.1\r\nHost: x\r\n")
        for i in range(600):
            s.sendall(b"X-Filler-%d: %s\r\n" % (i, b"y" * 100))
        time.sleep(0.3)
        answer = wsclient.read_until(s, b"\r\n\r\n")
    except (BrokenPipeError, ConnectionResetError):
        answer = b""
    assert answer == b"" or answer.startswith(b"HTTP/1.1 400"), answer
    assert wsclient.WS(s).closed()[0]
    s.close()
    # 3. One long header line.
    s = socket.create_connection(("127.0.0.1", port), timeout=5)
    try:
        s.sendall(b"GET /mqtt HTTP/1.1\r\nX-Long: " + b"z" * 200_000)
    except (BrokenPipeError, ConnectionResetError):
        pass
    try:
        assert wsclient.read_until(s, b"\r\n\r\n").startswith(b"HTTP/1.1 400")
    except ConnectionResetError:
        pass
    s.close()
    # 4. 300 connections holding most of a request open, then closed.
    during = hold_half_requests(port, 300, pid)
    after = settle(wsbroker, before, 4096)
    print(f"\nhostile handshakes: RSS before {before} KiB, 300 half requests open {during} KiB, after {after} KiB")
    assert after - before < 4096, (before, during, after)
    # ~6,000 refused handshakes: logged with the listener's rate limit, not a line each.
    assert len(wsbroker.lines) < 100, "".join(wsbroker.lines[-20:])


def test_half_sent_upgrade_is_closed_by_connect_timeout():
    b = Broker([], config_text=ws_config(extra="[limits]\nconnect_timeout = 1\n"), listeners=2)
    try:
        s = socket.create_connection(("127.0.0.1", b.ports[1]), timeout=5)
        req, _ = wsclient.request()
        s.sendall(req[:30])
        start = time.monotonic()
        assert wsclient.WS(s).closed(timeout=5)[0]
        assert time.monotonic() - start < 4
    finally:
        b.stop()



def test_silent_sockets_closed_by_connect_timeout_are_logged_with_the_listeners_rate_limit():
    """A scanner's sockets that never send a byte (on the TCP and the WebSocket listener): at most
    one info line per listener per 10 s, not one per socket."""
    b = Broker([], config_text=ws_config(extra="[limits]\nconnect_timeout = 1\n"), listeners=2)
    try:
        socks = [socket.create_connection(("127.0.0.1", port), timeout=5) for port in b.ports for _ in range(20)]
        for s in socks:
            assert wsclient.WS(s).closed(timeout=5)[0]
        def lines():
            return [line for line in b.log().splitlines() if "no CONNECT within connect_timeout" in line]
        assert wait_for(lambda: len(lines()) >= 1), b.log()  # (the log is read by another thread)
        assert len(lines()) <= 2, lines()
    finally:
        b.stop()

def test_a_client_that_resets_mid_request_is_logged_as_gone_not_answered_400(wsbroker):
    """Half a request, then a TCP reset: nothing is answered (there is no one to answer) and the
    log says the connection went before the upgrade, with the client's address."""
    s = socket.create_connection(("127.0.0.1", wsbroker.ports[1]), timeout=5)
    s.sendall(b"GET /mqtt HTTP/1.1\r\nHost: x\r\n")
    time.sleep(0.3)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    s.close()
    assert wait_for(lambda: "closing WebSocket connection before the upgrade" in wsbroker.log()), wsbroker.log()
    line = next(line for line in wsbroker.log().splitlines() if "before the upgrade" in line)
    assert "address=127.0.0.1:" in line, line
    assert "400" not in line, line


# MARK: - A real browser

PAGE = """<!doctype html>
<html><head><meta charset="utf-8"><title>mqlite websocket test</title></head>
<body><pre id="state">starting</pre><pre id="msg"></pre>
<script>
// A tiny MQTT 3.1.1 client over the browser's WebSocket: CONNECT, SUBSCRIBE, PUBLISH in and out.
const state = document.getElementById("state");
const msg = document.getElementById("msg");
const enc = new TextEncoder(), dec = new TextDecoder();
function str(s) { const b = enc.encode(s); return [b.length >> 8, b.length & 255, ...b]; }
function packet(first, body) {
  const len = []; let n = body.length;
  do { let d = n % 128; n = Math.floor(n / 128); if (n) d |= 128; len.push(d); } while (n);
  return new Uint8Array([first, ...len, ...body]);
}
const ws = new WebSocket("ws://127.0.0.1:PORT/mqtt", "mqtt");
ws.binaryType = "arraybuffer";
ws.onopen = () => { state.textContent = "open " + ws.protocol; ws.send(packet(0x10, [...str("MQTT"), 4, 2, 0, 60, ...str("browser-1")])); };
ws.onerror = () => { state.textContent = "error"; };
ws.onclose = (e) => { state.textContent += " closed " + e.code; };
let buf = [];
ws.onmessage = (e) => {
  buf.push(...new Uint8Array(e.data));
  for (;;) {
    // Fixed header and remaining length; wait for the whole packet (it may span frames).
    let mult = 1, len = 0, i = 1, b;
    do { if (i >= buf.length) return; b = buf[i++]; len += (b & 127) * mult; mult *= 128; } while (b & 128);
    if (buf.length < i + len) return;
    const type = buf[0] >> 4, body = buf.slice(i, i + len);
    buf = buf.slice(i + len);
    if (type === 2) {
      state.textContent = "connack " + body[1];
      ws.send(packet(0x82, [0, 1, ...str("browser/in"), 0]));
    } else if (type === 9) {
      state.textContent = "subscribed";
    } else if (type === 3) {
      const tlen = (body[0] << 8) | body[1];
      const topic = dec.decode(new Uint8Array(body.slice(2, 2 + tlen)));
      const payload = dec.decode(new Uint8Array(body.slice(2 + tlen)));
      msg.textContent = "received " + topic + " " + payload;
      state.textContent = "done";
      ws.send(packet(0x30, [...str("browser/echo"), ...enc.encode("echo:" + payload)]));
    }
  }
};
</script><iframe src="/wait"></iframe></body></html>
"""


def chromium_binary():
    for name in ("chromium", "chromium-browser", "google-chrome"):
        path = shutil.which(name)
        if path:
            return path
    return None


class PageServer(http.server.ThreadingHTTPServer):
    """Serves the test page, and `/wait`, which answers only once `done` is set (or after 40 s): the
    page's iframe on it holds the page's load event, so that `--dump-dom` prints the DOM after the
    page has done its MQTT work."""

    def __init__(self, directory):
        self.done = threading.Event()
        server = self

        class Handler(http.server.SimpleHTTPRequestHandler):
            def __init__(self, *a, **k):
                super().__init__(*a, directory=directory, **k)

            def do_GET(self):
                if self.path.startswith("/wait"):
                    server.done.wait(40)
                    self.send_response(200)
                    self.send_header("Content-Length", "2")
                    self.end_headers()
                    self.wfile.write(b"ok")
                    return
                super().do_GET()

            def log_message(self, *a):
                pass

        super().__init__(("127.0.0.1", 0), Handler)


@pytest.mark.skipif(chromium_binary() is None, reason="chromium is not installed (apt-get install chromium)")
def test_browser_speaks_mqtt_over_websocket(wsbroker, tmp_path):
    tcp, ws = wsbroker.ports
    (tmp_path / "page.html").write_text(PAGE.replace("PORT", str(ws)))
    server = PageServer(str(tmp_path))
    threading.Thread(target=server.serve_forever, daemon=True).start()
    url = f"http://127.0.0.1:{server.server_address[1]}/page.html"
    echo = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(tcp), "-t", "browser/echo", "-C", "1", "-W", "60"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stop = threading.Event()

    def publisher():
        # Live (not retained) messages until the page has echoed one: it must be subscribed to get it.
        while not stop.is_set() and echo.poll() is None:
            subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(tcp), "-t", "browser/in", "-m", "hello browser"],
                           capture_output=True, timeout=10)
            stop.wait(0.3)
        server.done.set()

    profile = tempfile.TemporaryDirectory()
    pub = threading.Thread(target=publisher, daemon=True)
    pub.start()
    try:
        # Chromium runs while the page connects, subscribes, receives and echoes; then /wait answers,
        # the page's load event fires, and --dump-dom prints what the page wrote.
        r = subprocess.run([chromium_binary(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
                            f"--user-data-dir={profile.name}", "--dump-dom", url],
                           capture_output=True, text=True, timeout=90)
        out, err = echo.communicate(timeout=30)
        assert out.strip() == "echo:hello browser", err
        assert "received browser/in hello browser" in r.stdout, r.stdout[-2000:] + r.stderr[-2000:]
        assert "subscribed" in r.stdout or "done" in r.stdout
    finally:
        stop.set()
        server.done.set()
        pub.join(15)
        if echo.poll() is None:
            echo.kill()
        server.shutdown()
        profile.cleanup()
