"""One adapter per Hugging Face ``transformers`` MoE family: where its routers are, and how it
turns router logits at given expert ids into combine weights.

Every family covered here has a router module whose ``forward(hidden)`` returns
``(router_logits [tokens, experts], weights [tokens, k], indices [tokens, k])`` and a sparse
block that hands ``indices`` and ``weights`` to its experts module. The replay replaces the
router's output (a forward hook), so nothing of the library's source is patched. An adapter
names the router class (looked up in the family's ``modeling_*`` module when first used) and
implements :meth:`FamilyAdapter.combine`: the family's own normalisation, applied to the
router's logits at the replayed ids.

Adding a family is one subclass (or one instance of an existing one) in :data:`FAMILIES`,
keyed by ``config.model_type``; its proof test goes in ``tests/trainer_hooks/hf``.
"""

from __future__ import annotations

import importlib
import re
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import torch

from trainer_hooks.megatron import ReplayConfigError

__all__ = [
    "FAMILIES",
    "FamilyAdapter",
    "GroupedSigmoidTopK",
    "RouterSite",
    "SoftmaxTopK",
    "adapter_for",
]


@dataclass(frozen=True, eq=False)
class RouterSite:
    """One MoE router of a model: its wire layer index, module name and module."""

    layer: int
    name: str
    module: torch.nn.Module


_LAYER = re.compile(r"(?:^|\.)layers\.(\d+)\.")


@dataclass(frozen=True)
class FamilyAdapter:
    """How replay reaches one family's routers.

    ``module``: the ``transformers`` module that defines the router class, ``router_class``:
    its name. Subclasses implement :meth:`combine`.
    """

    model_type: str
    module: str
    router_class: str

    def router_type(self) -> type[torch.nn.Module]:
        try:
            return getattr(importlib.import_module(self.module), self.router_class)
        except (ImportError, AttributeError) as e:
            raise ReplayConfigError(
                f"{self.model_type}: the installed transformers has no {self.module}."
                f"{self.router_class} ({e}); this adapter was written against transformers 5.x"
            ) from None

    def routers(self, model: torch.nn.Module) -> list[RouterSite]:
        """Every router of the family's class in ``model``, by wire layer (the ``N`` of the
        ``layers.N.`` in its module name)."""
        cls = self.router_type()
        out: list[RouterSite] = []
        for name, mod in model.named_modules():
            if not isinstance(mod, cls):
                continue
            found = _LAYER.findall(f".{name}.")
            if not found:
                raise ReplayConfigError(
                    f"router {name!r} ({self.router_class}) is not inside a numbered decoder "
                    "layer (no 'layers.N.' in its module name): its wire layer is unknown"
                )
            out.append(RouterSite(int(found[-1]), name, mod))
        out.sort(key=lambda s: s.layer)
        return out

    def combine(
        self, router: torch.nn.Module, logits: torch.Tensor, ids: torch.Tensor
    ) -> torch.Tensor:
        """Combine weights ``[tokens, k]`` for experts ``ids`` ``int64 [tokens, k]`` from the
        router's ``logits`` ``[tokens, experts]``, as the family normalises its own top-k, in
        the dtype the family's router returns its weights in."""
        raise NotImplementedError

    def combine_is_own(self, logits: torch.Tensor) -> bool:
        """Whether :meth:`combine` at the router's own ids returns the router's own weights bit
        for bit, with the router's own gradient (the same ops on the same values as the
        router's ``forward``), for ``logits`` of this dtype. Then the replay hook takes the
        combine's weights at every row and needs no ``where`` between them and the router's
        own; the default, ``False``, keeps it."""
        return False

    def describe(self) -> str:
        raise NotImplementedError


@dataclass(frozen=True)
class SoftmaxTopK(FamilyAdapter):
    """Softmax over every expert's logit (in float32), gathered at the ids; divided by their
    sum when the router's ``norm_topk_prob`` is set (``always_norm``: always, as Mixtral);
    cast back to the logits' dtype when ``cast_back`` (Qwen2/Qwen3-MoE; Mixtral returns
    float32). Mixtral's normalised top-k softmax equals a softmax over the top-k logits.
    ``float_first``: the router takes ``softmax(logits.float())`` (Mixtral), not
    ``softmax(logits, dtype=float)``: the same op only for float32 logits."""

    always_norm: bool = False
    cast_back: bool = True
    float_first: bool = False

    def combine(
        self, router: torch.nn.Module, logits: torch.Tensor, ids: torch.Tensor
    ) -> torch.Tensor:
        w = torch.softmax(logits, dim=-1, dtype=torch.float).gather(1, ids)
        if self.always_norm or router.norm_topk_prob:
            w = w / w.sum(dim=-1, keepdim=True)
        if self.cast_back and logits.dtype != torch.float:
            w = w.to(logits.dtype)
        return w

    def combine_is_own(self, logits: torch.Tensor) -> bool:
        # The router's own softmax(dtype=float), top-k values (= the gather at its ids),
        # /= sum, cast back.
        return not self.float_first or logits.dtype == torch.float

    def describe(self) -> str:
        norm = "always normalised" if self.always_norm else "normalised if norm_topk_prob"
        return f"softmax over all experts, gathered at the ids, {norm}"


@dataclass(frozen=True)
class GroupedSigmoidTopK(FamilyAdapter):
    """DeepSeek-V3 / GLM-4.5: sigmoid scores gathered at the ids (the
    ``e_score_correction_bias`` and the group limit only select experts; they are not in the
    weights), divided by ``sum + 1e-20`` when ``norm_topk_prob``, times
    ``routed_scaling_factor``."""

    def combine(
        self, router: torch.nn.Module, logits: torch.Tensor, ids: torch.Tensor
    ) -> torch.Tensor:
        w = logits.sigmoid().gather(1, ids)
        if router.norm_topk_prob:
            w = w / (w.sum(dim=-1, keepdim=True) + 1e-20)
        return w * router.routed_scaling_factor

    def combine_is_own(self, logits: torch.Tensor) -> bool:
        # The router's own sigmoid, gather at its ids, / (sum + 1e-20), * scaling.
        return True

    def describe(self) -> str:
        return ("sigmoid scores gathered at the ids (no correction bias), normalised if "
                "norm_topk_prob, times routed_scaling_factor")


_T = "transformers.models"
FAMILIES: Mapping[str, FamilyAdapter] = {
    a.model_type: a
    for a in (
        SoftmaxTopK("qwen3_moe", f"{_T}.qwen3_moe.modeling_qwen3_moe", "Qwen3MoeTopKRouter"),
        SoftmaxTopK("qwen2_moe", f"{_T}.qwen2_moe.modeling_qwen2_moe", "Qwen2MoeTopKRouter"),
        SoftmaxTopK("mixtral", f"{_T}.mixtral.modeling_mixtral", "MixtralTopKRouter",
                    always_norm=True, cast_back=False, float_first=True),
        GroupedSigmoidTopK("deepseek_v3", f"{_T}.deepseek_v3.modeling_deepseek_v3",
                           "DeepseekV3TopkRouter"),
        GroupedSigmoidTopK("glm4_moe", f"{_T}.glm4_moe.modeling_glm4_moe", "Glm4MoeTopkRouter"),
    )
}
"""The covered families by ``config.model_type``."""


def adapter_for(config: Any) -> FamilyAdapter:
    """The adapter of a model's ``config`` (its ``model_type``, or its ``text_config``'s)."""
    model_type = getattr(config, "model_type", None)
    text = getattr(config, "text_config", None)
    if model_type not in FAMILIES and text is not None:
        model_type = getattr(text, "model_type", model_type)
    if model_type not in FAMILIES:
        raise ReplayConfigError(
            f"no routing replay adapter for model_type {model_type!r}; covered: "
            f"{', '.join(sorted(FAMILIES))} (adding one: trainer_hooks/hf/README.md)"
        )
    return FAMILIES[model_type]
