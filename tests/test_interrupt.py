"""Ctrl-C during `neuropredictor extract`, as a terminal sends it (SIGINT to the whole process group): the
run stops within seconds, committed shards stay committed, one line says how to resume, exit code 130;
the same command then finishes the store without redoing committed shards. With and without Prefect."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import zarr

from conftest import MODEL, make_images
from neuropredictor.corpus import make_shards


@pytest.fixture(scope="module")
def corpus(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("interrupt")
    make_images(root / "imgs", 64, nested=False)
    make_shards(root / "imgs", str(root / "shards"), maxcount=4)  # 16 shards: well over 10 s of resnet18 here
    return root / "shards"


def _commits(out: Path) -> dict[str, int]:
    """Commit records: shard name -> modification time."""
    folder = out / "_status"
    if not folder.is_dir():
        return {}
    return {p.stem: p.stat().st_mtime_ns for p in folder.glob("*.json") if not p.name.endswith(".failed.json")}


def _command(corpus: Path, out: Path, mode: str) -> list[str]:
    return [sys.executable, "-m", "neuropredictor", "extract", "--corpus", str(corpus), "--model", MODEL,
            "--no-pretrained", "--layers", "layer1", "--reduce", "avgpool", "--out", str(out), "--batch-size", "2",
            "--num-workers", "1", mode]


@pytest.fixture(scope="module")
def env(tmp_path_factory) -> dict[str, str]:
    """No Prefect server configured (--prefect starts its temporary one), in a Prefect home of this module's
    own (its database is made once)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_API")}
    return env | {"PREFECT_HOME": str(tmp_path_factory.mktemp("prefect")), "PREFECT_SERVER_ANALYTICS_ENABLED": "false"}


def _signal_after_a_commit(cmd: list[str], env: dict[str, str], out: Path, sig: int,
                           group: bool) -> tuple[int, str, float, list[int]]:
    """Run cmd, send `sig` once a shard is committed (to its process group, as a terminal's Ctrl-C, or to
    it alone, as `kill`); returns exit code, output, seconds it took to exit, and its child processes."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not _commits(out) and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert proc.poll() is None and _commits(out), "no shard was committed in time, or the run ended first"
        children = [int(p) for p in subprocess.run(["pgrep", "-P", str(proc.pid)], capture_output=True, text=True,
                                                    check=False).stdout.split()]
        os.killpg(proc.pid, sig) if group else proc.send_signal(sig)
        sent = time.monotonic()
        output, _ = proc.communicate(timeout=30)
        return proc.returncode, output, time.monotonic() - sent, children
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()


def _alive(pid: int) -> bool:
    try:
        return Path(f"/proc/{pid}/stat").read_text().split()[2] != "Z"
    except (OSError, IndexError):
        return False


@pytest.mark.parametrize("mode", ["--no-prefect", "--prefect"])
def test_ctrl_c_stops_soon_keeps_commits_and_the_same_command_resumes(corpus, env, tmp_path, mode):
    out = tmp_path / "out.zarr"
    cmd = _command(corpus, out, mode)
    code, output, took, children = _signal_after_a_commit(cmd, env, out, signal.SIGINT, group=True)
    assert code == 130, output
    assert took < 15, f"took {took:.1f} s to stop"
    assert "interrupted: committed shards are kept" in output and "command again to resume" in output, output
    assert "Traceback" not in output and "Running()" not in output, output
    time.sleep(1)
    assert not [pid for pid in children if _alive(pid)], "a child process (decode worker, server) outlived the run"
    committed = _commits(out)
    assert 0 < len(committed) < 16
    kept = zarr.open_group(str(out), mode="r")["features/layer1"][: 4 * len(committed)]

    # the same command resumes; without Prefect here (resume comes from the store either way), to save a
    # temporary server's start-up
    again = subprocess.run(cmd[:-1] + ["--no-prefect"], capture_output=True, text=True, env=env, timeout=300,
                           check=False)
    assert again.returncode == 0, again.stdout + again.stderr
    after = _commits(out)
    assert len(after) == 16 and all(after[name] == mtime for name, mtime in committed.items())  # not redone
    g = zarr.open_group(str(out), mode="r")
    assert g["valid"][:].all() and not np.isnan(g["features/layer1"][:]).any()
    np.testing.assert_array_equal(g["features/layer1"][: 4 * len(committed)], kept)


def test_sigterm_stops_at_once_and_takes_the_temporary_server_down(corpus, env, tmp_path):
    """`kill` reaches the command only (the server runs in a session of its own, away from Ctrl-C): the
    command stops, and stops the server on its way out."""
    out = tmp_path / "out.zarr"
    code, output, took, children = _signal_after_a_commit(_command(corpus, out, "--prefect"), env, out, signal.SIGTERM,
                                                          group=False)
    assert code == 128 + signal.SIGTERM and took < 15, output
    assert "command again to resume" in output and children, output
    time.sleep(1)
    assert not [pid for pid in children if _alive(pid)], "Prefect's temporary server outlived the command"


def test_a_stop_during_a_retry_delay_ends_the_wait_without_another_attempt():
    import threading

    from neuropredictor.errors import Interrupted
    from neuropredictor.schedule import RetryPolicy

    attempts, stop = [], threading.Event()

    def fails(attempt: int) -> None:
        attempts.append(attempt)
        raise OSError("storage unreachable")

    threading.Timer(0.2, stop.set).start()
    started = time.monotonic()
    with pytest.raises(Interrupted):
        RetryPolicy(retries=2, delay_s=30.0).call(fails, stop)
    assert attempts == [1] and time.monotonic() - started < 5


def test_ctrl_c_during_a_sweep_says_how_to_resume(corpus, env, tmp_path):
    # the sweep ended with exit 130 and no word (extract said how to resume)
    out = tmp_path / "sweep"
    cmd = [sys.executable, "-m", "neuropredictor", "sweep", "--corpus", str(corpus), "--models", MODEL,
           "--no-pretrained", "--layers", "layer1", "--reduce", "avgpool", "--out", str(out), "--batch-size", "2",
           "--num-workers", "1", "--no-prefect"]
    code, output, took, _children = _signal_after_a_commit(cmd, env, out / "torchvision_resnet18.zarr",
                                                           signal.SIGINT, group=True)
    assert code == 130 and took < 15, output
    assert "interrupted: committed shards are kept" in output and "Traceback" not in output, output
