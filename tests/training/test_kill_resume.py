"""Kill anywhere, resume bit-exact: SIGKILL one rank of a torchrun job at a random (seeded) moment;
torchrun restarts the group (--max-restarts), the ranks resume from the latest complete checkpoint
(train.resume = "auto"), and every step's loss and grad norm, and the final weights, are identical to an
uninterrupted run of the same layout."""

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time

import psutil
import pytest
import torch

from tests.helpers import BASE

STEPS = 12
LAYOUTS = {  # config sections per layout, 2 processes each
    "dp2": {"parallel": {"tensor": 1}},
    "tp2": {"parallel": {"tensor": 2, "sequence_parallel": True}},
    "pp2": {"parallel": {"pipeline": 2, "pipeline_schedule": "1f1b"}},
    "dp2-zero2": {"parallel": {"tensor": 1}, "zero_optimization": {"stage": 2}},
    # background shard writes: a kill before the commit leaves the previous checkpoint as latest
    "dp2-async": {"parallel": {"tensor": 1}, "train": {"async_save": True}},
}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _config(tmp, name, layout) -> str:
    raw = json.loads(json.dumps(BASE))
    raw.update(json.loads(json.dumps(LAYOUTS[layout])))
    raw["train"] = {
        "max_steps": STEPS,
        "log_interval": 1,
        "progress": False,
        "device": "cpu",
        "log_dir": str(tmp / name / "logs"),
        "save_dir": str(tmp / name / "ckpt"),
        "save_interval": 1,
        "keep_last": 2,
        "resume": "auto",
        **LAYOUTS[layout].get("train", {}),
    }
    raw["resilience"] = {"collective_timeout_s": 30}
    path = tmp / f"{name}.json"
    path.write_text(json.dumps(raw))
    return str(path)


def _launch(config: str, restarts: int) -> subprocess.Popen:
    cmd = [
        sys.executable,
        "-m",
        "torch.distributed.run",
        "--nproc-per-node",
        "2",
        "--max-restarts",
        str(restarts),
        "--rdzv-backend",
        "c10d",
        "--rdzv-endpoint",
        f"127.0.0.1:{_free_port()}",
        "-m",
        "engine.train",
        "--config",
        config,
    ]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1"}
    return subprocess.Popen(
        cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, start_new_session=True
    )


def _steps_done(metrics: str) -> int:
    try:
        with open(metrics, encoding="utf-8") as fh:
            return sum(1 for line in fh if '"loss"' in line)
    except FileNotFoundError:
        return 0


def _finish(proc: subprocess.Popen, timeout: float) -> str:
    try:
        out, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        out, _ = proc.communicate()
        pytest.fail(f"job did not finish in {timeout} s:\n{out[-3000:]}")
    assert proc.returncode == 0, out[-3000:]
    return out


def _per_step(metrics: str) -> dict[int, tuple[float, float]]:
    last = {}
    with open(metrics, encoding="utf-8") as fh:
        for line in fh:
            rec = json.loads(line)
            if "loss" in rec:
                last[rec["step"]] = (rec["loss"], rec["grad_norm"])  # after a restart the repeat wins
    return last


def _final_weights(ckpt: str) -> list[dict]:
    final = os.path.join(ckpt, f"step_{STEPS:08d}")
    return [torch.load(os.path.join(final, f"rank_{r:05d}.pt"), weights_only=False)["model"] for r in range(2)]


@pytest.mark.parametrize("layout", list(LAYOUTS))
def test_sigkill_anywhere_resumes_bit_exact(tmp_path, layout):
    ref_cfg = _config(tmp_path, "ref", layout)
    _finish(_launch(ref_cfg, restarts=0), timeout=300)
    ref = _per_step(str(tmp_path / "ref" / "logs" / "metrics.jsonl"))
    assert sorted(ref) == list(range(1, STEPS + 1))
    rng = random.Random(f"kill-{layout}")
    for trial in range(2):
        name = f"kill{trial}"
        cfg = _config(tmp_path, name, layout)
        metrics = str(tmp_path / name / "logs" / "metrics.jsonl")
        # Steps take tens of milliseconds on a quiet machine: kill in the first half of the run, a few
        # milliseconds into a step (forward, backward, optimizer step or a save), so the job is still running.
        kill_after = rng.randint(2, STEPS // 2)  # steps logged before the kill
        extra = rng.uniform(0.0, 0.03)
        victim = rng.randint(0, 1)
        proc = _launch(cfg, restarts=1)
        deadline = time.monotonic() + 240
        while _steps_done(metrics) < kill_after:
            assert proc.poll() is None and time.monotonic() < deadline, "job ended before the kill point"
            time.sleep(0.005)
        workers = sorted(psutil.Process(proc.pid).children(recursive=True), key=lambda p: p.create_time())
        workers = [p for p in workers if "engine.train" in " ".join(p.cmdline())]
        assert len(workers) == 2, f"expected 2 running ranks at the kill point, found {len(workers)}"
        time.sleep(extra)
        try:
            os.kill(workers[victim].pid, signal.SIGKILL)
        except ProcessLookupError:
            pytest.fail(f"rank {victim} had already exited {extra:.3f} s after step {kill_after}")
        _finish(proc, timeout=300)
        got = _per_step(metrics)
        assert got == ref, f"{layout} kill after step {kill_after} (+{extra:.2f} s) of rank {victim}"
        for a, b in zip(_final_weights(str(tmp_path / name / "ckpt")), _final_weights(str(tmp_path / "ref" / "ckpt"))):
            assert all(torch.equal(a[k], b[k]) for k in a)
