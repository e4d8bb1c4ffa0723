"""Ray, the cluster engine RL jobs run on (optional extra ``[ray]``; Ray is imported only in
this package, which nothing else in the library imports).

- :func:`collect_on_ray`: ``collect`` spread over N collector actors, each with its share of
  the engine endpoints and its own writer into one dataset URI; one combined summary. A worker
  that dies loses nothing it published; what it had not published is collected again by the
  others (``docs/ray.md``).
- :func:`put_samples` / :func:`handoff_batch` and :class:`HandoffSource`: checked samples as
  Arrow record batches in Ray's object store, and a ``Mapping[str, RoutedSample]`` over them
  for ``RoutingReplay(source=...)``: a hand-off with no disk, under the same checks.
"""

from ._collector import Collector
from ._driver import (NAMESPACE, ProgressFn, assign_endpoints, collect_on_ray,
                      collect_with_tally, merge_tallies)
from ._handoff import HandoffError, HandoffSource, handoff_batch, put_samples
from ._transport import RoundRobinTransport

__all__ = [
    "Collector",
    "HandoffError",
    "HandoffSource",
    "NAMESPACE",
    "ProgressFn",
    "RoundRobinTransport",
    "assign_endpoints",
    "collect_on_ray",
    "collect_with_tally",
    "handoff_batch",
    "merge_tallies",
    "put_samples",
]
