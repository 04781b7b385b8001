"""A minimal WebSocket client over a plain socket for the interop tests: the handshake and frames
by hand, so that tests can send what no library would (text frames, huge lengths, half requests)."""
import base64
import hashlib
import os
import socket
import struct

GUID = "258EAFA5-E914-47DA-95CA-C5AB0DC85B11"


def accept_for(key):
    return base64.b64encode(hashlib.sha1((key + GUID).encode()).digest()).decode()


def read_until(s, marker, limit=65536):
    data = b""
    while marker not in data:
        chunk = s.recv(4096)
        if not chunk:
            break
        data += chunk
        if len(data) > limit:
            break
    return data


def request(path="/mqtt", protocols="mqtt", host="127.0.0.1", extra=""):
    key = base64.b64encode(os.urandom(16)).decode()
    text = (f"GET {path} HTTP/1.1\r\nHost: {host}\r\nUpgrade: websocket\r\nConnection: Upgrade\r\n"
            f"Sec-WebSocket-Key: {key}\r\nSec-WebSocket-Version: 13\r\n")
    if protocols is not None:
        text += f"Sec-WebSocket-Protocol: {protocols}\r\n"
    return (text + extra + "\r\n").encode(), key


def handshake(s, path="/mqtt", protocols="mqtt"):
    """Sends the upgrade request on `s`; returns (status line, headers dict lowercased, key, rest)."""
    req, key = request(path, protocols)
    s.sendall(req)
    data = read_until(s, b"\r\n\r\n")
    head, _, rest = data.partition(b"\r\n\r\n")
    lines = head.decode(errors="replace").split("\r\n")
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return lines[0], headers, key, rest


def connect(port, protocols="mqtt", timeout=5):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    status, headers, key, rest = handshake(s, protocols=protocols)
    assert status.startswith("HTTP/1.1 101"), status
    assert headers.get("sec-websocket-accept") == accept_for(key), headers
    return WS(s, rest)


def frame(payload, opcode=0x2, fin=True, mask=True, length=None):
    """A client frame; `length` overrides the announced payload length (for lies)."""
    n = len(payload) if length is None else length
    head = bytes([(0x80 if fin else 0) | opcode])
    mbit = 0x80 if mask else 0
    if n < 126:
        head += bytes([mbit | n])
    elif n < 65536:
        head += bytes([mbit | 126]) + struct.pack("!H", n)
    else:
        head += bytes([mbit | 127]) + struct.pack("!Q", n)
    if not mask:
        return head + payload
    key = os.urandom(4)
    return head + key + bytes(b ^ key[i % 4] for i, b in enumerate(payload))


class WS:
    """Frames over a connected socket; `recv_frame` returns (opcode, payload) or None at EOF."""

    def __init__(self, sock, rest=b""):
        self.sock = sock
        self.buf = rest

    def send(self, payload, opcode=0x2, fin=True):
        self.sock.sendall(frame(payload, opcode, fin))

    def _need(self, n):
        while len(self.buf) < n:
            chunk = self.sock.recv(65536)
            if not chunk:
                return False
            self.buf += chunk
        return True

    def recv_frame(self):
        if not self._need(2):
            return None
        b0, b1 = self.buf[0], self.buf[1]
        n, pos = b1 & 0x7F, 2
        if n == 126:
            if not self._need(4):
                return None
            n, pos = struct.unpack("!H", self.buf[2:4])[0], 4
        elif n == 127:
            if not self._need(10):
                return None
            n, pos = struct.unpack("!Q", self.buf[2:10])[0], 10
        assert not b1 & 0x80, "server frames are not masked"
        if not self._need(pos + n):
            return None
        payload = self.buf[pos:pos + n]
        self.buf = self.buf[pos + n:]
        return b0 & 0x0F, payload

    def recv_mqtt(self, n):
        """At least `n` bytes of the MQTT stream (binary frame payloads, concatenated)."""
        data = b""
        while len(data) < n:
            f = self.recv_frame()
            if f is None:
                break
            if f[0] == 0x2 or f[0] == 0x0:
                data += f[1]
        return data

    def closed(self, timeout=5):
        """Reads until EOF (True) or `timeout` (False); frames on the way are returned too."""
        self.sock.settimeout(timeout)
        frames = []
        try:
            while True:
                f = self.recv_frame()
                if f is None:
                    return True, frames
                frames.append(f)
        except socket.timeout:
            return False, frames
        except ConnectionResetError:
            return True, frames


def mqtt_connect(client_id, keep_alive=60):
    cid = client_id.encode()
    body = b"\x00\x04MQTT\x04\x02" + struct.pack("!H", keep_alive) + struct.pack("!H", len(cid)) + cid
    return bytes([0x10, len(body)]) + body
