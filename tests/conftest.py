"""Suite-wide: the pytest process ends right after its last report, without tearing the interpreter down.

Ray, vLLM and DeepSpeed run in this process and leave native threads behind (Ray's GCS client and
gRPC after `ray.shutdown()`, the TCPStore server of a destroyed gloo group). Freeing Python objects
and C++ statics under them crashed one CI run after "328 passed" (a segfault: make exit 2).
"""

import atexit
import os
import sys


def pytest_sessionfinish(session):
    # atexit runs the last-registered first, once pytest has returned: its reports and cleanups are done.
    atexit.register(end_process, session)


def end_process(session) -> None:
    """End the process with the session's exit status, skipping the other exit handlers and the teardown."""
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(int(session.exitstatus))
