"""Lua limits on the real binary: a stop request ends the process promptly whatever a script does."""
import signal
import subprocess
import time

from conftest import Broker
from test_hostile import rss_kib
from test_interop import pub


def broker_with_script(tmp_path, lua, scripting):
    """The real binary with one worker, one listener and one plugin, `scripting` its [scripting] keys."""
    script = tmp_path / "plugin.lua"
    script.write_text(lua)
    conf = tmp_path / "mqlite.conf"
    conf.write_text(
        '[server]\nworkers = 1\n[[listener]]\nbind = "127.0.0.1:0"\n'
        f'[[plugin]]\nscript = "{script}"\n'
        f'[scripting]\n{scripting}'
    )
    return Broker(["-c", str(conf)])


def test_sigterm_during_runaway_script_exits_promptly(tmp_path):
    # A hook that never ends by itself: no practical instruction or time limit.
    b = broker_with_script(tmp_path, 'mqlite.on_publish("spin", function(m) while true do end end)\n',
                           'time_limit = 3600\ninstruction_limit = 2147483647\n')
    try:
        pub(b.port, "-t", "spin", "-m", "x")
        time.sleep(0.5)  # the only worker is now inside the hook
        start = time.monotonic()
        b.proc.send_signal(signal.SIGTERM)
        b.proc.wait(15)
        elapsed = time.monotonic() - start
        assert elapsed < 3, f"took {elapsed:.1f} s to stop"
        assert b.proc.returncode == 0, b.log()
    finally:
        b.stop()


def test_memory_limit_bounds_resident_memory_of_a_growing_script(tmp_path):
    # Each call keeps 8 MiB more; memory_limit = 48 MiB must stop it well before the
    # 320 MiB that 40 calls would keep without the limit. Measured on the broker's own
    # process, so nothing else running at the time counts against it.
    grow = ('kept = {}\n'
            'mqlite.on_publish("grow", function(m)\n'
            '  kept[#kept + 1] = string.rep(m.payload, 8 * 1024 * 1024)\n'
            '  return { payload = tostring(#kept) }\n'
            'end)\n')
    b = broker_with_script(tmp_path, grow, 'memory_limit = 50331648\n')
    try:
        before = rss_kib(b.proc.pid)
        for _ in range(40):
            pub(b.port, "-t", "grow", "-m", "x", "-q", "1")
        grown = rss_kib(b.proc.pid) - before
        assert grown < 150 * 1024, f"RSS grew by {grown // 1024} MiB"
        assert "not enough memory" in b.log()
        # The broker still serves: a retained message comes back to a new subscriber.
        pub(b.port, "-t", "plain", "-m", "still served", "-r")
        out = subprocess.run(
            ["mosquitto_sub", "-h", "127.0.0.1", "-p", str(b.port), "-t", "plain", "-C", "1", "-W", "10"],
            capture_output=True, text=True, timeout=15)
        assert out.stdout.strip() == "still served", out
    finally:
        b.stop()
