"""Vectorised checks of routing: one verdict per sample, faults located by region and layer.

Rules, by verdict kind:

- ``malformed``: the routing could not be decoded (bad base64, bad or pickled ``.npy``, a byte
  count that is not a whole number of ids or of ``[num_layers, top_k]`` blocks), or the answer
  around it is inconsistent (more log-probs than completion tokens: at most one each; a
  ``native`` mask that is not one bool per routing row);
- ``missing_routing``: the response carried no routing;
- ``shape``: the layer or top-k axis disagrees with the geometry;
- ``row_count``: rows != tokens - 1 - routed_start;
- ``out_of_range``: an id outside ``[0, num_experts)``;
- ``all_zero``: every id of a block is 0 (a capture that never happened; with ``top_k == 1``
  the block ``[0]`` is a valid route and never flagged);
- ``duplicate_ids``: a block whose k ids are not k distinct experts.

Each bad (token, MoE layer) block is counted under one kind, in the order above. Dense-layer
blocks are never looked at, nor are the blocks of rows a sample's ``native`` mask marks (rows
the trainer routes with the router's own top-k): the block checks skip them, whatever their
ids, and :func:`accept` stores 0 there. Only in-memory adapters set marks; engine decoders
never do, so an engine's ``-1`` is ``out_of_range`` and its zero row ``all_zero``.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np

from .geometry import RoutingGeometry
from .sample import RoutedSample, WireSample, type_name, with_routing

try:  # the compiled block scan; without it (no C compiler at install) NumPy gives the same
    from ._blockscan import scan as _compiled_scan
except ImportError:  # pragma: no cover - depends on the install
    _compiled_scan = None

__all__ = [
    "BLOCK_KINDS",
    "KINDS",
    "REGIONS",
    "CheckReport",
    "CheckTally",
    "accept",
    "check_routed",
    "check_sample",
    "has_repeated_ids",
    "repeated_ids",
    "scan_is_compiled",
]

KINDS = (
    "malformed",
    "missing_routing",
    "shape",
    "row_count",
    "out_of_range",
    "all_zero",
    "duplicate_ids",
)
BLOCK_KINDS = ("out_of_range", "all_zero", "duplicate_ids")
REGIONS = ("prompt", "completion")

# Blocks per vectorised step of the duplicate scan: small enough to stay in cache.
_CHUNK_BLOCKS = 1 << 15


@dataclass
class CheckReport:
    """The verdict on one sample.

    ``bad[kind]`` counts bad blocks as ``int64 [2, num_layers]``: region (0 prompt,
    1 completion) by wire layer. ``first[kind]`` is the first offending ``(position, layer)``
    (token position, wire layer index).
    """

    sample_id: str
    kinds: tuple[str, ...] = ()
    message: str = ""
    rows: int = 0
    expected_rows: int = 0
    prompt_rows: int = 0
    """Rows checked that lie at prompt positions (the rest are completion positions)."""
    checked_rows: int = 0
    """Rows whose blocks were checked: the expected rows present, native rows left out."""
    bad: dict[str, np.ndarray] = field(default_factory=dict)
    first: dict[str, tuple[int, int]] = field(default_factory=dict)
    native_rows: int = 0
    """Rows marked native among the rows looked at (their ids are not checked)."""
    native_prompt_rows: int = 0
    """Native rows that lie at prompt positions."""

    @property
    def ok(self) -> bool:
        return not self.kinds

    @property
    def native_by_region(self) -> dict[str, int]:
        """Native rows per region: ``{"prompt": n, "completion": n}``."""
        return {"prompt": self.native_prompt_rows,
                "completion": self.native_rows - self.native_prompt_rows}

    def bad_blocks(self, kind: str | None = None) -> int:
        if kind is not None:
            return int(self.bad[kind].sum()) if kind in self.bad else 0
        return int(sum(int(v.sum()) for v in self.bad.values()))

    def bad_by_region(self, kind: str) -> dict[str, int]:
        counts = self.bad.get(kind)
        if counts is None:
            return dict.fromkeys(REGIONS, 0)
        return {r: int(counts[i].sum()) for i, r in enumerate(REGIONS)}

    def bad_layers(self, kind: str) -> list[int]:
        counts = self.bad.get(kind)
        return [] if counts is None else [int(i) for i in np.flatnonzero(counts.sum(axis=0))]

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "sample_id": self.sample_id,
            "ok": self.ok,
            "kinds": list(self.kinds),
            "rows": self.rows,
            "expected_rows": self.expected_rows,
        }
        if self.message:
            d["message"] = self.message
        if self.native_rows:
            d["native_rows"] = self.native_rows
        if self.bad:
            d["blocks"] = {
                kind: {
                    **self.bad_by_region(kind),
                    "layers": self.bad_layers(kind),
                    "first": {"position": self.first[kind][0], "layer": self.first[kind][1]},
                }
                for kind in self.bad
            }
        return d


# --------------------------------------------------------------------------------------------
# entry points


def check_sample(sample: WireSample, geometry: RoutingGeometry) -> CheckReport:
    """Check one engine sample against the geometry."""
    return _check_wire(sample, geometry)[0]


def accept(sample: WireSample, geometry: RoutingGeometry) -> tuple[CheckReport, RoutedSample | None]:
    """Check a wire sample; when it is good, also return it as a stored :class:`RoutedSample`
    (MoE layers, narrow ids, 0 at native rows), reusing the narrowed array the check built.
    A ``native`` mask with no marked row becomes ``None``."""
    report, narrow = _check_wire(sample, geometry)
    if not report.ok or narrow is None:
        return report, None
    routed = with_routing(sample, narrow)
    if not report.native_rows:
        routed.native = None
    return report, routed


def check_routed(sample: RoutedSample, geometry: RoutingGeometry) -> CheckReport:
    """Re-check a stored sample (``validate``): its routing holds MoE layers only; its
    ``native`` mask (if any) one bool per row."""
    expected = sample.expected_rows
    r = sample.routed
    report = CheckReport(sample.sample_id, rows=int(r.shape[0]), expected_rows=expected)
    want = (geometry.num_moe_layers, geometry.top_k)
    if r.ndim != 3 or tuple(r.shape[1:]) != want:
        return _fail(report, "shape", f"stored routing has shape {tuple(r.shape)}, "
                     f"expected [rows, {want[0]}, {want[1]}] (MoE layers x top_k)")
    problem = _native_problem(sample.native, report.rows)
    if problem is not None:
        return _fail(report, "malformed", problem)
    _verdict(report, r[:expected], sample, geometry)
    return report


# --------------------------------------------------------------------------------------------
# internals


def _fail(report: CheckReport, kind: str, message: str) -> CheckReport:
    report.kinds = (kind,)
    report.message = f"sample {report.sample_id!r}: {kind}: {message}"
    return report


def _native_problem(native: object, rows: int) -> str | None:
    """What is wrong with a sample's ``native`` mask (one bool per routing row), or ``None``."""
    if native is None:
        return None
    if not isinstance(native, np.ndarray):
        return f"native mask is {type_name(native)}, expected a 1-D bool array"
    if native.dtype != np.bool_ or native.ndim != 1:
        return (f"native mask is {native.dtype} of shape {tuple(native.shape)}, expected a "
                "1-D bool array")
    if native.shape[0] != rows:
        return f"native mask has {native.shape[0]} rows, the routing {rows}"
    return None


def _row_message(sample_id: str, rows: int, expected: int, s: Any) -> str:
    return (
        f"sample {sample_id!r}: row_count: {rows} routing rows, expected {expected} "
        f"(tokens {s.num_tokens} - 1 - routed_start {s.routed_start})"
    )


def _block_message(report: CheckReport) -> str:
    parts = []
    for kind in BLOCK_KINDS:
        if kind not in report.bad:
            continue
        pos, layer = report.first[kind]
        reg = report.bad_by_region(kind)
        parts.append(
            f"{kind}: {reg['prompt'] + reg['completion']} blocks "
            f"(prompt {reg['prompt']}, completion {reg['completion']}; "
            f"layers {_ranges(report.bad_layers(kind))}), first at position {pos} layer {layer}"
        )
    return f"sample {report.sample_id!r}: " + "; ".join(parts)


def _ranges(xs: list[int]) -> str:
    out, i = [], 0
    while i < len(xs):
        j = i
        while j + 1 < len(xs) and xs[j + 1] == xs[j] + 1:
            j += 1
        out.append(str(xs[i]) if i == j else f"{xs[i]}-{xs[j]}")
        i = j + 1
    return ",".join(out)


def _check_wire(
    sample: WireSample, geometry: RoutingGeometry
) -> tuple[CheckReport, np.ndarray | None]:
    expected = sample.expected_rows
    report = CheckReport(sample.sample_id, expected_rows=expected)
    if sample.fault is not None:
        return _fail(report, sample.fault.kind, sample.fault.message), None
    if sample.logprobs is not None:
        n_lp, n_out = np.asarray(sample.logprobs).size, max(sample.completion_len, 0)
        if n_lp > n_out:
            return _fail(report, "malformed", f"{n_lp} log-probs for {n_out} completion tokens "
                         "(at most one per completion token)"), None
    r = sample.routing
    if r is None:
        return _fail(report, "missing_routing", "the response carried no routing"), None
    report.rows = int(r.shape[0]) if r.ndim else 0
    want = (geometry.num_layers, geometry.top_k)
    if r.ndim != 3 or tuple(r.shape[1:]) != want:
        hint = ""
        if r.ndim == 3 and r.shape[1] == geometry.num_moe_layers != geometry.num_layers:
            hint = " (the engine sent MoE layers only)"
        return _fail(report, "shape", f"routing has shape {tuple(r.shape)}, expected "
                     f"[rows, {want[0]}, {want[1]}] (num_layers x top_k){hint}"), None
    if not np.issubdtype(r.dtype, np.integer):
        return _fail(report, "malformed", f"routing dtype {r.dtype} is not an integer type"), None
    if not r.dtype.isnative:  # ids are compared as the machine reads them
        r = r.astype(r.dtype.newbyteorder("="))
    problem = _native_problem(sample.native, report.rows)
    if problem is not None:
        return _fail(report, "malformed", problem), None
    return report, _verdict(report, _moe_view(r[:expected], geometry), sample, geometry)


def _verdict(report: CheckReport, moe: np.ndarray, sample: WireSample | RoutedSample,
             geometry: RoutingGeometry) -> np.ndarray | None:
    """Row count (``report.rows`` vs ``report.expected_rows``), then the blocks of ``moe``
    (the MoE layers of the expected rows); set the kinds and the message. Returns the ids
    narrowed by :func:`_check_blocks`."""
    row_count = report.rows != report.expected_rows
    if row_count:
        report.message = _row_message(report.sample_id, report.rows, report.expected_rows,
                                      sample)
    narrow = _check_blocks(report, moe, sample, geometry)
    report.kinds = tuple(k for k in KINDS
                         if (k == "row_count" and row_count) or k in report.bad)
    if report.kinds and not report.message:
        report.message = _block_message(report)
    return narrow


def _moe_view(r: np.ndarray, geometry: RoutingGeometry) -> np.ndarray:
    """The MoE layers of wire routing ``[rows, num_layers, top_k]``: a view when they are one
    run of layers (all MoE, or a dense prefix), else a gathered copy."""
    first, last = geometry.moe_layers[0], geometry.moe_layers[-1]
    if last - first + 1 == geometry.num_moe_layers:
        return r[:, first : last + 1, :]
    return r[:, geometry.moe_index(), :]


def _check_blocks(
    report: CheckReport,
    moe: np.ndarray,
    sample: WireSample | RoutedSample,
    geometry: RoutingGeometry,
) -> np.ndarray | None:
    """Check ``[rows, num_moe_layers, top_k]`` ids; fill ``report.bad`` / ``report.first``.
    Rows the sample's ``native`` mask marks are left out (gathered away before the scan).

    Returns the ids narrowed to the geometry's dtype, 0 at native rows (``None`` when ids are
    out of range).
    """
    rows = moe.shape[0]
    p = int(np.clip(sample.prompt_len - sample.routed_start, 0, rows))
    native = sample.native
    if native is None or not native[:rows].any():
        report.checked_rows, report.prompt_rows = rows, p
        return _scan_blocks(report, moe, sample.routed_start, None, geometry)
    kept = np.flatnonzero(~native[:rows])
    report.checked_rows = len(kept)
    report.prompt_rows = int(np.searchsorted(kept, p))
    report.native_rows = rows - report.checked_rows
    report.native_prompt_rows = p - report.prompt_rows
    narrow = _scan_blocks(report, moe[kept], sample.routed_start, kept, geometry)
    if narrow is None:
        return None
    out = np.zeros(moe.shape, dtype=geometry.id_dtype)
    out[kept] = narrow
    return out


def _scan_blocks(report: CheckReport, moe: np.ndarray, routed_start: int,
                 at: np.ndarray | None, geometry: RoutingGeometry) -> np.ndarray | None:
    """The block scan of :func:`_check_blocks` over ``moe`` (its first
    ``report.prompt_rows`` rows at prompt positions); row ``i`` of ``moe`` is routing row
    ``at[i]`` (``i`` when ``at`` is ``None``)."""
    rows, m, k = moe.shape
    n_experts = geometry.num_experts
    if rows == 0:
        return moe.astype(geometry.id_dtype)

    # Viewing signed ids as unsigned of the same width maps negatives above any expert count.
    unsigned = moe.view(np.dtype(f"u{moe.dtype.itemsize}")) if moe.dtype.kind == "i" else moe
    if moe.dtype == geometry.id_dtype and moe.flags.c_contiguous:
        narrow = moe
    else:
        narrow = np.empty(moe.shape, geometry.id_dtype)
    top, repeats = _first_pass(moe, unsigned, narrow, n_experts)
    in_range = top < n_experts
    oor_mask = None
    if not in_range:
        oor_mask = (unsigned >= n_experts).any(axis=-1)
        repeats = has_repeated_ids(narrow)
    blocks = narrow.reshape(rows * m, k)

    zero_mask = dup_mask = None
    if repeats:
        zero_mask = ~blocks.any(axis=1)
        dup_mask = repeated_ids(blocks) & ~zero_mask
        zero_mask = zero_mask.reshape(rows, m)
        dup_mask = dup_mask.reshape(rows, m)
        if oor_mask is not None:
            zero_mask &= ~oor_mask
            dup_mask &= ~oor_mask

    for kind, mask in (("out_of_range", oor_mask), ("all_zero", zero_mask),
                       ("duplicate_ids", dup_mask)):
        if mask is None or not mask.any():
            continue
        counts = np.zeros((2, geometry.num_layers), dtype=np.int64)
        p = report.prompt_rows
        layers = geometry.moe_index()
        counts[0, layers] = mask[:p].sum(axis=0)
        counts[1, layers] = mask[p:].sum(axis=0)
        report.bad[kind] = counts
        row, j = divmod(int(np.argmax(mask.reshape(-1))), m)
        report.first[kind] = (routed_start + (row if at is None else int(at[row])),
                              int(layers[j]))

    return narrow if in_range else None


def scan_is_compiled() -> bool:
    """Whether the block checks run the compiled scan (``replay_bridge._blockscan``, built at
    install where a C compiler is found) rather than the NumPy path; the results are the same."""
    return _compiled_scan is not None


def _first_pass(moe: np.ndarray, unsigned: np.ndarray, narrow: np.ndarray,
                n_experts: int) -> tuple[int, bool]:
    """Range, narrowing (into ``narrow`` unless it is ``moe``) and the repeated-id scan in
    one pass over ``moe [rows, m, k]``: ``(largest id as unsigned, whether a block repeats an
    id)``; the second is meaningful only when the first is below ``n_experts``."""
    rows, m, k = moe.shape
    size = moe.dtype.itemsize
    if (_compiled_scan is not None and moe.dtype.isnative and moe.strides[2] == size
            and moe.strides[1] == k * size):
        return _compiled_scan(moe, None if narrow is moe else narrow)
    # NumPy: cache-sized runs of rows, so that each wire id is read from memory once.
    step = max(_CHUNK_BLOCKS // m, 1)
    top, repeats = 0, False
    for lo in range(0, rows, step):
        top = max(top, int(unsigned[lo : lo + step].max()))
        if narrow is not moe:
            np.copyto(narrow[lo : lo + step], moe[lo : lo + step], casting="unsafe")
        if not repeats and top < n_experts:
            repeats = has_repeated_ids(narrow[lo : lo + step])
    return top, repeats


def has_repeated_ids(blocks: np.ndarray) -> bool:
    """Whether any block of ``blocks [..., k]`` (k ids on the last axis) repeats an id.

    Compiled (``[..., blocks, k]`` C-contiguous ids): one pass per row of blocks. NumPy: over
    cache-sized chunks of blocks, transposed to one row per slot: each slot's row is
    XORed with the rows of every later slot in one call, and a zero in the result is a
    repeat (k - 1 XORs and k - 1 minima per chunk, no sort).
    """
    k = blocks.shape[-1]
    if k < 2 or blocks.size == 0:
        return False
    if (_compiled_scan is not None and blocks.ndim >= 3 and blocks.flags.c_contiguous
            and blocks.dtype.kind in "iu" and blocks.dtype.isnative):
        return _compiled_scan(blocks.reshape(-1, *blocks.shape[-2:]), None)[1]
    flat = blocks.reshape(-1, k)
    if flat.dtype.kind == "i":  # unsigned: a XOR of negatives is negative and hides a zero
        flat = flat.view(np.dtype(f"u{flat.dtype.itemsize}"))
    diff = np.empty((k - 1, min(_CHUNK_BLOCKS, flat.shape[0])), dtype=flat.dtype)
    for lo in range(0, flat.shape[0], _CHUNK_BLOCKS):
        cols = np.ascontiguousarray(flat[lo : lo + _CHUNK_BLOCKS].T)
        n = cols.shape[1]
        for i in range(k - 1):
            d = diff[: k - 1 - i, :n]
            np.bitwise_xor(cols[i + 1 :], cols[i], out=d)
            if int(d.min()) == 0:
                return True
    return False


def repeated_ids(blocks: np.ndarray) -> np.ndarray:
    """``bool [...]``: the blocks of ``blocks [..., k]`` in which some id appears twice
    (pairwise compares of columns over cache-sized chunks, no sort). On a hot path, ask
    :func:`has_repeated_ids` first: it builds no mask."""
    k = blocks.shape[-1]
    flat = blocks.reshape(-1, k)
    out = np.zeros(flat.shape[0], dtype=bool)
    for lo in range(0, flat.shape[0] if k > 1 else 0, _CHUNK_BLOCKS):
        cols = np.ascontiguousarray(flat[lo : lo + _CHUNK_BLOCKS].T)
        acc = out[lo : lo + _CHUNK_BLOCKS]
        tmp = np.empty(acc.shape, dtype=bool)
        for i in range(k):
            for j in range(i + 1, k):
                np.equal(cols[i], cols[j], out=tmp)
                acc |= tmp
    return out.reshape(blocks.shape[:-1])


# --------------------------------------------------------------------------------------------
# aggregation (validate / ingest / collect tables)


@dataclass
class CheckTally:
    """Totals over many reports: the table ``validate`` and ``collect`` print."""

    geometry: RoutingGeometry
    samples: int = 0
    good: int = 0
    by_kind: dict[str, int] = field(default_factory=dict)
    tokens: np.ndarray = field(default_factory=lambda: np.zeros(2, np.int64))
    """Checked (token, position) rows per region; native rows are not among them."""
    bad: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    all_zero: np.ndarray = field(default_factory=lambda: np.zeros((0,), np.int64))
    native: np.ndarray = field(default_factory=lambda: np.zeros(2, np.int64))
    """Native rows per region: rows the trainer routes itself, counted apart, not checked."""

    def __post_init__(self) -> None:
        shape = (2, self.geometry.num_layers)
        if self.bad.shape != shape:
            self.bad = np.zeros(shape, np.int64)
        if self.all_zero.shape != shape:
            self.all_zero = np.zeros(shape, np.int64)

    def add(self, report: CheckReport) -> None:
        self.samples += 1
        self.good += report.ok
        for kind in report.kinds:
            self.by_kind[kind] = self.by_kind.get(kind, 0) + 1
        self.tokens += (report.prompt_rows, report.checked_rows - report.prompt_rows)
        if report.native_rows:
            self.native += (report.native_prompt_rows,
                            report.native_rows - report.native_prompt_rows)
        for kind, counts in report.bad.items():
            self.bad += counts
            if kind == "all_zero":
                self.all_zero += counts

    def add_tally(self, other: CheckTally) -> None:
        """Add another tally of the same geometry (one worker's table into the run's)."""
        self.samples += other.samples
        self.good += other.good
        for kind, n in other.by_kind.items():
            self.by_kind[kind] = self.by_kind.get(kind, 0) + n
        self.tokens += other.tokens
        self.native += other.native
        self.bad += other.bad
        self.all_zero += other.all_zero

    @property
    def blocks(self) -> np.ndarray:
        """(token, MoE layer) blocks checked per region."""
        return self.tokens * self.geometry.num_moe_layers

    def region_totals(self) -> list[tuple[str, int, int, int, int]]:
        """``(region, tokens, blocks, bad blocks, all-zero blocks)`` for each region, then
        ``"total"``: the rows every check table shows."""
        rows = [(region, int(self.tokens[i]), int(self.blocks[i]), int(self.bad[i].sum()),
                 int(self.all_zero[i].sum())) for i, region in enumerate(REGIONS)]
        rows.append(("total", int(self.tokens.sum()), int(self.blocks.sum()),
                     int(self.bad.sum()), int(self.all_zero.sum())))
        return rows

    def to_dict(self) -> dict[str, Any]:
        layers = list(self.geometry.moe_layers)
        return {
            "samples": self.samples,
            "good": self.good,
            "rejected": self.samples - self.good,
            "by_kind": dict(sorted(self.by_kind.items(), key=lambda kv: _kind_order(kv[0]))),
            "regions": {
                region: {
                    "tokens": int(self.tokens[i]),
                    "blocks": int(self.blocks[i]),
                    "bad_blocks": int(self.bad[i].sum()),
                    "all_zero_blocks": int(self.all_zero[i].sum()),
                    "native_rows": int(self.native[i]),
                }
                for i, region in enumerate(REGIONS)
            },
            "layers": {
                str(layer): {
                    "bad_blocks": [int(self.bad[0, layer]), int(self.bad[1, layer])],
                    "all_zero_blocks": [int(self.all_zero[0, layer]), int(self.all_zero[1, layer])],
                }
                for layer in layers
                if self.bad[:, layer].any()
            },
        }


def _kind_order(kind: str) -> int:
    return KINDS.index(kind) if kind in KINDS else len(KINDS)
