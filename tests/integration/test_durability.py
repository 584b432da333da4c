"""Delivery semantics: broker outages, a kill -9 of the gateway, `ack: stored` and `ack: broker`."""
import collections
import os
import time

import pytest

from conftest import (ACK, CON, NON, OPT_MAX_AGE, SimBackground, code_str, coap_post, sim,
                      user_prop, wait_mqtt_connected, wait_until)


@pytest.fixture
def durable(broker_factory, subscriber_factory, gateway_factory):
    """A broker that keeps sessions across restarts, a subscriber with a persistent session (so
    it gets what is published while it reconnects) and a gateway connected to the broker."""
    b = broker_factory(persistence=True)
    s = subscriber_factory(b)
    g = gateway_factory(b)
    wait_mqtt_connected(g)
    return b, s, g


def broker_down(b, g):
    b.stop()
    g.wait_for_log(r"mqtt: broker=\S+ (connection lost|disconnected|connect failed)", 30)


def payload_counts(msgs):
    return collections.Counter(m.payload.decode() for m in msgs)


def test_outage_readings_answered_and_delivered_once(durable):
    b, s, g = durable
    broker_down(b, g)
    r = sim(g, "--count", 20, "--interval", 20, "--path", "sensors/outage",
            "--payload", "outage-{seq}", timeout=90)
    assert r.rc == 0 and r.codes() == ["2.04"] * 20, r
    s.assert_none(window=0.5)
    b.start()
    msgs = s.wait_for(20, 90)
    counts = payload_counts(msgs)
    assert set(counts) == {f"outage-{i}" for i in range(1, 21)}, counts
    s.assert_none(window=3, already=20)  # and none twice
    counts = payload_counts(s.messages())
    assert max(counts.values()) == 1, [p for p, n in counts.items() if n > 1]
    assert len({user_prop(m, "msg-id") for m in s.messages()}) == 20
    assert all(m.topic == "devices/sensor-01/outage" for m in msgs)


def test_answered_before_kill9_delivered_after_restart(durable):
    b, s, g = durable
    broker_down(b, g)  # so the readings exist only in the gateway's store
    r = sim(g, "--count", 10, "--interval", 20, "--path", "sensors/crash",
            "--payload", "crash-{seq}", timeout=60)
    assert r.rc == 0 and r.codes() == ["2.04"] * 10, r
    g.kill9()
    g.start()
    b.start()
    msgs = s.wait_for(10, 90, match=lambda m: m.topic == "devices/sensor-01/crash")
    counts = payload_counts(msgs)
    assert set(counts) == {f"crash-{i}" for i in range(1, 11)}, counts
    # after a crash a QoS 1 message may come twice, but then with the same msg-id
    s.assert_none(window=2, already=10 + sum(n - 1 for n in counts.values()))
    ids = collections.defaultdict(set)
    for m in s.messages():
        ids[m.payload].add(user_prop(m, "msg-id"))
    assert all(len(v) == 1 for v in ids.values()), ids


def test_sigterm_with_broker_down_keeps_readings(durable):
    b, s, g = durable
    broker_down(b, g)
    r = sim(g, "--count", 5, "--interval", 20, "--path", "sensors/shutdown",
            "--payload", "bye-{seq}")
    assert r.rc == 0 and r.codes() == ["2.04"] * 5, r
    rc, took = g.terminate()
    assert rc == 0 and took < 5, (rc, took)
    b.start()
    g.start()
    msgs = s.wait_for(5, 90)
    assert set(payload_counts(msgs)) == {f"bye-{i}" for i in range(1, 6)}


def test_ack_broker_waits_for_puback(durable):
    b, s, g = durable
    b.pause()  # TCP stays up, but no PUBACK comes while it is stopped
    try:
        bg = SimBackground(g, "--count", 1, "--path", "acked/paused", "--payload", "wait-for-it",
                           "--timeout", 60)
        time.sleep(2.5)
        early = bg.responses()
        assert not early, f"answered while the broker was paused: {early}"
        t_resume = time.monotonic()
    finally:
        b.resume()
    wait_until(bg.responses, 30, "the 2.04 after the broker resumed")
    [(t, resp)] = bg.responses()
    assert resp["code"] == "2.04" and t >= t_resume, resp
    r = bg.wait(60)
    assert r.rc == 0, r
    [m] = s.wait_for(1, 20)
    assert (m.topic, m.payload) == ("devices/sensor-01/acked/paused", b"wait-for-it")


def test_ack_stored_answers_while_broker_paused(durable):
    b, s, g = durable
    b.pause()
    try:
        t0 = time.monotonic()
        bg = SimBackground(g, "--count", 1, "--path", "sensors/paused", "--payload", "stored",
                           "--timeout", 30)
        wait_until(bg.responses, 10, "a response while the broker is paused")
        [(t, resp)] = bg.responses()
        assert resp["code"] == "2.04", resp
        assert t - t0 < 5, f"the stored ack took {t - t0:.1f} s"
        assert bg.wait(30).rc == 0
    finally:
        b.resume()
    [m] = s.wait_for(1, 30)
    assert m.payload == b"stored"


def test_ack_broker_empty_ack_then_separate_response(durable, dtls_factory):
    b, s, g = durable
    c = dtls_factory(g.port, "sensor-01", g.devices["sensor-01"])
    c.handshake()
    token = os.urandom(4)
    b.pause()
    try:
        c.retransmit(coap_post("acked/raw", b"sep", 0x5150, token), lambda: c.empty_acks(0x5150),
                     "an empty ACK for the CON request", timeout=10)
        time.sleep(2)
        assert not c.responses(token), f"a response came before the PUBACK: {c.responses(token)}"
    finally:
        b.resume()
    resp = c.wait_response(token, 30)
    mtype, code, _ = resp[0]
    assert code == 0x44, resp
    assert mtype in (CON, NON), resp
    [m] = s.wait_for(1, 20)
    assert m.payload == b"sep"


def test_ack_broker_with_broker_down_answers_once_stored(durable):
    b, s, g = durable
    broker_down(b, g)
    r = sim(g, "--count", 2, "--interval", 20, "--path", "acked/offline", "--payload", "off-{seq}")
    assert r.rc == 0 and r.codes() == ["2.04"] * 2, r
    b.start()
    msgs = s.wait_for(2, 90)
    assert set(payload_counts(msgs)) == {"off-1", "off-2"}


def test_full_store_answers_503_with_max_age(broker_factory, subscriber_factory, gateway_factory,
                                             dtls_factory):
    b = broker_factory(persistence=True)
    s = subscriber_factory(b)
    g = gateway_factory(b, mqtt_extra={"max_buffered": 3})
    wait_mqtt_connected(g)
    broker_down(b, g)
    r = sim(g, "--count", 3, "--interval", 20, "--path", "sensors/fill", "--payload", "kept-{seq}")
    assert r.rc == 0 and r.codes() == ["2.04"] * 3, r
    c = dtls_factory(g.port, "sensor-01", g.devices["sensor-01"])
    c.handshake()
    token = os.urandom(4)
    c.request(coap_post("sensors/fill", b"refused", 0x0503, token), token)
    mtype, code, mid, _, opts, payload = c.last_message(token)
    assert (mtype, code_str(code), mid) == (ACK, "5.03", 0x0503)
    max_age = [int.from_bytes(v, "big") for n, v in opts if n == OPT_MAX_AGE]
    assert len(max_age) == 1 and max_age[0] > 0, f"5.03 without Max-Age: {opts}"
    b.start()
    msgs = s.wait_for(3, 90)
    s.assert_none(window=3, already=3)  # the refused reading is not published later
    assert set(payload_counts(s.messages())) == {"kept-1", "kept-2", "kept-3"}
    # with room again, readings are taken
    r = sim(g, "--count", 1, "--path", "sensors/fill", "--payload", "later")
    assert r.codes() == ["2.04"], r
    s.wait_for(4, 30)
    assert len(msgs) == 3
