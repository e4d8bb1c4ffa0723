"""The rollout client: ask an inference engine for rollouts and get every sample's routing
back checked, ready for the shard writer.

.. code-block:: python

    async with RolloutClient("http://127.0.0.1:30000", "sglang", geometry) as client:
        results = await client.generate(Prompt("p0", input_ids), samples=8)
        good = [r.sample for r in results if r.ok]

:func:`collect` drives a whole prompt file into a shard directory with bounded memory.
The client reaches the engine through a transport: :class:`HTTPTransport` by default, or any
:class:`BaseTransport` given as ``RolloutClient(..., transport=...)``, such as a
:class:`MockTransport` that answers from a function without sockets. :func:`free_port` and
:func:`wait_healthy` start-and-wait an engine process before the client talks to it.
Credentials (the API key, a ``user:password@`` in the endpoint) never reach an error message,
a log line or a quarantine record: :func:`redact` is the one rule.
"""

from ..protocols import SamplingParams
from ._client import Exchange, JoinError, RolloutClient, SampleResult, join_turns
from ._collect import CollectSummary, collect
from ._health import NotHealthyError, free_port, wait_healthy
from ._http import HTTPError, HTTPTransport, ResponseTooLarge
from ._prompts import Prompt, PromptError, read_prompts, sample_ids_for
from ._redact import redact
from ._transport import BaseTransport, MockTransport, RetryPolicy, TransportError

__all__ = [
    "BaseTransport",
    "CollectSummary",
    "Exchange",
    "HTTPError",
    "HTTPTransport",
    "JoinError",
    "MockTransport",
    "NotHealthyError",
    "Prompt",
    "PromptError",
    "ResponseTooLarge",
    "RetryPolicy",
    "RolloutClient",
    "SampleResult",
    "SamplingParams",
    "TransportError",
    "collect",
    "free_port",
    "join_turns",
    "read_prompts",
    "redact",
    "sample_ids_for",
    "wait_healthy",
]
