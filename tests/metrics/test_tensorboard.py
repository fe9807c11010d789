"""DeepSpeed's tensorboard section: rank 0 writes the step scalars to output_path/job_name."""

from __future__ import annotations

from tests.helpers import make_config, make_trainer


def test_output_path_and_job_name(tmp_path):
    cfg = make_config(tmp_path, tensorboard={"enabled": True, "output_path": str(tmp_path / "tb"), "job_name": "job"})
    make_trainer(cfg).fit()
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = list((tmp_path / "tb" / "job").glob("events.out.tfevents.*"))
    assert len(events) == 1
    acc = EventAccumulator(str(events[0]))
    acc.Reload()
    loss_tag = next(t for t in acc.Tags()["scalars"] if t.endswith("loss"))
    assert [e.step for e in acc.Scalars(loss_tag)] == [1, 2, 3, 4, 5, 6]
