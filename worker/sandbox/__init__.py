"""The sandbox: a faithful local simulator of both provider APIs on one aiohttp server.

* Vinix (Kazoo Crossbar): ``PUT /v2/api_auth`` and ``GET|POST|PATCH
  /v2/accounts/{account_id}/conferences/{conference_id}`` (:mod:`worker.sandbox.vinix`).
* Telnyx: ``POST /v2/conferences/{id}/actions/update`` (:mod:`worker.sandbox.telnyx`).
* The admin API under ``/__admin/``: fixtures, request log, faults, state, settings
  (:mod:`worker.sandbox.admin`).

Tests, the demo and the benchmarks run the worker against it::

    async with Sandbox(conferences=3) as sandbox:
        keys = sandbox.fixtures          # same document as GET /__admin/fixtures
        url = sandbox.base_url           # "http://127.0.0.1:PORT/v2"
"""

from worker.sandbox.server import Sandbox, serve_forever

__all__ = ["Sandbox", "serve_forever"]
