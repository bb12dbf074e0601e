"""conference-worker: carries out telephony conference commands from RabbitMQ.

Nothing happens on import.  The entry points are the ``conference-worker`` CLI
(:mod:`worker.cli`) and, for embedding, :class:`worker.app.service.Service` built from
:class:`worker.settings.Settings` (both re-exported here lazily).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.app.service import Service
    from worker.settings import Settings

__all__ = ["Service", "Settings"]


def __getattr__(name: str) -> Any:
    if name == "Service":
        from worker.app.service import Service

        return Service
    if name == "Settings":
        from worker.settings import Settings

        return Settings
    raise AttributeError(name)
