"""What a dataset holds: totals, storage cost, and expert load per MoE layer."""

from __future__ import annotations

import os
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa

from .geometry import RoutingGeometry
from .shards import Manifest, ShardReader, display_uri

__all__ = ["Inspection", "expert_load", "inspect_dataset", "inspect_dir", "plot_load"]

_CHUNK_IDS = 1 << 22


def expert_load(ids: np.ndarray, geometry: RoutingGeometry,
                skip: np.ndarray | None = None) -> np.ndarray:
    """Counts per (MoE layer, expert), ``int64 [num_moe_layers, num_experts]``, of flat
    row-major ``[rows, num_moe_layers, top_k]`` ids; rows where ``skip`` (``bool [rows]``) is
    set are not counted (native rows: their stored ids are placeholders)."""
    m, k, e = geometry.num_moe_layers, geometry.top_k, geometry.num_experts
    per_row = m * k
    flat = ids.reshape(-1, per_row)
    if skip is not None and skip.any():
        flat = flat[~skip]
    layer_base = (np.arange(m, dtype=np.uint32) * e).repeat(k)  # [m * k]
    counts = np.zeros(m * e, dtype=np.int64)
    step = max(_CHUNK_IDS // per_row, 1)
    for lo in range(0, flat.shape[0], step):  # bounded temporaries; vectorised inside
        idx = flat[lo : lo + step].astype(np.uint32) + layer_base
        counts += np.bincount(idx.reshape(-1), minlength=m * e)[: m * e]
    return counts.reshape(m, e)


@dataclass
class Inspection:
    dataset: str
    """The dataset's URI as shown (no credentials: :func:`~replay_bridge.shards.display_uri`)."""
    manifest: Manifest
    load: np.ndarray
    """``int64 [num_moe_layers, num_experts]``."""

    @property
    def geometry(self) -> RoutingGeometry:
        return self.manifest.geometry

    @property
    def bytes_per_token(self) -> float:
        t = self.manifest.tokens
        return self.manifest.bytes / t if t else 0.0

    @property
    def int32_bytes_per_token(self) -> int:
        """What the engines send: every hidden layer, ``int32`` ids."""
        return self.geometry.wire_ids_per_token * 4

    def layer_summary(self) -> list[dict[str, Any]]:
        load = self.load.astype(np.float64)
        total = load.sum(axis=1)
        mean = load.mean(axis=1)
        safe = np.where(mean > 0, mean, 1.0)
        hottest = load.argmax(axis=1)
        return [
            {
                "layer": int(layer),
                "assignments": int(total[i]),
                "max_over_mean": round(float(load[i].max() / safe[i]), 4),
                "min_over_mean": round(float(load[i].min() / safe[i]), 4),
                "cv": round(float(load[i].std() / safe[i]), 4),
                "hottest_expert": int(hottest[i]),
                "hottest_share": round(float(load[i, hottest[i]] / total[i]), 6)
                if total[i] else 0.0,
                "idle_experts": int((load[i] == 0).sum()),
            }
            for i, layer in enumerate(self.geometry.moe_layers)
        ]

    def to_dict(self, include_load: bool = True) -> dict[str, Any]:
        m = self.manifest
        d: dict[str, Any] = {
            "dataset": self.dataset,
            "geometry": self.geometry.to_dict(),
            "compression": m.compression,
            "totals": {**m.totals(), "outcomes": dict(m.outcomes)},
            "bytes_per_token": round(self.bytes_per_token, 3),
            "int32_bytes_per_token": self.int32_bytes_per_token,
            "ratio_to_int32": round(self.bytes_per_token / self.int32_bytes_per_token, 5),
            "layers": self.layer_summary(),
        }
        if include_load:
            d["expert_load"] = {
                "layers": list(self.geometry.moe_layers),
                "counts": self.load.tolist(),
            }
        return d


def _native_rows(batch: pa.RecordBatch, geometry: RoutingGeometry) -> np.ndarray | None:
    """``bool [rows]`` over every routing row of a record batch: the rows its samples mark
    native, or ``None`` when none is."""
    if batch.schema.get_field_index("native") < 0:
        return None
    col = batch.column("native")
    if col.null_count == len(col):
        return None
    rows_off = batch.column("routed").offsets.to_numpy() // (geometry.num_moe_layers
                                                             * geometry.top_k)
    off = col.offsets.to_numpy()
    valid = col.is_valid().to_numpy(zero_copy_only=False)
    lengths = np.where(valid, np.diff(off), 0)
    total = int(lengths.sum())
    within = np.arange(total) - np.repeat(np.cumsum(lengths) - lengths, lengths)
    values = col.values.to_numpy(zero_copy_only=False)[np.repeat(off[:-1], lengths) + within]
    mask = np.zeros(int(rows_off[-1] - rows_off[0]), dtype=bool)
    mask[np.repeat(rows_off[:-1] - rows_off[0], lengths) + within] = values
    return mask


def inspect_dataset(uri: str | os.PathLike[str],
                    on_samples: Callable[[int], None] | None = None) -> Inspection:
    """Read every shard of the dataset at ``uri`` (a directory, ``file://``, ``s3://``, ...)
    once (sizes checked, checksums left to ``validate``)."""
    reader = ShardReader(uri, verify=False)
    g = reader.geometry
    load = np.zeros((g.num_moe_layers, g.num_experts), dtype=np.int64)
    for batch in reader.iter_batches():
        ids = batch.column("routed").values.to_numpy(zero_copy_only=True)
        load += expert_load(ids, g, _native_rows(batch, g))
        if on_samples is not None:
            on_samples(batch.num_rows)
    return Inspection(display_uri(os.fspath(uri)), reader.manifest, load)


inspect_dir = inspect_dataset
"""The name of :func:`inspect_dataset` when datasets were local directories only."""


def plot_load(inspection: Inspection, path: str | os.PathLike[str]) -> Path:
    """Heatmap of expert load (count / layer mean) per (MoE layer, expert), saved as PNG at
    ``path`` (a local file: never put it inside a dataset, whose top level holds only shards).
    Needs matplotlib (the ``plot`` extra)."""
    from matplotlib.colors import TwoSlopeNorm
    from matplotlib.figure import Figure

    g = inspection.geometry
    load = inspection.load.astype(np.float64)
    mean = load.mean(axis=1, keepdims=True)
    ratio = np.divide(load, mean, out=np.zeros_like(load), where=mean > 0)
    top = max(float(ratio.max()), 1.01)
    fig = Figure(figsize=(min(4 + g.num_experts / 16, 24), min(2 + g.num_moe_layers / 6, 16)),
                 dpi=110)
    ax = fig.add_subplot()
    im = ax.imshow(ratio, aspect="auto", interpolation="nearest", cmap="RdBu_r",
                   norm=TwoSlopeNorm(vmin=0.0, vcenter=1.0, vmax=top))
    ax.set_xlabel("expert")
    ax.set_ylabel("MoE layer (wire index)")
    ticks = np.linspace(0, g.num_moe_layers - 1, min(g.num_moe_layers, 12)).round().astype(int)
    ax.set_yticks(ticks, [str(g.moe_layers[i]) for i in ticks])
    name = f"{g.name}: " if g.name else ""
    ax.set_title(f"{name}expert load / layer mean ({inspection.manifest.tokens:,} tokens)")
    fig.colorbar(im, ax=ax, label="load / mean")
    fig.tight_layout()
    out = Path(path)
    fig.savefig(out, format="png")
    return out
