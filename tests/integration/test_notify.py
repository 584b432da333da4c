"""The service manager protocol, without a service manager: the gateway talks sd_notify to a
datagram socket of ours (NOTIFY_SOCKET) as it would to systemd. READY=1 once it listens,
WATCHDOG=1 and STATUS= from its event loop at half the watchdog interval, RELOADING=1 then READY=1
around SIGHUP, STOPPING=1 on SIGTERM."""
import os
import signal
import socket
import time

import pytest

from conftest import free_port, sim, wait_mqtt_connected
from test_metrics import scrape, val


@pytest.fixture
def notify_socket(tmp_path, monkeypatch):
    path = str(tmp_path / "notify.sock")
    s = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    s.bind(path)
    s.settimeout(0.2)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "2000000")  # 2 s: keep-alives every 1 s
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    yield s
    s.close()


def collect(sock, seconds, until=None):
    """Messages received within seconds (each a dict of its KEY=value lines)."""
    got = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            data = sock.recv(4096).decode()
        except socket.timeout:
            continue
        got.append(dict(line.split("=", 1) for line in data.splitlines() if "=" in line))
        if until and until(got[-1]):
            break
    return got


def test_ready_watchdog_status_reload_stopping(notify_socket, broker_factory, gateway_factory):
    b = broker_factory()
    gw = gateway_factory(b)
    wait_mqtt_connected(gw)
    msgs = collect(notify_socket, 10, until=lambda m: m.get("READY") == "1")
    assert any(m.get("READY") == "1" for m in msgs), msgs

    r = sim(gw, "--count", 5, "--interval", 50, "--path", "sensors/t", "--payload", "{seq}")
    assert r.rc == 0, r
    msgs = collect(notify_socket, 3.5)
    dogs = [m for m in msgs if m.get("WATCHDOG") == "1"]
    assert len(dogs) >= 2, f"expected keep-alives about every second: {msgs}"
    status = dogs[-1].get("STATUS", "")
    for key in ("sessions=", "readings/s=", "broker=connected", "buffered="):
        assert key in status, status

    os.kill(gw.proc.pid, signal.SIGHUP)
    msgs = collect(notify_socket, 10, until=lambda m: m.get("READY") == "1")
    seen = [k for m in msgs for k in m if k in ("RELOADING", "READY")]
    assert seen[:1] == ["RELOADING"] and "READY" in seen, msgs

    gw.proc.send_signal(signal.SIGTERM)
    msgs = collect(notify_socket, 5, until=lambda m: m.get("STOPPING") == "1")
    assert any(m.get("STOPPING") == "1" for m in msgs), msgs
    assert gw.wait_exit(10) == 0


def test_a_service_manager_that_does_not_read_never_stalls_the_devices(tmp_path, monkeypatch,
                                                                       broker_factory,
                                                                       gateway_factory):
    """PID 1 busy (a daemon-reload of many units, say) reads nothing from NOTIFY_SOCKET: its
    queue (10 datagrams) is full within a second of keep-alives every 100 ms. The gateway never
    waits for it: a device is answered the whole minute, the dropped keep-alives are counted,
    and the state changes queued meanwhile arrive once the socket is read again."""
    path = str(tmp_path / "deaf.sock")
    deaf = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    deaf.bind(path)
    monkeypatch.setenv("NOTIFY_SOCKET", path)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")  # keep-alives every 100 ms
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    try:
        b = broker_factory()
        mport = free_port(socket.SOCK_STREAM)
        gw = gateway_factory(b, extra={"metrics": {"listen": f"127.0.0.1:{mport}"}})
        wait_mqtt_connected(gw)
        gw.wait_for_log(r"notify: the service manager is not reading its socket", 10)
        os.kill(gw.proc.pid, signal.SIGHUP)  # RELOADING=1, READY=1: no room for them either
        gw.wait_for_log(r"reload: ok", 10)
        # 120 readings, one every 500 ms, each answered within CoAP's first ACK timeout (2 s)
        r = sim(gw, "--count", 120, "--interval", 500, "--max-retransmit", 1, "--path",
                "sensors/t", "--payload", "{seq}", timeout=90)
        assert r.rc == 0 and r.codes() == ["2.04"] * 120, r
        # answered before the first retransmission would have been due: the loop never stalled
        assert max(float(kv["rtt_ms"]) for kv in r.responses) < 2000, r
        dropped = val(scrape(mport), "notify_dropped_total")
        assert dropped > 400, dropped  # 10 a second for over a minute, minus the first 10
        # the service manager reads again: what waited (READY after the reload) is there
        deaf.settimeout(0.2)
        got = collect(deaf, 3)
        states = [k for m in got for k in ("READY", "RELOADING") if m.get(k) == "1"]
        assert "RELOADING" in states and "READY" in states[states.index("RELOADING"):], got
    finally:
        deaf.close()
