"""``python -m hydrad.engine``: the audio engine child process (see hydrad/engine/main.py)."""

import sys

from .main import run

if __name__ == "__main__":
    sys.exit(run())
