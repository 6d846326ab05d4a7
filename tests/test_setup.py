"""make setup's system-package step: install as root with apt-get, else say exactly what to install."""

import os
import subprocess
from pathlib import Path

SCRIPT = Path(__file__).parents[1] / ".ci" / "system-packages"


def stub(folder: Path, name: str, body: str) -> None:
    path = folder / name
    path.write_text(f"#!/bin/sh\n{body}\n")
    path.chmod(0o755)


def run_with(tmp_path: Path, installed: bool, uid: int):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    stub(bin_dir, "dpkg-query", "echo 'install ok installed'" if installed else "exit 1")
    stub(bin_dir, "id", f"echo {uid}")
    stub(bin_dir, "apt-get", f'echo apt-get "$@" >> {tmp_path}/apt.log')
    env = {**os.environ, "PATH": f"{bin_dir}:/usr/bin:/bin"}
    return subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True)


def test_nothing_to_do_when_everything_is_installed(tmp_path):
    result = run_with(tmp_path, installed=True, uid=1000)
    assert result.returncode == 0 and result.stdout == "" and not (tmp_path / "apt.log").exists()


def test_root_installs_the_missing_packages_with_apt(tmp_path):
    result = run_with(tmp_path, installed=False, uid=0)
    assert result.returncode == 0
    log = (tmp_path / "apt.log").read_text()
    assert "update" in log
    assert "install -y -qq pkg-config libturbojpeg0-dev libopencv-dev dataset-fashion-mnist" in log


def test_non_root_is_told_exactly_what_to_install(tmp_path):
    result = run_with(tmp_path, installed=False, uid=1000)
    assert result.returncode == 1 and not (tmp_path / "apt.log").exists()
    assert "sudo apt-get install -y pkg-config libturbojpeg0-dev libopencv-dev dataset-fashion-mnist" in result.stderr
