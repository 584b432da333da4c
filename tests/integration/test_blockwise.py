"""Block-wise transfer (RFC 7959): bodies larger than one datagram, in every direction: a Block1
upload from a device, Block2 notifications from a device, and a Block1 command to a device."""
import hashlib
import os
import random
import socket
import time

from conftest import (CON, OPT_SIZE1, OPT_URI_PATH, POST, coap_encode, coap_uint, code_str,
                      config_body, free_port, sim, user_prop, wait_mqtt_connected)
from test_flood import MemorySampler
from test_metrics import scrape, val

OPT_BLOCK1 = 27

IDENT = "sensor-01"


def test_4k_block1_upload_published_once_byte_exact(broker_factory, subscriber_factory,
                                                     gateway_factory, tmp_path):
    b = broker_factory()
    s = subscriber_factory(b)
    g = gateway_factory(b, coap={"max_payload": 8192})
    wait_mqtt_connected(g)
    blob = random.Random(4).randbytes(4096)
    f = tmp_path / "4k.bin"
    f.write_bytes(blob)
    r = sim(g, "--count", 1, "--path", "sensors/upload", "--payload-file", f,
            "--content-format", 42, "--block-size", 256)
    assert r.rc == 0 and r.codes() == ["2.04"], r
    [m] = s.wait_for(1, 20)
    assert m.topic == f"devices/{IDENT}/upload"
    assert m.payload == blob
    assert m.content_type == "application/octet-stream"
    s.assert_none(window=1.5, already=1)    # once, not once per block


def test_3k_block2_notification_published_whole(broker_factory, subscriber_factory,
                                                gateway_factory, serving_sims):
    b = broker_factory()
    s = subscriber_factory(b)
    g = gateway_factory(b, extra={"observe": [
        {"devices": "sensor-*", "path": "config", "topic": "devices/{identity}/config", "qos": 1}]})
    wait_mqtt_connected(g)
    # 256-byte blocks: each version of the 3 KiB body is 12 blocks
    dev = serving_sims(g, "--notify-interval", 300, "--block-size", 256)
    lines = dev.wait_events(4, "notify", path="config")[:4]
    assert lines[0].get("first") == "1" and all(int(e["bytes"]) == 3072 for e in lines)
    msgs = s.wait_for(4, 30, match=f"devices/{IDENT}/config")
    for e, m in zip(lines, msgs):
        body = config_body(IDENT, int(e["seq"]))
        assert hashlib.sha256(body).hexdigest() == e["sha256"]     # what the device sent
        assert m.payload == body, f"seq {e['seq']}: {len(m.payload)} bytes, {m.payload[:80]!r}"
        assert m.content_type == "application/json"
    # one publish per version, never a block on its own
    seqs = [int(m.payload[m.payload.index(b'"seq":') + 6:].split(b",")[0]) for m in s.messages()]
    assert len(seqs) == len(set(seqs)), seqs
    assert all(len(m.payload) == 3072 for m in s.messages())


def test_4k_command_sent_block_wise_arrives_whole(broker_factory, gateway_factory, serving_sims,
                                                  commander_factory):
    b = broker_factory()
    g = gateway_factory(b, coap={"block_size": 256}, extra={"commands": [
        {"topic": "devices/{identity}/set/{path+}", "method": "PUT", "ttl": 10,
         "response_topics": ["replies/#"]}]})
    wait_mqtt_connected(g)
    dev = serving_sims(g)
    g.wait_for_log(r"identity=sensor-01 handshake=ok")
    cmd = commander_factory(b)
    blob = random.Random(7).randbytes(4096)
    cmd.send(f"devices/{IDENT}/set/led", blob, corr=b"big-1",
             content_type="application/octet-stream")
    [put] = dev.wait_events(1, "put", path="led")
    assert int(put["bytes"]) == 4096 and put["sha256"] == hashlib.sha256(blob).hexdigest(), put
    [a] = cmd.wait_answers(1, 20)
    assert user_prop(a, "coap-code") == "2.04" and a.props.CorrelationData == b"big-1"
    assert a.payload == b""         # the device echoes only small states
    time.sleep(1)
    assert len(dev.events("put")) == 1, dev.text()


def test_block1_upload_without_size1(broker_factory, subscriber_factory, gateway_factory,
                                     dtls_factory):
    """Size1 is optional (RFC 7959 §4): a Block1 upload without it is reassembled and published
    once, byte for byte (upstream libcoap issue 1566: a NULL dereference in 4.3.5)."""
    b = broker_factory()
    s = subscriber_factory(b)
    g = gateway_factory(b)
    wait_mqtt_connected(g)
    c = dtls_factory(g.port, "sensor-01", g.devices["sensor-01"])
    c.handshake()
    body = b"0123456789abcdef" * 32 + b"tail"  # 516 bytes: 64-byte blocks 0..8
    token = os.urandom(4)
    path = [(OPT_URI_PATH, b"sensors"), (OPT_URI_PATH, b"nosize")]
    n = (len(body) + 63) // 64
    for i in range(n):
        more = 1 if i < n - 1 else 0
        blk = coap_uint((i << 4) | (more << 3) | 2)  # SZX 2 = 64 bytes
        mid = 0x4100 + i
        c.request(coap_encode(CON, POST, mid, token, path + [(OPT_BLOCK1, blk)],
                              body[i * 64:(i + 1) * 64]), token,
                  pred=lambda r, mid=mid: r[2] == mid and r[1] != 0)
    mtype, code, _, _, _, _ = c.last_message(token)
    assert code_str(code) == "2.04", code_str(code)
    [m] = s.wait_for(1, 20)
    assert (m.topic, m.payload) == ("devices/sensor-01/nosize", body)
    assert g.alive()


UPLOADS = 300       # first blocks: half to a routed path each, half to an unrouted one
BODY = 1048576      # the Size1 each announces, = coap.max_payload


def test_first_blocks_cannot_pin_memory(broker_factory, subscriber_factory, gateway_factory,
                                        dtls_factory):
    """A Block1 first block (about 1 KiB) announcing a 1 MiB body used to reserve the whole body
    for 93 s, as often as a device liked and on any path. Now a path no route takes is refused
    at that block, before anything is stored; a device has at most two uploads in progress
    (then 5.03 with Max-Age); and a body grows only as its blocks arrive."""
    b = broker_factory()
    sub = subscriber_factory(b)
    mport = free_port(socket.SOCK_STREAM)
    g = gateway_factory(b, coap={"max_payload": BODY},
                        extra={"metrics": {"listen": f"127.0.0.1:{mport}"}})
    wait_mqtt_connected(g)
    g.wait_for_log(rf"metrics: listening listen=127\.0\.0\.1:{mport} ")
    c = dtls_factory(g.port, IDENT, g.devices[IDENT])
    c.handshake()
    mem = MemorySampler(g.proc.pid)
    before = mem.read()
    rng = random.Random(7959)
    got = {"routed": [], "unrouted": []}
    for i in range(UPLOADS):
        kind = "routed" if i % 2 == 0 else "unrouted"
        path = [(OPT_URI_PATH, b"sensors" if kind == "routed" else b"nowhere"),
                (OPT_URI_PATH, f"u{i}".encode())]
        token = (0x70000000 + i).to_bytes(4, "big")
        blk = coap_uint((0 << 4) | (1 << 3) | 6)  # block 0, more to come, 1024 bytes
        dgram = coap_encode(CON, POST, 0x5000 + i, token,
                            path + [(OPT_BLOCK1, blk), (OPT_SIZE1, coap_uint(BODY))],
                            rng.randbytes(1024))
        got[kind].append(code_str(c.request(dgram, token)[-1][1]))
    after = mem.read()
    assert got["unrouted"] == ["4.04"] * (UPLOADS // 2), got["unrouted"]
    assert got["routed"] == ["2.31"] * 2 + ["5.03"] * (UPLOADS // 2 - 2), got["routed"]
    grew = (after["VmHWM"] - before["VmHWM"]) / 1024
    assert grew < 8, f"peak memory grew {grew:.1f} MiB for {UPLOADS} first blocks"
    m = scrape(mport)
    assert val(m, "uploads_refused_total", reason="no_route") == UPLOADS // 2, m
    assert val(m, "uploads_refused_total", reason="busy") == UPLOADS // 2 - 2, m
    g.wait_for_log(r"identity=sensor-01 mid=\d+ code=5\.03 reason=\"2 block-wise uploads of "
                   r"this device in progress\"", 5)

    # the device's readings in one datagram still go through, and so do other devices'
    token = b"\x7f\x00\x00\x01"
    c.request(coap_encode(CON, POST, 0x6000, token, [(OPT_URI_PATH, b"sensors"),
                                                     (OPT_URI_PATH, b"plain")], b"small"), token)
    assert code_str(c.last_message(token)[1]) == "2.04"
    r = sim(g, "--count", 1, "--path", "sensors/other", "--payload", "fine", identity="sensor-02")
    assert r.rc == 0 and r.codes() == ["2.04"], r
    sub.wait_for(2, 20)
    print(f"first blocks: {UPLOADS} with Size1 {BODY}; gateway peak memory grew {grew:.1f} MiB")


def test_interleaved_uploads_to_two_paths_stay_apart(broker_factory, subscriber_factory,
                                                     gateway_factory, dtls_factory):
    """Two Block1 uploads of one device to different paths, their blocks interleaved: each body
    is published whole on its own topic. libcoap 4.3.5 took any upload to the catch-all resource
    for the one already in progress, whatever its path, and mixed the blocks of both
    (deps-patches/libcoap/0013)."""
    b = broker_factory()
    sub = subscriber_factory(b)
    g = gateway_factory(b)
    wait_mqtt_connected(g)
    c = dtls_factory(g.port, IDENT, g.devices[IDENT])
    c.handshake()
    bodies = {b"first": bytes(range(64)) + b"first-tail", b"second": b"\xee" * 64 + b"second-tail"}
    mid = 0x4400
    for num in (0, 1):
        for name, body in bodies.items():
            more = 1 if num == 0 else 0
            token = b"up" + name[:2]
            blk = coap_uint((num << 4) | (more << 3) | 2)  # SZX 2 = 64 bytes
            mid += 1
            c.request(coap_encode(CON, POST, mid, token, [(OPT_URI_PATH, b"sensors"),
                                                          (OPT_URI_PATH, name),
                                                          (OPT_BLOCK1, blk)],
                                  body[num * 64:(num + 1) * 64]), token,
                      pred=lambda r, mid=mid: r[2] == mid and r[1] != 0)
            want = "2.31" if more else "2.04"
            assert code_str(c.last_message(token)[1]) == want, (name, num)
    got = {m.topic: m.payload for m in sub.wait_for(2, 20)}
    assert got == {"devices/sensor-01/first": bodies[b"first"],
                   "devices/sensor-01/second": bodies[b"second"]}, got


def test_response_bodies_of_one_device_are_bounded(broker_factory, subscriber_factory,
                                                   gateway_factory, serving_sims):
    """The gateway observes ten 64 KiB resources of one device; each change brings ten bodies to
    fetch block-wise side by side, 640 KiB in all. What one device's bodies may hold at once is
    bounded (512 KiB): beyond it a body is abandoned and logged, the others are published whole,
    and the observations go on (deps-patches/libcoap/0014)."""
    size, copies = 65536, 10
    b = broker_factory()
    s = subscriber_factory(b)
    paths = ["config"] + [f"config{i}" for i in range(2, copies + 1)]
    g = gateway_factory(b, extra={"observe": [
        {"devices": "sensor-*", "path": p, "topic": f"devices/{{identity}}/{p}", "qos": 1}
        for p in paths]})
    wait_mqtt_connected(g)
    dev = serving_sims(g, "--notify-interval", 4000, "--config-size", size,
                       "--config-copies", copies)
    g.wait_for_log(r"response bodies of \d+ bytes over the session's limit of 524288", 60)
    g.wait_for_log(r"identity=sensor-01 path=/config\d* notification=dropped reason=\"body over "
                   r"the limit \(256 KiB each, 512 KiB per device at once\)\"", 10)
    time.sleep(9)  # two more rounds of changes
    assert g.alive()
    msgs = s.messages(match=lambda m: m.topic.startswith(f"devices/{IDENT}/config"))
    assert len({m.topic for m in msgs}) > 1, {m.topic for m in msgs}
    for m in msgs:  # whole bodies only, never one block of one
        seq = int(m.payload[m.payload.index(b'"seq":') + 6:].split(b",")[0])
        assert m.payload == config_body(IDENT, seq, size), (m.topic, len(m.payload))
    dev.stop()
