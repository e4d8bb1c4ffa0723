"""Prompts: what a rollout is asked for, and reading them from JSONL."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

from ..sample import field_problem

__all__ = ["Prompt", "PromptError", "read_prompts", "sample_ids_for"]


class PromptError(ValueError):
    """A prompt line that cannot be used; the message names the file and line."""


@dataclass(frozen=True, slots=True)
class Prompt:
    """One prompt: its id (also the GRPO group id of its samples) and its token ids, or chat
    ``messages`` (OpenAI chat endpoints only; the server applies the chat template and returns
    the prompt's token ids)."""

    prompt_id: str
    input_ids: Sequence[int] = ()
    policy_version: int | None = None
    messages: Sequence[dict[str, Any]] | None = None


def sample_ids_for(prompt_id: str, samples: int) -> list[str]:
    """Sample ids of a prompt's samples: the prompt id itself for one sample, else
    ``<prompt_id>/<i>``."""
    if samples == 1:
        return [prompt_id]
    return [f"{prompt_id}/{i}" for i in range(samples)]


Tokenize = Callable[[str], list[int]]


def tokenizer_for(model_dir: str | Path) -> Tokenize:
    """The model's tokenizer (transformers ``AutoTokenizer``, local files only)."""
    try:
        from transformers import AutoTokenizer
    except ImportError as e:  # pragma: no cover - depends on the install
        raise PromptError("text prompts need transformers (pip install "
                          "'routing-replay-bridge[server]') or input_ids in the file") from e
    try:
        tok = AutoTokenizer.from_pretrained(str(model_dir), local_files_only=True)
    except Exception as e:  # noqa: BLE001 - transformers raises many kinds here
        raise PromptError(f"cannot load a tokenizer from {model_dir}: {e}") from e

    def encode(text: str) -> list[int]:
        return list(tok(text, add_special_tokens=True)["input_ids"])

    return encode


def _token_list(value: Any, where: str) -> list[int]:
    if not isinstance(value, list) or not value:
        raise PromptError(f"{where}: input_ids must be a non-empty list of token ids")
    if not all(isinstance(t, int) and not isinstance(t, bool) and t >= 0 for t in value):
        raise PromptError(f"{where}: input_ids must hold non-negative integers")
    return value


def _policy_version(obj: dict[str, Any], where: str) -> int | None:
    """The line's ``policy_version``: absent or ``null`` -> ``None``; an integer (not a bool) in
    int64; anything else is a :class:`PromptError` naming the line (never silently dropped)."""
    version = obj.get("policy_version")
    if version is None:
        return None
    if field_problem("policy_version", version) is not None:
        raise PromptError(f"{where}: policy_version must be an integer, got {version!r}")
    return version


def read_prompts(
    path: str | Path, *, tokenizer: str | Path | None = None
) -> Iterator[Prompt]:
    """Prompts from JSONL lines ``{"prompt_id", "input_ids"}``, ``{"prompt_id", "text"}`` or
    ``{"prompt_id", "messages"}`` (chat), read lazily. Text is tokenized with the tokenizer in
    the model directory ``tokenizer`` (loaded on the first text line). Raises
    :class:`PromptError` naming the line on bad input, including a repeated ``prompt_id``."""
    encode: Tokenize | None = None
    seen: set[str] = set()
    with open(path, "rb") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            where = f"{path}:{lineno}"
            try:
                obj = orjson.loads(line)
            except orjson.JSONDecodeError as e:
                raise PromptError(f"{where}: not JSON: {e}") from None
            if not isinstance(obj, dict):
                raise PromptError(f"{where}: expected a JSON object")
            pid = obj.get("prompt_id")
            if pid is None or isinstance(pid, (dict, list, bool)) or str(pid) == "":
                raise PromptError(f"{where}: needs a prompt_id (string or number)")
            pid = str(pid)
            if "/" in pid:
                raise PromptError(f"{where}: prompt_id {pid!r} must not contain '/' "
                                  "(it separates the sample index)")
            if pid in seen:
                raise PromptError(f"{where}: prompt_id {pid!r} repeats an earlier line")
            seen.add(pid)
            if "input_ids" in obj:
                ids = _token_list(obj["input_ids"], where)
            elif "messages" in obj:
                msgs = obj["messages"]
                if not isinstance(msgs, list) or not msgs or not all(
                        isinstance(m, dict) and isinstance(m.get("role"), str) for m in msgs):
                    raise PromptError(f"{where}: messages must be a non-empty list of "
                                      '{"role", "content"} objects')
                yield Prompt(pid, (), _policy_version(obj, where), msgs)
                continue
            elif isinstance(obj.get("text"), str):
                if tokenizer is None:
                    raise PromptError(f"{where}: a text prompt needs the model's tokenizer "
                                      "(--model must be a model directory)")
                if encode is None:
                    encode = tokenizer_for(tokenizer)
                ids = _token_list(encode(obj["text"]), where)
            else:
                raise PromptError(f"{where}: needs input_ids, text or messages")
            yield Prompt(pid, ids, _policy_version(obj, where))
