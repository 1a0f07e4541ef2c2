"""The `deploybot` command's own behaviour."""

from __future__ import annotations

import subprocess
import sys


def test_serve_makes_the_process_non_dumpable():
    code = ("import ctypes; from bot.jobs.sandbox import harden_process; libc = ctypes.CDLL(None); "
            "before = libc.prctl(3, 0, 0, 0, 0); harden_process(); print(before, libc.prctl(3, 0, 0, 0, 0))")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.split() == ["1", "0"]  # PR_GET_DUMPABLE before and after


def test_bad_config_is_a_clear_error_not_a_traceback(tmp_path):
    (tmp_path / "config.yaml").write_text("server: {port: eighty}\n")
    done = subprocess.run([sys.executable, "-m", "bot.cli", "serve", "--config", str(tmp_path / "config.yaml")],
                          capture_output=True, text=True)
    assert done.returncode == 2
    assert "server.port" in done.stderr and "Traceback" not in done.stderr
