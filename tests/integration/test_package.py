"""Debian package: scripts/package builds coap2mqtt and coap2mqtt-sim from the cached tarballs,
lintian finds no error, and the packages install on this machine (system user, permissions,
unit enabled, the shipped configuration valid as installed), reinstall, and purge without a trace.

It installs packages system-wide, so it runs only as root on Debian (as CI does) or when
COAP2MQTT_PACKAGE_TEST=1, never when coap2mqtt is installed or the user coap2mqtt exists already,
and it purges what it installed even when a check fails. COAP2MQTT_PACKAGE_TEST=0 skips it.
"""
import glob
import grp
import json
import os
import pwd
import re
import shutil
import socket
import stat
import subprocess
import time
from pathlib import Path

import pytest

from box import Box, cannot_run
from conftest import GW_BIN, REPO, free_port, wait_until

DIST = REPO / "dist"
CONF = Path("/etc/coap2mqtt/coap2mqtt.yaml")
KEYS = Path("/etc/coap2mqtt/devices.keys")
STATE = Path("/var/lib/coap2mqtt")
UNIT = Path("/lib/systemd/system/coap2mqtt.service")
WANTS = Path("/etc/systemd/system/multi-user.target.wants/coap2mqtt.service")
PACKAGES = ["coap2mqtt", "coap2mqtt-sim"]
APT_ENV = dict(os.environ, DEBIAN_FRONTEND="noninteractive")


def run(args, timeout=120, check=True, **kw):
    r = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=timeout,
                       stdin=subprocess.DEVNULL, **kw)
    if check:
        assert r.returncode == 0, f"{' '.join(map(str, args))}: exit {r.returncode}\n" \
                                  f"{r.stdout[-4000:]}\n{r.stderr[-4000:]}"
    return r


def installed(pkg):
    r = subprocess.run(["dpkg-query", "-W", "-f=${Status}", pkg], capture_output=True, text=True)
    return r.returncode == 0 and "installed" in r.stdout and "not-installed" not in r.stdout


def user_exists(name):
    try:
        pwd.getpwnam(name)
        return True
    except KeyError:
        return False


def group_exists(name):
    try:
        grp.getgrnam(name)
        return True
    except KeyError:
        return False


def sanitizer_build():
    """The ASan run of scripts/test would build the very same package again: once is enough."""
    info = Path(GW_BIN).resolve().parent / "meson-info" / "intro-buildoptions.json"
    try:
        opts = {o["name"]: o["value"] for o in json.loads(info.read_text())}
    except (OSError, ValueError, KeyError):
        return False
    return opts.get("b_sanitize", "none") not in ("none", "")


def skip_reason():
    want = os.environ.get("COAP2MQTT_PACKAGE_TEST")
    if want == "0":
        return "COAP2MQTT_PACKAGE_TEST=0"
    if want != "1" and not (os.geteuid() == 0 and Path("/etc/debian_version").exists()):
        return "installs packages: runs as root on Debian or with COAP2MQTT_PACKAGE_TEST=1"
    if os.geteuid() != 0:
        return "installing packages needs root"
    if not shutil.which("apt-get") or not shutil.which("dpkg"):
        return "not a Debian system (no apt-get/dpkg)"
    if sanitizer_build():
        return "sanitizer build: the package is built and checked by the normal build's run"
    for p in PACKAGES:
        if installed(p):
            return f"{p} is installed on this machine; not touching it"
    if user_exists("coap2mqtt") or group_exists("coap2mqtt"):
        return "a user or group coap2mqtt exists already; purge would remove it"
    return None


pytestmark = pytest.mark.skipif(skip_reason() is not None, reason=str(skip_reason()))


def purge():
    present = [p for p in PACKAGES if installed(p)]
    if present:
        run(["apt-get", "purge", "-y", *present], env=APT_ENV, timeout=180, check=False)


@pytest.fixture(scope="module")
def debs():
    """scripts/package without apt when everything is there already (bootstrap ran before the
    tests); it installs only what is missing otherwise."""
    r = run(["scripts/package"], cwd=REPO, timeout=480, check=False)
    assert r.returncode == 0, f"scripts/package failed:\n{r.stdout[-6000:]}\n{r.stderr[-3000:]}"
    found = {p: sorted(glob.glob(str(DIST / f"{p}_*.deb"))) for p in PACKAGES}
    for p, files in found.items():
        assert len(files) == 1, f"{p}: {files} in {DIST}"
    return {p: Path(files[0]) for p, files in found.items()}


@pytest.fixture(scope="module")
def installation(debs):
    """Installed over a state folder that is there already and belongs to root, as a run of the
    gateway as root before the package leaves it: the package takes it over."""
    try:
        if not STATE.exists():
            STATE.mkdir(mode=0o755)
            (STATE / "left-by-root").write_text("")
        run(["apt-get", "install", "-y", "--no-install-recommends",
             *[f"./{d.relative_to(REPO)}" for d in debs.values()]],
            cwd=REPO, env=APT_ENV, timeout=300)
        yield debs
    finally:
        purge()


def test_lintian_no_errors(debs):
    changes = sorted(DIST.glob("*.changes"))
    assert len(changes) == 1, changes
    r = run(["lintian", changes[0]], timeout=300, check=False)
    out = r.stdout + r.stderr
    print(out)
    errors = [l for l in out.splitlines() if l.startswith("E: ")]
    assert not errors, out


def test_depends_only_on_debian_libraries(debs):
    """wolfSSL and libcoap are linked statically; the rest comes from Debian 12."""
    for p, deb in debs.items():
        depends = run(["dpkg-deb", "-f", deb, "Depends"]).stdout
        assert "libc6" in depends, depends
        assert "wolfssl" not in depends and "libcoap" not in depends, f"{p}: {depends}"
    depends = run(["dpkg-deb", "-f", debs["coap2mqtt"], "Depends"]).stdout
    # procps: the unit's ExecReload runs /bin/kill, which minimal Debian systems lack
    for lib in ("libpaho-mqtt", "libevent-core", "libyaml", "libsystemd0", "adduser",
                "ca-certificates", "procps"):
        assert lib in depends, depends


def test_installed(installation):
    assert Path("/usr/sbin/coap2mqtt").exists() and Path("/usr/bin/coap2mqtt-sim").exists()
    out = run(["/usr/sbin/coap2mqtt", "--version"]).stdout
    assert "libcoap 4.3.5" in out and "wolfSSL 5.9.2" in out, out
    run(["/usr/bin/coap2mqtt-sim", "--version"])
    ldd = run(["ldd", "/usr/sbin/coap2mqtt"]).stdout
    assert "wolfssl" not in ldd and "libcoap" not in ldd, ldd

    # the system user and the files that may hold keys
    user = pwd.getpwnam("coap2mqtt")
    gid = grp.getgrnam("coap2mqtt").gr_gid
    assert user.pw_gid == gid and user.pw_dir == str(STATE), user
    assert user.pw_shell in ("/usr/sbin/nologin", "/sbin/nologin", "/bin/false"), user
    for f in (CONF, KEYS):
        st = f.stat()
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (0, gid, 0o640), \
            f"{f}: {st.st_uid}:{st.st_gid} {oct(stat.S_IMODE(st.st_mode))}"
    for path in (STATE, *STATE.iterdir()):
        st = path.lstat()
        assert (st.st_uid, st.st_gid) == (user.pw_uid, gid), f"{path}: {st}"
    st = STATE.stat()
    assert stat.S_ISDIR(st.st_mode) and stat.S_IMODE(st.st_mode) == 0o750, st

    # the shipped configuration is valid as installed, for root and for the service's user,
    # and accepts no well-known example key
    out = run(["/usr/sbin/coap2mqtt", "--check", "-c", CONF]).stdout
    assert "configuration OK (0 devices" in out, out
    # (as the service's user only where others may enter "/": a chroot made by mktemp may not)
    if os.stat("/").st_mode & stat.S_IXOTH:
        run(["runuser", "-u", "coap2mqtt", "--", "/usr/sbin/coap2mqtt", "--check", "-c", CONF])

    # unit installed and enabled (without systemd running: deb-systemd-helper made the link)
    assert UNIT.exists()
    assert WANTS.is_symlink() and os.readlink(WANTS).endswith("/coap2mqtt.service")
    if shutil.which("systemd-analyze"):
        r = run(["systemd-analyze", "verify", UNIT], check=False)
        ours = [l for l in (r.stdout + r.stderr).splitlines() if "coap2mqtt" in l]
        assert r.returncode == 0 and not ours, r.stdout + r.stderr

    # man pages
    for page in ("man8/coap2mqtt.8.gz", "man5/coap2mqtt.yaml.5.gz", "man1/coap2mqtt-sim.1.gz"):
        assert (Path("/usr/share/man") / page).exists(), page


def test_reinstall_keeps_permissions(installation):
    """A second configure (as on an upgrade) must neither fail without systemd nor lose the
    group of the key files."""
    run(["dpkg", "-i", installation["coap2mqtt"]], env=APT_ENV, timeout=180)
    gid = grp.getgrnam("coap2mqtt").gr_gid
    for f in (CONF, KEYS):
        st = f.stat()
        assert (st.st_gid, stat.S_IMODE(st.st_mode)) == (gid, 0o640), f
    run(["/usr/sbin/coap2mqtt", "--check", "-c", CONF])


def test_purge_leaves_nothing(installation):
    purge()
    for p in PACKAGES:
        assert not installed(p), p
    assert not user_exists("coap2mqtt") and not group_exists("coap2mqtt")
    for path in (STATE, CONF, KEYS, WANTS, Path("/etc/coap2mqtt")):
        assert not os.path.lexists(path), path
    # exit 1 with no output means "no overrides at all" (a fresh system after the purge)
    r = run(["dpkg-statoverride", "--list"], check=False)
    assert r.returncode in (0, 1), r
    overrides = r.stdout
    assert "/etc/coap2mqtt" not in overrides, overrides


# ---- the service under a real systemd ----------------------------------------------------------

BOX_ID, BOX_KEY = "box-01", "box-01-Secret-K3y"
BOX_CA = "/etc/ssl/box-broker-ca.crt"  # the operator's own file, outside what purge removes


@pytest.fixture(scope="module")
def box(debs):
    why = cannot_run()
    if why:
        pytest.skip(f"no system test under systemd: {why}")
    b = Box()
    try:
        b.boot()
        yield b
    finally:
        b.close()


def box_sim(box, uri, *args, identity=BOX_ID, key=BOX_KEY, check=True, timeout=60):
    return box.run(f"coap2mqtt-sim --uri {uri} --identity {identity} --key '{key}' "
                   + " ".join(map(str, args)), timeout=timeout, check=check)


def unit_props(box, *props):
    out = box.run(f"systemctl show -p {','.join(props)} coap2mqtt").stdout
    return dict(l.split("=", 1) for l in out.splitlines() if "=" in l)


def journal(box, *args):
    return box.run("journalctl -q --no-pager -u coap2mqtt " + " ".join(args)).stdout


def test_the_service_under_a_real_systemd(box, debs, pki):
    """Debian 12 booted with systemd as PID 1: the package installs with apt; the service is
    active only after READY; a device's reading reaches a TLS mosquitto in the box; no watchdog
    restart for 60 s; reload keeps the device's DTLS session; the journal has the gateway's lines
    at their priorities; systemd-analyze security rates the unit 2.0 at most; stop is clean (no
    SIGKILL, exit 0); purge leaves nothing."""
    coap_port, mqtt_port = free_port(), free_port(socket.SOCK_STREAM)
    uri = f"coaps://127.0.0.1:{coap_port}"
    for d in debs.values():
        box.put(f"/root/debs/{d.name}", d.read_bytes())
    box.put("/etc/mosquitto/certs/ca.crt", pki.ca.read_bytes())
    box.put("/etc/mosquitto/certs/broker.crt", pki.broker_crt.read_bytes())
    box.put("/etc/mosquitto/certs/broker.key", pki.broker_key.read_bytes(), 0o644)
    # a broker of its own (the packaged unit's pid file is not writable in such a box)
    box.put("/etc/mosquitto/box.conf",
            f"listener {mqtt_port} 127.0.0.1\nallow_anonymous true\n"
            "cafile /etc/mosquitto/certs/ca.crt\ncertfile /etc/mosquitto/certs/broker.crt\n"
            "keyfile /etc/mosquitto/certs/broker.key\n")
    box.put("/etc/systemd/system/box-broker.service",
            "[Service]\nExecStart=/usr/sbin/mosquitto -c /etc/mosquitto/box.conf\n")
    box.run("systemctl daemon-reload && systemctl start box-broker")
    wait_until(lambda: box.run(f"exec 3<>/dev/tcp/127.0.0.1/{mqtt_port}", check=False)
               .returncode == 0, 20, "the box's broker to accept")
    box.run("cd /root/debs && export DEBIAN_FRONTEND=noninteractive && "
            "{ apt-get install -y --no-install-recommends ./*.deb || "
            "{ apt-get update && apt-get install -y --no-install-recommends ./*.deb; }; }",
            timeout=600)
    assert box.run("systemctl is-enabled coap2mqtt").stdout.strip() == "enabled"
    assert box.run("systemctl is-active coap2mqtt", check=False).stdout.strip() == "inactive"

    box.put(BOX_CA, pki.ca.read_bytes())
    box.put("/etc/coap2mqtt/coap2mqtt.yaml", f"""log_level: info
coap:
  listen: ["{uri}"]
devices:
  - identity: {BOX_ID}
    key: "{BOX_KEY}"
mqtt:
  url: mqtts://127.0.0.1:{mqtt_port}
  ca_file: {BOX_CA}
routes:
  - path: sensors/{{name}}
    topic: devices/{{identity}}/{{name}}
""", 0o640)
    box.run("coap2mqtt --check -c /etc/coap2mqtt/coap2mqtt.yaml")

    # start: systemctl returns once READY=1 came; the unit is active (running) only then
    t_start = time.monotonic()
    box.run("systemctl start coap2mqtt || { journalctl -q --no-pager -u coap2mqtt | tail -30; "
            "exit 1; }", timeout=60)
    p = unit_props(box, "ActiveState", "SubState", "Type", "WatchdogUSec", "NRestarts")
    assert (p["ActiveState"], p["SubState"], p["Type"]) == ("active", "running", "notify"), p
    assert p["WatchdogUSec"] == "30s", p
    lines = journal(box, "-o", "cat").splitlines()
    ready = [i for i, l in enumerate(lines) if l.startswith("info: ready listen=")]
    started = [i for i, l in enumerate(lines) if l.startswith("Started coap2mqtt.service")]
    assert ready and started and ready[0] < started[0], "\n".join(lines[-40:])

    # a reading reaches the broker in the box, through TLS
    box.run(f"mosquitto_sub -h 127.0.0.1 -p {mqtt_port} --cafile /etc/mosquitto/certs/ca.crt "
            "-t 'devices/#' -C 1 -W 30 -v > /root/sub.out 2>&1 & echo started")
    time.sleep(1)
    r = box_sim(box, uri, "--count", 1, "--path", "sensors/temperature", "--payload", "21.5")
    assert "code=2.04" in r.stdout, r.stdout
    wait_until(lambda: "devices/box-01/temperature 21.5" in
               box.run("cat /root/sub.out").stdout, 30, "the reading at the box's broker")

    # reload keeps the session: a device on one session all along, no new handshake
    box.run(f"coap2mqtt-sim --uri {uri} --identity {BOX_ID} --key '{BOX_KEY}' --count 0 "
            "--interval 300 --timeout 0 --path sensors/held --payload x > /root/held.out 2>&1 &"
            " echo $! > /root/held.pid")
    answers = lambda: box.run("grep -c 'code=2.04' /root/held.out || true").stdout.strip()
    wait_until(lambda: int(answers() or 0) >= 3, 30, "the held device's answers")
    hs = journal(box, "-o cat").count(f"identity={BOX_ID} handshake=ok")
    box.run("systemctl reload coap2mqtt", timeout=60)
    n = int(answers())
    wait_until(lambda: int(answers()) >= n + 5, 30, "answers after the reload")
    out = journal(box, "-o cat")
    assert "reload: ok" in out, out[-3000:]
    assert out.count(f"identity={BOX_ID} handshake=ok") == hs, out[-3000:]
    assert box.run("grep -v 'code=2.04' /root/held.out | grep code= || true").stdout == ""

    # priorities: an unknown identity is a warning, a handshake an info line
    box_sim(box, uri, "--count", 1, "--path", "sensors/x", "--handshake-timeout", 3,
            "--max-retransmit", 1, identity="stranger-9", key="nobody-knows-it", check=False)
    warn = journal(box, "-p", "warning", "-o", "cat")
    assert 'identity="stranger-9" handshake=refused' in warn, warn[-3000:]
    assert "handshake=ok" not in warn, warn[-3000:]
    assert "handshake=ok" in journal(box, "-p", "info", "-o", "cat")

    # the watchdog (WatchdogSec=30) never fired in 60 s
    time.sleep(max(0.0, 60 - (time.monotonic() - t_start)))
    p = unit_props(box, "ActiveState", "NRestarts", "MainPID")
    assert p["ActiveState"] == "active" and p["NRestarts"] == "0", p
    assert "watchdog" not in journal(box, "-o", "cat", "_PID=1").lower()

    # the unit's sandbox as this systemd rates it
    out = box.run("systemd-analyze security --no-pager coap2mqtt.service").stdout
    m = re.search(r"Overall exposure level for coap2mqtt\.service: (\d+(?:\.\d+)?)", out)
    assert m and float(m.group(1)) <= 2.0, out[-2000:]
    print(f"systemd-analyze security in the box: {m.group(1)}")

    # stop: SIGTERM, exit 0, nothing killed
    box.run("kill $(cat /root/held.pid) || true")
    box.run("systemctl stop coap2mqtt", timeout=60)
    p = unit_props(box, "ActiveState", "Result", "ExecMainCode", "ExecMainStatus")
    assert p == {"ActiveState": "inactive", "Result": "success", "ExecMainCode": "1",
                 "ExecMainStatus": "0"}, p
    out = box.run("journalctl -q --no-pager -o cat _PID=1").stdout
    assert "SIGKILL" not in out and "Killing process" not in out, out[-3000:]

    # purge leaves nothing of the package
    box.run("DEBIAN_FRONTEND=noninteractive apt-get purge -y coap2mqtt coap2mqtt-sim", timeout=300)
    box.run("systemctl daemon-reload")
    left = box.run("ls -d /etc/coap2mqtt /var/lib/coap2mqtt /lib/systemd/system/coap2mqtt.service "
                   "/etc/systemd/system/multi-user.target.wants/coap2mqtt.service 2>/dev/null; "
                   "getent passwd coap2mqtt; getent group coap2mqtt; "
                   "dpkg-statoverride --list | grep coap2mqtt; true").stdout
    assert left.strip() == "", left
