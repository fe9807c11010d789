"""Shared pieces of the launcher tests: run a CLI without ever hanging, read losses, the reference run."""

from __future__ import annotations

import json
import os
import pathlib
import shutil
import signal
import socket
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "cpu" / "tiny-gpt2-tp2.json"  # tp=2 GPT-2, synthetic data, train.device=cpu
STEPS = 6


def require(*binaries: str) -> None:
    """Skip (with the reason) when a launcher binary is not installed on this machine."""
    missing = [b for b in binaries if shutil.which(b) is None]
    if missing:
        pytest.skip(
            f"{', '.join(missing)} not installed (CI installs them; see examples/slurm/setup_local_cluster.sh install)"
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch_env(**extra: str) -> dict[str, str]:
    """The test's environment minus any launcher variables it may itself run under."""
    env = {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_", "OMPI_", "PMI_", "SLURM_"))
    }
    env.update(PYTHONPATH=str(REPO), OMP_NUM_THREADS="1", **extra)
    return env


def run_cli(cmd: list[str], *, timeout_s: float, env: dict[str, str] | None = None) -> str:
    """Run ``cmd`` in its own session; on timeout kill that whole process group, so nothing is left over."""
    proc = subprocess.Popen(
        cmd,
        cwd=REPO,
        env=env or launch_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        raise AssertionError(f"{cmd[0]} timed out after {timeout_s} s:\n{out[-4000:]}") from None
    assert proc.returncode == 0, f"{' '.join(cmd)} exited {proc.returncode}:\n{out[-4000:]}"
    return out


def run_overrides(run_dir: pathlib.Path) -> list[str]:
    return ["--set", f"train.log_dir={run_dir}", "--set", f"train.save_dir={run_dir / 'ckpt'}"]


def read_losses(run_dir: pathlib.Path) -> list[float]:
    with open(run_dir / "metrics.jsonl", encoding="utf-8") as fh:
        return [json.loads(line)["loss"] for line in fh if line.strip()]


def assert_checkpoint(run_dir: pathlib.Path, step: int = STEPS) -> None:
    ckpt = run_dir / "ckpt"
    name = f"step_{step:08d}"
    assert (ckpt / "latest").read_text().strip() == name
    manifest = json.loads((ckpt / name / "manifest.json").read_text())
    assert manifest["step"] == step and manifest["world_size"] == 2
    assert sorted(manifest["shards"]) == ["rank_00000.pt", "rank_00001.pt"]


def python() -> str:
    return sys.executable
