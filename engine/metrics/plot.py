"""Loss, lr, grad-norm and loss-scale curves of a run's metrics.jsonl (``python -m engine.plot``)."""

from __future__ import annotations

import json

from engine.errors import DataError


def read_metrics(path: str) -> list[dict]:
    rows = []
    try:
        with open(path, encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if line.strip():
                    try:
                        rows.append(json.loads(line))
                    except json.JSONDecodeError:
                        raise DataError(f"{path}: line {lineno} is not JSON") from None
    except FileNotFoundError:
        raise DataError(f"{path}: not found") from None
    if not rows:
        raise DataError(f"{path}: no metrics yet")
    return rows


def plot(rows: list[dict], out: str) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in rows]
    panels = [("loss", "loss"), ("lr", "learning rate"), ("grad_norm", "grad norm"), ("loss_scale", "loss scale")]
    fig, axes = plt.subplots(2, 2, figsize=(11, 7))
    for ax, (key, title) in zip(axes.flat, panels):
        ys = [r.get(key) for r in rows]
        pts = [(s, y) for s, y in zip(steps, ys) if isinstance(y, (int, float))]
        if pts:
            ax.plot(*zip(*pts), lw=1.2, label=key)
        if key == "loss":
            val = [(r["step"], r["val_loss"]) for r in rows if isinstance(r.get("val_loss"), (int, float))]
            if val:
                ax.plot(*zip(*val), "o-", ms=3, label="validation")
            ax.legend()
        if key == "loss_scale":
            ax.set_yscale("log", base=2)
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(out, dpi=110)
    plt.close(fig)
    return out
