"""docs/plugins.md's worked example, written out from the document alone, works as documented."""

from __future__ import annotations

import importlib
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import pytest

from hydrad.config import config_from_dict
from hydrad.hooks import PluginError, describe_plugins, format_plugins, load_plugins

ROOT = Path(__file__).resolve().parents[1]
DOC = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
FILES = dict(re.findall(r"```(?:python|toml)\n# file: (\S+)\n(.*?)```", DOC, re.S))


@pytest.fixture
def example(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    assert set(FILES) == {"pyproject.toml", "src/hydrad_orders/__init__.py", "tests/test_orders.py"}
    for name, text in FILES.items():
        path = tmp_path / "hydrad-orders" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text)
    monkeypatch.syspath_prepend(str(tmp_path / "hydrad-orders" / "src"))
    sys.modules.pop("hydrad_orders", None)
    return tmp_path / "hydrad-orders"


def _site_config() -> dict:
    block = re.search(r"In `/etc/hydrad/hydrad.toml`:\n\n```toml\n(.*?)```", DOC, re.S)
    assert block, "the worked example lost its hydrad.toml snippet"
    return tomllib.loads(block.group(1))


def test_the_example_plugin_loads_with_the_documented_config_and_error(example: Path) -> None:
    module = importlib.import_module("hydrad_orders")
    plugins = load_plugins(config_from_dict(_site_config(), "hydrad.toml"), extra=[("orders", module)],
                           entry_points=False)
    [row] = describe_plugins(plugins)
    assert row["hooks"] == ["hydrad_plugin_config", "hydrad_tools", "hydrad_call_tool", "hydrad_response_audio_started"]
    assert row["tools"] == ["order_status"]
    assert plugins["orders"].settings.orders == {"A17": "shipped", "B2": "in the warehouse"}
    # `hydrad plugins` as shown in the docs (the docs show it installed through its entry point)
    row = {**row, "kind": "entry point", "source": "entry point orders = hydrad_orders (hydrad-orders 0.1.0)"}
    shown = re.search(r"lists what hydrad will load, from where, with its hooks and tools:\n\n```\n(.*?)```", DOC, re.S)
    assert shown and format_plugins([row]) == shown.group(1).rstrip("\n")
    bad = _site_config()
    bad["plugins"]["orders"]["slow_answr_ms"] = bad["plugins"]["orders"].pop("slow_answer_ms")
    with pytest.raises(PluginError) as exc:
        load_plugins(config_from_dict(bad, "/etc/hydrad/hydrad.toml"), extra=[("orders", module)], entry_points=False)
    assert str(exc.value) in DOC  # the error text shown in the docs is the real one


@pytest.mark.slow
def test_the_example_tests_pass(example: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(example / "src")}
    result = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "tests"], cwd=example,
                            env=env, capture_output=True, text=True, timeout=240)
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "2 passed" in result.stdout
