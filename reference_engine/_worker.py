"""A worker's request handling: SGLang request -> sequences -> engine -> SGLang response.

A worker has a role. ``unified`` runs the whole request. In PD disaggregation, ``prefill`` runs
the prompt and samples the first token, returning the prompt rows; ``decode`` never records the
prompt forward (in SGLang it receives the KV cache instead), so its prompt rows stay the zeros
of a fresh capture buffer; it returns no ``routed_experts`` when the first token already
finished the request. Both workers of one request derive the sampling seed from
``bootstrap_room`` so they produce the same tokens.
"""

from __future__ import annotations

import asyncio
import hashlib
import uuid
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import Any

import orjson

from replay_bridge.protocols import get_protocol

from ._faults import apply_rows_fault, stale_rows
from ._model import Generation, ModelRunner, SamplingSpec

__all__ = ["ROLES", "Item", "RequestError", "Worker", "WorkerConfig"]

ROLES = ("unified", "prefill", "decode")
SGLANG = get_protocol("sglang")
_MAX_SEED = 2**63


class RequestError(ValueError):
    """A request the worker refuses (HTTP 400)."""


@dataclass
class WorkerConfig:
    """What distinguishes one worker from another serving the same model."""

    role: str = "unified"
    fault: str | None = None
    weight_version: str = "default"
    model_name: str | None = None
    return_routed_experts: bool = True  # SGLang's --enable-return-routed-experts

    def __post_init__(self) -> None:
        if self.role not in ROLES:
            raise ValueError(f"role must be one of {', '.join(ROLES)}, got {self.role!r}")


@dataclass
class Item:
    """One sequence of a (possibly batched) request."""

    rid: str
    prompt: list[int]
    spec: SamplingSpec
    start_len: int
    return_routed: bool
    return_logprob: bool
    logprob_start: int = 0
    prompt_from_text: bool = False


@dataclass
class Worker:
    """One engine in one role: turns SGLang requests into generations and responses."""

    runner: ModelRunner
    config: WorkerConfig
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="engine")
    )
    last_routing: Any = None  # the previous request's capture (for stale-prompt-rows)

    # ---- one sequence --------------------------------------------------------------------

    async def run(self, item: Item, on_token: Any = None) -> Generation:
        """Generate one sequence in the engine thread.

        The weight version in force when each token was sampled is recorded, so a version
        update during generation splits ``weight_versions`` into spans.
        """
        role = self.config.role
        spec = item.spec
        if role == "prefill":
            spec = replace(spec, max_new_tokens=min(spec.max_new_tokens, 1))
        versions: list[str] = []

        def token(tok: int, lp: float) -> None:
            versions.append(self.config.weight_version)
            if on_token is not None:
                on_token(tok, lp)

        loop = asyncio.get_running_loop()
        gen = await loop.run_in_executor(
            self.executor,
            lambda: self.runner.generate(
                item.prompt, spec, capture_prompt=role != "decode", on_token=token,
                # A decode worker never ran the prompt: it has no prompt log-probs.
                input_logprob_start=item.logprob_start
                if item.return_logprob and role != "decode" else None),
        )
        gen.extra["versions"] = versions
        gen.extra["earlier_routing"], self.last_routing = self.last_routing, gen.routing
        return gen

    def meta_info(self, item: Item, gen: Generation, *, final: bool = True) -> dict[str, Any]:
        n_out = len(gen.output_ids)
        meta: dict[str, Any] = {
            "id": item.rid,
            "finish_reason": gen.finish_reason if final else None,
            "prompt_tokens": gen.prompt_len,
            "completion_tokens": n_out,
            "cached_tokens": 0,
            "weight_version": self.config.weight_version,
            "weight_versions": _spans(gen.extra.get("versions"), n_out,
                                      self.config.weight_version),
            "e2e_latency": gen.latency_s,
        }
        if item.return_logprob:
            inputs = gen.extra.get("input_logprobs") or []
            meta["input_token_logprobs"] = [
                [lp, tok, None] for lp, tok in zip(inputs, item.prompt[item.logprob_start:])
            ]
            meta["output_token_logprobs"] = [
                [lp, tok, None] for lp, tok in zip(gen.logprobs, gen.output_ids)
            ]
        if final and self._returns_routing(item, gen):
            rows = gen.routing[item.start_len :]
            prompt_rows = gen.prompt_len - item.start_len
            if self.config.fault == "stale-prompt-rows":
                rows = stale_rows(rows, prompt_rows, gen.extra.get("earlier_routing"))
            rows = apply_rows_fault(self.config.fault, rows, prompt_rows,
                                    self.runner.geometry.moe_layers)
            meta["routed_experts"] = SGLANG.encode_routing(rows)
        return meta

    def _returns_routing(self, item: Item, gen: Generation) -> bool:
        if not (item.return_routed and self.config.return_routed_experts):
            return False
        if self.config.fault == "drop-routed-experts":
            return False
        # Decode's quick-finish case: prefill's first token already ended the request.
        return not (self.config.role == "decode" and len(gen.output_ids) <= 1)

    def body(self, item: Item, gen: Generation) -> dict[str, Any]:
        out: dict[str, Any] = {}
        text = self.runner.decode(gen.output_ids)
        if text is not None:
            out["text"] = text
        out["output_ids"] = list(gen.output_ids)
        out["meta_info"] = self.meta_info(item, gen)
        if item.prompt_from_text:
            out["prompt_token_ids"] = list(item.prompt)
        return out

    # ---- parsing -------------------------------------------------------------------------

    def items(self, body: dict[str, Any]) -> tuple[list[Item], bool]:
        """The request's sequences, and whether it was batched (list input)."""
        if not isinstance(body, dict):
            raise RequestError("the request body must be a JSON object")
        text, ids = body.get("text"), body.get("input_ids")
        if ids is not None:
            if not isinstance(ids, list) or not ids:
                raise RequestError("input_ids must be a non-empty list")
            batched = isinstance(ids[0], list)
            prompts = ids if batched else [ids]
            from_text = False
        elif text is not None:
            batched = isinstance(text, list)
            texts = text if batched else [text]
            if not all(isinstance(t, str) for t in texts):
                raise RequestError("text must be a string or a list of strings")
            try:
                prompts = [self.runner.encode(t) for t in texts]
            except ValueError as e:
                raise RequestError(str(e)) from None
            from_text = True
        else:
            raise RequestError("the request needs input_ids or text")
        n = len(prompts)
        sps = _per_item(body.get("sampling_params") or {}, n, "sampling_params")
        rids = _per_item(body.get("rid"), n, "rid")
        rooms = _per_item(body.get("bootstrap_room"), n, "bootstrap_room")
        logprob = _per_item(body.get("return_logprob", False), n, "return_logprob")
        lp_start = body.get("logprob_start_len", -1)
        if not isinstance(lp_start, int) or isinstance(lp_start, bool) or lp_start < -1:
            raise RequestError(f"logprob_start_len must be an integer >= -1, got {lp_start!r}")
        start = SGLANG.requested_start(body)
        if not isinstance(start, int) or isinstance(start, bool):
            raise RequestError(f"{SGLANG.start_field} must be an integer, got {start!r}")
        items = []
        for i, prompt in enumerate(prompts):
            if not isinstance(prompt, list) or not prompt or not all(
                isinstance(t, int) and not isinstance(t, bool) for t in prompt
            ):
                raise RequestError(f"item {i}: input_ids must be a non-empty list of integers")
            if not 0 <= start <= len(prompt):
                raise RequestError(
                    f"item {i}: {SGLANG.start_field}={start} must be in "
                    f"[0, prompt_len={len(prompt)}]"
                )
            if lp_start >= len(prompt):
                raise RequestError(f"item {i}: logprob_start_len={lp_start} must be below "
                                   f"prompt_len={len(prompt)}")
            spec = _spec(sps[i], i)
            spec = replace(spec, seed=self._seed(spec.seed, rooms[i], prompt, sps[i]))
            items.append(Item(
                rid=str(rids[i]) if rids[i] is not None else uuid.uuid4().hex,
                prompt=prompt,
                spec=spec,
                start_len=start,
                return_routed=bool(body.get("return_routed_experts", False)),
                return_logprob=bool(logprob[i]),
                # SGLang's default -1: the last prompt token only.
                logprob_start=len(prompt) - 1 if lp_start == -1 else lp_start,
                prompt_from_text=from_text,
            ))
        return items, batched

    def _seed(self, explicit: int | None, room: Any, prompt: list[int],
              sampling_params: dict[str, Any]) -> int | None:
        """The sampling seed: explicit, else from ``bootstrap_room`` (shared by both PD workers),
        else, on a PD worker, from the request content, else none (fresh randomness)."""
        if explicit is not None:
            return explicit % _MAX_SEED
        if room is not None:
            return int(room) % _MAX_SEED
        if self.config.role != "unified":
            digest = hashlib.sha256(orjson.dumps([prompt, sampling_params],
                                                 option=orjson.OPT_SORT_KEYS)).digest()
            return int.from_bytes(digest[:8], "little") % _MAX_SEED
        return None


def _spans(versions: list[str] | None, n_out: int, current: str) -> list[dict[str, Any]]:
    """Run-length spans ``{"version", "start", "end"}`` over the output tokens."""
    if not versions or len(versions) != n_out:
        return [{"version": current, "start": 0, "end": n_out}]
    spans: list[dict[str, Any]] = []
    for i, v in enumerate(versions):
        if spans and spans[-1]["version"] == v:
            spans[-1]["end"] = i + 1
        else:
            spans.append({"version": v, "start": i, "end": i + 1})
    return spans


def _per_item(value: Any, n: int, name: str) -> list[Any]:
    """A per-request field: a list gives one value per prompt, anything else applies to all."""
    if isinstance(value, list):
        if len(value) != n:
            raise RequestError(f"{name} has {len(value)} entries for {n} prompts")
        return list(value)
    return [value] * n


def _spec(sp: Any, i: int) -> SamplingSpec:
    if not isinstance(sp, dict):
        raise RequestError(f"item {i}: sampling_params must be an object")
    if sp.get("stop"):
        raise RequestError(f"item {i}: stop strings are not supported by this engine; "
                           "use stop_token_ids")
    try:
        stop_ids = sp.get("stop_token_ids") or ()
        seed = sp.get("sampling_seed", sp.get("seed"))
        spec = SamplingSpec(
            max_new_tokens=int(sp.get("max_new_tokens", 128)),
            temperature=float(sp.get("temperature", 1.0)),
            top_p=float(sp.get("top_p", 1.0)),
            top_k=int(sp.get("top_k", -1)),
            stop_token_ids=tuple(int(t) for t in stop_ids),
            ignore_eos=bool(sp.get("ignore_eos", False)),
            seed=None if seed is None else int(seed),
        )
    except (TypeError, ValueError) as e:
        raise RequestError(f"item {i}: bad sampling_params: {e}") from None
    if spec.max_new_tokens < 0:
        raise RequestError(f"item {i}: max_new_tokens must be >= 0")
    if spec.temperature < 0 or not 0 < spec.top_p <= 1:
        raise RequestError(f"item {i}: temperature must be >= 0 and top_p in (0, 1]")
    return spec
