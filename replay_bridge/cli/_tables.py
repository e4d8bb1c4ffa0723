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
    layer for the layers that have faults."""
    t = Table(title=title, title_justify="left")
    for col in ("region", "tokens", "blocks", "bad blocks", "of which all-zero", "bad %"):
        t.add_column(col, justify="right" if col != "region" else "left")
    for region, tokens, blocks, bad, zero in tally.region_totals():
        t.add_row(region, f"{tokens:,}", f"{blocks:,}", f"{bad:,}", f"{zero:,}",
                  _pct(bad, blocks), style="bold" if region == "total" else None)
    faulty = [layer for layer in tally.geometry.moe_layers if tally.bad[:, layer].any()]
    if faulty:
        t.add_section()
        for layer in faulty:
            p, c = int(tally.bad[0, layer]), int(tally.bad[1, layer])
            zp, zc = int(tally.all_zero[0, layer]), int(tally.all_zero[1, layer])
            t.add_row(f"layer {layer}", "", "", f"{p:,} / {c:,}", f"{zp:,} / {zc:,}", "")
        t.caption = "layer rows: prompt / completion"
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
