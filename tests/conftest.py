"""Suite-wide: the pytest process ends right after its last report, without tearing the interpreter down.

Ray, vLLM and DeepSpeed run in this process and leave native threads behind (Ray's GCS client and
gRPC after `ray.shutdown()`, the TCPStore server of a destroyed gloo group). Freeing Python objects
and C++ statics under them crashed one CI run after "328 passed" (a segfault: make exit 2).
"""

import os
import sys

import pytest

SESSION = pytest.StashKey[pytest.Session]()


@pytest.hookimpl(tryfirst=True)
def pytest_configure(config):
    # Cleanups run last-in first-out and this one is registered first: it runs after all of pytest's own.
    config.add_cleanup(lambda: exit_now(config))


def pytest_sessionstart(session):
    session.config.stash[SESSION] = session


def exit_now(config) -> None:
    """End the process with the session's exit status; a no-op if no session ran (usage errors)."""
    if SESSION not in config.stash:
        return
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(config.stash[SESSION].exitstatus))
