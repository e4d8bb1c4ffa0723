"""The reference engine: a transformers MoE model served over SGLang's protocol, on CPU.

It captures the real router top-k of every layer (hooks on the gates) during KV-cache
generation, and serves it as SGLang does: ``/generate`` and ``/v1/completions`` with
``routed_experts``, unified or as a prefill/decode pair behind a merging router, with optional
injected faults. Needs the ``server`` extra (torch, transformers, aiohttp).
"""

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ._app import make_worker_app
    from ._faults import FAULTS, ROUTER_FAULTS, WORKER_FAULTS
    from ._launch import PDUrls, in_background, serve_app, serve_pd, serve_router, serve_worker
    from ._model import Generation, ModelRunner, SamplingSpec
    from ._pd_router import RouterConfig, make_router_app
    from ._worker import ROLES, WorkerConfig
    from .tiny_model import make_tiny_model

# Imported on first use, so that a router process never loads torch.
_HOMES = {
    "ROLES": "_worker", "WorkerConfig": "_worker", "make_worker_app": "_app",
    "FAULTS": "_faults", "ROUTER_FAULTS": "_faults", "WORKER_FAULTS": "_faults",
    "PDUrls": "_launch", "in_background": "_launch", "serve_app": "_launch",
    "serve_pd": "_launch", "serve_router": "_launch", "serve_worker": "_launch",
    "Generation": "_model", "ModelRunner": "_model", "SamplingSpec": "_model",
    "RouterConfig": "_pd_router", "make_router_app": "_pd_router",
    "make_tiny_model": "tiny_model",
}


def __getattr__(name: str) -> Any:
    home = _HOMES.get(name)
    if home is None:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    import importlib

    return getattr(importlib.import_module(f".{home}", __name__), name)


__all__ = [
    "FAULTS",
    "ROLES",
    "ROUTER_FAULTS",
    "WORKER_FAULTS",
    "Generation",
    "ModelRunner",
    "PDUrls",
    "RouterConfig",
    "SamplingSpec",
    "WorkerConfig",
    "in_background",
    "make_router_app",
    "make_tiny_model",
    "make_worker_app",
    "serve_app",
    "serve_pd",
    "serve_router",
    "serve_worker",
]
