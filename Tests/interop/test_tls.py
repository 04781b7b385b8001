"""TLS listeners of the real binary: real handshakes with mosquitto_pub/mosquitto_sub, paho-mqtt and
Python's ssl, certificates made here with the openssl command."""
import calendar
import json
import os
import shutil
import signal
import socket
import ssl
import subprocess
import threading
import time
from pathlib import Path

import paho.mqtt.client as mqtt
import pytest

from conftest import BINARY, ROOT, Broker, wait_for
from test_interop import paho_client, subscriber

PLUGINS = ROOT / "plugins"
EC = ["-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1", "-nodes"]
CA_CNF = """[ca]
default_ca = test
[test]
database = index.txt
new_certs_dir = .
serial = serial
default_md = sha256
policy = any
copy_extensions = copy
[any]
commonName = supplied
organizationName = optional
"""
CONNECT = bytes([0x10, 0x0C, 0x00, 0x04]) + b"MQTT" + bytes([0x04, 0x02, 0x00, 0x3C, 0x00, 0x00])


def openssl(cwd, *args):
    r = subprocess.run(["openssl", *args], cwd=cwd, capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    return r.stdout


def make_ca(d, name, cn):
    openssl(d, "req", "-x509", *EC, "-keyout", f"{name}.key", "-out", f"{name}.crt", "-days", "30", "-subj", f"/CN={cn}")


def make_cert(d, name, ca, subject, san=None):
    openssl(d, "req", *EC, "-keyout", f"{name}.key", "-out", f"{name}.csr", "-subj", subject)
    args = ["x509", "-req", "-in", f"{name}.csr", "-CA", f"{ca}.crt", "-CAkey", f"{ca}.key", "-CAcreateserial",
            "-out", f"{name}.crt", "-days", "30"]
    if san:
        (Path(d) / f"{name}.ext").write_text(f"subjectAltName={san}\n")
        args += ["-extfile", f"{name}.ext"]
    openssl(d, *args)


@pytest.fixture(scope="module")
def certs(tmp_path_factory):
    """ca (the test CA), server (127.0.0.1/localhost), client (CN=device-1, signed by ca), expired
    (signed by ca, valid only in January 2020), stranger (CN=device-1, signed by another CA),
    server2 (a second server certificate, for reload)."""
    d = tmp_path_factory.mktemp("certs")
    make_ca(d, "ca", "mqlite test CA")
    make_ca(d, "other-ca", "some other CA")
    make_cert(d, "server", "ca", "/CN=127.0.0.1", "IP:127.0.0.1,DNS:localhost")
    make_cert(d, "server2", "ca", "/CN=localhost", "IP:127.0.0.1,DNS:localhost")
    make_cert(d, "client", "ca", "/O=mqlite tests/CN=device-1", "DNS:device-1.example,IP:10.0.0.7")
    make_cert(d, "stranger", "other-ca", "/O=mqlite tests/CN=device-1")
    # An expired certificate: `openssl ca` can set dates in the past.
    (d / "ca.cnf").write_text(CA_CNF)
    (d / "index.txt").write_text("")
    (d / "serial").write_text("1000\n")
    openssl(d, "req", *EC, "-keyout", "expired.key", "-out", "expired.csr", "-subj", "/O=mqlite tests/CN=device-1")
    openssl(d, "ca", "-batch", "-config", "ca.cnf", "-cert", "ca.crt", "-keyfile", "ca.key",
            "-startdate", "20200101000000Z", "-enddate", "20200201000000Z", "-in", "expired.csr", "-out", "expired.crt", "-notext")
    return d


def tls_config(certs, extra="", plugins=(), allow_anonymous=True):
    """A plain listener first, then a TLS one; both on ephemeral ports."""
    text = (f'[server]\nworkers = 2\n[auth]\nallow_anonymous = {str(allow_anonymous).lower()}\n'
            f'[[listener]]\nbind = "127.0.0.1:0"\n'
            f'[[listener]]\nbind = "127.0.0.1:0"\ncertfile = "{certs}/server.crt"\nkeyfile = "{certs}/server.key"\n{extra}')
    for script, options in plugins:
        text += f'[[plugin]]\nscript = "{script}"\noptions = {options}\n'
    return text


def start(text):
    b = Broker([], config_text=text, listeners=2)
    assert "(TLS)" in b.log()
    return b


def tls_args(certs, cert=None):
    args = ["--cafile", str(certs / "ca.crt")]
    if cert:
        args += ["--cert", str(certs / f"{cert}.crt"), "--key", str(certs / f"{cert}.key")]
    return args


def mosquitto_pub(port, certs, cert=None, *args):
    return subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(port), *tls_args(certs, cert), *args],
                          capture_output=True, text=True, timeout=15)


def mosquitto_sub(port, certs, cert=None, *args):
    return subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-W", "10", *tls_args(certs, cert), *args],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def wait_subscribed(b, count=1):
    """mosquitto_sub has subscribed once the broker has seen its CONNECT (give SUBSCRIBE a moment)."""
    time.sleep(0.5)


# MARK: - Delivery over TLS


def test_mosquitto_clients_over_tls(certs):
    b = start(tls_config(certs))
    try:
        plain, secure = b.ports
        sub = mosquitto_sub(secure, certs, None, "-t", "tls/#", "-C", "2", "-v", "-q", "1")
        wait_subscribed(b)
        r = mosquitto_pub(secure, certs, None, "-t", "tls/a", "-m", "over tls", "-q", "1")
        assert r.returncode == 0, r.stderr
        # The plain listener still serves plain clients, and they reach TLS subscribers.
        subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(plain), "-t", "tls/b", "-m", "plain"], check=True, timeout=10)
        out, err = sub.communicate(timeout=15)
        assert sub.returncode == 0, err
        assert out.splitlines() == ["tls/a over tls", "tls/b plain"]
        # A client that does not trust the server's CA refuses it (the server really presents the cert).
        r = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(secure), "--cafile", str(certs / "other-ca.crt"),
                            "-t", "x", "-m", "x"], capture_output=True, text=True, timeout=15)
        assert r.returncode != 0
    finally:
        b.stop()


def test_paho_over_tls(certs):
    b = start(tls_config(certs, f'cafile = "{certs}/ca.crt"\n'))
    try:
        secure = b.ports[1]
        clients = []
        for name in ("paho-tls-sub", "paho-tls-pub"):
            c = paho_client(name)
            c.tls_set(ca_certs=str(certs / "ca.crt"), certfile=str(certs / "client.crt"), keyfile=str(certs / "client.key"))
            c.connect("127.0.0.1", secure, keepalive=30)
            c.loop_start()
            assert c.connected.wait(5)
            assert not c.connect_rc.is_failure
            clients.append(c)
        sub, pub = clients
        sub.subscribe("paho/tls", qos=1)
        time.sleep(0.3)
        pub.publish("paho/tls", b"x" * 5000, qos=1).wait_for_publish(5)
        assert wait_for(lambda: len(sub.messages) == 1)
        assert sub.messages[0].payload == b"x" * 5000
        for c in clients:
            c.disconnect()
            c.loop_stop()
    finally:
        b.stop()


def test_fire_and_forget_clients_over_tls_lose_nothing(certs):
    """300 TLS clients each write CONNECT and a QoS 1 PUBLISH (a third DISCONNECT too), then end:
    half with a close_notify, half with a bare TCP FIN (no close_notify), all together. Every
    message goes out (NIOSSL used to close at once on either, dropping the packets still waiting
    for the storm's pacing); a client that sent FIN reads its CONNACK and PUBACK; every connection
    is closed by the broker afterwards."""
    b = start(tls_config(certs))
    try:
        plain, secure = b.ports
        sub = subscriber(plain, "ff-tls-sub", "ff/#")
        context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        count = 300
        clients = []
        for i in range(count):
            s = context.wrap_socket(socket.create_connection(("127.0.0.1", secure)), server_hostname="localhost")
            client_id, topic = b"ff-%d" % i, b"ff/%d" % i
            connect = bytes([0x10, 12 + len(client_id), 0, 4]) + b"MQTT" + bytes([4, 2, 0, 30, 0, len(client_id)]) + client_id
            publish = bytes([0x32, 5 + len(topic), 0, len(topic)]) + topic + b"\x00\x01x"
            clients.append((s, connect + publish + (b"\xe0\x00" if i % 3 == 0 else b"")))
        for i, (s, data) in enumerate(clients):
            s.sendall(data)
            if i % 2:
                s.setblocking(False)  # sends close_notify without waiting for the broker's
                with pytest.raises(ssl.SSLError):  # (want read; or the CONNACK came first)
                    s.unwrap()
            else:
                socket.socket.shutdown(s, socket.SHUT_WR)  # (SSLSocket's would drop the TLS layer)
        assert wait_for(lambda: len({m.topic for m in sub.messages}) == count, timeout=30), len(sub.messages)
        for i, (s, _) in enumerate(clients):
            if i % 2 == 0:  # the acknowledgements, then the broker's close
                s.settimeout(10)
                received = b""
                try:
                    while chunk := s.recv(4096):
                        received += chunk
                except (ssl.SSLEOFError, ConnectionResetError):
                    pass
                assert received == b"\x20\x02\x00\x00\x40\x02\x00\x01", (i, received)
            # Closed by the broker: what TLS records are left (close_notify), then its FIN.
            raw = socket.socket(fileno=s.detach())
            raw.settimeout(10)
            while raw.recv(4096):
                pass
            raw.close()
        sub.disconnect()
        sub.loop_stop()
    finally:
        b.stop()


def test_a_tls_clients_bare_fin_publishes_its_will_at_once(certs):
    """A TLS client that ends with a bare FIN (no close_notify) is lost at once: its will goes out
    then, not once NIOSSL has waited out its shutdown timeout (1 s) for a close_notify that will
    not come."""
    b = start(tls_config(certs))
    try:
        plain, secure = b.ports
        watcher = subscriber(plain, "will-watcher", "wills/#")
        context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
        s = context.wrap_socket(socket.create_connection(("127.0.0.1", secure)), server_hostname="localhost")
        # CONNECT with a will (wills/fin, "gone"), QoS 0; read the CONNACK.
        body = b"\x00\x04MQTT\x04\x06\x00\x1e\x00\x03fin\x00\x09wills/fin\x00\x04gone"
        s.sendall(bytes([0x10, len(body)]) + body)
        assert s.recv(4) == b"\x20\x02\x00\x00"
        started = time.monotonic()
        socket.socket.shutdown(s, socket.SHUT_WR)
        assert wait_for(lambda: len(watcher.messages) == 1, timeout=5)
        assert time.monotonic() - started < 0.5
        assert (watcher.messages[0].topic, watcher.messages[0].payload) == ("wills/fin", b"gone")
        s.close()
        watcher.disconnect()
        watcher.loop_stop()
    finally:
        b.stop()


# MARK: - Client certificates


def test_require_certificate_admits_only_ca_signed_valid_certificates(certs):
    b = start(tls_config(certs, f'cafile = "{certs}/ca.crt"\nrequire_certificate = true\n'))
    try:
        secure = b.ports[1]
        r = mosquitto_pub(secure, certs, "client", "-t", "t", "-m", "ok")
        assert r.returncode == 0, r.stderr
        for cert in (None, "expired", "stranger"):
            r = mosquitto_pub(secure, certs, cert, "-t", "t", "-m", "refused")
            assert r.returncode != 0, f"{cert} was accepted"
        # Refused in the handshake: never got as far as CONNECT (no CONNECT log line), and logged.
        assert wait_for(lambda: "closing TLS connection before CONNECT" in b.log()), b.log()
        assert "refusing CONNECT" not in b.log()
        # The broker goes on serving.
        r = mosquitto_pub(secure, certs, "client", "-t", "t", "-m", "ok again")
        assert r.returncode == 0, r.stderr
    finally:
        b.stop()


def test_optional_certificate_must_still_verify(certs):
    # cafile without require_certificate: no certificate is fine, a presented one must verify.
    b = start(tls_config(certs, f'cafile = "{certs}/ca.crt"\n'))
    try:
        secure = b.ports[1]
        assert mosquitto_pub(secure, certs, None, "-t", "t", "-m", "no cert").returncode == 0
        assert mosquitto_pub(secure, certs, "client", "-t", "t", "-m", "good cert").returncode == 0
        assert mosquitto_pub(secure, certs, "stranger", "-t", "t", "-m", "other CA").returncode != 0
        assert mosquitto_pub(secure, certs, "expired", "-t", "t", "-m", "expired").returncode != 0
    finally:
        b.stop()


RECORDER = """
-- Records what each hook sees of the client and publishes it (retained) once connected.
local seen = {}
local function view(c)
  local v = { listener = c.listener, username = c.username }
  if c.tls then
    v.tls = { verified = c.tls.verified, subject = c.tls.subject, cn = c.tls.cn, sans = c.tls.sans,
              fingerprint = c.tls.fingerprint, not_after = c.tls.not_after }
  else
    v.tls = "absent"
  end
  return v
end
mqlite.on_connect(function(c) seen[c.client_id] = { connect = view(c) } return nil end)
mqlite.on_authorize(function(c) seen[c.client_id].authorize = view(c) return nil end)
mqlite.on_connected(function(c)
  seen[c.client_id].connected = view(c)
  mqlite.publish("seen/" .. c.client_id, mqlite.json.encode(seen[c.client_id]), 1, true)
  seen[c.client_id] = nil
end)
"""


def fingerprint(path):
    out = openssl(path.parent, "x509", "-in", str(path), "-noout", "-fingerprint", "-sha256")
    return out.strip().split("=", 1)[1].replace(":", "").lower()


def subject(path):
    return openssl(path.parent, "x509", "-in", str(path), "-noout", "-subject", "-nameopt", "RFC2253").strip().split("=", 1)[1]


def not_after(path):
    text = openssl(path.parent, "x509", "-in", str(path), "-noout", "-enddate").strip().split("=", 1)[1]
    return calendar.timegm(time.strptime(text, "%b %d %H:%M:%S %Y %Z"))


def read_seen(port, client_id):
    r = subprocess.run(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-t", f"seen/{client_id}", "-C", "1", "-W", "5"],
                       capture_output=True, text=True, timeout=15)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_scripts_see_listener_and_certificate(certs, tmp_path):
    script = tmp_path / "recorder.lua"
    script.write_text(RECORDER)
    b = start(tls_config(certs, f'cafile = "{certs}/ca.crt"\n', plugins=[(script, "{}")]))
    try:
        plain, secure = b.ports
        assert mosquitto_pub(secure, certs, "client", "-i", "with-cert", "-t", "t", "-m", "x").returncode == 0
        assert mosquitto_pub(secure, certs, None, "-i", "no-cert", "-t", "t", "-m", "x").returncode == 0
        subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(plain), "-i", "plain", "-t", "t", "-m", "x"], check=True, timeout=10)

        seen = read_seen(plain, "with-cert")
        expected = {
            "verified": True, "cn": "device-1", "subject": subject(certs / "client.crt"),
            "sans": ["device-1.example", "10.0.0.7"], "fingerprint": fingerprint(certs / "client.crt"),
            "not_after": not_after(certs / "client.crt"),
        }
        assert expected["subject"] == "CN=device-1,O=mqlite tests"
        for hook in ("connect", "authorize", "connected"):
            assert seen[hook]["listener"] == "127.0.0.1:0"
            assert seen[hook]["tls"] == expected, hook

        seen = read_seen(plain, "no-cert")
        for hook in ("connect", "authorize", "connected"):
            assert seen[hook]["tls"] == {"verified": False}, hook

        seen = read_seen(plain, "plain")
        for hook in ("connect", "authorize", "connected"):
            assert seen[hook]["tls"] == "absent" and seen[hook]["listener"] == "127.0.0.1:0", hook
    finally:
        b.stop()


def test_use_identity_as_username_with_the_shipped_plugins(certs, tmp_path):
    passwd = tmp_path / "passwd"
    passwd.touch()
    subprocess.run(["mosquitto_passwd", "-b", str(passwd), "alice", "secret"], check=True)
    (tmp_path / "acl").write_text("user alice\ntopic read devices/#\n\nuser device-1\ntopic readwrite devices/device-1/#\n")
    plugins = [(PLUGINS / "password_file.lua", f'{{ password_file = "{passwd}" }}'),
               (PLUGINS / "acl_file.lua", f'{{ acl_file = "{tmp_path / "acl"}" }}')]
    extra = f'cafile = "{certs}/ca.crt"\nrequire_certificate = true\nuse_identity_as_username = true\n'
    b = start(tls_config(certs, extra, plugins=plugins, allow_anonymous=False))
    try:
        plain, secure = b.ports
        sub = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(plain), "-u", "alice", "-P", "secret",
                                "-t", "devices/#", "-v", "-C", "2", "-W", "10"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        time.sleep(0.5)
        # No user name: the certificate's CN (device-1) is the user name the plugins see. The ACL
        # lets device-1 publish to devices/device-1/# only.
        assert mosquitto_pub(secure, certs, "client", "-t", "devices/device-1/temp", "-m", "21").returncode == 0
        assert mosquitto_pub(secure, certs, "client", "-t", "devices/other/temp", "-m", "denied").returncode == 0
        # A user name and password the client sends are replaced by the CN (as in Mosquitto): a
        # wrong password for alice does not matter, and the client has device-1's rights, not alice's.
        assert mosquitto_pub(secure, certs, "client", "-u", "alice", "-P", "wrong", "-t", "devices/device-1/hum", "-m", "40").returncode == 0
        out, err = sub.communicate(timeout=15)
        assert out.splitlines() == ["devices/device-1/temp 21", "devices/device-1/hum 40"], err
        # Password clients on the plain listener are still checked.
        r = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(plain), "-u", "device-1", "-t", "devices/device-1/x", "-m", "x"],
                           capture_output=True, text=True, timeout=10)
        assert r.returncode != 0
    finally:
        b.stop()


# MARK: - Config errors


def write_config(d, body):
    path = d / "mqlite.conf"
    path.write_text('[[listener]]\nbind = "127.0.0.1:0"\n' + body)
    return path


BAD_CONFIGS = [
    ('certfile = "missing.crt"\nkeyfile = "server.key"\n', "certfile", "missing.crt"),
    ('certfile = "server.crt"\nkeyfile = "missing.key"\n', "keyfile", "missing.key"),
    ('certfile = "server.crt"\n', "keyfile", "required"),
    ('keyfile = "server.key"\n', "certfile", "required"),
    ('certfile = "server.crt"\nkeyfile = "client.key"\n', "keyfile", "does not match"),
    ('certfile = "garbage.pem"\nkeyfile = "server.key"\n', "certfile", "no PEM certificate"),
    ('certfile = "server.crt"\nkeyfile = "garbage.pem"\n', "keyfile", "private key"),
    ('cafile = "ca.crt"\n', "cafile", "needs certfile and keyfile"),
    ('certfile = "server.crt"\nkeyfile = "server.key"\ncafile = "missing-ca.crt"\n', "cafile", "missing-ca.crt"),
    ('certfile = "server.crt"\nkeyfile = "server.key"\ncafile = "garbage.pem"\n', "cafile", "no PEM CA certificate"),
    ('certfile = "server.crt"\nkeyfile = "server.key"\ncafile = "ca.crt"\nuse_identity_as_username = true\n',
     "use_identity_as_username", "require_certificate"),
    ('certfile = "server.crt"\nkeyfile = "server.key"\nrequire_certificate = true\n', "require_certificate", "cafile"),
    ('protocol = "gopher"\n', "protocol", 'not "gopher"'),
    ('protocol = "http"\ncertfile = "server.crt"\nkeyfile = "server.key"\n', "certfile", "not allowed on an http listener"),
    ('proxy_protocol = "yes"\n', "proxy_protocol", "must be of type bool"),
    ('certfile = "server.crt"\nkeyfile = "server.key"\ntls_version = "tlsv1.2"\n', "tls_version", "unknown key"),
]


@pytest.fixture
def config_dir(certs, tmp_path):
    for name in ("server.crt", "server.key", "client.key", "ca.crt"):
        shutil.copy(certs / name, tmp_path / name)
    (tmp_path / "garbage.pem").write_text("-----BEGIN CERTIFICATE-----\nnot base64 at all\n-----END CERTIFICATE-----\n")
    return tmp_path


@pytest.mark.parametrize("body,key,problem", BAD_CONFIGS)
def test_bad_tls_config_exits_2_naming_file_and_key(config_dir, body, key, problem):
    path = write_config(config_dir, body)
    r = subprocess.run([BINARY, "-c", str(path), "--check"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2, r.stderr
    assert f"{path}: listener[0].{key}:" in r.stderr and problem in r.stderr, r.stderr


def test_bad_tls_config_stops_startup(config_dir):
    path = write_config(config_dir, 'certfile = "server.crt"\nkeyfile = "client.key"\n')
    r = subprocess.run([BINARY, "-c", str(path)], capture_output=True, text=True, timeout=30)
    assert r.returncode == 2 and f"{path}: listener[0].keyfile:" in r.stderr, r.stderr


def test_relative_tls_paths_are_relative_to_the_config_file(config_dir):
    path = write_config(config_dir, 'certfile = "server.crt"\nkeyfile = "server.key"\ncafile = "ca.crt"\nrequire_certificate = true\n'
                                    'use_identity_as_username = true\nprotocol = "mqtt"\n')
    r = subprocess.run([str(Path(BINARY).resolve()), "-c", str(path), "--check"], capture_output=True, text=True, timeout=30, cwd="/")
    assert r.returncode == 0, r.stderr


# MARK: - Reload


def server_fingerprint(port, certs):
    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="127.0.0.1") as s:
            import hashlib
            return hashlib.sha256(s.getpeercert(binary_form=True)).hexdigest()


def test_sighup_reloads_certificates_and_keeps_them_on_a_bad_file(certs, tmp_path):
    for name in ("server.crt", "server.key"):
        shutil.copy(certs / name, tmp_path / name)
    text = '[[listener]]\nbind = "127.0.0.1:0"\n[[listener]]\nbind = "127.0.0.1:0"\ncertfile = "server.crt"\nkeyfile = "server.key"\n'
    (tmp_path / "mqlite.conf").write_text(text)
    b = Broker(["-c", str(tmp_path / "mqlite.conf")], listeners=2)
    try:
        secure = b.ports[1]
        assert server_fingerprint(secure, certs) == fingerprint(certs / "server.crt")
        # New files, then SIGHUP: new handshakes get the new certificate.
        for name in ("crt", "key"):
            shutil.copy(certs / f"server2.{name}", tmp_path / f"server.{name}")
        b.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "certificates reloaded" in b.log()), b.log()
        assert server_fingerprint(secure, certs) == fingerprint(certs / "server2.crt")
        # A bad file: the running certificate stays, and the log says why.
        (tmp_path / "server.key").write_text("not a key\n")
        b.proc.send_signal(signal.SIGHUP)
        assert wait_for(lambda: "keeping the running certificates" in b.log()), b.log()
        assert "keyfile" in b.log().split("keeping the running certificates", 1)[1].splitlines()[0]
        assert server_fingerprint(secure, certs) == fingerprint(certs / "server2.crt")
        assert mosquitto_pub(secure, certs, None, "-t", "t", "-m", "still served").returncode == 0
        assert b.proc.poll() is None
    finally:
        b.stop()


# MARK: - Hostile peers


def client_hello():
    """The bytes of a real TLS ClientHello (Python's ssl, through memory BIOs)."""
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    context = ssl.create_default_context()
    obj = context.wrap_bio(incoming, outgoing, server_hostname="localhost")
    with pytest.raises(ssl.SSLWantReadError):
        obj.do_handshake()
    return outgoing.read()


def closed_by_peer(s, timeout=5):
    """True once the broker closes `s` (EOF or reset) within `timeout`."""
    s.settimeout(timeout)
    try:
        while True:
            data = s.recv(4096)
            if not data:
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def handshaken(port, certs):
    """A raw TCP socket and a TLS session over it through memory BIOs, handshake done."""
    raw = socket.create_connection(("127.0.0.1", port), timeout=5)
    incoming, outgoing = ssl.MemoryBIO(), ssl.MemoryBIO()
    context = ssl.create_default_context(cafile=str(certs / "ca.crt"))
    obj = context.wrap_bio(incoming, outgoing, server_hostname="127.0.0.1")
    while True:
        try:
            obj.do_handshake()
            break
        except ssl.SSLWantReadError:
            raw.sendall(outgoing.read())
            data = raw.recv(65536)
            assert data, "closed during handshake"
            incoming.write(data)
    raw.sendall(outgoing.read())
    return raw, obj, incoming, outgoing


def tls_closed_by_peer(s, obj, incoming, timeout=5):
    """True once the broker ends the TLS session on `s` (close_notify or an alert) or the socket."""
    s.settimeout(timeout)
    try:
        while True:
            data = s.recv(4096)
            if not data:
                return True
            incoming.write(data)
            try:
                while True:
                    if obj.read() == b"":  # close_notify (Python answers it with EOF)
                        return True
            except ssl.SSLWantReadError:
                continue
            except (ssl.SSLZeroReturnError, ssl.SSLError):
                return True
    except ConnectionResetError:
        return True
    except socket.timeout:
        return False


def fd_count(pid):
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_hostile_peers_close_only_their_connection_and_leak_nothing(certs):
    b = start(tls_config(certs))
    good = None
    try:
        secure = b.ports[1]
        hello = client_hello()
        assert hello[0] == 0x16 and len(hello) > 100  # a TLS handshake record
        # A well-behaved TLS client stays connected throughout.
        good = paho_client("steady")
        good.tls_set(ca_certs=str(certs / "ca.crt"))
        good.connect("127.0.0.1", secure, keepalive=30)
        good.loop_start()
        assert good.connected.wait(5) and not good.connect_rc.is_failure
        good.subscribe("steady/t", qos=1)
        time.sleep(0.3)
        before = fd_count(b.proc.pid)
        started = time.monotonic()

        for i in range(200):
            kind = i % 4
            if kind == 0:
                # Plain MQTT on the TLS port.
                s = socket.create_connection(("127.0.0.1", secure), timeout=5)
                s.sendall(CONNECT)
                assert closed_by_peer(s), "plain MQTT on the TLS port was not closed"
                s.close()
            elif kind == 1:
                # Half a ClientHello, then gone.
                s = socket.create_connection(("127.0.0.1", secure), timeout=5)
                s.sendall(hello[:len(hello) // 2])
                s.close()
            elif kind == 2:
                # Garbage records after a completed handshake.
                s, obj, incoming, _ = handshaken(secure, certs)
                s.sendall(os.urandom(300))
                assert tls_closed_by_peer(s, obj, incoming), "garbage after the handshake was not closed"
                s.close()
            else:
                # Well-formed TLS carrying bytes that are not MQTT (a protocol error: closed with
                # close_notify; the socket follows when the client answers or after a second).
                s, obj, incoming, outgoing = handshaken(secure, certs)
                obj.write(b"\x00\xff" * 100)
                s.sendall(outgoing.read())
                assert tls_closed_by_peer(s, obj, incoming), "non-MQTT bytes over TLS were not closed"
                s.close()

        assert b.proc.poll() is None
        # The broker serves on: the steady client still gets its messages.
        assert mosquitto_pub(secure, certs, None, "-t", "steady/t", "-m", "still here", "-q", "1").returncode == 0
        assert wait_for(lambda: any(m.payload == b"still here" for m in good.messages))
        # Every hostile connection's descriptor is closed (the halves closed by the client too).
        assert wait_for(lambda: fd_count(b.proc.pid) <= before, timeout=10), (fd_count(b.proc.pid), before)
        # Handshake failures (150 of them) are rate-limited in the log: one info line per 10 s.
        info_lines = [l for l in b.lines if "closing TLS connection before CONNECT" in l]
        assert 1 <= len(info_lines) <= (time.monotonic() - started) / 10 + 1, len(info_lines)
        # The lines the limit held back are counted in the next one, if any.
        if len(info_lines) > 1:
            assert "suppressed=" in info_lines[1]
    finally:
        if good is not None:
            good.disconnect()
            good.loop_stop()
        b.stop()
