"""[persistence]: retained messages in SQLite, across a restart and a kill -9, with real clients."""
import signal
import socket
import subprocess
import threading
import time

import paho.mqtt.client as mqtt

from conftest import BINARY, Broker, wait_for
from test_interop import paho_client, pub, start, sub_process


def store_config(path, sync="full"):
    return f'[[listener]]\nbind = "127.0.0.1:0"\n[persistence]\npath = "{path}"\nsync = "{sync}"\n'


def acked_publisher(port, client_id, inflight, clean_session=True):
    """A paho publisher that never queues locally, connected; the mids whose flow completed
    (PUBACK, or PUBCOMP) are appended to the list returned with it (by paho's thread)."""
    acked = []
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, clean_session=clean_session)
    c.max_inflight_messages_set(inflight)
    c.max_queued_messages_set(0)
    c.on_publish = lambda client, userdata, mid, reason_code, properties: acked.append(mid)
    connected = threading.Event()
    c.on_connect = lambda *a: connected.set()
    c.connect("127.0.0.1", port)
    c.loop_start()
    assert connected.wait(5)
    return c, acked


def retained_on(port, filter, count, timeout=10):
    """What a new subscriber to `filter` gets: topic -> payload (expects `count` messages)."""
    c = paho_client("reader-%d" % time.monotonic_ns())
    start(c, port)
    c.subscribe(filter, qos=1)
    assert wait_for(lambda: len(c.messages) >= count, timeout=timeout), len(c.messages)
    time.sleep(0.3)
    got = {m.topic: m.payload for m in c.messages}
    assert all(m.retain for m in c.messages)
    c.disconnect()
    c.loop_stop()
    return got


def test_retained_messages_survive_a_restart_with_mosquitto_clients(tmp_path):
    db = tmp_path / "mqlite.db"
    b = Broker([], config_text=store_config(db, sync="batch"))
    try:
        pub(b.port, "-t", "keep/a", "-m", "alpha", "-r", "-q", "1")
        pub(b.port, "-t", "keep/b", "-m", "beta", "-r")
        pub(b.port, "-t", "keep/c", "-m", "gamma", "-r", "-q", "2")
        pub(b.port, "-t", "keep/c", "-n", "-r", "-q", "1")  # cleared
    finally:
        assert b.stop() == 0
    b = Broker([], config_text=store_config(db, sync="batch"))
    try:
        assert "loaded 2 retained messages" in b.log()
        sub = sub_process(b.port, "-t", "keep/#", "-C", "2", "-v", "--retained-only")
        out, err = sub.communicate(timeout=15)
        assert sub.returncode == 0, err
        assert sorted(out.splitlines()) == ["keep/a alpha", "keep/b beta"]
    finally:
        b.stop()


def test_kill_9_loses_no_acknowledged_retained_message_with_sync_full(tmp_path):
    """2,000 retained QoS 1 messages on distinct topics; the broker is killed (SIGKILL) after 500
    PUBACKs: after a restart every message the publisher had a PUBACK for is there."""
    db = tmp_path / "mqlite.db"
    b = Broker([], config_text=store_config(db, sync="full"))
    topic_of = {}
    c, acked = acked_publisher(b.port, "crash-pub", 100)
    try:
        for i in range(2000):
            info = c.publish("crash/%d" % i, b"payload-%d" % i, qos=1, retain=True)
            topic_of[info.mid] = "crash/%d" % i
        assert wait_for(lambda: len(acked) >= 500, timeout=30)
        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait(10)
        time.sleep(0.2)
        promised = {topic_of[mid] for mid in list(acked)}
    finally:
        c.loop_stop()
        b.stop()
    assert len(promised) >= 500
    b = Broker([], config_text=store_config(db, sync="full"))
    try:
        got = retained_on(b.port, "crash/#", len(promised))
        missing = [t for t in promised if got.get(t) != b"payload-" + t.split("/")[1].encode()]
        assert missing == [], f"{len(missing)} acknowledged messages lost, e.g. {missing[:5]}"
    finally:
        b.stop()


def test_a_store_that_cannot_be_used_stops_startup_with_exit_2(tmp_path):
    junk = tmp_path / "junk.db"
    junk.write_bytes(b"A" * 4096)
    conf = tmp_path / "bad.conf"
    conf.write_text(store_config(junk))
    r = subprocess.run([BINARY, "-c", str(conf)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r.stderr
    assert str(conf) in r.stderr and "persistence.path" in r.stderr and "not an SQLite database" in r.stderr, r.stderr
    # A second mqlite on a store in use.
    db = tmp_path / "mqlite.db"
    b = Broker([], config_text=store_config(db))
    try:
        conf.write_text(store_config(db))
        r = subprocess.run([BINARY, "-c", str(conf)], capture_output=True, text=True, timeout=30)
        assert r.returncode == 2 and "locked by another process" in r.stderr, r.stderr
    finally:
        b.stop()


def session_config(path, port, sync="full"):
    """A store, a fixed port (clients reconnect to the restarted broker there) and a queue that
    holds the whole stream."""
    return (f'[[listener]]\nbind = "127.0.0.1:{port}"\n[limits]\nmax_queued = 20000\n'
            f'[persistence]\npath = "{path}"\nsync = "{sync}"\n')


def free_port():
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def persistent_subscriber(port, client_id, filter, qos):
    """A clean_session=0 subscription, then offline."""
    c = paho_client(client_id, clean_session=False)
    start(c, port)
    c.subscribe(filter, qos=qos)
    time.sleep(0.3)
    c.disconnect()
    c.loop_stop()


def drain(port, client_id, expected, timeout=60):
    """Reconnects `client_id` (clean_session=0): what it gets until `expected` messages came and
    a second passed without more; CONNACK's session present flag too."""
    c = paho_client(client_id, clean_session=False)
    start(c, port)
    assert wait_for(lambda: len(c.messages) >= expected, timeout=timeout), (len(c.messages), expected)
    count = -1
    while count != len(c.messages):
        count = len(c.messages)
        time.sleep(1)
    present = c.flags.session_present
    c.disconnect()
    c.loop_stop()
    return present, [m.payload for m in c.messages]


def test_kill_9_during_a_qos1_stream_to_an_offline_persistent_subscriber_loses_nothing_acknowledged(tmp_path):
    """10,000 QoS 1 messages for a clean_session=0 subscriber that is offline; the broker is killed
    (SIGKILL) mid-stream with sync = "full": after a restart, the subscriber gets every message the
    publisher had a PUBACK for (QoS 1 allows duplicates; it loses none)."""
    db = tmp_path / "mqlite.db"
    port = free_port()
    b = Broker([], config_text=session_config(db, port))
    persistent_subscriber(port, "stream-sub", "stream/#", 1)
    payload_of = {}
    c, acked = acked_publisher(port, "stream-pub", 100)
    try:
        for i in range(10000):
            info = c.publish("stream/x", b"m-%d" % i, qos=1)
            payload_of[info.mid] = b"m-%d" % i
        assert wait_for(lambda: len(acked) >= 3000, timeout=60)
        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait(10)
        promised = {payload_of[mid] for mid in list(acked)}
    finally:
        c.loop_stop()
        b.stop()
    assert 3000 <= len(promised) < 10000, len(promised)
    b = Broker([], config_text=session_config(db, port))
    try:
        assert "loaded 0 retained messages and 1 sessions" in b.log(), b.log()
        present, got = drain(port, "stream-sub", len(promised))
        assert present
        missing = promised - set(got)
        assert not missing, f"{len(missing)} acknowledged messages lost, e.g. {sorted(missing)[:5]}"
    finally:
        b.stop()


def test_qos2_exactly_once_across_a_kill_9(tmp_path):
    """A clean_session=0 publisher sends 2,000 QoS 2 messages to an offline persistent subscriber;
    the broker is killed mid-stream and started again on the same port; the publisher reconnects
    and finishes its flows (re-sending PUBLISH or PUBREL as its session says). The subscriber then
    gets every message exactly once."""
    db = tmp_path / "mqlite.db"
    port = free_port()
    b = Broker([], config_text=session_config(db, port))
    persistent_subscriber(port, "once-sub", "once/#", 2)
    c, completed = acked_publisher(port, "once-pub", 50, clean_session=False)
    c.reconnect_delay_set(min_delay=1, max_delay=1)
    try:
        for i in range(2000):
            c.publish("once/x", b"q2-%d" % i, qos=2)
        assert wait_for(lambda: len(completed) >= 500, timeout=60)
        b.proc.send_signal(signal.SIGKILL)
        b.proc.wait(10)
        assert len(completed) < 2000
        b = Broker([], config_text=session_config(db, port))
        assert wait_for(lambda: len(completed) >= 2000, timeout=90), len(completed)
        present, got = drain(port, "once-sub", 2000)
        assert present
        assert len(got) == 2000 and len(set(got)) == 2000, (len(got), len(set(got)))
    finally:
        c.loop_stop()
        b.stop()

