"""[persistence]: retained messages in SQLite, across a restart and a kill -9, with real clients."""
import signal
import subprocess
import threading
import time

import paho.mqtt.client as mqtt

from conftest import BINARY, Broker, wait_for
from test_interop import paho_client, pub, start, sub_process


def store_config(path, sync="full"):
    return f'[[listener]]\nbind = "127.0.0.1:0"\n[persistence]\npath = "{path}"\nsync = "{sync}"\n'


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
    acked = []  # mids, appended by paho's thread (list.append is atomic)
    topic_of = {}
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="crash-pub")
    c.max_inflight_messages_set(100)
    c.max_queued_messages_set(0)
    c.on_publish = lambda client, userdata, mid, reason_code, properties: acked.append(mid)
    connected = threading.Event()
    c.on_connect = lambda *a: connected.set()
    c.connect("127.0.0.1", b.port)
    c.loop_start()
    assert connected.wait(5)
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
