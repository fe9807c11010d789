"""The anomaly detector's rules (engine/resilience/anomaly.py): loss spikes against the moving average,
non-finite losses and gradient norms, and an fp16 loss scale stuck at its floor."""

from engine.config.sections import RollbackConfig
from engine.resilience.anomaly import AnomalyDetector


def feed(det, losses, **kw):
    for step, loss in enumerate(losses, 1):
        trig = det.observe(
            step=step,
            loss=loss,
            grad_norm=kw.get("grad_norm", 1.0),
            skipped=kw.get("skipped", False),
            scale_at_floor=kw.get("at_floor", False),
        )
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
    assert (
        feed(AnomalyDetector(spike, overflow_is_normal=False), [3.0], grad_norm=float("inf")).reason
        == "non-finite gradient norm at step 1"
    )
    floor = RollbackConfig(enabled=True, scale_floor_steps=3)
    trig = feed(AnomalyDetector(floor, overflow_is_normal=True), [3.0] * 4, skipped=True, at_floor=True)
    assert trig.first_bad_step == 1 and "loss scale at its floor with overflows for 3 steps" in trig.reason


def test_on_nan_false_ignores_non_finite_steps():
    off = RollbackConfig(enabled=True, on_nan=False, spike_factor=2.0, spike_window=3)
    assert feed(AnomalyDetector(off, overflow_is_normal=False), [3.0, float("nan"), 3.0]) is None
    assert feed(AnomalyDetector(off, overflow_is_normal=False), [3.0, 3.0], grad_norm=float("inf")) is None
