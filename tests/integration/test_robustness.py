"""Garbage at the port, garbage inside a DTLS session, signals, and a broken config at start."""
import os
import random
import re
import signal
import socket
import subprocess
import time
from pathlib import Path

from conftest import GW_BIN, SimBackground, coap_post, random_bytes, sim, wait_until

SEED = int(os.environ.get("C2M_TEST_SEED", "7252"))


def dtls_like(rng, n):
    """A datagram that starts like a DTLS 1.2 record (handshake, CCS, alert or app data)."""
    ctype = rng.choice([22, 22, 22, 20, 21, 23])
    epoch = rng.choice([0, 0, 1, rng.getrandbits(16)])
    hdr = bytes([ctype, 0xFE, 0xFD]) + epoch.to_bytes(2, "big") + random_bytes(rng, 6)
    body = random_bytes(rng, max(0, n - 13))
    if ctype == 22 and body and rng.random() < 0.6:
        # a handshake header (ClientHello, or anything else) with plausible lengths
        msg = bytes([rng.choice([1, 1, 1, 2, 11, 12, 14, 16, 20])]) + len(body).to_bytes(3, "big")
        body = (msg + random_bytes(rng, 2) + random_bytes(rng, 3) + len(body).to_bytes(3, "big")
                + body)[:len(body)]
    length = len(body) if rng.random() < 0.7 else rng.getrandbits(16)
    return (hdr + length.to_bytes(2, "big") + body)[:n] if n >= 13 else (hdr + body)[:n]


def test_random_datagrams_leave_it_serving(world):
    rng = random.Random(SEED)
    socks = []
    try:
        for _ in range(8):
            s = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
            s.bind(("127.0.0.1", 0))
            socks.append(s)
        deadline = time.monotonic() + 60
        for i in range(2000):
            n = rng.randint(0, 1500)
            data = dtls_like(rng, n) if rng.random() < 0.4 else random_bytes(rng, n)
            rng.choice(socks).sendto(data, ("127.0.0.1", world.gw.port))
            if i % 100 == 99:
                time.sleep(0.02)  # let the gateway read; it is not a load test
            assert time.monotonic() < deadline, "sending took too long"
    finally:
        for s in socks:
            s.close()
    assert world.gw.alive(), world.gw.log_text()[-3000:]
    r = sim(world.gw, "--count", 1, "--path", "sensors/after-noise", "--payload", "still here")
    assert r.rc == 0 and r.codes() == ["2.04"], r
    [m] = world.sub.wait_for(1, 20)
    assert m.payload == b"still here"
    assert world.gw.alive()


def test_garbage_inside_a_session_leaves_it_serving(world, dtls_factory):
    rng = random.Random(SEED + 1)
    c = dtls_factory(world.gw.port, "sensor-01", world.gw.devices["sensor-01"])
    c.handshake()
    for i in range(300):
        if i % 3 == 0:
            data = random_bytes(rng, rng.randint(0, 300))
        else:  # CoAP-looking: version 1, random type/token length/code/options
            data = bytes([0x40 | rng.getrandbits(6), rng.getrandbits(8)]) + random_bytes(
                rng, rng.randint(2, 200))
        c.send(data)
        if i % 50 == 49:
            time.sleep(0.05)
    assert world.gw.alive()
    assert c.proc.poll() is None, c.text()[-2000:]
    time.sleep(0.2)  # so s_client reads the next datagram on its own
    token = os.urandom(4)
    try:
        c.request(coap_post("sensors/in-session", b"fine", 0x7777, token), token,
                  pred=lambda r: r[1] == 0x44)
    except AssertionError as e:
        raise AssertionError(f"{e}\ns_client: {c.text()[-1500:]}\n"
                             f"gateway: {world.gw.log_text()[-3000:]}") from None
    world.sub.wait_for(1, 20, match="devices/sensor-01/in-session")
    assert world.gw.alive()


def test_sigterm_exits_0_within_5s(world):
    r = sim(world.gw, "--count", 3, "--interval", 20, "--path", "sensors/t", "--payload", "{seq}")
    assert r.rc == 0, r
    world.sub.wait_for(3, 20)
    rc, took = world.gw.terminate(signal.SIGTERM)
    assert rc == 0, world.gw.log_text()[-3000:]
    assert took < 5, f"SIGTERM took {took:.1f} s"


def test_sigint_exits_0_within_5s(world):
    rc, took = world.gw.terminate(signal.SIGINT)
    assert rc == 0 and took < 5, (rc, took)


def test_sigterm_under_traffic_exits_0_within_5s(world, tmp_path):
    keys = tmp_path / "sim.keys"
    keys.write_text("".join(f"{i} {k}\n" for i, k in world.gw.devices.items()))
    os.chmod(keys, 0o600)
    bg = SimBackground(world.gw, "--keys", keys, "--count", 0, "--interval", 10, "--window", 2,
                       "--path", "sensors/busy", "--payload", "{id}-{seq}", identity=None)
    try:
        wait_until(lambda: len(bg.responses()) >= 20, 20, "traffic to flow")
        rc, took = world.gw.terminate(signal.SIGTERM)
        assert rc == 0, world.gw.log_text()[-3000:]
        assert took < 5, f"SIGTERM took {took:.1f} s"
    finally:
        bg.stop()


def test_sigterm_with_broker_paused_exits_0_within_5s(world):
    world.broker.pause()  # publishes in flight never get their PUBACK
    try:
        r = sim(world.gw, "--count", 3, "--interval", 20, "--path", "sensors/stuck",
                "--payload", "{seq}")
        assert r.codes() == ["2.04"] * 3, r
        rc, took = world.gw.terminate(signal.SIGTERM)
        assert rc == 0 and took < 5, (rc, took)
    finally:
        world.broker.resume()


def test_ack_broker_reading_in_flight_at_sigterm(world):
    world.broker.pause()
    try:
        bg = SimBackground(world.gw, "--count", 1, "--path", "acked/at-exit", "--payload", "x",
                           "--timeout", 30)
        time.sleep(1)
        rc, took = world.gw.terminate(signal.SIGTERM)
        assert rc == 0 and took < 5, (rc, took)
        bg.stop()
    finally:
        world.broker.resume()


def test_broken_yaml_refused_at_start(tmp_path):
    conf = tmp_path / "broken.yaml"
    conf.write_text('log_level: info\ncoap:\n  listen: ["coaps://127.0.0.1:5684"\n'
                    "mqtt:\n  url: mqtts://127.0.0.1:8883\n")
    os.chmod(conf, 0o600)
    t0 = time.monotonic()
    r = subprocess.run([GW_BIN, "-c", conf], capture_output=True, timeout=30,
                       stdin=subprocess.DEVNULL)
    out = (r.stdout + r.stderr).decode(errors="replace")
    assert r.returncode == 1, out
    assert time.monotonic() - t0 < 10
    assert re.search(re.escape(str(conf)) + r":\d+:\d+: ", out), out
    assert "ready" not in out


def test_listen_port_in_use_is_an_error(tmp_path, broker_factory, gateway_factory):
    b = broker_factory()
    g = gateway_factory(b, start=False)
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", g.port))
        g.start(wait_ready=False)
        rc = g.wait_exit(30)
    assert rc != 0, g.log_text()
    assert str(g.port) in g.log_text()


def test_sighup_reloads_valid_config_and_keeps_running_on_invalid(world):
    gw = world.gw
    gw.config["devices"].append({"identity": "sensor-03", "key": "sensor-03-New-K3y"})
    gw.devices["sensor-03"] = "sensor-03-New-K3y"
    gw.write_config()
    gw.proc.send_signal(signal.SIGHUP)
    gw.wait_for_log(r"reload: ok", 20)
    r = sim(gw, "--count", 1, "--path", "sensors/new", "--payload", "3", identity="sensor-03")
    assert r.codes() == ["2.04"], r
    [m] = world.sub.wait_for(1, 20)
    assert m.topic == "devices/sensor-03/new"

    gw.config_path.write_text(gw.config_path.read_text().replace("qos: 1", "qos: 9", 1))
    gw.proc.send_signal(signal.SIGHUP)
    gw.wait_for_log(r"coap2mqtt\.yaml:\d+:\d+: qos", 20)
    gw.wait_for_log(r"reload: .*(invalid|keeping)", 20)
    assert gw.alive()
    r = sim(gw, "--count", 1, "--path", "sensors/still", "--payload", "ok", identity="sensor-03")
    assert r.codes() == ["2.04"], r
    world.sub.wait_for(2, 20)


# ---- the listening socket's receive buffer (coap.receive_buffer) ----

BURST = 2500  # datagrams arriving while the gateway is not reading: a fleet reporting at once


def udp_socket(port):
    """(bytes queued, datagrams dropped) of the UDP socket on 127.0.0.1:port (/proc/net/udp)."""
    for line in Path("/proc/net/udp").read_text().splitlines()[1:]:
        f = line.split()
        if f[1] == f"0100007F:{port:04X}":
            return int(f[4].split(":")[1], 16), int(f[-1])
    raise AssertionError(f"no UDP socket on 127.0.0.1:{port}")


def burst_while_paused(gw):
    """Datagrams dropped by the gateway's socket for BURST datagrams (DTLS-like, 100 bytes, from
    one stranger) sent while the gateway is stopped; it reads them all once it runs again."""
    _, drops0 = udp_socket(gw.port)
    os.kill(gw.proc.pid, signal.SIGSTOP)
    try:
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            for i in range(BURST):
                s.sendto(bytes([23, 0xFE, 0xFD, 0, 1]) + i.to_bytes(6, "big") + bytes([0, 87])
                         + bytes(87), ("127.0.0.1", gw.port))
        queued, drops = udp_socket(gw.port)
        assert queued > 0
    finally:
        os.kill(gw.proc.pid, signal.SIGCONT)
    wait_until(lambda: udp_socket(gw.port)[0] == 0, 20, "the gateway to read its queue")
    return drops - drops0


def test_receive_buffer_holds_a_burst(broker_factory, gateway_factory):
    """The default buffer (4 MiB) queues what arrives while the gateway is busy; the smallest one
    allowed (64 KiB) drops most of the same burst. Both keep serving."""
    b = broker_factory()
    big = gateway_factory(b, name="big")
    small = gateway_factory(b, name="small", coap={"receive_buffer": 65536})
    assert burst_while_paused(big) == 0
    assert burst_while_paused(small) > BURST // 2
    for gw in (big, small):
        assert sim(gw, "--count", 1, "--path", "sensors/t", "--payload", "1").codes() == ["2.04"]


def test_receive_buffer_capped_by_the_kernel_is_logged(broker_factory, gateway_factory):
    """A buffer above net.core.rmem_max, without CAP_NET_ADMIN to pass it: the gateway logs what
    it got, with the sysctl to raise, and serves with that."""
    rmem_max = int(Path("/proc/sys/net/core/rmem_max").read_text())
    want = min(2 * rmem_max, 1 << 30)
    g = gateway_factory(broker_factory(), start=False, coap={"receive_buffer": want})
    if os.geteuid() == 0:  # root passes the cap (SO_RCVBUFFORCE): run it without that capability
        g.wrapper = ["setpriv", "--inh-caps=-net_admin", "--bounding-set=-net_admin"]
    g.start()
    line = g.wait_for_log(r"loop: listen=\S+ receive_buffer=\d+ outcome=capped .*", 20).group(0)
    assert f"receive_buffer={want} " in line and f"effective={rmem_max} " in line, line
    assert "rmem_max" in line, line
    assert sim(g, "--count", 1, "--path", "sensors/t", "--payload", "1").codes() == ["2.04"]


def test_lines_a_device_causes_are_budgeted(world):
    """10,000 requests that each cause a log line of their device (a POST to a path no route
    takes: 4.04): at most 20 lines of that device a minute reach the log, the rest are counted
    and a line (once the minute is over) names the device and how many were not written.
    Another device's lines still get through."""
    gw = world.gw
    r = sim(gw, "--count", 10000, "--interval", 0, "--type", "non", "--window", 50,
            "--path", "nowhere/flood", "--payload", "x", timeout=120)
    assert r.codes().count("4.04") == 10000, r.summary
    r2 = sim(gw, "--count", 1, "--path", "nowhere/else", identity="sensor-02")
    assert r2.codes() == ["4.04"], r2
    gw.wait_for_log(r"identity=sensor-02 mid=\d+ code=4\.04", 5)

    log = gw.log_text()
    ours = [l for l in log.splitlines() if "identity=sensor-01 " in l and "log=suppressed" not in l]
    # the flood may straddle the start of a minute: two budgets at most
    assert len(ours) <= 40, len(ours)
    written = len(re.findall(r"identity=sensor-01 mid=\d+ code=4\.04", log))
    assert written >= 10, written
    # besides the 4.04s, the device caused its handshake line and its "offline" line
    rx = re.compile(r'identity=sensor-01 log=suppressed lines=(\d+) reason="more than 20 lines '
                    r'a minute"')
    wait_until(lambda: sum(map(int, rx.findall(gw.log_text()))) >= 10000 - written, 75,
               "the count of sensor-01's lines not written")
    time.sleep(0.5)
    assert 10000 - written <= sum(map(int, rx.findall(gw.log_text()))) <= 10002 - written
    assert "identity=sensor-02 log=suppressed" not in gw.log_text()
