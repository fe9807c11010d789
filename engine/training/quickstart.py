"""The whole recipe on a corpus every Python install carries (``python -m engine.quickstart``).

1. gather the Python standard library's own source files as the corpus;
2. train a SentencePiece BPE tokenizer on them and write Megatron-layout token shards;
3. train a small GPT for a few minutes (CPU, or the GPU if there is one) with a progress bar;
4. print the final loss and validation perplexity, a generated sample, and where the loss plot,
   metrics and checkpoint are.
"""

from __future__ import annotations

import glob
import json
import os
import sysconfig

from engine.errors import ConfigError


def _is_utf8(path: str) -> bool:
    try:
        with open(path, "rb") as fh:
            fh.read().decode("utf-8")
    except (OSError, UnicodeDecodeError):
        return False
    return True


def stdlib_sources(max_files: int | None) -> list[str]:
    """The standard library's .py files, minus site-packages and the few test fixtures that are
    deliberately not UTF-8 (e.g. test/encoded_modules): prepare refuses non-UTF-8 input."""
    root = sysconfig.get_paths()["stdlib"]
    files = sorted(
        f
        for f in glob.glob(os.path.join(root, "**", "*.py"), recursive=True)
        if "site-packages" not in f and os.path.getsize(f) > 0
    )
    files = [f for f in (files[: max_files * 2] if max_files else files) if _is_utf8(f)]
    if not files:
        raise ConfigError(f"no Python sources found under {root}", hint="is the standard library installed?")
    return files[:max_files] if max_files else files


def quickstart_config(out: str, *, steps: int, vocab: int) -> dict:
    """The embedded default: a 4-layer GPT small enough to learn visibly in minutes on 2 CPU cores."""
    return {
        "train_batch_size": 16,
        "train_micro_batch_size_per_gpu": 8,
        "optimizer": {"type": "AdamW", "params": {"lr": 2e-3, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}},
        "scheduler": {
            "type": "WarmupCosineLR",
            "params": {
                "total_num_steps": steps,
                "warmup_num_steps": max(2, steps // 20),
                "warmup_type": "linear",
                "cos_min_ratio": 0.1,
            },
        },
        "gradient_clipping": 1.0,
        "model": {
            "arch": "gpt2",
            "n_layers": 4,
            "d_model": 128,
            "n_heads": 4,
            "seq_len": 128,
            "vocab_size": vocab,
            "tie_embeddings": True,
        },
        "data": {
            "datasets": [{"prefix": os.path.join(out, "data", "stdlib"), "weight": 1.0}],
            "valid_fraction": 0.02,
            "seed": 1234,
            "cache_dir": os.path.join(out, "data", "cache"),
        },
        "train": {
            "max_steps": steps,
            "seed": 42,
            "log_interval": max(1, steps // 50),
            "log_dir": os.path.join(out, "logs"),
            "save_dir": os.path.join(out, "checkpoints"),
            "save_interval": 0,
            "keep_last": 2,
            "eval_interval": max(1, steps // 4),
            "eval_iters": 8,
        },
    }


def run_quickstart(
    out: str, *, steps: int = 400, vocab_size: int = 4096, max_files: int | None = None, workers: int | None = None
) -> int:
    """Prepare the stdlib corpus under ``out``, train on it, print the results; returns an exit code."""
    if steps < 1:
        raise ConfigError(f"--steps: {steps} must be >= 1")
    from engine.data.prepare import build_parser
    from engine.data.prepare import run as run_prepare

    prefix = os.path.join(out, "data", "stdlib")
    files = stdlib_sources(max_files)
    print(
        f"[1/3] corpus: {len(files)} Python standard-library files; tokenizer + shards -> {prefix}.bin/.idx", flush=True
    )
    os.makedirs(os.path.dirname(prefix), exist_ok=True)
    prep = [
        "--input",
        *files,
        "--text-suffixes",
        ".py",
        "--output-prefix",
        prefix,
        "--train-tokenizer",
        "--vocab-size",
        str(vocab_size),
        "--tokenizer-sample-docs",
        "3000",
    ]
    if workers:
        prep += ["--workers", str(workers)]
    if run_prepare(build_parser().parse_args(prep)):
        return 1

    from engine.config import parse_config
    from engine.training.runner import run_training

    raw = quickstart_config(out, steps=steps, vocab=vocab_size)
    os.makedirs(out, exist_ok=True)
    with open(os.path.join(out, "config.json"), "w", encoding="utf-8") as fh:
        json.dump(raw, fh, indent=2)
    print(
        f"[2/3] training a {raw['model']['n_layers']}-layer GPT for {steps} steps "
        f"(config: {os.path.join(out, 'config.json')})",
        flush=True,
    )
    cfg = parse_config(raw)
    summary = run_training(cfg, fresh=True)

    print("[3/3] results", flush=True)
    show_results(cfg, summary)
    return 0


def show_results(cfg, summary: dict) -> None:
    import math

    import torch

    from engine.checkpoint import store
    from engine.metrics.plot import plot, read_metrics
    from engine.model.generate import generate
    from engine.model.transformer import Transformer
    from engine.training.assembly import load_tokenizer

    metrics = os.path.join(cfg.train.log_dir, "metrics.jsonl")
    png = plot(read_metrics(metrics), os.path.join(cfg.train.log_dir, "loss.png"))
    ckpt = store.latest_checkpoint(cfg.train.save_dir)
    final = summary.get("eval") or {}
    print(f"  final train loss   {summary['loss']:.4f}")
    if final:
        print(f"  validation loss    {final['val_loss']:.4f}  (perplexity {final['val_ppl']:.2f})")
    else:
        print(f"  train perplexity   {math.exp(min(summary['loss'], 50)):.2f}")
    tok = load_tokenizer(cfg)
    model = Transformer(cfg.model, seed=cfg.train.seed)
    model.load_state_dict(store.load_shard(ckpt, 0)["model"])
    prompt = torch.tensor([tok.encode("def ")], dtype=torch.long)
    ids = generate(
        model,
        prompt,
        max_new_tokens=80,
        top_k=20,
        temperature=0.8,
        generator=torch.Generator().manual_seed(0),
        eos_id=tok.eos_id,
    )
    print("  sample:\n" + "\n".join("    | " + line for line in tok.decode(ids[0].tolist()).splitlines()))
    print(f"  loss plot          {png}")
    print(f"  metrics            {metrics}")
    print(f"  checkpoint         {ckpt}")
