"""The kernels compile for an H100 (sm_90) without a GPU: Triton's interpreter accepts programs the real
compiler rejects (types of loop-carried values, constexpr use), so the CPU tests alone do not prove this.
The compiler runs in a fresh process (compile_sm90.py), since this one imported Triton interpreted.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import triton

REPO = Path(__file__).resolve().parents[2]
NAMES = [
    "norm_fwd",
    "norm_bwd",
    "norm_bwd_chunked",
    "adamw",
    "nonfinite",
    "ce_stats",
    "ce_grad",
    "attn_fwd",
    "attn_dkdv",
    "attn_dq",
]

pytestmark = pytest.mark.skipif(
    shutil.which("ptxas", path=os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin"))
    is None,
    reason="triton's bundled ptxas is missing",
)


@pytest.fixture(scope="module")
def results(tmp_path_factory) -> dict[str, dict]:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path_factory.mktemp("triton_cache"))
    env["TRITON_DEFAULT_FP_FUSION"] = "1"
    proc = subprocess.run(
        [sys.executable, str(REPO / "tests" / "kernels" / "compile_sm90.py")],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return {r["name"]: r for r in map(json.loads, proc.stdout.splitlines())}


@pytest.mark.parametrize("name", NAMES)
def test_kernel_compiles_for_sm90(name, results):
    assert results[name]["ok"], results[name]["error"]
