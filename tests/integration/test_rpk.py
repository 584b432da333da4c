"""Raw public keys (RFC 7250, RFC 7252 section 9.1.3.2) beside PSK on one coaps:// endpoint: the
gateway's own key pair (coap.rpk.key_file), devices listed by the SHA-256 of their public key,
GnuTLS's coap-client as the device (a DTLS stack independent of the gateway's wolfSSL)."""
import hashlib
import os
import re
import signal
import socket
import subprocess

import pytest

from conftest import (DEVICES, GW_BIN, SimBackground, coap_client, free_port, tail,
                      wait_mqtt_connected, wait_until)
from test_metrics import scrape, val

METER = "meter-0815"
METRICS_PORT = [0]
CCM8 = "TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8"


def ec_key(path):
    """A new EC P-256 private key in PEM at path (mode 0600); its fingerprint "sha256:HEX"."""
    subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout", "-out",
                    str(path)], check=True, capture_output=True)
    os.chmod(path, 0o600)
    return fingerprint(path)


def fingerprint(path):
    der = subprocess.run(["openssl", "pkey", "-in", str(path), "-pubout", "-outform", "DER"],
                         check=True, capture_output=True).stdout
    return "sha256:" + hashlib.sha256(der).hexdigest()


def rpk_client(gw, key_file, path, payload, timeout=30):
    """GnuTLS's coap-client with a raw public key: (response code or None, its output)."""
    return coap_client("gnutls", gw, path, payload, rpk=key_file, timeout=timeout)


@pytest.fixture
def keys(tmp_path):
    d = tmp_path / "keys"
    d.mkdir()
    k = {name: d / f"{name}.pem" for name in ("gateway", "meter", "stranger")}
    fp = {name: ec_key(path) for name, path in k.items()}
    return k, fp


def rpk_gateway(gateway_factory, broker, keys, ciphers=None, start=True, extra=None):
    k, fp = keys
    g = gateway_factory(broker, start=False, extra=extra,
                        coap={"rpk": {"key_file": str(k["gateway"])},
                              **({"ciphers": ciphers} if ciphers else {})})
    g.config["devices"].append({"identity": METER, "rpk": fp["meter"]})
    g.write_config()
    if start:
        g.start()
        wait_mqtt_connected(g)
    return g


@pytest.fixture
def rpk_world(broker_factory, subscriber_factory, gateway_factory, keys):
    METRICS_PORT[0] = free_port(socket.SOCK_STREAM)
    b = broker_factory()
    s = subscriber_factory(b)
    # the mandatory suites only: the raw public key handshake must agree on CCM_8
    g = rpk_gateway(gateway_factory, b, keys, ciphers=["TLS_PSK_WITH_AES_128_CCM_8", CCM8],
                    extra={"metrics": {"listen": f"127.0.0.1:{METRICS_PORT[0]}"}})
    g.metrics_port = METRICS_PORT[0]
    return b, s, g


def test_rpk_device_reading_under_its_listed_identity(rpk_world, keys):
    _, sub, gw = rpk_world
    code, out = rpk_client(gw, keys[0]["meter"], "sensors/energy", '{"kwh":12.5}')
    assert code == "2.04", out
    [m] = sub.wait_for(1, 20)
    assert m.topic == f"devices/{METER}/energy" and m.payload == b'{"kwh":12.5}', m
    line = gw.wait_for_log(rf"identity={METER} handshake=ok cipher=(\S+)")
    assert line.group(1) == CCM8, line.group(0)


def test_unlisted_key_refused_and_its_fingerprint_logged(rpk_world, keys):
    _, sub, gw = rpk_world
    k, fp = keys
    code, out = rpk_client(gw, k["stranger"], "sensors/energy", "1", timeout=20)
    assert code is None or not code.startswith("2."), out
    line = gw.wait_for_log(r"(?m)^.*rpk=(sha256:[0-9a-f]{64}) handshake=refused.*$")
    assert line.group(1) == fp["stranger"], line.group(0)
    assert f"as rpk: {fp['stranger']}" in line.group(0)
    # logged once, as a refusal: not again as a handshake failure
    assert "before an identity was sent" not in gw.log_text()
    assert val(scrape(gw.metrics_port), "handshake_failures_total",
               reason="unknown_identity") == 1
    sub.assert_none(window=1)
    # the listed device still gets in
    code, out = rpk_client(gw, k["meter"], "sensors/energy", "2")
    assert code == "2.04", out


def test_psk_and_rpk_devices_on_one_endpoint(rpk_world, keys):
    _, sub, gw = rpk_world
    bg = SimBackground(gw, "--count", 3, "--interval", 300, "--path", "sensors/t",
                       "--payload", "psk")
    code, out = rpk_client(gw, keys[0]["meter"], "sensors/t", "rpk")
    assert code == "2.04", out
    bg.wait()
    assert [r["code"] for _, r in bg.responses()] == ["2.04"] * 3, bg.out
    msgs = sub.wait_for(4, 20)
    assert sorted(m.topic for m in msgs) == ["devices/meter-0815/t"] + ["devices/sensor-01/t"] * 3
    assert "identity=sensor-01 handshake=ok cipher=TLS_PSK_WITH_AES_128_CCM_8" in gw.log_text()
    assert re.search(rf"identity={METER} handshake=ok cipher={CCM8}", gw.log_text())


def test_removed_fingerprint_closes_the_session(rpk_world, keys):
    _, sub, gw = rpk_world
    code, out = rpk_client(gw, keys[0]["meter"], "sensors/energy", "3")
    assert code == "2.04", out
    gw.wait_for_log(rf"identity={METER} handshake=ok")
    gw.config["devices"] = [d for d in gw.config["devices"] if d["identity"] != METER]
    gw.write_config()
    mark = len(gw.log_text())
    gw.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: re.search(rf"identity={METER} session=closing reason=\"device removed\"",
                                 gw.log_text()[mark:]), 20,
               f"the session of {METER} closed after the reload:\n{tail(gw.log_text())}")
    code, out = rpk_client(gw, keys[0]["meter"], "sensors/energy", "4", timeout=20)
    assert code is None or not code.startswith("2."), out


def test_show_rpk_prints_the_gateway_key(broker_factory, gateway_factory, keys):
    gw = rpk_gateway(gateway_factory, broker_factory(), keys, start=False)
    out = subprocess.run([GW_BIN, "-c",
                          str(gw.config_path), "--show-rpk"], capture_output=True, text=True,
                         timeout=20)
    assert out.returncode == 0, out
    assert f"rpk: {keys[1]['gateway']}" in out.stdout, out.stdout
    assert "-----BEGIN PUBLIC KEY-----" in out.stdout
    assert "PRIVATE" not in out.stdout


@pytest.mark.parametrize("change, message", [
    (lambda c, fp: c["devices"].append({"identity": "m2", "rpk": "sha256:1234"}),
     "must have 64 hex digits after sha256:"),
    (lambda c, fp: c["devices"].append({"identity": "m2", "rpk": fp["meter"]}),
     f"is also device {METER}'s"),
    (lambda c, fp: c["devices"].append({"identity": "m2", "rpk": fp["stranger"],
                                        "key": "0123456789abcdef"}),
     "give one of key, key_hex, rpk or auth: certificate"),
    (lambda c, fp: c["coap"].pop("rpk"), "coap.rpk.key_file is not set"),
])
def test_check_refuses_bad_rpk_settings(broker_factory, gateway_factory, keys, change, message):
    gw = rpk_gateway(gateway_factory, broker_factory(), keys, start=False)
    change(gw.config, keys[1])
    gw.write_config()
    out = subprocess.run([GW_BIN, "-c",
                          str(gw.config_path), "--check"], capture_output=True, text=True,
                         timeout=20)
    assert out.returncode == 1 and message in out.stderr, out


def test_check_refuses_a_key_file_others_can_read_or_not_p256(broker_factory, gateway_factory,
                                                              keys, tmp_path):
    gw = rpk_gateway(gateway_factory, broker_factory(), keys, start=False)
    os.chmod(keys[0]["gateway"], 0o644)
    bin_ = GW_BIN
    out = subprocess.run([bin_, "-c", str(gw.config_path), "--check"], capture_output=True,
                         text=True, timeout=20)
    assert out.returncode == 1 and "readable by others" in out.stderr, out
    p384 = tmp_path / "p384.pem"
    subprocess.run(["openssl", "ecparam", "-name", "secp384r1", "-genkey", "-noout", "-out",
                    str(p384)], check=True, capture_output=True)
    os.chmod(p384, 0o600)
    gw.config["coap"]["rpk"]["key_file"] = str(p384)
    gw.write_config()
    out = subprocess.run([bin_, "-c", str(gw.config_path), "--check"], capture_output=True,
                         text=True, timeout=20)
    assert out.returncode == 1 and "another curve than P-256" in out.stderr, out
    assert DEVICES  # the PSK devices of the same file are untouched by these errors
