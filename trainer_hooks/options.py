"""The one switch for trainers, framework-free: ``--routing-replay ...`` (argparse) or the
``routing_replay:`` section of a YAML config, read into :class:`ReplayOptions`.

``trainer`` picks the hook the options build: ``megatron`` (the default,
:func:`trainer_hooks.megatron.build_routing_replay`) or ``hf`` (Hugging Face ``transformers``,
:func:`trainer_hooks.hf.build_routing_replay`); :func:`trainer_hooks.build_routing_replay`
dispatches on it. Parsing lives here only; the frameworks' packages re-export it.
"""

from __future__ import annotations

import argparse
import os
from collections.abc import Mapping
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Any, Literal

import yaml

from replay_bridge.geometry import RoutingGeometry
from replay_bridge.layout import Packing
from replay_bridge.sample import RoutedSample

__all__ = [
    "TRAINERS",
    "ReplayOptions",
    "add_routing_replay_args",
    "args_from_options",
    "options_from_args",
    "options_from_config",
    "replay_source",
]

TRAINERS = ("megatron", "hf")
"""The hooks one ``ReplayOptions`` can select (``routing_replay.trainer``)."""


@dataclass(frozen=True)
class ReplayOptions:
    """What a trainer configures. ``pad_multiple`` 0 means Megatron's requirement for the
    parallel layout (``2 * cp``, times ``tp`` with sequence parallel).

    ``trainer``: ``megatron`` or ``hf``. With ``hf`` the packing names the batch layout the
    trainer feeds the model: ``thd`` = packed sequences (``position_ids`` restarting at 0,
    flash-attention varlen style), ``bshd`` = a padded batch with an attention mask (either
    side); the routing is laid out on the batch's own ``[batch * seq]`` grid, so
    ``seq_length`` is not needed and ``pad_multiple`` is refused; ``allow_token_dropping`` has
    nothing to allow (``transformers`` MoE blocks drop no tokens)."""

    enabled: bool = False
    shards: str | None = None
    packing: Literal["thd", "bshd"] = "thd"
    seq_length: int | None = None
    pad_multiple: int = 0
    agreement: bool = True
    validate_ids: bool = True
    allow_token_dropping: bool = False
    trainer: Literal["megatron", "hf"] = "megatron"

    def __post_init__(self) -> None:
        if self.trainer not in TRAINERS:
            raise ValueError(
                f"routing_replay.trainer {self.trainer!r} is not a trainer this library hooks; "
                f"known: {', '.join(TRAINERS)}"
            )
        if self.packing not in ("thd", "bshd"):
            raise ValueError(
                f"routing_replay.packing must be 'thd' or 'bshd', got {self.packing!r}"
            )
        if self.pad_multiple < 0:
            raise ValueError("routing_replay.pad_multiple must be >= 0")
        if self.trainer == "hf":
            if self.pad_multiple:
                raise ValueError(
                    "routing_replay.pad_multiple is a megatron THD setting; trainer 'hf' lays "
                    "the routing out on the batch's own grid (leave it 0)"
                )
            return
        if self.enabled and self.packing == "bshd" and not self.seq_length:
            raise ValueError("routing_replay with bshd packing needs seq_length")

    def packing_for(self, tp: int = 1, cp: int = 1, sequence_parallel: bool = False) -> Packing:
        """Megatron: the :class:`~replay_bridge.layout.Packing` for the parallel layout."""
        if self.packing == "bshd":
            return Packing.bshd(int(self.seq_length or 0))
        m = self.pad_multiple or (2 * cp if cp > 1 else 1) * (tp if sequence_parallel else 1)
        return Packing.thd(pad_multiple=m)

    @property
    def hf_packing(self) -> Literal["padded", "packed"]:
        """``transformers``: ``packed`` for ``thd``, ``padded`` for ``bshd``."""
        return "packed" if self.packing == "thd" else "padded"


def add_routing_replay_args(parser: argparse.ArgumentParser) -> argparse.ArgumentParser:
    """Add the ``routing replay`` argument group (Megatron style) and return the parser."""
    g = parser.add_argument_group("routing replay")
    g.add_argument("--routing-replay", action="store_true",
                   help="Replay rollout MoE routing in the routers (megatron: needs "
                        "--moe-enable-routing-replay in the model config).")
    g.add_argument("--routing-replay-trainer", choices=TRAINERS, default="megatron",
                   help="Which hook: megatron-core or Hugging Face transformers (hf).")
    g.add_argument("--routing-replay-shards", metavar="DIR", default=None,
                   help="Shard directory holding the rollout routing.")
    g.add_argument("--routing-replay-packing", choices=("thd", "bshd"), default="thd",
                   help="How the trainer lays samples out in a micro-batch (hf: thd = packed "
                        "sequences, bshd = padded batch with an attention mask).")
    g.add_argument("--routing-replay-seq-length", type=int, default=None,
                   help="Padded sequence length of bshd micro-batches (megatron).")
    g.add_argument("--routing-replay-pad-multiple", type=int, default=0,
                   help="THD: pad each sequence to a multiple of this (0: 2*cp*tp as needed; "
                        "megatron).")
    g.add_argument("--routing-replay-no-agreement", action="store_true",
                   help="Do not measure agreement between own and replayed routing.")
    g.add_argument("--routing-replay-skip-id-check", action="store_true",
                   help="Do not check ids for range and repeats before each micro-batch.")
    g.add_argument("--routing-replay-allow-token-dropping", action="store_true",
                   help="Accept a capacity factor (replayed routes may then be dropped).")
    return parser


def options_from_args(args: argparse.Namespace) -> ReplayOptions:
    """:class:`ReplayOptions` from parsed ``add_routing_replay_args`` arguments."""
    return ReplayOptions(
        enabled=bool(args.routing_replay),
        shards=args.routing_replay_shards,
        packing=args.routing_replay_packing,
        seq_length=args.routing_replay_seq_length,
        pad_multiple=int(args.routing_replay_pad_multiple),
        agreement=not args.routing_replay_no_agreement,
        validate_ids=not args.routing_replay_skip_id_check,
        allow_token_dropping=bool(args.routing_replay_allow_token_dropping),
        trainer=getattr(args, "routing_replay_trainer", "megatron"),
    )


def args_from_options(o: ReplayOptions) -> dict[str, Any]:
    """The ``add_routing_replay_args`` argument values that give ``o`` (the inverse of
    :func:`options_from_args`): a config's ``routing_replay:`` section as parser defaults."""
    return {
        "routing_replay": o.enabled,
        "routing_replay_trainer": o.trainer,
        "routing_replay_shards": o.shards,
        "routing_replay_packing": o.packing,
        "routing_replay_seq_length": o.seq_length,
        "routing_replay_pad_multiple": o.pad_multiple,
        "routing_replay_no_agreement": not o.agreement,
        "routing_replay_skip_id_check": not o.validate_ids,
        "routing_replay_allow_token_dropping": o.allow_token_dropping,
    }


def options_from_config(config: Mapping[str, Any] | str | os.PathLike[str]) -> ReplayOptions:
    """:class:`ReplayOptions` from a trainer config's ``routing_replay:`` section: a YAML file,
    a whole config mapping holding the section, or the section itself. Unknown keys are an
    error; a config without the section means replay off."""
    if isinstance(config, (str, os.PathLike)):
        config = yaml.safe_load(Path(config).read_text()) or {}
    if not isinstance(config, Mapping):
        raise ValueError("a trainer config must be a mapping")
    section = config.get("routing_replay", config if "enabled" in config else None)
    if section is None:
        return ReplayOptions()
    if isinstance(section, bool):
        return ReplayOptions(enabled=section)
    known = {f.name for f in fields(ReplayOptions)}
    unknown = sorted(set(section) - known)
    if unknown:
        raise ValueError(f"unknown routing_replay keys {unknown}; known: {sorted(known)}")
    return ReplayOptions(**dict(section))


def replay_source(
    options: ReplayOptions,
    source: Mapping[str, RoutedSample] | None,
    geometry: RoutingGeometry | None,
) -> tuple[Mapping[str, RoutedSample], RoutingGeometry]:
    """The routing source (default: a ``ShardReader`` over ``options.shards``) and geometry
    (default: the source's) an enabled replay is built from; both hooks' builders use it."""
    if source is None:
        if not options.shards:
            raise ValueError("routing replay is on but no shard directory was given")
        from replay_bridge.shards import ShardReader

        source = ShardReader(options.shards)
    if geometry is None:
        geometry = getattr(source, "geometry", None)
        if geometry is None:
            raise ValueError("no geometry given and the routing source has none")
    return source, geometry
