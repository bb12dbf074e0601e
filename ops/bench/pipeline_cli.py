"""The command line the reference pipelines share (``floor``, ``stack``, ``peer``).

Each is started by the runner with the same broker, queue and provider arguments
(``ops/bench/stage.py``, ``pipeline_args``); :func:`parser` declares them once.
"""

from __future__ import annotations

import argparse


def parser(name: str, doc: str | None, *, http_pool: bool = True) -> argparse.ArgumentParser:
    """``python -m ops.bench.<name>``'s parser: the shared arguments, and with ``http_pool`` the
    HTTP pool's size and timeout (the peer keeps httpx's defaults)."""
    p = argparse.ArgumentParser(
        prog=f"python -m ops.bench.{name}", description=(doc or "").split("\n")[0]
    )
    p.add_argument("--amqp-url", default="amqp://guest:guest@127.0.0.1:5672/")
    p.add_argument("--queue", required=True, help="the (preloaded) command queue to consume")
    p.add_argument("--results-exchange", required=True)
    p.add_argument("--telnyx-url", required=True, help="e.g. http://127.0.0.1:8090/v2")
    p.add_argument("--telnyx-key", required=True)
    p.add_argument("--vinix-url", required=True, help="e.g. http://127.0.0.1:8090/v2")
    p.add_argument("--vinix-key", required=True)
    p.add_argument("--prefetch", type=int, default=256, help="commands in flight (as CW_PREFETCH)")
    if http_pool:
        p.add_argument(
            "--pool-size",
            type=int,
            default=256,
            help="HTTP connections per provider (as CW_HTTP_POOL_SIZE)",
        )
        p.add_argument("--timeout-s", type=float, default=10.0)
    return p
