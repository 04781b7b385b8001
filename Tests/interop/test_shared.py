"""Shared subscriptions ($share/GROUP/FILTER) for 3.1.1 clients, on the real binary with two workers."""
import socket
import struct
import time

import pytest

from conftest import Broker, wait_for
from test_hostile import connect_packet, publish_packet, read_exactly, remaining_length, rss_kib, settle
from test_interop import paho_client, pub, start, sub_process


def subscribe(sock, filters, packet_id=1):
    """SUBSCRIBE with (filter, qos) pairs; returns the SUBACK's return codes."""
    body = struct.pack("!H", packet_id)
    for topic, qos in filters:
        body += struct.pack("!H", len(topic)) + topic + bytes([qos])
    sock.sendall(bytes([0x82]) + remaining_length(len(body)) + body)
    kind, payload = read_packet(sock)
    assert kind == 0x90, hex(kind)
    assert payload[:2] == struct.pack("!H", packet_id)
    return list(payload[2:])


def read_packet(sock, timeout=5):
    """One MQTT packet: its first byte and its body."""
    sock.settimeout(timeout)
    first = read_exactly(sock, 1)[0]
    length, shift = 0, 0
    while True:
        byte = read_exactly(sock, 1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return first, read_exactly(sock, length)


def client(port, client_id, clean=True):
    s = socket.create_connection(("127.0.0.1", port))
    packet = bytearray(connect_packet(client_id))
    if not clean:
        packet[9] = 0x00  # connect flags: clean session 0
    s.sendall(bytes(packet))
    kind, body = read_packet(s)
    assert (kind, body[1]) == (0x20, 0)
    return s


def publishes(sock, count, timeout=5, ack=False):
    """Reads `count` PUBLISH packets, acknowledging the QoS 1 ones if `ack`: (topic, payload, qos,
    packet id)."""
    out = []
    while len(out) < count:
        kind, body = read_packet(sock, timeout)
        if kind >> 4 != 3:
            continue
        qos = (kind >> 1) & 3
        n = struct.unpack("!H", body[:2])[0]
        topic, rest = body[2:2 + n], body[2 + n:]
        packet_id = None
        if qos:
            packet_id, rest = struct.unpack("!H", rest[:2])[0], rest[2:]
            if ack and qos == 1:
                sock.sendall(b"\x40\x02" + struct.pack("!H", packet_id))
        out.append((topic, rest, qos, packet_id))
    return out


def publishes_until_quiet(sock, wait=0.5, ack=False):
    """Reads PUBLISH packets until none comes for `wait` seconds (as `publishes`)."""
    out = []
    while True:
        try:
            out += publishes(sock, 1, timeout=wait, ack=ack)
        except socket.timeout:
            return out


def nothing_more(sock, wait=0.5):
    sock.settimeout(wait)
    try:
        return sock.recv(1) == b""
    except socket.timeout:
        return True


def test_each_message_goes_to_one_member_in_turn_with_paho_and_mosquitto_clients(broker):
    # Members on both workers (connections are spread round robin), a plain subscriber beside
    # them, and a second group with one member.
    members = [paho_client(f"member-{i}") for i in range(3)]
    for m in members:
        start(m, broker.port)
        m.subscribe("$share/workers/jobs/#", qos=1)
    plain = paho_client("plain")
    start(plain, broker.port)
    plain.subscribe("jobs/#", qos=1)
    other = sub_process(broker.port, "-t", "$share/audit/jobs/+", "-q", "1", "-C", "30", "-v")
    time.sleep(0.5)
    p = paho_client("producer")
    start(p, broker.port)
    for i in range(30):
        p.publish(f"jobs/{i}", f"job {i}".encode(), qos=1).wait_for_publish(5)
    assert wait_for(lambda: sum(len(m.messages) for m in members) == 30 and len(plain.messages) == 30)
    time.sleep(0.3)
    # Round robin among connected members: ten each, every job once.
    assert [len(m.messages) for m in members] == [10, 10, 10]
    got = sorted(msg.payload for m in members for msg in m.messages)
    assert got == sorted(f"job {i}".encode() for i in range(30))
    out, err = other.communicate(timeout=15)
    assert len(out.splitlines()) == 30, err
    for c in members + [plain, p]:
        c.disconnect()
        c.loop_stop()


def test_mosquitto_sub_members_share_and_get_no_retained_message(broker):
    pub(broker.port, "-t", "shared/retained", "-m", "kept", "-r", "-q", "1")
    # A shared subscription gets no retained message (MQTT 5.0 4.8.2); a plain one does.
    shared = sub_process(broker.port, "-t", "$share/g/shared/#", "-C", "1", "-W", "1")
    out, _ = shared.communicate(timeout=15)
    assert out == ""
    plain = sub_process(broker.port, "-t", "shared/#", "-C", "1", "-v")
    out, err = plain.communicate(timeout=15)
    assert out.strip() == "shared/retained kept", err

    a = sub_process(broker.port, "-t", "$share/g/shared/+", "-v", "-i", "a")
    b = sub_process(broker.port, "-t", "$share/g/shared/+", "-v", "-i", "b")
    time.sleep(0.5)
    for i in range(6):
        pub(broker.port, "-t", "shared/live", "-m", f"m{i}")
    time.sleep(0.5)
    a.terminate()
    b.terminate()
    got_a, got_b = a.communicate(timeout=5)[0].splitlines(), b.communicate(timeout=5)[0].splitlines()
    assert len(got_a) == 3 and len(got_b) == 3
    assert sorted(got_a + got_b) == [f"shared/live m{i}" for i in range(6)]


def test_invalid_shared_filters_are_refused_and_the_connection_stays(broker):
    s = client(broker.port, b"bad-shares")
    # ("$share/#/t" and "$share/g+/t" are no topic filters at all: a malformed SUBSCRIBE closes the connection.)
    codes = subscribe(s, [(b"$share/+/t", 1), (b"$share/g", 1), (b"$share/g/", 1), (b"$share//t", 1),
                          (b"$share/g/t", 1), (b"$share/g/a/#", 0)])
    assert codes == [0x80, 0x80, 0x80, 0x80, 1, 0]
    # Still connected: a PINGREQ is answered.
    s.sendall(b"\xc0\x00")
    assert read_packet(s)[0] == 0xD0
    s.close()


def test_wildcard_groups_follow_the_dollar_rule(broker):
    wide = client(broker.port, b"wide")
    assert subscribe(wide, [(b"$share/g/#", 0)]) == [0]
    dollar = client(broker.port, b"dollar")
    assert subscribe(dollar, [(b"$share/g/$app/#", 0)]) == [0]
    p = client(broker.port, b"pub")
    p.sendall(publish_packet(b"$app/x", b"hidden from #"))
    p.sendall(publish_packet(b"app/x", b"for #"))
    assert publishes(dollar, 1)[0][:2] == (b"$app/x", b"hidden from #")
    assert publishes(wide, 1)[0][:2] == (b"app/x", b"for #")
    assert nothing_more(wide) and nothing_more(dollar)


def test_unacknowledged_messages_go_to_another_member_when_one_goes(tmp_path):
    # Two in flight at most, so the member that goes has both in-flight and queued messages.
    b = Broker([], config_text='[server]\nworkers = 2\n[[listener]]\nbind = "127.0.0.1:0"\n[limits]\nmax_inflight = 2\n')
    try:
        quiet = client(b.port, b"quiet")     # reads, never acknowledges
        assert subscribe(quiet, [(b"$share/g/work/#", 1)]) == [1]
        busy = client(b.port, b"busy")
        assert subscribe(busy, [(b"$share/g/work/#", 1)]) == [1]
        p = client(b.port, b"producer")
        for i in range(10):
            p.sendall(publish_packet(b"work/%d" % i, b"job %d" % i, qos=1, packet_id=i + 1))
        first = publishes(quiet, 2)          # its window: the rest of its share waits in its queue
        # In turn, but a member with a queue is passed over while another can take the message
        # (when the pick sees the queue depends on timing): quiet has at least its window and
        # the next one in turn (queued), busy at least its own turns.
        got = publishes_until_quiet(busy, ack=True)
        assert 5 <= len(got) <= 7
        quiet.close()                        # gone without acknowledging: its share goes to busy
        got += publishes(busy, 10 - len(got), ack=True)
        assert sorted(payload for _, payload, _, _ in got) == sorted(b"job %d" % i for i in range(10))
        assert all(qos == 1 for _, _, qos, _ in got)
        assert {payload for _, payload, _, _ in first} <= {payload for _, payload, _, _ in got}
        assert nothing_more(busy)
    finally:
        assert b.stop() == 0


def test_a_group_prefers_connected_members_and_keeps_for_an_offline_persistent_one(broker):
    away = client(broker.port, b"away", clean=False)
    assert subscribe(away, [(b"$share/g/q/#", 1)]) == [1]
    away.sendall(b"\xe0\x00")  # DISCONNECT: the session stays, offline
    away.close()
    here = client(broker.port, b"here")
    assert subscribe(here, [(b"$share/g/q/#", 1)]) == [1]
    p = client(broker.port, b"producer")
    for i in range(4):
        p.sendall(publish_packet(b"q/x", b"m%d" % i, qos=1, packet_id=i + 1))
    assert [payload for _, payload, _, _ in publishes(here, 3, ack=True)] == [b"m0", b"m1", b"m2"]
    assert publishes(here, 1)[0][1] == b"m3"  # not acknowledged
    # The connected member goes: what it did not acknowledge goes to the offline persistent
    # member, which also keeps what comes while no member is connected (QoS 1).
    here.close()
    time.sleep(0.3)
    p.sendall(publish_packet(b"q/x", b"while away", qos=1, packet_id=9))
    time.sleep(0.3)
    back = client(broker.port, b"away", clean=False)
    assert [payload for _, payload, _, _ in publishes(back, 2, ack=True)] == [b"m3", b"while away"]
    assert nothing_more(back)


def test_a_takeover_that_keeps_the_session_keeps_its_messages(broker):
    kept = client(broker.port, b"kept", clean=False)
    assert subscribe(kept, [(b"$share/g/k/#", 1)]) == [1]
    other = client(broker.port, b"other")
    assert subscribe(other, [(b"$share/g/k/#", 1)]) == [1]
    p = client(broker.port, b"producer")
    for i in range(6):
        p.sendall(publish_packet(b"k/x", b"m%d" % i, qos=1, packet_id=i + 1))
    held = [payload for _, payload, _, _ in publishes(kept, 3)]  # not acknowledged
    assert sorted(held + [payload for _, payload, _, _ in publishes(other, 3, ack=True)]) == [b"m%d" % i for i in range(6)]
    # The same client id again, clean session 0: the session goes on, and so do its messages
    # (sent again with DUP), none to the other member.
    again = client(broker.port, b"kept", clean=False)
    resent = []
    while len(resent) < 3:
        kind, body = read_packet(again)
        if kind >> 4 == 3:
            assert kind & 0x08, "DUP"
            resent.append(body[7:])  # after the topic (2 + 3 bytes) and the packet id
    assert sorted(resent) == sorted(held)
    assert nothing_more(other)


def test_unsubscribe_leaves_the_group(broker):
    a = client(broker.port, b"a")
    bb = client(broker.port, b"b")
    for s in (a, bb):
        assert subscribe(s, [(b"$share/g/u/#", 0)]) == [0]
    body = struct.pack("!H", 2) + struct.pack("!H", 12) + b"$share/g/u/#"
    a.sendall(bytes([0xA2]) + remaining_length(len(body)) + body)
    assert read_packet(a) == (0xB0, struct.pack("!H", 2))
    p = client(broker.port, b"producer")
    for i in range(4):
        p.sendall(publish_packet(b"u/x", b"m%d" % i))
    assert [payload for _, payload, _, _ in publishes(bb, 4)] == [b"m0", b"m1", b"m2", b"m3"]
    assert nothing_more(a)


def test_acl_applies_to_the_filter_inside_the_share(tmp_path):
    from conftest import ROOT
    (tmp_path / "acl").write_text("topic read open/#\n")
    conf = ('[server]\nworkers = 2\n[[listener]]\nbind = "127.0.0.1:0"\n'
            f'[[plugin]]\nscript = "{ROOT / "plugins" / "acl_file.lua"}"\noptions = {{ acl_file = "{tmp_path / "acl"}" }}\n')
    b = Broker([], config_text=conf)
    try:
        s = client(b.port, b"reader")
        assert subscribe(s, [(b"$share/g/open/#", 0), (b"$share/g/closed/#", 0), (b"$share/open/#", 0)]) == [0, 0x80, 0x80]
    finally:
        assert b.stop() == 0


def test_groups_coming_and_going_give_memory_back(broker):
    def churn(n):
        for i in range(n):
            s = client(broker.port, b"churn-%d" % i)
            subscribe(s, [(b"$share/group-%d/deep/%d/+/#" % (i, i), 1), (b"$share/common/deep/#", 1)])
            s.close()
    churn(300)
    time.sleep(0.5)
    before = rss_kib(broker.proc.pid)
    for _ in range(3):
        churn(1000)
    after = settle(broker, before, 2048)
    assert after - before < 2048, f"RSS grew {after - before} KiB over 3,000 clients joining and leaving groups"
    # The groups went with their members: a publish reaches no one.
    s = client(broker.port, b"check")
    assert subscribe(s, [(b"deep/#", 0)]) == [0]
    p = client(broker.port, b"producer")
    p.sendall(publish_packet(b"deep/1/x/y", b"only the plain one"))
    assert publishes(s, 1)[0][1] == b"only the plain one"
