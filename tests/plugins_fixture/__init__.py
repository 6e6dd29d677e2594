"""Installs the test plugin package (and the first-party plugins) into the running environment if missing.

The plugin tests need *real* entry points, i.e. installed distributions. CI installs them up
front (see ``tests/plugins_fixture/hydrad-testplugin/README.md``); when they are missing,
:func:`ensure_installed` runs ``pip install --no-deps -e <dir>`` once (under a file lock, other
test runs may share the environment) and makes the new editable path importable in this process.
"""

from __future__ import annotations

import fcntl
import hashlib
import importlib
import importlib.metadata
import subprocess
import sys
import tempfile
import tomllib
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
TESTPLUGIN = Path(__file__).resolve().parent / "hydrad-testplugin"
FIRST_PARTY = [ROOT / "plugins" / name for name in ("hydrad-clock", "hydrad-exec", "hydrad-webhook")]


def _dist_name(project: Path) -> str:
    return tomllib.loads((project / "pyproject.toml").read_text())["project"]["name"]


def _activate(dist_name: str) -> None:
    """Make an editable install done after start-up importable (its .pth lines are path entries)."""
    dist = importlib.metadata.distribution(dist_name)
    for f in dist.files or []:
        if f.name.endswith(".pth"):
            for line in Path(dist.locate_file(f)).read_text().splitlines():
                line = line.strip()
                if line and not line.startswith(("#", "import ")) and line not in sys.path:
                    sys.path.append(line)
    importlib.invalidate_caches()


def ensure_installed(*projects: Path) -> None:
    missing = []
    for project in projects or (TESTPLUGIN,):
        name = _dist_name(project)
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            missing.append((project, name))
    if not missing:
        return
    lock = Path(tempfile.gettempdir()) / f"hydrad-plugin-install-{hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]}.lock"
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        for project, name in missing:
            try:
                importlib.metadata.distribution(name)
            except importlib.metadata.PackageNotFoundError:
                subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "-e", str(project)],
                               check=True)
            _activate(name)
