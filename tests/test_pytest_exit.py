"""The suite's conftest: pytest ends with its own exit status and skips the interpreter's teardown."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

TESTS = Path(__file__).parent


@pytest.mark.parametrize("passes, with_conftest", [(True, True), (False, True), (True, False)])
def test_pytest_keeps_its_exit_status_and_skips_the_teardown(tmp_path, passes, with_conftest):
    probe = tmp_path / "test_probe.py"
    probe.write_text("import atexit\n"
                     "atexit.register(print, 'interpreter teardown ran')\n"
                     f"def test_probe():\n    assert {passes}\n")
    plugin = ["-p", "conftest"] if with_conftest else []  # tests/conftest.py, found on PYTHONPATH
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", *plugin, str(probe)],
                            cwd=tmp_path, env={**os.environ, "PYTHONPATH": str(TESTS)}, capture_output=True,
                            text=True, timeout=300)
    assert result.returncode == (0 if passes else 1), result.stdout + result.stderr
    assert ("1 passed" if passes else "1 failed") in result.stdout
    # Without the conftest the probe does see the teardown: so its absence above means it was skipped.
    assert ("interpreter teardown ran" in result.stdout) is not with_conftest
