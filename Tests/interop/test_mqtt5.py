"""MQTT 5.0 with real clients (paho-mqtt 2.x with protocol=MQTTv5, mosquitto_pub/sub -V mqttv5) on the
real binary with two workers, beside 3.1.1 clients on the same broker."""
import subprocess
import threading
import time

import paho.mqtt.client as mqtt
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from conftest import Broker, wait_for
from test_interop import paho_client, pub, start, sub_process


def client5(client_id, port, clean_start=True, session_expiry=None, keepalive=30, will=None):
    """A connected paho MQTT 5 client; `c.connack` holds (reason code, flags, properties)."""
    c = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id=client_id, protocol=mqtt.MQTTv5)
    c.messages = []
    c.disconnects = []
    connected = threading.Event()

    def on_connect(client, userdata, flags, reason_code, properties):
        client.connack = (reason_code, flags, properties)
        connected.set()

    c.on_connect = on_connect
    c.on_message = lambda client, userdata, msg: client.messages.append(msg)
    c.on_disconnect = lambda client, userdata, flags, reason_code, properties: client.disconnects.append(reason_code)
    if will:
        c.will_set(*will[:4], properties=will[4] if len(will) > 4 else None)
    properties = None
    if session_expiry is not None:
        properties = Properties(PacketTypes.CONNECT)
        properties.SessionExpiryInterval = session_expiry
    c.connect("127.0.0.1", port, keepalive=keepalive, clean_start=clean_start, properties=properties)
    c.loop_start()
    assert connected.wait(5)
    return c


def stop(*clients):
    for c in clients:
        c.disconnect()
        c.loop_stop()


def publish_properties():
    p = Properties(PacketTypes.PUBLISH)
    p.UserProperty = [("trace", "42"), ("trace", "43")]
    p.ContentType = "application/json"
    p.ResponseTopic = "reply/to"
    p.CorrelationData = b"\x00\x01\x02"
    p.PayloadFormatIndicator = 1
    return p


def test_paho_v5_properties_reach_v5_subscribers_and_not_v311_ones(broker):
    sub5 = client5("sub5", broker.port)
    sub5.subscribe("props/#", qos=2)
    sub3 = paho_client("sub3")
    start(sub3, broker.port)
    sub3.subscribe("props/#", qos=1)
    time.sleep(0.3)
    pub5 = client5("pub5", broker.port)
    for qos in (0, 1, 2):
        pub5.publish("props/x", b'{"n":%d}' % qos, qos=qos, properties=publish_properties()).wait_for_publish(5)
    assert wait_for(lambda: len(sub5.messages) == 3 and len(sub3.messages) == 3)
    for m in sub5.messages:
        p = m.properties
        assert p.UserProperty == [("trace", "42"), ("trace", "43")]
        assert (p.ContentType, p.ResponseTopic, p.CorrelationData, p.PayloadFormatIndicator) == (
            "application/json", "reply/to", b"\x00\x01\x02", 1)
    assert sorted(m.qos for m in sub5.messages) == [0, 1, 2]
    assert sorted(m.payload for m in sub3.messages) == [b'{"n":0}', b'{"n":1}', b'{"n":2}']
    # And the other way: a 3.1.1 publisher reaches the MQTT 5 subscriber.
    sub3.publish("props/from311", b"old", qos=1).wait_for_publish(5)
    assert wait_for(lambda: any(m.topic == "props/from311" for m in sub5.messages))
    stop(sub5, sub3, pub5)


def test_paho_v5_connack_and_reason_codes(broker):
    c = client5("", broker.port, keepalive=0)
    rc, flags, props = c.connack
    assert rc == 0 and not flags.session_present
    assert props.AssignedClientIdentifier.startswith("mqlite-")
    # Subscription identifiers are available (the property's absence says so); 10 topic aliases.
    assert not hasattr(props, "SubscriptionIdentifierAvailable")
    assert props.TopicAliasMaximum == 10
    assert props.MaximumPacketSize > 1 << 20
    # PUBACK "no matching subscribers" (0x10) is still a success to the client.
    info = c.publish("nobody/listens", b"x", qos=1)
    info.wait_for_publish(5)
    assert info.is_published()
    # UNSUBACK reason codes per filter.
    codes = []
    c.on_unsubscribe = lambda client, userdata, mid, reason_codes, properties: codes.append([int(r.value) for r in reason_codes])
    c.subscribe("u/1", qos=0)
    time.sleep(0.2)
    c.unsubscribe(["u/1", "u/never"])
    assert wait_for(lambda: codes == [[0x00, 0x11]])
    stop(c)


def test_paho_v5_subscription_options(broker):
    c = client5("opts", broker.port)
    c.subscribe("o/own", options=mqtt.SubscribeOptions(qos=1, noLocal=True))
    c.subscribe("o/rap", options=mqtt.SubscribeOptions(qos=1, retainAsPublished=True))
    c.subscribe("o/plain", options=mqtt.SubscribeOptions(qos=1))
    time.sleep(0.3)
    c.publish("o/own", b"mine", qos=1).wait_for_publish(5)
    p = paho_client("other")
    start(p, broker.port)
    p.publish("o/rap", b"r", qos=1, retain=True).wait_for_publish(5)
    p.publish("o/plain", b"p", qos=1, retain=True).wait_for_publish(5)
    assert wait_for(lambda: len(c.messages) >= 2)
    time.sleep(0.3)
    got = {m.topic: m.retain for m in c.messages}
    assert got == {"o/rap": True, "o/plain": False}  # no own message; RETAIN as published only with the option
    # Retain Handling 2: no retained message on subscribe.
    c.messages.clear()
    c.subscribe("o/#", options=mqtt.SubscribeOptions(qos=0, retainHandling=2))
    time.sleep(0.4)
    assert c.messages == []
    stop(c, p)


def test_paho_v5_session_expiry_and_message_expiry(broker):
    c = client5("keeper", broker.port, session_expiry=300)
    c.subscribe("keep/#", qos=1)
    time.sleep(0.3)
    stop(c)
    p = client5("sender", broker.port)
    short = Properties(PacketTypes.PUBLISH)
    short.MessageExpiryInterval = 1
    long = Properties(PacketTypes.PUBLISH)
    long.MessageExpiryInterval = 300
    p.publish("keep/short", b"gone", qos=1, properties=short).wait_for_publish(5)
    p.publish("keep/long", b"kept", qos=1, properties=long).wait_for_publish(5)
    time.sleep(1.5)
    back = client5("keeper", broker.port, clean_start=False, session_expiry=300)
    assert back.connack[1].session_present
    assert wait_for(lambda: len(back.messages) >= 1)
    time.sleep(0.3)
    assert [m.payload for m in back.messages] == [b"kept"]
    assert 290 <= back.messages[0].properties.MessageExpiryInterval <= 300
    stop(back, p)
    # Session expiry 0 (the MQTT 5 default): nothing is kept.
    gone = client5("short-lived", broker.port)
    stop(gone)
    again = client5("short-lived", broker.port, clean_start=False)
    assert not again.connack[1].session_present
    stop(again)


def test_paho_v5_will_delay_and_takeover_reason(broker):
    watcher = paho_client("watcher")
    start(watcher, broker.port)
    watcher.subscribe("wills/#", qos=1)
    time.sleep(0.3)
    will_props = Properties(PacketTypes.WILLMESSAGE)
    will_props.WillDelayInterval = 1
    will_props.UserProperty = [("why", "lost")]
    c = client5("delayed", broker.port, session_expiry=60, will=("wills/delayed", b"bye", 1, False, will_props))
    c._sock.close()  # lost without DISCONNECT
    time.sleep(0.5)
    assert watcher.messages == []
    assert wait_for(lambda: len(watcher.messages) == 1, timeout=5)
    # A takeover tells the old connection why (0x8E).
    first = client5("same", broker.port)
    second = client5("same", broker.port)
    assert wait_for(lambda: any(int(r.value) == 0x8E for r in first.disconnects))
    stop(second, watcher)
    first.loop_stop()


def test_mosquitto_v5_clients_with_user_properties(broker):
    sub = sub_process(broker.port, "-V", "mqttv5", "-t", "m5/#", "-q", "1", "-C", "2", "-F", "%t %p %P")
    time.sleep(0.5)
    pub(broker.port, "-V", "mqttv5", "-t", "m5/a", "-m", "one", "-q", "1", "-D", "publish", "user-property", "k", "v")
    pub(broker.port, "-V", "311", "-t", "m5/b", "-m", "two", "-q", "1")
    out, err = sub.communicate(timeout=15)
    assert sub.returncode == 0, err
    assert out.splitlines() == ["m5/a one k:v", "m5/b two "]


def raw_v5(port, client_id, properties=b""):
    """A raw MQTT 5 connection (clean start, keep-alive 30) whose CONNACK was read."""
    import socket
    s = socket.create_connection(("127.0.0.1", port))
    body = b"\x00\x04MQTT\x05\x02\x00\x1e" + bytes([len(properties)]) + properties
    body += len(client_id).to_bytes(2, "big") + client_id
    s.sendall(bytes([0x10, len(body)]) + body)
    s.settimeout(5)
    kind, connack = read_packet(s)
    assert kind == 0x20 and connack[1] == 0, connack
    return s


def read_packet(s):
    """One packet: its first byte and its body."""
    def exactly(n):
        data = b""
        while len(data) < n:
            chunk = s.recv(n - len(data))
            assert chunk, "closed"
            data += chunk
        return data
    first = exactly(1)[0]
    length, shift = 0, 0
    while True:
        byte = exactly(1)[0]
        length |= (byte & 0x7F) << shift
        shift += 7
        if not byte & 0x80:
            break
    return first, exactly(length)


def read_to_close(s):
    data = b""
    while True:
        chunk = s.recv(64)
        if not chunk:
            return data
        data += chunk


def test_v5_topic_aliases_both_ways(broker):
    # mosquitto_sub accepts no alias (libmosquitto cannot read an aliased PUBLISH even when told
    # to announce a Topic Alias Maximum), so it gets every topic in full.
    sub = sub_process(broker.port, "-V", "mqttv5", "-t", "al/#", "-C", "4", "-v")
    # A raw subscriber that accepts one alias: the bytes show what the broker sends.
    raw = raw_v5(broker.port, b"raw-alias", properties=bytes([0x22, 0, 1]))
    raw.sendall(bytes([0x82, 10, 0, 1, 0, 0, 4]) + b"al/#" + bytes([0]))
    assert read_packet(raw)[0] == 0x90
    time.sleep(0.5)
    # paho publishes with aliases it sets: the topic once, then the alias alone.
    p = client5("alias-pub", broker.port)
    assert p.connack[2].TopicAliasMaximum == 10

    def alias(n):
        props = Properties(PacketTypes.PUBLISH)
        props.TopicAlias = n
        return props
    p.publish("al/x", b"one", qos=1, properties=alias(1)).wait_for_publish(5)
    p.publish("", b"two", qos=1, properties=alias(1)).wait_for_publish(5)
    p.publish("al/y", b"three", qos=1).wait_for_publish(5)
    p.publish("", b"four", qos=0, properties=alias(1))
    out, err = sub.communicate(timeout=15)
    assert sub.returncode == 0, err
    assert out.splitlines() == ["al/x one", "al/x two", "al/y three", "al/x four"]
    # To the raw subscriber: al/x with alias 1, then alias 1 alone (empty topic), then al/y in
    # full (its one alias is taken), then the alias alone again.
    got = []
    for _ in range(4):
        kind, body = read_packet(raw)
        assert kind >> 4 == 3
        n = int.from_bytes(body[:2], "big")
        props_len = body[2 + n]
        got.append((body[2:2 + n], body[3 + n:3 + n + props_len], body[3 + n + props_len:]))
    assert got == [(b"al/x", bytes([0x23, 0, 1]), b"one"), (b"", bytes([0x23, 0, 1]), b"two"),
                   (b"al/y", b"", b"three"), (b"", bytes([0x23, 0, 1]), b"four")]
    stop(p)
    raw.close()


def test_v5_topic_alias_errors_get_disconnect_with_reason(broker):
    """An alias beyond Topic Alias Maximum (10): DISCONNECT 0x94; an alias never given a topic:
    0x82. Each logged."""
    s = raw_v5(broker.port, b"raw")
    # PUBLISH QoS 0 topic "t", properties: topic alias 11.
    s.sendall(bytes([0x30, 7, 0, 1]) + b"t" + bytes([3, 0x23, 0, 11]))
    data = read_to_close(s)
    assert data[:3] == bytes([0xE0, 1, 0x94]) or data[:4] == bytes([0xE0, 2, 0x94, 0]), data
    assert wait_for(lambda: "topic alias 11 out of range" in broker.log())
    s = raw_v5(broker.port, b"raw2")
    # PUBLISH QoS 0, empty topic, topic alias 2 (never set).
    s.sendall(bytes([0x30, 6, 0, 0, 3, 0x23, 0, 2]))
    data = read_to_close(s)
    assert data[:3] == bytes([0xE0, 1, 0x82]) or data[:4] == bytes([0xE0, 2, 0x82, 0]), data
    assert wait_for(lambda: "topic alias 2 used before it was given a topic" in broker.log())


def test_paho_v5_subscription_identifiers(broker):
    c = client5("sid", broker.port)

    def sub_id(n):
        props = Properties(PacketTypes.SUBSCRIBE)
        props.SubscriptionIdentifier = n
        return props
    c.subscribe("si/#", qos=1, properties=sub_id(7))
    c.subscribe("si/+/x", qos=0, properties=sub_id(300000))
    c.subscribe("si/plain/#", qos=1)
    time.sleep(0.3)
    p = client5("sid-pub", broker.port)
    p.publish("si/a/x", b"both", qos=1).wait_for_publish(5)
    p.publish("si/b", b"one", qos=1).wait_for_publish(5)
    p.publish("si/plain/q", b"plain and #", qos=1).wait_for_publish(5)
    assert wait_for(lambda: len(c.messages) == 3)
    ids = {m.payload: sorted(m.properties.SubscriptionIdentifier) for m in c.messages}
    assert ids == {b"both": [7, 300000], b"one": [7], b"plain and #": [7]}
    # A SUBSCRIBE without an identifier takes the identifier away; UNSUBSCRIBE too.
    c.subscribe("si/#", qos=1)
    c.unsubscribe("si/+/x")
    time.sleep(0.3)
    c.messages.clear()
    p.publish("si/a/x", b"none", qos=1).wait_for_publish(5)
    assert wait_for(lambda: len(c.messages) == 1)
    assert not hasattr(c.messages[0].properties, "SubscriptionIdentifier")
    stop(c, p)




def test_v5_enhanced_authentication_with_mosquitto_clients_and_raw_auth(tmp_path):
    """`mqlite.on_auth`: a one-step token method with mosquitto_pub/sub (-D connect
    authentication-method/-data), and a two-step exchange over a raw socket (AUTH 0x18 both ways)."""
    script = tmp_path / "auth.lua"
    script.write_text('''
        mqlite.on_auth("TOKEN", function(a)
          if a.data == "open-sesame" then return true, "ok" end
          return false, 0x86, "bad token"
        end)
        mqlite.on_auth("TWO-STEP", function(a)
          if a.step == 1 then return "continue", "nonce-1", "n1" end
          if a.state == "n1" and a.data == "nonce-1:secret" then return true end
          return false
        end)
    ''')
    b = Broker([], config_text=f'[[listener]]\nbind = "127.0.0.1:0"\n[[plugin]]\nscript = "{script}"\n')
    try:
        auth = ["-V", "mqttv5", "-D", "connect", "authentication-method", "TOKEN", "-D", "connect", "authentication-data"]
        sub = sub_process(b.port, *auth, "open-sesame", "-t", "ea/#", "-C", "1", "-v")
        time.sleep(0.5)
        pub(b.port, *auth, "open-sesame", "-t", "ea/x", "-m", "in")
        out, err = sub.communicate(timeout=15)
        assert sub.returncode == 0, err
        assert out.strip() == "ea/x in"
        refused = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(b.port), *auth, "wrong", "-t", "ea/x", "-m", "no"],
                                 capture_output=True, text=True, timeout=10)
        assert refused.returncode != 0
        # Without a hook for the method: 0x8C.
        other = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(b.port), "-V", "mqttv5", "-D", "connect",
                                "authentication-method", "KERBEROS", "-t", "ea/x", "-m", "no"], capture_output=True, text=True, timeout=10)
        assert other.returncode != 0
        assert wait_for(lambda: "no hook takes care of it" in b.log())

        import socket
        s = socket.create_connection(("127.0.0.1", b.port))
        method = b"TWO-STEP"
        props = bytes([0x15, 0, len(method)]) + method
        body = b"\x00\x04MQTT\x05\x02\x00\x1e" + bytes([len(props)]) + props + b"\x00\x03two"
        s.sendall(bytes([0x10, len(body)]) + body)
        s.settimeout(5)
        kind, auth1 = read_packet(s)
        assert kind == 0xF0 and auth1[0] == 0x18 and b"nonce-1" in auth1
        data = b"nonce-1:secret"
        props = bytes([0x15, 0, len(method)]) + method + bytes([0x16, 0, len(data)]) + data
        s.sendall(bytes([0xF0, 2 + len(props), 0x18, len(props)]) + props)
        kind, connack = read_packet(s)
        assert kind == 0x20 and connack[1] == 0 and method in connack
        s.close()
    finally:
        assert b.stop() == 0


def test_paho_v5_receive_maximum_and_maximum_packet_size(broker):
    """A subscriber that says Receive Maximum 2 has at most two QoS 1 messages unacknowledged; one
    that says Maximum Packet Size 200 does not get a larger message (the next one still comes)."""
    slow = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="slow", protocol=mqtt.MQTTv5, manual_ack=True)
    slow.messages = []
    slow.on_message = lambda client, userdata, msg: client.messages.append(msg)
    props = Properties(PacketTypes.CONNECT)
    props.ReceiveMaximum = 2
    props.MaximumPacketSize = 200
    slow.connect("127.0.0.1", broker.port, properties=props)
    slow.loop_start()
    slow.subscribe("flow/#", qos=1)
    time.sleep(0.3)
    p = client5("flow-pub", broker.port)
    p.publish("flow/big", b"x" * 500, qos=1).wait_for_publish(5)
    for i in range(5):
        p.publish("flow/n", b"%d" % i, qos=1).wait_for_publish(5)
    assert wait_for(lambda: len(slow.messages) == 2)
    time.sleep(0.5)
    assert [m.payload for m in slow.messages] == [b"0", b"1"]  # the 500-byte one was never sent
    for m in list(slow.messages):
        slow.ack(m.mid, m.qos)
    assert wait_for(lambda: len(slow.messages) == 4)
    time.sleep(0.3)
    assert [m.payload for m in slow.messages] == [b"0", b"1", b"2", b"3"]
    for m in slow.messages[2:]:
        slow.ack(m.mid, m.qos)
    assert wait_for(lambda: len(slow.messages) == 5)
    slow.ack(slow.messages[4].mid, 1)
    stop(slow, p)


def test_v5_server_keep_alive_and_the_broker_disconnect_reasons():
    """max_keep_alive is announced as Server Keep Alive; a 5.0 client is told why it is closed:
    keep-alive timeout 0x8D, packet too large 0x95, malformed packet 0x81."""
    b = Broker([], config_text='[[listener]]\nbind = "127.0.0.1:0"\n[limits]\nmax_keep_alive = 20\nmax_packet_size = 1024\n')
    try:
        c = client5("ka", b.port, keepalive=0)
        assert c.connack[2].ServerKeepAlive == 20
        stop(c)
        import socket

        def connected(keep_alive):
            s = socket.create_connection(("127.0.0.1", b.port))
            body = b"\x00\x04MQTT\x05\x02" + keep_alive.to_bytes(2, "big") + b"\x00\x00\x01r"
            s.sendall(bytes([0x10, len(body)]) + body)
            s.settimeout(10)
            assert read_packet(s)[0] == 0x20
            return s
        s = connected(1)  # silent past 1.5 x 1 s
        started = time.monotonic()
        assert read_to_close(s)[:3] == bytes([0xE0, 1, 0x8D])
        assert 1.2 < time.monotonic() - started < 5
        s = connected(10)
        s.sendall(bytes([0x30, 0xE8, 0x07]))  # PUBLISH of 1000 bytes: fits
        s.sendall(b"\x00\x01t\x00" + b"x" * 996)
        s.sendall(bytes([0x30, 0x80, 0x10]))  # 2048 bytes: over max_packet_size
        assert read_to_close(s)[:3] == bytes([0xE0, 1, 0x95])
        s = connected(10)
        s.sendall(bytes([0x36, 4, 0, 1, ord("t"), 0]))  # QoS 3
        assert read_to_close(s)[:3] == bytes([0xE0, 1, 0x81])
    finally:
        b.stop()


def test_paho_v5_with_scripts_acl_reason_codes_properties_and_refusals(tmp_path):
    """With real 5.0 clients: PUBACK 0x87 for a topic the ACL refuses (nothing delivered); a
    script adds a user property and sees protocol_version; on_connect refuses with 0x8A and a
    reason string."""
    script = tmp_path / "gw.lua"
    script.write_text('''
        mqlite.on_connect(function(c)
          if c.client_id == "banned" then return false, 0x8A, "banned until tomorrow" end
          return true
        end)
        mqlite.on_authorize(function(c) return { publish = { "gw/#" }, subscribe = { "#" } } end)
        mqlite.on_publish("gw/#", function(m)
          local p = m.properties or {}
          p.user = p.user or {}
          p.user[#p.user + 1] = { "via", "mqlite" }
          return { properties = p }
        end)
    ''')
    b = Broker([], config_text=f'[[listener]]\nbind = "127.0.0.1:0"\n[[plugin]]\nscript = "{script}"\n')
    try:
        sub = client5("sub", b.port)
        sub.subscribe("#", qos=1)
        time.sleep(0.3)
        pub = client5("pub", b.port)
        acks = {}
        pub.on_publish = lambda client, userdata, mid, reason_code, properties: acks.__setitem__(mid, int(reason_code.value))
        props = Properties(PacketTypes.PUBLISH)
        props.UserProperty = [("k", "v")]
        denied = pub.publish("secret/x", b"no", qos=1)
        allowed = pub.publish("gw/x", b"yes", qos=1, properties=props)
        assert wait_for(lambda: denied.mid in acks and allowed.mid in acks)
        assert acks[denied.mid] == 0x87 and acks[allowed.mid] == 0
        assert wait_for(lambda: len(sub.messages) == 1)
        time.sleep(0.3)
        assert [m.payload for m in sub.messages] == [b"yes"]
        assert sub.messages[0].properties.UserProperty == [("k", "v"), ("via", "mqlite")]
        refused = mqtt.Client(mqtt.CallbackAPIVersion.VERSION2, client_id="banned", protocol=mqtt.MQTTv5)
        answer = []
        refused.on_connect = lambda client, userdata, flags, reason_code, properties: answer.append((int(reason_code.value), properties))
        refused.connect("127.0.0.1", b.port)
        refused.loop_start()
        assert wait_for(lambda: answer)
        refused.loop_stop()
        assert answer[0][0] == 0x8A and answer[0][1].ReasonString == "banned until tomorrow"
        stop(sub, pub)
    finally:
        b.stop()


def test_a_client_still_writing_reads_why_it_was_closed():
    """Closing a connection, the broker shuts its side after the DISCONNECT and drops what the client
    still sends (for up to a second) rather than reset it: a client that keeps writing (the PUBRELs
    of its QoS 2 flows, as in the Paho conformance suite's flow control test) can still read every
    PUBREC and the DISCONNECT 0x93 (Receive Maximum exceeded: `max_inflight` is the client's)."""
    b = Broker([], config_text='[[listener]]\nbind = "127.0.0.1:0"\n[limits]\nmax_inflight = 3\n')
    try:
        s = raw_v5(b.port, b"writer")
        for i in range(1, 5):  # one more QoS 2 PUBLISH than its Receive Maximum
            s.sendall(bytes([0x34, 8, 0, 3]) + b"qos" + i.to_bytes(2, "big") + b"\x00")
        time.sleep(0.3)  # answered, and the broker's side shut
        for i in range(1, 4):  # a reset connection would fail the second of these
            s.sendall(bytes([0x62, 2]) + i.to_bytes(2, "big"))
            time.sleep(0.05)
        packets = []
        while True:
            try:
                packets.append(read_packet(s))
            except AssertionError:  # closed
                break
        assert [kind for kind, _ in packets] == [0x50, 0x50, 0x50, 0xE0], packets
        assert packets[-1][1][:1] == b"\x93", packets[-1]
    finally:
        b.stop()
