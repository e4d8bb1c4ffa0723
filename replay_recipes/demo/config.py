"""The demo's configuration: a YAML file (``default.yaml`` ships with the package) read into
typed, validated dataclasses, with ``section.key=value`` overrides."""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, is_dataclass
from pathlib import Path
from typing import Any

import yaml

__all__ = [
    "CollectConfig",
    "ConfigError",
    "DEFAULT_CONFIG",
    "DemoConfig",
    "EngineConfig",
    "ModelConfig",
    "TrainConfig",
    "load_config",
]

DEFAULT_CONFIG = Path(__file__).with_name("default.yaml")
ENGINES = ("reference", "vllm")
TRAINERS = ("megatron", "hf")
"""``train.trainer``: megatron-core (``trainer_hooks.megatron``) or Hugging Face transformers
(``trainer_hooks.hf``), the hooks ``routing_replay.trainer`` selects."""


class ConfigError(ValueError):
    """A demo configuration that cannot run; the message names the key."""


@dataclass(frozen=True)
class ModelConfig:
    dir: str | None = None
    tiny_seed: int = 0


@dataclass(frozen=True)
class EngineConfig:
    kind: str = "reference"
    dtype: str = "bfloat16"
    endpoint: str | None = None
    start_vllm: bool = False
    vllm_python: str = ".venv-vllm/bin/python"
    startup_timeout_s: float = 240.0


@dataclass(frozen=True)
class CollectConfig:
    prompts: int = 16
    samples_per_prompt: int = 4
    routed_start: int = 2
    """Routing is asked for from this token position on (with the reference engine; vLLM is
    always asked for every position); the trainer routes the positions before it natively
    (counted apart as native rows)."""
    max_new_tokens: int = 64
    temperature: float = 1.0
    concurrency: int = 8
    request_timeout_s: float = 120.0


@dataclass(frozen=True)
class TrainConfig:
    steps: int = 4
    micro_batch_size: int = 16
    lr: float = 1e-4
    clip_eps: float = 0.2
    reward_vocab_fraction: float = 0.5
    reward_seed: int = 0
    threads: int = 2
    trainer: str = "megatron"


@dataclass(frozen=True)
class DemoConfig:
    out: str = "out/demo"
    model: ModelConfig = field(default_factory=ModelConfig)
    engine: EngineConfig = field(default_factory=EngineConfig)
    collect: CollectConfig = field(default_factory=CollectConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def __post_init__(self) -> None:
        e, c, t = self.engine, self.collect, self.train
        if e.kind not in ENGINES:
            raise ConfigError(f"engine.kind must be one of {', '.join(ENGINES)}, got {e.kind!r}")
        if t.trainer not in TRAINERS:
            raise ConfigError(f"train.trainer must be one of {', '.join(TRAINERS)}, got "
                              f"{t.trainer!r}")
        if e.kind == "vllm" and not (e.endpoint or e.start_vllm):
            raise ConfigError("engine.kind=vllm needs engine.endpoint (--endpoint URL) or "
                              "engine.start_vllm (--start-vllm)")
        if e.kind == "vllm" and e.endpoint and e.start_vllm:
            raise ConfigError("give engine.endpoint or engine.start_vllm, not both")
        if e.kind == "reference" and (e.endpoint or e.start_vllm):
            raise ConfigError("engine.endpoint / engine.start_vllm need engine.kind=vllm")
        if e.kind == "vllm" and e.endpoint and not self.model.dir:
            raise ConfigError("with engine.endpoint, model.dir (--model) must name the "
                              "checkpoint that server serves: the trainer loads the same weights")
        if e.endpoint and not e.endpoint.startswith(("http://", "https://")):
            raise ConfigError(f"engine.endpoint must be an http(s) URL, got {e.endpoint!r}")
        for name, value, low in (
            ("collect.prompts", c.prompts, 1),
            ("collect.samples_per_prompt", c.samples_per_prompt, 2),
            ("collect.max_new_tokens", c.max_new_tokens, 1),
            ("collect.concurrency", c.concurrency, 1),
            ("train.steps", t.steps, 1),
            ("train.micro_batch_size", t.micro_batch_size, 1),
            ("train.threads", t.threads, 1),
        ):
            if value < low:
                raise ConfigError(f"{name} must be >= {low}, got {value}")
        if c.routed_start < 0:
            raise ConfigError(f"collect.routed_start must be >= 0, got {c.routed_start}")
        if c.temperature <= 0:
            raise ConfigError("collect.temperature must be > 0 (log-probs are compared at this "
                              "temperature)")
        if e.kind == "vllm" and c.temperature != 1.0:
            raise ConfigError("engine.kind=vllm needs collect.temperature=1.0: vLLM returns "
                              "log-probs of the raw logits, before temperature")
        if not 0 < t.reward_vocab_fraction < 1:
            raise ConfigError("train.reward_vocab_fraction must be in (0, 1)")
        if t.lr <= 0 or t.clip_eps <= 0:
            raise ConfigError("train.lr and train.clip_eps must be > 0")

    @property
    def out_dir(self) -> Path:
        return Path(self.out)

    def to_dict(self) -> dict[str, Any]:
        return _as_dict(self)


def _as_dict(obj: Any) -> dict[str, Any]:
    return {f.name: (_as_dict(v) if is_dataclass(v := getattr(obj, f.name)) else v)
            for f in fields(obj)}


def _build(cls: type, data: Any, where: str) -> Any:
    if data is None:
        return cls()
    if not isinstance(data, dict):
        raise ConfigError(f"{where or 'the config'} must be a mapping, got {type(data).__name__}")
    known = {f.name: f for f in fields(cls)}
    unknown = sorted(set(data) - set(known))
    if unknown:
        raise ConfigError(f"unknown key(s) {', '.join(where + k for k in unknown)}; known: "
                          f"{', '.join(where + k for k in known)}")
    defaults = cls()
    kwargs: dict[str, Any] = {}
    for name, value in data.items():
        default = getattr(defaults, name)
        if name in _NESTED:
            kwargs[name] = _build(_NESTED[name], value, f"{name}.")
        else:
            kwargs[name] = _coerce(value, default, where + name)
    return cls(**kwargs)


_NESTED = {"model": ModelConfig, "engine": EngineConfig, "collect": CollectConfig,
           "train": TrainConfig}


def _coerce(value: Any, default: Any, key: str) -> Any:
    """Check a value against its default's type (ints widen to floats); keys whose default is
    ``None`` take a string (a path or a URL)."""
    if value is None:
        return value
    if default is None:
        if isinstance(value, str):
            return value
        raise ConfigError(f"{key} must be a string, got {value!r}")
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, int):
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(default, str):
        if isinstance(value, str):
            return value
    raise ConfigError(f"{key} must be a {type(default).__name__}, got {value!r}")


def _parse_override(item: str) -> tuple[list[str], Any]:
    key, sep, raw = item.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {item!r} must look like section.key=value")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError as e:
        raise ConfigError(f"override {item!r}: value is not YAML: {e}") from None
    return key.strip().split("."), value


def load_config(
    path: str | os.PathLike[str] | None = None,
    overrides: dict[str, Any] | None = None,
    sets: list[str] | None = None,
) -> DemoConfig:
    """The configuration in ``path`` (the packaged ``default.yaml`` when ``None``), then
    ``sets`` (``["train.steps=2", ...]``), then ``overrides`` (dotted keys, ``None`` values
    ignored: what a command line left unset)."""
    p = Path(path) if path is not None else DEFAULT_CONFIG
    try:
        data = yaml.safe_load(p.read_text()) or {}
    except OSError as e:
        raise ConfigError(f"cannot read the demo config {p}: {e}") from None
    except yaml.YAMLError as e:
        raise ConfigError(f"{p} is not YAML: {e}") from None
    if not isinstance(data, dict):
        raise ConfigError(f"{p} must hold a mapping")
    pairs = [_parse_override(s) for s in sets or []]
    pairs += [(k.split("."), v) for k, v in (overrides or {}).items() if v is not None]
    for keys, value in pairs:
        node = data
        for k in keys[:-1]:
            child = node.get(k)
            if child is None:
                child = node[k] = {}
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(keys)}: {k} is not a section")
            node = child
        node[keys[-1]] = value
    return _build(DemoConfig, data, "")

