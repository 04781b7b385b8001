#!/usr/bin/env python3
"""Writes the seed corpus of one fuzz target into a folder: valid inputs that reach each part of
what the target exercises. `Fuzz/run.sh` calls it for a temporary corpus on every run, so nothing
generated is kept in the repository.

    Fuzz/seeds.py TARGET OUTDIR      TARGET: decoder, connection, json, config or proxy
"""
import os
import struct
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
SEPARATOR = b"\xff\xff"  # between the clients of a connection input (ConnectionFuzzer.separator)


def remaining_length(n):
    out = bytearray()
    while True:
        byte = n & 0x7F
        n >>= 7
        if n:
            out.append(byte | 0x80)
        else:
            out.append(byte)
            return bytes(out)


def packet(first, body=b""):
    return bytes([first]) + remaining_length(len(body)) + body


def s(text):
    data = text.encode() if isinstance(text, str) else text
    return struct.pack(">H", len(data)) + data


def connect(client_id, clean=True, keep_alive=60, will=None, username=None, password=None, name="MQTT", level=4):
    flags = 0x02 if clean else 0
    payload = s(client_id)
    if will is not None:
        topic, message, qos, retain = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += s(topic) + s(message)
    if username is not None:
        flags |= 0x80
        payload += s(username)
    if password is not None:
        flags |= 0x40
        payload += s(password)
    return packet(0x10, s(name) + bytes([level, flags]) + struct.pack(">H", keep_alive) + payload)


def connack(present=False, code=0):
    return packet(0x20, bytes([1 if present else 0, code]))


def publish(topic, payload, qos=0, packet_id=1, retain=False, dup=False):
    first = 0x30 | (qos << 1) | (1 if retain else 0) | (0x08 if dup else 0)
    body = s(topic) + (struct.pack(">H", packet_id) if qos else b"") + (payload.encode() if isinstance(payload, str) else payload)
    return packet(first, body)


def ack(first, packet_id):
    return packet(first, struct.pack(">H", packet_id))


def puback(i): return ack(0x40, i)
def pubrec(i): return ack(0x50, i)
def pubrel(i): return ack(0x62, i)
def pubcomp(i): return ack(0x70, i)
def unsuback(i): return ack(0xB0, i)


def subscribe(packet_id, *filters):
    return packet(0x82, struct.pack(">H", packet_id) + b"".join(s(f) + bytes([q]) for f, q in filters))


def suback(packet_id, *codes):
    return packet(0x90, struct.pack(">H", packet_id) + bytes(codes))


def unsubscribe(packet_id, *filters):
    return packet(0xA2, struct.pack(">H", packet_id) + b"".join(s(f) for f in filters))


PINGREQ = packet(0xC0)
PINGRESP = packet(0xD0)
DISCONNECT = packet(0xE0)


def every_packet():
    """One or more valid packets of each of the fourteen types."""
    return {
        "connect-minimal": connect("c1"),
        "connect-persistent": connect("c1", clean=False, keep_alive=0),
        "connect-will": connect("c1", will=("last/will", "bye", 1, True)),
        "connect-will-qos2": connect("c1", will=("w", "", 2, False), username="u"),
        "connect-user": connect("c1", username="alice"),
        "connect-user-password": connect("c1", username="alice", password=b"\x00secret\xff"),
        "connect-everything": connect("", clean=True, will=("a/b", "x", 0, False), username="u", password="p"),
        "connect-mqisdp": connect("old", name="MQIsdp", level=3),
        "connack": connack(),
        "connack-present-refused": connack(True, 5),
        "publish-qos0": publish("a/b", "hello"),
        "publish-qos0-retain": publish("a/b", "kept", retain=True),
        "publish-qos1": publish("a/b", "hello", qos=1, packet_id=7),
        "publish-qos1-dup": publish("a/b", "again", qos=1, packet_id=7, dup=True),
        "publish-qos2": publish("x", b"\x00\x01\x02", qos=2, packet_id=65535),
        "publish-qos2-dup-retain": publish("$SYS/x", "", qos=2, packet_id=2, retain=True, dup=True),
        "publish-empty-topic-level": publish("a//b/", "p"),
        "publish-utf8": publish("caf\u00e9/\u2603", "\u00fc"),
        "puback": puback(1),
        "pubrec": pubrec(2),
        "pubrel": pubrel(3),
        "pubcomp": pubcomp(4),
        "subscribe": subscribe(1, ("a/b", 0)),
        "subscribe-many": subscribe(2, ("a/+/c", 1), ("#", 2), ("+", 0), ("a/#", 1), ("$SYS/#", 0)),
        "suback": suback(1, 0, 1, 2, 0x80),
        "unsubscribe": unsubscribe(3, "a/b", "a/#"),
        "unsuback": unsuback(3),
        "pingreq": PINGREQ,
        "pingresp": PINGRESP,
        "disconnect": DISCONNECT,
    }


# MQTT 5 (the decoder target also decodes every input as MQTT 5).

def props(*items):
    body = b"".join(items)
    return remaining_length(len(body)) + body


def p_byte(i, v): return bytes([i, v])
def p_u16(i, v): return bytes([i]) + struct.pack(">H", v)
def p_u32(i, v): return bytes([i]) + struct.pack(">I", v)
def p_str(i, v): return bytes([i]) + s(v)
def p_vbi(i, v): return bytes([i]) + remaining_length(v)
def p_user(k, v): return bytes([0x26]) + s(k) + s(v)


def connect5(client_id, properties=props(), will=None, username=None, password=None, clean=True, keep_alive=60):
    flags = 0x02 if clean else 0
    payload = s(client_id)
    if will is not None:
        topic, message, qos, retain, will_properties = will
        flags |= 0x04 | (qos << 3) | (0x20 if retain else 0)
        payload += will_properties + s(topic) + s(message)
    if username is not None:
        flags |= 0x80
        payload += s(username)
    if password is not None:
        flags |= 0x40
        payload += s(password)
    return packet(0x10, s("MQTT") + bytes([5, flags]) + struct.pack(">H", keep_alive) + properties + payload)


def v5_packets():
    """MQTT 5 packets of every type, with properties."""
    message = (p_byte(0x01, 1), p_u32(0x02, 60), p_str(0x03, "text/plain"), p_str(0x08, "reply/to"),
               p_str(0x09, b"\x00\x01"), p_user("k", "v"), p_user("k", "w"))
    return {
        "v5-connect": connect5("c5", props(p_u32(0x11, 3600), p_u16(0x21, 10), p_u32(0x27, 65536), p_u16(0x22, 5),
                                           p_byte(0x17, 0), p_byte(0x19, 1), p_user("a", "1"),
                                           p_str(0x15, "PLAIN"), p_str(0x16, b"secret"))),
        "v5-connect-will-password-only": connect5("", will=("w/t", "bye", 1, True, props(p_u32(0x18, 5), *message)),
                                                  password=b"pw", clean=False),
        "v5-connack": packet(0x20, b"\x00\x00" + props(
            p_u32(0x11, 120), p_str(0x12, "auto-1"), p_u16(0x13, 30), p_str(0x1A, "resp/"), p_str(0x1C, "other"),
            p_str(0x1F, "hi"), p_u16(0x21, 100), p_u16(0x22, 10), p_byte(0x24, 1), p_byte(0x25, 0),
            p_u32(0x27, 1 << 20), p_byte(0x28, 1), p_byte(0x29, 0), p_byte(0x2A, 0), p_user("n", "1"))),
        "v5-connack-refused": packet(0x20, b"\x00\x8a" + props(p_str(0x1F, "banned"))),
        "v5-publish-qos1": packet(0x32, s("a/b") + struct.pack(">H", 7) + props(
            *message, p_vbi(0x0B, 1), p_vbi(0x0B, 268435455), p_u16(0x23, 4)) + b"hello"),
        "v5-publish-alias": packet(0x30, s("") + props(p_u16(0x23, 4)) + b"aliased"),
        "v5-publish-plain": packet(0x34, s("x") + struct.pack(">H", 9) + props() + b""),
        "v5-puback-reason-props": packet(0x40, struct.pack(">H", 1) + b"\x10" + props(p_str(0x1F, "none"), p_user("a", "b"))),
        "v5-pubrec-reason": packet(0x50, struct.pack(">H", 2) + b"\x97"),
        "v5-pubrel-not-found": packet(0x62, struct.pack(">H", 3) + b"\x92" + props()),
        "v5-pubcomp-props": packet(0x70, struct.pack(">H", 4) + b"\x00" + props(p_user("k", "v"))),
        "v5-subscribe": packet(0x82, struct.pack(">H", 5) + props(p_vbi(0x0B, 42), p_user("u", "v")) +
                               s("a/+") + bytes([0x2E]) + s("$share/g/x") + bytes([0x10]) + s("#") + bytes([0x01])),
        "v5-suback": packet(0x90, struct.pack(">H", 5) + props(p_str(0x1F, "partly")) + bytes([0, 1, 2, 0x80, 0x87, 0xA2])),
        "v5-unsubscribe": packet(0xA2, struct.pack(">H", 6) + props(p_user("x", "y")) + s("a/+") + s("#")),
        "v5-unsuback": packet(0xB0, struct.pack(">H", 6) + props(p_str(0x1F, "ok")) + bytes([0x00, 0x11])),
        "v5-disconnect-will": packet(0xE0, b"\x04"),
        "v5-disconnect-props": packet(0xE0, b"\x00" + props(p_u32(0x11, 0), p_str(0x1C, "other"), p_str(0x1F, "bye"))),
        "v5-auth": packet(0xF0, b"\x18" + props(p_str(0x15, "SCRAM-SHA-1"), p_str(0x16, bytes(range(40))), p_str(0x1F, "step"))),
        "v5-auth-empty": packet(0xF0),
    }


def decoder_seeds():
    """Control byte (read sizes), then a client's stream."""
    seeds = {}
    packets = every_packet()
    for name, data in packets.items():
        seeds[name] = b"\x00" + data
    v5 = v5_packets()
    for name, data in v5.items():
        seeds[name] = b"\x00" + data
    seeds["v5-all-at-once"] = b"\x00" + b"".join(v5.values())
    seeds["v5-all-1-byte-reads"] = b"\x11" + b"".join(v5.values())
    seeds["v5-then-311-connect"] = b"\x00" + v5["v5-publish-qos1"] + connect("c1") + unsuback(3) + publish("a/b", "x")
    seeds["all-at-once"] = b"\x00" + b"".join(packets.values())
    seeds["all-1-byte-reads"] = b"\x11" + b"".join(packets.values())
    seeds["all-mixed-reads"] = b"\x73" + b"".join(packets.values())
    seeds["large-publish"] = b"\x0e" + publish("big/topic", "x" * 3000, qos=1, packet_id=9)
    seeds["too-large"] = b"\x00" + bytes([0x30, 0xFF, 0xFF, 0x7F])
    seeds["filters-and-topics"] = b"\x00" + subscribe(1, ("a/+/c", 0), ("a/#", 0), ("#", 0), ("+/+", 0), ("$SYS/#", 0), ("a/b/c", 1)) + \
        publish("a/b/c", "1") + publish("a", "2") + publish("$SYS/x", "3") + publish("/", "4") + publish("a/b", "5")
    return seeds


def session(*packets, control=0x00):
    return bytes([control]) + b"".join(packets)


def clients(*sessions):
    return SEPARATOR.join(sessions)


def connection_seeds():
    """Up to four clients separated by FF FF; each starts with a control byte
    (bits 0-3 write size, bit 4 close instead of half-close, bit 5 second worker)."""
    return {
        "connect-disconnect": clients(session(connect("a"), DISCONNECT)),
        "connect-ping": clients(session(connect("a", keep_alive=1), PINGREQ, PINGREQ, control=0x01)),
        "pubsub-qos0": clients(
            session(connect("sub"), subscribe(1, ("t/#", 0))),
            session(connect("pub"), publish("t/x", "hello"), DISCONNECT, control=0x20)),
        "pubsub-qos1": clients(
            session(connect("sub"), subscribe(1, ("t/+", 1)), puback(1), control=0x20),
            session(connect("pub"), publish("t/x", "hi", qos=1, packet_id=5), DISCONNECT)),
        "pubsub-qos2": clients(
            session(connect("sub"), subscribe(1, ("t/#", 2)), pubrec(1), pubcomp(1)),
            session(connect("pub"), publish("t/y", "x", qos=2, packet_id=3), pubrel(3), DISCONNECT)),
        "retained": clients(
            session(connect("pub"), publish("r/1", "kept", qos=1, packet_id=1, retain=True), DISCONNECT),
            session(connect("sub"), subscribe(1, ("r/#", 1)), puback(1), unsubscribe(2, "r/#"), DISCONNECT, control=0x22)),
        "persistent-session": clients(
            session(connect("p", clean=False), subscribe(1, ("q/#", 1)), DISCONNECT),
            session(connect("x"), publish("q/1", "queued", qos=1, packet_id=1), publish("q/2", "queued", qos=2, packet_id=2), pubrel(2), DISCONNECT),
            session(connect("p", clean=False), puback(1), pubrec(2), pubcomp(2), DISCONNECT, control=0x20)),
        "takeover": clients(
            session(connect("same", will=("will/t", "gone", 1, False)), subscribe(1, ("#", 0)), control=0x10),
            session(connect("same"), PINGREQ, control=0x20),
            session(connect("w"), subscribe(1, ("will/#", 1)), puback(1))),
        "will-on-loss": clients(
            session(connect("dies", will=("will/x", "lost", 0, True)), control=0x10),
            session(connect("watch"), subscribe(1, ("will/#", 0)), control=0x20)),
        "hooks-auth": clients(
            session(connect("r", username="refused"), PINGREQ),
            session(connect("n", username="nobody")),
            session(connect("adm", username="admin", password="secret"), PINGREQ, DISCONNECT),
            session(connect("adm2", username="admin", password="wrong"))),
        "hooks-acl": clients(
            session(connect("c1", username="acl"), subscribe(1, ("acl/#", 1), ("other/#", 0), ("public/+", 0)),
                    publish("acl/c1/x", "ok"), publish("acl/c1/secret", "no"), publish("other", "no", qos=1, packet_id=2), DISCONNECT),
            session(connect("c2"), subscribe(1, ("#", 0)), control=0x20)),
        "hooks-subscribe": clients(
            session(connect("s"), subscribe(1, ("deny/x", 0), ("q0/#", 2), ("rw/a/b", 2), ("plain", 1)), DISCONNECT),
            session(connect("p"), publish("q0/z", "z", qos=2, packet_id=1), pubrel(1), publish("rewritten/a/b", "w", qos=1, packet_id=2))),
        "hooks-publish": clients(
            session(connect("sub"), subscribe(1, ("#", 2)), control=0x20),
            session(connect("pub"), publish("hook/a", "drop"), publish("hook/b", "keep"), publish("hook/c", "many", qos=1, packet_id=1),
                    publish("hook/d", "republish"), publish("hook/e", "text", qos=2, packet_id=2), pubrel(2), DISCONNECT)),
        "protocol-errors": clients(
            session(publish("a", "before connect")),
            session(connect("x"), connect("x")),
            session(connect("y", name="MQTT", level=5)),
            session(connect("z"), bytes([0x30, 0xFF, 0xFF, 0xFF, 0x7F]))),
        "slow-writes": clients(
            session(connect("slow"), subscribe(1, ("a/#", 1)), publish("a/b", "x" * 300, qos=1, packet_id=1), puback(1), DISCONNECT, control=0x01),
            session(connect("fast"), publish("a/c", "y" * 100), control=0x2B)),
        "inflight-and-queue": clients(
            session(connect("slowsub", clean=False), subscribe(1, ("f/#", 1))),
            session(connect("flood"), *[publish("f/%d" % i, "m", qos=1, packet_id=i + 1) for i in range(10)], control=0x20)),
        # MQTT 5 beside 3.1.1: properties, subscription options, expiry, will delay, reason codes.
        "v5-pubsub": clients(
            session(connect5("s5", props(p_u32(0x11, 60), p_u16(0x21, 2), p_u32(0x27, 200))),
                    packet(0x82, struct.pack(">H", 1) + props() + s("v/#") + bytes([0x2E]) + s("v/x") + bytes([0x01])),
                    packet(0x40, struct.pack(">H", 1) + b"\x00"), packet(0x50, struct.pack(">H", 2) + b"\x80")),
            session(connect("p3"), publish("v/x", "from 3.1.1", qos=1, packet_id=1), DISCONNECT, control=0x20),
            session(connect5("p5", will=("v/w", "gone", 1, False, props(p_u32(0x18, 1), p_user("k", "v")))),
                    packet(0x34, s("v/x") + struct.pack(">H", 4) + props(p_u32(0x02, 1), p_str(0x03, "t"), p_user("a", "b")) + b"five"),
                    packet(0x62, struct.pack(">H", 4) + b"\x00"),
                    packet(0xA2, struct.pack(">H", 5) + props() + s("v/#") + s("none")),
                    packet(0xE0, b"\x04" + props(p_u32(0x11, 0))))),
        "v5-errors": clients(
            session(connect5("a5"), packet(0x30, s("t") + props(p_u16(0x23, 1)) + b"alias")),
            session(connect5("b5"), packet(0x82, struct.pack(">H", 1) + props(p_vbi(0x0B, 3)) + s("t") + bytes([0]))),
            session(connect5("c5", props(p_str(0x15, "SCRAM")))),
            session(connect5("d5"), packet(0xE0, b"\x00" + props(p_u32(0x11, 30))), control=0x20)),
    }


def json_seeds():
    texts = [
        '{"a": 1, "b": [true, false, null], "c": {"d": "e"}}',
        '[1, 2.5, -3e10, "x", {"y": []}]',
        '"just a string with \\u00e9 and \\n"',
        '42', '-0.0', '1e308', 'true', 'null', '[]', '{}',
        '{"nested": [[[[{"k": [1, {"z": null}]}]]]]}',
        '{"unicode": "\\ud83d\\ude00", "slash": "a/b"}',
        '[9223372036854775807, -9223372036854775808, 18446744073709551615]',
        '{"dup": 1, "dup": 2}',
    ]
    return {"json-%02d" % i: t.encode() for i, t in enumerate(texts)}


def config_seeds():
    seeds = {}
    with open(os.path.join(HERE, "..", "config", "mqlite.conf"), "rb") as f:
        shipped = f.read()
    seeds["shipped"] = shipped
    seeds["shipped-plugins"] = shipped.replace(b"# [[plugin]]", b"[[plugin]]").replace(b"# script", b"script").replace(b"# options", b"options")
    seeds["everything"] = b"""[server]
workers = 2
log_level = "debug"

[[listener]]
bind = "127.0.0.1:1883"

[[listener]]
bind = "[::1]:0"

[limits]
max_packet_size = 65536
max_connections = 10
max_inflight = 4
max_queued = 0
max_keep_alive = 600
connect_timeout = 2.5

[auth]
allow_anonymous = false

[[plugin]]
script = "plugins/acl_file.lua"
options = { acl_file = "acl", list = [1, 2.0, "three", true], nested = { a = { b = 1979-05-27T07:32:00Z } } }

[scripting]
instruction_limit = 5000
on_error = "allow"
"""
    seeds["empty"] = b""
    seeds["bad-key"] = b"[limits]\nmax_inflight = 0\n"
    return seeds


def proxy_seeds():
    sig = b"\r\n\r\n\x00\r\nQUIT\n"

    def v2(command, family, body):
        return sig + bytes([0x20 | command, family]) + struct.pack(">H", len(body)) + body

    inet = bytes([203, 0, 113, 7, 10, 0, 0, 1]) + struct.pack(">HH", 51000, 1883)
    inet6 = bytes(15) + b"\x07" + bytes(15) + b"\x01" + struct.pack(">HH", 51000, 1883)
    after = connect("c")
    return {
        "v1-tcp4": b"PROXY TCP4 192.168.0.1 192.168.0.11 56324 1883\r\n" + after,
        "v1-tcp6": b"PROXY TCP6 2001:db8::1 2001:db8::2 4242 1883\r\n" + after,
        "v1-unknown": b"PROXY UNKNOWN\r\n" + after,
        "v1-longest": b"PROXY TCP6 ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff ffff:ffff:ffff:ffff:ffff:ffff:ffff:ffff 65535 65535\r\n",
        "v2-inet": v2(1, 0x11, inet) + after,
        "v2-inet6-tlv": v2(1, 0x21, inet6 + b"\x02\x00\x0cmqtt.example") + after,
        "v2-local": v2(0, 0x11, inet) + after,
        "v2-unspec": v2(1, 0x00, b"") + after,
        "v2-unix": v2(1, 0x31, bytes(216)),
        "v2-dgram": v2(1, 0x12, inet),
        "mqtt": after,
    }


SEEDS = {"decoder": decoder_seeds, "connection": connection_seeds, "json": json_seeds, "config": config_seeds,
         "proxy": proxy_seeds}


def main():
    if len(sys.argv) != 3 or sys.argv[1] not in SEEDS:
        sys.exit("usage: seeds.py {%s} OUTDIR" % ",".join(SEEDS))
    target, out = sys.argv[1], sys.argv[2]
    os.makedirs(out, exist_ok=True)
    for name, data in SEEDS[target]().items():
        with open(os.path.join(out, name), "wb") as f:
            f.write(data)


if __name__ == "__main__":
    main()
