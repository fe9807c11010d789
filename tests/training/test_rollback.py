"""Automatic rollback (engine/training/rollback.py) on loss spikes, NaNs and fp16 scale collapse."""

import json

import pytest

from engine.errors import ConfigError, TridentError
from tests.helpers import make_config, make_trainer


def test_rollback_needs_checkpoints(tmp_path):
    with pytest.raises(ConfigError, match="resilience.rollback.enabled: needs train.save_dir"):
        make_trainer(make_config(tmp_path, resilience={"rollback": {"enabled": True}}))


@pytest.mark.parametrize("kind", ["spike", "nan"])
def test_spike_and_nan_roll_back_lower_lr_and_skip_batches(tmp_path, kind):
    cfg = make_config(
        tmp_path,
        train={
            "max_steps": 10,
            "log_interval": 1,
            "progress": False,
            "save_interval": 2,
            "save_dir": str(tmp_path / "ckpt"),
        },
        resilience={
            "rollback": {"enabled": True, "spike_factor": 3.0, "spike_window": 4, "spike_patience": 2, "lr_factor": 0.5}
        },
    )
    trainer = make_trainer(cfg)
    forward = trainer.model.forward
    bad_steps = {6, 7} if kind == "spike" else {6}

    def injected(ids, targets):
        loss = forward(ids, targets)
        if trainer.step + 1 in bad_steps and not trainer.guard.interventions:
            return loss * (50.0 if kind == "spike" else float("nan"))
        return loss

    trainer.model.forward = injected
    trainer.fit()
    last_bad = max(bad_steps)
    events = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    rollbacks = [e for e in events if e.get("event") == "rollback"]
    assert len(rollbacks) == 1
    ev = rollbacks[0]
    assert ev["restored"].endswith("step_00000004")  # newest checkpoint before the first bad step (6)
    assert ev["skipped_samples"] == [4 * 8, last_bad * 8] and ev["lr_scale"] == 0.5
    assert trainer.step == 10
    assert trainer.loader.consumed_samples == (last_bad + 6) * 8  # the bad window's batches are skipped
    after = [e for e in events if "loss" in e and e["step"] > 4][-6:]
    assert all(e["lr"] <= 0.5 * 3e-3 for e in after)
    resumed = make_trainer(
        make_config(
            tmp_path,
            **{
                **{
                    "train": {
                        "max_steps": 12,
                        "log_interval": 1,
                        "progress": False,
                        "save_interval": 2,
                        "save_dir": str(tmp_path / "ckpt"),
                    }
                },
                "resilience": {"rollback": {"enabled": True}},
            },
        ),
        resume=True,
    )
    assert resumed.guard.lr_scale == 0.5 and len(resumed.guard.interventions) == 1  # kept in checkpoints


def test_max_rollbacks_gives_up_with_an_error(tmp_path):
    cfg = make_config(
        tmp_path,
        train={
            "max_steps": 10,
            "log_interval": 1,
            "progress": False,
            "save_interval": 2,
            "save_dir": str(tmp_path / "ckpt"),
        },
        resilience={"rollback": {"enabled": True, "max_rollbacks": 1}},
    )
    trainer = make_trainer(cfg)
    forward = trainer.model.forward
    trainer.model.forward = lambda ids, targets: (
        forward(ids, targets) * (float("nan") if trainer.step + 1 >= 6 else 1.0)
    )  # every step from 6 on, also after the rollback
    with pytest.raises(
        TridentError,
        match=r"resilience.rollback: non-finite loss at step 6; giving up after 1 "
        r"rollbacks \(hint: inspect the data",
    ):
        trainer.fit()
    assert len(trainer.guard.interventions) == 1
