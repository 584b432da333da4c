"""OSCORE (RFC 8613) devices on a coap:// listener: each with its own security context from the
keys file; readings, replays, wrong keys, a gateway killed and restarted (its Partial IVs never
repeat), commands and observations. The device is coap2mqtt-sim --oscore (libcoap's OSCORE over
OpenSSL); a relay between it and the gateway reads the OSCORE option of every datagram."""
import os
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
        front_recv = self.front.recvfrom

        def recv_front(n):
            data, addr = front_recv(n)
            self.seen.append(("up", data))
            return data, addr
        self.front = types.SimpleNamespace(recvfrom=recv_front, sendto=self.front.sendto,
                                           close=self.front.close, fileno=self.front.fileno,
                                           getsockname=self.front.getsockname)

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
    def make(devices=DEVS, modes="oscore", extra=None, **kw):
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
        g.start()
        wait_mqtt_connected(g)
        g.coap_port = port
        g.keys_path = keys
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
