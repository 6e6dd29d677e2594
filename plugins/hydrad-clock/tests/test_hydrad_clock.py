"""The clock plugin: its settings, its answers, and the tool round trip through the simulator."""

from __future__ import annotations

import datetime as dt

import pytest

import hydrad_clock
from hydrad.config import config_from_dict
from hydrad.hooks import PluginError, PluginTools, load_plugins


@pytest.fixture
def hydrad_plugins():
    return [("clock", hydrad_clock)]


@pytest.fixture
def hydrad_config():
    return {"plugins": {"clock": {"timezone": "Asia/Tokyo", "hour_format": "12h"}}}


async def test_the_model_gets_the_time_here_elsewhere_and_an_error_for_a_bad_zone(hydrad) -> None:
    hydrad.next_turn(tool_calls=[
        {"name": "current_time", "arguments": {}, "call_id": "here"},
        {"name": "current_time", "arguments": {"timezone": "America/New_York"}, "call_id": "ny"},
        {"name": "current_time", "arguments": {"timezone": "Mars/Olympus"}, "call_id": "bad"},
    ])
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    await hydrad.say("hello", seconds=1.0)
    outs = {o["call_id"]: o for o in await hydrad.wait_for_tool_outputs(3)}
    after = dt.datetime.now(dt.timezone.utc)
    here = outs["here"]["value"]
    assert here["timezone"] == "Asia/Tokyo" and here["utc_offset"] == "+09:00"
    assert before <= dt.datetime.fromisoformat(here["iso"]) <= after
    assert here["spoken"].startswith("It is ") and ("AM on" in here["spoken"] or "PM on" in here["spoken"])
    assert outs["ny"]["value"]["utc_offset"] in ("-05:00", "-04:00")
    assert outs["bad"]["value"] == {"error": "unknown timezone 'Mars/Olympus'; use an IANA name such as 'Asia/Tokyo'"}
    configure = hydrad.sim.sessions[0].received_of("session.configure")[0]
    [tool] = configure["session"]["tools"]
    assert tool["name"] == "current_time" and "Asia/Tokyo" in tool["description"]
    # the model narrated the answer
    await hydrad.wait_for_event("response_done", count=2)


def test_describe_reads_like_a_clock() -> None:
    t = dt.datetime(2026, 11, 25, 15, 5, tzinfo=dt.timezone(dt.timedelta(hours=1)))
    assert hydrad_clock.describe(t, "Europe/Berlin", "12h") == {
        "timezone": "Europe/Berlin", "iso": "2026-11-25T15:05:00+01:00", "date": "2026-11-25", "time": "15:05",
        "weekday": "Wednesday", "utc_offset": "+01:00", "spoken": "It is 3:05 PM on Wednesday, November 25, 2026.",
    }
    assert hydrad_clock.describe(t.replace(hour=0), "Europe/Berlin")["spoken"].startswith("It is 0:05 on")
    assert hydrad_clock.describe(t.replace(hour=0), "Europe/Berlin", "12h")["spoken"].startswith("It is 12:05 AM")


def test_installed_through_its_entry_point_and_inert_without_a_table() -> None:
    plugins = load_plugins(config_from_dict({}, "t"))
    assert plugins["clock"].obj is hydrad_clock and plugins["clock"].kind == "entry point"
    assert PluginTools(plugins).owner("current_time") is None
    plugins = load_plugins(config_from_dict({"plugins": {"clock": {"timezone": "local"}}}, "t"))
    assert PluginTools(plugins).owner("current_time") == "clock"


@pytest.mark.parametrize(("table", "message"), [
    ({"timezone": "Mars/Olympus"}, "timezone = 'Mars/Olympus': not a known IANA timezone"),
    ({"timezone": 3}, "timezone = 3: expected an IANA timezone name"),
    ({"timezone": "UTC", "hour_format": "13h"}, "hour_format = '13h': expected '24h' or '12h'"),
    ({"tz": "UTC"}, "unknown key(s) ['tz']; allowed: hour_format, timezone"),
])
def test_bad_settings_are_reported_under_the_plugins_name(table, message) -> None:
    with pytest.raises(PluginError) as exc:
        load_plugins(config_from_dict({"plugins": {"clock": table}}, "t"))
    [problem] = exc.value.problems
    assert problem.startswith("[plugins.clock]: ") and message in problem
