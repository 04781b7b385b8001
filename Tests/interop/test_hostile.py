"""What a hostile client does to the real binary: memory must come back after it leaves."""
import socket
import struct
import time

from conftest import Broker, wait_for


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def remaining_length(n):
    """MQTT's variable-length encoding of a remaining length."""
    out = bytearray()
    while True:
        byte, n = n % 128, n // 128
        out.append(byte | (0x80 if n else 0))
        if not n:
            return bytes(out)


def connect_packet(client_id):
    body = b"\x00\x04MQTT\x04\x02\x00\x00" + struct.pack("!H", len(client_id)) + client_id
    return bytes([0x10, len(body)]) + body


def cycle(port, n, send_connect):
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        if send_connect and i % 2:
            s.sendall(connect_packet(b"c%d" % i))
        s.close()


def settle(broker, baseline_kib, slack_kib, timeout=10.0):
    """The broker's RSS once it has caught up (it closes sockets asynchronously)."""
    wait_for(lambda: rss_kib(broker.proc.pid) <= baseline_kib + slack_kib, timeout)
    return rss_kib(broker.proc.pid)


def test_connect_close_cycles_do_not_grow_memory(broker):
    # Warm up: thread stacks, allocator arenas, NIO's pools reach their working size.
    cycle(broker.port, 2000, send_connect=True)
    time.sleep(0.5)
    before = rss_kib(broker.proc.pid)
    cycle(broker.port, 15000, send_connect=True)
    after = settle(broker, before, 4096)
    # Before the fix each closed connection kept ~560 B and its handler for good: +8 MiB here.
    assert after - before < 4096, f"RSS grew {after - before} KiB over 15,000 connect/close cycles"


def test_half_sent_publishes_give_memory_back(broker):
    cycle(broker.port, 500, send_connect=True)
    time.sleep(0.5)
    before = rss_kib(broker.proc.pid)
    socks = []
    for i in range(200):
        s = socket.create_connection(("127.0.0.1", broker.port))
        s.sendall(connect_packet(b"half%d" % i))
        # A PUBLISH announcing 1,000,000 bytes, of which 900 KB come.
        s.sendall(b"\x30" + remaining_length(1_000_000) + b"\x00\x01t" + b"x" * 900_000)
        socks.append(s)
    # The broker holds the partial packets while the sockets are open.
    assert wait_for(lambda: rss_kib(broker.proc.pid) - before > 100_000, 20), "partial packets not buffered?"
    for s in socks:
        s.close()
    after = settle(broker, before, 8192, timeout=20)
    assert after - before < 8192, f"RSS still {after - before} KiB above where it was after the sockets closed"


def publish_packet(topic, payload, qos=0, packet_id=1):
    body = struct.pack("!H", len(topic)) + topic + (struct.pack("!H", packet_id) if qos else b"") + payload
    return bytes([0x30 | (qos << 1)]) + remaining_length(len(body)) + body


def persistent_connect(client_id):
    body = b"\x00\x04MQTT\x04\x00\x00\x00" + struct.pack("!H", len(client_id)) + client_id
    return bytes([0x10, len(body)]) + body


def subscribe_packet(topic, qos, packet_id=1):
    body = struct.pack("!H", packet_id) + struct.pack("!H", len(topic)) + topic + bytes([qos])
    return bytes([0x82, len(body)]) + body


def connected_clients(port, prefix, n):
    """n raw connections, each with its CONNACK read (client ids prefix0, prefix1, ...)."""
    clients = []
    for i in range(n):
        s = socket.create_connection(("127.0.0.1", port))
        s.sendall(connect_packet(prefix + b"%d" % i))
        read_exactly(s, 4)
        clients.append(s)
    return clients


def read_exactly(sock, n):
    data = b""
    while len(data) < n:
        chunk = sock.recv(n - len(data))
        if not chunk:
            raise EOFError
        data += chunk
    return data


def test_offline_queues_share_one_copy_of_a_message(broker):
    # Eight persistent sessions subscribe at QoS 1, then go offline.
    for i in range(8):
        s = socket.create_connection(("127.0.0.1", broker.port))
        s.sendall(persistent_connect(b"offline%d" % i) + subscribe_packet(b"bulk", 1))
        read_exactly(s, 4 + 5)  # CONNACK, SUBACK
        s.sendall(b"\xe0\x00")  # DISCONNECT
        s.close()
    time.sleep(0.5)
    before = rss_kib(broker.proc.pid)
    pub = socket.create_connection(("127.0.0.1", broker.port))
    pub.sendall(connect_packet(b"bulkpub"))
    read_exactly(pub, 4)
    payload = b"p" * 1_000_000
    for i in range(60):
        pub.sendall(publish_packet(b"bulk", payload, qos=1, packet_id=i + 1))
        read_exactly(pub, 4)  # PUBACK
    pub.close()
    time.sleep(0.5)
    grown = rss_kib(broker.proc.pid) - before
    # 60 MB kept for 8 sessions: once per worker at most (2 workers), not 8 times (480 MB).
    assert grown < 200_000, f"RSS grew {grown} KiB for 60 MB queued to 8 offline sessions"


def test_unacknowledged_messages_do_not_pin_read_buffers():
    # A fixed mmap threshold: buffers of 128 KiB or more are mapped and unmapped (glibc otherwise
    # raises the threshold and keeps freed ones in its heap), so RSS shows what is really held.
    broker = Broker(["-t", "2"], config_text='[[listener]]\nbind = "127.0.0.1:0"\n[limits]\nmax_inflight = 100\n',
                    env={"MALLOC_MMAP_THRESHOLD_": "131072"})
    try:
        pin_read_buffers(broker)
    finally:
        broker.stop()


def pin_read_buffers(broker):
    sub = socket.create_connection(("127.0.0.1", broker.port))
    sub.sendall(persistent_connect(b"neverack") + subscribe_packet(b"small", 1))
    read_exactly(sub, 4 + 5)
    time.sleep(0.3)
    before = rss_kib(broker.proc.pid)
    pub = socket.create_connection(("127.0.0.1", broker.port))
    pub.sendall(connect_packet(b"pinner"))
    read_exactly(pub, 4)
    for i in range(100):
        # A 16-byte message read in the same buffer as a 900 KB one nobody wants.
        pub.sendall(publish_packet(b"nobody", b"x" * 900_000) + publish_packet(b"small", b"0123456789abcdef", qos=1, packet_id=i + 1))
        read_exactly(pub, 4)
    # The subscriber reads but never acknowledges: 100 messages in flight.
    got = 0
    sub.settimeout(5)
    data = b""
    while got < 100:
        data += sub.recv(65536)
        got = data.count(b"0123456789abcdef")
    time.sleep(1.5)  # a few timeout sweeps
    grown = rss_kib(broker.proc.pid) - before
    # Pinned, they would hold 100 read buffers of ~900 KB (90 MB).
    assert grown < 20_000, f"RSS grew {grown} KiB: in-flight 16 B messages pin their read buffers"
    pub.close()
    sub.close()


def test_long_distinct_topics_do_not_fill_caches(broker):
    pub = socket.create_connection(("127.0.0.1", broker.port))
    pub.sendall(connect_packet(b"topics"))
    read_exactly(pub, 4)
    sub = socket.create_connection(("127.0.0.1", broker.port))
    sub.sendall(connect_packet(b"everything") + subscribe_packet(b"#", 0))
    read_exactly(sub, 4 + 5)
    time.sleep(0.3)
    before = rss_kib(broker.proc.pid)
    received = 0
    sub.setblocking(False)
    for i in range(2000):
        topic = (b"%05d" % i) + b"t" * 60_000
        pub.sendall(publish_packet(topic, b"x"))
        try:
            while True:
                chunk = sub.recv(1 << 20)
                if not chunk:
                    break
                received += len(chunk)
        except BlockingIOError:
            pass
    sub.setblocking(True)
    sub.settimeout(10)
    while received < 2000 * 60_000:
        received += len(sub.recv(1 << 20))
    time.sleep(0.5)
    grown = rss_kib(broker.proc.pid) - before
    # 120 MB of distinct topics went through; the route cache keeps at most 8 MiB a worker.
    assert grown < 40_000, f"RSS grew {grown} KiB after 2,000 distinct 60 KB topics"
    pub.close()
    sub.close()


def read_packets(sock, count, timeout=60, kinds=None):
    """Reads `count` MQTT packets; returns their first bytes (type and flags). A timeout or a
    close ends it early (raising), with what came so far in `kinds`."""
    sock.settimeout(timeout)
    buf = bytearray()
    kinds = [] if kinds is None else kinds
    pos = 0
    while len(kinds) < count:
        chunk = sock.recv(1 << 20)
        if not chunk:
            raise EOFError(f"closed after {len(kinds)} packets")
        buf += chunk
        while True:
            if len(buf) - pos < 2:
                break
            length, shift, i = 0, 0, pos + 1
            while i < len(buf):
                length |= (buf[i] & 0x7F) << shift
                shift += 7
                i += 1
                if not buf[i - 1] & 0x80:
                    break
            else:
                break
            if len(buf) - i < length:
                break
            kinds.append(buf[pos])
            pos = i + length
        if pos > 1 << 20:
            del buf[:pos]
            pos = 0
    return kinds


def test_every_retained_message_reaches_a_wildcard_subscriber(broker):
    pub = socket.create_connection(("127.0.0.1", broker.port))
    pub.sendall(connect_packet(b"retainer"))
    read_exactly(pub, 4)
    total = 100_000
    batch = bytearray()
    for i in range(total):
        body = publish_packet(b"r/%d/%d" % (i // 1000, i % 1000), b"v%d" % i)
        batch += bytes([body[0] | 0x01]) + body[1:]  # RETAIN
        if len(batch) > 1 << 16:
            pub.sendall(batch)
            batch.clear()
    pub.sendall(batch + b"\xc0\x00")  # PINGREQ: answered once all is handled
    read_exactly(pub, 2)
    sub = socket.create_connection(("127.0.0.1", broker.port))
    sub.sendall(connect_packet(b"allretained") + subscribe_packet(b"#", 0))
    kinds = read_packets(sub, 2 + total)
    publishes = [k for k in kinds if k >> 4 == 3]
    assert len(publishes) == total and all(k & 0x01 for k in publishes)
    pub.close()
    sub.close()


def test_slow_consumer_drops_only_for_the_stalled(broker):
    """A burst to two subscribers: one never reads, one reads steadily but slower than the
    publisher sends. The reading one must get (nearly) everything; only the stalled one loses."""
    burst_to_a_stalled_and_a_slow_reader(broker)


def test_slow_consumer_policy_also_holds_back_hooked_publishers(tmp_path):
    """The same with an on_publish hook that changes every message of the burst."""
    script = tmp_path / "touch.lua"
    script.write_text('mqlite.on_publish("burst", function(m) return { payload = m.payload } end)\n')
    b = Broker(["-t", "2"], config_text=f'[[listener]]\nbind = "127.0.0.1:0"\n[[plugin]]\nscript = "{script}"\n')
    try:
        burst_to_a_stalled_and_a_slow_reader(b)
    finally:
        b.stop()


def burst_to_a_stalled_and_a_slow_reader(broker):
    import threading
    total = 256 * 235  # sent in chunks of 256
    frame = publish_packet(b"burst", b"m" * 1024)
    stalled = socket.create_connection(("127.0.0.1", broker.port))
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.sendall(connect_packet(b"stalled") + subscribe_packet(b"burst", 0))
    read_exactly(stalled, 4 + 5)  # then never reads again
    reader = socket.create_connection(("127.0.0.1", broker.port))
    reader.sendall(connect_packet(b"reader") + subscribe_packet(b"burst", 0))
    read_exactly(reader, 4 + 5)
    received = {"bytes": 0}

    def read_slowly():
        reader.settimeout(10)
        try:
            while received["bytes"] < total * len(frame):
                chunk = reader.recv(32768)
                if not chunk:
                    return
                received["bytes"] += len(chunk)
                time.sleep(0.004)  # ~8 MB/s at most: slower than the publisher
        except OSError:
            pass

    t = threading.Thread(target=read_slowly)
    t.start()
    pub = socket.create_connection(("127.0.0.1", broker.port))
    pub.sendall(connect_packet(b"burster"))
    read_exactly(pub, 4)
    chunk = frame * 256
    peak = 0
    for i in range(total // 256):
        pub.sendall(chunk)
        if i % 64 == 0:
            peak = max(peak, rss_kib(broker.proc.pid))
    t.join(120)
    got = received["bytes"] // len(frame)
    assert got >= total * 0.999, f"the reading subscriber got {got} of {total}\n" + broker.log()[-3000:]
    assert "cannot keep up" in broker.log() and "stalled" in broker.log()
    assert peak < 400_000, f"broker RSS {peak} KiB during the burst"
    for s in (pub, reader, stalled):
        s.close()


def test_a_slow_acknowledger_cannot_hold_publishers_back_for_long(broker):
    """A QoS 1 subscriber to everything that acknowledges each message half a second late: the
    publisher is held back at most a second per episode, so another subscriber keeps getting data."""
    import threading
    slow = socket.create_connection(("127.0.0.1", broker.port))
    slow.sendall(connect_packet(b"slowacker") + subscribe_packet(b"#", 1))
    read_exactly(slow, 4 + 5)
    bystander = socket.create_connection(("127.0.0.1", broker.port))
    bystander.sendall(connect_packet(b"bystander") + subscribe_packet(b"a/#", 0))
    read_exactly(bystander, 4 + 5)
    stop = threading.Event()

    def ack_slowly():
        slow.settimeout(0.5)
        buf = b""
        while not stop.is_set():
            try:
                buf += slow.recv(65536)
            except OSError:
                continue
            # Acknowledge one QoS 1 PUBLISH (the first whose id we can read), late.
            i = buf.find(b"\x32")
            if i >= 0 and len(buf) > i + 6:
                tlen = struct.unpack("!H", buf[i + 2:i + 4])[0]
                if len(buf) >= i + 4 + tlen + 2:
                    pid = buf[i + 4 + tlen:i + 6 + tlen]
                    buf = buf[i + 6 + tlen:]
                    time.sleep(0.5)
                    slow.sendall(b"\x40\x02" + pid)

    counts = []

    def count_bystander():
        bystander.settimeout(0.2)
        while not stop.is_set():
            start, got = time.monotonic(), 0
            while time.monotonic() - start < 1:
                try:
                    got += len(bystander.recv(1 << 20))
                except OSError:
                    pass
            counts.append(got)

    threads = [threading.Thread(target=ack_slowly), threading.Thread(target=count_bystander)]
    for t in threads:
        t.start()
    pub = socket.create_connection(("127.0.0.1", broker.port))
    pub.sendall(connect_packet(b"flooder"))
    read_exactly(pub, 4)

    def drain_acks():
        pub.settimeout(0.2)
        while not stop.is_set():
            try:
                pub.recv(1 << 20)
            except OSError:
                pass

    threads.append(threading.Thread(target=drain_acks))
    threads[-1].start()
    pub.setblocking(False)
    # QoS 1: what reaches the slow subscriber waits for its late acknowledgements.
    frame = b"".join(publish_packet(b"a/b", b"z" * 100, qos=1, packet_id=i + 1) for i in range(100))
    pending = memoryview(frame)
    deadline = time.monotonic() + 7
    while time.monotonic() < deadline:
        try:
            pending = pending[pub.send(pending):]
            if not pending:
                pending = memoryview(frame)
        except BlockingIOError:
            time.sleep(0.005)
    stop.set()
    for t in threads:
        t.join(5)
    # After the first episode (at most a second held back), data keeps flowing every second.
    assert len(counts) >= 5 and all(c > 0 for c in counts[2:6]), f"bytes per second to the bystander: {counts}"
    for s in (pub, slow, bystander):
        s.close()


def test_retained_on_subscribe_is_fetched_as_the_client_reads(broker):
    """1,000 retained messages and one SUBSCRIBE naming `h/#` a thousand times, from a client that
    never reads: the worker goes on serving others, and memory does not follow the filters."""
    pub = socket.create_connection(("127.0.0.1", broker.port))
    pub.sendall(connect_packet(b"retainer"))
    read_exactly(pub, 4)
    batch = b"".join(bytes([0x31]) + publish_packet(b"h/%d" % i, b"r" * 200)[1:] for i in range(1000))
    pub.sendall(batch + b"\xc0\x00")
    read_exactly(pub, 2)
    before = rss_kib(broker.proc.pid)
    # SUBSCRIBE h/# x 1000 (QoS 0), clean session 0, and never read.
    filters = b"".join(struct.pack("!H", 3) + b"h/#" + b"\x00" for _ in range(1000))
    body = struct.pack("!H", 1) + filters
    header = b"\x82" + remaining_length(len(body))
    hog = socket.create_connection(("127.0.0.1", broker.port))
    hog.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    hog.sendall(persistent_connect(b"hog") + bytes(header) + body)
    # Other clients, on both workers, get their PINGRESP promptly meanwhile.
    others = connected_clients(broker.port, b"other", 4)
    worst = 0.0
    for _ in range(5):
        for s in others:
            start = time.monotonic()
            s.sendall(b"\xc0\x00")
            read_exactly(s, 2)
            worst = max(worst, time.monotonic() - start)
        time.sleep(0.1)
    grown = rss_kib(broker.proc.pid) - before
    assert worst < 1.0, f"a PINGREQ waited {worst:.2f} s while the hog's SUBSCRIBE was served"
    assert grown < 30_000, f"RSS grew {grown} KiB for one SUBSCRIBE of 1,000 copies of h/#"
    hog.close()
    for s in others + [pub]:
        s.close()


def open_descriptors(pid):
    import os
    return len(os.listdir(f"/proc/{pid}/fd"))


def test_a_client_that_stops_reading_is_still_closed(broker):
    """A connection the broker ends is closed within about a second even when the client reads
    nothing (its output never drains, so the shutdown of the broker's side never completes): it
    does not keep its descriptor, its max_connections slot and its buffers for as long as the
    client likes."""
    pub = socket.create_connection(("127.0.0.1", broker.port))
    pub.sendall(connect_packet(b"retainer"))
    read_exactly(pub, 4)
    pub.sendall(b"".join(b"\x31" + publish_packet(b"big/%d" % i, b"x" * 100_000, 0)[1:] for i in range(40)))  # retained
    pub.sendall(b"\xc0\x00")  # PINGREQ: the retained messages are stored once it is answered
    read_exactly(pub, 2)
    victim = socket.socket()
    victim.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    victim.connect(("127.0.0.1", broker.port))
    victim.sendall(connect_packet(b"victim") + subscribe_packet(b"big/#", 0))
    time.sleep(1)  # the broker's output to it is stuck: 4 MB of retained messages, a full window
    before = open_descriptors(broker.proc.pid)
    victim.sendall(b"\xf0\x00")  # packet type 15: malformed, closes the connection
    assert wait_for(lambda: open_descriptors(broker.proc.pid) == before - 1, timeout=4), \
        f"{open_descriptors(broker.proc.pid)} descriptors open, {before} before the close"
    assert "closing connection" in broker.log()
    victim.close()
    pub.close()


def test_memory_comes_back_after_a_burst_to_a_stalled_subscriber(broker):
    """100 publishers each send 100 QoS 1 messages of 16 KiB at once to a subscriber that reads
    nothing; then it goes and they stay, idle. Their receive-buffer pools are trimmed (NIO kept up
    to 16 buffers each, of up to 256 KiB) and freed memory goes back to the system: before, the
    broker stayed about 60 MB over its size before the burst. (Since receive buffers past 2 KiB are
    not kept, the peak is about 30 MB rather than 90.)"""
    publishers = connected_clients(broker.port, b"burst", 100)
    stalled = socket.socket()
    stalled.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
    stalled.connect(("127.0.0.1", broker.port))
    stalled.sendall(connect_packet(b"stalled") + subscribe_packet(b"burst/#", 1))
    time.sleep(1)
    before = rss_kib(broker.proc.pid)
    payload = b"p" * 16384
    for s in publishers:
        s.sendall(b"".join(publish_packet(b"burst/x", payload, 1, i + 1) for i in range(100)))
    time.sleep(2)
    peak = rss_kib(broker.proc.pid)
    stalled.close()
    for s in publishers:  # their PUBACKs
        s.settimeout(5)
        read_exactly(s, 400)
    after = settle(broker, before, 8 * 1024, timeout=15)
    print(f"burst: +{peak - before} KiB at the peak, +{after - before} KiB after")
    assert peak - before > 20 * 1024, f"the burst took only {peak - before} KiB"  # (else this tests nothing)
    assert after - before < 8 * 1024, f"{after - before} KiB still held after the burst (peak +{peak - before})"
    for s in publishers:
        s.close()


def test_a_client_that_sends_without_reading_its_answers_is_not_read_either(broker):
    """PUBRELs (each answered by a PUBCOMP) and QoS 1 PUBLISHes (each by a PUBACK) sent as fast as
    the socket takes them by a client that reads nothing: the broker stops reading it once its
    answers fill the socket (NIO's high-water mark), so its output does not grow without bound
    (Mosquitto's RSS stays flat; mqlite's grew ~12 MB a second), and other clients are served."""
    import threading
    other = socket.create_connection(("127.0.0.1", broker.port))
    other.sendall(connect_packet(b"other"))
    read_exactly(other, 4)
    before = rss_kib(broker.proc.pid)
    for kind, chunk in ((b"pubrel", b"".join(b"\x62\x02" + struct.pack("!H", 1 + k) for k in range(4096))),
                        (b"puback", b"".join(publish_packet(b"t", b"x", 1, 1 + k) for k in range(1000)))):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", broker.port))
        s.sendall(connect_packet(b"flood-" + kind))
        sent = [0]

        def flood():
            try:
                while True:
                    s.sendall(chunk)  # blocks once the broker stops reading
                    sent[0] += len(chunk)
            except OSError:
                pass
        threading.Thread(target=flood, daemon=True).start()
        time.sleep(4)
        other.sendall(b"\xc0\x00")  # still served
        assert read_exactly(other, 2) == b"\xd0\x00"
        grown = rss_kib(broker.proc.pid) - before
        assert grown < 20 * 1024, f"RSS grew {grown} KiB while a client sent {sent[0]} bytes of {kind.decode()} without reading"
        s.shutdown(socket.SHUT_RDWR)
        s.close()
