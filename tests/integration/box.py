"""A brand-new Debian 12 booted with systemd as PID 1 (systemd-nspawn), for the package's system
test: the service under a real service manager. The box shares the host's network (loopback
included) and is powered off and removed by close(), also when a check failed.

The base image (debootstrap minbase with systemd, mosquitto and the package's dependencies) is
made once and cached in BOX_CACHE as a tar file; each box is a fresh copy of it.
"""
import glob
import hashlib
import os
import shutil
import subprocess
import tempfile
import time
from pathlib import Path

BOX_CACHE = Path(os.environ.get("COAP2MQTT_BOX_CACHE", "/var/tmp/coap2mqtt-box"))
# what the box gets besides minbase: systemd as init, the broker and its clients, and what the
# packages depend on, so that installing them needs no network
BASE_PACKAGES = ["systemd", "systemd-sysv", "dbus", "ca-certificates", "procps", "adduser",
                 "mosquitto", "mosquitto-clients", "libpaho-mqtt1.3", "libevent-core-2.1-7",
                 "libevent-pthreads-2.1-7", "libyaml-0-2", "libsystemd0", "libjemalloc2"]
BASE = BOX_CACHE / ("bookworm-" + hashlib.sha256(" ".join(BASE_PACKAGES).encode()).hexdigest()[:12]
                    + ".tar")


def cannot_run():
    """Why a box cannot be booted here (None when it can)."""
    if os.geteuid() != 0:
        return "booting a Debian box with systemd-nspawn needs root"
    for tool, pkg in (("systemd-nspawn", "systemd-container"), ("debootstrap", "debootstrap"),
                      ("nsenter", "util-linux")):
        if not shutil.which(tool):
            return f"{tool} is missing (Debian package {pkg}; scripts/bootstrap installs it)"
    cg = Path("/sys/fs/cgroup")
    if not cg.is_dir() or not any(cg.iterdir()):
        return ("no cgroup file system is mounted at /sys/fs/cgroup (a chroot that bound /sys "
                "without its submounts?): systemd cannot boot in a box here")
    return None


def archive_uri():
    for f in sorted(glob.glob("/etc/apt/sources.list.d/*.sources")):
        for line in Path(f).read_text().splitlines():
            if line.startswith("URIs:"):
                return line.split()[1]
    try:
        for line in Path("/etc/apt/sources.list").read_text().splitlines():
            parts = line.split()
            if len(parts) > 2 and parts[0] == "deb":
                return parts[1]
    except OSError:
        pass
    return "http://deb.debian.org/debian"


def base_image():
    if BASE.is_file() and BASE.stat().st_size > 0:
        return BASE
    BOX_CACHE.mkdir(parents=True, exist_ok=True)
    root = Path(tempfile.mkdtemp(dir=BOX_CACHE, prefix="make."))
    try:
        r = subprocess.run(["debootstrap", "--variant=minbase",
                            "--include=" + ",".join(BASE_PACKAGES), "bookworm", root,
                            archive_uri()], capture_output=True, text=True, timeout=900,
                           stdin=subprocess.DEVNULL)
        assert r.returncode == 0, f"debootstrap failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        # D-Bus needs what such a box lacks; systemctl talks to PID 1 on its private socket
        for unit in ("dbus.service", "dbus.socket", "systemd-logind.service"):
            link = root / "etc/systemd/system" / unit
            link.unlink(missing_ok=True)
            link.symlink_to("/dev/null")
        # the test starts the broker once it has its TLS listener
        (root / "etc/systemd/system/multi-user.target.wants/mosquitto.service").unlink(
            missing_ok=True)
        os.chmod(root, 0o755)  # "/" of the box: services under other users enter it
        tmp = BASE.with_suffix(".tmp")
        subprocess.run(["tar", "-C", root, "-cf", tmp, "."], check=True, timeout=300)
        tmp.rename(BASE)
    finally:
        subprocess.run(["rm", "-rf", "--one-file-system", root], timeout=300)
    return BASE


class Box:
    def __init__(self):
        BOX_CACHE.mkdir(parents=True, exist_ok=True)
        self.root = Path(tempfile.mkdtemp(dir=BOX_CACHE, prefix="box."))
        self.nspawn = None
        self.init = None
        self.bootlog = self.root.with_suffix(".boot.log")

    def boot(self, timeout=120):
        subprocess.run(["tar", "-C", self.root, "-xf", base_image()], check=True, timeout=300)
        os.chmod(self.root, 0o755)  # tar gave "/" the mode of the directory it was made in
        (self.root / "etc/hostname").write_text(f"c2m-box-{os.getpid()}\n")
        with open(self.bootlog, "wb") as log:
            self.nspawn = subprocess.Popen(["systemd-nspawn", "-q", "--register=no",
                                            "--keep-unit", "-D", self.root, "-b"],
                                           stdout=log, stderr=subprocess.STDOUT,
                                           stdin=subprocess.DEVNULL, start_new_session=True)
        deadline = time.monotonic() + timeout
        while self.init is None and time.monotonic() < deadline:
            r = subprocess.run(["pgrep", "-P", str(self.nspawn.pid), "-x", "systemd"],
                               capture_output=True, text=True)
            if r.stdout.split():
                self.init = int(r.stdout.split()[0])
            elif self.nspawn.poll() is not None:
                break
            else:
                time.sleep(0.2)
        assert self.init, f"the box did not start systemd:\n{self.boot_log()}"
        state = ""
        while time.monotonic() < deadline:
            state = self.run("systemctl is-system-running", check=False).stdout.strip()
            if state in ("running", "degraded"):
                return self
            time.sleep(0.5)
        raise AssertionError(f"the box did not boot (state {state!r}):\n{self.boot_log()}")

    def boot_log(self):
        try:
            return self.bootlog.read_text(errors="replace")[-3000:]
        except OSError:
            return ""

    def run(self, script, timeout=120, check=True):
        """A bash script inside the box (all its namespaces), as root."""
        r = subprocess.run(["nsenter", "-t", str(self.init), "-a", "/bin/bash", "-c", script],
                           capture_output=True, text=True, timeout=timeout,
                           stdin=subprocess.DEVNULL)
        if check:
            assert r.returncode == 0, f"in the box: {script}\nexit {r.returncode}\n" \
                                      f"{r.stdout[-3000:]}\n{r.stderr[-3000:]}"
        return r

    def put(self, path, data, mode=0o644):
        """A file into the box (path inside it)."""
        p = self.root / str(path).lstrip("/")
        p.parent.mkdir(parents=True, exist_ok=True)
        if isinstance(data, str):
            data = data.encode()
        p.write_bytes(data)
        os.chmod(p, mode)

    def close(self):
        if self.nspawn is not None and self.nspawn.poll() is None:
            if self.init:
                subprocess.run(["nsenter", "-t", str(self.init), "-a", "systemctl", "poweroff"],
                               capture_output=True, timeout=30, stdin=subprocess.DEVNULL)
            try:
                self.nspawn.wait(30)
            except subprocess.TimeoutExpired:
                self.nspawn.kill()
                self.nspawn.wait(10)
        mounts = Path("/proc/mounts").read_text()
        if f" {self.root}/" in mounts or f" {self.root} " in mounts:
            raise AssertionError(f"mounts remain under {self.root}; not removing it")
        subprocess.run(["rm", "-rf", "--one-file-system", self.root], timeout=300)
        self.bootlog.unlink(missing_ok=True)
