"""The dynamic loss scaler against DeepSpeed's rules, as tables of overflow sequences."""

import pytest

from engine.config import FP16Config
from engine.errors import LossScaleCollapseError
from engine.optim.loss_scaler import DynamicLossScaler, StaticLossScaler, build_loss_scaler


def run(seq: str, **kw) -> list[tuple[float, int]]:
    s = DynamicLossScaler(**kw)
    out = []
    for ch in seq:
        s.update(ch == "x")
        out.append((s.scale, s.hysteresis))
    return out


@pytest.mark.parametrize(
    "seq, kw, expected",
    [
        # hysteresis 2: the first overflow only spends hysteresis, the second halves the scale.
        ("xx", dict(initial_scale_power=4, hysteresis=2), [(16, 1), (8, 1)]),
        # hysteresis stays spent until the scale grows again (DeepSpeed does not refill it on clean steps).
        ("x.x", dict(initial_scale_power=4, hysteresis=2, scale_window=100), [(16, 1), (16, 1), (8, 1)]),
        # growth once scale_window clean steps follow the step after the last overflow; refills hysteresis.
        (
            "x....",
            dict(initial_scale_power=4, hysteresis=2, scale_window=3),
            [(16, 1), (16, 1), (16, 1), (16, 1), (32, 2)],
        ),
        ("....", dict(initial_scale_power=1, scale_window=2), [(2, 2), (2, 2), (4, 2), (4, 2)]),
        # consecutive_hysteresis refills after every clean step: isolated overflows never halve the scale.
        (
            "x.x.x",
            dict(initial_scale_power=4, hysteresis=2, consecutive_hysteresis=True, scale_window=100),
            [(16, 1), (16, 2), (16, 1), (16, 2), (16, 1)],
        ),
        # hysteresis 1: every overflow halves, floored at min_scale.
        ("xx", dict(initial_scale_power=3, hysteresis=1, min_scale=2.0), [(4, 1), (2, 1)]),
        ("xx", dict(initial_scale_power=2, hysteresis=1, min_scale=3.0), [(3, 1), (3, 1)][:1]),
    ],
)
def test_scale_sequences(seq, kw, expected):
    assert run(seq[: len(expected)], **kw) == expected


@pytest.mark.parametrize("seed", range(4))
def test_matches_deepspeed_on_random_sequences(seed):
    ds = pytest.importorskip("deepspeed.runtime.fp16.loss_scaler")
    import random

    rng = random.Random(seed)
    ds.dist.get_rank = lambda *a, **k: 0  # DeepSpeed only logs with it
    window, hyst, consecutive = rng.choice([1, 2, 5]), rng.choice([1, 2, 3]), rng.random() < 0.5
    ref = ds.DynamicLossScaler(
        init_scale=2.0**20, scale_window=window, min_scale=1, delayed_shift=hyst, consecutive_hysteresis=consecutive
    )
    ours = DynamicLossScaler(
        initial_scale_power=20, scale_window=window, hysteresis=hyst, consecutive_hysteresis=consecutive, min_scale=1.0
    )
    for _ in range(300):
        overflow = rng.random() < 0.3
        ref.update_scale(overflow)
        ours.update(overflow)
        assert (ours.scale, ours.hysteresis) == (ref.cur_scale, ref.cur_hysteresis)


def test_halving_floors_then_collapse_is_a_named_error():
    s = DynamicLossScaler(initial_scale_power=2, hysteresis=1, min_scale=1.0)
    s.update(True)
    s.update(True)
    assert s.scale == 1.0
    with pytest.raises(LossScaleCollapseError, match=r"fp16 loss scale is at its floor \(fp16.min_loss_scale=1\)"):
        s.update(True)


def test_state_dict_round_trip():
    a = DynamicLossScaler(initial_scale_power=5, hysteresis=3, scale_window=2)
    for ov in (True, False, False, True, False):
        a.update(ov)
    b = DynamicLossScaler(initial_scale_power=1, hysteresis=3, scale_window=2)
    b.load_state_dict(a.state_dict())
    for ov in (False, False, True, False, False, False):
        a.update(ov)
        b.update(ov)
        assert (a.scale, a.hysteresis) == (b.scale, b.hysteresis)


def test_build_from_config():
    assert isinstance(build_loss_scaler(FP16Config(enabled=False)), StaticLossScaler)
    assert build_loss_scaler(FP16Config(enabled=True, loss_scale=128.0)).scale == 128.0
    dyn = build_loss_scaler(FP16Config(enabled=True))
    assert dyn.dynamic and dyn.scale == 2.0**16 and dyn.hysteresis == 2
