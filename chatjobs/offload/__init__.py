"""Offloading eligible jobs to a provider's own batch API (docs/design-offload.md).

``BATCH_UPSTREAMS`` names each implementation's module and class, imported only when a route
uses it, so a models file may name only the ones this install has.
"""

from __future__ import annotations

import importlib
import importlib.util
from functools import cache
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from chatjobs.offload.upstream import BatchUpstream

# The models file's ``offload`` value -> (module, class).
BATCH_UPSTREAMS: dict[str, tuple[str, str]] = {
    "openai-batch": ("chatjobs.offload.openai_batch", "OpenAIBatch"),
    "anthropic-batch": ("chatjobs.offload.anthropic_batch", "AnthropicBatch"),
}


def available() -> list[str]:
    """The offload values whose implementation is installed."""
    return [
        name
        for name, (module, _) in BATCH_UPSTREAMS.items()
        if importlib.util.find_spec(module) is not None
    ]


@cache
def batch_upstream(name: str) -> BatchUpstream:
    """The implementation of one ``offload`` value."""
    module, attribute = BATCH_UPSTREAMS[name]
    upstream: BatchUpstream = getattr(importlib.import_module(module), attribute)()
    return upstream
