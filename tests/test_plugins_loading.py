"""Plugin discovery, configuration and checks: every problem named by plugin, before start-up."""

from __future__ import annotations

import textwrap
from pathlib import Path

import pytest

from hydrad.config import ConfigError, config_from_dict
from hydrad.events import EVENT_NAMES
from hydrad.hooks import PluginError, PluginTools, describe_plugins, format_plugins, hookimpl, load_plugins
from hydrad.hooks import hookspecs, reference

from .plugins_fixture import FIRST_PARTY, TESTPLUGIN, ensure_installed

ensure_installed(TESTPLUGIN, *FIRST_PARTY)

ROOT = Path(__file__).resolve().parents[1]
ACTIVE = {"testplugin": {"active": True}, "testplugin_async": {"active": True}}


def cfg(plugins: dict | None = None, **extra):
    return config_from_dict({"plugins": {**(plugins or {}), **extra}}, "test.toml")


def problems(exc: pytest.ExceptionInfo) -> list[str]:
    return exc.value.problems


@pytest.fixture
def modules(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    """Write plugin modules into a temporary import path: ``modules(name=source)``."""
    monkeypatch.syspath_prepend(str(tmp_path))

    def write(**sources: str) -> None:
        for name, source in sources.items():
            (tmp_path / f"{name}.py").write_text(textwrap.dedent(source))

    return write


# ============================================================================ discovery


def test_entry_point_plugins_are_found_with_their_origin() -> None:
    import hydrad_testplugin
    from hydrad_testplugin import async_plugin

    plugins = load_plugins(cfg(ACTIVE))
    assert "testplugin" in plugins and "testplugin_async" in plugins
    p = plugins["testplugin"]
    assert p.kind == "entry point" and p.obj is hydrad_testplugin
    assert p.dist == "hydrad-testplugin" and p.version == "0.1.0"
    assert "entry point testplugin = hydrad_testplugin" in p.source
    assert plugins["testplugin_async"].obj is async_plugin.plugin
    assert p.settings.active is True


def test_describe_plugins_lists_name_origin_hooks_and_tools() -> None:
    plugins = load_plugins(cfg(ACTIVE, disabled=["clock"]))
    rows = {r["name"]: r for r in describe_plugins(plugins)}
    row = rows["testplugin"]
    assert row["enabled"] and row["kind"] == "entry point" and row["dist"] == "hydrad-testplugin"
    assert "hydrad_speech_started" in row["hooks"] and "hydrad_call_tool" in row["hooks"]
    assert "hydrad_serve" not in row["hooks"] and "hydrad_serve" in rows["testplugin_async"]["hooks"]
    assert row["tools"] == ["echo", "add", "boom", "refuse", "hang", "not_json", "state"]
    assert rows["testplugin_async"]["tools"] == ["slow_async", "hang_async", "boom_async"]
    assert rows["clock"] == {"name": "clock", "enabled": False, "kind": "entry point", "source": rows["clock"]["source"],
                             "dist": None, "version": None, "hooks": [], "tools": [], "shadowed_tools": [],
                             "configured": False}
    assert set(row) == {"name", "enabled", "kind", "source", "dist", "version", "hooks", "tools", "shadowed_tools",
                        "configured"}


def test_unconfigured_test_plugins_are_inert() -> None:
    plugins = load_plugins(cfg())
    assert plugins["testplugin"].tools == [] and plugins["testplugin_async"].tools == []


def test_disabled_plugin_is_not_loaded_and_unknown_disabled_name_is_an_error() -> None:
    plugins = load_plugins(cfg(disabled=["testplugin"]))
    assert "testplugin" not in plugins and "testplugin_async" in plugins
    assert [d.name for d in plugins.disabled] == ["testplugin"]
    [line] = [x for x in format_plugins(describe_plugins(plugins)).splitlines() if x.startswith("testplugin ")]
    assert line.split() == ["testplugin", "entry", "point", "testplugin", "=", "hydrad_testplugin",
                            "(hydrad-testplugin", "0.1.0)", "[disabled]"]
    with pytest.raises(PluginError) as exc:
        load_plugins(cfg(disabled=["testplugn"]))
    assert "plugins.disabled: no plugin named 'testplugn'" in str(exc.value)
    assert "did you mean 'testplugin'" in str(exc.value)


def test_config_modules_are_loaded_after_entry_points(modules) -> None:
    modules(kiosk_leds="""
        from hydrad.hooks import hookimpl

        @hookimpl
        def hydrad_speech_started(ctx, event):
            pass
    """)
    plugins = load_plugins(cfg(modules=["kiosk_leds"]))
    p = plugins["kiosk_leds"]
    assert p.kind == "module" and p.source == "module kiosk_leds (plugins.modules)"
    assert p.hooks == ["hydrad_speech_started"]
    assert [x.name for x in plugins][-1] == "kiosk_leds"


def test_unmarked_hydrad_functions_are_hooks_too(modules) -> None:
    modules(unmarked="""
        def hydrad_speech_stopped(event):
            pass

        def helper():
            pass
    """)
    assert load_plugins(cfg(modules=["unmarked"]))["unmarked"].hooks == ["hydrad_speech_stopped"]


# ============================================================================ problems, named by plugin


def test_every_problem_is_reported_at_once_each_naming_its_plugin(modules) -> None:
    modules(
        typo="""
            def hydrad_speech_start(ctx, event):
                pass
        """,
        badargs="""
            def hydrad_barge_in(ctx, evnt):
                pass
        """,
        broken="""
            1 / 0
        """,
    )
    with pytest.raises(PluginError) as exc:
        load_plugins(cfg({"testplugin": {"active": "yes"}, "nosuch": {"x": 1}},
                         modules=["typo", "badargs", "broken", "not_a_module_at_all"]))
    lines = problems(exc)
    assert isinstance(exc.value, ConfigError) and exc.value.source == "test.toml"
    text = "\n".join(lines)
    assert "plugin 'typo': hydrad_speech_start is not a hydrad hook (did you mean 'hydrad_speech_started'?)" in text
    assert any(line.startswith("plugin 'badargs'") and "evnt" in line for line in lines)
    assert any(line.startswith("plugin 'broken'") and "ZeroDivisionError" in line for line in lines)
    assert any(line.startswith("plugin 'not_a_module_at_all'") and "ModuleNotFoundError" in line for line in lines)
    assert "[plugins.testplugin]: active = 'yes': expected true or false" in lines
    assert any(line.startswith("[plugins.nosuch]: no plugin named 'nosuch'") for line in lines)
    assert len(lines) == 6


def test_plugin_table_unknown_key_is_the_plugins_own_message() -> None:
    with pytest.raises(PluginError) as exc:
        load_plugins(cfg({"testplugin_async": {"actve": True}}))
    assert problems(exc) == ["[plugins.testplugin_async]: unknown key(s) ['actve']; allowed: "
                             "['active', 'cancel_on', 'hang_in', 'hang_s', 'mute_on', 'raise_in']"]


def test_table_for_a_plugin_without_settings_is_an_error(modules) -> None:
    modules(plain="""
        def hydrad_event(event):
            pass
    """)
    with pytest.raises(PluginError) as exc:
        load_plugins(cfg({"plain": {"x": 1}}, modules=["plain"]))
    assert problems(exc) == ["[plugins.plain]: plugin 'plain' takes no settings (it has no hydrad_plugin_config hook)"]


def test_hook_kind_rules(modules) -> None:
    modules(kinds="""
        from hydrad.hooks import hookimpl

        @hookimpl
        async def hydrad_tools(ctx):
            return []

        def hydrad_serve(ctx):
            pass

        @hookimpl(wrapper=True)
        def hydrad_event(event):
            yield
    """)
    with pytest.raises(PluginError) as exc:
        load_plugins(cfg(modules=["kinds"]))
    assert sorted(problems(exc)) == sorted([
        "plugin 'kinds': hydrad_tools must be a plain def (it runs at load time)",
        "plugin 'kinds': hydrad_serve must be an async def",
        "plugin 'kinds': hydrad_event cannot be a hook wrapper",
    ])


def test_tool_declarations_are_checked(modules) -> None:
    modules(badtools="""
        def hydrad_tools():
            return [
                {"name": "has space", "parameters": {"type": "object"}},
                {"name": "ok", "description": "fine", "parameters": {"type": "object"}},
                {"name": "ok"},
                {"name": "schema", "parameters": {"type": "objekt"}},
                {"name": "scalar", "parameters": {"type": "string"}},
                {"name": "typo", "paramters": {}},
                "not a dict",
            ]

        def hydrad_call_tool(name):
            return None
    """, notools="""
        def hydrad_tools():
            return [{"name": "lonely"}]
    """)
    with pytest.raises(PluginError) as exc:
        load_plugins(cfg(modules=["badtools", "notools"]))
    lines = problems(exc)
    assert lines == [
        "plugin 'badtools': tool 'has space': name must be 1-64 characters of A-Z a-z 0-9 _ -, got 'has space'",
        "plugin 'badtools': tool 'ok': declared twice",
        "plugin 'badtools': tool 'schema': parameters is not a valid JSON schema: "
        + lines[2].split("valid JSON schema: ", 1)[1],
        "plugin 'badtools': tool 'scalar': parameters must describe an object (tools take named arguments)",
        "plugin 'badtools': tool 'typo': unknown key(s) ['paramters']; allowed: "
        "['description', 'name', 'parameters', 'type']",
        "plugin 'badtools': tool #7: expected a dict {name, description, parameters}, got str",
        "plugin 'notools': declares tools but has no hydrad_call_tool hook",
    ]
    assert "objekt" in lines[2]


def test_same_tool_name_first_plugin_in_call_order_owns_it(modules) -> None:
    src = """
        def hydrad_tools():
            return [{{"name": "lookup", "description": "{who}", "parameters": {{"type": "object"}}}}]

        def hydrad_call_tool(name):
            return "{who}"
    """
    modules(first=src.format(who="first"), second=src.format(who="second"))
    plugins = load_plugins(cfg(modules=["first", "second"]), entry_points=False)
    tools = PluginTools(plugins)
    # pluggy calls the plugin registered last first: config modules are registered in the listed order.
    assert tools.owner("lookup") == "second"
    assert [s["description"] for s in tools.schemas()] == ["second"]
    rows = {r["name"]: r for r in describe_plugins(plugins)}
    assert rows["first"]["shadowed_tools"] == ["lookup"] and rows["second"]["tools"] == ["lookup"]
    assert format_plugins(describe_plugins(plugins)).splitlines() == [
        "first      module first (plugins.modules)",
        "           hooks: hydrad_tools hydrad_call_tool",
        "           shadowed tools (owned by another plugin): lookup",
        "second     module second (plugins.modules)",
        "           hooks: hydrad_tools hydrad_call_tool",
        "           tools: lookup",
    ]


def test_extra_objects_and_entry_points_off() -> None:
    class Obj:
        @hookimpl
        def hydrad_event(self, event):
            pass

    plugins = load_plugins(cfg(), extra=[("mine", Obj())], entry_points=False)
    assert [p.name for p in plugins] == ["mine"] and plugins["mine"].kind == "object"


# ============================================================================ the reference is the hookspecs


def test_every_event_has_an_observer_hook_and_nothing_else_is_one() -> None:
    observers = set(hookspecs.observer_hooks())
    assert observers == {"hydrad_event"} | {f"hydrad_{n}" for n in EVENT_NAMES}
    for name in hookspecs.hook_names():
        assert (getattr(hookspecs, name).__doc__ or "").strip(), f"{name} has no docstring"


def test_docs_hook_reference_matches_the_hookspecs() -> None:
    text = (ROOT / "docs" / "plugins.md").read_text(encoding="utf-8")
    block = reference.current(text)
    assert block is not None, "docs/plugins.md lost its hook-reference markers"
    assert block == reference.render(), "docs/plugins.md is out of date: run python -m hydrad.hooks.reference docs/plugins.md"
    for name in hookspecs.hook_names():
        assert f"`{name}(" in block
