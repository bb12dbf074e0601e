"""The worker tunes Python's cycle collector once, at start-up."""

from __future__ import annotations

import gc
from collections.abc import Iterator

import pytest

from worker.app.service import tune_collector
from worker.settings import Settings


@pytest.fixture
def restore_collector() -> Iterator[None]:
    """Nothing frozen to begin with; the thresholds as they were afterwards."""
    before = gc.get_threshold()
    gc.unfreeze()
    yield
    gc.set_threshold(*before)
    gc.unfreeze()


@pytest.mark.usefixtures("restore_collector")
def test_young_threshold_is_set_and_older_ones_kept() -> None:
    """Only the young generation's threshold changes; what exists is frozen out of collections."""
    _, older, oldest = gc.get_threshold()
    assert gc.get_freeze_count() == 0
    tune_collector(12_345)
    assert gc.get_threshold() == (12_345, older, oldest)
    assert gc.get_freeze_count() > 0


def test_default_threshold_is_raised_and_never_disables_the_collector(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """10,000 by default (Python's 700 cost 7 to 13 % of the CPU); 0, which would turn
    collection off, is refused."""
    monkeypatch.delenv("CW_GC_THRESHOLD", raising=False)
    assert Settings(_env_file=None).gc_threshold == 10_000
    monkeypatch.setenv("CW_GC_THRESHOLD", "0")
    with pytest.raises(ValueError, match="gc_threshold"):
        Settings(_env_file=None)
