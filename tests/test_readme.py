"""Every `neuropredictor` command in the README's bash blocks runs, in order, in a sandbox: a folder of
generated stimuli, neural data keyed by them, and an S3 bucket `lab-bucket` on moto's server. The only
changes made to a command are the ones an offline CPU machine needs, stated in `_offline`."""

from __future__ import annotations

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from conftest import key_files, make_images

ROOT = Path(__file__).resolve().parent.parent
BIN = Path(sys.executable).parent / "neuropredictor"
LOADS_A_MODEL = {"extract", "layers", "sweep"}  # bench always uses random weights


def readme_commands() -> list[list[str]]:
    """The neuropredictor commands of the README's bash blocks (continuation lines joined, comments dropped)."""
    blocks = re.findall(r"^```bash\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)
    commands = []
    for block in blocks:
        for line in block.replace("\\\n", " ").splitlines():
            if line.startswith("neuropredictor "):  # "[--json]": an optional flag, run with it
                commands.append([w.strip("[]") if w.startswith("[--") else w for w in shlex.split(line, comments=True)])
    return commands


def readme_yaml(name: str) -> str:
    """The README's YAML block that starts with `# name`."""
    blocks = re.findall(r"^```yaml\n(.*?)^```", (ROOT / "README.md").read_text(), flags=re.S | re.M)
    return next(b for b in blocks if b.startswith(f"# {name}"))


def _offline(words: list[str]) -> list[str]:
    """No downloads here: models get random weights; bench times a small corpus."""
    words = list(words)
    if words[1] in LOADS_A_MODEL and "--no-pretrained" not in words and "--weights" not in words:
        words.append("--no-pretrained")
    if words[1] == "bench":
        words += ["--images", "24", "--batch-size", "8"]
    return words


def test_the_readme_has_an_example_of_every_command():
    used = {words[1] for words in readme_commands()}
    assert {"models", "layers", "shards", "extract", "inspect", "encode", "rsa", "sweep", "bench"} <= used, used
    assert "models:" in readme_yaml("sweep.yaml")


@pytest.mark.slow
def test_every_readme_command_runs(tmp_path: Path, s3):
    make_images(tmp_path / "stimuli", 24)
    keys = sorted(key_files(tmp_path / "stimuli"))
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "fmri.npz", data=rng.normal(size=(len(keys), 30)), keys=np.array(keys),
             roi=np.array(["V1"] * 15 + ["IT"] * 15))
    (tmp_path / "sweep.yaml").write_text(readme_yaml("sweep.yaml"))
    env = {**os.environ, "NEUROPREDICTOR_LOG_DIR": str(tmp_path / "logs")}
    env = {k: v for k, v in env.items() if not k.startswith("PREFECT_API")}
    commands = readme_commands()
    assert len(commands) >= 9
    for words in commands:
        proc = subprocess.run([str(BIN), *_offline(words)[1:]], cwd=tmp_path, env=env, capture_output=True,
                              text=True, timeout=600)
        assert proc.returncode == 0, f"{shlex.join(words)}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
        if "--json" in words:
            json.loads(proc.stdout)
        assert "Traceback" not in proc.stderr, proc.stderr
    inspected = json.loads(subprocess.run([str(BIN), "inspect", "features/resnet50.zarr", "--json"], cwd=tmp_path,
                                          env=env, capture_output=True, text=True, timeout=300).stdout)
    assert inspected["status"] == "complete" and inspected["rows"]["committed"] == 24
