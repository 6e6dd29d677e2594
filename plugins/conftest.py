"""Running the first-party plugins' tests from hydrad's repository root.

The plugins are separate distributions; their tests import them as installed packages, like
any plugin author's tests would. CI installs them (``pip install --no-deps -e plugins/<name>``);
when one is missing this installs it once, under a file lock, and makes it importable here.
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

HERE = Path(__file__).resolve().parent


def _ensure_installed(project: Path) -> None:
    name = tomllib.loads((project / "pyproject.toml").read_text())["project"]["name"]
    try:
        importlib.metadata.distribution(name)
        return
    except importlib.metadata.PackageNotFoundError:
        pass
    lock = Path(tempfile.gettempdir()) / f"hydrad-plugin-install-{hashlib.sha1(sys.prefix.encode()).hexdigest()[:12]}.lock"
    with open(lock, "w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            importlib.metadata.distribution(name)
        except importlib.metadata.PackageNotFoundError:
            subprocess.run([sys.executable, "-m", "pip", "install", "--quiet", "--no-deps", "-e", str(project)], check=True)
    dist = importlib.metadata.distribution(name)
    for f in dist.files or []:
        if f.name.endswith(".pth"):
            for line in Path(dist.locate_file(f)).read_text().splitlines():
                line = line.strip()
                if line and not line.startswith(("#", "import ")) and line not in sys.path:
                    sys.path.append(line)
    importlib.invalidate_caches()


for _project in sorted(p.parent for p in HERE.glob("*/pyproject.toml")):
    _ensure_installed(_project)
