"""The shipped systemd files: ``systemd-analyze verify``, ``systemd-analyze security --offline``,
sysusers.d/tmpfiles.d applied to a scratch root, and cross-checks against hydrad's defaults.

systemd 252 (Debian 12) supports ``security --offline=true`` (added in 250) and
``--threshold=``; ``verify`` insists that ExecStart= binaries exist, so the units are checked
as installed copies whose ``/usr/local/bin/hydrad`` points at this checkout's entry point.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from hydrad.config import CREDENTIAL_NAME, DEFAULT_CONFIG_PATH, ControlConfig
from hydrad.service.health import HealthPolicy

ROOT = Path(__file__).resolve().parents[1]
SYSTEM_UNIT = ROOT / "systemd" / "hydrad.service"
USER_UNIT = ROOT / "systemd" / "user" / "hydrad.service"
SYSUSERS = ROOT / "systemd" / "sysusers.d" / "hydrad.conf"
TMPFILES = ROOT / "systemd" / "tmpfiles.d" / "hydrad.conf"
INSTALLED_BIN = "/usr/local/bin/hydrad"

needs_analyze = pytest.mark.skipif(shutil.which("systemd-analyze") is None,
                                   reason="systemd-analyze not installed (apt-get install systemd; .ci/setup does)")


def hydrad_bin() -> str:
    candidate = Path(sys.executable).parent / "hydrad"
    return str(candidate) if candidate.exists() else (shutil.which("hydrad") or sys.executable)


def installed_copy(unit: Path, tmp_path: Path) -> Path:
    out = tmp_path / unit.name
    out.write_text(unit.read_text().replace(INSTALLED_BIN, hydrad_bin()))
    return out


def verify(unit: Path, tmp_path: Path, user: bool = False) -> tuple[int, str]:
    env = dict(os.environ)
    args = ["systemd-analyze", "verify", "--man=no", str(unit)]
    if user:
        runtime = tmp_path / "xdg-runtime"
        runtime.mkdir(mode=0o700, exist_ok=True)
        env["XDG_RUNTIME_DIR"] = str(runtime)
        args.insert(1, "--user")
    p = subprocess.run(args, capture_output=True, text=True, env=env, timeout=60)
    return p.returncode, (p.stdout + p.stderr).strip()


def directives(unit: Path) -> dict[str, list[str]]:
    """``Key=value`` lines, every occurrence kept (systemd allows repeats), comments dropped."""
    out: dict[str, list[str]] = {}
    for line in unit.read_text().splitlines():
        line = line.strip()
        if not line or line.startswith(("#", ";", "[")) or "=" not in line:
            continue
        key, value = line.split("=", 1)
        out.setdefault(key.strip(), []).append(value.strip())
    return out


def seconds(value: str) -> float:
    m = re.fullmatch(r"(\d+(?:\.\d+)?)\s*(ms|s|min)?", value)
    assert m, value
    return float(m.group(1)) * {"ms": 0.001, "s": 1, None: 1, "min": 60}[m.group(2)]


# ============================================================================ verify

@needs_analyze
@pytest.mark.parametrize("unit, user", [(SYSTEM_UNIT, False), (USER_UNIT, True)], ids=["system", "user"])
def test_systemd_analyze_verify_passes_without_a_warning(tmp_path: Path, unit: Path, user: bool) -> None:
    rc, output = verify(installed_copy(unit, tmp_path), tmp_path, user)
    assert rc == 0 and output == "", output


@needs_analyze
def test_verify_would_catch_a_broken_unit(tmp_path: Path) -> None:
    broken = installed_copy(SYSTEM_UNIT, tmp_path)
    broken.write_text(broken.read_text().replace("WatchdogSec=", "WatchdogSecs=").replace("Type=notify", "Type=notifyy"))
    rc, output = verify(broken, tmp_path)
    assert rc != 0 or output, "verify did not notice a typo"
    assert "WatchdogSecs" in output or "notifyy" in output


# ============================================================================ security

def exposure(unit: Path) -> tuple[float, int, str]:
    p = subprocess.run(["systemd-analyze", "security", "--offline=true", "--threshold=20", "--no-pager", str(unit)],
                       capture_output=True, text=True, timeout=60)
    m = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", p.stdout + p.stderr)
    assert m, p.stdout + p.stderr
    return float(m.group(1)), p.returncode, p.stdout


@needs_analyze
def test_security_exposure_is_2_0_or_better(tmp_path: Path) -> None:
    score, rc, table = exposure(installed_copy(SYSTEM_UNIT, tmp_path))
    print(f"\n[security] systemd-analyze security --offline=true: exposure {score}")
    assert score <= 2.0, table
    assert rc == 0, "--threshold=20 should pass at <= 2.0"


@needs_analyze
def test_security_check_would_catch_a_weakened_unit(tmp_path: Path) -> None:
    weak = tmp_path / "hydrad.service"
    text = SYSTEM_UNIT.read_text().replace(INSTALLED_BIN, hydrad_bin())
    text = "\n".join(line for line in text.splitlines()
                     if not line.startswith(("SystemCallFilter", "CapabilityBoundingSet", "ProtectSystem")))
    weak.write_text(text)
    score, rc, _ = exposure(weak)
    assert score > 2.0 and rc != 0


# ============================================================================ what audio and hydrad need

def test_the_system_unit_keeps_what_audio_needs() -> None:
    d = directives(SYSTEM_UNIT)
    assert d["SupplementaryGroups"] == ["audio"]
    assert "char-alsa rw" in d["DeviceAllow"] and d["DevicePolicy"] == ["closed"]
    assert d.get("PrivateDevices", ["no"]) == ["no"], "PrivateDevices= hides /dev/snd"
    assert d["PrivateUsers"] == ["no"], "the audio group cannot be set inside a private user namespace"
    assert d["MemoryDenyWriteExecute"] == ["no"], "sounddevice's cffi callback needs a W+X page"
    families = " ".join(d["RestrictAddressFamilies"]).split()
    assert {"AF_UNIX", "AF_INET", "AF_INET6"} <= set(families), "AF_UNIX: PulseAudio/PipeWire; INET: the service"
    assert d.get("ProtectHome") == ["yes"]
    # The control socket is chown()ed to control.group: @chown must survive ~@privileged.
    filters = d["SystemCallFilter"]
    deny = next(i for i, f in enumerate(filters) if f.startswith("~") and "@privileged" in f.lstrip("~").split())
    assert "@chown" in filters[deny + 1:]


@pytest.mark.parametrize("unit", [SYSTEM_UNIT, USER_UNIT], ids=["system", "user"])
def test_units_match_hydrads_defaults_and_policies(unit: Path) -> None:
    d = directives(unit)
    assert d["Type"] == ["notify"] and d["NotifyAccess"] == ["main"]
    assert d["Restart"] == ["on-failure"]
    assert d["ExecReload"] == ["/bin/kill -HUP $MAINPID"]
    assert d["RestartPreventExitStatus"] == ["2"]  # hydrad.cli.EXIT_CONFIG: a bad config is not retried
    assert d["RuntimeDirectory"] == ["hydrad"]
    assert any(v.startswith(f"{CREDENTIAL_NAME}:") for v in d["LoadCredential"])
    # READY=1 comes at the latest after the readiness bound: well inside the start timeout.
    assert seconds(d["TimeoutStartSec"][0]) >= 2 * HealthPolicy().ready_bound_s
    # Pings every WatchdogSec/2, withheld when unhealthy: the watchdog must outlast the
    # health checks' own stall windows, or a transient stall would restart a healthy daemon.
    watchdog = seconds(d["WatchdogSec"][0])
    assert watchdog >= 3 * HealthPolicy().uplink_stall_s
    # SIGTERM: graceful shutdown is bounded at 3 s in the daemon.
    assert seconds(d["TimeoutStopSec"][0]) >= 10
    assert d["KillMode"] == ["mixed"]
    if unit == SYSTEM_UNIT:
        assert f"/run/{d['RuntimeDirectory'][0]}/control.sock" == ControlConfig().socket
        assert d["ConfigurationDirectory"] == ["hydrad"] and DEFAULT_CONFIG_PATH == Path("/etc/hydrad/hydrad.toml")
        assert d["ExecStart"] == ["/usr/local/bin/hydrad run --config ${CONFIGURATION_DIRECTORY}/hydrad.toml"]
        assert d["User"] == ["hydrad"]


# ============================================================================ sysusers.d / tmpfiles.d

@pytest.mark.skipif(shutil.which("systemd-sysusers") is None or shutil.which("systemd-tmpfiles") is None,
                    reason="systemd-sysusers/systemd-tmpfiles not installed (apt-get install systemd)")
def test_sysusers_and_tmpfiles_on_a_scratch_root(tmp_path: Path) -> None:
    root = tmp_path / "root"
    (root / "etc").mkdir(parents=True)
    (root / "etc" / "group").write_text("audio:x:29:\n")  # Debian's audio group already exists
    subprocess.run(["systemd-sysusers", f"--root={root}", str(SYSUSERS)], check=True, capture_output=True, timeout=60)
    passwd = {line.split(":")[0]: line.split(":") for line in (root / "etc/passwd").read_text().splitlines()}
    groups = {line.split(":")[0]: line.split(":") for line in (root / "etc/group").read_text().splitlines()}
    user = passwd["hydrad"]
    assert user[5] == "/var/lib/hydrad" and user[6] == "/usr/sbin/nologin" and int(user[2]) < 1000
    assert groups["audio"][2] == "29" and "hydrad" in groups["audio"][3].split(",")
    subprocess.run(["systemd-tmpfiles", "--create", f"--root={root}", str(TMPFILES)], check=True,
                   capture_output=True, timeout=60)
    cred = (root / "etc/credstore").stat()
    assert oct(cred.st_mode & 0o777) == "0o700" and cred.st_uid == 0
    state = (root / "var/lib/hydrad/recordings").stat()
    assert state.st_uid == int(user[2]) and oct(state.st_mode & 0o777) == "0o750"
    assert (root / "etc/hydrad").is_dir()
