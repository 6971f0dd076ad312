"""The test suite keeps Prefect's state (DB, persisted results) out of the user's .mmpipe/."""

from __future__ import annotations

import os
from pathlib import Path

from tests.conftest import REPO, TEST_PREFECT_HOME


def test_prefect_home_and_result_storage_are_the_tests_own():
    from prefect.settings import get_current_settings

    import flows  # noqa: F401 - it defaults PREFECT_HOME to the cwd's .mmpipe/prefect

    settings = get_current_settings()
    assert Path(os.environ["PREFECT_HOME"]) == TEST_PREFECT_HOME
    assert Path(settings.home) == TEST_PREFECT_HOME
    storage = Path(settings.results.local_storage_path)
    assert storage.is_relative_to(TEST_PREFECT_HOME), storage
    assert not storage.is_relative_to(REPO)
    assert "PREFECT_API_URL" not in os.environ  # no shared server from the user's shell
