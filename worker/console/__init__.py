"""The dead-letter console: a small server-rendered web page for operators.

``conference-worker console`` serves it (aiohttp + Jinja2, a few lines of plain JavaScript, no
build step): dead letters grouped by error code and type, filter, inspect, replay or purge a
selection or a group with progress, and the live state beside them (queue depths, the worker's
breakers, in-flight count and rates, the result events arriving).

- :mod:`worker.console.snapshot`: the dead letters as the page shows them (keys, groups).
- :mod:`worker.console.jobs`: replays and purges running in the background, with progress.
- :mod:`worker.console.live`: queue depths, the worker's metrics, the result events.
- :mod:`worker.console.server`: the routes, the token and the request checks.
"""
