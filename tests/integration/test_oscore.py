"""OSCORE (RFC 8613) devices on a coap:// listener: each with its own security context from the
keys file; readings, replays, wrong keys, a gateway killed and restarted (its Partial IVs never
repeat), commands and observations. The device is coap2mqtt-sim --oscore (libcoap's OSCORE over
OpenSSL); a relay between it and the gateway reads the OSCORE option of every datagram."""
import json
import os
import signal
import socket
import struct
import time
import types

import pytest

from conftest import (Relay, SimBackground, free_port, sim, tail, wait_mqtt_connected,
                      wait_until)

SECRET = "0102030405060708090a0b0c0d0e0f10"
DEVS = {
    # identity: (gateway's sender_id, gateway's recipient_id = the device's sender_id, secret)
    "meter-1": ("a1", "01", SECRET),
    "meter-2": ("a2", "02", "1112131415161718191a1b1c1d1e1f20"),
}


def keys_line(ident, sid, rid, secret):
    return f"{ident} oscore:sender_id={sid},recipient_id={rid},secret={secret}\n"


def device_spec(ident, secret=None):
    sid, rid, sec = DEVS[ident]
    return f"sender_id={rid},recipient_id={sid},secret={secret or sec}"


class Tap(Relay):
    """The relay, keeping every datagram: (direction, bytes), direction 'up' (to the gateway)
    or 'down'."""

    def __init__(self, target_port, **kw):
        super().__init__(target_port, **kw)
        self.seen = []
        self.drop_down = 0
        raw = self.front
        front_recv = raw.recvfrom

        def recv_front(n):
            data, addr = front_recv(n)
            self.seen.append(("up", data))
            return data, addr
        self.front = types.SimpleNamespace(recvfrom=recv_front, sendto=raw.sendto,
                                           close=raw.close, fileno=raw.fileno,
                                           getsockname=raw.getsockname)
        self.sel.unregister(raw)
        self.sel.register(self.front, 1, None)

    def _back(self, addr):
        b = self.backs.get(addr)
        if b is None:
            b = super()._back(addr)
            raw_recv = b.recvfrom
            tap = self

            class Wrapped:
                def recvfrom(self, n):
                    data, a = raw_recv(n)
                    tap.seen.append(("down", data))
                    p = coap_options(data)
                    if tap.drop_down and p and p[1] == 0x44:  # 2.04 (outer code of OSCORE)
                        tap.drop_down -= 1
                        raise OSError("dropped by the test")
                    return data, a

                def fileno(self):
                    return b.fileno()

                def sendto(self, data, to):
                    return b.sendto(data, to)

                def close(self):
                    b.close()
            w = Wrapped()
            self.sel.unregister(b)
            self.sel.register(w, 1, addr)
            self.backs[addr] = w
            return w
        return b


def coap_options(data):
    """(type, code, mid, {option number: [values]}) of a CoAP datagram; None if malformed."""
    if len(data) < 4 or data[0] >> 6 != 1:
        return None
    tkl = data[0] & 15
    typ = (data[0] >> 4) & 3
    code, mid = data[1], struct.unpack(">H", data[2:4])[0]
    i, num, opts = 4 + tkl, 0, {}
    while i < len(data) and data[i] != 0xFF:
        d, l = data[i] >> 4, data[i] & 15
        i += 1
        if d == 13:
            d, i = data[i] + 13, i + 1
        elif d == 14:
            d, i = struct.unpack(">H", data[i:i + 2])[0] + 269, i + 2
        if l == 13:
            l, i = data[i] + 13, i + 1
        elif l == 14:
            l, i = struct.unpack(">H", data[i:i + 2])[0] + 269, i + 2
        num += d
        opts.setdefault(num, []).append(data[i:i + l])
        i += l
    return typ, code, mid, opts


def partial_iv(data):
    """The Partial IV (an int) in a datagram's OSCORE option (RFC 8613 6.1), or None."""
    p = coap_options(data)
    if not p or 9 not in p[3] or not p[3][9][0]:
        return None
    v = p[3][9][0]
    n = v[0] & 7
    return int.from_bytes(v[1:1 + n], "big") if n else None


@pytest.fixture
def setup(broker_factory, subscriber_factory, gateway_factory, tmp_path):
    """setup(devices=DEVS, nosec=False, extra=...) -> (subscriber, gateway, coap:// port)."""
    def make(devices=DEVS, modes="oscore", extra=None, env=None, **kw):
        b = broker_factory()
        s = subscriber_factory(b)
        keys = tmp_path / "keys"
        keys.write_text("".join(keys_line(i, *v) for i, v in devices.items()))
        os.chmod(keys, 0o600)
        port = free_port()
        g = gateway_factory(b, start=False, devices={}, extra=extra, **kw)
        g.config["devices_file"] = str(keys)
        g.config["coap"]["listen"].append(f"coap://127.0.0.1:{port}?modes={modes}")
        g.write_config()
        g.env = env
        g.start()
        wait_mqtt_connected(g)
        g.coap_port = port
        g.keys_path = keys
        g.broker = b
        return s, g, port
    return make


def dev(port):
    return types.SimpleNamespace(uri=f"coap://127.0.0.1:{port}", devices={})


def osim(port, ident, *args, secret=None, timeout=60):
    return sim(dev(port), "--oscore", device_spec(ident, secret), *args, identity=ident,
               timeout=timeout)


def test_readings_published_under_the_identity_of_their_context(setup):
    s, g, port = setup()
    r = osim(port, "meter-1", "--count", 3, "--interval", 0)
    assert r.rc == 0 and r.codes() == ["2.04"] * 3, r
    msgs = s.wait_for(3, match="devices/meter-1/temperature")
    assert [m.topic for m in msgs] == ["devices/meter-1/temperature"] * 3
    r = osim(port, "meter-2", "--count", 1)
    assert r.codes() == ["2.04"], r
    s.wait_for(1, match="devices/meter-2/temperature")
    g.wait_for_log(r"identity=meter-1 oscore=ok")


def requests_up(tap):
    """The device's protected CON requests as they went up, in order."""
    out = []
    for d, data in list(tap.seen):
        p = coap_options(data)
        if d == "up" and p and p[0] == 0 and p[1] == 2 and 9 in p[3]:
            out.append(data)
    return out


def answers(sock, n=1, timeout=5):
    """CoAP codes ('c.dd') of what comes back to sock."""
    sock.settimeout(timeout)
    got = []
    try:
        while len(got) < n:
            data, _ = sock.recvfrom(2048)
            p = coap_options(data)
            if p and p[1]:
                got.append(f"{p[1] >> 5}.{p[1] & 31:02d}")
    except socket.timeout:
        pass
    return got


@pytest.fixture
def tap_factory():
    made = []

    def make(port, **kw):
        t = Tap(port, **kw)
        t.start()
        made.append(t)
        return t
    yield make
    for t in made:
        t.stop()


def test_a_replayed_request_is_refused_and_not_published(setup, tap_factory):
    s, g, port = setup()
    tap = tap_factory(port)
    r = osim(tap.port, "meter-1", "--count", 2, "--interval", 0)
    assert r.codes() == ["2.04"] * 2, r
    s.wait_for(2, match="devices/meter-1/#")
    ups = requests_up(tap)
    # the first one was challenged with Echo (a fresh start), then repeated with it
    assert len(ups) == 3, [coap_options(u) for u in ups]
    attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    attacker.bind(("127.0.0.1", 0))
    try:
        for i, data in enumerate(ups):
            attacker.sendto(data, ("127.0.0.1", port))
            got = answers(attacker)
            assert got == ["4.01"], (i, got, [(coap_options(u)[2], partial_iv(u)) for u in ups],
                                     tail(g.log_text(), 30))
    finally:
        attacker.close()
    s.assert_none(match="devices/meter-1/#", already=2)


def test_a_wrong_secret_is_refused(setup):
    s, g, port = setup()
    r = osim(port, "meter-1", "--count", 1, "--max-retransmit", 1, "--ack-timeout", 1,
             secret="ff" * 16)
    assert "2.04" not in r.codes() and r.rc != 0, r
    s.assert_none(match="devices/meter-1/#")


def test_an_unprotected_request_is_refused_on_an_oscore_listener(setup):
    s, g, port = setup()
    r = sim(dev(port), "--count", 1, identity="meter-1")
    assert r.codes() == ["4.01"], r
    s.assert_none(match="devices/#")


def test_a_lost_answer_retransmitted_is_answered_again_not_refused_as_a_replay(
        setup, tap_factory):
    s, g, port = setup()
    tap = tap_factory(port)
    # a first reading: the gateway's Echo challenge after its start is behind us
    assert osim(tap.port, "meter-1", "--count", 1).codes() == ["2.04"]
    s.wait_for(1, match="devices/meter-1/#")
    tap.seen.clear()
    tap.drop_down = 1  # the next answer (2.04, protected) is lost on its way down
    r = osim(tap.port, "meter-1", "--count", 1, "--ack-timeout", 1, "--oscore-seq", 10)
    assert r.codes() == ["2.04"], r
    ups = requests_up(tap)
    assert len(ups) == 2 and ups[0] == ups[1], [(d, coap_options(x)[:3]) for d, x in tap.seen]
    assert partial_iv(ups[0]) == 10
    s.wait_for(2, match="devices/meter-1/#")
    s.assert_none(match="devices/meter-1/#", already=2)


def observe_rules():
    return [{"devices": "meter-*", "path": "temperature",
             "topic": "devices/{identity}/obs/{path}", "qos": 1}]


def serving(serving_sims, port, ident="meter-1", *args):
    # one reading first: an OSCORE device is reachable once a request of it verified
    return serving_sims(dev(port), "--oscore", device_spec(ident), "--count", 1,
                        "--notify-interval", 200, *args, identity=ident)


def test_a_command_and_an_observation_over_oscore(setup, serving_sims, commander_factory,
                                                   tap_factory):
    from test_commands import commands
    s, g, port = setup(extra={"commands": commands(), "observe": observe_rules()})
    g.wait_for_log(r"mqtt: subscribed filter=devices/\+/get/#", timeout=10)
    cmd = commander_factory(g.broker)
    tap = tap_factory(port)
    sim_ = serving(serving_sims, tap.port)
    g.wait_for_log(r"identity=meter-1 oscore=ok")
    notes = s.wait_for(3, 20, match="devices/meter-1/obs/temperature")
    assert all(b"temperature" in m.payload for m in notes)
    cmd.send("devices/meter-1/set/led", b"on", corr=b"c-1")
    [put] = sim_.wait_events(1, "put", path="led")
    assert put["payload"] == "on", sim_.text()
    [a] = cmd.wait_answers(1, 20)
    assert a.payload == b"on" and a.topic == cmd.response_topic
    # all of it was protected: every datagram both ways carries the OSCORE option (an empty
    # ACK excepted)
    for d, data in tap.seen:
        p = coap_options(data)
        assert p and (9 in p[3] or (p[1] == 0 and p[0] in (2, 3))), (d, p)
    # the gateway's own requests (observe registration, the command) carry its Partial IVs
    pivs = [partial_iv(x) for d, x in tap.seen if d == "down" and coap_options(x)[0] == 0
            and partial_iv(x) is not None]
    assert len(pivs) >= 2 and pivs == sorted(set(pivs)), pivs


def test_gateway_killed_and_restarted_never_reuses_a_partial_iv_nor_takes_a_replay(
        setup, serving_sims, commander_factory, tap_factory):
    from test_commands import commands
    s, g, port = setup(extra={"commands": commands()})
    g.wait_for_log(r"mqtt: subscribed filter=devices/\+/get/#", timeout=10)
    cmd = commander_factory(g.broker)
    tap = tap_factory(port)
    # readings every 300 ms while the gateway dies and comes back; CONs retried meanwhile
    dev_ = serving_sims(dev(tap.port), "--oscore", device_spec("meter-1"), "--count", 25,
                        "--interval", 300, "--ack-timeout", 1, "--max-retransmit", 6,
                        identity="meter-1")
    g.wait_for_log(r"identity=meter-1 oscore=ok")
    cmd.send("devices/meter-1/set/led", b"before", corr=b"c-1")
    assert [a.payload for a in cmd.wait_answers(1, 20)] == [b"before"]
    before = [u for u in requests_up(tap)]
    s.wait_for(3, match="devices/meter-1/temperature")
    g.kill9()
    time.sleep(1)
    g.start()
    wait_mqtt_connected(g)
    g.wait_for_log(r"identity=meter-1 oscore=ok", timeout=30)
    cmd.send("devices/meter-1/set/led", b"after", corr=b"c-2")
    got = cmd.wait_answers(2, 30)
    assert sorted(a.payload for a in got) == [b"after", b"before"]
    # a request from before the kill, sent again now from another address: refused
    attacker = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    attacker.bind(("127.0.0.1", 0))
    try:
        for data in before[-3:]:
            attacker.sendto(data, ("127.0.0.1", port))
            assert answers(attacker) == ["4.01"], "a replay after the restart was not refused"
    finally:
        attacker.close()
    def all_answered():
        got = [kv for _, kv in dev_.responses() if kv.get("code") == "2.04"]
        return got if len(got) >= 25 else None
    answered = wait_until(all_answered, 90, "25 readings answered 2.04")
    assert all(kv.get("code") == "2.04" for _, kv in dev_.responses()), dev_.text()
    # every reading the device saw answered is on MQTT (a replay from the journal may repeat)
    msgs = s.wait_for(25, 30, match="devices/meter-1/temperature")
    seqs = {json.loads(m.payload)["seq"] for m in msgs}
    assert seqs >= {int(l["seq"]) for l in answered}, (sorted(seqs), dev_.text())
    # the gateway's Partial IVs (its requests, its Echo challenges) only ever grew, across the
    # kill: no nonce used twice
    pivs = [partial_iv(x) for d, x in tap.seen if d == "down" and partial_iv(x) is not None]
    assert len(pivs) >= 3 and all(a < b for a, b in zip(pivs, pivs[1:])), pivs
    assert max(pivs) >= 4096, f"no step of bounds skipped at the restart: {pivs}"


def test_presence_online_with_a_request_offline_after_idle_timeout(setup):
    s, g, port = setup(coap={"idle_timeout": 3},
                       extra={"presence_topic": "devices/{identity}/status"})
    assert osim(port, "meter-1", "--count", 1).codes() == ["2.04"]
    status = lambda: [m.payload for m in s.messages("devices/meter-1/status")]
    wait_until(lambda: status() == [b"online"], 10, "online")
    wait_until(lambda: status() == [b"online", b"offline"], 15, "offline after idle_timeout")
    g.wait_for_log(r"identity=meter-1 presence=offline reason=\"idle timeout\"")
    # a deep-sleep device wakes up: one reading, online again (its sequence numbers go on)
    assert osim(port, "meter-1", "--count", 1, "--oscore-seq", 100).codes() == ["2.04"]
    wait_until(lambda: status() == [b"online", b"offline", b"online"], 10, "online again")


def test_reload_adds_removes_and_changes_oscore_devices(setup):
    s, g, port = setup(devices={"meter-1": DEVS["meter-1"]})
    sport = free_port()  # meter-1 keeps its port across the change, as many devices do
    assert osim(port, "meter-1", "--count", 1, "--source-port", sport).codes() == ["2.04"]
    assert osim(port, "meter-2", "--count", 1, "--max-retransmit", 1,
                "--ack-timeout", 1).codes() != ["2.04"]
    # meter-2 comes, meter-1 gets a new secret
    new = "2122232425262728292a2b2c2d2e2f30"
    g.keys_path.write_text(keys_line("meter-1", "a1", "01", new) +
                           keys_line("meter-2", *DEVS["meter-2"]))
    g.proc.send_signal(signal.SIGHUP)
    g.wait_for_log(r"reload: ok")
    g.wait_for_log(r"identity=meter-1 oscore=removed reason=\"its oscore context changed\"")
    assert osim(port, "meter-2", "--count", 1).codes() == ["2.04"]
    s.wait_for(1, match="devices/meter-2/temperature")
    assert "2.04" not in osim(port, "meter-1", "--count", 1, "--max-retransmit", 1,
                              "--ack-timeout", 1, "--source-port", sport,
                              "--oscore-seq", 10).codes()
    assert osim(port, "meter-1", "--count", 1, "--source-port", sport, secret=new).codes() == \
        ["2.04"]
    # meter-2 goes
    g.keys_path.write_text(keys_line("meter-1", "a1", "01", new))
    g.proc.send_signal(signal.SIGHUP)
    g.wait_for_log(r"identity=meter-2 oscore=removed")
    assert "2.04" not in osim(port, "meter-2", "--count", 1, "--max-retransmit", 1,
                              "--ack-timeout", 1, "--oscore-seq", 50).codes()
    s.assert_none(match="devices/meter-2/temperature", already=1)


def check(pki, tmp_path, keys_text, listen):
    """coap2mqtt --check of a configuration with this keys file and coap.listen: (rc, stderr)."""
    from test_cli import run_gw
    keys = tmp_path / "keys"
    keys.write_text(keys_text)
    os.chmod(keys, 0o600)
    conf = tmp_path / "c.yaml"
    conf.write_text(f"""coap:
  listen: {listen}
devices_file: "{keys}"
mqtt:
  url: "mqtts://127.0.0.1:8883"
  ca_file: "{pki.ca}"
  persistence_dir: "{tmp_path / 'store'}"
routes:
  - {{path: "sensors/{{name}}", topic: "devices/{{identity}}/{{name}}"}}
""")
    rc, _, err = run_gw("-c", conf, "--check")
    return rc, err


@pytest.mark.parametrize("line,why", [
    ("m oscore:sender_id=a1,recipient_id=01\n", "secret= is required"),
    ("m oscore:sender_id=a1,recipient_id=01,secret=0102\n", "secret shorter than 16 bytes"),
    ("m oscore:sender_id=a1,recipient_id=0102030405060708,secret=" + SECRET + "\n",
     "recipient_id is too long"),
    ("m oscore:sender_id=a1,recipient_id=a1,secret=" + SECRET + "\n",
     "sender_id and recipient_id are the same"),
    ("m oscore:sender_id=a1,recipient_id=01,secret=" + SECRET + ",alg=AES-CCM-16-64-256\n",
     "alg must be AES-CCM-16-64-128"),
    ("m oscore:sender_id=a1,recipient_id=01,secret=" + SECRET + ",kid=3\n", "unknown field"),
    ("m oscore:sender_id=a1,recipient_id=01,secret=zz" + SECRET[2:] + "\n",
     "not a hex digit"),
    ("m oscore:sender_id=a1,recipient_id=01,secret=" + SECRET + "\n"
     "n oscore:sender_id=a2,recipient_id=01,secret=" + SECRET + "\n",
     "oscore recipient_id is also device m's"),
])
def test_check_refuses_bad_oscore_entries(pki, tmp_path, line, why):
    rc, err = check(pki, tmp_path, line, '["coap://127.0.0.1:5683?modes=oscore"]')
    assert rc == 1 and why in err, err
    assert SECRET not in err and SECRET[2:] not in err  # never a key


def test_check_wants_a_coap_listener_for_oscore_devices(pki, tmp_path):
    for listen, ok in (('["coaps://127.0.0.1:5684"]', False),
                       ('["coap://127.0.0.1:5683?modes=nosec"]', False),
                       ('["coap://127.0.0.1:5683"]', True),
                       ('["coap://127.0.0.1:5683?modes=oscore"]', True)):
        rc, err = check(pki, tmp_path, keys_line("m", "a1", "01", SECRET), listen)
        assert (rc == 0) == ok, (listen, err)
        if not ok:
            assert "use OSCORE but no coap.listen entry" in err, err


def rss_kib(pid):
    for line in open(f"/proc/{pid}/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def forged_b2_request(kid, i):
    """A CON POST whose OSCORE option names a known kid and a kid context (RFC 8613 B.2 step 1),
    with a payload nobody can have protected."""
    ctx = os.urandom(8)
    piv = bytes([i & 0xFF])
    opt = bytes([0x08 | 0x10 | len(piv)]) + piv + bytes([1 + len(ctx)]) + b"\x48" + ctx + kid
    tok = os.urandom(4)
    head = bytes([0x40 | len(tok), 0x02]) + struct.pack(">H", i & 0xFFFF) + tok
    return head + bytes([(9 << 4) | 13, len(opt) - 13]) + opt + b"\xff" + os.urandom(24)


def test_a_device_without_sequence_number_agrees_fresh_keys_each_start(setup):
    """RFC 8613 Appendix B.2: a device that keeps nothing across its restarts starts at sequence
    number 0 each time and agrees a new ID Context first; forged B.2 requests add nothing."""
    # an ASan build would keep what is freed in its quarantine: memory is measured without it
    env = dict(os.environ)
    env["ASAN_OPTIONS"] = ":".join(filter(None, [env.get("ASAN_OPTIONS"),
                                                 "quarantine_size_mb=0"]))
    s, g, port = setup(env=env)
    for run in range(3):
        r = osim(port, "meter-1", "--oscore-b2", "--count", 2, "--interval", 0)
        assert r.codes() == ["2.04", "2.04"], (run, r)
    s.wait_for(6, match="devices/meter-1/temperature")
    g.wait_for_log(r"identity=meter-1 oscore=ok")
    before = rss_kib(g.proc.pid)
    sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    try:
        for i in range(20000):
            sock.sendto(forged_b2_request(bytes.fromhex(DEVS["meter-1"][1]), i),
                        ("127.0.0.1", port))
            if i % 500 == 499:
                time.sleep(0.05)
    finally:
        sock.close()
    time.sleep(1)
    grown = rss_kib(g.proc.pid) - before
    assert grown < 4096, f"RSS grew by {grown} KiB over 20,000 forged B.2 requests"
    r = osim(port, "meter-1", "--oscore-b2", "--count", 1)
    assert r.codes() == ["2.04"], r


def test_ack_broker_route_answers_after_the_puback_protected(setup):
    s, g, port = setup()
    r = osim(port, "meter-1", "--count", 3, "--interval", 0, "--path", "acked/t")
    assert r.codes() == ["2.04"] * 3, r
    s.wait_for(3, match="devices/meter-1/acked/t")
