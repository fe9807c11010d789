"""Every launcher starts the same 2-process tp=2 run and produces exactly the same losses.

deepspeed, torchrun and mpirun run engine.train as users would; each run's metrics.jsonl must equal the
in-process reference bit for bit (same config, same math), which in turn matches the single-device run
within 1e-5 relative, and each run leaves a complete 2-shard checkpoint.
"""

from __future__ import annotations

import os
import subprocess

from tests.distributed.launch_helpers import (
    CONFIG,
    REPO,
    STEPS,
    assert_checkpoint,
    free_port,
    launch_env,
    python,
    read_losses,
    require,
    run_cli,
    run_overrides,
)

TIMEOUT_S = 300


def test_reference_matches_single_device(reference_losses, single_device_losses):
    assert len(reference_losses) == STEPS
    for got, ref in zip(reference_losses, single_device_losses):
        assert abs(got - ref) <= 1e-5 * abs(ref), (reference_losses, single_device_losses)


def _check_run(run_dir, reference_losses):
    assert read_losses(run_dir) == reference_losses
    assert_checkpoint(run_dir)


def test_torchrun(tmp_path, reference_losses):
    require("torchrun")
    run_cli(
        [
            "torchrun",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "-m",
            "engine.train",
            "--config",
            str(CONFIG),
            *run_overrides(tmp_path),
        ],
        timeout_s=TIMEOUT_S,
    )
    _check_run(tmp_path, reference_losses)


def test_deepspeed_launcher(tmp_path, reference_losses):
    require("deepspeed")
    # Without GPUs DeepSpeed's launcher picks its CPU accelerator; it passes --local_rank=N to the module.
    out = run_cli(
        [
            "deepspeed",
            "--num_gpus",
            "2",
            "--master_port",
            str(free_port()),
            "--module",
            "engine.train",
            "--config",
            str(CONFIG),
            *run_overrides(tmp_path),
        ],
        timeout_s=TIMEOUT_S,
    )
    assert "exits successfully" in out
    _check_run(tmp_path, reference_losses)


def test_mpirun(tmp_path, reference_losses):
    require("mpirun")

    cmd = ["mpirun", "-np", "2", "-x", "PYTHONPATH", "-x", "OMP_NUM_THREADS"]
    if os.geteuid() == 0:  # Open MPI refuses root unless told; CI runs as root
        cmd += ["--allow-run-as-root"]
    cmd += ["--oversubscribe", python(), "-m", "engine.train", "--config", str(CONFIG), *run_overrides(tmp_path)]
    run_cli(cmd, timeout_s=TIMEOUT_S)
    _check_run(tmp_path, reference_losses)


def test_launcher_user_error_is_one_line(tmp_path):
    """A config the layout cannot run fails on every rank with the one-line error and exit code 2."""
    require("torchrun")
    proc = subprocess.run(
        [
            "torchrun",
            "--nproc-per-node",
            "2",
            "--master-port",
            str(free_port()),
            "-m",
            "engine.train",
            "--config",
            str(CONFIG),
            "--set",
            "parallel.tensor=3",
            *run_overrides(tmp_path),
        ],
        cwd=REPO,
        env=launch_env(),
        capture_output=True,
        text=True,
        timeout=TIMEOUT_S,
    )
    assert proc.returncode != 0
    assert "error: parallel.tensor: 3 must divide model.n_heads=4 and n_kv_heads=4" in proc.stderr
