#!/usr/bin/env python3
"""Startup with a large store (issue 14): 1,000,000 retained messages and 100,000 offline
persistent sessions (two subscriptions and one queued QoS 1 message each). The store is made by
mqlite itself (its schema), filled here through Python's sqlite3, then mqlite is started on it:
the time from exec to listening, and its resident memory then. Run through `make bench-startup`
(release build); prints a Markdown table.

RETAINED and SESSIONS in the environment change the sizes.
"""
import os
import re
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MQLITE = Path(os.environ.get("MQLITE_BIN", ROOT / ".build" / "release" / "mqlite"))
RETAINED = int(os.environ.get("RETAINED", "1000000"))
SESSIONS = int(os.environ.get("SESSIONS", "100000"))


def start(conf):
    """Starts mqlite on `conf`; returns (process, seconds to 'listening', the log so far)."""
    began = time.monotonic()
    proc = subprocess.Popen([str(MQLITE), "-c", str(conf)], stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    log = []
    for line in proc.stdout:
        log.append(line)
        if "listening on" in line:
            return proc, time.monotonic() - began, log
    raise RuntimeError("mqlite stopped before listening:\n" + "".join(log))


def rss_kib(pid):
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def stop(proc):
    proc.terminate()
    proc.wait(60)


def main():
    tmp = Path(tempfile.mkdtemp(prefix="mqlite-startup-"))
    db = tmp / "store.db"
    conf = tmp / "mqlite.conf"
    conf.write_text(f'[server]\nworkers = 2\n[[listener]]\nbind = "127.0.0.1:0"\n[persistence]\npath = "{db}"\n')
    proc, _, _ = start(conf)  # makes the store and its schema
    stop(proc)
    began = time.monotonic()
    con = sqlite3.connect(db)
    now = int(time.time())
    payload = b"x" * 48
    con.execute("BEGIN")
    con.executemany("INSERT INTO retained (topic, payload, qos) VALUES (?, ?, 1)",
                    ((f"site/{i // 1000}/sensor/{i}".encode(), payload) for i in range(RETAINED)))
    con.executemany("INSERT INTO sessions (client_id, offline_since) VALUES (?, ?)",
                    ((f"device-{i}".encode(), now) for i in range(SESSIONS)))
    con.executemany("INSERT INTO subscriptions (client_id, filter, qos, options) VALUES (?, ?, 1, 0)",
                    ((f"device-{i}".encode(), f"device/{i}/{kind}".encode()) for i in range(SESSIONS) for kind in ("cmd", "config/#")))
    con.executemany("INSERT INTO session_messages (client_id, seq, state, qos, retain, topic, payload) VALUES (?, 1, 0, 1, 0, ?, ?)",
                    ((f"device-{i}".encode(), f"device/{i}/cmd".encode(), payload) for i in range(SESSIONS)))
    con.commit()
    con.close()
    filled = time.monotonic() - began
    size = sum(f.stat().st_size for f in tmp.glob("store.db*"))
    rows = []
    for attempt in range(3):
        proc, seconds, log = start(conf)
        time.sleep(0.5)
        rss = rss_kib(proc.pid)
        text = "".join(log)
        loaded = re.search(r"loaded (\d+) retained messages and (\d+) sessions in ([\d.]+) s", text)
        restored = re.search(r"restored (\d+) persistent sessions .* in ([\d.]+) s", text)
        stop(proc)
        rows.append((seconds, rss, loaded.groups() if loaded else None, restored.groups() if restored else None))
        print(f"run {attempt + 1}: {seconds:.2f} s to listening, RSS {rss / 1024:.0f} MiB, loaded {rows[-1][2]}, restored {rows[-1][3]}",
              flush=True)
    seconds, rss, loaded, restored = sorted(rows)[1]
    print(f"\n(store of {size / 1e6:.0f} MB filled in {filled:.0f} s)\n")
    print("| store | start to listening | of which: read the store | make the sessions | resident memory then |")
    print("| --- | --- | --- | --- | --- |")
    print(f"| {RETAINED:,} retained messages, {SESSIONS:,} offline sessions (2 subscriptions, 1 queued message each); "
          f"{size / 1e6:.0f} MB | {seconds:.2f} s | {float(loaded[2]):.2f} s | {float(restored[1]):.2f} s | {rss / 1024:.0f} MiB |")
    subprocess.run(["rm", "-rf", str(tmp)])


if __name__ == "__main__":
    sys.exit(main())
