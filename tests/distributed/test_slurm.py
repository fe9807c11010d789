"""examples/slurm/pretrain.sbatch on a real single-node Slurm cluster, stood up by the project's own script.

The first job trains 4 of the 6 steps and checkpoints; the second submission of the same script resumes
automatically (train.resume="auto") and finishes. Both must complete, and the metrics must equal the
in-process reference bit for bit (resume on the same layout is exact).
"""

from __future__ import annotations

import os
import re
import subprocess
import time

import pytest

from tests.distributed.launch_helpers import (
    CONFIG,
    REPO,
    assert_checkpoint,
    free_port,
    launch_env,
    read_losses,
    require,
    run_cli,
)

SETUP = REPO / "examples" / "slurm" / "setup_local_cluster.sh"
SBATCH = REPO / "examples" / "slurm" / "pretrain.sbatch"
JOB_TIMEOUT_S = 300


@pytest.fixture(scope="module")
def slurm_env(tmp_path_factory):
    require("sbatch", "scontrol", "slurmctld", "slurmd", "munged")
    if os.geteuid() != 0:
        pytest.skip("standing up slurmctld/slurmd/munged needs root")
    state = tmp_path_factory.mktemp("slurm")
    env = launch_env(
        TRIDENT_SLURM_DIR=str(state),
        TRIDENT_SLURMCTLD_PORT=str(free_port()),
        TRIDENT_SLURMD_PORT=str(free_port()),
        SLURM_CONF=str(state / "slurm.conf"),
    )
    try:
        run_cli(["bash", str(SETUP), "start"], timeout_s=90, env=env)
        yield env
    finally:
        subprocess.run(["bash", str(SETUP), "stop"], env=env, timeout=60, capture_output=True)


def _job_state(job_id: str, env) -> str:
    """JobState, with the scheduler's reason when it is not simply None (e.g. PENDING (Resources))."""
    out = subprocess.run(
        ["scontrol", "show", "job", "-o", job_id], env=env, capture_output=True, text=True, timeout=30
    ).stdout
    state, reason = re.search(r"JobState=(\S+)", out), re.search(r"Reason=(\S+)", out)
    if state is None:
        return "UNKNOWN"
    why = reason.group(1) if reason else "None"
    return state.group(1) if why == "None" else f"{state.group(1)} ({why})"


def _submit_and_wait(env, run_dir, log, extra_args: str) -> str:
    job_env = {
        **env,
        "CONFIG": str(CONFIG),
        "EXTRA_ARGS": f"--set train.log_dir={run_dir} --set train.save_dir={run_dir / 'ckpt'} {extra_args}",
    }
    out = run_cli(
        ["sbatch", "--parsable", "--nodes=1", "--ntasks-per-node=2", f"--output={log}", str(SBATCH)],
        timeout_s=30,
        env=job_env,
    )
    job_id = out.strip().split(";")[0]
    deadline = time.monotonic() + JOB_TIMEOUT_S
    state = _job_state(job_id, env)
    active = ("PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "UNKNOWN")
    start_by = time.monotonic() + 60  # a job that cannot start (e.g. too few CPUs) must not eat the timeout
    while state.startswith(active) and time.monotonic() < deadline:
        if state.startswith("PENDING") and time.monotonic() > start_by:
            break
        time.sleep(1)
        state = _job_state(job_id, env)
    if state.startswith(active):
        subprocess.run(["scancel", job_id], env=env, timeout=30)
    text = log.read_text() if log.exists() else "(no job output)"
    assert state == "COMPLETED", f"job {job_id} ended {state}:\n{text[-4000:]}"
    return text


def test_sbatch_script_trains_and_resumes(slurm_env, tmp_path, reference_losses):
    run_dir = tmp_path / "run"
    first = _submit_and_wait(slurm_env, run_dir, tmp_path / "job1.out", "--set train.max_steps=4")
    assert "2 tasks on 1 node(s)" in first
    assert_checkpoint(run_dir, step=4)
    second = _submit_and_wait(slurm_env, run_dir, tmp_path / "job2.out", "")
    assert "resumed from" in second and "at step 4" in second
    assert_checkpoint(run_dir, step=6)
    assert read_losses(run_dir) == reference_losses
