"""Build the provider client that a :class:`~worker.settings.ProviderConfig` names."""

from __future__ import annotations

from worker.providers import Provider
from worker.providers.telnyx import TelnyxClient
from worker.providers.vinix import VinixClient
from worker.settings import ProviderConfig


def make_provider(config: ProviderConfig) -> Provider:
    """A :class:`VinixClient` or :class:`TelnyxClient` for ``config.name``."""
    if config.name == "vinix":
        return VinixClient(config)
    if config.name == "telnyx":
        return TelnyxClient(config)
    raise ValueError(f"unknown provider {config.name!r}")
