"""DTLS Connection ID (RFC 9146): a device whose address changes (a NAT rebinding) keeps its
session, and the session moves only for a record that authenticates: a record with the
device's CID (which travels in clear) but a broken MAC, from another address, moves nothing."""
import os
import re
import subprocess

import pytest

from conftest import REPO, parse_kv, user_prop, wait_mqtt_connected, wait_until
from test_commands import IDENT, commands, setup  # noqa: F401  (setup is a fixture)

CID_CLIENT = os.environ.get("COAP2MQTT_CID_CLIENT") or str(
    REPO / "build" / "tests" / "coap2mqtt-cid-client")


def cid_client(gw, *steps, identity="sensor-01"):
    r = subprocess.run([CID_CLIENT, "127.0.0.1", str(gw.port), identity, gw.devices[identity],
                        *steps], capture_output=True, text=True, timeout=90,
                       stdin=subprocess.DEVNULL)
    assert r.returncode == 0, f"cid client exit {r.returncode}\n{r.stdout}\n{r.stderr}"
    return [parse_kv(l) for l in r.stdout.splitlines() if "=" in l]


def test_session_follows_its_connection_id_and_a_forged_record_moves_nothing(world):
    gw, sub = world.gw, world.sub
    hs, s1, s2, forged, s4 = cid_client(gw, "send:sensors/cid:one", "move",
                                         "send:sensors/cid:two", "forge:sensors/cid:three",
                                         "send:sensors/cid:four")
    assert hs["handshake"] == "ok" and hs["cid"] == "yes", hs
    assert s1["code"] == "2.04", s1
    # a new source port, the same session: answered there, no new handshake
    assert s2["code"] == "2.04" and s2["port"] != s1["port"], (s1, s2)
    # the forged record (the device's CID, a broken MAC, a third port) got nothing back ...
    assert forged["answered"] == "0" and forged["port"] not in (s1["port"], s2["port"]), forged
    # ... and did not take the session: the next reading is answered where the device is
    assert s4["code"] == "2.04" and s4["port"] == s2["port"], s4

    msgs = sub.wait_for(3, 20)
    assert [m.payload for m in msgs if m.topic == "devices/sensor-01/cid"] == \
        [b"one", b"two", b"four"], [(m.topic, m.payload) for m in msgs]
    log = gw.log_text()
    assert len(re.findall(r"identity=sensor-01 handshake=ok", log)) == 1, log[-3000:]
    moves = re.findall(r"peer=127\.0\.0\.1:(\d+) identity=sensor-01 session=moved "
                       r"to=127\.0\.0\.1:(\d+)", log)
    assert moves == [(s1["port"], s2["port"])], moves
    # presence never flapped: the device was online on one session throughout
    assert "identity=sensor-01 presence=offline" not in log, log[-3000:]


def test_a_forged_record_does_not_divert_commands(setup):
    """After a forged record (the device's CID, a broken MAC, another address), a command
    published for the device still reaches the device where it is, and its answer comes back."""
    sub, g, cmd = setup()
    p = subprocess.Popen([CID_CLIENT, "127.0.0.1", str(g.port), IDENT, g.devices[IDENT],
                          "send:sensors/cid:one", "move", "send:sensors/cid:two",
                          "forge:sensors/cid:three", "serve:8"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                         stdin=subprocess.DEVNULL)
    try:
        lines = []
        while not (lines and "forged" in lines[-1]):
            line = p.stdout.readline()
            assert line, f"cid client ended early: {lines} {p.stderr.read()}"
            lines.append(parse_kv(line))
        s2, forged = lines[-2], lines[-1]
        assert s2["code"] == "2.04" and forged["answered"] == "0", lines
        cmd.send(f"devices/{IDENT}/set/led", b"on", corr=b"cid-1")
        served = parse_kv(p.stdout.readline())
        assert served.get("served") == "led" and served["port"] == s2["port"], served
        [a] = cmd.wait_answers(1, 20)
        assert user_prop(a, "coap-code") == "2.04" and a.payload == b"done", a
    finally:
        p.kill()
        p.wait(10)


def test_an_observation_keeps_notifying_across_a_move(broker_factory, subscriber_factory,
                                                      gateway_factory):
    """The gateway observes a resource of the device; the device moves to a new port and goes
    on notifying from there: every notification is published, with no new handshake and no new
    registration."""
    b = broker_factory()
    sub = subscriber_factory(b, topic="devices/+/obs/#")
    g = gateway_factory(b, extra={"observe": [{"devices": "sensor-*", "path": "temp",
                                               "topic": "devices/{identity}/obs/{path}"}]})
    lines = cid_client(g, "send:sensors/cid:hello", "observe:temp", "notify:2", "move",
                       "notify:2")
    observed = [l for l in lines if "observed" in l]
    assert observed and observed[0]["observed"] == "temp", lines
    notified = [l for l in lines if "notified" in l]
    assert notified[1]["port"] != notified[2]["port"], notified  # the device moved between
    msgs = sub.wait_for(5, 20)
    assert [m.payload for m in msgs] == [b"v0", b"v1", b"v2", b"v3", b"v4"], msgs
    log = g.log_text()
    assert len(re.findall(r"identity=sensor-01 handshake=ok", log)) == 1, log[-3000:]
    assert len(re.findall(r"identity=sensor-01 session=moved to=", log)) == 1, log[-3000:]


def cid_gateway(broker_factory, subscriber_factory, gateway_factory, **coap):
    b = broker_factory()
    sub = subscriber_factory(b)
    gw = gateway_factory(b, coap=coap)
    wait_mqtt_connected(gw)
    return sub, gw


@pytest.mark.parametrize("length", [4, 16])
def test_connection_id_length_is_the_configured_one(broker_factory, subscriber_factory,
                                                    gateway_factory, length):
    sub, gw = cid_gateway(broker_factory, subscriber_factory, gateway_factory,
                          cid_length=length)
    hs, s1, s2 = cid_client(gw, "send:sensors/cid:one", "move", "send:sensors/cid:two")
    assert hs["handshake"] == "ok" and hs["tx_cid_size"] == str(length), hs
    assert s1["code"] == "2.04" and s2["code"] == "2.04" and s2["port"] != s1["port"], (s1, s2)
    msgs = sub.wait_for(2, 20)
    assert [m.payload for m in msgs if m.topic == "devices/sensor-01/cid"] == [b"one", b"two"]
    assert len(re.findall(r"identity=sensor-01 handshake=ok", gw.log_text())) == 1


def test_no_connection_id_when_turned_off(broker_factory, subscriber_factory, gateway_factory):
    sub, gw = cid_gateway(broker_factory, subscriber_factory, gateway_factory, cid=False)
    hs, s1 = cid_client(gw, "send:sensors/cid:one")
    # the client offered one; the gateway gave none: its records carry no CID
    assert hs["handshake"] == "ok" and hs["tx_cid_size"] == "0", hs
    assert s1["code"] == "2.04", s1
    [m] = sub.wait_for(1, 20)
    assert m.payload == b"one"
