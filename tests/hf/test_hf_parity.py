"""Hugging Face interop: a transformers model imported with train.init_from_hf gives the same logits in
Trident, and after training, ``engine.export`` writes a model whose transformers logits equal Trident's
(fp32 max abs difference <= 1e-4), for GPT-2 (learned positions, Conv1D, gelu_new) and Llama (GQA, RoPE
half-split vs interleaved, untied head), on one device and with tp=2 (vocabulary padding dropped)."""

from __future__ import annotations

import pathlib
import subprocess
import sys

import pytest
import torch

pytest.importorskip("transformers", reason="pip install transformers safetensors")
pytest.importorskip("safetensors", reason="pip install transformers safetensors")

from engine.config import parse_config  # noqa: E402
from engine.errors import ConfigError  # noqa: E402
from engine.hf.export import export  # noqa: E402
from tests.helpers import make_trainer  # noqa: E402
from tests.hf.hf_helpers import (  # noqa: E402
    GPT2_MODEL,
    LLAMA_MODEL,
    hf_logits,
    raw_config,
    save_random_hf,
    tokens,
    trident_logits,
)
from tests.multiproc import run_ranks  # noqa: E402

TOL = 1e-4


def max_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    assert a.shape == b.shape, (a.shape, b.shape)
    return float((a - b).abs().max())


@pytest.mark.parametrize("model", [GPT2_MODEL, LLAMA_MODEL], ids=["gpt2", "llama"])
def test_import_train_export_matches_transformers(tmp_path, model):
    save_random_hf(str(tmp_path / "hf"), model)
    ids = tokens(model["vocab_size"])
    cfg = parse_config(raw_config(tmp_path, model, init_from_hf=str(tmp_path / "hf")))
    trainer = make_trainer(cfg)
    imported = trident_logits(trainer.model, ids)
    assert max_diff(imported, hf_logits(str(tmp_path / "hf"), ids)) <= TOL
    trainer.fit()
    trained = trident_logits(trainer.model, ids)
    assert max_diff(trained, imported) > 1e-3  # training moved the weights: the export must carry them
    export(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    assert max_diff(hf_logits(str(tmp_path / "out"), ids), trained) <= TOL
    files = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"model.safetensors", "config.json", "trident_config.json"} <= files


def _tp2_worker(rank, world, args):
    from engine.config import parse_config
    from engine.log import RankLogger
    from engine.training.process import build_context
    from engine.training.trainer import Trainer

    cfg = parse_config(args["raw"])
    ctx, sync = build_context(cfg, rank=rank, world_size=world)
    trainer = Trainer(cfg, ctx, log=RankLogger(rank, world), grad_sync=sync)
    imported = trident_logits(trainer.model, args["ids"], tp_group=ctx.groups.tp)
    trainer.fit()
    trained = trident_logits(trainer.model, args["ids"], tp_group=ctx.groups.tp)
    return {"imported": imported, "trained": trained}


def test_tensor_parallel_import_and_export(tmp_path):
    """tp=2 shards the imported weights (vocab 97 padded to 98) and the export gathers them back."""
    save_random_hf(str(tmp_path / "hf"), LLAMA_MODEL)
    ids = tokens(LLAMA_MODEL["vocab_size"])
    raw = raw_config(tmp_path, LLAMA_MODEL, init_from_hf=str(tmp_path / "hf"))
    raw["parallel"] = {"tensor": 2}
    results = run_ranks(_tp2_worker, 2, args={"raw": raw, "ids": ids}, timeout_s=300)
    assert max_diff(results[0]["imported"], hf_logits(str(tmp_path / "hf"), ids)) <= TOL
    export(str(tmp_path / "ckpt"), str(tmp_path / "out"))
    assert max_diff(hf_logits(str(tmp_path / "out"), ids), results[0]["trained"]) <= TOL


def test_export_writes_a_tokenizer_transformers_can_use(tmp_path):
    from transformers import AutoTokenizer

    from engine.data.tokenizer import Tokenizer

    text = "def add(a, b):\n    return a + b\n"
    tok = Tokenizer.train(
        [text * 20, "print('hello world')\n" * 20], model_prefix=str(tmp_path / "tok"), vocab_size=320
    )  # byte fallback needs the 256 byte pieces
    cfg = parse_config(raw_config(tmp_path, {**GPT2_MODEL, "vocab_size": 320}, max_steps=1))
    make_trainer(cfg).fit()
    export(str(tmp_path / "ckpt"), str(tmp_path / "out"), tokenizer=str(tmp_path / "tok.model"))
    hf_tok = AutoTokenizer.from_pretrained(str(tmp_path / "out"))
    sample = "def add(x, y):\n    return x + y\n"
    assert hf_tok(sample, add_special_tokens=False)["input_ids"] == tok.encode(sample)


def test_refusals_name_the_key(tmp_path):
    save_random_hf(str(tmp_path / "hf"), GPT2_MODEL)
    bad = raw_config(tmp_path, {**GPT2_MODEL, "n_layers": 3}, init_from_hf=str(tmp_path / "hf"))
    with pytest.raises(ConfigError, match=r"^model\.n_layers: 3 but the Hugging Face checkpoint .* has 2"):
        make_trainer(parse_config(bad))
    rope = parse_config(raw_config(tmp_path, {**GPT2_MODEL, "position": "rope"}, max_steps=1))
    make_trainer(rope).fit()
    with pytest.raises(ConfigError, match="^model.position: GPT2LMHeadModel needs learned positions"):
        export(str(tmp_path / "ckpt"), str(tmp_path / "out"))


def test_export_cli_user_error_exits_2(tmp_path):
    repo = pathlib.Path(__file__).resolve().parents[2]
    proc = subprocess.run(
        [sys.executable, "-m", "engine.export", "--checkpoint", str(tmp_path / "nope"), "--out", str(tmp_path / "out")],
        cwd=repo,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines()[-1].startswith(f"error: {tmp_path / 'nope'}: not a checkpoint")


def test_train_cli_init_from_hf_flag(tmp_path):
    """``python -m engine.train --init-from-hf DIR`` starts from the transformers weights: its first loss
    equals an in-process run configured with train.init_from_hf."""
    import json

    save_random_hf(str(tmp_path / "hf"), GPT2_MODEL)
    raw = raw_config(tmp_path, GPT2_MODEL, max_steps=1, save_dir=None)
    (tmp_path / "c.json").write_text(json.dumps(raw))
    repo = pathlib.Path(__file__).resolve().parents[2]
    subprocess.run(
        [
            sys.executable,
            "-m",
            "engine.train",
            "--config",
            str(tmp_path / "c.json"),
            "--init-from-hf",
            str(tmp_path / "hf"),
        ],
        cwd=repo,
        check=True,
        capture_output=True,
        timeout=300,
    )
    first = json.loads((tmp_path / "run" / "metrics.jsonl").read_text().splitlines()[0])["loss"]
    expected = make_trainer(
        parse_config(
            {**raw, "train": {**raw["train"], "init_from_hf": str(tmp_path / "hf"), "log_dir": str(tmp_path / "run2")}}
        )
    ).train_step()
    assert first == expected["loss"]
