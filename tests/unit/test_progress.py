"""Long loops say how far they are when their output is not a terminal (logs, cron, Prefect)."""

from __future__ import annotations

import io
import logging

import pytest

from mmpipe.progress import describe, tqdm


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


@pytest.fixture
def every_update(monkeypatch):
    monkeypatch.setenv("MMPIPE_PROGRESS_SECONDS", "0")


def _lines(caplog) -> list[str]:
    return [r.getMessage() for r in caplog.records if r.name == "mmpipe.progress"]


def test_not_a_terminal_logs_step_rate_and_eta(every_update, caplog):
    caplog.set_level(logging.INFO)
    bar = tqdm(total=4, desc="epoch 1/2", unit="batch", disable=None, file=io.StringIO())
    for _ in range(3):
        bar.update(1)
    bar.close()
    lines = _lines(caplog)
    assert len(lines) == 4  # 3 updates + the end
    assert lines[0].startswith("epoch 1/2: 1/4 (25%), ") and " batch/s, " in lines[0]
    assert "ETA " in lines[0] and lines[-1].startswith("epoch 1/2: 3/4 (75%)")


def test_an_iterable_is_counted_and_ends_with_a_line(every_update, caplog):
    caplog.set_level(logging.INFO)
    assert list(tqdm(range(5), desc="ablation", disable=None, file=io.StringIO())) == list(range(5))
    lines = _lines(caplog)
    assert lines[-1].startswith("ablation: 5/5 (100%)") and "ETA" not in lines[-1]


def test_a_terminal_or_an_explicit_disable_logs_nothing(every_update, caplog):
    caplog.set_level(logging.INFO)
    with tqdm(total=3, desc="bar", disable=None, file=_Terminal()) as bar:
        bar.update(3)
    with tqdm(total=3, desc="rank 1", disable=True, file=io.StringIO()) as bar:
        bar.update(3)
    assert _lines(caplog) == []


def test_lines_come_every_interval_not_every_step(monkeypatch, caplog):
    monkeypatch.setenv("MMPIPE_PROGRESS_SECONDS", "3600")
    caplog.set_level(logging.INFO)
    with tqdm(total=1000, desc="shard", disable=None, file=io.StringIO()) as bar:
        for _ in range(1000):
            bar.update(1)
    assert len(_lines(caplog)) == 1  # only the end


def test_describe_formats_long_runs():
    assert describe("epoch 1/8", 120, 500, 60.0, "batch") == (
        "epoch 1/8: 120/500 (24%), 2 batch/s, 1m00s so far, ETA 3m10s"
    )
    assert describe("", 7, None, 4000.0) == "progress: 7, 0.00175 it/s, 1h06m40s so far"


def test_a_loop_abandoned_by_an_error_says_nothing_after_it(monkeypatch, caplog):
    """The stage's error line must stay the last line (the CLI's one line)."""
    import gc

    monkeypatch.setenv("MMPIPE_PROGRESS_SECONDS", "3600")
    caplog.set_level(logging.INFO)

    def stage() -> None:
        for i in tqdm(range(10), desc="ingest images", disable=None, file=io.StringIO()):
            if i == 3:
                raise ValueError("bad record")

    with pytest.raises(ValueError):
        stage()
    gc.collect()
    assert _lines(caplog) == []
