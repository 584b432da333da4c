"""X.509 certificates (RFC 7252 section 9.1.3.3) beside PSK and raw public keys on one coaps://
endpoint: the gateway's certificate (coap.pki), device certificates from a test CA the test makes
with the openssl command, OpenSSL's coap-client as the device (a DTLS stack independent of the
gateway's wolfSSL), the identity taken from the certificate."""
import os
import re
import signal
import socket
import subprocess
from types import SimpleNamespace

import pytest

from conftest import (GW_BIN, SimBackground, coap_client, free_port, tail, wait_mqtt_connected,
                      wait_until)
from test_metrics import scrape, val
from test_rpk import ec_key, rpk_client

METER = "meter-0815"
CCM8 = "TLS_ECDHE_ECDSA_WITH_AES_128_CCM_8"
MANDATORY = ["TLS_PSK_WITH_AES_128_CCM_8", CCM8]

CA_CNF = """[ ca ]
default_ca = ca_default
[ ca_default ]
dir = {d}
database = {d}/index.txt
new_certs_dir = {d}/newcerts
serial = {d}/serial
crlnumber = {d}/crlnumber
default_md = sha256
default_crl_days = 30
policy = policy_any
copy_extensions = copy
unique_subject = no
x509_extensions = device
[ device ]
basicConstraints = CA:FALSE
keyUsage = critical,digitalSignature
extendedKeyUsage = clientAuth,serverAuth
[ policy_any ]
commonName = supplied
"""


def openssl(*args):
    p = subprocess.run(["openssl", *map(str, args)], capture_output=True, text=True, timeout=60)
    assert p.returncode == 0, f"openssl {' '.join(map(str, args))}:\n{p.stderr}"
    return p.stdout


class TestCA:
    """A certificate authority in a directory: issues EC P-256 certificates (any validity
    period), revokes them and writes its CRL."""
    __test__ = False

    def __init__(self, d, name):
        self.d = d
        (d / "newcerts").mkdir(parents=True)
        (d / "index.txt").write_text("")
        (d / "serial").write_text("1000\n")
        (d / "crlnumber").write_text("1000\n")
        self.cnf = d / "ca.cnf"
        self.cnf.write_text(CA_CNF.format(d=d))
        self.key, self.cert = d / "ca.key", d / "ca.pem"
        openssl("req", "-x509", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
                "-nodes", "-keyout", self.key, "-out", self.cert, "-days", 30, "-subj",
                f"/CN={name}", "-addext", "basicConstraints=critical,CA:TRUE",
                "-addext", "keyUsage=critical,keyCertSign,cRLSign")

    def issue(self, name, cn, san=None, start=None, end=None):
        """(certificate, key) files for a new key pair with this CN (and subjectAltName)."""
        key, csr, cert = (self.d / f"{name}.key", self.d / f"{name}.csr",
                          self.d / f"{name}.pem")
        req = ["req", "-new", "-newkey", "ec", "-pkeyopt", "ec_paramgen_curve:prime256v1",
               "-nodes", "-keyout", key, "-out", csr, "-subj", f"/CN={cn}"]
        if san:
            req += ["-addext", f"subjectAltName={san}"]
        openssl(*req)
        os.chmod(key, 0o600)
        dates = ["-startdate", start, "-enddate", end] if start else ["-days", 30]
        openssl("ca", "-batch", "-config", self.cnf, "-cert", self.cert, "-keyfile", self.key,
                "-in", csr, "-out", cert, "-notext", *dates)
        return cert, key

    def revoke(self, cert):
        openssl("ca", "-config", self.cnf, "-cert", self.cert, "-keyfile", self.key,
                "-revoke", cert)

    def crl(self, path=None):
        path = path or self.d / "crl.pem"
        openssl("ca", "-gencrl", "-config", self.cnf, "-cert", self.cert, "-keyfile", self.key,
                "-out", path)
        return path


@pytest.fixture
def certs(tmp_path):
    """The device CA, the gateway's certificate (signed by it, for 127.0.0.1), device
    certificates, and a CA nobody trusts."""
    ca = TestCA(tmp_path / "ca", "Test Device CA")
    p = {"ca": ca, "gateway": ca.issue("gateway", "127.0.0.1", san="IP:127.0.0.1"),
         "meter": ca.issue("meter", METER),
         "valve": ca.issue("valve", "valve-7", san="DNS:valve-7.plant.example,"
                                                   "URI:urn:dev:valve-7"),
         "stranger": ca.issue("stranger", "stranger-1"),
         "expired": ca.issue("expired", METER, start="20200101000000Z",
                             end="20210101000000Z"),
         "future": ca.issue("future", METER, start="20990101000000Z",
                            end="21000101000000Z")}
    other = TestCA(tmp_path / "other", "Other CA")
    p["other_ca"] = other.issue("meter", METER)
    return p


def cert_client(gw, certs, who, path, payload, timeout=30):
    """OpenSSL's coap-client with a device certificate; it checks the gateway's certificate
    against the device CA too."""
    cert, key = certs[who]
    return coap_client("openssl", gw, path, payload, cert=(cert, key, certs["ca"].cert),
                       timeout=timeout)


def pki_settings(certs, **kw):
    cert, key = certs["gateway"]
    s = {"cert_file": str(cert), "key_file": str(key), "ca_file": str(certs["ca"].cert)}
    s.update(kw)
    return s


def pki_gateway(gateway_factory, broker, certs, devices=(METER,), start=True, coap=None,
                **kw):
    port = free_port(socket.SOCK_STREAM)
    g = gateway_factory(broker, start=False,
                        extra={"metrics": {"listen": f"127.0.0.1:{port}"}},
                        coap={"pki": pki_settings(certs, **kw), "ciphers": MANDATORY,
                              **(coap or {})})
    g.metrics_port = port
    g.config["devices"] += [{"identity": d, "auth": "certificate"} for d in devices]
    g.write_config()
    if start:
        g.start()
        wait_mqtt_connected(g)
    return g


@pytest.fixture
def cert_world(broker_factory, subscriber_factory, gateway_factory, certs):
    b = broker_factory()
    s = subscriber_factory(b)
    return b, s, pki_gateway(gateway_factory, b, certs)


def test_certificate_device_reading_under_its_cn(cert_world, certs):
    _, sub, gw = cert_world
    code, out = cert_client(gw, certs, "meter", "sensors/energy", '{"kwh":7}')
    assert code == "2.04", out
    [m] = sub.wait_for(1, 20)
    assert m.topic == f"devices/{METER}/energy" and m.payload == b'{"kwh":7}', m
    line = gw.wait_for_log(rf"identity={METER} handshake=ok cipher=(\S+)")
    assert line.group(1) == CCM8, line.group(0)


@pytest.mark.parametrize("who,reason", [
    ("expired", "certificate expired"),
    ("future", "certificate not yet valid"),
    ("other_ca", "certificate not signed by a CA of coap.pki.ca_file"),
])
def test_bad_certificate_refused_with_the_reason(cert_world, certs, who, reason):
    _, sub, gw = cert_world
    code, out = cert_client(gw, certs, who, "sensors/energy", "1", timeout=20)
    assert code is None or not code.startswith("2."), out
    line = gw.wait_for_log(r"(?m)^.*auth=certificate handshake=refused.*$")
    assert f'identity="{METER}"' in line.group(0) and f'reason="{reason}"' in line.group(0), \
        line.group(0)
    # logged once, as a refusal: not again as a handshake failure
    assert "before an identity was sent" not in gw.log_text()
    assert val(scrape(gw.metrics_port), "handshake_failures_total",
               reason="bad_certificate") == 1
    sub.assert_none(window=1)
    code, out = cert_client(gw, certs, "meter", "sensors/energy", "2")
    assert code == "2.04", out


def test_unlisted_identity_refused_unless_allowed(cert_world, certs):
    _, sub, gw = cert_world
    code, out = cert_client(gw, certs, "stranger", "sensors/energy", "1", timeout=20)
    assert code is None or not code.startswith("2."), out
    line = gw.wait_for_log(r"(?m)^.*identity=\"stranger-1\" auth=certificate "
                           r"handshake=refused.*$")
    assert 'reason="identity not listed"' in line.group(0), line.group(0)
    assert "coap.pki.allow_unlisted" in line.group(0)
    assert val(scrape(gw.metrics_port), "handshake_failures_total",
               reason="unknown_identity") == 1
    sub.assert_none(window=1)
    # allow_unlisted applies on reload: any identity a trusted certificate carries
    gw.config["coap"]["pki"]["allow_unlisted"] = True
    gw.write_config()
    mark = len(gw.log_text())
    gw.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload" in gw.log_text()[mark:], 20, "the reload")
    code, out = cert_client(gw, certs, "stranger", "sensors/energy", "2")
    assert code == "2.04", out
    [m] = sub.wait_for(1, 20)
    assert m.topic == "devices/stranger-1/energy", m


@pytest.mark.parametrize("source,identity", [("san_dns", "valve-7.plant.example"),
                                             ("san_uri", "urn:dev:valve-7")])
def test_identity_from_a_subject_alternative_name(broker_factory, subscriber_factory,
                                                  gateway_factory, certs, source, identity):
    b = broker_factory()
    sub = subscriber_factory(b)
    gw = pki_gateway(gateway_factory, b, certs, devices=(identity,), identity=source)
    code, out = cert_client(gw, certs, "valve", "sensors/flow", "3")
    assert code == "2.04", out
    [m] = sub.wait_for(1, 20)
    assert m.topic == f"devices/{identity}/flow", m
    # a certificate without that kind of name has no identity
    code, out = cert_client(gw, certs, "meter", "sensors/flow", "4", timeout=20)
    assert code is None or not code.startswith("2."), out
    kind = "DNS" if source == "san_dns" else "URI"
    gw.wait_for_log(rf'reason="certificate has no {kind} subject alternative name')


def test_crl_refuses_a_revoked_certificate_and_reload_closes_its_session(
        broker_factory, subscriber_factory, gateway_factory, certs, tmp_path):
    ca = certs["ca"]
    crl = ca.crl(tmp_path / "devices.crl")
    b = broker_factory()
    sub = subscriber_factory(b)
    gw = pki_gateway(gateway_factory, b, certs, devices=(METER, "valve-7"), crl_file=str(crl))
    code, out = cert_client(gw, certs, "meter", "sensors/energy", "5")
    assert code == "2.04", out
    code, out = cert_client(gw, certs, "valve", "sensors/flow", "6")
    assert code == "2.04", out
    sub.wait_for(2, 20)
    # the meter's certificate is revoked: a new CRL, a reload
    ca.revoke(certs["meter"][0])
    ca.crl(crl)
    mark = len(gw.log_text())
    gw.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: re.search(rf'identity={METER} session=closing '
                                 r'reason="certificate revoked"', gw.log_text()[mark:]), 20,
               f"the revoked device's session closed:\n{tail(gw.log_text())}")
    assert "identity=valve-7 session=closing" not in gw.log_text()
    code, out = cert_client(gw, certs, "meter", "sensors/energy", "7", timeout=20)
    assert code is None or not code.startswith("2."), out
    gw.wait_for_log(rf'identity="{METER}" auth=certificate handshake=refused '
                    r'reason="certificate revoked \(coap.pki.crl_file\)"')
    code, out = cert_client(gw, certs, "valve", "sensors/flow", "8")
    assert code == "2.04", out


def three_kinds(broker_factory, subscriber_factory, gateway_factory, certs, tmp_path):
    """A gateway (not started) with a certificate and a raw public key of its own, and a
    raw public key device thermo-3 beside the PSK and certificate ones: (subscriber, gateway,
    thermo-3's key file)."""
    gw_key, thermo_key = tmp_path / "gw-rpk.pem", tmp_path / "thermo.pem"
    ec_key(gw_key)
    thermo_fp = ec_key(thermo_key)
    b = broker_factory()
    sub = subscriber_factory(b)
    gw = pki_gateway(gateway_factory, b, certs, start=False,
                     coap={"rpk": {"key_file": str(gw_key)}})
    gw.config["devices"].append({"identity": "thermo-3", "rpk": thermo_fp})
    return sub, gw, thermo_key


def test_psk_rpk_and_certificate_devices_on_one_endpoint(broker_factory, subscriber_factory,
                                                         gateway_factory, certs, tmp_path):
    sub, gw, thermo_key = three_kinds(broker_factory, subscriber_factory, gateway_factory,
                                      certs, tmp_path)
    gw.write_config()
    gw.start()
    wait_mqtt_connected(gw)
    bg = SimBackground(gw, "--count", 3, "--interval", 300, "--path", "sensors/t",
                       "--payload", "psk")
    code, out = cert_client(gw, certs, "meter", "sensors/t", "x509")
    assert code == "2.04", out
    code, out = rpk_client(gw, thermo_key, "sensors/t", "rpk")
    assert code == "2.04", out
    bg.wait()
    assert [r["code"] for _, r in bg.responses()] == ["2.04"] * 3, bg.out
    msgs = sub.wait_for(5, 20)
    assert sorted((m.topic, m.payload) for m in msgs) == sorted(
        [(f"devices/{METER}/t", b"x509"), ("devices/thermo-3/t", b"rpk")] +
        [("devices/sensor-01/t", b"psk")] * 3)
    log = gw.log_text()
    assert "identity=sensor-01 handshake=ok cipher=TLS_PSK_WITH_AES_128_CCM_8" in log
    assert f"identity={METER} handshake=ok cipher={CCM8}" in log
    assert f"identity=thermo-3 handshake=ok cipher={CCM8}" in log
    # and each kind is held to its own: a certificate device is no PSK device
    code, out = coap_client("openssl", gw, "sensors/t", "psk?", identity=METER,
                            key="0123456789abcdef", timeout=20)
    assert code is None or not code.startswith("2."), out
    gw.wait_for_log(rf'identity="{METER}" handshake=refused reason="the device is listed '
                    r'with a certificate, not a PSK"')


def test_keys_file_lists_certificate_devices(broker_factory, subscriber_factory,
                                             gateway_factory, certs, tmp_path):
    keys = tmp_path / "devices.keys"
    keys.write_text(f"# certificate devices\n{METER} certificate\n")
    os.chmod(keys, 0o640)
    b = broker_factory()
    sub = subscriber_factory(b)
    gw = pki_gateway(gateway_factory, b, certs, devices=(), start=False)
    gw.config["devices_file"] = str(keys)
    gw.write_config()
    gw.start()
    wait_mqtt_connected(gw)
    code, out = cert_client(gw, certs, "meter", "sensors/energy", "9")
    assert code == "2.04", out
    [m] = sub.wait_for(1, 20)
    assert m.topic == f"devices/{METER}/energy", m


def check(gw):
    p = subprocess.run([GW_BIN, "-c", str(gw.config_path), "--check"], capture_output=True,
                       text=True, timeout=30)
    return p.returncode, p.stdout + p.stderr


@pytest.mark.parametrize("change,message", [
    (lambda c, p, t: c["coap"]["pki"].update(key_file=str(p["meter"][1])),
     "key_file is not the private key of cert_file's certificate"),
    (lambda c, p, t: c["coap"]["pki"].pop("ca_file"), "ca_file is required"),
    (lambda c, p, t: c["coap"]["pki"].update(identity="serial"),
     "cn, san_dns or san_uri"),
    (lambda c, p, t: c["coap"]["pki"].update(ca_file=str(p["meter"][1])),
     "holds no usable PEM CA certificate"),
    (lambda c, p, t: c["coap"]["pki"].update(cert_file=str(p["ca"].cnf)),
     "holds no PEM certificate"),
    (lambda c, p, t: c["coap"]["pki"].update(
        crl_file=str(TestCA(t / "third", "Third CA").crl())),
     "crl_file: not a CRL signed by a CA of ca_file"),
    (lambda c, p, t: c["coap"].pop("pki"),
     "1 device(s) use a certificate (auth: certificate) but coap.pki is not set"),
    (lambda c, p, t: c["devices"].append({"identity": "x-1", "auth": "certificate",
                                          "key": "0123456789abcdef"}),
     "give one of key, key_hex, rpk or auth: certificate"),
    (lambda c, p, t: c["devices"].append({"identity": "x-2", "auth": "psk"}),
     "auth: \"psk\" is not certificate"),
])
def test_check_refuses_bad_pki_settings(broker_factory, gateway_factory, certs, tmp_path,
                                        change, message):
    gw = pki_gateway(gateway_factory, broker_factory(), certs, start=False)
    change(gw.config, certs, tmp_path)
    gw.write_config()
    rc, out = check(gw)
    assert rc != 0 and message in out, out


def test_check_refuses_a_key_others_can_read(broker_factory, gateway_factory, certs):
    gw = pki_gateway(gateway_factory, broker_factory(), certs, start=False)
    os.chmod(certs["gateway"][1], 0o644)
    rc, out = check(gw)
    assert rc != 0 and "readable by others" in out, out


def test_listeners_restricted_to_modes(broker_factory, subscriber_factory, gateway_factory,
                                       certs, tmp_path):
    """coap.listen entries with ?modes=: a PSK-only listener and a certificate and raw public
    key listener; each refuses the other kind, and says so."""
    sub, gw, thermo_key = three_kinds(broker_factory, subscriber_factory, gateway_factory,
                                      certs, tmp_path)
    other = free_port(socket.SOCK_DGRAM)
    psk_uri, pki_uri = gw.uri, f"coaps://127.0.0.1:{other}"
    gw.config["coap"]["listen"] = [f"{psk_uri}?modes=psk", f"{pki_uri}?modes=x509,rpk"]
    gw.write_config()
    gw.start()
    wait_mqtt_connected(gw)
    at_pki = SimpleNamespace(uri=pki_uri, devices=gw.devices)

    code, out = coap_client("openssl", gw, "sensors/t", "psk")
    assert code == "2.04", out
    code, out = cert_client(at_pki, certs, "meter", "sensors/t", "x509")
    assert code == "2.04", out
    code, out = rpk_client(at_pki, thermo_key, "sensors/t", "rpk")
    assert code == "2.04", out
    msgs = sub.wait_for(3, 20)
    assert sorted(m.payload for m in msgs) == [b"psk", b"rpk", b"x509"]

    code, out = cert_client(gw, certs, "meter", "sensors/t", "no", timeout=20)
    assert code is None or not code.startswith("2."), out
    gw.wait_for_log(r'handshake=refused reason="this listener does not take certificates"')
    code, out = rpk_client(gw, thermo_key, "sensors/t", "no", timeout=20)
    assert code is None or not code.startswith("2."), out
    gw.wait_for_log(r'handshake=refused reason="this listener does not take raw public keys"')
    code, out = coap_client("openssl", at_pki, "sensors/t", "no", timeout=20)
    assert code is None or not code.startswith("2."), out
    gw.wait_for_log(r'identity="sensor-01" handshake=refused reason="this listener does not '
                    r'take PSK"')
    sub.assert_none(window=1, already=3)


def test_removed_identity_closes_the_certificate_session(cert_world, certs):
    _, sub, gw = cert_world
    code, out = cert_client(gw, certs, "meter", "sensors/energy", "1")
    assert code == "2.04", out
    gw.wait_for_log(rf"identity={METER} handshake=ok")
    gw.config["devices"] = [d for d in gw.config["devices"] if d["identity"] != METER]
    gw.write_config()
    mark = len(gw.log_text())
    gw.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: re.search(rf'identity={METER} session=closing reason="device removed"',
                                 gw.log_text()[mark:]), 20,
               f"the session of {METER} closed after the reload:\n{tail(gw.log_text())}")
    code, out = cert_client(gw, certs, "meter", "sensors/energy", "2", timeout=20)
    assert code is None or not code.startswith("2."), out
    gw.wait_for_log(rf'identity="{METER}" auth=certificate handshake=refused '
                    r'reason="identity not listed"')


def test_an_identity_that_cannot_be_a_topic_level_is_refused(cert_world, certs):
    """The same rules as for any identity, checked before it reaches a topic: a CN with '/'."""
    _, sub, gw = cert_world
    certs["slash"] = certs["ca"].issue("slash", "meter\\/0815")  # openssl -subj escapes /
    gw.config["coap"]["pki"]["allow_unlisted"] = True
    gw.write_config()
    mark = len(gw.log_text())
    gw.proc.send_signal(signal.SIGHUP)
    wait_until(lambda: "reload" in gw.log_text()[mark:], 20, "the reload")
    code, out = cert_client(gw, certs, "slash", "sensors/energy", "1", timeout=20)
    assert code is None or not code.startswith("2."), out
    gw.wait_for_log(r'identity="meter/0815" auth=certificate handshake=refused '
                    r'reason="identity is not valid in an MQTT topic')
    sub.assert_none(window=1)
