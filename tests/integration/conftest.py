"""Integration-test harness: a throwaway PKI, a real mosquitto with TLS, the real gateway, an MQTT 5
subscriber, the device simulator and raw DTLS peers (openssl s_client, Debian's coap-client).

Every process started here is registered and ended by a fixture finalizer (and, as a last resort,
at interpreter exit); every wait is bounded. Each test file runs in its own pytest process, so
ports come from the kernel (bind to port 0) and files live in pytest's per-test temp dirs.
"""
import atexit
import heapq
import itertools
import json
import os
import random
import re
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import threading
import time
from collections import namedtuple
from pathlib import Path

import pytest

try:
    import paho.mqtt.client as mqtt
    from paho.mqtt.packettypes import PacketTypes
    from paho.mqtt.properties import Properties
    from paho.mqtt.subscribeoptions import SubscribeOptions
except ImportError as e:  # pragma: no cover - reported clearly instead of a collection traceback
    raise ImportError(f"python3-paho-mqtt is needed by the integration tests: {e}") from e

REPO = Path(__file__).resolve().parents[2]
GW_BIN = os.environ.get("COAP2MQTT_BIN") or str(REPO / "build" / "coap2mqtt")
SIM_BIN = os.environ.get("COAP2MQTT_SIM") or str(REPO / "build" / "tests" / "coap2mqtt-sim")
MOSQUITTO = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
OPENSSL = shutil.which("openssl") or "/usr/bin/openssl"

# Distinctive key texts, so a test can prove none of them ever reaches a log.
DEVICES = {
    "sensor-01": "sensor-01-Secret-K3y",
    "sensor-02": "sensor-02-Other-K3y!",
}

# Sanitizer reports in a log mean the test failed even if the behaviour looked right.
SANITIZER_RE = re.compile(r"ERROR: (Address|Leak|Memory|Thread)Sanitizer|runtime error:|"
                          r"SUMMARY: (Address|Undefined|Leak)")

# CoAP option numbers and codes used by the raw-datagram tests (RFC 7252).
OPT_URI_PATH = 11
OPT_CONTENT_FORMAT = 12
OPT_MAX_AGE = 14
OPT_SIZE1 = 60
CON, NON, ACK, RST = 0, 1, 2, 3
POST, PUT = 0x02, 0x03


def code_str(code):
    return f"{code >> 5}.{code & 31:02d}"


# --------------------------------------------------------------------------------------------
# processes, waits, ports

_PROCS = []
_PROCS_LOCK = threading.Lock()


def spawn(args, **kw):
    """Popen that is remembered, so nothing outlives the test run."""
    p = subprocess.Popen([str(a) for a in args], **kw)
    with _PROCS_LOCK:
        _PROCS.append(p)
    return p


def end_process(p, sig=signal.SIGTERM, timeout=10):
    """Stop one process we started: signal, wait (bounded), then SIGKILL. Returns its exit code."""
    if p is None:
        return None
    if p.poll() is None:
        try:
            os.kill(p.pid, signal.SIGCONT)  # a paused process cannot act on SIGTERM
            p.send_signal(sig)
        except ProcessLookupError:
            pass
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait(10)
    return p.returncode


@atexit.register
def _reap_all():
    with _PROCS_LOCK:
        procs = list(_PROCS)
    for p in procs:
        if p.poll() is None:
            try:
                os.kill(p.pid, signal.SIGCONT)
                p.kill()
                p.wait(5)
            except (ProcessLookupError, subprocess.TimeoutExpired):
                pass


def wait_until(pred, timeout, what, interval=0.05):
    """Poll pred() until it returns something truthy; fail with `what` after `timeout` s."""
    deadline = time.monotonic() + timeout
    while True:
        v = pred()
        if v:
            return v
        if time.monotonic() >= deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(interval)


def free_port(kind=socket.SOCK_DGRAM):
    """A port the kernel just handed out on 127.0.0.1 (UDP by default; TCP with SOCK_STREAM)."""
    with socket.socket(socket.AF_INET, kind) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def tcp_accepts(port, timeout=0.5):
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=timeout):
            return True
    except OSError:
        return False


def read_text(path):
    try:
        return Path(path).read_bytes().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""


def tail(text, n=40):
    return "\n".join(text.splitlines()[-n:])


_counter = itertools.count(1)


def unique(prefix):
    """A name no other test (or parallel test process) uses."""
    return f"{prefix}-{os.getpid()}-{next(_counter)}"


# --------------------------------------------------------------------------------------------
# YAML (the gateway's config) written from Python values, without a YAML library

def _scalar(v):
    if v is True:
        return "true"
    if v is False:
        return "false"
    if v is None:
        return "null"
    if isinstance(v, (int, float)):
        return str(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_scalar(x) for x in v) + "]"
    if isinstance(v, dict) and not v:
        return "{}"
    return json.dumps(str(v))  # a JSON string is a valid YAML double-quoted scalar


def to_yaml(obj, indent=0):
    """Block-style YAML for dicts of scalars, lists and dicts; lists of dicts become '- ' items."""
    pad = "  " * indent
    lines = []
    for k, v in obj.items():
        if isinstance(v, dict) and v:
            lines.append(f"{pad}{k}:")
            lines.append(to_yaml(v, indent + 1))
        elif isinstance(v, (list, tuple)) and v and all(isinstance(x, dict) for x in v):
            lines.append(f"{pad}{k}:")
            for item in v:
                sub = to_yaml(item, indent + 2).split("\n")
                sub[0] = "  " * (indent + 1) + "- " + sub[0].lstrip()
                lines.extend(sub)
        else:
            lines.append(f"{pad}{k}: {_scalar(v)}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------
# PKI made with the openssl command line

class PKI:
    """CA, a broker certificate for 127.0.0.1/localhost and one for wrong.example only."""

    def __init__(self, d):
        self.dir = Path(d)
        self.ca = self.dir / "ca.crt"
        self.ca_key = self.dir / "ca.key"
        self._openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                      "-nodes", "-keyout", self.ca_key, "-out", self.ca, "-days", "3",
                      "-subj", "/CN=coap2mqtt test CA",
                      "-addext", "basicConstraints=critical,CA:TRUE",
                      "-addext", "keyUsage=critical,keyCertSign,cRLSign")
        self.broker_crt, self.broker_key = self._leaf("broker", "localhost",
                                                      "IP:127.0.0.1,DNS:localhost")
        self.wrong_crt, self.wrong_key = self._leaf("wrong", "wrong.example", "DNS:wrong.example")

    def _openssl(self, *args):
        r = subprocess.run([OPENSSL, *map(str, args)], cwd=self.dir, capture_output=True,
                           timeout=60)
        assert r.returncode == 0, f"openssl {args[0]} failed: {r.stderr.decode(errors='replace')}"

    def _leaf(self, name, cn, san):
        key, csr, crt = (self.dir / f"{name}.{x}" for x in ("key", "csr", "crt"))
        ext = self.dir / f"{name}.ext"
        ext.write_text(f"subjectAltName={san}\nbasicConstraints=critical,CA:FALSE\n"
                       "keyUsage=critical,digitalSignature,keyEncipherment\n"
                       "extendedKeyUsage=serverAuth\n")
        self._openssl("req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                      "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={cn}")
        self._openssl("x509", "-req", "-in", csr, "-CA", self.ca, "-CAkey", self.ca_key,
                      "-CAcreateserial", "-days", "3", "-out", crt, "-extfile", ext)
        return crt, key


@pytest.fixture(scope="session")
def pki(tmp_path_factory):
    return PKI(tmp_path_factory.mktemp("pki"))


# --------------------------------------------------------------------------------------------
# mosquitto with a TLS listener on 127.0.0.1

class Broker:
    def __init__(self, d, pki, wrong_host=False, persistence=False, port=None, extra=()):
        self.dir = Path(d)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.pki = pki
        self.port = port or free_port(socket.SOCK_STREAM)
        self.persistence = persistence
        self.conf = self.dir / "mosquitto.conf"
        self.log = self.dir / "mosquitto.log"
        self.out = self.dir / "mosquitto.out"
        crt, key = ((pki.wrong_crt, pki.wrong_key) if wrong_host
                    else (pki.broker_crt, pki.broker_key))
        lines = [
            "per_listener_settings false",
            "allow_anonymous true",
            f"persistence {'true' if persistence else 'false'}",
            f"persistence_location {self.dir}/",
            "autosave_interval 1",
            f"log_dest file {self.log}",
            "log_type error", "log_type warning", "log_type notice", "log_type information",
            "connection_messages true",
            "log_timestamp_format %H:%M:%S",
            "max_queued_messages 10000",
            f"listener {self.port} 127.0.0.1",
            f"cafile {pki.ca}",
            f"certfile {crt}",
            f"keyfile {key}",
            *extra,
        ]
        if os.geteuid() == 0:
            lines.insert(0, "user root")  # keep access to the temp dir's key files
        self.conf.write_text("\n".join(lines) + "\n")
        self.proc = None
        self.paused = False

    def start(self, timeout=15):
        assert self.proc is None or self.proc.poll() is not None, "broker already running"
        out = open(self.out, "ab")
        try:
            self.proc = spawn([MOSQUITTO, "-c", self.conf], stdout=out, stderr=subprocess.STDOUT,
                              stdin=subprocess.DEVNULL)
        finally:
            out.close()
        self.paused = False

        def up():
            if self.proc.poll() is not None:
                raise AssertionError(f"mosquitto exited with {self.proc.returncode}:\n"
                                     f"{read_text(self.out)}\n{tail(read_text(self.log))}")
            return tcp_accepts(self.port)
        wait_until(up, timeout, f"mosquitto to accept on port {self.port}")
        return self

    def stop(self, timeout=10):
        """Graceful stop (SIGTERM; saves its persistence file when that is on)."""
        rc = end_process(self.proc, signal.SIGTERM, timeout)
        self.paused = False
        if self.proc is not None:
            wait_until(lambda: not tcp_accepts(self.port, 0.2), 5, "the broker port to close")
        return rc

    def kill(self):
        if self.paused and self.proc.poll() is None:
            # as it is: a SIGCONT first would let it take (and acknowledge) what waits in its
            # sockets before it dies
            self.proc.kill()
            self.proc.wait(10)
        rc = end_process(self.proc, signal.SIGKILL, 10)
        self.paused = False
        return rc

    def pause(self):
        os.kill(self.proc.pid, signal.SIGSTOP)
        self.paused = True

    def resume(self):
        os.kill(self.proc.pid, signal.SIGCONT)
        self.paused = False

    def restart(self):
        self.stop()
        return self.start()

    def running(self):
        return self.proc is not None and self.proc.poll() is None

    def log_text(self):
        return read_text(self.log)

    @property
    def url(self):
        return f"mqtts://127.0.0.1:{self.port}"


@pytest.fixture
def broker_factory(tmp_path, pki):
    """make(name, **kw) -> a started Broker; all of them are stopped after the test."""
    made = []

    def make(name="broker", start=True, **kw):
        b = Broker(tmp_path / name, pki, **kw)
        made.append(b)
        return b.start() if start else b
    yield make
    for b in made:
        b.kill() if b.paused else b.stop()


# --------------------------------------------------------------------------------------------
# MQTT 5 subscriber (paho-mqtt 1.6.1)

Msg = namedtuple("Msg", "topic payload qos retain content_type user_props props time")


class Relay(threading.Thread):
    """A UDP relay on loopback between devices and the gateway, standing in for a radio link
    (this kernel has no netem): every datagram, both ways, is held for delay_s and dropped with
    probability loss, drawn from random.Random(seed) so that a failing run can be replayed. Each
    device address gets its own upstream socket, so the gateway sees one peer per device. Runs
    until stop(); holds at most max_held datagrams (the rest are dropped and counted)."""

    def __init__(self, target_port, delay_s=0.0, loss=0.0, seed=1, max_held=100000):
        super().__init__(daemon=True)
        self.delay, self.loss, self.max_held = delay_s, loss, max_held
        self.rng = random.Random(seed)
        self.sel = selectors.DefaultSelector()
        self.front = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.front.bind(("127.0.0.1", 0))
        self.port = self.front.getsockname()[1]
        self.sel.register(self.front, selectors.EVENT_READ, None)
        self.target = ("127.0.0.1", target_port)
        self.backs = {}  # device address -> upstream socket
        self.passed = self.dropped = 0
        self.stopping = threading.Event()

    def _back(self, addr):
        b = self.backs.get(addr)
        if b is None:
            b = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            b.bind(("127.0.0.1", 0))
            b.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 1 << 20)
            self.backs[addr] = b
            self.sel.register(b, selectors.EVENT_READ, addr)
        return b

    def run(self):
        due = []  # (time, seq, socket, datagram, address)
        seq = 0
        while not self.stopping.is_set():
            wait = max(0, min(0.05, due[0][0] - time.monotonic())) if due else 0.05
            for key, _ in self.sel.select(wait):
                try:
                    data, addr = key.fileobj.recvfrom(65536)
                except OSError:
                    continue
                if key.data is None:  # from a device
                    out, to = self._back(addr), self.target
                else:
                    out, to = self.front, key.data
                if self.rng.random() < self.loss or len(due) >= self.max_held:
                    self.dropped += 1
                    continue
                seq += 1
                heapq.heappush(due, (time.monotonic() + self.delay, seq, out, data, to))
            while due and due[0][0] <= time.monotonic():
                _, _, out, data, to = heapq.heappop(due)
                try:
                    out.sendto(data, to)
                    self.passed += 1
                except OSError:
                    self.dropped += 1

    def stop(self):
        self.stopping.set()
        self.join(5)
        for s in [self.front, *self.backs.values()]:
            s.close()
        self.sel.close()


class Subscriber:
    """Subscribes (QoS 1) to `topic` and records every message. Uses a persistent session
    (clean start off, session expiry 1 h), so messages published while it is away (broker
    restart with persistence on) reach it when it reconnects by itself."""

    def __init__(self, broker, topic="devices/#", insecure=False, name=None):
        self.broker = broker
        self.topic = topic
        self.msgs = []
        self.lock = threading.Lock()
        self.cond = threading.Condition(self.lock)
        self.subscribed = threading.Event()
        self.connects = 0
        self.client = mqtt.Client(client_id=name or unique("sub"), protocol=mqtt.MQTTv5)
        self.client.tls_set(ca_certs=str(broker.pki.ca))
        if insecure:
            self.client.tls_insecure_set(True)  # for the wrong-host broker only
        self.client.reconnect_delay_set(min_delay=1, max_delay=2)
        self.client.on_connect = self._on_connect
        self.client.on_subscribe = self._on_subscribe
        self.client.on_message = self._on_message
        self.started = False

    def _on_connect(self, client, userdata, flags, rc, properties=None):
        if rc == 0:
            self.connects += 1
            client.subscribe(self.topic, options=SubscribeOptions(qos=1))

    def _on_subscribe(self, client, userdata, mid, rcs, properties=None):
        self.subscribed.set()

    def _on_message(self, client, userdata, m):
        props = m.properties
        up = list(getattr(props, "UserProperty", None) or []) if props else []
        msg = Msg(m.topic, bytes(m.payload), m.qos, bool(m.retain),
                  getattr(props, "ContentType", None) if props else None,
                  up, props, time.monotonic())
        with self.cond:
            self.msgs.append(msg)
            self.cond.notify_all()

    def start(self, timeout=15):
        props = Properties(PacketTypes.CONNECT)
        props.SessionExpiryInterval = 3600
        wait_until(lambda: self._try_connect(props), timeout, "the subscriber to connect")
        self.client.loop_start()
        self.started = True
        assert self.subscribed.wait(timeout), "no SUBACK from the broker"
        return self

    def _try_connect(self, props):
        try:
            self.client.connect("127.0.0.1", self.broker.port, keepalive=10, clean_start=False,
                                properties=props)
            return True
        except OSError:
            time.sleep(0.2)
            return False

    def stop(self):
        if self.started:
            try:
                self.client.disconnect()
            except Exception:
                pass
            self.client.loop_stop()
            self.started = False

    def messages(self, match=None):
        with self.lock:
            return [m for m in self.msgs if match is None or _matches(m, match)]

    def clear(self):
        with self.lock:
            self.msgs.clear()

    def wait_for(self, count, timeout=30, match=None):
        """At least `count` messages (matching `match`: a topic prefix or a predicate)."""
        deadline = time.monotonic() + timeout
        with self.cond:
            while True:
                got = [m for m in self.msgs if match is None or _matches(m, match)]
                if len(got) >= count:
                    return got
                left = deadline - time.monotonic()
                if left <= 0:
                    raise AssertionError(
                        f"expected {count} MQTT messages ({match!r}) within {timeout} s, got "
                        f"{len(got)}: {[(m.topic, m.payload[:40]) for m in got][:20]}")
                self.cond.wait(min(left, 0.2))

    def assert_none(self, match=None, window=1.5, already=0):
        """No more than `already` matching messages, now or during the next `window` s."""
        time.sleep(window)
        got = self.messages(match)
        assert len(got) <= already, \
            f"unexpected MQTT messages: {[(m.topic, m.payload[:40]) for m in got][:20]}"


def _matches(m, match):
    if callable(match):
        return match(m)
    if match.endswith("#"):
        return m.topic.startswith(match[:-1])
    return m.topic == match


def user_prop(m, key):
    vals = [v for k, v in m.user_props if k == key]
    return vals[0] if len(vals) == 1 else vals or None


@pytest.fixture
def subscriber_factory():
    made = []

    def make(broker, **kw):
        s = Subscriber(broker, **kw)
        made.append(s)
        return s.start()
    yield make
    for s in made:
        s.stop()


# --------------------------------------------------------------------------------------------
# the gateway

def default_routes():
    return [
        {"path": "sensors/{name}", "topic": "devices/{identity}/{name}",
         "methods": ["POST", "PUT"], "qos": 1, "retain": False, "ack": "stored"},
        {"path": "acked/{name}", "topic": "devices/{identity}/acked/{name}",
         "methods": ["POST", "PUT"], "qos": 1, "ack": "broker"},
        {"path": "put-only/{name}", "topic": "devices/{identity}/put-only/{name}",
         "methods": ["PUT"], "qos": 1},
        {"path": "events/{rest+}", "topic": "devices/{identity}/events/{rest+}",
         "methods": ["POST"], "qos": 1},
        {"path": "state", "topic": "devices/{identity}/state", "methods": ["PUT"], "qos": 1,
         "retain": True},
        {"path": "fast/{name}", "topic": "devices/{identity}/fast/{name}", "qos": 0},
    ]


class Gateway:
    def __init__(self, d, pki, broker_url, devices=None, routes=None, coap=None, mqtt_extra=None,
                 extra=None, config_text=None, log_level=os.environ.get("C2M_LOG_LEVEL", "info")):
        self.dir = Path(d)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = free_port()
        self.uri = f"coaps://127.0.0.1:{self.port}"
        self.devices = dict(DEVICES if devices is None else devices)
        self.config_path = self.dir / "coap2mqtt.yaml"
        self.log = self.dir / "coap2mqtt.log"
        self.persistence_dir = self.dir / "store"
        self.proc = None
        self.env = None  # environment for the process (None: the test's own)
        self.wrapper = []  # argv before the gateway's own (a program that execs it, same pid)
        self.exit_expected = False  # the test stopped it, or waited for it to exit
        self.started_at = None
        self.log_mark = 0
        if config_text is not None:
            self.config = None
            self.config_path.write_text(config_text)
            return
        # every simulated device here is on 127.0.0.1: one address for the whole fleet, so the
        # per-address handshake limit is raised unless a test sets it
        conf = {"log_level": log_level,
                "coap": {"listen": [self.uri], "max_handshakes_per_ip": 1000, **(coap or {})},
                "devices": [{"identity": i, "key": k} for i, k in self.devices.items()],
                "mqtt": {"url": broker_url, "client_id": unique("c2m"), "ca_file": str(pki.ca),
                         "persistence_dir": str(self.persistence_dir), "keepalive": 10,
                         **(mqtt_extra or {})},
                "routes": default_routes() if routes is None else routes}
        conf.update(extra or {})
        self.config = conf
        self.write_config()

    def write_config(self):
        self.config_path.write_text(to_yaml(self.config) + "\n")
        os.chmod(self.config_path, 0o600)  # it holds keys

    def start(self, wait_ready=True, timeout=30):
        assert not self.alive(), "gateway already running"
        self.log_mark = len(read_text(self.log))
        log = open(self.log, "ab")
        try:
            self.proc = spawn([*self.wrapper, GW_BIN, "-c", self.config_path], stdout=log,
                              stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=self.dir,
                              env=self.env)
        finally:
            log.close()
        self.started_at = time.monotonic()
        self.exit_expected = False
        if wait_ready:
            self.wait_for_log(r"\bready\b", timeout)
        return self

    def alive(self):
        return self.proc is not None and self.proc.poll() is None

    def log_text(self, since_start=False):
        t = read_text(self.log)
        return t[self.log_mark:] if since_start else t

    def wait_for_log(self, pattern, timeout=20, since_start=True):
        """The first match of `pattern` in the log of this run (bounded wait)."""
        rx = re.compile(pattern)

        def found():
            m = rx.search(self.log_text(since_start))
            if m:
                return m
            if not self.alive():
                m = rx.search(self.log_text(since_start))
                if m:
                    return m
                raise AssertionError(f"gateway exited ({self.proc.returncode}) before logging "
                                     f"/{pattern}/:\n{tail(self.log_text())}")
            return None
        try:
            return wait_until(found, timeout, f"/{pattern}/ in the gateway log")
        except AssertionError as e:
            raise AssertionError(f"{e}\n--- gateway log ---\n{tail(self.log_text())}") from None

    def wait_exit(self, timeout):
        """The test expects the gateway to exit by itself: its exit code."""
        self.exit_expected = True
        return self.proc.wait(timeout)

    def terminate(self, sig=signal.SIGTERM, timeout=10):
        """Signal the gateway and wait: (exit code, seconds it took)."""
        self.exit_expected = True
        t0 = time.monotonic()
        self.proc.send_signal(sig)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            rc = None
        return rc, time.monotonic() - t0

    def kill9(self):
        self.exit_expected = True
        self.proc.kill()
        self.proc.wait(10)

    def restart(self, **kw):
        if self.alive():
            rc, _ = self.terminate()
            assert rc == 0, f"gateway exited {rc} on SIGTERM:\n{tail(self.log_text())}"
        return self.start(**kw)

    def check_sanitizers(self):
        m = SANITIZER_RE.search(self.log_text())
        assert not m, f"sanitizer report in the gateway log:\n{tail(self.log_text(), 80)}"

    def finish(self):
        """Teardown: stop it if running (it must exit 0), refuse sanitizer reports and a gateway
        that exited during the test without the test stopping it or waiting for it."""
        rc = None
        if self.proc is not None and not self.alive() and not self.exit_expected:
            self.check_sanitizers()
            raise AssertionError(f"gateway exited ({self.proc.returncode}) during the test:\n"
                                 f"{tail(self.log_text())}")
        if self.alive():
            rc, _ = self.terminate()
        self.check_sanitizers()
        assert rc is None or rc == 0, f"gateway exited {rc} at teardown:\n{tail(self.log_text())}"


@pytest.fixture
def gateway_factory(tmp_path, pki):
    """make(broker, name=..., **config) -> a Gateway (started unless start=False)."""
    made = []

    def make(broker, name="gw", start=True, **kw):
        url = broker if isinstance(broker, str) else broker.url
        g = Gateway(tmp_path / name, pki, url, **kw)
        made.append(g)
        return g.start() if start else g
    yield make
    errors = []
    for g in made:
        try:
            g.finish()
        except AssertionError as e:
            errors.append(str(e))
    assert not errors, "\n".join(errors)


def wait_mqtt_connected(gw, timeout=30):
    gw.wait_for_log(r"mqtt: broker=\S+ connected", timeout)


# --------------------------------------------------------------------------------------------
# the device simulator

LINE_RE = re.compile(r'(\w+)=("(?:[^"\\]|\\.)*"|\S+)')


def parse_kv(line):
    out = {}
    for k, v in LINE_RE.findall(line):
        if v.startswith('"'):
            v = v[1:-1]
        out[k] = v
    return out


class SimResult:
    def __init__(self, args, rc, out, err):
        self.args, self.rc, self.stdout, self.stderr = args, rc, out, err
        self.lines = [parse_kv(l) for l in out.splitlines() if "=" in l]
        self.responses = [l for l in self.lines if "code" in l]
        self.events = [l for l in self.lines if "event" in l]
        summ = [l for l in self.lines if "sent" in l and "answered" in l]
        self.summary = {k: int(v) for k, v in summ[-1].items()} if summ else {}

    def codes(self):
        return [r["code"] for r in self.responses]

    def __repr__(self):
        return (f"sim rc={self.rc} args={' '.join(self.args)}\nstdout:\n{tail(self.stdout, 30)}"
                f"\nstderr:\n{tail(self.stderr, 30)}")


def sim_args(gw, identity=None, key=None, args=()):
    a = [SIM_BIN, "--uri", gw.uri]
    if identity is not None:
        a += ["--identity", identity]
    if key is not None:
        a += ["--key", key]
    return a + [str(x) for x in args]


def sim(gw, *args, identity="sensor-01", key=None, timeout=60):
    """Run the simulator to its end (bounded); key defaults to the identity's configured key."""
    if key is None and identity in gw.devices:
        key = gw.devices[identity]
    a = sim_args(gw, identity, key, args)
    if "--timeout" not in a:
        a += ["--timeout", str(max(5, timeout - 10))]
    p = spawn(a, stdout=subprocess.PIPE, stderr=subprocess.PIPE, stdin=subprocess.DEVNULL)
    try:
        out, err = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, err = p.communicate(timeout=10)
        raise AssertionError(f"simulator did not finish within {timeout} s:\n"
                             f"{out.decode(errors='replace')}\n{err.decode(errors='replace')}")
    return SimResult(a, p.returncode, out.decode(errors="replace"), err.decode(errors="replace"))


class SimBackground:
    """The simulator running while the test does other things; stdout lines arrive as they come."""

    def __init__(self, gw, *args, identity="sensor-01", key=None):
        if key is None and identity in gw.devices:
            key = gw.devices[identity]
        self.args = sim_args(gw, identity, key, args)
        self.proc = spawn(self.args, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                          stdin=subprocess.DEVNULL)
        self.out = []
        self.err = b""
        self.lock = threading.Lock()
        self.t_out = threading.Thread(target=self._read_out, daemon=True)
        self.t_err = threading.Thread(target=self._read_err, daemon=True)
        self.t_out.start()
        self.t_err.start()

    def _read_out(self):
        for raw in self.proc.stdout:
            with self.lock:
                self.out.append((time.monotonic(), raw.decode(errors="replace").rstrip("\n")))

    def _read_err(self):
        self.err = self.proc.stderr.read()

    def responses(self):
        with self.lock:
            return [(t, parse_kv(l)) for t, l in self.out if "code=" in l]

    def wait(self, timeout=60):
        try:
            self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)
            raise AssertionError(f"simulator did not finish within {timeout} s")
        self.t_out.join(10)
        self.t_err.join(10)
        with self.lock:
            out = "\n".join(l for _, l in self.out)
        return SimResult(self.args, self.proc.returncode, out, self.err.decode(errors="replace"))

    def stop(self):
        end_process(self.proc, signal.SIGTERM, 10)


# --------------------------------------------------------------------------------------------
# spoofed datagrams

class RawUDP:
    """IPv4 UDP datagrams on loopback from any source address and port (a raw socket writing its
    own IP header), and a copy of every UDP datagram loopback delivers (a raw UDP socket is given
    one): the test can be someone else. Needs CAP_NET_RAW, as the tests run as root."""

    def __init__(self):
        self.tx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
        self.rx = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_UDP)
        self.rx.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        self.rx.setblocking(False)

    def send(self, src, sport, dport, payload, dst="127.0.0.1"):
        """One datagram; the kernel fills in the IP checksum and id, UDP's checksum is 0 (none)."""
        length = 8 + len(payload)
        ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 20 + length, 0, 0, 64, socket.IPPROTO_UDP, 0,
                         socket.inet_aton(src), socket.inet_aton(dst))
        self.tx.sendto(ip + struct.pack("!HHHH", sport, dport, length, 0) + payload, (dst, 0))

    def received(self, dport, sport=None, wait_s=0.3):
        """The payloads of the datagrams to port dport (from port sport) seen within wait_s."""
        out, end = [], time.monotonic() + wait_s
        while True:
            try:
                pkt = self.rx.recv(65535)
            except BlockingIOError:
                if time.monotonic() >= end:
                    return out
                time.sleep(0.01)
                continue
            ihl = (pkt[0] & 0x0F) * 4
            sp, dp = struct.unpack("!HH", pkt[ihl:ihl + 4])
            if dp == dport and (sport is None or sp == sport):
                out.append(pkt[ihl + 8:])

    def close(self):
        self.tx.close()
        self.rx.close()


# --------------------------------------------------------------------------------------------
# raw CoAP datagrams (for openssl s_client and the robustness test)

def _opt_nibble(n):
    if n < 13:
        return n, b""
    if n < 269:
        return 13, bytes([n - 13])
    return 14, (n - 269).to_bytes(2, "big")


def coap_uint(v):
    return v.to_bytes((v.bit_length() + 7) // 8, "big") if v else b""


def coap_encode(mtype, code, mid, token=b"", options=(), payload=b""):
    """One CoAP message (RFC 7252 §3); options are (number, bytes) pairs."""
    out = bytearray([0x40 | (mtype << 4) | len(token), code, mid >> 8, mid & 0xFF]) + token
    last = 0
    for num, val in sorted(options, key=lambda o: o[0]):
        d, dx = _opt_nibble(num - last)
        l, lx = _opt_nibble(len(val))
        out += bytes([(d << 4) | l]) + dx + lx + val
        last = num
    if payload:
        out += b"\xff" + payload
    return bytes(out)


def coap_decode(data):
    """(type, code, mid, token, [(option number, bytes)], payload) of one CoAP message."""
    if len(data) < 4 or data[0] >> 6 != 1:
        raise ValueError("not a CoAP message")
    tkl = data[0] & 0x0F
    mtype, code, mid = (data[0] >> 4) & 3, data[1], int.from_bytes(data[2:4], "big")
    token, i, num, opts = data[4:4 + tkl], 4 + tkl, 0, []
    while i < len(data) and data[i] != 0xFF:
        d, ln = data[i] >> 4, data[i] & 0x0F
        i += 1
        ext = {13: (1, 13), 14: (2, 269)}
        if d in ext:
            w, base = ext[d]
            d = int.from_bytes(data[i:i + w], "big") + base
            i += w
        if ln in ext:
            w, base = ext[ln]
            ln = int.from_bytes(data[i:i + w], "big") + base
            i += w
        num += d
        opts.append((num, data[i:i + ln]))
        i += ln
    payload = data[i + 1:] if i < len(data) else b""
    return mtype, code, mid, token, opts, payload


def coap_post(path, payload, mid, token, content_format=50, mtype=CON, code=POST):
    opts = [(OPT_URI_PATH, seg.encode() if isinstance(seg, str) else seg)
            for seg in (path.split("/") if isinstance(path, str) else path)]
    if content_format is not None:
        opts.append((OPT_CONTENT_FORMAT, coap_uint(content_format)))
    return coap_encode(mtype, code, mid, token, opts, payload)


# --------------------------------------------------------------------------------------------
# openssl s_client as a DTLS 1.2 PSK device

class DtlsClient:
    """`openssl s_client -dtls1_2` with PSK: each write on its stdin is one DTLS record (one CoAP
    datagram); what the gateway sends back appears raw on its stdout after the session block."""

    def __init__(self, port, identity, key, cipher="PSK-AES128-CCM8"):
        keyhex = (key.encode() if isinstance(key, str) else key).hex()
        # -nocommands: a datagram starting with 'Q' or 'R' (0x51/0x52: NON with a 1 or 2 byte
        # token) must be sent, not taken as "quit" or "renegotiate"
        self.args = [OPENSSL, "s_client", "-dtls1_2", "-nocommands", "-cipher", cipher,
                     "-psk_identity", identity, "-psk", keyhex, "-connect", f"127.0.0.1:{port}"]
        self.proc = spawn(self.args, stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE)
        self.buf = bytearray()
        self.err = bytearray()
        self.lock = threading.Lock()
        self.data_start = None
        threading.Thread(target=self._pump, args=(self.proc.stdout, self.buf), daemon=True).start()
        threading.Thread(target=self._pump, args=(self.proc.stderr, self.err), daemon=True).start()

    def _pump(self, f, buf):
        while True:
            chunk = os.read(f.fileno(), 65536)
            if not chunk:
                return
            with self.lock:
                buf += chunk

    def handshake(self, timeout=15):
        """Wait for the session summary; returns the negotiated cipher (OpenSSL name)."""
        def done():
            with self.lock:
                i = self.buf.find(b"SSL-Session:")
                j = self.buf.find(b"\n---\n", i) if i >= 0 else -1
                if j >= 0:
                    self.data_start = j + 5
                    return True
            if self.proc.poll() is not None:
                raise AssertionError(f"s_client exited {self.proc.returncode} before the "
                                     f"handshake:\n{self.text()}")
            return False
        wait_until(done, timeout, "the DTLS handshake of openssl s_client")
        m = re.search(rb"Cipher is (\S+)", bytes(self.buf))
        return m.group(1).decode() if m else None

    def text(self):
        with self.lock:
            return (bytes(self.buf) + b"\n" + bytes(self.err)).decode(errors="replace")

    def send(self, datagram):
        self.proc.stdin.write(datagram)
        self.proc.stdin.flush()

    def data(self):
        with self.lock:
            return bytes(self.buf[self.data_start:])

    def responses(self, token):
        """(type, code, mid) of every message seen carrying `token` (4+ random bytes)."""
        out = []
        data = self.data()
        tkl = len(token)
        i = data.find(token)
        while i >= 0:
            if i >= 4:
                b0, code, mid = data[i - 4], data[i - 3], int.from_bytes(data[i - 2:i], "big")
                if b0 >> 6 == 1 and b0 & 0x0F == tkl:
                    out.append(((b0 >> 4) & 3, code, mid))
            i = data.find(token, i + 1)
        return out

    def last_message(self, token):
        """The last message carrying `token`, decoded to its end (it must be the last received)."""
        data = self.data()
        i = data.rfind(token)
        if i < 4:
            return None
        try:
            return coap_decode(data[i - 4:])
        except ValueError:
            return None

    def empty_acks(self, mid):
        return self.data().count(bytes([0x60, 0x00, mid >> 8, mid & 0xFF]))

    def retransmit(self, datagram, done, what, timeout=20, every=2.0):
        """Send like a CoAP client sends a CON: the same datagram again every `every` s (same
        message ID) until done() is truthy; returns done()'s value."""
        deadline = time.monotonic() + timeout
        while True:
            self.send(datagram)
            until = min(deadline, time.monotonic() + every)
            while time.monotonic() < until:
                v = done()
                if v:
                    return v
                time.sleep(0.05)
            if time.monotonic() >= deadline:
                raise AssertionError(f"timed out after {timeout} s waiting for {what}")

    def request(self, datagram, token, timeout=20, pred=None):
        """Send a CON request (retransmitted until answered); the responses carrying `token`."""
        pred = pred or (lambda r: r[1] != 0)
        return self.retransmit(datagram, lambda: [r for r in self.responses(token) if pred(r)],
                               f"a CoAP response with token {token.hex()}", timeout)

    def wait_response(self, token, timeout=15, pred=None):
        pred = pred or (lambda r: r[1] != 0)
        return wait_until(lambda: [r for r in self.responses(token) if pred(r)], timeout,
                          f"a CoAP response with token {token.hex()}")

    def close(self):
        try:
            self.proc.stdin.close()
        except OSError:
            pass
        end_process(self.proc, signal.SIGTERM, 5)


@pytest.fixture
def dtls_factory():
    made = []

    def make(*a, **kw):
        c = DtlsClient(*a, **kw)
        made.append(c)
        return c
    yield make
    for c in made:
        c.close()


# --------------------------------------------------------------------------------------------
# Debian's coap-client (libcoap 4.3.1 with OpenSSL or GnuTLS)

CLIENT_PDU_RE = re.compile(r"^v:1 t:(CON|NON|ACK|RST) c:(\d\.\d\d) i:([0-9a-f]{4})", re.M)


def coap_client(flavour, gw, path, payload, identity="sensor-01", key=None, method="post",
                content_format=50, timeout=30, rpk=None, cert=None):
    """Run coap-client-<flavour> once, with identity's PSK, (rpk: a PEM key file) a raw public
    key or (cert: PEM files (certificate, key, CA that signed the gateway's)) a certificate;
    returns (response code or None, stdout+stderr text)."""
    exe = shutil.which(f"coap-client-{flavour}")
    if exe is None:
        pytest.fail(f"coap-client-{flavour} is not installed (Debian package libcoap3-bin)")
    if rpk is not None:
        cred = ["-M", str(rpk)]
    elif cert is not None:
        cred = ["-c", str(cert[0]), "-j", str(cert[1]), "-C", str(cert[2])]
    else:
        cred = ["-u", identity, "-k", key if key is not None else gw.devices[identity]]
    a = [exe, "-v", "7", "-B", "10", "-m", method, *cred, "-e", payload]
    if content_format is not None:
        a += ["-t", str(content_format)]
    a.append(f"{gw.uri}/{path}")
    p = spawn(a, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)
    try:
        out, _ = p.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        p.kill()
        out, _ = p.communicate(timeout=10)
    text = out.decode(errors="replace")
    codes = [m.group(2) for m in CLIENT_PDU_RE.finditer(text) if m.group(1) in ("ACK", "CON",
                                                                                  "NON")]
    codes = [c for c in codes if not c.startswith("0.")]
    return (codes[-1] if codes else None), text


# --------------------------------------------------------------------------------------------
# a ready-made world: broker + subscriber + gateway

class World:
    def __init__(self, broker, sub, gw):
        self.broker, self.sub, self.gw = broker, sub, gw


@pytest.fixture
def world(broker_factory, subscriber_factory, gateway_factory):
    b = broker_factory()
    s = subscriber_factory(b)
    g = gateway_factory(b)
    wait_mqtt_connected(g)
    return World(b, s, g)


def random_bytes(rng, n):
    return bytes(rng.getrandbits(8) for _ in range(n))




def pytest_configure(config):
    # paho 1.6.1 creates its TLS context with a protocol constant Python 3.10+ calls deprecated
    config.addinivalue_line("filterwarnings", "ignore:ssl.PROTOCOL_TLS is deprecated")


# --------------------------------------------------------------------------------------------
# sensor nodes (coap2mqtt-sim --serve) and MQTT 5 commands, for observe/commands/presence tests

class ServingSim(SimBackground):
    """`coap2mqtt-sim --serve ...` in the background; its key=value event lines, waited on."""

    def __init__(self, gw, *args, **kw):
        super().__init__(gw, "--serve", *args, **kw)

    def text(self):
        with self.lock:
            out = "\n".join(l for _, l in self.out)
        return f"sim args={' '.join(self.args)}\nstdout:\n{tail(out, 40)}\nstderr:\n" \
               f"{tail(self.err.decode(errors='replace'), 20)}"

    def events(self, event=None, **match):
        """Parsed stdout lines with this event (and these key=value pairs), in order."""
        with self.lock:
            lines = [parse_kv(l) for _, l in self.out]
        return [e for e in lines if (event is None or e.get("event") == event)
                and all(e.get(k) == str(v) for k, v in match.items())]

    def wait_events(self, count, event, timeout=30, **match):
        def got():
            ev = self.events(event, **match)
            if len(ev) >= count:
                return ev
            if self.proc.poll() is not None:
                raise AssertionError(f"simulator exited {self.proc.returncode}")
            return None
        try:
            return wait_until(got, timeout, f"{count} sim lines event={event} {match}")
        except AssertionError as e:
            raise AssertionError(f"{e}\n{self.text()}") from None


@pytest.fixture
def serving_sims():
    """make(gw, *args, identity=..., key=...) -> a ServingSim; all are stopped after the test."""
    made = []

    def make(gw, *args, **kw):
        s = ServingSim(gw, *args, **kw)
        made.append(s)
        return s
    yield make
    reports = []
    for s in made:
        s.stop()
        s.t_err.join(10)
        if SANITIZER_RE.search(s.err.decode(errors="replace")):
            reports.append(s.text())
    assert not reports, "sanitizer report from the simulator:\n" + "\n".join(reports)


class Commander:
    """An MQTT 5 client that publishes commands with Response Topic and Correlation Data, and
    records every answer that arrives on its own response topic."""

    def __init__(self, broker, name=None):
        self.broker = broker
        self.response_topic = f"replies/{name or unique('cmd')}"
        self.sub = Subscriber(broker, topic=self.response_topic)
        self.client = mqtt.Client(client_id=unique("cmd-pub"), protocol=mqtt.MQTTv5)
        self.client.tls_set(ca_certs=str(broker.pki.ca))
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)

    def start(self, timeout=15):
        self.sub.start(timeout)
        wait_until(self._try_connect, timeout, "the command publisher to connect")
        self.client.loop_start()
        return self

    def _try_connect(self):
        try:
            self.client.connect("127.0.0.1", self.broker.port, keepalive=10, clean_start=True)
            return True
        except OSError:
            time.sleep(0.2)
            return False

    def send(self, topic, payload, corr=None, qos=1, response_topic=True, content_type=None):
        """Publish one command; response_topic=True uses ours, a string that topic, None none."""
        props = Properties(PacketTypes.PUBLISH)
        if response_topic:
            props.ResponseTopic = self.response_topic if response_topic is True else response_topic
        if corr is not None:
            props.CorrelationData = corr if isinstance(corr, bytes) else str(corr).encode()
        if content_type:
            props.ContentType = content_type
        return self.client.publish(topic, payload, qos=qos, properties=props)

    def answers(self):
        return self.sub.messages()

    def by_correlation(self):
        out = {}
        for m in self.sub.messages():
            corr = getattr(m.props, "CorrelationData", None) if m.props else None
            out.setdefault(bytes(corr) if corr is not None else None, []).append(m)
        return out

    def wait_answers(self, count, timeout=30):
        return self.sub.wait_for(count, timeout)

    def stop(self):
        try:
            self.client.disconnect()
        except Exception:
            pass
        self.client.loop_stop()
        self.sub.stop()


def sensor_payload(identity, path, value, seq):
    """The body coap2mqtt-sim --serve sends for temperature/humidity (value as it printed it)."""
    return f'{{"device":"{identity}","{path}":{value},"seq":{seq}}}'.encode()


def config_body(identity, seq, size=3072):
    """The body of the simulator's config resource, version seq (see tests/sim/README.md)."""
    head = f'{{"device":"{identity}","seq":{seq},"data":"'.encode()
    alpha = b"abcdefghijklmnopqrstuvwxyz0123456789"
    n = max(0, size - len(head) - 2)
    return head + bytes(alpha[(i + seq) % len(alpha)] for i in range(n)) + b'"}'


@pytest.fixture
def commander_factory():
    made = []

    def make(broker, **kw):
        c = Commander(broker, **kw)
        made.append(c)
        return c.start()
    yield make
    for c in made:
        c.stop()
