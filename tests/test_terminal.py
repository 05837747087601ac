"""The terminal as a person sees it: the progress bar and the summary, one line per error, no traceback or
log line the user did not ask for (they go to the log file the summary names; -v shows them)."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from conftest import MODEL, make_images

BIN = Path(sys.executable).parent / "neuropredictor"


def _env(tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    env["NEUROPREDICTOR_LOG_DIR"] = str(tmp_path / "logs")
    return env


@pytest.mark.slow
@pytest.mark.skipif(shutil.which("tmux") is None, reason="needs tmux")
def test_screen_of_an_extract_with_prefect_shows_the_summary_and_nothing_else(tmp_path: Path):
    images = tmp_path / "stimuli"
    make_images(images, 12)
    done = tmp_path / "done"
    command = (f"{BIN} extract --corpus {images} --model {MODEL} --no-pretrained --layers layer4 "
               f"--reduce avgpool --out {tmp_path / 'f.zarr'} --prefect; echo EXIT=$? > {done}; sleep 300")
    session = f"np-{uuid.uuid4().hex[:8]}"
    env = _env(tmp_path)
    subprocess.run(["tmux", "new-session", "-d", "-s", session, "-x", "160", "-y", "60", command],
                   env=env, check=True, timeout=30)
    try:
        deadline = time.monotonic() + 240
        while not done.exists() and time.monotonic() < deadline:
            time.sleep(1)
        screen = subprocess.run(["tmux", "capture-pane", "-p", "-t", session, "-S", "-500"],
                                capture_output=True, text=True, check=True, timeout=30).stdout
    finally:
        subprocess.run(["tmux", "kill-session", "-t", session], capture_output=True, timeout=30)
    assert done.read_text().strip() == "EXIT=0", screen
    assert "rows: 12/12 written" in screen, screen
    assert "log: " in screen, screen
    for noise in ("Traceback", "INFO", "ERROR", "Warning", "Finished in state"):
        assert noise not in screen, screen
    logs = list((tmp_path / "logs").glob("*.log"))
    assert len(logs) == 1 and "Starting temporary server" in logs[0].read_text()  # Prefect's lines, kept


def test_a_bad_option_is_one_error_line(tmp_path: Path):
    make_images(tmp_path / "stimuli", 3)
    proc = subprocess.run([str(BIN), "extract", "--corpus", str(tmp_path / "stimuli"), "--model", MODEL,
                           "--no-pretrained", "--layers", "layer9", "--out", str(tmp_path / "f.zarr")],
                          capture_output=True, text=True, env=_env(tmp_path), timeout=300)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines and lines[0].startswith("error:") and "layer9" in proc.stderr, proc.stderr
    assert len(lines) <= 4 and "Traceback" not in proc.stderr, proc.stderr


def test_an_unexpected_error_is_one_line_and_its_traceback_is_in_the_log(tmp_path, monkeypatch, capsys):
    from neuropredictor.cli import extract as extract_command
    from neuropredictor.cli import main

    def broken(*args, **kwargs):
        raise ZeroDivisionError("a bug")

    monkeypatch.setenv("NEUROPREDICTOR_LOG_DIR", str(tmp_path / "logs"))
    monkeypatch.setattr(extract_command, "run_with_progress", broken)
    for verbose in ([], ["-v"]):
        monkeypatch.setattr(sys, "argv", ["neuropredictor", *verbose, "extract", "--corpus", "x", "--model", MODEL,
                                          "--layers", "layer4", "--out", str(tmp_path / "f.zarr")])
        with pytest.raises(SystemExit) as exit_info:
            main()
        assert exit_info.value.code == 1
        err = capsys.readouterr().err
        assert "error: ZeroDivisionError: a bug" in err
        assert ("Traceback" in err) == bool(verbose), err
    logged = "".join(p.read_text() for p in (tmp_path / "logs").glob("*.log"))
    assert logged.count("Traceback") == 2 and "ZeroDivisionError: a bug" in logged
