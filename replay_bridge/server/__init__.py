"""The reference engine: a transformers MoE model served over SGLang's protocol, on CPU.

It captures the real router top-k of every layer (hooks on the gates) during KV-cache
generation, and serves it as SGLang does: ``/generate`` and ``/v1/completions`` with
``routed_experts``, unified or as a prefill/decode pair behind a merging router, with optional
injected faults. Needs the ``server`` extra (torch, transformers, aiohttp).
"""

from ._app import ROLES, WorkerConfig, make_worker_app
from ._faults import FAULTS, ROUTER_FAULTS, WORKER_FAULTS
from ._launch import PDUrls, in_background, serve_app, serve_pd, serve_router, serve_worker
from ._model import Engine, Generation, SamplingSpec
from ._router import RouterConfig, make_router_app
from .tiny_model import make_tiny_model

__all__ = [
    "FAULTS",
    "ROLES",
    "ROUTER_FAULTS",
    "WORKER_FAULTS",
    "Engine",
    "Generation",
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
