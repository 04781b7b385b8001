"""Resource limits of the real binary: running out of file descriptors."""
import os
import resource
import socket
import time

from conftest import Broker, wait_for

CONNECT = bytes([0x10, 0x0C, 0x00, 0x04]) + b"MQTT" + bytes([0x04, 0x02, 0x00, 0x3C, 0x00, 0x00])
CONNACK_ACCEPTED = bytes([0x20, 0x02, 0x00, 0x00])
FD_LIMIT = 64


def cpu_seconds(pid):
    """User + system CPU time of a process so far."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def low_fd_limit():
    resource.setrlimit(resource.RLIMIT_NOFILE, (FD_LIMIT, FD_LIMIT))


def connect_and_connack(port):
    try:
        s = socket.create_connection(("127.0.0.1", port), timeout=5)
    except OSError:
        return b""
    try:
        s.sendall(CONNECT)
        reply = b""
        while len(reply) < 4:
            chunk = s.recv(4 - len(reply))
            if not chunk:
                break
            reply += chunk
        return reply
    except OSError:
        return b""
    finally:
        s.close()


def test_out_of_file_descriptors_backs_off_logs_once_and_recovers():
    b = Broker(["-b", "127.0.0.1:0", "-t", "2"], preexec_fn=low_fd_limit)
    extra = []
    try:
        assert connect_and_connack(b.port) == CONNACK_ACCEPTED
        # More sockets than the broker has descriptors left: the rest wait in its backlog.
        for _ in range(FD_LIMIT + 40):
            extra.append(socket.create_connection(("127.0.0.1", b.port), timeout=5))
        assert wait_for(lambda: "cannot accept connections" in b.log(), timeout=10), b.log()
        time.sleep(0.5)
        before = cpu_seconds(b.proc.pid)
        time.sleep(2)
        used = cpu_seconds(b.proc.pid) - before
        assert used < 0.3, f"broker used {used:.2f} s of CPU in 2 s while out of descriptors"
        assert b.log().count("cannot accept connections") == 1, b.log()
        assert b.proc.poll() is None
        for s in extra:
            s.close()
        extra = []
        # Descriptors come back as the broker sees those sockets close; then clients are served.
        assert wait_for(lambda: connect_and_connack(b.port) == CONNACK_ACCEPTED, timeout=10), b.log()
        assert "accepting connections again" in b.log()
    finally:
        for s in extra:
            s.close()
        b.stop()


def fd_table_size(pid):
    """How many descriptors the process's table holds now (FDSize in /proc/PID/status)."""
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("FDSize:"):
            return int(line.split()[1])
    raise AssertionError("no FDSize")


def test_the_descriptor_table_is_grown_at_start():
    """Linux grows a threaded process's descriptor table by doubling, each time waiting for an RCU
    grace period (10-30 ms with the worker asleep): the broker grows it once, at start, to
    max_connections + 1,024 (65,536 without a limit), within the soft limit."""
    soft = resource.getrlimit(resource.RLIMIT_NOFILE)[0]
    want = min(3000 + 1024, soft)
    b = Broker([], config_text=f'[[listener]]\nbind = "127.0.0.1:0"\n[limits]\nmax_connections = 3000\n')
    try:
        assert fd_table_size(b.proc.pid) >= want, (fd_table_size(b.proc.pid), want)
        assert connect_and_connack(b.port) == CONNACK_ACCEPTED
    finally:
        b.stop()
    b = Broker(["-b", "127.0.0.1:0"])
    try:
        assert fd_table_size(b.proc.pid) >= min(65536, soft)
    finally:
        b.stop()
    # Within a low soft limit: grown to it, and the broker works.
    b = Broker(["-b", "127.0.0.1:0"], preexec_fn=low_fd_limit)
    try:
        assert fd_table_size(b.proc.pid) >= FD_LIMIT
        assert connect_and_connack(b.port) == CONNACK_ACCEPTED
    finally:
        b.stop()


def test_sigusr1_sigusr2_and_early_sighup_do_not_end_the_broker():
    """Mosquitto's SIGUSR1 (save) and SIGUSR2 (dump) would otherwise kill the process with
    their default action; SIGHUP still reloads."""
    import signal
    import subprocess
    b = Broker(["-b", "127.0.0.1:0"])
    try:
        for sig in (signal.SIGUSR1, signal.SIGUSR2, signal.SIGHUP):
            b.proc.send_signal(sig)
        assert wait_for(lambda: "SIGHUP" in b.log(), timeout=10), b.log()
        assert b.proc.poll() is None
        assert connect_and_connack(b.port) == CONNACK_ACCEPTED
        r = subprocess.run(["mosquitto_pub", "-h", "127.0.0.1", "-p", str(b.port), "-t", "t", "-m", "x"], timeout=20)
        assert r.returncode == 0
    finally:
        assert b.stop() == 0
