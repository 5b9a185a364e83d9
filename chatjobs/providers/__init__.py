"""One adapter per upstream wire shape, chosen by the route's ``provider``.

Each adapter (chatjobs.providers.base.Adapter) builds the HTTP request and parses the answer,
the error and the stream of one provider; chatjobs.upstream sends and times the call. Adding
a provider is one module here and one line in ``ADAPTERS``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from chatjobs.providers.ai_gateway import AIGatewayAdapter
from chatjobs.providers.azure import AzureAdapter
from chatjobs.providers.base import Adapter, CallContext, Outgoing, Parsed
from chatjobs.providers.openai import OpenAIAdapter
from chatjobs.providers.workers_ai import WorkersAIAdapter

if TYPE_CHECKING:
    from chatjobs.routing import Route

ADAPTERS: dict[str, Adapter] = {
    adapter.name: adapter
    for adapter in (OpenAIAdapter(), WorkersAIAdapter(), AIGatewayAdapter(), AzureAdapter())
}


def for_route(route: Route) -> Adapter:
    """The adapter for the route's provider."""
    return ADAPTERS[route.provider]


__all__ = ["ADAPTERS", "Adapter", "CallContext", "Outgoing", "Parsed", "for_route"]
