"""Rich tables shared by ``ingest``, ``validate`` and ``collect``."""

from __future__ import annotations

from typing import Any

from rich.markup import escape
from rich.table import Table

from ..checks import CheckTally


def _pct(part: int, whole: int) -> str:
    return f"{100.0 * part / whole:.2f}%" if whole else "-"


def check_table(tally: CheckTally, title: str = "routing checks") -> Table:
    """Tokens, (token, MoE layer) blocks, bad blocks and all-zero blocks, by region, then by
    layer for the layers that have faults. When some rows were native (routed by the trainer,
    not checked), one more column counts them."""
    t = Table(title=title, title_justify="left")
    native = [int(n) for n in tally.native] if tally.native.any() else None
    cols = ["region", "tokens", "blocks", "bad blocks", "of which all-zero", "bad %"]
    if native is not None:
        cols.insert(2, "native rows")
    for col in cols:
        t.add_column(col, justify="right" if col != "region" else "left")
    for i, (region, tokens, blocks, bad, zero) in enumerate(tally.region_totals()):
        cells = [region, f"{tokens:,}", f"{blocks:,}", f"{bad:,}", f"{zero:,}",
                 _pct(bad, blocks)]
        if native is not None:
            cells.insert(2, f"{native[i] if i < len(native) else sum(native):,}")
        t.add_row(*cells, style="bold" if region == "total" else None)
    faulty = [layer for layer in tally.geometry.moe_layers if tally.bad[:, layer].any()]
    if faulty:
        t.add_section()
        for layer in faulty:
            p, c = int(tally.bad[0, layer]), int(tally.bad[1, layer])
            zp, zc = int(tally.all_zero[0, layer]), int(tally.all_zero[1, layer])
            cells = [f"layer {layer}", "", "", f"{p:,} / {c:,}", f"{zp:,} / {zc:,}", ""]
            if native is not None:
                cells.insert(2, "")
            t.add_row(*cells)
        t.caption = "layer rows: prompt / completion"
    if native is not None:
        t.caption = "; ".join(filter(None, [t.caption, "native rows: routed by the trainer "
                                                       "itself, not checked, not in tokens"]))
    return t


def verdict_table(samples: list[dict[str, Any]], limit: int = 20) -> Table:
    """The first samples not stored (outcome rejected, duplicate or failed) with their kinds
    and messages."""
    t = Table(title="rejected samples", title_justify="left")
    t.add_column("sample")
    t.add_column("outcome")
    t.add_column("kinds")
    t.add_column("reason", overflow="fold")
    rejected = [s for s in samples if not s["stored"]]
    for s in rejected[:limit]:
        t.add_row(escape(str(s["sample_id"])), s.get("outcome", "rejected"),
                  ", ".join(s["kinds"]), escape(s.get("message", "")))
    if len(rejected) > limit:
        t.add_row(f"... {len(rejected) - limit} more", "", "", "")
    return t
