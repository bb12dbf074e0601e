"""Build the provider client that a :class:`~worker.settings.ProviderConfig` names."""

from __future__ import annotations

from worker.providers import Provider
from worker.providers.http import RequestObserver
from worker.providers.telnyx import TelnyxClient
from worker.providers.vinix import VinixClient
from worker.settings import ProviderConfig


def make_provider(config: ProviderConfig, observer: RequestObserver | None = None) -> Provider:
    """A :class:`VinixClient` or :class:`TelnyxClient` for ``config.name``."""
    if config.name == "vinix":
        return VinixClient(config, observer=observer)
    if config.name == "telnyx":
        return TelnyxClient(config, observer)
    raise ValueError(f"unknown provider {config.name!r}")
