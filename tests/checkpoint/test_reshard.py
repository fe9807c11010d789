"""Reshard on load: a checkpoint saved at one (dp, tp, pp, virtual stages, ZeRO stage) resumes in another
layout with no offline step. Per move:

* the gathered model (export's gatherer) and the optimizer's logical state (fp32 masters, both Adam moments)
  re-saved right after the load are bit-equal to the source checkpoint's, and so are the step, the applied
  optimizer steps (the LR position), the loss scaler and the loader position;
* the data continues exactly once: the loader resumes at consumed_samples = step x global batch, and
* the per-step fp32 losses afterwards equal the source layout's own continuation within 1e-5 relative.

Layouts (4 ranks each, plus the single device in this process), every move crossing at least two axes:
single -> tp2 x pp2, dp4/ZeRO1 -> tp2 x dp2/ZeRO3, tp2 x dp2/ZeRO3 -> pp2 (v2) x dp2/ZeRO2,
pp2 x dp2/ZeRO2 -> dp4/ZeRO1, tp2 x pp2 -> single; and the committed format-1 fixture (single device, plain
data parallelism) -> tp2 x pp2 x ... with ZeRO 3. A checkpoint of another model is refused naming the tensor.
"""

import json
import pathlib
import shutil

import pytest
import torch

from tests.helpers import BASE, make_config, make_trainer
from tests.multiproc import run_ranks

SAVE_AT, STEPS = 3, 6
FIXTURE = pathlib.Path(__file__).parents[1] / "fixtures" / "ckpt_v1"
LAYOUTS = {  # name: (tp, pp, virtual_stages, zero stage)
    "single": (1, 1, 1, 0),
    "dp4_z1": (1, 1, 1, 1),
    "tp2_dp2_z3": (2, 1, 1, 3),
    "pp2v2_dp2_z2": (1, 2, 2, 2),
    "tp2_pp2": (2, 2, 1, 0),
    "fix_tp2_dp2_z3": (2, 1, 1, 3),
}
# (source run, destination layout) in the order the 4-rank worker runs them; a move saves under
# "<source>-<destination>", so moves chain
MOVES = [
    ("dp4_z1", "tp2_dp2_z3"),
    ("dp4_z1-tp2_dp2_z3", "pp2v2_dp2_z2"),
    ("dp4_z1-tp2_dp2_z3-pp2v2_dp2_z2", "dp4_z1"),
    ("single", "tp2_pp2"),
]


def layout_config(tmp: pathlib.Path, name: str, *, fixture: bool = False, steps: int = STEPS, src: str = ""):
    """Layout ``name``'s config, saving under tmp/<name> (a straight run) or tmp/<src>-<name> (a move)."""
    tp, pp, virtual, stage = LAYOUTS[name]
    name = f"{src}-{name}" if src else name
    parallel = {
        "tensor": tp,
        "pipeline": pp,
        "virtual_stages": virtual,
        "pipeline_schedule": "interleaved" if virtual > 1 else "1f1b",
    }
    zero = {"stage": stage, "reduce_bucket_size": 3000, "stage3_param_persistence_threshold": 0}
    train = {"max_steps": steps, "save_dir": str(tmp / name / "ckpt"), "save_interval": SAVE_AT, "keep_last": 5}
    if fixture:
        raw = json.loads((FIXTURE / "losses.json").read_text())["config"]
        sections = {k: v for k, v in raw.items() if k not in ("train",)}
        return make_config(
            tmp / name, **sections, parallel=parallel, zero_optimization=zero, train={**raw["train"], **train}
        )
    return make_config(
        tmp / name, parallel=parallel, zero_optimization=zero, model={**BASE["model"], "n_layers": 4}, train=train
    )


def straight(cfg, make):
    """Run to the end, saving at SAVE_AT; the per-step losses."""
    t = make(cfg)
    t.fit()
    return [r["loss"] for r in t.history]


def move(cfg, make, src: pathlib.Path):
    """Load ``src`` (another layout), re-save at once (the states as loaded), continue to the end."""
    t = make(cfg)
    t.load(str(src))
    consumed = t.loader.consumed_samples
    t.save()
    t.fit()
    return {
        "losses": [r["loss"] for r in t.history],
        "consumed_at_load": consumed,
        "consumed_at_end": t.loader.consumed_samples,
    }


def _worker(rank, world, args):
    from engine.log import RankLogger
    from engine.training.process import build_context
    from engine.training.trainer import Trainer

    def make(cfg):
        ctx, sync = build_context(cfg, rank=rank, world_size=world)
        return Trainer(cfg, ctx, log=RankLogger(rank, world), grad_sync=sync)

    tmp = pathlib.Path(args["tmp"])
    out = {"dp4_z1": straight(layout_config(tmp, "dp4_z1"), make)}
    for src, dst in [*MOVES, ("fixture", "fix_tp2_dp2_z3")]:
        cfg = layout_config(tmp, dst, src=src, fixture=src == "fixture")
        out[f"{src}-{dst}"] = move(cfg, make, tmp / src / "ckpt" / f"step_{SAVE_AT:08d}")
    return out


def _same_states(a: pathlib.Path, b: pathlib.Path) -> None:
    """Bit-equal gathered model, logical optimizer state and layout-independent scalars of two checkpoints."""
    from engine.checkpoint.gather import gather_full_state
    from engine.checkpoint.reshard import read_logical_state

    (la, _, sa), (lb, _, sb) = read_logical_state(str(a)), read_logical_state(str(b))
    assert sorted(la) == sorted(lb)
    for name in la:
        for key in la[name]:
            assert torch.equal(la[name][key], lb[name][key]), (a, b, name, key)
    ma, mb = gather_full_state(str(a))[0], gather_full_state(str(b))[0]
    assert sorted(ma) == sorted(mb) and all(torch.equal(ma[k], mb[k]) for k in ma), (a, b)
    for key in ("step", "skipped", "scaler", "loader", "resilience"):
        assert sa[key] == sb[key], (a, b, key)
    assert sa["optimizer"]["applied_steps"] == sb["optimizer"]["applied_steps"] == SAVE_AT


def _close(got, want, what):
    assert len(got) == len(want) and all(abs(x - y) <= 1e-5 * abs(y) for x, y in zip(got, want)), (what, got, want)


def test_reshard_on_load_across_layouts(tmp_path):
    fixture = json.loads((FIXTURE / "losses.json").read_text())
    shutil.copytree(FIXTURE / "ckpt", tmp_path / "fixture" / "ckpt")
    single = straight(layout_config(tmp_path, "single"), make_trainer)  # the single-device source and reference
    results = run_ranks(_worker, 4, args={"tmp": str(tmp_path)}, timeout_s=900)
    # back to one device from a 4-rank layout, in this process
    back = move(
        layout_config(tmp_path, "single", src="single-tp2_pp2"),
        make_trainer,
        tmp_path / "single-tp2_pp2" / "ckpt" / f"step_{SAVE_AT:08d}",
    )
    for res in results:
        res["single"], res["single-tp2_pp2-single"] = single, back
        _close(res["dp4_z1"], single, "dp4_z1 straight vs single device")
        for src, dst in [*MOVES, ("single-tp2_pp2", "single")]:
            got, source = res[f"{src}-{dst}"], res[src]
            # the source layout's own continuation (a straight run's steps after SAVE_AT, or a move's steps)
            _close(got["losses"], source[SAVE_AT:] if isinstance(source, list) else source["losses"], (src, dst))
            _close(got["losses"], single[SAVE_AT:], (src, dst, "vs single device"))
            assert (got["consumed_at_load"], got["consumed_at_end"]) == (SAVE_AT * 8, STEPS * 8)
        _close(res["fixture-fix_tp2_dp2_z3"]["losses"], fixture["losses"][SAVE_AT:], "v1 fixture -> tp2 dp2 z3")
    # the states as loaded, re-saved by the destination, equal the source's bit for bit
    step = f"step_{SAVE_AT:08d}"
    for src, dst in [*MOVES, ("single-tp2_pp2", "single"), ("fixture", "fix_tp2_dp2_z3")]:
        _same_states(tmp_path / src / "ckpt" / step, tmp_path / f"{src}-{dst}" / "ckpt" / step)


def test_checkpoint_of_another_model_is_refused(tmp_path):
    from engine.errors import CheckpointError

    src = FIXTURE / "ckpt" / f"step_{SAVE_AT:08d}"
    raw = json.loads((FIXTURE / "losses.json").read_text())["config"]
    wider = make_config(
        tmp_path / "w",
        **{**raw, "model": {**raw["model"], "d_model": 32}, "train": raw["train"], "zero_optimization": {"stage": 1}},
    )
    with pytest.raises(
        CheckpointError,
        match=r"tensor layers\.0\.attn\.qkv\.weight has shape \(48, 16\) in the "
        r"checkpoint, \(96, 32\) in this model",
    ):
        make_trainer(wider).load(str(src))
    deeper = make_config(
        tmp_path / "d",
        **{**raw, "model": {**raw["model"], "n_layers": 3}, "train": raw["train"], "zero_optimization": {"stage": 1}},
    )
    with pytest.raises(CheckpointError, match=r"does not fit this model \(missing layers\.2\."):
        make_trainer(deeper).load(str(src))
