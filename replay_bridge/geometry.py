"""Routing geometry: which layers route, how many experts, how many ids per block."""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import yaml

__all__ = [
    "MAX_EXPERTS",
    "MAX_LAYERS",
    "MAX_TOP_K",
    "GeometryError",
    "GeometryMismatch",
    "RoutingGeometry",
    "hf_moe_layers",
    "list_presets",
]

MAX_LAYERS = 1 << 16
"""Most hidden layers a geometry may have (a manifest or config claiming more is refused)."""
MAX_EXPERTS = 1 << 16
"""Most experts per layer: every id must fit ``uint16``."""
MAX_TOP_K = 1 << 10
"""Most experts routed per token and layer."""
_MAX_NAME = 200


class GeometryError(ValueError):
    """A model config from which no routing geometry can be read."""


class GeometryMismatch(ValueError):
    """Two geometries (rollout vs trainer, shard vs model) disagree."""


@dataclass(frozen=True)
class RoutingGeometry:
    """The shape of one token's routing.

    ``num_layers`` counts every hidden layer: engines return one block per hidden layer, dense
    layers included (their blocks are never captured and hold zeros). ``moe_layers`` are the
    indices, on that wire axis, of the layers that route.
    """

    num_layers: int
    moe_layers: tuple[int, ...]
    top_k: int
    num_experts: int
    name: str | None = field(default=None, compare=False)

    def __post_init__(self) -> None:
        num_layers = _bounded("num_layers", self.num_layers, 1, MAX_LAYERS)
        num_experts = _bounded("num_experts", self.num_experts, 1, MAX_EXPERTS)
        top_k = _bounded("top_k", self.top_k, 1, min(num_experts, MAX_TOP_K))
        moe = _layer_indices(self.moe_layers)
        object.__setattr__(self, "num_layers", num_layers)
        object.__setattr__(self, "num_experts", num_experts)
        object.__setattr__(self, "top_k", top_k)
        object.__setattr__(self, "moe_layers", moe)
        if not moe:
            raise GeometryError("a routing geometry needs at least one MoE layer")
        if list(moe) != sorted(set(moe)) or moe[0] < 0 or moe[-1] >= num_layers:
            raise GeometryError(
                f"moe_layers must be sorted, unique and in [0, {num_layers}): {_short(moe)}"
            )
        if self.name is not None and (not isinstance(self.name, str)
                                      or len(self.name) > _MAX_NAME):
            raise GeometryError(f"name must be a string of at most {_MAX_NAME} characters, "
                                f"got {self.name!r:.80}")

    # ---- derived -------------------------------------------------------------------------

    @property
    def id_dtype(self) -> np.dtype:
        """Narrowest unsigned dtype holding every expert id."""
        return np.dtype(np.uint8) if self.num_experts <= 256 else np.dtype(np.uint16)

    @property
    def num_moe_layers(self) -> int:
        return len(self.moe_layers)

    @property
    def dense_layers(self) -> tuple[int, ...]:
        moe = set(self.moe_layers)
        return tuple(i for i in range(self.num_layers) if i not in moe)

    @property
    def all_moe(self) -> bool:
        return self.num_moe_layers == self.num_layers

    @property
    def wire_ids_per_token(self) -> int:
        """Ids per token on the wire: every hidden layer."""
        return self.num_layers * self.top_k

    @property
    def ids_per_token(self) -> int:
        """Ids per token as stored: MoE layers only."""
        return self.num_moe_layers * self.top_k

    def moe_index(self) -> np.ndarray:
        """The MoE layer indices as an ``intp`` array (for fancy indexing the wire axis)."""
        return np.asarray(self.moe_layers, dtype=np.intp)

    # ---- (de)serialisation ---------------------------------------------------------------

    def to_dict(self) -> dict[str, Any]:
        d: dict[str, Any] = {
            "num_layers": self.num_layers,
            "moe_layers": list(self.moe_layers),
            "top_k": self.top_k,
            "num_experts": self.num_experts,
            "id_dtype": self.id_dtype.name,
        }
        if self.name:
            d["name"] = self.name
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RoutingGeometry:
        """Inverse of :meth:`to_dict`; every value must already have its type (a manifest or
        schema is untrusted: no string or float is coerced), and ``id_dtype``, when present,
        must fit ``num_experts``."""
        if not isinstance(d, Mapping):
            raise GeometryError(f"a geometry record must be an object, got {d!r:.80}")
        missing = [k for k in ("num_layers", "moe_layers", "top_k", "num_experts") if k not in d]
        if missing:
            raise GeometryError(f"incomplete geometry record: no {', '.join(missing)}")
        g = cls(
            num_layers=d["num_layers"],
            moe_layers=d["moe_layers"],
            top_k=d["top_k"],
            num_experts=d["num_experts"],
            name=d.get("name"),
        )
        if "id_dtype" in d and d["id_dtype"] != g.id_dtype.name:
            raise GeometryError(
                f"id_dtype {d['id_dtype']!r:.40} does not fit num_experts={g.num_experts} "
                f"({g.id_dtype.name})"
            )
        return g

    @classmethod
    def from_hf_config(cls, config: Mapping[str, Any], name: str | None = None) -> RoutingGeometry:
        """Read a Hugging Face ``config.json`` (as a dict).

        Covers Qwen3-MoE / Qwen2-MoE (``mlp_only_layers``, ``decoder_sparse_step``), Mixtral
        (``num_local_experts``), DeepSeek-V2/V3 and GLM-4-MoE (``n_routed_experts``,
        ``first_k_dense_replace``, ``moe_layer_freq``), and multimodal wrappers that nest the
        language model under ``text_config``.
        """
        cfg = _text_config(config)
        model_type = cfg.get("model_type", "?")
        num_layers = _config_int(cfg, "num_hidden_layers", MAX_LAYERS)
        num_experts = next(
            (cfg[k] for k in ("num_experts", "n_routed_experts", "num_local_experts", "moe_num_experts")
             if cfg.get(k)),
            None,
        )
        top_k = next(
            (cfg[k] for k in ("num_experts_per_tok", "moe_topk", "moe_k") if cfg.get(k)), None
        )
        if not num_experts or not top_k:
            raise GeometryError(
                f"config ({model_type}) is not a routed MoE: no expert count or top-k "
                "(looked for num_experts / n_routed_experts / num_local_experts and "
                "num_experts_per_tok)"
            )
        return cls(num_layers, hf_moe_layers(cfg), top_k, num_experts, name=name)

    @classmethod
    def from_model_dir(cls, path: str | Path) -> RoutingGeometry:
        """Read ``config.json`` from a model directory (or the file itself)."""
        p = Path(path)
        cfg_path = p / "config.json" if p.is_dir() else p
        try:
            config = json.loads(cfg_path.read_bytes())
        except FileNotFoundError:
            raise GeometryError(f"no config.json at {cfg_path}") from None
        except OSError as e:
            raise GeometryError(f"cannot read {cfg_path}: {e.strerror or e}") from None
        except ValueError as e:
            raise GeometryError(f"{cfg_path} is not valid JSON: {e}") from None
        if not isinstance(config, dict):
            raise GeometryError(f"{cfg_path} does not hold a JSON object")
        return cls.from_hf_config(config, name=p.name if p.is_dir() else p.parent.name)

    @classmethod
    def from_preset(cls, name: str) -> RoutingGeometry:
        """A named preset from ``configs/models`` (``qwen3-30b-a3b``, ``deepseek-v3``, ...)."""
        presets = _preset_files()
        if name not in presets:
            raise GeometryError(
                f"unknown model preset {name!r}; known presets: {', '.join(sorted(presets))}"
            )
        doc = yaml.safe_load(presets[name].read_text())
        return cls.from_hf_config(doc["config"], name=name)

    @classmethod
    def resolve(cls, model: str | Path) -> RoutingGeometry:
        """A model directory, a ``config.json`` path, or a preset name."""
        p = Path(model)
        if p.exists():
            return cls.from_model_dir(p)
        if str(model) in _preset_files():
            return cls.from_preset(str(model))
        raise GeometryError(
            f"{model!r} is neither a model directory, a config.json, nor a preset "
            f"({', '.join(sorted(_preset_files()))})"
        )

    # ---- comparison ----------------------------------------------------------------------

    def require_same(self, other: RoutingGeometry, what: str = "geometries") -> None:
        """Raise :class:`GeometryMismatch` naming every field that differs."""
        diffs = [
            f"{f}: {getattr(self, f)} vs {getattr(other, f)}"
            for f in ("num_layers", "moe_layers", "top_k", "num_experts")
            if getattr(self, f) != getattr(other, f)
        ]
        if diffs:
            raise GeometryMismatch(f"{what} differ: " + "; ".join(diffs))

    def describe(self) -> str:
        dense = self.num_layers - self.num_moe_layers
        extra = f", {dense} dense" if dense else ""
        label = f"{self.name}: " if self.name else ""
        return (
            f"{label}{self.num_layers} layers ({self.num_moe_layers} MoE{extra}), "
            f"top-{self.top_k} of {self.num_experts} experts, {self.id_dtype.name} ids"
        )


def _text_config(config: Mapping[str, Any]) -> dict[str, Any]:
    """The language model's part of a Hugging Face config (``text_config`` of a multimodal
    wrapper), which must hold ``num_hidden_layers``."""
    cfg = dict(config)
    if "num_hidden_layers" not in cfg and isinstance(cfg.get("text_config"), Mapping):
        cfg = dict(cfg["text_config"])
    if "num_hidden_layers" not in cfg:
        raise GeometryError(f"config ({cfg.get('model_type', '?')}) has no num_hidden_layers")
    return cfg


def hf_moe_layers(config: Mapping[str, Any]) -> tuple[int, ...]:
    """The indices of the MoE layers of a Hugging Face ``config.json`` (as a dict).

    DeepSeek-V2/V3, GLM-4-MoE (``first_k_dense_replace``, ``moe_layer_freq``): a dense prefix,
    then every ``moe_layer_freq``-th layer. Qwen2/Qwen3-MoE (``mlp_only_layers``,
    ``decoder_sparse_step``): layer ``i`` is MoE when it is not in ``mlp_only_layers`` and
    ``(i + 1) % decoder_sparse_step == 0``. Mixtral has neither and routes in every layer.
    """
    cfg = _text_config(config)
    layers = range(_config_int(cfg, "num_hidden_layers", MAX_LAYERS))
    if "first_k_dense_replace" in cfg or "moe_layer_freq" in cfg:
        first = int(cfg.get("first_k_dense_replace") or 0)
        freq = int(cfg.get("moe_layer_freq") or 1)
        return tuple(i for i in layers if i >= first and i % freq == 0)
    dense = {int(i) for i in cfg.get("mlp_only_layers") or ()}
    step = int(cfg.get("decoder_sparse_step") or 1)
    return tuple(i for i in layers if i not in dense and (i + 1) % step == 0)


def _bounded(name: str, value: Any, lo: int, hi: int) -> int:
    """``value`` as an ``int`` in ``[lo, hi]``: a Python or NumPy integer, never a bool, float
    or string."""
    if isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_)):
        if lo <= value <= hi:
            return int(value)
    raise GeometryError(f"{name} must be an integer in [{lo}, {hi}], got {value!r:.40}")


def _layer_indices(values: Any) -> tuple[int, ...]:
    """MoE layer indices as a tuple of ``int`` (at most :data:`MAX_LAYERS` of them)."""
    if isinstance(values, (str, bytes, Mapping)) or not hasattr(values, "__len__"):
        raise GeometryError(f"moe_layers must be a sequence of integers, got {values!r:.80}")
    if len(values) > MAX_LAYERS:
        raise GeometryError(f"moe_layers holds {len(values)} entries, more than "
                            f"{MAX_LAYERS} layers")
    for v in values:
        if not isinstance(v, (int, np.integer)) or isinstance(v, (bool, np.bool_)):
            raise GeometryError(f"moe_layers must be integers, got {v!r:.40}")
    return tuple(int(v) for v in values)


def _short(values: tuple[int, ...]) -> str:
    return str(list(values)) if len(values) <= 16 else f"[{values[0]}, ..., {values[-1]}]"


def _config_int(cfg: Mapping[str, Any], key: str, hi: int) -> int:
    """An integer field of a Hugging Face config, refused when absurd (before anything is
    allocated for it)."""
    value = cfg[key]
    if isinstance(value, (int, np.integer)) and not isinstance(value, bool) and value <= hi:
        return int(value)
    raise GeometryError(f"{key} must be an integer of at most {hi}, got {value!r:.40}")


def _preset_files() -> dict[str, Path]:
    root = resources.files("replay_bridge") / "presets"
    return {Path(str(f)).stem: Path(str(f)) for f in root.iterdir() if str(f).endswith(".yaml")}


def list_presets() -> list[str]:
    return sorted(_preset_files())
