"""The demo's figure: routing agreement per layer, log-prob mismatch per step and per token,
and the shard validation table, in one PNG."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .trainer import RunResult

__all__ = ["plot_demo"]

_OFF, _ON, _OWN = "#d1495b", "#2e86ab", "#8fbfdf"


def plot_demo(
    path: Path,
    off: RunResult,
    on: RunResult,
    validation_rows: Sequence[Sequence[str]],
    validation_header: Sequence[str],
    title: str,
) -> Path:
    """Write the 2 x 2 figure to ``path`` (PNG) and return it."""
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(2, 2, figsize=(13, 9.5), dpi=110)
    fig.suptitle(title, fontsize=11)

    # (a) agreement per MoE layer at step 0
    ax = axes[0, 0]
    layers = list(off.steps[0].routing_used["layers"])
    x = np.arange(len(layers))
    series = [
        ("replay off: used (= own) vs rollout", off.steps[0].routing_used["layers"], _OFF),
        ("replay on: used vs rollout", on.steps[0].routing_used["layers"], _ON),
    ]
    own = on.steps[0].router_own
    own_layers = {lay: {"exact": own.get(f"routing_replay/layer{lay}/exact", float("nan"))}
                  for lay in layers}
    series.append(("replay on: router's own top-k vs replayed", own_layers, _OWN))
    width = 0.8 / len(series)
    low = 1.0
    for j, (label, per_layer, color) in enumerate(series):
        vals = np.array([per_layer[lay]["exact"] for lay in layers], float)
        low = min(low, float(np.nanmin(vals)))
        bars = ax.bar(x + (j - 1) * width, vals, width, label=label, color=color)
        for b, v in zip(bars, vals):
            ax.annotate(f"{100 * v:.1f}", (b.get_x() + b.get_width() / 2, v), fontsize=7,
                        ha="center", va="bottom")
    ax.set_xticks(x, [f"layer {lay}" for lay in layers])
    ax.set_ylim(max(0.0, low - 0.6 * (1.0 - low) - 0.005), 1.0 + 0.25 * (1.0 - low) + 0.002)
    ax.set_ylabel("fraction of (token, layer) blocks with the rollout's experts")
    ax.set_title("routing agreement with the rollout, step 0 (engine weights)", fontsize=10)
    native = on.steps[0].routing_used.get("native", {}).get("blocks", 0)
    if native:
        blocks = on.steps[0].routing_used["blocks"]
        ax.text(0.01, 0.98, f"{blocks:,} blocks with rollout routing; {native:,} native blocks "
                "(no rollout routing: the\ntrainer's own top-k, replay on or off) counted apart",
                transform=ax.transAxes, fontsize=7, va="top", ha="left")
    ax.legend(fontsize=8, loc="upper center", bbox_to_anchor=(0.5, -0.07), ncol=2,
              frameon=False)

    # (b) k3 KL per step
    ax = axes[0, 1]
    for run, label, color in ((off, "replay off", _OFF), (on, "replay on", _ON)):
        steps = [s.step for s in run.steps]
        ax.plot(steps, [s.logp["k3_kl"] for s in run.steps], "o-", color=color, label=label)
        ax.plot(steps, [s.logp["mean_abs"] for s in run.steps], "s--", color=color, alpha=0.5,
                label=f"{label}: mean |Δ log p|")
    ax.set_yscale("log")
    ax.set_xlabel("training step (forward before the update)")
    ax.set_xticks([s.step for s in off.steps])
    ax.set_title("rollout vs trainer log-probs per step: k3 KL(rollout ‖ trainer), "
                 "mean |Δ log p|", fontsize=10)
    ax.legend(fontsize=8)

    # (c) |Δ log p| per completion token at step 0
    ax = axes[1, 0]
    diffs = [np.abs(off.first_step_diffs), np.abs(on.first_step_diffs)]
    floor = 1e-7
    top = max(float(d.max()) for d in diffs if d.size) if any(d.size for d in diffs) else 1.0
    bins = np.logspace(np.log10(floor), np.log10(max(top, floor * 10)), 40)
    for d, label, color in ((diffs[0], "replay off", _OFF), (diffs[1], "replay on", _ON)):
        ax.hist(np.maximum(d, floor), bins=bins, histtype="step", linewidth=1.6, color=color,
                label=f"{label}: max {d.max():.3g}" if d.size else label)
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("|log p trainer (fp32) - log p rollout (bf16)| per completion token")
    ax.set_ylabel("tokens")
    ax.set_title("per-token log-prob mismatch, step 0", fontsize=10)
    ax.legend(fontsize=8)

    # (d) shard validation table
    ax = axes[1, 1]
    ax.axis("off")
    table = ax.table(cellText=[list(r) for r in validation_rows],
                     colLabels=list(validation_header), loc="center", cellLoc="right")
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1.0, 1.4)
    ax.set_title("shard validation (stored routing re-checked)", fontsize=10)

    fig.tight_layout(rect=(0, 0, 1, 0.96))
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, format="png")
    plt.close(fig)
    return path
