"""Loss-spike / NaN detection and automatic rollback."""

import json

import pytest

from engine.config.sections import RollbackConfig
from engine.errors import ConfigError
from engine.resilience.anomaly import AnomalyDetector
from tests.core.helpers import make_config, make_trainer


def feed(det, losses, **kw):
    for step, loss in enumerate(losses, 1):
        trig = det.observe(step=step, loss=loss, grad_norm=kw.get("grad_norm", 1.0), skipped=kw.get("skipped", False),
                           scale_at_floor=kw.get("at_floor", False))
        if trig:
            return trig
    return None


def test_detector_rules():
    spike = RollbackConfig(enabled=True, spike_factor=2.0, spike_window=5, spike_patience=2)
    assert feed(AnomalyDetector(spike, overflow_is_normal=False), [3.0] * 6 + [7.0, 3.0, 3.0]) is None
    trig = feed(AnomalyDetector(spike, overflow_is_normal=False), [3.0] * 6 + [7.0, 8.0])
    assert trig.first_bad_step == 7 and trig.reason.startswith("loss 8 > 2 x moving average 3 for 2 step(s)")
    trig = feed(AnomalyDetector(spike, overflow_is_normal=False), [3.0, float("nan")])
    assert (trig.reason, trig.first_bad_step) == ("non-finite loss at step 2", 2)
    # fp16 overflow steps (non-finite grad norm) are normal with dynamic scaling, a NaN without it
    assert feed(AnomalyDetector(spike, overflow_is_normal=True), [3.0] * 3, grad_norm=float("inf")) is None
    assert feed(AnomalyDetector(spike, overflow_is_normal=False), [3.0], grad_norm=float("inf")).reason == \
        "non-finite gradient norm at step 1"
    floor = RollbackConfig(enabled=True, scale_floor_steps=3)
    trig = feed(AnomalyDetector(floor, overflow_is_normal=True), [3.0] * 4, skipped=True, at_floor=True)
    assert trig.first_bad_step == 1 and "loss scale at its floor with overflows for 3 steps" in trig.reason


def test_rollback_needs_checkpoints(tmp_path):
    with pytest.raises(ConfigError, match="resilience.rollback.enabled: needs train.save_dir"):
        make_trainer(make_config(tmp_path, resilience={"rollback": {"enabled": True}}))


@pytest.mark.parametrize("kind", ["spike", "nan"])
def test_spike_and_nan_roll_back_lower_lr_and_skip_batches(tmp_path, kind):
    cfg = make_config(tmp_path, train={"max_steps": 10, "log_interval": 1, "progress": False, "save_interval": 2,
                                       "save_dir": str(tmp_path / "ckpt")},
                      resilience={"rollback": {"enabled": True, "spike_factor": 3.0, "spike_window": 4,
                                               "spike_patience": 2, "lr_factor": 0.5}})
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
    resumed = make_trainer(make_config(tmp_path, **{**{"train": {"max_steps": 12, "log_interval": 1,
                                                                 "progress": False, "save_interval": 2,
                                                                 "save_dir": str(tmp_path / "ckpt")}},
                                                   "resilience": {"rollback": {"enabled": True}}}), resume=True)
    assert resumed.guard.lr_scale == 0.5 and len(resumed.guard.interventions) == 1  # kept in checkpoints
