"""train.cuda_graphs: refused where it cannot work (CPU-testable), and on CUDA the replayed steps equal
the eager ones exactly (marked gpu)."""

from __future__ import annotations

import pytest
import torch

from engine.errors import ConfigError
from engine.log import RankLogger
from engine.training.context import RunContext
from engine.training.trainer import Trainer
from tests.helpers import make_config, make_trainer


def test_cuda_graphs_refused_on_cpu_with_the_reason(tmp_path):
    cfg = make_config(tmp_path, train={"cuda_graphs": True})
    with pytest.raises(
        ConfigError,
        match=r"train.cuda_graphs: not available with it needs a CUDA device "
        r"\(this run uses cpu\)",
    ):
        make_trainer(cfg)


def test_cuda_graphs_refusal_names_every_conflicting_setting(tmp_path):
    from engine.model.graphs import check_supported

    cfg = make_config(tmp_path, train={"cuda_graphs": True}, model={"dropout": 0.1}, zero_optimization={"stage": 3})
    with pytest.raises(ConfigError) as err:
        check_supported(cfg, torch.device("cuda"))
    msg = str(err.value)
    assert "zero_optimization.stage 3" in msg and "model.dropout > 0" in msg and "CUDA" not in msg


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cuda_graph_steps_equal_eager_steps(tmp_path, arch):
    model = {"arch": arch, "n_layers": 2, "d_model": 128, "n_heads": 4, "seq_len": 64, "vocab_size": 1000}
    runs = []
    for graphs in (False, True):
        cfg = make_config(
            tmp_path / str(graphs),
            model=model,
            bf16={"enabled": True},
            train={"cuda_graphs": graphs, "max_steps": 8, "device": "cuda"},
        )
        trainer = Trainer(cfg, RunContext.single(torch.device("cuda")), log=RankLogger(0, 1))
        trainer.fit()
        runs.append(
            (
                [r["loss"] for r in trainer.history],
                [r["grad_norm"] for r in trainer.history],
                [p.detach().float().cpu() for p in trainer.model.parameters()],
            )
        )
    (loss_e, norm_e, params_e), (loss_g, norm_g, params_g) = runs
    assert loss_g == loss_e and norm_g == norm_e
    assert all(torch.equal(a, b) for a, b in zip(params_e, params_g))
