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
# the norm kernels at the launch configurations engine/kernels/norm.py picks on an H100 (see compile_sm90.py)
NORM_NAMES = [
    "norm_fwd_1024",
    "add_norm_fwd_1024",
    "norm_fwd_4096",
    "norm_fwd_8192",
    "norm_bwd_ln_1024",
    "norm_bwd_rms_1024",
    "norm_bwd_addln_1024",
    "norm_bwd_ln_2048",
    "norm_bwd_ln_4096",
    "norm_bwd_rms_4096",
    "norm_bwd_ln_8192",
    "norm_bwd_rms_8192",
    "norm_bwd_ln_16384",
    "add_norm_fwd_16384",
    "norm_partials_sum",
]
# memory-bound kernels whose registers decide how many programs share an SM: checked for spills
SPILL_CHECKED = [*NORM_NAMES, "bias_gelu_fwd", "bias_gelu_bwd", "rope_packed", "swiglu_fwd", "swiglu_bwd"]
NAMES = [
    *SPILL_CHECKED,
    "adamw",
    "nonfinite",
    "ce_stats",
    "ce_grad",
    "attn_fwd",
    "attn_dkdv",
    "attn_dq",
    "attn_pre",
]

pytestmark = pytest.mark.skipif(
    shutil.which("ptxas", path=os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin")) is None,
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


@pytest.mark.parametrize("name", SPILL_CHECKED)
def test_memory_bound_kernel_does_not_spill(name, results):
    # a spill is a local-memory round trip inside a memory-bound loop; the backward's register cap (maxnreg)
    # is what lets its programs share an SM, so a config that needs more must change the heuristic instead
    r = results[name]
    assert r["ok"], r["error"]
    assert r["spill_stores"] == 0 and r["spill_loads"] == 0, r
    assert 0 < r["regs"] <= r.get("maxnreg", 255), r
