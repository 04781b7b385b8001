"""The shipped Lua plugins against clients nobody here wrote, on the real binary."""
import json
import signal
import subprocess
import time
from pathlib import Path

import paho.mqtt.client as mqtt

from conftest import BINARY, ROOT, Broker, wait_for
from test_interop import paho_client, pub, start, sub_process

PLUGINS = ROOT / "plugins"


def config(tmp_path, plugins):
    text = '[server]\nworkers = 2\n[[listener]]\nbind = "127.0.0.1:0"\n'
    for script, options in plugins:
        text += f'[[plugin]]\nscript = "{PLUGINS / script}"\noptions = {options}\n'
    path = tmp_path / "mqlite.conf"
    path.write_text(text)
    return path


def mosquitto_passwd(path, user, password, *extra):
    subprocess.run(["mosquitto_passwd", *extra, "-b", str(path), user, password], check=True)


def start_broker(path):
    return Broker(["-c", str(path)])


def test_password_file_written_by_mosquitto_passwd(tmp_path):
    passwd = tmp_path / "passwd"
    passwd.touch()
    mosquitto_passwd(passwd, "alice", "secret")              # $7$ (PBKDF2-SHA512)
    mosquitto_passwd(passwd, "carol", "pw6", "-H", "sha512")  # $6$ (SHA-512)
    b = start_broker(config(tmp_path, [("password_file.lua", '{ password_file = "passwd" }')]))
    try:
        pub(b.port, "-u", "alice", "-P", "secret", "-t", "t", "-m", "ok")
        pub(b.port, "-u", "carol", "-P", "pw6", "-t", "t", "-m", "ok")
        for user, password in [("alice", "wrong"), ("mallory", "secret")]:
            r = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(b.port), "-u", user, "-P", password,
                                "-t", "t", "-m", "x"], capture_output=True, text=True, timeout=10)
            assert r.returncode != 0 and "bad user name or password" in r.stderr.lower()

        c = paho_client("paho-alice")
        c.username_pw_set("alice", "secret")
        start(c, b.port)
        assert not c.connect_rc.is_failure
        c.disconnect()
        c.loop_stop()

        # SIGHUP re-reads the file: a password changed with mosquitto_passwd takes effect.
        mosquitto_passwd(passwd, "alice", "changed")
        b.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "scripts reloaded" in b.log())
        pub(b.port, "-u", "alice", "-P", "changed", "-t", "t", "-m", "ok")
        r = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(b.port), "-u", "alice", "-P", "secret",
                            "-t", "t", "-m", "x"], capture_output=True, text=True, timeout=10)
        assert r.returncode != 0

        # A reload that fails keeps the running scripts.
        passwd.write_text("a line without a colon\n")
        b.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "reload failed" in b.log())
        pub(b.port, "-u", "alice", "-P", "changed", "-t", "t", "-m", "still ok")
    finally:
        assert b.stop() == 0


def test_acl_file_and_rewrite_with_mosquitto_clients(tmp_path):
    passwd = tmp_path / "passwd"
    passwd.touch()
    mosquitto_passwd(passwd, "alice", "secret")
    (tmp_path / "acl").write_text("user alice\ntopic readwrite alice/#\ntopic deny alice/secret/#\ntopic read sensors/#\n"
                                  "pattern write legacy/%c/#\n")
    b = start_broker(config(tmp_path, [
        ("password_file.lua", '{ password_file = "passwd" }'),
        ("acl_file.lua", '{ acl_file = "acl" }'),
        ("topic_rewrite.lua", '{ rules = [ { from = "legacy/+/temp", to = "alice/{1}/temperature" } ] }'),
    ]))
    try:
        auth = ["-u", "alice", "-P", "secret"]
        sub = sub_process(b.port, *auth, "-t", "alice/#", "-v", "-C", "2")
        time.sleep(0.5)
        pub(b.port, *auth, "-t", "alice/secret/plans", "-m", "hidden")       # denied
        pub(b.port, *auth, "-t", "elsewhere", "-m", "not allowed")            # not writable
        pub(b.port, *auth, "-i", "boiler", "-t", "legacy/boiler/temp", "-m", "71")  # rewritten
        pub(b.port, *auth, "-t", "alice/notes", "-m", "visible")
        out, err = sub.communicate(timeout=15)
        assert out.splitlines() == ["alice/boiler/temperature 71", "alice/notes visible"], err

        denied = sub_process(b.port, *auth, "-t", "alice/secret/#", "-C", "1", "-W", "2")
        _, err = denied.communicate(timeout=15)
        assert "denied" in err.lower()
    finally:
        assert b.stop() == 0


def test_acl_revoked_by_editing_the_file_and_sighup_while_subscribed(tmp_path):
    passwd = tmp_path / "passwd"
    passwd.touch()
    mosquitto_passwd(passwd, "alice", "secret")
    mosquitto_passwd(passwd, "bob", "pw")
    acl = tmp_path / "acl"
    acl.write_text("user alice\ntopic read sensors/#\ntopic read news/#\nuser bob\ntopic write sensors/#\ntopic write news/#\n")
    b = start_broker(config(tmp_path, [
        ("password_file.lua", '{ password_file = "passwd" }'),
        ("acl_file.lua", '{ acl_file = "acl" }'),
    ]))
    try:
        alice = paho_client("paho-alice")
        alice.username_pw_set("alice", "secret")
        start(alice, b.port)
        alice.subscribe([("sensors/#", 0), ("news/#", 0)])
        time.sleep(0.5)
        bob = ["-u", "bob", "-P", "pw"]
        pub(b.port, *bob, "-t", "sensors/t1", "-m", "before")
        assert wait_for(lambda: [m.payload for m in alice.messages] == [b"before"])

        # alice may no longer read sensors/#: her subscription goes at the reload, while she stays connected.
        acl.write_text("user alice\ntopic read news/#\nuser bob\ntopic write sensors/#\ntopic write news/#\n")
        b.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "1 subscriptions removed" in b.log()), b.log()
        pub(b.port, *bob, "-t", "sensors/t1", "-m", "after")
        pub(b.port, *bob, "-t", "news/n1", "-m", "still allowed")
        assert wait_for(lambda: len(alice.messages) == 2)
        time.sleep(0.3)
        assert [m.payload for m in alice.messages] == [b"before", b"still allowed"]
        assert alice.is_connected()
        alice.disconnect()
        alice.loop_stop()
    finally:
        assert b.stop() == 0


def test_stop_during_a_slow_reload_is_graceful(tmp_path):
    """SIGTERM while SIGHUP's reload still loads a script that takes long (a generous time_limit):
    the stop goes on at once (wills published, exit 0); the load fails as a running script would."""
    script = tmp_path / "slow.lua"
    script.write_text('mqlite.on_publish("#", function(m) return nil end)\n')
    path = tmp_path / "mqlite.conf"
    path.write_text('[server]\nworkers = 2\n[[listener]]\nbind = "127.0.0.1:0"\n'
                    '[scripting]\ntime_limit = 3600\ninstruction_limit = 2147483647\n'
                    f'[[plugin]]\nscript = "{script}"\n')
    b = start_broker(path)
    try:
        watcher = paho_client("watcher")
        start(watcher, b.port)
        watcher.subscribe("will/#", 1)
        willer = paho_client("willer")
        willer.will_set("will/w", b"gone", qos=1)
        start(willer, b.port)
        time.sleep(0.3)
        script.write_text('local x = 0 for i = 1, 2e9 do x = x + 1 end\n'
                          'mqlite.on_publish("#", function(m) return nil end)\n')
        b.proc.send_signal(signal.SIGHUP)
        time.sleep(0.5)  # the reload is loading
        started = time.monotonic()
        assert b.stop() == 0
        assert time.monotonic() - started < 3, "the stop waited for the reload"
        assert wait_for(lambda: [m.payload for m in watcher.messages] == [b"gone"]), watcher.messages
        assert "reload failed" in b.log() and "stopped" in b.log()
        for c in (watcher, willer):
            c.loop_stop()
    finally:
        b.stop()


def test_presence_publishes_retained_online_and_offline(tmp_path):
    b = start_broker(config(tmp_path, [("presence.lua", '{ topic = "presence/%c" }')]))
    try:
        watcher = sub_process(b.port, "-i", "watcher", "-t", "presence/#", "-v", "-C", "5")
        time.sleep(0.5)
        device = paho_client("device-7")
        start(device, b.port)
        time.sleep(0.3)
        device.loop_stop()
        device.socket().close()  # a lost connection, no DISCONNECT, no will configured
        pub(b.port, "-i", "tidy", "-t", "x", "-m", "y")  # connects and disconnects cleanly
        out, err = watcher.communicate(timeout=15)
        lines = out.splitlines()
        assert lines[0] == "presence/watcher online", out  # retained, sent on SUBSCRIBE
        assert lines[1:] == ["presence/device-7 online", "presence/device-7 offline",
                             "presence/tidy online", "presence/tidy offline"], (out, err)
        # Retained: a back end that subscribes later sees the last state of each device.
        late = sub_process(b.port, "-i", "late", "-t", "presence/#", "-v", "-C", "4", "-W", "5")
        out, err = late.communicate(timeout=15)
        assert sorted(out.splitlines()) == ["presence/device-7 offline", "presence/late online", "presence/tidy offline",
                                            "presence/watcher offline"], (out, err)

        # A device that reconnects before its old connection is gone (a takeover): its old
        # connection's "offline" comes before the new one's "online", so it ends up online.
        first = paho_client("device-9")
        start(first, b.port)
        second = paho_client("device-9")
        start(second, b.port)
        time.sleep(0.5)
        last = sub_process(b.port, "-i", "last", "-t", "presence/device-9", "-v", "-C", "1", "-W", "5")
        out, err = last.communicate(timeout=15)
        assert out.splitlines() == ["presence/device-9 online"], (out, err)
        for c in (first, second):
            c.loop_stop()
        second.disconnect()
    finally:
        assert b.stop() == 0


def test_json_envelope_with_mosquitto_clients(tmp_path):
    b = start_broker(config(tmp_path, [("json_envelope.lua", '{ filters = ["telemetry/#"] }')]))
    try:
        sub = sub_process(b.port, "-t", "#", "-v", "-C", "2")
        time.sleep(0.5)
        pub(b.port, "-i", "engine-7", "-t", "telemetry/engine", "-m", "rpm=900")
        pub(b.port, "-t", "plain/topic", "-m", "as sent")
        out, err = sub.communicate(timeout=15)
        lines = out.splitlines()
        topic, _, body = lines[0].partition(" ")
        assert topic == "telemetry/engine", out
        envelope = json.loads(body)
        assert envelope["client_id"] == "engine-7" and envelope["payload"] == "rpm=900"
        assert envelope["topic"] == "telemetry/engine" and abs(envelope["time"] - time.time()) < 10
        assert lines[1] == "plain/topic as sent"
    finally:
        assert b.stop() == 0


def test_broken_plugin_stops_startup_with_path_and_line(tmp_path):
    script = tmp_path / "broken.lua"
    script.write_text("local ok = true\nmqlite.on_connect(function(c)\n  return true\n-- missing end\n")
    path = tmp_path / "mqlite.conf"
    path.write_text(f'[[plugin]]\nscript = "{script}"\n')
    r = subprocess.run([BINARY, "-c", str(path), "--check"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2
    assert str(script) in r.stderr and "broken.lua:5:" in r.stderr and "'end' expected" in r.stderr, r.stderr


def test_presence_substitutes_once_and_skips_user_names_that_cannot_form_a_topic(tmp_path):
    """`%c` then `%u` in two passes let a client named "%u" publish the presence of the user it
    logged in as (another client's topic); a user name with "/" made a topic of more levels."""
    b = start_broker(config(tmp_path, [("presence.lua", '{ topic = "presence/%u/%c" }')]))
    try:
        watcher = sub_process(b.port, "-i", "watcher", "-t", "presence/#", "-v", "-W", "3")
        time.sleep(0.5)
        pub(b.port, "-i", "%u", "-u", "victim", "-t", "x", "-m", "y")
        pub(b.port, "-i", "dev", "-u", "a/b", "-t", "x", "-m", "y")
        pub(b.port, "-i", "dev", "-u", "ok", "-t", "x", "-m", "y")
        out, _ = watcher.communicate(timeout=15)
        lines = out.splitlines()
        assert "presence/victim/%u online" in lines and "presence/victim/victim online" not in lines, out
        assert not any(line.startswith("presence/a/b") for line in lines), out
        assert "presence/ok/dev online" in lines and "presence/ok/dev offline" in lines, out
    finally:
        assert b.stop() == 0


def test_topic_rewrite_keeps_messages_with_long_topics(tmp_path):
    """Splitting with gmatch("(.-)/") failed ("pattern too complex") on topics of a few KB: the
    message was acknowledged and dropped."""
    b = start_broker(config(tmp_path, [("topic_rewrite.lua", '{ rules = [ { from = "legacy/+/temp", to = "sensors/{1}/temperature" } ] }')]))
    try:
        device = "d" * 20000
        sub = sub_process(b.port, "-t", "sensors/+/temperature", "-v", "-C", "1", "-W", "5")
        time.sleep(0.5)
        pub(b.port, "-t", f"legacy/{device}/temp", "-m", "21", "-q", "1")
        out, err = sub.communicate(timeout=15)
        assert out.strip() == f"sensors/{device}/temperature 21", (out[:200], err, b.log()[-500:])
    finally:
        assert b.stop() == 0


def test_a_client_taking_over_a_client_id_gets_only_what_its_own_acl_allows(tmp_path):
    """Messages queued for, or in flight to, the client that held a persistent session were sent
    to whoever took its client id over, unchecked (the ACL was asked only when a message was first
    delivered). Now they go through the new client's ACL (and are dropped otherwise, as Mosquitto
    does); live messages always did."""
    import socket
    import struct
    passwd = tmp_path / "passwd"
    passwd.touch()
    mosquitto_passwd(passwd, "alice", "secret")
    mosquitto_passwd(passwd, "bob", "secret")
    (tmp_path / "acl").write_text("user alice\ntopic readwrite alice/#\nuser bob\ntopic read alice/news\ntopic write alice/#\n")
    b = start_broker(config(tmp_path, [("password_file.lua", '{ password_file = "passwd" }'), ("acl_file.lua", '{ acl_file = "acl" }')]))

    def connect(user):
        s = socket.create_connection(("127.0.0.1", b.port), timeout=10)
        cid, password = b"alice-dev", b"secret"
        body = (b"\x00\x04MQTT\x04\xc0\x00\x3c" + struct.pack(">H", len(cid)) + cid + struct.pack(">H", len(user)) + user
                + struct.pack(">H", len(password)) + password)
        s.sendall(bytes([0x10, len(body)]) + body)
        return s, s.recv(4)

    def read_packet(s):
        head = s.recv(1)
        assert head, "closed"
        length, shift = 0, 0
        while True:
            byte = s.recv(1)[0]
            length |= (byte & 0x7F) << shift
            shift += 7
            if not byte & 0x80:
                break
        body = b""
        while len(body) < length:
            body += s.recv(length - len(body))
        return head[0], body

    def topic_of(body):
        return body[2:2 + struct.unpack(">H", body[:2])[0]]

    try:
        auth = ["-u", "bob", "-P", "secret", "-q", "1"]
        alice, connack = connect(b"alice")
        assert connack == b"\x20\x02\x00\x00"
        alice.sendall(b"\x82\x0c\x00\x01\x00\x07alice/#\x01")
        assert read_packet(alice)[0] == 0x90
        pub(b.port, *auth, "-t", "alice/inflight", "-m", "one")
        kind, body = read_packet(alice)  # not acknowledged: in flight when alice goes
        assert kind & 0xF0 == 0x30 and topic_of(body) == b"alice/inflight"
        alice.close()
        time.sleep(0.3)
        pub(b.port, *auth, "-t", "alice/queued", "-m", "two")
        pub(b.port, *auth, "-t", "alice/news", "-m", "three")

        bob, connack = connect(b"bob")
        assert connack == b"\x20\x02\x01\x00", connack  # the session is there
        kind, body = read_packet(bob)
        assert kind & 0xF0 == 0x30 and topic_of(body) == b"alice/news", (kind, body)
        bob.settimeout(1)
        try:
            extra = read_packet(bob)
            raise AssertionError(f"bob got {extra}")
        except socket.timeout:
            pass
        bob.close()
    finally:
        assert b.stop() == 0
