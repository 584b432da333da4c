"""systemd unit: `systemd-analyze verify` reports nothing and the sandbox keeps the exposure level
of `systemd-analyze security` at 2.0 or below. Nothing is started (CI has no systemd as PID 1)."""
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest

from conftest import GW_BIN, REPO

UNIT = REPO / "systemd" / "coap2mqtt.service"
MAX_EXPOSURE = 2.0
ANALYZE = shutil.which("systemd-analyze")

pytestmark = pytest.mark.skipif(ANALYZE is None, reason="systemd-analyze is not installed")


def analyze(*args, env=None, timeout=60):
    r = subprocess.run([ANALYZE, *map(str, args)], capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL, env=env)
    return r.returncode, r.stdout + r.stderr


def unit_lines():
    return [l.strip() for l in UNIT.read_text().splitlines() if l.strip() and l[0] not in "#;"]


def test_verify_clean(tmp_path):
    """Verify a copy whose command lines name the binary just built (verify checks that they
    exist) and whose man: links resolve to this tree's pages (verify runs man for each)."""
    text = UNIT.read_text().replace("/usr/sbin/coap2mqtt", str(Path(GW_BIN).resolve()))
    env = dict(os.environ)
    if shutil.which("man"):
        for page in (REPO / "man").iterdir():
            sect = tmp_path / "man" / ("man" + page.suffix[1:])
            sect.mkdir(parents=True, exist_ok=True)
            (sect / page.name).symlink_to(page)
        env["MANPATH"] = str(tmp_path / "man")
    else:  # without man-db, verify would report every man: link as failing
        text = re.sub(r"(?m)^Documentation=.*\n", "", text)
    unit = tmp_path / "coap2mqtt.service"
    unit.write_text(text)
    rc, out = analyze("verify", unit, env=env)
    # verify also loads the units this one names (network-online.target, ...); a complaint
    # about one of those is the machine's, not ours, but none about ours is allowed.
    ours = [l for l in out.splitlines() if "coap2mqtt" in l]
    assert rc == 0 and not ours, out


def test_security_exposure():
    rc, out = analyze("security", "--offline=yes", UNIT)
    assert rc == 0, out
    m = re.search(r"Overall exposure level for \S+: (\d+(?:\.\d+)?)", out)
    assert m, out
    exposure = float(m.group(1))
    print(f"exposure={exposure}")
    assert exposure <= MAX_EXPOSURE, out


def test_unit_contract():
    """What the daemon and the package rely on, so that a drop-in-style edit of the shipped unit
    cannot quietly lose it."""
    lines = unit_lines()
    for want in ("Type=notify", "WatchdogSec=30", "Restart=on-failure", "User=coap2mqtt",
                 "Group=coap2mqtt", "StateDirectory=coap2mqtt", "ConfigurationDirectory=coap2mqtt",
                 "ExecStart=/usr/sbin/coap2mqtt -c /etc/coap2mqtt/coap2mqtt.yaml",
                 "ExecStartPre=/usr/sbin/coap2mqtt --check -c /etc/coap2mqtt/coap2mqtt.yaml",
                 "ExecReload=/bin/kill -HUP $MAINPID", "CapabilityBoundingSet=",
                 "AmbientCapabilities=", "NoNewPrivileges=yes", "ProtectSystem=strict",
                 "RestrictAddressFamilies=AF_INET AF_INET6 AF_UNIX",
                 "SystemCallFilter=@system-service", "MemoryDenyWriteExecute=yes"):
        assert want in lines, f"{want!r} missing from {UNIT}"
    assert not any(l.startswith("DynamicUser=") for l in lines)
