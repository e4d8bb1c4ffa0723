"""A transformers MoE model with KV-cache generation and router top-k capture.

Each MoE block's gate gets a forward hook that writes the gate's top-k ids (in the order the
gate returns them) into a capture buffer of ``[positions, num_layers, top_k]`` int32, zeroed
per request like an engine's fresh capture buffer. Dense layers are never written, so their
blocks stay zero, as on the wire.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from replay_bridge.geometry import RoutingGeometry

__all__ = ["Generation", "ModelRunner", "SamplingSpec"]

_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}


@dataclass(frozen=True)
class SamplingSpec:
    """SGLang ``sampling_params`` the engine honours (defaults as SGLang's)."""

    max_new_tokens: int = 128
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = -1
    stop_token_ids: tuple[int, ...] = ()
    ignore_eos: bool = False
    seed: int | None = None

    @property
    def greedy(self) -> bool:
        return self.temperature < 1e-6 or self.top_k == 1


@dataclass
class Generation:
    """One finished sequence.

    ``routing`` holds one row per forwarded position, ``[prompt_len + completion_len - 1,
    num_layers, top_k]`` int32 (the last token is never forwarded); rows the engine did not
    capture are zero.
    """

    prompt_len: int
    output_ids: list[int]
    logprobs: list[float]
    routing: np.ndarray
    finish_reason: dict[str, Any]
    latency_s: float = 0.0
    extra: dict[str, Any] = field(default_factory=dict)


class _Capture:
    """The per-request capture buffer the gate hooks write into."""

    def __init__(self, positions: int, num_layers: int, top_k: int) -> None:
        self.buf = torch.zeros((max(positions, 1), num_layers, top_k), dtype=torch.int32)
        self.cursor = 0
        self.enabled = True


class ModelRunner:
    """A causal MoE language model that generates one sequence at a time (thread-safe): what a
    reference-engine worker runs. (``engine`` elsewhere names a wire protocol.)"""

    def __init__(self, model_dir: str | Path, *, dtype: str = "bfloat16") -> None:
        from transformers import AutoModelForCausalLM

        if dtype not in _DTYPES:
            raise ValueError(f"dtype must be one of {', '.join(_DTYPES)}, got {dtype!r}")
        self.model_dir = Path(model_dir)
        self.dtype = dtype
        self.geometry = RoutingGeometry.from_model_dir(self.model_dir)
        self.model = AutoModelForCausalLM.from_pretrained(
            self.model_dir, dtype=_DTYPES[dtype], local_files_only=True
        ).eval()
        self.tokenizer = _load_tokenizer(self.model_dir)
        self.eos_token_ids = _eos_ids(self.model, self.tokenizer)
        self.vocab_size = int(self.model.config.vocab_size)
        self._lock = threading.Lock()
        self._capture: _Capture | None = None
        self._hooks = [
            self._gate(layer_idx).register_forward_hook(self._make_hook(layer_idx))
            for layer_idx in self.geometry.moe_layers
        ]

    # ---- routing capture -----------------------------------------------------------------

    def _gate(self, layer_idx: int) -> torch.nn.Module:
        layer = self.model.model.layers[layer_idx]
        mlp = getattr(layer, "mlp", None) or getattr(layer, "block_sparse_moe", None)
        gate = getattr(mlp, "gate", None)
        if gate is None:
            raise ValueError(f"layer {layer_idx} of {self.model_dir} has no MoE gate")
        return gate

    def _make_hook(self, layer_idx: int) -> Callable[..., None]:
        top_k = self.geometry.top_k

        def hook(_module: torch.nn.Module, _inputs: Any, output: Any) -> None:
            cap = self._capture
            if cap is None or not cap.enabled:
                return
            if isinstance(output, tuple):  # (logits, weights, indices) routers
                ids = output[-1]
            else:  # a plain linear gate returning logits
                ids = torch.topk(torch.softmax(output.float(), dim=-1), top_k, dim=-1).indices
            ids = ids.reshape(-1, top_k)
            cap.buf[cap.cursor : cap.cursor + ids.shape[0], layer_idx] = ids.to(torch.int32)

        return hook

    def forward_routing(self, token_ids: Sequence[int]) -> np.ndarray:
        """Routing of one full forward pass (no cache): ``[len(token_ids), num_layers, top_k]``."""
        with self._lock, torch.inference_mode():
            cap = self._capture = _Capture(len(token_ids), self.geometry.num_layers,
                                           self.geometry.top_k)
            try:
                self.model(input_ids=torch.tensor([list(token_ids)]), use_cache=False)
            finally:
                self._capture = None
            return cap.buf[: len(token_ids)].numpy().copy()

    # ---- generation ----------------------------------------------------------------------

    def generate(
        self,
        prompt_ids: Sequence[int],
        spec: SamplingSpec,
        *,
        capture_prompt: bool = True,
        on_token: Callable[[int, float], None] | None = None,
        input_logprob_start: int | None = None,
    ) -> Generation:
        """Generate with a KV cache, capturing routing of every forwarded position.

        ``capture_prompt=False`` runs the prompt forward without recording it (a decode worker
        that got the prompt's KV cache from elsewhere): those rows stay zero.
        ``input_logprob_start`` asks for the log-probabilities of the prompt tokens from that
        position on (``extra["input_logprobs"]``; ``None`` for position 0, which has no context).
        """
        import time

        from transformers import DynamicCache

        prompt = [int(t) for t in prompt_ids]
        if not prompt:
            raise ValueError("the prompt is empty")
        bad = [t for t in prompt if not 0 <= t < self.vocab_size]
        if bad:
            raise ValueError(f"prompt token id {bad[0]} is outside the vocabulary "
                             f"[0, {self.vocab_size})")
        max_new = max(0, int(spec.max_new_tokens))
        stop_ids = set(spec.stop_token_ids) | (set() if spec.ignore_eos else self.eos_token_ids)
        gen = torch.Generator().manual_seed(
            spec.seed if spec.seed is not None else int.from_bytes(_urandom8(), "little")
        )
        t0 = time.perf_counter()
        with self._lock, torch.inference_mode():
            cap = self._capture = _Capture(len(prompt) + max_new, self.geometry.num_layers,
                                           self.geometry.top_k)
            try:
                cache = DynamicCache(config=self.model.config)
                cap.enabled = capture_prompt
                first = 1 if input_logprob_start is None else max(input_logprob_start, 1)
                prompt_logits = self._step(prompt, cache, keep=len(prompt) - first + 1)
                logits = prompt_logits[-1]
                cap.enabled = True
                pos = len(prompt)
                out: list[int] = []
                lps: list[float] = []
                finish: dict[str, Any] = {"type": "length", "length": max_new}
                while len(out) < max_new:
                    tok, lp = _sample(logits, spec, gen)
                    out.append(tok)
                    lps.append(lp)
                    if on_token is not None:
                        on_token(tok, lp)
                    if tok in stop_ids:
                        finish = {"type": "stop", "matched": tok}
                        break
                    if len(out) == max_new:
                        break
                    cap.cursor = pos
                    logits = self._step([tok], cache)[-1]
                    pos += 1
            finally:
                self._capture = None
        rows = len(prompt) + len(out) - 1
        result = Generation(
            prompt_len=len(prompt),
            output_ids=out,
            logprobs=lps,
            routing=cap.buf[:rows].numpy().copy(),
            finish_reason=finish,
            latency_s=time.perf_counter() - t0,
        )
        if input_logprob_start is not None:
            logp = torch.log_softmax(prompt_logits[:-1], dim=-1)
            targets = torch.tensor(prompt[first:], dtype=torch.long)
            picked = logp[torch.arange(len(targets)), targets].tolist()
            result.extra["input_logprobs"] = ([None] if input_logprob_start == 0 else []) + picked
        return result

    def _step(self, ids: list[int], cache: Any, keep: int = 1) -> torch.Tensor:
        """Forward ``ids`` through the cache; float32 logits of the last ``keep`` positions."""
        out = self.model(input_ids=torch.tensor([ids]), cache=cache, use_cache=True,
                         logits_to_keep=keep)
        return out.logits[0].float()

    # ---- text ----------------------------------------------------------------------------

    def encode(self, text: str) -> list[int]:
        if self.tokenizer is None:
            raise ValueError("this model has no tokenizer: send input_ids")
        return list(self.tokenizer(text, add_special_tokens=True)["input_ids"])

    def chat_prompt(self, messages: list[dict[str, Any]]) -> list[int]:
        """Token ids of a chat, rendered with the model's chat template."""
        if self.tokenizer is None or not getattr(self.tokenizer, "chat_template", None):
            raise ValueError("this model has no chat template: use /generate or /v1/completions")
        ids = self.tokenizer.apply_chat_template(messages, add_generation_prompt=True,
                                                 tokenize=True)
        if isinstance(ids, dict) or hasattr(ids, "keys"):
            ids = ids["input_ids"]
        return [int(t) for t in ids]

    def decode(self, ids: Sequence[int]) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode(list(ids), skip_special_tokens=True)

    def token_text(self, token_id: int) -> str | None:
        if self.tokenizer is None:
            return None
        return self.tokenizer.decode([token_id])


def _sample(logits: torch.Tensor, spec: SamplingSpec, gen: torch.Generator) -> tuple[int, float]:
    """Pick one token; its log-probability is taken after temperature, before top-k/top-p."""
    if spec.greedy:
        logp = torch.log_softmax(logits, dim=-1)
        tok = int(torch.argmax(logits))
        return tok, float(logp[tok])
    scaled = logits / spec.temperature
    logp = torch.log_softmax(scaled, dim=-1)
    masked = scaled.clone()
    if spec.top_k > 0 and spec.top_k < masked.numel():
        kth = torch.topk(masked, spec.top_k).values[-1]
        masked[masked < kth] = float("-inf")
    if spec.top_p < 1.0:
        sorted_logits, order = torch.sort(masked, descending=True)
        cum = torch.cumsum(torch.softmax(sorted_logits, dim=-1), dim=-1)
        drop = cum - torch.softmax(sorted_logits, dim=-1) > spec.top_p
        masked[order[drop]] = float("-inf")
    probs = torch.softmax(masked, dim=-1)
    tok = int(torch.multinomial(probs, 1, generator=gen))
    return tok, float(logp[tok])


def _urandom8() -> bytes:
    import os

    return os.urandom(8)


def _load_tokenizer(model_dir: Path) -> Any:
    if not (model_dir / "tokenizer.json").exists() and not (model_dir / "tokenizer_config.json").exists():
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(model_dir, local_files_only=True)


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids: set[int] = set()
    for src in (getattr(model, "generation_config", None), model.config):
        eos = getattr(src, "eos_token_id", None)
        if eos is None:
            continue
        ids.update([eos] if isinstance(eos, int) else eos)
    if tokenizer is not None and tokenizer.eos_token_id is not None:
        ids.add(int(tokenizer.eos_token_id))
    return ids
