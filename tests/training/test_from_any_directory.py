"""Trident installed as one package works from any directory: transformers (whose dependency is Hugging
Face's own ``kernels`` package) imports beside it, and a short run on Trident's Triton kernels (CPU
interpreter) trains, from the repository root and from an unrelated directory."""

from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys

import pytest

REPO = pathlib.Path(__file__).resolve().parents[2]
CONFIG = REPO / "configs" / "cpu" / "tiny-llama.json"


@pytest.mark.parametrize("where", ["repo", "elsewhere"])
def test_transformers_and_a_kernel_run(tmp_path, where):
    cwd = REPO if where == "repo" else tmp_path
    env = {**os.environ, "TRITON_INTERPRET": "1", "TRIDENT_KERNELS": "triton"}
    env.pop("PYTHONPATH", None)  # the installed package, as a user has it
    probe = subprocess.run(
        [sys.executable, "-c", "from transformers import GPT2LMHeadModel; import engine.kernels"],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert probe.returncode == 0, probe.stderr[-2000:]
    log_dir = json.dumps(str(tmp_path / "run"))
    args = [
        "--set",
        "model.kernels=true",
        "--set",
        "train.max_steps=2",
        "--set",
        "train.progress=false",
        "--set",
        f"train.log_dir={log_dir}",
        "--set",
        "train.save_dir=null",
    ]
    run = subprocess.run(
        [sys.executable, "-m", "engine.train", "--config", str(CONFIG), *args],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    final = json.loads(run.stdout.strip().splitlines()[-1])
    assert final["step"] == 2 and final["loss"] > 0
