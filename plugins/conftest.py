"""Running the first-party plugins' tests from hydrad's repository root.

The plugins are separate distributions; their tests import them as installed packages, like
any plugin author's tests would. CI installs them (``.ci/setup``); when one is missing this
installs it once, under a file lock, and makes it importable here (``tests.plugins_fixture``).
"""

from __future__ import annotations

from pathlib import Path

from tests.plugins_fixture import ensure_installed

ensure_installed(*sorted(p.parent for p in Path(__file__).resolve().parent.glob("*/pyproject.toml")))
