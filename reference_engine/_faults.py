"""Injected faults, each reproducing one seen in the field (docs/reference-engine.md, "Faults").

A worker (``serve --fault``) or the PD router (``route --fault``) applies them to the routing it
is about to send:

- ``prefill-zero-rows``: the prompt rows are all zero in every layer (the prefill capture never
  reached the host buffer; the bug fixed by SGLang PR #23885).
- ``drop-routed-experts``: the ``routed_experts`` field is lost (a router that drops the request
  flag, or a server started without the feature).
- ``no-merge``: the router returns decode's rows unmerged (sglang-router 0.3.2), so the prompt
  rows are decode's zeros. Router only.
- ``duplicate-ids``: every third row from the first completion row on holds the block's
  largest id in its first two slots, in every MoE layer (seen with CUDA graphs, which run
  decode steps only: a prefill worker's prompt rows are left alone); never an all-zero block.
- ``extra-row``: one row too many (a copy of the last row appended).
- ``stale-prompt-rows``: the prompt rows hold routing left in the capture buffer by earlier
  requests (valid ids of other tokens; what a long-running SGLang decode worker returns, and
  what a host-tier prefix-cache hit can leave). Invisible to per-block checks. Worker only.
"""

from __future__ import annotations

import numpy as np

__all__ = ["FAULTS", "ROUTER_FAULTS", "WORKER_FAULTS", "apply_rows_fault", "check_fault",
           "stale_rows"]

FAULTS = ("prefill-zero-rows", "drop-routed-experts", "no-merge", "duplicate-ids", "extra-row",
          "stale-prompt-rows")
WORKER_FAULTS = tuple(f for f in FAULTS if f != "no-merge")
ROUTER_FAULTS = tuple(f for f in FAULTS if f != "stale-prompt-rows")


def check_fault(fault: str | None, allowed: tuple[str, ...], top_k: int | None = None) -> None:
    """Raise ``ValueError`` for a fault this component cannot inject."""
    if fault is None:
        return
    if fault not in allowed:
        raise ValueError(f"unknown fault {fault!r} here; choose one of: {', '.join(allowed)}")
    if fault == "duplicate-ids" and top_k is not None and top_k < 2:
        raise ValueError("duplicate-ids needs top_k >= 2")


def apply_rows_fault(
    fault: str | None, rows: np.ndarray, prompt_rows: int, moe_layers: tuple[int, ...] | None = None
) -> np.ndarray:
    """Return ``rows`` (``[n, num_layers, top_k]``) with a rows-level fault applied.

    ``prompt_rows`` is how many leading rows cover prompt positions (``prompt_len - start``).
    Faults that are not about rows (``drop-routed-experts``, ``no-merge``) leave it unchanged.
    """
    if fault not in ("prefill-zero-rows", "duplicate-ids", "extra-row"):
        return rows
    out = np.array(rows, dtype=np.int32, copy=True)
    n = out.shape[0]
    if fault == "prefill-zero-rows":
        out[: max(0, min(prompt_rows, n))] = 0
    elif fault == "duplicate-ids":
        layers = np.asarray(moe_layers if moe_layers is not None else range(out.shape[1]))
        picked = np.arange(max(prompt_rows, 0), n, 3)
        sel = np.ix_(picked, layers)
        out[sel + (slice(0, 2),)] = out[sel].max(axis=-1, keepdims=True)
    elif fault == "extra-row" and n:
        out = np.concatenate([out, out[-1:]], axis=0)
    return out


def stale_rows(rows: np.ndarray, prompt_rows: int, earlier: np.ndarray | None) -> np.ndarray:
    """``rows`` with its first ``prompt_rows`` rows taken from ``earlier`` routing.

    Only rows that ``earlier`` really captured (not all zero) are used, repeated cyclically to
    cover the prompt; with nothing earlier the prompt rows are a fresh buffer's zeros.
    """
    out = np.array(rows, dtype=np.int32, copy=True)
    k = max(0, min(prompt_rows, out.shape[0]))
    captured = None if earlier is None else earlier[earlier.reshape(len(earlier), -1).any(axis=1)]
    if captured is None or not len(captured):
        out[:k] = 0
    else:
        out[:k] = np.resize(captured, (k, *out.shape[1:]))
    return out
