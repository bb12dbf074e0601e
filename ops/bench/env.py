"""The environment of a ``python -m worker run`` process against an in-process sandbox.

Used by the soak benchmark (``ops/bench/soak.py``) and by the integration and chaos tests
(``tests/integration/conftest.py``), which start worker processes the same way.  It lives here
because ops/ does not import from tests/; the tests may import ``ops.bench``.
"""

from __future__ import annotations

import os
from typing import Any

from worker.sandbox import Sandbox
from worker.settings import Settings


def worker_env(
    settings: Settings, sandbox: Sandbox, *, amqp_url: str, dedup_url: str, **overrides: Any
) -> dict[str, str]:
    """Environment for a worker on the topology of ``settings``, its providers at ``sandbox``.

    This process's environment without its ``CW_`` variables, plus the broker and dedup URLs, the
    topology's names, both providers at the sandbox with its keys, WARNING logs and any free HTTP
    port; each ``overrides`` item ``name=value`` is then set as ``CW_NAME``.
    """
    fx = sandbox.fixtures
    env = {k: v for k, v in os.environ.items() if not k.startswith("CW_")}
    env.update(
        {
            "CW_AMQP_URL": amqp_url,
            "CW_DEDUP_URL": dedup_url,
            "CW_COMMANDS_EXCHANGE": settings.commands_exchange,
            "CW_COMMANDS_QUEUE": settings.commands_queue,
            "CW_RESULTS_EXCHANGE": settings.results_exchange,
            "CW_DEAD_EXCHANGE": settings.dead_exchange,
            "CW_DEAD_QUEUE": settings.dead_queue,
            "CW_PARTITIONS": str(settings.partitions),
            "CW_VINIX_BASE_URL": sandbox.base_url,
            "CW_VINIX_API_KEY": fx["vinix"]["api_key"],
            "CW_TELNYX_BASE_URL": sandbox.base_url,
            "CW_TELNYX_API_KEY": fx["telnyx"]["api_key"],
            "CW_LOG_LEVEL": "WARNING",
            "CW_HTTP_PORT": "0",
        }
    )
    env.update({f"CW_{key.upper()}": str(value) for key, value in overrides.items()})
    return env
