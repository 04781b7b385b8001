"""Runs the real `mqlite` binary on 127.0.0.1 with an ephemeral port for clients nobody here wrote."""
import os
import re
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
BINARY = os.environ.get("MQLITE_BIN", str(ROOT / ".build" / "debug" / "mqlite"))


class Broker:
    """One mqlite process; `port` is the port it logged as bound."""

    def __init__(self, args, config_text=None, env=None, preexec_fn=None, listeners=1):
        self.dir = tempfile.TemporaryDirectory()
        cmd = [BINARY]
        if config_text is not None:
            path = Path(self.dir.name) / "mqlite.conf"
            path.write_text(config_text)
            cmd += ["-c", str(path)]
        cmd += args
        self.proc = subprocess.Popen(
            cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, preexec_fn=preexec_fn,
            env=None if env is None else {**os.environ, **env})
        self.lines = []
        self.port = None
        # Every port logged as bound, in listener order (`port` is the first).
        self.ports = []
        bound = threading.Event()

        def reader():
            for line in self.proc.stdout:
                self.lines.append(line)
                m = re.search(r"listening on 127\.0\.0\.1:(\d+)", line)
                if m:
                    self.ports.append(int(m.group(1)))
                    if self.port is None:
                        self.port = self.ports[0]
                    if len(self.ports) >= listeners:
                        bound.set()
            bound.set()

        self.thread = threading.Thread(target=reader, daemon=True)
        self.thread.start()
        if not bound.wait(30) or len(self.ports) < listeners:
            self.stop()
            raise RuntimeError("mqlite did not start:\n" + "".join(self.lines))

    def log(self):
        return "".join(self.lines)

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.thread.join(5)
        self.dir.cleanup()
        return self.proc.returncode


@pytest.fixture
def broker():
    b = Broker(["-b", "127.0.0.1:0", "-t", "2"])
    yield b
    b.stop()


def wait_for(condition, timeout=5.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return True
        time.sleep(0.02)
    return condition()
