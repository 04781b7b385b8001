"""One MQTT client publishing QoS 0 to a topic it subscribes to, in a loop: round-trip times.

    python3 rttprobe.py PORT USERNAME PASSWORD TOPIC SECONDS

Prints "ready" once subscribed, then at the end one JSON line: [[unix_time, rtt_ms], ...].
"""
import json
import socket
import struct
import sys
import time


def s(b):
    return struct.pack("!H", len(b)) + b


def main(port, username, password, topic, seconds):
    c = socket.create_connection(("127.0.0.1", port))
    c.settimeout(10)
    c.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    body = s(b"MQTT") + bytes([4, 0xC2]) + struct.pack("!H", 60) + s(b"rttprobe") + s(username.encode()) + s(password.encode())
    c.sendall(bytes([0x10, len(body)]) + body)
    assert c.recv(4)[3] == 0
    sub = b"\x00\x01" + s(topic.encode()) + b"\x00"
    c.sendall(bytes([0x82, len(sub)]) + sub)
    suback = c.recv(5)
    assert len(suback) == 5 and suback[4] != 0x80, "rttprobe: subscription refused"
    pub = bytes([0x30, 2 + len(topic) + 2]) + s(topic.encode()) + b"hi"
    print("ready", flush=True)
    samples = []
    end = time.time() + seconds
    while time.time() < end:
        t = time.perf_counter()
        c.sendall(pub)
        got = b""
        while len(got) < len(pub):
            chunk = c.recv(64)
            if not chunk:
                sys.exit("rttprobe: the broker closed the connection")
            got += chunk
        samples.append((time.time(), (time.perf_counter() - t) * 1000))
        time.sleep(0.002)
    print(json.dumps(samples), flush=True)


if __name__ == "__main__":
    main(int(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], float(sys.argv[5]))
