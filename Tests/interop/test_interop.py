"""Interoperability with clients nobody here wrote: mosquitto_pub / mosquitto_sub and paho-mqtt."""
import signal
import socket
import subprocess
import threading
import time

import paho.mqtt.client as mqtt
import pytest

from conftest import Broker, wait_for


def sub_process(port, *args):
    return subprocess.Popen(
        ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-W", "10", *args],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
    )


def pub(port, *args):
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), *args], check=True, timeout=10)


def paho_client(client_id, clean_session=True, **kwargs):
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session, **kwargs)
    c.messages = []
    c.connected = threading.Event()
    c.flags = None

    def on_connect(client, userdata, flags, reason_code, properties):
        client.flags = flags
        client.connect_rc = reason_code
        client.connected.set()

    c.on_connect = on_connect
    c.on_message = lambda client, userdata, msg: client.messages.append(msg)
    return c


def start(client, port):
    client.connect("127.0.0.1", port, keepalive=30)
    client.loop_start()
    assert client.connected.wait(5)


def subscriber(port, client_id, topic_filter, qos=0):
    """A started paho client whose SUBSCRIBE to `topic_filter` has been answered."""
    client = paho_client(client_id)
    subscribed = threading.Event()
    client.on_subscribe = lambda *a: subscribed.set()
    start(client, port)
    client.subscribe(topic_filter, qos=qos)
    assert subscribed.wait(5)
    return client




@pytest.mark.parametrize("qos", [0, 1, 2])
def test_mosquitto_clients_each_qos(broker, qos):
    sub = sub_process(broker.port, "-t", "interop/#", "-q", str(qos), "-C", "3", "-v")
    time.sleep(0.5)
    for i in range(3):
        pub(broker.port, "-t", f"interop/{i}", "-m", f"message {i}", "-q", str(qos))
    out, err = sub.communicate(timeout=15)
    assert sub.returncode == 0, err
    assert out.splitlines() == [f"interop/{i} message {i}" for i in range(3)]


def test_mosquitto_retained(broker):
    pub(broker.port, "-t", "interop/retained", "-m", "kept", "-r", "-q", "1")
    # -F: %r is the retain flag, %t topic, %p payload.
    sub = sub_process(broker.port, "-t", "interop/retained", "-C", "1", "-F", "%r %t %p")
    out, err = sub.communicate(timeout=15)
    assert sub.returncode == 0, err
    assert out.strip() == "1 interop/retained kept"
    # An empty retained payload clears it: a new subscriber then gets nothing within 1 s.
    pub(broker.port, "-t", "interop/retained", "-n", "-r")
    sub = sub_process(broker.port, "-t", "interop/retained", "-C", "1", "-W", "1")
    out, _ = sub.communicate(timeout=15)
    assert out == ""


def test_clients_cannot_publish_to_sys_topics_as_in_mosquitto(broker):
    """A client's PUBLISH to $SYS... (or $share...) is acknowledged and dropped, retained or not,
    whatever its ACL (a client forged $SYS/broker/version for every $SYS subscriber); a Mosquitto
    bridge's $SYS/broker/connection/NAME/state goes through. A will on $SYS is refused."""
    watcher = sub_process(broker.port, "-t", "$SYS/broker/connection/#", "-t", "$SYS/forged/#", "-t", "$share/x", "-v", "-W", "3")
    time.sleep(0.5)
    pub(broker.port, "-t", "$SYS/forged/version", "-m", "FAKE", "-r", "-q", "1")
    pub(broker.port, "-t", "$SYS/forged/live", "-m", "FAKE")
    pub(broker.port, "-t", "$share/x", "-m", "FAKE", "-q", "1")
    pub(broker.port, "-t", "$SYS/broker/connection/edge/state", "-m", "1", "-q", "1")
    out, _ = watcher.communicate(timeout=15)
    assert out.splitlines() == ["$SYS/broker/connection/edge/state 1"], out
    late = sub_process(broker.port, "-t", "$SYS/forged/#", "-C", "1", "-W", "1")
    out, _ = late.communicate(timeout=15)
    assert out == "", "a forged $SYS message was retained"
    r = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(broker.port), "-t", "x", "-m", "y",
                        "--will-topic", "$SYS/forged/will", "--will-payload", "gone"], capture_output=True, text=True, timeout=10)
    assert r.returncode != 0 and "not authori" in r.stderr.lower(), r.stderr


def test_paho_qos_and_retain_flags(broker):
    s = paho_client("paho-sub")
    start(s, broker.port)
    s.subscribe([("paho/+", 2)])
    time.sleep(0.3)
    p = paho_client("paho-pub")
    start(p, broker.port)
    for qos in (0, 1, 2):
        p.publish(f"paho/{qos}", f"q{qos}".encode(), qos=qos).wait_for_publish(5)
    assert wait_for(lambda: len(s.messages) == 3)
    assert sorted((m.topic, m.payload, m.qos, m.retain) for m in s.messages) == [
        ("paho/0", b"q0", 0, False), ("paho/1", b"q1", 1, False), ("paho/2", b"q2", 2, False)]
    for c in (s, p):
        c.disconnect()
        c.loop_stop()


def test_fire_and_forget_clients_in_a_storm_lose_nothing(broker):
    """1,000 clients each write CONNECT and a QoS 1 PUBLISH (half of them DISCONNECT too), then
    close their side (as `printf ... | nc` does), all together: the CONNECTs wait for later ticks
    (the storm's pacing), and every EOF waits behind what its client sent. Every message goes out
    (mqlite delivered a few percent when an EOF's close went before its waiting CONNECT), and
    every client reads its CONNACK and PUBACK before the broker closes (as from Mosquitto)."""
    sub = subscriber(broker.port, "ff-sub", "ff/#")

    def packet(kind, body):
        length, encoded = len(body), b""
        while True:
            byte, length = length % 128, length // 128
            encoded += bytes([byte | (0x80 if length else 0)])
            if not length:
                return bytes([kind]) + encoded + body

    def text(data):
        return len(data).to_bytes(2, "big") + data

    count = 1000
    sockets = []
    try:
        for i in range(count):
            connect = packet(0x10, text(b"MQTT") + bytes([4, 2, 0, 30]) + text(b"ff-%d" % i))
            publish = packet(0x32, text(b"ff/%d" % i) + b"\x00\x01x")
            end = b"\xe0\x00" if i % 2 else b""
            sockets.append((socket.create_connection(("127.0.0.1", broker.port)), connect + publish + end))
        for s, data in sockets:
            s.sendall(data)
            s.shutdown(socket.SHUT_WR)
        assert wait_for(lambda: len({m.topic for m in sub.messages}) == count, timeout=20), len(sub.messages)
        for i, (s, _) in enumerate(sockets):
            s.settimeout(10)
            received = b""
            while chunk := s.recv(4096):
                received += chunk
            assert received == b"\x20\x02\x00\x00\x40\x02\x00\x01", (i, received)
    finally:
        for s, _ in sockets:
            s.close()
        sub.disconnect()
        sub.loop_stop()


def test_paho_will_on_abrupt_close(broker):
    watcher = paho_client("watcher")
    start(watcher, broker.port)
    watcher.subscribe("wills/#", qos=1)
    time.sleep(0.3)
    dying = paho_client("dying")
    dying.will_set("wills/dying", b"gone", qos=1, retain=False)
    start(dying, broker.port)
    # Close the TCP socket under paho without DISCONNECT.
    dying.loop_stop()
    dying.socket().shutdown(socket.SHUT_RDWR)
    dying.socket().close()
    assert wait_for(lambda: len(watcher.messages) == 1)
    assert (watcher.messages[0].topic, watcher.messages[0].payload) == ("wills/dying", b"gone")
    # A clean DISCONNECT does not publish the will.
    polite = paho_client("polite")
    polite.will_set("wills/polite", b"never")
    start(polite, broker.port)
    polite.disconnect()
    polite.loop_stop()
    time.sleep(0.5)
    assert len(watcher.messages) == 1
    watcher.disconnect()
    watcher.loop_stop()


def test_paho_persistent_session(broker):
    c = paho_client("persistent", clean_session=False)
    start(c, broker.port)
    assert c.flags.session_present is False
    c.subscribe("persist/#", qos=1)
    time.sleep(0.3)
    c.disconnect()
    c.loop_stop()

    for i in range(3):
        pub(broker.port, "-t", f"persist/{i}", "-m", f"offline {i}", "-q", "1")

    back = paho_client("persistent", clean_session=False)
    start(back, broker.port)
    assert back.flags.session_present is True
    assert wait_for(lambda: len(back.messages) == 3)
    assert [m.payload for m in back.messages] == [b"offline 0", b"offline 1", b"offline 2"]
    back.disconnect()
    back.loop_stop()


def test_bad_config_stops_startup_with_file_key_and_problem(tmp_path):
    from conftest import BINARY
    bad = tmp_path / "bad.conf"
    bad.write_text("[limits]\nmax_inflight = \"many\"\n")
    r = subprocess.run([BINARY, "-c", str(bad)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert str(bad) in r.stderr and "limits.max_inflight" in r.stderr and "must be of type int" in r.stderr

    r = subprocess.run([BINARY, "-c", str(tmp_path / "missing.conf")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert "missing.conf" in r.stderr and "cannot read" in r.stderr

    good = tmp_path / "good.conf"
    good.write_text("[[listener]]\nbind = \"127.0.0.1:0\"\n")
    r = subprocess.run([BINARY, "-c", str(good), "--check"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stderr


def test_bad_listener_and_arguments_exit_2_naming_key_and_address(tmp_path):
    from conftest import BINARY
    holder = socket.socket()
    holder.bind(("127.0.0.1", 0))
    holder.listen(1)
    port = holder.getsockname()[1]
    try:
        conf = tmp_path / "busy.conf"
        conf.write_text(f'[[listener]]\nbind = "127.0.0.1:{port}"\n')
        r = subprocess.run([BINARY, "-c", str(conf)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2, r.stderr
        assert str(conf) in r.stderr and "listener[0].bind" in r.stderr and f"127.0.0.1:{port}" in r.stderr
        assert "in use" in r.stderr
        r = subprocess.run([BINARY, "-b", f"127.0.0.1:{port}"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "-b" in r.stderr and f"127.0.0.1:{port}" in r.stderr, r.stderr
    finally:
        holder.close()

    bad_ip = tmp_path / "ip.conf"
    bad_ip.write_text('[[listener]]\nbind = "256.1.1.1:1883"\n')
    r = subprocess.run([BINARY, "-c", str(bad_ip), "--check"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "listener[0].bind" in r.stderr and "256.1.1.1" in r.stderr, r.stderr

    nul = tmp_path / "nul.conf"
    nul.write_bytes(b'[limits]\nmax_inflight = 3\n\x00\n[limits2]\n')
    r = subprocess.run([BINARY, "-c", str(nul), "--check"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "NUL byte at line 3" in r.stderr, r.stderr

    # Malformed files on which the TOML library (toml++ inside TOMLKit) failed an assertion and
    # aborted the process (Fuzz/regressions/config/): a syntax error and exit 2 instead.
    for i, (text, where) in enumerate([(b"[#", "line 1, column 2"), (b"[server]\no=[}", "line 2, column 4"),
                                       (b"e=6979-05-27T:", "line 1, column 14"), (b"\xef\xbb\xbf[\x97\x96", "")]):
        bad = tmp_path / f"toml{i}.conf"
        bad.write_bytes(text)
        r = subprocess.run([BINARY, "-c", str(bad), "--check"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and str(bad) in r.stderr and where in r.stderr, (text, r.returncode, r.stderr)

    for threads in ["100000", "1025"]:
        r = subprocess.run([BINARY, "-t", threads, "--check"], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "-t" in r.stderr and "from 0 to 1024" in r.stderr, r.stderr


def test_config_file_listener_and_sigterm():
    b = Broker([], config_text='[server]\nworkers = 2\n[[listener]]\nbind = "127.0.0.1:0"\n')
    try:
        sub = sub_process(b.port, "-t", "cfg", "-C", "1")
        time.sleep(0.5)
        pub(b.port, "-t", "cfg", "-m", "from config")
        out, _ = sub.communicate(timeout=15)
        assert out.strip() == "from config"
    finally:
        code = b.stop()
    assert code == 0
    assert "stopped" in b.log()
