"""A hung test fails instead of eating CI's hour: pytest-timeout is installed and every test has
the default timeout of pyproject.toml unless it asks for another."""

from __future__ import annotations

import subprocess
import sys


def test_every_test_has_a_default_timeout(request):
    assert int(request.config.getini("timeout")) > 0


def test_a_test_past_its_timeout_fails(tmp_path):
    (tmp_path / "test_hangs.py").write_text(
        "import time\n\ndef test_hangs():\n    time.sleep(30)\n"
    )
    proc = subprocess.run(
        [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "--timeout=1"],
        cwd=tmp_path,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 1, proc.stdout
    assert "Timeout" in proc.stdout
