"""Readings from devices to MQTT: topics, payloads, properties, and every response code."""
import collections
import os
import re
import select
import socket
import threading
import time

import pytest

from conftest import (ACK, CON, DEVICES, NON, OPT_SIZE1, SimBackground, code_str, coap_encode,
                      coap_post, free_port, sim, user_prop, wait_mqtt_connected, wait_until)

CONTENT_TYPES = {
    0: "text/plain;charset=utf-8",
    42: "application/octet-stream",
    50: "application/json",
    60: "application/cbor",
    110: "application/senml+json",
    112: "application/senml+cbor",
}


def test_reading_reaches_its_topic_byte_for_byte(world):
    r = sim(world.gw, "--count", 1, "--path", "sensors/temperature",
            "--payload", '{"celsius":21.5}')
    assert r.rc == 0 and r.codes() == ["2.04"], r
    [m] = world.sub.wait_for(1, 20)
    assert m.topic == "devices/sensor-01/temperature"
    assert m.payload == b'{"celsius":21.5}'
    assert m.qos == 1 and not m.retain
    assert m.content_type == "application/json"
    assert user_prop(m, "identity") == "sensor-01"
    assert isinstance(user_prop(m, "msg-id"), str) and user_prop(m, "msg-id"), m.user_props
    world.sub.assert_none(window=1, already=1)


def test_put_is_accepted_like_post(world):
    r = sim(world.gw, "--count", 1, "--method", "put", "--path", "sensors/door",
            "--payload", "open", "--content-format", 0)
    assert r.rc == 0 and r.codes() == ["2.04"], r
    [m] = world.sub.wait_for(1, 20)
    assert (m.topic, m.payload) == ("devices/sensor-01/door", b"open")


def test_content_format_becomes_content_type(world):
    for cf, ctype in CONTENT_TYPES.items():
        r = sim(world.gw, "--count", 1, "--path", f"sensors/cf{cf}", "--payload", f"cf={cf}",
                "--content-format", cf)
        assert r.rc == 0 and r.codes() == ["2.04"], r
        [m] = world.sub.wait_for(1, 20, match=f"devices/sensor-01/cf{cf}")
        assert m.content_type == ctype, f"Content-Format {cf}: {m.content_type!r}"
        assert m.payload == f"cf={cf}".encode()
    r = sim(world.gw, "--count", 1, "--path", "sensors/nocf", "--payload", "x",
            "--content-format", -1)
    assert r.rc == 0, r
    [m] = world.sub.wait_for(1, 20, match="devices/sensor-01/nocf")
    assert m.content_type is None, m.content_type
    assert user_prop(m, "identity") == "sensor-01"


def test_two_devices_under_their_own_identities(world, tmp_path):
    keys = tmp_path / "sim.keys"
    keys.write_text("".join(f"{i} {k}\n" for i, k in world.gw.devices.items()))
    os.chmod(keys, 0o600)
    r = sim(world.gw, "--keys", keys, "--devices", 2, "--count", 3, "--interval", 50,
            "--path", "sensors/humidity", "--payload", '{"from":"{id}","seq":{seq}}',
            identity=None)
    assert r.rc == 0 and r.codes() == ["2.04"] * 6, r
    msgs = world.sub.wait_for(6, 20)
    by_id = collections.defaultdict(list)
    for m in msgs:
        ident = user_prop(m, "identity")
        by_id[ident].append(m)
        assert m.topic == f"devices/{ident}/humidity", (m.topic, ident)
        assert f'"from":"{ident}"'.encode() in m.payload, m.payload
    assert sorted(by_id) == ["sensor-01", "sensor-02"]
    assert all(len(v) == 3 for v in by_id.values())
    ids = [user_prop(m, "msg-id") for m in msgs]
    assert len(set(ids)) == 6, f"msg-id not unique: {ids}"


def test_binary_payload_byte_exact(world, tmp_path):
    blob = bytes(range(256)) + bytes(reversed(range(256)))[:100]
    f = tmp_path / "blob.bin"
    f.write_bytes(blob)
    r = sim(world.gw, "--count", 1, "--path", "sensors/raw", "--payload-file", f,
            "--content-format", 42)
    assert r.rc == 0 and r.codes() == ["2.04"], r
    [m] = world.sub.wait_for(1, 20)
    assert m.payload == blob
    assert m.content_type == "application/octet-stream"


def test_block_wise_payload_reassembled(world, tmp_path):
    # larger than one block (--block-size 64): Block1 transfer, published once as a whole
    blob = bytes((i * 7) & 0xFF for i in range(900))
    f = tmp_path / "big.bin"
    f.write_bytes(blob)
    r = sim(world.gw, "--count", 1, "--path", "sensors/bulk", "--payload-file", f,
            "--content-format", 42, "--block-size", 64)
    assert r.rc == 0 and r.codes()[-1] == "2.04", r
    [m] = world.sub.wait_for(1, 20)
    assert m.payload == blob
    world.sub.assert_none(window=1, already=1)


def test_200_non_readings_on_one_session_all_delivered(world):
    r = sim(world.gw, "--type", "non", "--count", 200, "--interval", 10, "--window", 4,
            "--path", "sensors/stream", "--payload", "{seq}", timeout=90)
    assert r.summary.get("sent") == 200, r
    msgs = world.sub.wait_for(200, 60)
    seqs = collections.Counter(int(m.payload) for m in msgs)
    assert set(seqs) == set(range(1, 201)), sorted(set(range(1, 201)) - set(seqs))
    assert max(seqs.values()) == 1, [s for s, n in seqs.items() if n > 1]
    assert all(m.topic == "devices/sensor-01/stream" for m in msgs)
    log = world.gw.log_text()
    sessions = re.findall(r'identity="?sensor-01"? handshake=ok', log)
    assert len(sessions) == 1, "more than one DTLS session"
    world.sub.assert_none(window=1, already=200)


def test_qos0_route(world):
    r = sim(world.gw, "--count", 1, "--path", "fast/wind", "--payload", "12")
    assert r.rc == 0 and r.codes() == ["2.04"], r
    [m] = world.sub.wait_for(1, 20)
    assert (m.topic, m.payload, m.qos) == ("devices/sensor-01/fast/wind", b"12", 0)


def test_qos0_readings_in_order_and_an_empty_one(world):
    """QoS 0 readings go to the MQTT client together at the end of the loop's turn: in the order
    taken, an empty payload (no buffer at all) among them."""
    r = sim(world.gw, "--count", 20, "--window", 4, "--path", "fast/seq", "--payload", "{seq}")
    assert r.rc == 0 and r.codes() == ["2.04"] * 20, r
    ms = world.sub.wait_for(20, 20, match="devices/sensor-01/fast/seq")
    # loopback keeps the datagrams' order, and so must every step after the socket
    assert [int(m.payload) for m in ms] == list(range(1, 21))
    r = sim(world.gw, "--count", 1, "--path", "fast/empty", "--payload", "")
    assert r.rc == 0 and r.codes() == ["2.04"], r
    [m] = world.sub.wait_for(1, 20, match="devices/sensor-01/fast/empty")
    assert (m.payload, m.qos) == (b"", 0)


def test_retained_route(world, subscriber_factory):
    r = sim(world.gw, "--count", 1, "--method", "put", "--path", "state", "--payload", "on")
    assert r.rc == 0 and r.codes() == ["2.04"], r
    world.sub.wait_for(1, 20)
    late = subscriber_factory(world.broker, topic="devices/sensor-01/state")
    [m] = late.wait_for(1, 10)
    assert m.retain and m.payload == b"on"


def test_rest_variable_takes_several_segments(world):
    r = sim(world.gw, "--count", 1, "--path", "events/door/front/open", "--payload", "1")
    assert r.rc == 0 and r.codes() == ["2.04"], r
    [m] = world.sub.wait_for(1, 20)
    assert m.topic == "devices/sensor-01/events/door/front/open"


@pytest.mark.parametrize("path", ["nothing/here", "sensors", "sensors/a/b", "Sensors/x"])
def test_no_route_is_404_and_nothing_published(world, path):
    r = sim(world.gw, "--count", 1, "--path", path, "--payload", "x")
    assert r.codes() == ["4.04"], r
    assert r.rc != 0
    assert r.responses[0].get("payload"), f"no diagnostic payload: {r}"
    world.sub.assert_none(window=1)


def test_method_not_in_route_is_405(world):
    r = sim(world.gw, "--count", 1, "--method", "post", "--path", "put-only/valve",
            "--payload", "x")
    assert r.codes() == ["4.05"], r
    assert r.responses[0].get("payload"), f"no diagnostic payload: {r}"
    world.sub.assert_none(window=1)
    r = sim(world.gw, "--count", 1, "--method", "put", "--path", "put-only/valve",
            "--payload", "y")
    assert r.codes() == ["2.04"], r
    [m] = world.sub.wait_for(1, 20)
    assert (m.topic, m.payload) == ("devices/sensor-01/put-only/valve", b"y")


INJECTIONS = [
    "sensors/a%2Fb",           # '/' inside one segment
    "sensors/%2F",
    "sensors/%2B",             # '+'
    "sensors/x%2By",
    "sensors/%23",             # '#'
    "sensors/x%23",
    "sensors/a%00b",           # NUL
    "sensors/%FF%FE",          # not UTF-8
    "sensors/%C0%AF",          # overlong UTF-8 '/'
    "events/a/%2B",            # in a {rest+} variable
    "events/%23/b",
]


def test_topic_injection_refused_with_400(world):
    for path in INJECTIONS:
        r = sim(world.gw, "--count", 1, "--path", path, "--payload", "evil")
        assert r.codes() == ["4.00"], f"{path}: {r}"
        assert r.rc != 0
        assert r.responses[0].get("payload"), f"no diagnostic payload: {r}"
    world.sub.assert_none(window=1.5)
    # the gateway still serves normal readings afterwards
    r = sim(world.gw, "--count", 1, "--path", "sensors/fine", "--payload", "ok")
    assert r.codes() == ["2.04"], r
    [m] = world.sub.wait_for(1, 20)
    assert m.topic == "devices/sensor-01/fine"


def test_oversize_payload_is_413(broker_factory, subscriber_factory, gateway_factory, tmp_path):
    b = broker_factory()
    s = subscriber_factory(b)
    g = gateway_factory(b, coap={"max_payload": 512})
    exact, over, huge = tmp_path / "512", tmp_path / "513", tmp_path / "3000"
    exact.write_bytes(b"a" * 512)
    over.write_bytes(b"b" * 513)
    huge.write_bytes(b"c" * 3000)
    r = sim(g, "--count", 1, "--path", "sensors/exact", "--payload-file", exact)
    assert r.codes() == ["2.04"], r
    [m] = s.wait_for(1, 20)
    assert m.payload == b"a" * 512
    for f in (over, huge):
        r = sim(g, "--count", 1, "--path", "sensors/over", "--payload-file", f)
        assert r.codes() and r.codes()[-1] == "4.13", f"{f.name} bytes: {r}"
    s.assert_none(window=1.5, already=1)


def test_oversize_single_datagram_413_says_the_limit(broker_factory, subscriber_factory,
                                                     gateway_factory, dtls_factory):
    b = broker_factory()
    s = subscriber_factory(b)
    g = gateway_factory(b, coap={"max_payload": 100})
    c = dtls_factory(g.port, "sensor-01", g.devices["sensor-01"])
    c.handshake()
    token = os.urandom(4)
    c.request(coap_post("sensors/big", b"z" * 101, 0x0413, token), token)
    mtype, code, mid, _, opts, payload = c.last_message(token)
    assert (mtype, code_str(code), mid) == (ACK, "4.13", 0x0413)
    size1 = [int.from_bytes(v, "big") for n, v in opts if n == OPT_SIZE1]
    assert size1 == [100], f"Size1 should name the limit: {opts}"
    assert payload, "no diagnostic payload"
    s.assert_none(window=1)


# ---- raw CoAP over openssl s_client ------------------------------------------------------------

def test_duplicate_con_answered_again_published_once(world, dtls_factory):
    key = world.gw.devices["sensor-01"]
    c = dtls_factory(world.gw.port, "sensor-01", key)
    c.handshake()
    token = os.urandom(6)
    dgram = coap_post("sensors/dup", b"only-once", 0x1234, token)
    c.request(dgram, token)  # (retransmitted like a device would until answered)
    world.sub.wait_for(1, 20)
    c.send(dgram)  # a retransmission: same message ID
    wait_until(lambda: len(c.responses(token)) >= 2, 10, "the duplicate to be answered")
    assert all(r == (ACK, 0x44, 0x1234) for r in c.responses(token)), c.responses(token)
    world.sub.assert_none(window=2, already=1)


def test_ping_gets_reset(world, dtls_factory):
    c = dtls_factory(world.gw.port, "sensor-01", world.gw.devices["sensor-01"])
    c.handshake()
    try:
        c.retransmit(coap_encode(CON, 0, 0x4321),
                     lambda: bytes([0x70, 0x00, 0x43, 0x21]) in c.data(), "RST to a CoAP ping")
    except AssertionError as e:
        raise AssertionError(f"{e}\nreceived: {c.data().hex()}\ns_client: {c.text()[-1500:]}\n"
                             f"gateway: {world.gw.log_text()[-3000:]}") from None


def test_non_request_gets_non_response(world, dtls_factory):
    c = dtls_factory(world.gw.port, "sensor-01", world.gw.devices["sensor-01"])
    c.handshake()
    first = os.urandom(4)
    c.request(coap_post("sensors/con-first", b"c", 0x2221, first), first)
    world.sub.wait_for(1, 20)
    world.sub.clear()
    token = os.urandom(5)
    c.send(coap_post("sensors/nonraw", b"n", 0x2222, token, mtype=NON))
    [(mtype, code, _)] = c.wait_response(token)
    assert (mtype, code) == (NON, 0x44)
    [m] = world.sub.wait_for(1, 20)
    assert m.payload == b"n"


def test_ipv4_and_ipv6_listeners(broker_factory, subscriber_factory, gateway_factory):
    b = broker_factory()
    s = subscriber_factory(b)
    g = gateway_factory(b, start=False)
    port6 = free_port()
    g.config["coap"]["listen"].append(f"coaps://[::1]:{port6}")
    g.write_config()
    g.start()
    r = sim(g, "--count", 1, "--path", "sensors/v4", "--payload", "4")
    assert r.codes() == ["2.04"], r
    g6 = type("V6", (), {"uri": f"coaps://[::1]:{port6}", "devices": g.devices})()
    r = sim(g6, "--count", 1, "--path", "sensors/v6", "--payload", "6")
    assert r.codes() == ["2.04"], r
    msgs = s.wait_for(2, 20)
    assert sorted(m.topic for m in msgs) == ["devices/sensor-01/v4", "devices/sensor-01/v6"]


class TcpHold(threading.Thread):
    """A TCP relay to the broker that can hold what the broker sends (its PUBACKs among it)
    while passing on what the gateway sends: a broker that is up but slow to acknowledge.
    Bounded by stop()."""

    def __init__(self, target_port):
        super().__init__(daemon=True)
        self.target = ("127.0.0.1", target_port)
        self.lsock = socket.socket()
        self.lsock.bind(("127.0.0.1", 0))
        self.lsock.listen(4)
        self.port = self.lsock.getsockname()[1]
        self.pairs = {}  # socket -> (peer socket, from the broker?)
        self.held = collections.defaultdict(bytearray)  # gateway socket -> bytes held
        self.holding = threading.Event()
        self.stopping = threading.Event()

    def run(self):
        while not self.stopping.is_set():
            ready = select.select([self.lsock, *self.pairs], [], [], 0.05)[0]
            for s in ready:
                if s is self.lsock:
                    c, _ = s.accept()
                    b = socket.create_connection(self.target)
                    self.pairs[c] = (b, False)
                    self.pairs[b] = (c, True)
                    continue
                if s not in self.pairs:
                    continue
                peer, from_broker = self.pairs[s]
                data = s.recv(65536)
                if not data:
                    for x in (s, peer):
                        self.pairs.pop(x, None)
                        x.close()
                    continue
                if from_broker and self.holding.is_set():
                    self.held[peer] += data
                else:
                    peer.sendall(data)
            if not self.holding.is_set():
                for c, data in list(self.held.items()):
                    if data and c in self.pairs:
                        c.sendall(data)
                    self.held.pop(c)

    def stop(self):
        self.stopping.set()
        self.join(5)
        for s in [self.lsock, *self.pairs]:
            s.close()


def test_pending_broker_acks_are_capped_and_other_routes_stay_fast(broker_factory,
                                                                   subscriber_factory,
                                                                   gateway_factory):
    """The broker holds its PUBACKs while 5,000 `ack: broker` readings arrive (50 devices,
    100 each): 1,000 wait for theirs (mqtt.max_pending_acks), the other 4,000 are answered 5.03
    with Max-Age at once, and a device sending on a QoS 0 route all along is answered within
    50 ms each time. Once the PUBACKs arrive the 1,000 get their 2.04, and each is on MQTT."""
    b = broker_factory()
    sub = subscriber_factory(b, topic="devices/+/acked/#")
    relay = TcpHold(b.port)
    relay.start()
    key = "fleet-Secret-K3y-0042"
    fleet = {f"dev-{i:03d}": key for i in range(1, 51)}
    g = gateway_factory(f"mqtts://127.0.0.1:{relay.port}", devices={**DEVICES, **fleet},
                        mqtt_extra={"keepalive": 120, "max_pending_acks": 1000})
    fast = None
    try:
        wait_mqtt_connected(g)
        fast = SimBackground(g, "--count", 0, "--interval", 20, "--timeout", 0,
                             "--path", "fast/probe", "--payload", "{seq}", identity="sensor-02")
        wait_until(lambda: len(fast.responses()) >= 5, 20, "the QoS 0 device's first answers")
        relay.holding.set()
        t0 = time.monotonic()
        acked = SimBackground(g, "--identity", "dev-%03d", "--devices", 50, "--count", 100,
                              "--interval", 20, "--window", 100, "--path", "acked/load",
                              "--payload", "{id}/{seq}", "--timeout", 90, identity=None, key=key)
        codes = lambda: collections.Counter(r["code"] for _, r in acked.responses())
        wait_until(lambda: codes()["5.03"] >= 4000, 60, "4,000 readings refused")
        time.sleep(1)
        assert codes() == {"5.03": 4000}, codes()
        t1 = time.monotonic()
        probe = [(t, float(r["rtt_ms"])) for t, r in fast.responses() if t0 <= t <= t1]
        assert len(probe) >= 20 and all(r["code"] == "2.04" for _, r in fast.responses())
        assert max(rtt for _, rtt in probe) < 50, sorted(rtt for _, rtt in probe)[-10:]
        g.wait_for_log(r'code=5\.03 reason="mqtt\.max_pending_acks readings wait for the '
                       r"broker's PUBACK\"", 5)

        relay.holding.clear()
        r = acked.wait(90)
        assert collections.Counter(r.codes()) == {"2.04": 1000, "5.03": 4000}, r.summary
        want = {f"{kv['device']}/{kv['seq']}" for kv in r.responses if kv["code"] == "2.04"}
        wait_until(lambda: want <= {m.payload.decode() for m in sub.messages()}, 30,
                   "the 1,000 acknowledged readings on MQTT")
    finally:
        if fast:
            fast.stop()
        relay.holding.clear()
        g.finish()
        relay.stop()


def _peer_fds(pid, port):
    """Descriptors of process pid that are TCP sockets connected to port (from /proc)."""
    inodes = set()
    for name in ("tcp", "tcp6"):
        for line in open(f"/proc/{pid}/net/{name}").read().splitlines()[1:]:
            f = line.split()
            if int(f[2].rsplit(":", 1)[1], 16) == port and f[3] == "01":  # ESTABLISHED
                inodes.add(f[9])
    fds = []
    for fd in os.listdir(f"/proc/{pid}/fd"):
        try:
            if os.readlink(f"/proc/{pid}/fd/{fd}") in {f"socket:[{i}]" for i in inodes}:
                fds.append(int(fd))
        except OSError:
            pass
    return fds


def test_broker_connection_sends_without_nagle_delay(world):
    """Paho leaves Nagle's algorithm on; the gateway turns it off on the broker connection, or a
    QoS 0 publish waits for the broker's delayed ACK of the previous one (up to 40 ms). The test
    takes a copy of the gateway's socket (pidfd_getfd, as root) and reads TCP_NODELAY."""
    import ctypes
    if os.geteuid() != 0:
        pytest.skip("pidfd_getfd needs root here")
    gw = world.gw
    fds = _peer_fds(gw.proc.pid, world.broker.port)
    assert len(fds) == 1, fds
    libc = ctypes.CDLL(None, use_errno=True)
    pidfd = os.pidfd_open(gw.proc.pid)
    try:
        fd = libc.syscall(438, pidfd, fds[0], 0)  # SYS_pidfd_getfd on x86-64
        assert fd >= 0, os.strerror(ctypes.get_errno())
        with socket.socket(fileno=fd) as s:
            assert s.getsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY) != 0
            s.detach()
        os.close(fd)
    finally:
        os.close(pidfd)
