"""DTLS-PSK on the device side, TLS verification on the broker side, and keys kept out of logs."""
import os
import re

import pytest

from conftest import (ACK, DEVICES, coap_client, coap_post, sim, user_prop, wait_mqtt_connected)

WRONG_KEY = "Not-The-Right-Key-42"
INTRUDER_KEY = "Intruder-Key-0815!"


def assert_no_keys_in(text):
    for k in list(DEVICES.values()) + [WRONG_KEY, INTRUDER_KEY]:
        assert k not in text, "a PSK appeared in the log"
        assert k.encode().hex() not in text.lower(), "a PSK appeared in the log (hex)"


@pytest.fixture
def debug_world(broker_factory, subscriber_factory, gateway_factory):
    """Broker, subscriber and a gateway logging at debug level (where keys must not leak either)."""
    b = broker_factory()
    s = subscriber_factory(b)
    g = gateway_factory(b, log_level="debug")
    wait_mqtt_connected(g)
    return b, s, g


def test_wrong_key_refused_and_logged_without_the_key(debug_world):
    _, sub, gw = debug_world
    r = sim(gw, "--count", 1, "--path", "sensors/wrongkey", "--payload", "x",
            "--handshake-timeout", 4, "--max-retransmit", 2, key=WRONG_KEY)
    assert r.rc != 0, r
    assert any(e.get("event") == "dtls-failed" for e in r.events), r
    assert not any(c.startswith("2.") for c in r.codes()), r
    line = gw.wait_for_log(r'(?m)^.*peer=127\.0\.0\.1:\d+ identity="?sensor-01"? .*handshake='
                           r'(failed|refused).*$', timeout=40)
    assert line.group(0).startswith(("warning:", "error:", "info:")), line.group(0)
    # told apart from a slow link: the device's Finished was dropped for its MAC
    assert "Finished did not decrypt" in line.group(0) and "key is probably wrong" in line.group(0)
    assert "handshake=slow" not in gw.log_text()
    sub.assert_none(window=1)
    assert_no_keys_in(gw.log_text())


def test_unknown_identity_refused(debug_world):
    _, sub, gw = debug_world
    r = sim(gw, "--count", 1, "--path", "sensors/intruder", "--payload", "x",
            "--handshake-timeout", 4, "--max-retransmit", 2, identity="intruder-7",
            key=INTRUDER_KEY)
    assert r.rc != 0, r
    assert any(e.get("event") == "dtls-failed" for e in r.events), r
    gw.wait_for_log(r'peer=127\.0\.0\.1:\d+ identity="?intruder-7"? .*handshake=(failed|refused)',
                    timeout=40)
    sub.assert_none(window=1)
    assert_no_keys_in(gw.log_text())


def test_right_key_after_wrong_key_works(debug_world):
    _, sub, gw = debug_world
    sim(gw, "--count", 1, "--path", "sensors/x", "--handshake-timeout", 3,
        "--max-retransmit", 1, key=WRONG_KEY)
    r = sim(gw, "--count", 1, "--path", "sensors/after", "--payload", "ok")
    assert r.rc == 0 and r.codes() == ["2.04"], r
    [m] = sub.wait_for(1, 20)
    assert m.topic == "devices/sensor-01/after"
    assert_no_keys_in(gw.log_text())


@pytest.mark.parametrize("cipher", ["PSK-AES128-CCM8", "PSK-AES128-CCM", "PSK-AES128-GCM-SHA256",
                                    "ECDHE-PSK-AES128-CBC-SHA256"])
def test_openssl_s_client_suites(world, dtls_factory, cipher):
    """The RFC 7252 mandatory suite (TLS_PSK_WITH_AES_128_CCM_8) and the other PSK families."""
    c = dtls_factory(world.gw.port, "sensor-02", world.gw.devices["sensor-02"], cipher=cipher)
    assert c.handshake() == cipher, c.text()
    token = os.urandom(4)
    payload = f'{{"suite":"{cipher}"}}'.encode()
    resp = c.request(coap_post("sensors/suite", payload, 0x0BAD, token), token)
    assert resp[0] == (ACK, 0x44, 0x0BAD), resp
    [m] = world.sub.wait_for(1, 20)
    assert (m.topic, m.payload) == ("devices/sensor-02/suite", payload)
    assert user_prop(m, "identity") == "sensor-02"
    if cipher == "PSK-AES128-CCM8":
        world.gw.wait_for_log(
            r'identity="?sensor-02"? handshake=ok cipher=TLS_PSK_WITH_AES_128_CCM_8')


@pytest.mark.parametrize("flavour", ["openssl", "gnutls"])
def test_debian_coap_client_delivers(world, flavour):
    payload = f'{{"client":"{flavour}"}}'
    code, out = coap_client(flavour, world.gw, f"sensors/{flavour}", payload,
                            identity="sensor-02")
    assert code == "2.04", out[-3000:]
    [m] = world.sub.wait_for(1, 20)
    assert m.topic == f"devices/sensor-02/{flavour}"
    assert m.payload == payload.encode()
    assert m.content_type == "application/json"
    assert user_prop(m, "identity") == "sensor-02"


@pytest.mark.parametrize("flavour", ["openssl", "gnutls"])
def test_debian_coap_client_wrong_key_refused(world, flavour):
    code, out = coap_client(flavour, world.gw, "sensors/bad", "x", identity="sensor-02",
                            key=WRONG_KEY, timeout=40)
    assert code is None or not code.startswith("2."), out[-3000:]
    # the client did reach the gateway: its handshake under that identity failed there
    world.gw.wait_for_log(r'identity="?sensor-02"? .*handshake=(failed|refused)', timeout=40)
    world.sub.assert_none(window=1)


def test_broker_with_wrong_host_certificate_refused(broker_factory, subscriber_factory,
                                                    gateway_factory):
    b = broker_factory(wrong_host=True)  # valid chain, but issued to wrong.example only
    sub = subscriber_factory(b, insecure=True)
    gw = gateway_factory(b)
    gw.wait_for_log(r"mqtt: broker=\S+ connect failed", timeout=40)
    # `ack: stored` readings are still answered: they wait in the store
    r = sim(gw, "--count", 3, "--interval", 50, "--path", "sensors/held", "--payload", "{seq}")
    assert r.rc == 0 and r.codes() == ["2.04"] * 3, r
    sub.assert_none(window=3)
    assert not re.search(r"mqtt: broker=\S+ connected", gw.log_text()), gw.log_text()
    assert gw.alive()


def test_wrong_host_certificate_logged_as_such(broker_factory, gateway_factory):
    """The log must say why: the certificate does not name the host. A generic "cannot
    connect" hint, the same as for a broker that is down, does not tell the user that."""
    b = broker_factory(wrong_host=True)
    gw = gateway_factory(b)
    gw.wait_for_log(r"mqtt: broker=\S+ connect failed", timeout=40)
    gw.wait_for_log(r"(?im)^.*mqtt.*(verif|mismatch|host ?name\b|does not match|wrong\.example)"
                    r".*$", timeout=20)
