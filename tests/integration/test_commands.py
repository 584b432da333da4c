"""Commands: MQTT messages become CoAP requests on the device's own DTLS session (the device is
coap2mqtt-sim --serve); the device's answer, or an error when there is none, goes back to MQTT."""
import collections
import os
import socket
import time

import pytest

from conftest import free_port, user_prop, wait_mqtt_connected, wait_until
from test_flood import uses_asan
from test_metrics import scrape, val

IDENT = "sensor-01"


def commands(ttl=10):
    # the commander's own Response Topics are replies/<name>
    return [
        {"topic": "devices/{identity}/set/{path+}", "method": "PUT",
         "response_topic": "devices/{identity}/set-response/{path+}",
         "response_topics": ["replies/#"], "ttl": ttl},
        {"topic": "devices/{identity}/get/{path+}", "method": "GET", "ttl": ttl,
         "response_topics": ["replies/#"]},
    ]


@pytest.fixture
def setup(broker_factory, subscriber_factory, gateway_factory, commander_factory):
    """setup(ttl=..., devices=...) -> (subscriber on devices/#, gateway, commander)."""
    def make(ttl=10, extra=None, **kw):
        b = broker_factory()
        s = subscriber_factory(b)
        g = gateway_factory(b, extra={"commands": commands(ttl), **(extra or {})}, **kw)
        wait_mqtt_connected(g)
        g.wait_for_log(r"mqtt: subscribed filter=devices/\+/get/#", timeout=10)
        return s, g, commander_factory(b)
    return make


def online(g, dev, ident=IDENT):
    g.wait_for_log(rf"identity={ident} handshake=ok")
    return dev


def corr(m):
    return getattr(m.props, "CorrelationData", None)


def test_put_command_reaches_the_device_and_its_answer_the_response_topic(setup, serving_sims):
    _, g, cmd = setup()
    dev = online(g, serving_sims(g))
    cmd.send(f"devices/{IDENT}/set/led", b"on", corr=b"\x00corr-1\xff",
             content_type="text/plain;charset=utf-8")
    [put] = dev.wait_events(1, "put", path="led")
    assert put["bytes"] == "2" and put["payload"] == "on", dev.text()
    [a] = cmd.wait_answers(1, 20)
    assert a.topic == cmd.response_topic
    assert corr(a) == b"\x00corr-1\xff"
    assert user_prop(a, "coap-code") == "2.04"
    assert user_prop(a, "identity") == IDENT
    assert a.payload == b"on"                                  # the device echoes its new state
    assert a.content_type == "text/plain;charset=utf-8"
    # the state is kept: a GET command reads it back
    cmd.send(f"devices/{IDENT}/get/led", b"", corr=b"read-1")
    dev.wait_events(1, "get", path="led")
    wait = cmd.wait_answers(2, 20)
    [r] = [m for m in wait if corr(m) == b"read-1"]
    assert (user_prop(r, "coap-code"), r.payload) == ("2.05", b"on")


def test_without_response_topic_the_configured_one_is_used(setup, serving_sims):
    sub, g, cmd = setup()
    dev = online(g, serving_sims(g))
    cmd.send(f"devices/{IDENT}/set/led", b"off", corr=b"c2", response_topic=None)
    dev.wait_events(1, "put", path="led", payload="off")
    [a] = sub.wait_for(1, 20, match=f"devices/{IDENT}/set-response/led")
    assert user_prop(a, "coap-code") == "2.04" and a.payload == b"off" and corr(a) == b"c2"


def test_unknown_resource_answered_with_the_device_code(setup, serving_sims):
    _, g, cmd = setup()
    online(g, serving_sims(g))
    cmd.send(f"devices/{IDENT}/set/no/such/thing", b"x", corr=b"nf")
    [a] = cmd.wait_answers(1, 20)
    assert user_prop(a, "coap-code") == "4.04" and corr(a) == b"nf"


def test_command_to_an_offline_device_answers_504_after_ttl(setup):
    _, g, cmd = setup(ttl=2)
    t0 = time.monotonic()
    cmd.send(f"devices/{IDENT}/set/led", b"on", corr=b"offline-1")
    [a] = cmd.wait_answers(1, 15)
    waited = time.monotonic() - t0
    assert user_prop(a, "coap-code") == "5.04" and corr(a) == b"offline-1"
    assert b"offline" in a.payload, a.payload
    assert 1.5 <= waited <= 6, f"answered after {waited:.1f} s with ttl 2"
    cmd.sub.assert_none(window=1, already=1)


def test_command_waits_within_ttl_for_the_device_to_come_online(setup, serving_sims):
    _, g, cmd = setup(ttl=15)
    cmd.send(f"devices/{IDENT}/set/led", b"later", corr=b"queued")
    time.sleep(1)
    assert not cmd.answers()
    dev = serving_sims(g)
    dev.wait_events(1, "put", path="led", payload="later", timeout=20)
    [a] = cmd.wait_answers(1, 20)
    assert user_prop(a, "coap-code") == "2.04" and corr(a) == b"queued"


def test_1000_commands_to_10_devices_all_answered_once(setup, serving_sims, tmp_path):
    devices = {f"node-{i:02d}": f"node-{i:02d}-Secret-K3y" for i in range(10)}
    _, g, cmd = setup(devices=devices)
    keys = tmp_path / "sim.keys"
    keys.write_text("".join(f"{i} {k}\n" for i, k in devices.items()))
    os.chmod(keys, 0o600)
    dev = serving_sims(g, "--keys", keys, "--devices", 10, identity=None)
    for ident in devices:
        g.wait_for_log(rf"identity={ident} handshake=ok")
    sent = collections.defaultdict(list)
    for n in range(1000):
        ident = f"node-{n % 10:02d}"
        body = f"cmd-{n}".encode()
        sent[ident].append(body)
        cmd.send(f"devices/{ident}/set/led", body, corr=f"c-{n}")
    answers = cmd.wait_answers(1000, 120)
    time.sleep(1)
    by_corr = cmd.by_correlation()
    assert len(cmd.answers()) == 1000, f"{len(cmd.answers())} answers for 1000 commands"
    missing = [n for n in range(1000) if f"c-{n}".encode() not in by_corr]
    dup = {k: len(v) for k, v in by_corr.items() if len(v) != 1}
    assert not missing and not dup, (missing[:20], dup)
    for n in range(1000):
        [a] = by_corr[f"c-{n}".encode()]
        assert user_prop(a, "coap-code") == "2.04", (n, a.payload, a.user_props)
        assert a.payload == f"cmd-{n}".encode()
        assert user_prop(a, "identity") == f"node-{n % 10:02d}"
    # per device, the answers came back in the order the commands were sent (NSTART 1 queue)
    order = collections.defaultdict(list)
    for a in answers:
        order[user_prop(a, "identity")].append(a.payload)
    assert dict(order) == dict(sent)
    # and each device got each of its commands once, in order
    got = collections.defaultdict(list)
    for e in dev.events("put", path="led"):
        got[e["device"]].append(e["payload"].encode())
    assert dict(got) == dict(sent)


@pytest.mark.parametrize("target,why", [
    ("devices/sensor-02/t", "a topic the gateway publishes readings on"),
    ("devices/sensor-02/set/led", "a topic the gateway takes commands from"),
    ("STATUS", "a topic the gateway publishes its own state on"),
    ("elsewhere/app", "not in the command's response_topics"),
])
def test_a_response_topic_cannot_make_the_gateway_publish_elsewhere(setup, serving_sims, target,
                                                                     why):
    """A command's MQTT 5 Response Topic is used only when it fits the command's response_topics
    and is none of the topics the gateway publishes on or takes commands from: otherwise the
    answer goes to the configured response_topic, and the attempt is logged."""
    # devices/# and coap2mqtt/# allowed too: the topics the gateway uses there are refused all
    # the same
    allowed = ["replies/#"] if target == "elsewhere/app" else ["replies/#", "devices/#",
                                                               "coap2mqtt/#"]
    sub, g, cmd = setup(extra={"commands": [dict(c, response_topics=allowed)
                                            for c in commands()]})
    if target == "STATUS":  # the gateway's own status topic (Last Will, "online")
        target = f"coap2mqtt/{g.config['mqtt']['client_id']}/status"
    dev = online(g, serving_sims(g))
    sub.clear()
    cmd.send(f"devices/{IDENT}/set/led", b"steered", corr=b"rt-1", response_topic=target)
    dev.wait_events(1, "put", path="led", payload="steered")
    [a] = sub.wait_for(1, 20, match=f"devices/{IDENT}/set-response/led")
    assert corr(a) == b"rt-1" and user_prop(a, "coap-code") == "2.04", a
    time.sleep(0.5)
    assert not [m for m in sub.messages() if m.topic == target], sub.messages()
    g.wait_for_log(rf'topic=devices/{IDENT}/set/led response_topic="{target}" '
                   rf'command=redirected to=devices/{IDENT}/set-response/led '
                   rf'reason="{why}"', 5)
    assert len(dev.events("put", path="led")) == 1, "the answer came back in as a command"


def test_without_a_configured_response_topic_a_refused_one_refuses_the_command(setup,
                                                                              serving_sims):
    _, g, cmd = setup()
    dev = online(g, serving_sims(g))
    cmd.send(f"devices/{IDENT}/get/led", b"", corr=b"rt-2", response_topic="devices/sensor-02/t")
    g.wait_for_log(rf'topic=devices/{IDENT}/get/led response_topic="devices/sensor-02/t" '
                   r'command=refused reason="not in the command\'s response_topics; no '
                   r'response_topic is configured"', 10)
    time.sleep(1)
    assert not dev.events("get", path="led"), "a refused command reached the device"


def test_a_device_that_never_answers_gets_504_and_the_next_command_goes_through(setup,
                                                                                 serving_sims):
    """The device acknowledges the command (an empty ACK: a separate response is to come) and
    never answers. At the command's timeout a 5.04 "no response" is published and the device's
    next command is sent and answered."""
    timeout = 3
    _, g, cmd = setup(extra={"commands": [dict(c, timeout=timeout) for c in commands()]})
    dev = online(g, serving_sims(g, "--stall-puts", 1))
    t0 = time.monotonic()
    cmd.send(f"devices/{IDENT}/set/led", b"first", corr=b"s-1")
    dev.wait_events(1, "stalled", path="led")
    cmd.send(f"devices/{IDENT}/set/led", b"second", corr=b"s-2")
    answers = {corr(a): a for a in cmd.wait_answers(2, timeout + 20)}
    first, second = answers[b"s-1"], answers[b"s-2"]
    assert user_prop(first, "coap-code") == "5.04" and first.payload == b"5.04 no response", first
    assert first.time - t0 < timeout + 5, first.time - t0
    assert user_prop(second, "coap-code") == "2.04" and second.payload == b"second", second
    dev.wait_events(1, "put", path="led", payload="second")
    g.wait_for_log(r"identity=sensor-01 path=/led command=failed code=5\.04 reason=\"no response\"",
                   5)


def test_what_a_command_publisher_can_make_the_gateway_hold_is_bounded(setup, monkeypatch):
    """Commands to offline devices wait (ttl); what they may hold is bounded: a payload over the
    command's max_payload (default 4 KiB) is refused with 4.13 at once, and past the byte budget
    of a device (64 KiB) a command is answered 5.03 queue full, so the gateway's memory stays
    put however much is published. (Answers that find the MQTT client's window full are
    dropped and counted, as every answer is.)"""
    # under ASan freed memory waits in a quarantine (256 MiB by default) before it is reused:
    # 16 MiB, and the bound leaves room for it (no effect without ASan)
    opts = os.environ.get("ASAN_OPTIONS", "")
    monkeypatch.setenv("ASAN_OPTIONS", (opts + ":" if opts else "") + "quarantine_size_mb=16")
    mport = free_port(socket.SOCK_STREAM)
    _, g, cmd = setup(ttl=600, extra={"metrics": {"listen": f"127.0.0.1:{mport}"}})
    bound = 64 if uses_asan(g.proc.pid) else 16  # ASan: measured 29 to 31 MiB here
    g.wait_for_log(r"mqtt: subscribed filter=devices/\+/set/#", 10)
    cmd.send(f"devices/{IDENT}/set/led", b"\xab" * (1 << 20), corr=b"huge")
    [a] = cmd.wait_answers(1, 30)
    assert (corr(a), user_prop(a, "coap-code")) == (b"huge", "4.13"), a
    before = rss_kib(g.proc.pid)
    n, size = 3000, 1000  # more, faster, and the broker drops what queues for one client
    per_device = 64 * 1024 // (size + 4)
    for i in range(n):
        cmd.send(f"devices/sensor-0{1 + i % 2}/set/led", bytes([i % 256]) * size,
                 corr=i.to_bytes(4, "big"))
        if i % 100 == 99:
            time.sleep(0.2)  # 500 a second

    def settled():
        m = scrape(mport)
        done = len(cmd.answers()) - 1 + val(m, "dropped_total") + val(m, "commands_queued")
        return m if done >= n else None
    m = wait_until(settled, 60, f"{n} commands taken", interval=0.5)
    held = val(m, "commands_queued")
    assert held == 2 * per_device and val(m, "dropped_total") == 0, m
    answers = cmd.answers()[1:]
    assert {user_prop(x, "coap-code") for x in answers} == {"5.03"}, answers[:3]
    assert all(x.payload == b"5.03 command queue full" for x in answers), answers[0]
    grew = (rss_kib(g.proc.pid) - before) / 1024
    assert grew < bound, f"gateway RSS grew {grew:.1f} MiB for {n} commands (bound {bound})"
    print(f"commands: {n} x {size} bytes to 2 offline devices: {held:.0f} held, {len(answers)} "
          f"answered 5.03, {val(m, 'dropped_total'):.0f} answers dropped; RSS grew {grew:.1f} MiB")


def rss_kib(pid):
    with open(f"/proc/{pid}/status") as f:
        return int(next(line for line in f if line.startswith("VmRSS:")).split()[1])
