"""The rollout client: ask an inference engine for rollouts and get every sample's routing
back checked, ready for the shard writer.

.. code-block:: python

    async with RolloutClient("http://127.0.0.1:30000", "sglang", geometry) as client:
        results = await client.generate(Prompt("p0", input_ids), samples=8)
        good = [r.sample for r in results if r.ok]

:func:`collect` drives a whole prompt file into a shard directory with bounded memory.
"""

from ._client import Exchange, JoinError, RolloutClient, SampleResult, join_turns
from ._collect import CollectSummary, collect
from ._http import HTTPError, ResponseTooLarge, RetryPolicy, TransportError
from ._prompts import Prompt, PromptError, read_prompts, sample_ids_for
from ._requests import SamplingParams

__all__ = [
    "CollectSummary",
    "Exchange",
    "HTTPError",
    "JoinError",
    "Prompt",
    "PromptError",
    "ResponseTooLarge",
    "RetryPolicy",
    "RolloutClient",
    "SampleResult",
    "SamplingParams",
    "TransportError",
    "collect",
    "join_turns",
    "read_prompts",
    "sample_ids_for",
]
