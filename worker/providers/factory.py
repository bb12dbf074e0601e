"""Build the provider client that a :class:`~worker.settings.ProviderConfig` names."""

from __future__ import annotations

import httpx

from worker.providers import Provider
from worker.providers.http import RequestObserver
from worker.providers.telnyx import TelnyxClient
from worker.providers.vinix import VinixClient
from worker.settings import ProviderConfig


def make_provider(
    config: ProviderConfig,
    observer: RequestObserver | None = None,
    *,
    transport: httpx.AsyncBaseTransport | None = None,
) -> Provider:
    """A :class:`VinixClient` or :class:`TelnyxClient` for ``config.name``; ``transport``
    replaces its pool's transport (tests hand in ``httpx.MockTransport``)."""
    if config.name == "vinix":
        return VinixClient(config, observer=observer, transport=transport)
    if config.name == "telnyx":
        return TelnyxClient(config, observer, transport=transport)
    raise ValueError(f"unknown provider {config.name!r}")
