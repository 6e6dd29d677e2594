"""``python -m hydrad.engine``: the audio engine child process (see hydrad/engine/main.py)."""

import os
import sys

from .main import run

if __name__ == "__main__":
    code = run()
    # Everything is closed by now (streams, canceller, pipe). End here rather than through
    # interpreter teardown: livekit's atexit dispose of its native runtime aborts the process
    # now and then (a Rust panic that cannot unwind, exit 134), which would turn a clean stop
    # into a crash report.
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code if isinstance(code, int) else 1)
