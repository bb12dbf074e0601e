"""``python -m worker`` is the ``conference-worker`` command."""

from worker.cli import main

main()
