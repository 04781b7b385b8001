"""[[bridge]]: mqlite as a client of another broker (a real Mosquitto, or another mqlite), with
topic prefixes, both directions, Lua on what comes in, TLS, link loss and two edges on one core."""
import os
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from conftest import BINARY, Broker, wait_for
from test_hostile import connect_packet, publish_packet, rss_kib
from test_interop import paho_client, start
from test_mqtt5 import read_to_close
from test_persistence import free_port
from test_tls import make_ca, make_cert


class Mosquitto:
    """A Mosquitto on a fixed port of 127.0.0.1 (so that it can be stopped and started again)."""

    def __init__(self, port=None, extra=""):
        self.port = port or free_port()
        self.dir = tempfile.TemporaryDirectory()
        self.conf = Path(self.dir.name) / "mosquitto.conf"
        self.conf.write_text(f"listener {self.port} 127.0.0.1\nallow_anonymous true\n{extra}")
        self.proc = None
        self.start()

    def start(self):
        self.proc = subprocess.Popen(["mosquitto", "-c", str(self.conf)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        assert wait_for(lambda: self.accepts(), timeout=10), "mosquitto did not start"

    def accepts(self):
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=0.5).close()
            return True
        except OSError:
            return False

    def stop(self):
        if self.proc and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(10)


def open_dir():
    """A folder the mosquitto user can read and write (Mosquitto started as root drops to it, and
    pytest's tmp_path sits in a folder only root may enter)."""
    d = Path(tempfile.mkdtemp(prefix="mqlite-bridge-"))
    os.chmod(d, 0o777)
    return d


def bridge_config(remote_port, topics, extra="", bridge_extra="", name="cloud", keep_alive=5):
    text = f'[[listener]]\nbind = "127.0.0.1:0"\n{extra}\n'
    text += f'[[bridge]]\nname = "{name}"\naddress = "127.0.0.1:{remote_port}"\nkeep_alive = {keep_alive}\n'
    text += 'reconnect_delay = {{ min = 0.2, max = 1 }}\n'.format()
    text += bridge_extra
    for t in topics:
        text += "[[bridge.topic]]\n" + "".join(f'{k} = {v!r}\n'.replace("'", '"') for k, v in t.items())
    return text


def subscriber(port, topic, qos=1, client_id=None):
    c = paho_client(client_id or "sub-%d" % time.monotonic_ns())
    start(c, port)
    c.subscribe(topic, qos=qos)
    time.sleep(0.3)
    return c


def published(port, topic, payload, qos=1, retain=False):
    subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), "-t", topic, "-m", payload, "-q", str(qos)]
                   + (["-r"] if retain else []), check=True, timeout=10)


def sys_value(port, topic):
    """The retained value of a `$SYS` topic now (None if there is none yet)."""
    r = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-t", topic, "-C", "1", "-W", "2"],
                       capture_output=True, text=True, timeout=10)
    return r.stdout.strip() or None


def fake_remote(backlog=4):
    """A listening socket on 127.0.0.1 for a remote the test plays by hand."""
    server = socket.socket()
    server.bind(("127.0.0.1", 0))
    server.listen(backlog)
    return server


def persistent_subscriber(port, topic, client_id):
    """A QoS 1 subscriber with a persistent session on a remote that persists it: it reconnects
    (every 0.2-0.5 s) and gets what was queued for it when the remote stops and starts again."""
    far = paho_client(client_id, clean_session=False)
    far.reconnect_delay_set(min_delay=0.2, max_delay=0.5)
    start(far, port)
    far.subscribe(topic, qos=1)
    time.sleep(0.5)
    return far


def connected(b):
    return wait_for(lambda: "bridge connected" in b.log(), timeout=10)


def got(c):
    return [(m.topic, m.payload.decode()) for m in c.messages]


@pytest.mark.parametrize("version", [4, 5])
def test_out_in_and_both_with_prefixes(version):
    remote = Mosquitto()
    b = Broker([], config_text=bridge_config(remote.port, bridge_extra=f"protocol_version = {version}\n", topics=[
        {"pattern": "sensors/#", "direction": "out", "qos": 1, "remote_prefix": "site1/"},
        {"pattern": "cmd/#", "direction": "in", "qos": 1, "remote_prefix": "site1/", "local_prefix": "edge/"},
        {"pattern": "chat/#", "direction": "both", "qos": 0},
    ]))
    try:
        assert connected(b), b.log()
        far = subscriber(remote.port, "#")
        near = subscriber(b.port, "#")
        published(b.port, "sensors/t1", "21.5")           # out: site1/ on
        published(remote.port, "site1/cmd/reboot", "now")  # in: site1/ off, edge/ on
        published(remote.port, "cmd/other", "x")           # not under the remote prefix: stays there
        published(b.port, "chat/a", "from edge", qos=0)    # both ways, without prefixes
        published(remote.port, "chat/b", "from cloud", qos=0)
        published(b.port, "private/x", "stays local")      # matches no topic: does not cross
        assert wait_for(lambda: len(far.messages) >= 5 and len(near.messages) >= 5, timeout=10), (got(far), got(near))
        time.sleep(0.5)
        assert sorted(got(far)) == sorted([
            ("site1/sensors/t1", "21.5"), ("site1/cmd/reboot", "now"), ("cmd/other", "x"), ("chat/a", "from edge"), ("chat/b", "from cloud")])
        # Each once: the bridge does not send back what came in, nor deliver its own echo twice.
        assert sorted(got(near)) == sorted([
            ("sensors/t1", "21.5"), ("edge/cmd/reboot", "now"), ("chat/a", "from edge"), ("chat/b", "from cloud"), ("private/x", "stays local")])
        assert got(far).count(("chat/a", "from edge")) == 1 and got(far).count(("chat/b", "from cloud")) == 1
        # A client may not take the bridge's own id.
        r = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(b.port), "-i", "$bridge/cloud", "-t", "x", "-m", "y"],
                           capture_output=True, text=True, timeout=10)
        assert r.returncode != 0
    finally:
        b.stop()
        remote.stop()


def test_a_lua_on_publish_hook_rewrites_what_comes_in(tmp_path):
    script = tmp_path / "gateway.lua"
    script.write_text(
        'mqlite.on_publish("in/#", function(m)\n'
        '  if m.client_id ~= "$bridge/cloud" then return end\n'
        '  return { topic = "devices/" .. m.topic:sub(4), payload = string.upper(m.payload) }\n'
        'end)\n')
    remote = Mosquitto()
    b = Broker([], config_text=bridge_config(remote.port, [{"pattern": "#", "direction": "in", "qos": 1, "local_prefix": "in/",
                                                             "remote_prefix": "cloud/"}],
                                              extra=f'[[plugin]]\nscript = "{script}"\n'))
    try:
        assert connected(b), b.log()
        near = subscriber(b.port, "#")
        published(remote.port, "cloud/lamp/1", "on")
        assert wait_for(lambda: len(near.messages) >= 1, timeout=10), b.log()
        time.sleep(0.3)
        assert got(near) == [("devices/lamp/1", "ON")]
    finally:
        b.stop()
        remote.stop()


def test_tls_to_mosquitto():
    tmp_path = open_dir()
    make_ca(tmp_path, "ca", "bridge test CA")
    make_cert(tmp_path, "server", "ca", "/CN=127.0.0.1", "IP:127.0.0.1,DNS:localhost")
    make_ca(tmp_path, "other", "another CA")
    os.chmod(tmp_path / "server.key", 0o644)
    tls = f"certfile {tmp_path}/server.crt\nkeyfile {tmp_path}/server.key\n"
    remote = Mosquitto(extra=tls)
    topics = [{"pattern": "t/#", "direction": "out", "qos": 1}]
    b = Broker([], config_text=bridge_config(remote.port, topics, bridge_extra=f'cafile = "{tmp_path}/ca.crt"\n'))
    wrong = Broker([], config_text=bridge_config(remote.port, topics, bridge_extra=f'cafile = "{tmp_path}/other.crt"\n', name="wrong"))
    try:
        assert connected(b), b.log()
        far = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(remote.port), "--cafile", str(tmp_path / "ca.crt"),
                                "-t", "t/#", "-C", "1", "-v", "-W", "10"], stdout=subprocess.PIPE, text=True)
        time.sleep(0.5)
        published(b.port, "t/secure", "yes")
        out, _ = far.communicate(timeout=15)
        assert out.strip() == "t/secure yes"
        # A remote whose certificate the bridge's CA did not sign: no link.
        time.sleep(1)
        assert wait_for(lambda: "bridge link error" in wrong.log(), timeout=10), wrong.log()
        assert "bridge connected" not in wrong.log()
    finally:
        b.stop()
        wrong.stop()
        remote.stop()


def test_link_flap_loses_no_qos1_message_and_keeps_the_order():
    """The remote Mosquitto stops for 3 s while 10,000 QoS 1 messages are published locally; it
    comes back (with its persistent subscriber's session: persistence true): every message
    arrives there, in order (QoS 1 may repeat one the remote had before it stopped)."""
    tmp_path = open_dir()
    # (Mosquitto drops past 1000 queued for a client by default; the bridge's backlog may arrive
    # before its subscriber is back.)
    remote = Mosquitto(extra=f"persistence true\npersistence_location {tmp_path}/\nmax_queued_messages 0\n")
    b = Broker([], config_text=bridge_config(remote.port, [{"pattern": "flow/#", "direction": "out", "qos": 1}],
                                              extra=""))  # the bridge's own max_queued (100,000) holds them
    far = None
    try:
        assert connected(b), b.log()
        far = persistent_subscriber(remote.port, "flow/#", "far-sub")
        pub = paho_client("near-pub")
        pub.max_inflight_messages_set(100)
        start(pub, b.port)
        done = threading.Event()

        def publish_all():
            for i in range(10000):
                pub.publish("flow/x", b"%d" % i, qos=1).wait_for_publish(30)
                if i == 2000:
                    remote.stop()
                    threading.Timer(3, remote.start).start()
            done.set()

        threading.Thread(target=publish_all, daemon=True).start()
        assert done.wait(120)
        assert wait_for(lambda: len({m.payload for m in far.messages}) >= 10000, timeout=60), \
            (len(far.messages), sorted(set(range(10000)) - {int(m.payload) for m in far.messages})[:20], b.log()[-2000:])
        seen, order = set(), []
        for m in far.messages:
            n = int(m.payload)
            if n not in seen:
                seen.add(n)
                order.append(n)
        assert order == list(range(10000))
        assert "bridge link to" in b.log() and b.log().count("bridge connected") >= 2
    finally:
        if far:
            far.loop_stop()
        b.stop()
        remote.stop()


def test_what_queues_while_the_link_is_down_is_bounded_in_bytes():
    """The bridge's max_queued_bytes bounds its queue while the link is down (a message count alone
    would let large payloads take gigabytes): past it QoS 1 messages are dropped (logged), the
    ones kept go once the remote is back."""
    tmp_path = open_dir()
    remote = Mosquitto(extra=f"persistence true\npersistence_location {tmp_path}/\n")
    b = Broker([], config_text=bridge_config(remote.port, [{"pattern": "big/#", "direction": "out", "qos": 1}],
                                             bridge_extra="max_queued_bytes = 10000\n"))
    try:
        assert connected(b), b.log()
        far = persistent_subscriber(remote.port, "big/#", "big-sub")
        remote.stop()
        assert wait_for(lambda: "lost" in b.log()), b.log()[-1500:]
        pub = paho_client("big-pub")
        start(pub, b.port)
        infos = [pub.publish("big/m", ("%04d" % i) + "x" * 996, qos=1) for i in range(50)]
        for info in infos:
            info.wait_for_publish(10)
        assert wait_for(lambda: "queue full (max_queued 100000, max_queued_bytes 10000)" in b.log()), b.log()[-1500:]
        remote.start()
        assert wait_for(lambda: len(far.messages) >= 9, timeout=10), (len(far.messages), b.log()[-1500:])
        time.sleep(1)
        numbers = [int(m.payload[:4]) for m in far.messages]
        assert 9 <= len(numbers) <= 10 and numbers == sorted(numbers) and numbers[0] == 0, numbers
        pub.disconnect()
    finally:
        b.stop()
        remote.stop()


def test_two_edges_through_a_core_without_loops():
    """Edge A and edge B each bridge devices/# both ways to one core (a third mqlite). A device on
    A reaches a device on B; every copy arrives once, nothing loops."""
    core = Broker([], config_text='[[listener]]\nbind = "127.0.0.1:0"\n')
    topics = [{"pattern": "devices/#", "direction": "both", "qos": 1}]
    a = Broker([], config_text=bridge_config(core.port, topics, bridge_extra='client_id = "edge-a"\n', name="core"))
    b = Broker([], config_text=bridge_config(core.port, topics, bridge_extra='client_id = "edge-b"\n', name="core"))
    try:
        assert connected(a) and connected(b)
        on_b = subscriber(b.port, "devices/#")
        on_a = subscriber(a.port, "devices/#")
        on_core = subscriber(core.port, "devices/#")
        published(a.port, "devices/a1/hello", "from a")
        published(b.port, "devices/b1/hello", "from b")
        assert wait_for(lambda: len(on_b.messages) >= 2 and len(on_a.messages) >= 2 and len(on_core.messages) >= 2, timeout=10)
        time.sleep(2)  # a loop would keep adding copies
        expected = sorted([("devices/a1/hello", "from a"), ("devices/b1/hello", "from b")])
        assert sorted(got(on_b)) == expected and sorted(got(on_a)) == expected and sorted(got(on_core)) == expected
    finally:
        for x in (a, b, core):
            x.stop()


def test_a_refused_connect_is_logged_with_its_code_and_retried():
    tmp_path = open_dir()
    passwords = tmp_path / "passwd"
    passwords.write_text("edge:secret\n")
    subprocess.run(["mosquitto_passwd", "-U", str(passwords)], check=True)
    os.chmod(passwords, 0o644)
    remote = Mosquitto(extra=f"allow_anonymous false\npassword_file {passwords}\n")
    remote.conf.write_text(remote.conf.read_text().replace("allow_anonymous true\n", ""))
    remote.stop()
    remote.start()
    b = Broker([], config_text=bridge_config(remote.port, [{"pattern": "t/#", "direction": "out"}],
                                              bridge_extra='username = "edge"\npassword = "wrong"\n'))
    try:
        assert wait_for(lambda: b.log().count("refused the bridge's CONNECT: CONNACK return code 5") >= 2, timeout=15), b.log()
    finally:
        b.stop()
        remote.stop()


def test_bad_bridge_config_stops_startup_naming_the_key(tmp_path):
    cases = [
        ('[[bridge]]\nname = "x"\n[[bridge.topic]]\npattern = "a/#"\n', "bridge[0].address", "is required"),
        ('[[bridge]]\nname = "x"\naddress = "127.0.0.1:1883"\n[[bridge.topic]]\npattern = "a/#"\ndirection = "sideways"\n',
         "bridge[0].topic[0].direction", "sideways"),
        ('[[bridge]]\nname = "x"\naddress = "127.0.0.1:1883"\n[[bridge.topic]]\npattern = "a/#/b"\n', "bridge[0].topic[0].pattern",
         "valid topic filter"),
        ('[[bridge]]\nname = "x"\naddress = "127.0.0.1:1883"\n', "bridge[0].topic", "at least one"),
    ]
    for body, key, problem in cases:
        conf = tmp_path / "bad.conf"
        conf.write_text('[[listener]]\nbind = "127.0.0.1:0"\n' + body)
        r = subprocess.run([BINARY, "-c", str(conf)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2, (body, r.stderr)
        assert str(conf) in r.stderr and key in r.stderr and problem in r.stderr, r.stderr


def test_state_in_sys_topics_and_metrics():
    import urllib.request
    remote = Mosquitto()
    metrics_port = free_port()
    b = Broker([], config_text=bridge_config(remote.port, [{"pattern": "m/#", "direction": "out", "qos": 1}],
                                              extra=f'[[listener]]\nbind = "127.0.0.1:{metrics_port}"\nprotocol = "http"\n'))
    watcher = None
    try:
        assert connected(b), b.log()
        watcher = subscriber(b.port, "$SYS/broker/bridges/cloud/state")
        assert wait_for(lambda: any(m.payload == b"connected" for m in watcher.messages), timeout=5)
        published(b.port, "m/1", "one")

        def scrape():
            with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
                return r.read().decode()

        assert wait_for(lambda: 'mqlite_bridge_messages_total{bridge="cloud",direction="out"} 1' in scrape(), timeout=5), scrape()
        assert 'mqlite_bridge_connected{bridge="cloud"} 1.0' in scrape()
        remote.stop()
        assert wait_for(lambda: watcher.messages[-1].payload == b"disconnected", timeout=10)
        published(b.port, "m/2", "queued while down")
        assert wait_for(lambda: 'mqlite_bridge_connected{bridge="cloud"} 0.0' in scrape(), timeout=5), scrape()
        assert wait_for(lambda: 'mqlite_bridge_queued_messages{bridge="cloud"} 1.0' in scrape(), timeout=5), scrape()
        assert wait_for(lambda: 'mqlite_bridge_reconnects_total{bridge="cloud"} 0' not in scrape(), timeout=5), scrape()
    finally:
        if watcher:
            watcher.loop_stop()
        b.stop()
        remote.stop()


def test_what_queues_while_the_link_is_down_survives_a_restart_of_the_edge(tmp_path):
    """With [persistence], the bridge's queue is on disk: QoS 1 messages published while the remote
    is down, then the edge restarted, then the remote back: all arrive, in order."""
    store = open_dir()
    remote = Mosquitto(extra=f"persistence true\npersistence_location {store}/\n")  # keeps far-kept's session
    port = remote.port
    far = paho_client("far-kept", clean_session=False)
    start(far, port)
    far.subscribe("kept/#", qos=1)
    time.sleep(0.3)
    far.disconnect()
    far.loop_stop()
    config = bridge_config(port, [{"pattern": "kept/#", "direction": "out", "qos": 1}],
                           extra=f'[persistence]\npath = "{tmp_path}/edge.db"\n')
    b = Broker([], config_text=config)
    try:
        assert connected(b), b.log()
        remote.stop()
        assert wait_for(lambda: "bridge link to" in b.log(), timeout=10)
        for i in range(50):
            published(b.port, "kept/x", str(i))
    finally:
        b.stop()
    b = Broker([], config_text=config)
    try:
        assert "restored 1 persistent sessions" in b.log(), b.log()
        remote.start()
        far = paho_client("far-kept", clean_session=False)
        start(far, port)
        assert wait_for(lambda: len(far.messages) >= 50, timeout=20), (len(far.messages), b.log())
        time.sleep(0.5)
        assert [m.payload.decode() for m in far.messages] == [str(i) for i in range(50)]
    finally:
        b.stop()
        remote.stop()


def test_the_remote_session_is_resumed_after_the_edge_restarts(tmp_path):
    """clean_session = false: what the remote published for the bridge while the edge was down
    (QoS 1, kept in the bridge's session there) comes in once the edge is back, for a persistent
    subscriber of the edge."""
    remote = Mosquitto()
    config = bridge_config(remote.port, [{"pattern": "down/#", "direction": "in", "qos": 1}],
                           extra=f'[persistence]\npath = "{tmp_path}/edge.db"\n', bridge_extra='client_id = "edge-resume"\n')
    b = Broker([], config_text=config)
    try:
        assert connected(b), b.log()
        near = paho_client("near-kept", clean_session=False)
        start(near, b.port)
        near.subscribe("down/#", qos=1)
        time.sleep(0.3)
        near.disconnect()
        near.loop_stop()
    finally:
        b.stop()
    try:
        for i in range(20):
            published(remote.port, "down/x", str(i))
        b = Broker([], config_text=config)
        assert connected(b), b.log()
        assert "session present: true" in b.log(), b.log()
        near = paho_client("near-kept", clean_session=False)
        start(near, b.port)
        assert wait_for(lambda: len(near.messages) >= 20, timeout=15), (len(near.messages), b.log())
        time.sleep(0.3)
        assert [m.payload.decode() for m in near.messages] == [str(i) for i in range(20)]
        near.loop_stop()
    finally:
        b.stop()
        remote.stop()


def test_a_silent_remote_and_bad_tls_files():
    """A remote that accepts the connection and never answers CONNECT is left after keep_alive and
    tried again; a cafile that is not a certificate stops startup with exit 2 naming the key."""
    server = fake_remote(16)
    held = []
    stop = threading.Event()

    def accept():
        server.settimeout(0.2)
        while not stop.is_set():
            try:
                held.append(server.accept()[0])
            except OSError:
                pass

    threading.Thread(target=accept, daemon=True).start()
    port = server.getsockname()[1]
    b = Broker([], config_text=bridge_config(port, [{"pattern": "t/#"}]).replace("keep_alive = 5", "keep_alive = 1"))
    try:
        assert wait_for(lambda: b.log().count("no CONNACK from") >= 2, timeout=10), b.log()
        assert len(held) >= 2
    finally:
        b.stop()
        stop.set()
        server.close()
    d = open_dir()
    (d / "junk.crt").write_text("not a certificate\n")
    conf = d / "bad.conf"
    conf.write_text(bridge_config(port, [{"pattern": "t/#"}], bridge_extra=f'cafile = "{d}/junk.crt"\n'))
    r = subprocess.run([BINARY, "-c", str(conf)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and "bridge[0].cafile" in r.stderr, (r.returncode, r.stderr)


def test_a_mosquitto_edge_bridges_into_mqlite():
    """Mosquitto's own bridge into mqlite, as Mosquitto configures it by default (try_private:
    protocol level 0x84): accepted at once, and what the edge publishes is not sent back to it."""
    core = Broker([], config_text='[[listener]]\nbind = "127.0.0.1:0"\n')
    edge = Mosquitto(extra=f"connection core\naddress 127.0.0.1:{core.port}\ntopic chat/# both 1\n")
    try:
        on_core = subscriber(core.port, "chat/#")
        on_edge = subscriber(edge.port, "chat/#")
        time.sleep(1.5)  # (the edge's bridge connects)
        assert "refusing CONNECT" not in core.log(), core.log()
        published(edge.port, "chat/from-edge", "e")
        published(core.port, "chat/from-core", "c")
        assert wait_for(lambda: len(on_core.messages) >= 2 and len(on_edge.messages) >= 2, timeout=10), (got(on_core), got(on_edge))
        time.sleep(1.5)  # a loop would keep adding copies
        expected = sorted([("chat/from-edge", "e"), ("chat/from-core", "c")])
        assert sorted(got(on_core)) == expected and sorted(got(on_edge)) == expected
        assert "refusing CONNECT" not in core.log(), core.log()
    finally:
        edge.stop()
        core.stop()


def test_topics_with_no_remote_name_are_not_forwarded_and_block_nothing():
    """The prefix's own parent (which prefix/# matches) and a topic the prefix makes too long have
    no remote name: not forwarded, done with in the bridge's session (QoS 1 flows behind them go)."""
    remote = Mosquitto()
    b = Broker([], config_text=bridge_config(remote.port, [
        {"pattern": "#", "direction": "out", "qos": 1, "local_prefix": "loc/"},
        {"pattern": "sensors/#", "direction": "out", "qos": 1, "remote_prefix": "site1/"},
    ], bridge_extra="max_inflight = 1\n", extra="[server]\nsys_interval = 1\n"))
    try:
        assert connected(b), b.log()
        far = subscriber(remote.port, "#")
        published(b.port, "loc", "parent")
        published(b.port, "loc/", "the prefix itself: an empty topic name on the remote")
        published(b.port, "sensors/" + "a" * (65535 - len("sensors/")), "too long")
        published(b.port, "loc/x", "one")
        published(b.port, "sensors/ok", "two")
        assert wait_for(lambda: len(far.messages) >= 2, timeout=10), (got(far), b.log()[-1500:])
        time.sleep(0.5)
        assert sorted(got(far)) == [("site1/sensors/ok", "two"), ("x", "one")]
        assert b.proc.poll() is None
        log = b.log()
        assert log.count("bridge connected") == 1, log[-1500:]
        # Logged once for the three (at most once in ten seconds), and counted as dropped.
        assert log.count("not forwarded:") == 1 and "closed before CONNACK" not in log, log[-1500:]
        assert wait_for(lambda: sys_value(b.port, "$SYS/broker/publish/messages/dropped") == "3", timeout=8)
    finally:
        b.stop()
        remote.stop()


def test_a_remote_that_stops_reading_gets_what_was_kept_in_order():
    """Back-pressure: a remote that stops reading while 20,000 QoS 0 messages of 1 KiB come in. The
    link's batch, then the session's queue, hold what they may and the rest is dropped (QoS 0):
    the edge's memory stays bounded, and what the remote reads afterwards comes in order, once
    each; a QoS 1 message after that still goes through."""
    import struct
    server = fake_remote()
    port = server.getsockname()[1]
    config = bridge_config(port, [{"pattern": "t/#", "direction": "out", "qos": 0}]).replace("keep_alive = 5", "keep_alive = 60")
    b = Broker([], config_text=config)
    try:
        server.settimeout(10)
        link, _ = server.accept()
        link.settimeout(10)
        first = link.recv(4096)
        assert first and first[0] == 0x10, first  # CONNECT
        link.sendall(bytes([0x20, 2, 0, 0]))
        assert connected(b), b.log()
        rss_before = rss_kib(b.proc.pid)

        device = socket.create_connection(("127.0.0.1", b.port))
        device.sendall(connect_packet(b"dev1"))
        assert device.recv(4)[:1] == b"\x20"
        filler = b"x" * 1000
        device.sendall(b"".join(publish_packet(b"t/a", b"%08d" % i + filler) for i in range(20000)))
        time.sleep(2)  # the link's channel fills; the remote reads nothing meanwhile
        rss_full = rss_kib(b.proc.pid)

        # The remote reads again: what was kept, then (once a second passes without more) a QoS 1
        # message published now.
        seen, stream, pos, last, sent_last = [], bytearray(), 0, False, False
        link.settimeout(1)
        deadline = time.time() + 30
        while not last and time.time() < deadline:
            try:
                chunk = link.recv(1 << 20)
            except socket.timeout:
                assert not sent_last, ("the last message did not come", len(seen), b.log()[-2000:])
                device.sendall(publish_packet(b"t/last", b"last", qos=1, packet_id=7))
                sent_last = True
                link.settimeout(10)
                continue
            assert chunk, ("the link closed", len(seen), b.log()[-2000:])
            stream += chunk
            while len(stream) - pos >= 2:  # each whole packet from `pos` on
                length, shift, i = 0, 0, pos + 1
                while i < len(stream):
                    length |= (stream[i] & 0x7F) << shift
                    shift, i = shift + 7, i + 1
                    if not stream[i - 1] & 0x80:
                        break
                else:
                    break
                if len(stream) - i < length:
                    break
                kind, body = stream[pos], bytes(stream[i:i + length])
                pos = i + length
                if kind == 0xC0:  # PINGREQ
                    link.sendall(bytes([0xD0, 0]))
                elif kind >> 4 == 3:
                    topic_length = struct.unpack(">H", body[:2])[0]
                    topic = body[2:2 + topic_length]
                    payload = body[2 + topic_length + (2 if kind & 0x06 else 0):]
                    if topic == b"t/last":
                        last = True
                    else:
                        seen.append(int(payload[:8]))
            if pos > 1 << 20:
                del stream[:pos]
                pos = 0
        assert last, (len(seen), b.log()[-1500:])
        assert len(seen) >= 1000, len(seen)
        assert all(a < b_ for a, b_ in zip(seen, seen[1:])), "out of order or repeated"
        assert rss_full - rss_before < 64 * 1024, (rss_before, rss_full)
        assert b.proc.poll() is None
        device.close()
        link.close()
    finally:
        b.stop()
        server.close()


def test_a_remote_that_breaks_the_qos_flow_loses_the_link():
    """A remote answering a QoS 1 message with PUBREC breaks its flow (MQTT-4.8.0-1): the link
    closes with a log line (no PUBREL for it), as Mosquitto's bridge does, and on the next link
    the message goes again (DUP) and completes with PUBACK. A PUBACK for an id not in flight is
    ignored."""
    server = fake_remote()
    port = server.getsockname()[1]
    config = bridge_config(port, [{"pattern": "t/#", "direction": "out", "qos": 1}])
    b = Broker([], config_text=config)
    try:
        server.settimeout(10)

        def accept():
            link, _ = server.accept()
            link.settimeout(10)
            first = link.recv(4096)
            assert first and first[0] == 0x10, first  # CONNECT
            link.sendall(bytes([0x20, 2, 1 if accept.sessions else 0, 0]))  # session present the second time
            accept.sessions += 1
            return link

        def next_publish(link):
            data = b""
            while not (data and data[0] >> 4 == 3 and len(data) >= 2 + data[1]):
                chunk = link.recv(4096)
                assert chunk, ("the link closed", b.log()[-1500:])
                data += chunk
            return data[0], data[2 + 2 + data[3]:2 + 2 + data[3] + 2]  # flags, packet id
        accept.sessions = 0

        link = accept()
        assert connected(b), b.log()
        device = socket.create_connection(("127.0.0.1", b.port))
        device.sendall(connect_packet(b"dev1"))
        assert device.recv(4)[:1] == b"\x20"
        device.sendall(publish_packet(b"t/a", b"one", qos=1, packet_id=1))
        flags, packet_id = next_publish(link)
        assert flags & 0x06 == 0x02, flags  # QoS 1
        link.sendall(bytes([0x40, 2]) + bytes([0x12, 0x34]))  # PUBACK for an id not in flight: ignored
        link.sendall(bytes([0x50, 2]) + packet_id)  # PUBREC for a QoS 1 message
        link.settimeout(5)
        rest = read_to_close(link)
        assert not rest.startswith(b"\x62"), rest  # no PUBREL
        assert wait_for(lambda: "not in that state of its flow" in b.log()), b.log()[-1500:]
        link.close()

        link = accept()
        flags, again = next_publish(link)
        assert flags & 0x08 and again == packet_id, (flags, again)  # sent again, DUP, same id
        link.sendall(bytes([0x40, 2]) + again)
        time.sleep(0.5)
        assert b.proc.poll() is None
        assert b.log().count("not in that state of its flow") == 1
        device.close()
        link.close()
    finally:
        b.stop()
        server.close()


def test_an_mqtt5_remote_is_told_max_packet_size_and_keeps_larger_messages_to_itself():
    """The bridge's CONNECT to an MQTT 5 remote carries Maximum Packet Size (`max_packet_size`
    plus its fixed header): the remote drops a larger message (MQTT-3.1.2-24) rather than send a
    packet that would close the link; what follows still comes in, on the same link."""
    remote = Mosquitto()
    b = Broker([], config_text=bridge_config(remote.port, [{"pattern": "cmd/#", "direction": "in", "qos": 1}],
                                             extra="[limits]\nmax_packet_size = 1024\n", bridge_extra="protocol_version = 5\n"))
    try:
        assert connected(b), b.log()
        near = subscriber(b.port, "cmd/#")
        published(remote.port, "cmd/big", "x" * 5000)
        published(remote.port, "cmd/ok", "after")
        assert wait_for(lambda: len(near.messages) >= 1, timeout=10), b.log()[-1500:]
        time.sleep(0.5)
        assert got(near) == [("cmd/ok", "after")]
        log = b.log()
        assert log.count("bridge connected") == 1 and "bridge link error" not in log, log[-1500:]
    finally:
        b.stop()
        remote.stop()


def test_a_remote_topic_past_max_topic_levels_is_dropped_not_the_link():
    """What the remote sends on a topic deeper than `max_topic_levels` is acknowledged and dropped
    (the remote would send it again on every reconnect if the link closed over it), counted, and
    logged at most once in ten seconds; what follows still comes in, on the same link."""
    remote = Mosquitto()
    b = Broker([], config_text=bridge_config(remote.port, [{"pattern": "cmd/#", "direction": "in", "qos": 1}],
                                             extra="[limits]\nmax_topic_levels = 8\n[server]\nsys_interval = 1\n"))
    try:
        assert connected(b), b.log()
        near = subscriber(b.port, "cmd/#")
        dropped = subscriber(b.port, "$SYS/broker/publish/messages/dropped")
        published(remote.port, "cmd/" + "a/" * 20 + "deep", "deep")
        published(remote.port, "cmd/" + "b/" * 30 + "deep", "deeper")
        published(remote.port, "cmd/ok", "after")
        assert wait_for(lambda: len(near.messages) >= 1, timeout=10), b.log()[-1500:]
        assert wait_for(lambda: got(dropped)[-1:] == [("$SYS/broker/publish/messages/dropped", "2")], timeout=5), got(dropped)
        assert got(near) == [("cmd/ok", "after")]
        log = b.log()
        assert log.count("message from the remote dropped") == 1 and "(22 levels" in log, log[-1500:]
        assert log.count("bridge connected") == 1 and "bridge link error" not in log, log[-1500:]
    finally:
        b.stop()
        remote.stop()


def test_a_remote_topic_too_long_with_the_local_prefix_is_dropped_and_logged():
    """A remote topic that the local prefix makes longer than 65,535 bytes is no local topic: the
    message is acknowledged, dropped, counted and logged, as one past max_topic_levels."""
    remote = Mosquitto()
    b = Broker([], config_text=bridge_config(remote.port, [{"pattern": "cmd/#", "direction": "in", "qos": 1, "local_prefix": "pre/"}],
                                             extra="[server]\nsys_interval = 1\n"))
    try:
        assert connected(b), b.log()
        near = subscriber(b.port, "pre/#")
        published(remote.port, "cmd/" + "a" * (65535 - 4), "too long here")
        published(remote.port, "cmd/ok", "after")
        assert wait_for(lambda: len(near.messages) >= 1, timeout=10), b.log()[-1500:]
        assert got(near) == [("pre/cmd/ok", "after")]
        log = b.log()
        assert log.count("message from the remote dropped") == 1 and "65539 bytes" in log, log[-1500:]
        assert wait_for(lambda: sys_value(b.port, "$SYS/broker/publish/messages/dropped") == "1", timeout=8)
    finally:
        b.stop()
        remote.stop()


def test_a_packet_before_connack_closes_the_link():
    """The server's first packet is CONNACK (MQTT-3.2.0-1): a remote that sends a PUBLISH first
    breaks the protocol, and the bridge closes the link (logged) without acknowledging it or
    publishing it locally, then connects again."""
    server = fake_remote()
    server.settimeout(10)
    b = Broker([], config_text=bridge_config(server.getsockname()[1], [{"pattern": "in/#", "direction": "in", "qos": 1}]))
    try:
        near = subscriber(b.port, "in/#")
        link, _ = server.accept()
        link.settimeout(10)
        assert link.recv(4096)[:1] == b"\x10"  # CONNECT
        link.sendall(publish_packet(b"in/early", b"too soon", qos=1, packet_id=7) + bytes([0x20, 2, 0, 0]))
        rest = read_to_close(link)
        assert b"\x40\x02\x00\x07" not in rest, rest  # no PUBACK
        assert wait_for(lambda: "sent PUBLISH before CONNACK (MQTT-3.2.0-1): closing the link" in b.log()), b.log()[-1500:]
        again, _ = server.accept()  # it reconnects
        again.close()
        link.close()
        assert got(near) == []
        assert "bridge connected" not in b.log()
    finally:
        b.stop()
        server.close()


def test_an_mqtt5_remote_breaking_the_protocol_hears_disconnect_0x82_before_the_close():
    """An AUTH from an MQTT 5 remote the bridge asked no enhanced authentication of is a protocol
    error: DISCONNECT 0x82 goes out, then the link closes (logged), and the bridge connects again."""
    server = fake_remote()
    server.settimeout(10)
    b = Broker([], config_text=bridge_config(server.getsockname()[1], [{"pattern": "t/#", "direction": "out", "qos": 1}],
                                             bridge_extra="protocol_version = 5\n"))
    try:
        link, _ = server.accept()
        link.settimeout(10)
        assert link.recv(4096)[:1] == b"\x10"  # CONNECT
        link.sendall(bytes([0x20, 3, 0, 0, 0]))  # CONNACK: success, no properties
        assert connected(b), b.log()[-1500:]
        link.sendall(bytes([0xF0, 0]))  # AUTH
        rest = read_to_close(link)
        assert rest[:1] == b"\xe0" and rest[2] == 0x82, rest  # DISCONNECT, protocol error
        assert wait_for(lambda: "sent AUTH, which the bridge did not ask for: closing the link" in b.log()), b.log()[-1500:]
        again, _ = server.accept()
        again.close()
        link.close()
    finally:
        b.stop()
        server.close()


def test_an_mqtt5_remotes_limits_are_kept():
    """An MQTT 5 remote's CONNACK limits: Maximum QoS (QoS 2 goes as 1, MQTT-3.2.2-11), Retain
    Available 0 (RETAIN cleared, MQTT-3.2.2-14), Maximum Packet Size counted with the remote prefix
    (MQTT-3.2.2-15: not sent), Server Keep Alive (pings at its interval, MQTT-3.2.2-21, not the
    bridge's 60 s). Mosquitto closes the link for each of them otherwise."""
    import urllib.request
    remote = Mosquitto(extra="max_qos 1\nretain_available false\nmax_keepalive 10\nmax_packet_size 300\n")
    metrics_port = free_port()
    b = Broker([], config_text=bridge_config(remote.port, [
        {"pattern": "out/#", "direction": "out", "qos": 2, "remote_prefix": "p" * 150 + "/"},
    ], bridge_extra="protocol_version = 5\n", keep_alive=60,
        extra=f'[[listener]]\nbind = "127.0.0.1:{metrics_port}"\nprotocol = "http"\n'))
    try:
        assert connected(b), b.log()
        far = paho_client("far")   # (keep-alive within the remote's max_keepalive, or refused)
        far.connect("127.0.0.1", remote.port, keepalive=10)
        far.loop_start()
        assert far.connected.wait(5)
        far.subscribe("#", qos=1)
        time.sleep(0.3)
        c = paho_client("local-pub")
        start(c, b.port)
        c.publish("out/big", "x" * 200, qos=2).wait_for_publish(10)   # over 300 bytes with the prefix
        c.publish("out/a", "q2 retained", qos=2, retain=True).wait_for_publish(10)
        assert wait_for(lambda: len(far.messages) >= 1, timeout=10), (got(far), b.log()[-1500:])
        m = far.messages[0]
        assert (m.topic, m.payload.decode(), m.qos, m.retain) == ("p" * 150 + "/out/a", "q2 retained", 1, False)
        time.sleep(16)   # idle past 1.5 x the remote's keep-alive of 10 s (the bridge's is 60)
        c.publish("out/b", "after", qos=1).wait_for_publish(10)
        assert wait_for(lambda: len(far.messages) >= 2, timeout=10), (got(far), b.log()[-1500:])
        assert [t[1] for t in got(far)] == ["q2 retained", "after"]
        log = b.log()
        assert log.count("bridge connected") == 1, log[-2000:]
        assert "over its Maximum Packet Size (300)" in log, log[-2000:]
        with urllib.request.urlopen(f"http://127.0.0.1:{metrics_port}/metrics", timeout=5) as r:
            text = r.read().decode()
        assert 'mqlite_messages_dropped_total{reason="too_large"} 1' in text, text
        c.loop_stop()
    finally:
        b.stop()
        remote.stop()
