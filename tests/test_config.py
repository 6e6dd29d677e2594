"""Config: every invalid value is reported with its key path, value and what is allowed."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from hydrad.config import Config, ConfigError, Secret, config_from_dict, load_api_key, load_config

ROOT = Path(__file__).resolve().parents[1]


def problems(data: dict) -> list[str]:
    with pytest.raises(ConfigError) as info:
        config_from_dict(data)
    return info.value.problems


def test_shipped_example_config_is_valid_and_equals_the_defaults() -> None:
    cfg = load_config(ROOT / "etc" / "hydrad.toml")
    assert cfg.hydra == Config().hydra and cfg.audio == Config().audio and cfg.control == Config().control
    assert cfg.source.endswith("hydrad.toml")


def test_all_problems_are_reported_at_once_with_path_value_and_allowed() -> None:
    found = problems({
        "hydra": {"modle": "hydra-v1.1", "url": "http://example"},
        "audio": {"frame_ms": 50, "wav": {"mic": [{"path": "a.wav", "at": -1}]}},
        "session": {"generate_initial_response": "yes"},
    })
    text = "\n".join(found)
    assert "hydra.modle: unknown key (did you mean 'model'?)" in text
    assert "hydra.url = \"http://example\": expected a ws:// or wss:// URL" in text
    assert "audio.frame_ms = 50: expected 20, 30 or 40" in text
    assert "audio.wav.mic[0].at = -1: expected a number from 0 to 86400" in text
    assert "session.generate_initial_response = \"yes\": expected true or false" in text
    assert len(found) == 5


def test_unknown_section_is_an_error() -> None:
    assert any(p.startswith("sesion: unknown key") for p in problems({"sesion": {}}))


@pytest.mark.parametrize("model, voice, ok", [
    ("hydra-v1.1", "aria", True), ("hydra-v1.1", "cole", False), ("hydra-v1.0", "cole", True),
    ("hydra-v1.1", "sterling", True), ("hydra", "wren", False),
])
def test_voice_is_validated_against_the_model_roster(model: str, voice: str, ok: bool) -> None:
    data = {"hydra": {"model": model}, "session": {"voice": voice}}
    if ok:
        assert config_from_dict(data).session.voice == voice
    else:
        assert any("session.voice" in p and "allowed:" in p for p in problems(data))


def test_literal_and_union_types() -> None:
    cfg = config_from_dict({"audio": {"sounddevice": {"input_device": 3, "output_device": "USB", "latency": 0.05}}})
    assert cfg.audio.sounddevice.input_device == 3 and cfg.audio.sounddevice.latency == 0.05
    assert any("audio.backend = \"alsa\"" in p for p in problems({"audio": {"backend": "alsa"}}))
    assert any("hydra.connect_timeout_s = true" in p for p in problems({"hydra": {"connect_timeout_s": True}}))


def test_plugin_tables_pass_through_raw() -> None:
    cfg = config_from_dict({"plugins": {"modules": ["x"], "exec": {"command": ["true"]}}})
    assert cfg.plugins.settings == {"exec": {"command": ["true"]}}
    assert cfg.plugins.modules == ("x",)


def test_config_objects_are_frozen() -> None:
    cfg = Config()
    with pytest.raises(Exception):
        cfg.hydra.model = "x"  # type: ignore[misc]


def test_unreadable_and_invalid_toml_are_config_errors(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="no such file"):
        load_config(tmp_path / "missing.toml")
    bad = tmp_path / "bad.toml"
    bad.write_text("[hydra\nurl=")
    with pytest.raises(ConfigError, match="not valid TOML"):
        load_config(bad)


def test_api_key_sources_in_order(tmp_path: Path) -> None:
    cfg = Config()
    assert load_api_key(cfg, {}) is None
    creds = tmp_path / "creds"
    creds.mkdir()
    (creds / "hydra-api-key").write_text("from-creds\n")
    key = load_api_key(cfg, {"CREDENTIALS_DIRECTORY": str(creds)})
    assert key is not None and key.reveal() == "from-creds"
    keyfile = tmp_path / "key"
    keyfile.write_text("from-file")
    cfg2 = config_from_dict({"hydra": {"api_key_file": str(keyfile)}})
    assert load_api_key(cfg2, {"CREDENTIALS_DIRECTORY": str(creds)}).reveal() == "from-file"
    assert load_api_key(cfg2, {"SMALLEST_API_KEY": "s", "CREDENTIALS_DIRECTORY": str(creds)}).reveal() == "s"
    assert load_api_key(cfg2, {"HYDRA_API_KEY": "h", "SMALLEST_API_KEY": "s"}).reveal() == "h"
    with pytest.raises(ConfigError, match="no such file"):
        load_api_key(config_from_dict({"hydra": {"api_key_file": str(tmp_path / "nope")}}), {})
    (tmp_path / "empty").write_text("  \n")
    with pytest.raises(ConfigError, match="is empty"):
        load_api_key(config_from_dict({"hydra": {"api_key_file": str(tmp_path / "empty")}}), {})


def test_secret_never_shows_itself() -> None:
    s = Secret("sk-very-secret", "$HYDRA_API_KEY")
    assert "sk-very-secret" not in repr(s) and "sk-very-secret" not in str(s) and "sk-very-secret" not in f"{s}"
    assert s.reveal() == "sk-very-secret"


def test_cli_exits_2_with_the_problems_before_starting(tmp_path: Path) -> None:
    bad = tmp_path / "bad.toml"
    bad.write_text('[audio]\nbackend = "wav"\nframe_ms = 25\n')
    proc = subprocess.run([sys.executable, "-m", "hydrad.cli", "run", "--config", str(bad)],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 2
    assert "audio.frame_ms = 25: expected 20, 30 or 40" in proc.stderr
