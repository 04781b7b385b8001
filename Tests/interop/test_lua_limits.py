"""Lua limits on the real binary: a stop request ends the process promptly whatever a script does."""
import signal
import time

from conftest import Broker
from test_interop import pub


def test_sigterm_during_runaway_script_exits_promptly(tmp_path):
    # A hook that never ends by itself: no practical instruction or time limit.
    script = tmp_path / "spin.lua"
    script.write_text('mqlite.on_publish("spin", function(m) while true do end end)\n')
    conf = tmp_path / "mqlite.conf"
    conf.write_text(
        '[server]\nworkers = 1\n[[listener]]\nbind = "127.0.0.1:0"\n'
        f'[[plugin]]\nscript = "{script}"\n'
        '[scripting]\ntime_limit = 3600\ninstruction_limit = 2147483647\n'
    )
    b = Broker(["-c", str(conf)])
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
