"""Multicast discovery (RFC 7252 section 8 and 12.8, RFC 6690): the gateway joins the
All-CoAP-Nodes groups on a veth interface the test makes, and a client in a network namespace of
its own (libcoap's coap-client, plain CoAP) finds its coaps:// endpoints and route paths by
GET /.well-known/core to FF02::FD, FF05::FD and 224.0.1.187. Anything else sent to a group gets
no answer; answers are capped per second."""
import os
import re
import socket
import struct
import subprocess

import pytest

from conftest import free_port, spawn, wait_mqtt_connected, wait_until

GW6, DEV6 = "fd00:c2:d1::1", "fd00:c2:d1::2"
GW4, DEV4 = "169.254.77.1", "169.254.77.2"


def sh(*args, check=True):
    p = subprocess.run([str(a) for a in args], capture_output=True, text=True, timeout=30)
    if check and p.returncode != 0:
        raise AssertionError(f"{' '.join(map(str, args))}: {p.stderr}")
    return p


def in_ns(ns):
    """A command prefix that runs in the network namespace ns, and only there: nsenter joins its
    network namespace alone (ip netns exec also remounts /sys, which a chroot refuses)."""
    return ["nsenter", f"--net=/run/netns/{ns}", "--"]


def mounted(path):
    """Whether something is mounted on path (a bind mount of a directory on itself included,
    which os.path.ismount does not see)."""
    with open("/proc/self/mountinfo") as f:
        return any(line.split()[4] == path for line in f)


@pytest.fixture
def link():
    """A veth pair: one end here (the gateway's), one in a new network namespace (the
    device's), each with an fd00::/8 and an IPv4 link-local address. Removed afterwards,
    whatever happened."""
    if os.geteuid() != 0:
        pytest.fail("multicast discovery tests make a network namespace: run them as root")
    tag = f"{os.getpid() % 100000}"
    ns, here, there = f"c2m-disc-{tag}", f"c2dA{tag}", f"c2dB{tag}"
    # ip netns add mounts /run/netns on itself the first time; that mount is ours to undo
    runns_mounted = mounted("/run/netns")
    try:
        made = sh("ip", "netns", "add", ns, check=False)
        if made.returncode != 0:
            # a container without the right to make namespaces: said, not passed
            pytest.skip(f"cannot make a network namespace here: {made.stderr.strip()}")
        sh("ip", "link", "add", here, "type", "veth", "peer", "name", there)
        sh("ip", "link", "set", there, "netns", ns)
        sh("ip", "addr", "add", f"{GW6}/64", "dev", here, "nodad")
        sh("ip", "addr", "add", f"{GW4}/24", "dev", here)
        sh("ip", "link", "set", here, "up")
        inside = in_ns(ns)
        sh(*inside, "ip", "addr", "add", f"{DEV6}/64", "dev", there, "nodad")
        sh(*inside, "ip", "addr", "add", f"{DEV4}/24", "dev", there)
        sh(*inside, "ip", "link", "set", there, "up")
        sh(*inside, "ip", "link", "set", "lo", "up")
        sh(*inside, "ip", "route", "add", "224.0.0.0/4", "dev", there)
        yield {"ns": ns, "here": here, "there": there, "in": inside}
    finally:
        sh("ip", "link", "del", here, check=False)
        sh("ip", "netns", "del", ns, check=False)
        if not runns_mounted and mounted("/run/netns") and not os.listdir("/run/netns"):
            sh("umount", "/run/netns", check=False)


@pytest.fixture
def disc_gw(broker_factory, gateway_factory, link):
    """A gateway listening on every address, discovery on the veth interface."""
    port, dport = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    gw = gateway_factory(broker_factory(), start=False)
    gw.config["coap"]["listen"] = [f"coaps://[::]:{port}"]
    gw.config["discovery"] = {"multicast": True, "interfaces": [link["here"]],
                              "port": dport, "leisure": 1}
    gw.write_config()
    gw.start()
    wait_mqtt_connected(gw)
    gw.coaps_port, gw.disc_port = port, dport
    return gw


def client(link, uri, method="get", payload=None, wait=3):
    """libcoap's coap-client (no DTLS) in the device's namespace: what it printed."""
    a = [*link["in"], "coap-client-notls", "-N", "-m", method,
         "-B", str(wait)]
    if payload is not None:
        a += ["-e", payload]
    p = subprocess.run(a + [uri], capture_output=True, text=True, timeout=wait + 20)
    return p.stdout + p.stderr


def links(text):
    """(target, rt) of every link in link-format text."""
    return re.findall(r'<([^>]*)>;rt="([^"]*)"', text)


def test_groups_answer_with_the_gateway_links(disc_gw, link):
    gw, there = disc_gw, link["there"]
    routes = [r["path"] for r in gw.config["routes"]]
    prefixes = {p.split("{")[0].rstrip("/") for p in routes}
    # the gateway names the address it would reach the device from: one of its veth end's
    out = sh("ip", "-6", "-o", "addr", "show", "dev", link["here"], "scope", "link").stdout
    mine6 = {f"[{GW6}]", "[%s]" % re.search(r"inet6 (fe80::[0-9a-f:]+)/", out).group(1)}
    for group, hosts in ((f"[ff02::fd%{there}]", mine6), ("[ff05::fd]", mine6),
                         ("224.0.1.187", {GW4})):
        out = client(link, f"coap://{group}:{gw.disc_port}/.well-known/core")
        got = links(out)
        gateway = [t for t, rt in got if rt == "coap2mqtt"]
        assert len(gateway) == 1, f"{group}: {out}"
        m = re.fullmatch(r"coaps://(.+):(\d+)", gateway[0])
        assert m and m.group(1) in hosts and int(m.group(2)) == gw.coaps_port, f"{group}: {out}"
        base = gateway[0]
        assert {t for t, rt in got if rt == "coap2mqtt.route"} == \
            {f"{base}/{p}" if p else f"{base}/" for p in prefixes}, f"{group}: {out}"
    # what the gateway names is where a device connects: a reading to the advertised endpoint
    route = next(t for t, rt in got if rt == "coap2mqtt.route" and t.endswith("/sensors"))
    p = subprocess.run([*link["in"], "coap-client-openssl", "-v", "7",
                        "-B", "10", "-m", "post", "-u", "sensor-01", "-k",
                        gw.devices["sensor-01"], "-e", "21.5", f"{route}/t"],
                       capture_output=True, text=True, timeout=30)
    assert re.search(r"ACK.*2\.04", p.stdout + p.stderr), p.stdout + p.stderr
    gw.wait_for_log(rf"peer={re.escape(DEV4)}:\d+ identity=sensor-01 handshake=ok")


def test_filters_by_rt_and_href(disc_gw, link):
    gw, there = disc_gw, link["there"]
    group = f"coap://[ff02::fd%{there}]:{gw.disc_port}/.well-known/core"
    got = links(client(link, group + "?rt=coap2mqtt.route"))
    assert got and all(rt == "coap2mqtt.route" for _, rt in got), got
    got = links(client(link, group + "?rt=coap2mqtt"))
    assert [rt for _, rt in got] == ["coap2mqtt"], got
    v4 = f"coap://224.0.1.187:{gw.disc_port}/.well-known/core"
    got = links(client(link, v4 + f"?href=coaps://{GW4}:{gw.coaps_port}/*"))
    assert got and all(rt == "coap2mqtt.route" for _, rt in got), got
    got = links(client(link, v4 + "?href=coaps*"))
    assert ("coaps://%s:%d" % (GW4, gw.coaps_port), "coap2mqtt") in got, got
    # nothing matches: a group gets no (empty) answer, a unicast request an empty one
    assert client(link, group + "?rt=thermostat").strip() == ""
    out = client(link, f"coap://[{GW6}]:{gw.disc_port}/.well-known/core?rt=thermostat")
    assert links(out) == [], out


def test_nothing_else_is_served_over_plain_coap(disc_gw, link):
    gw, there = disc_gw, link["there"]
    mark = len(gw.log_text())
    # to a group: no answer at all, not even an error (RFC 7252 8.1)
    for path, method in (("sensors/t", "post"), ("sensors/t", "get"), ("x", "get")):
        out = client(link, f"coap://[ff02::fd%{there}]:{gw.disc_port}/{path}", method,
                     payload="1" if method == "post" else None)
        assert out.strip() == "", f"{method} {path}: {out}"
    # unicast to the discovery port: 4.04, and no reading was taken
    out = client(link, f"coap://[{GW6}]:{gw.disc_port}/sensors/t", "post", payload="1")
    assert "4.04" in out, out
    assert "mqtt: publish" not in gw.log_text()[mark:]
    assert "handshake" not in gw.log_text()[mark:]


def raw_requests(link, group, port, count, wait):
    """count NON GET /.well-known/core to group from the device's namespace in one burst; the
    number of datagrams that came back within wait seconds."""
    code = f"""
import socket, struct, time
s = socket.socket(socket.AF_INET6, socket.SOCK_DGRAM)
s.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_MULTICAST_IF, socket.if_nametoindex({link['there']!r}))
for mid in range({count}):
    # CoAP: version 1, NON, no token; GET; Uri-Path ".well-known", Uri-Path "core"
    s.sendto(struct.pack("!BBH", 0x50, 0x01, mid) + b"\\xbb.well-known\\x04core",
             ({group!r}, {port}, 0, socket.if_nametoindex({link['there']!r})))
s.settimeout(0.2)
n, end = 0, time.monotonic() + {wait}
while time.monotonic() < end:
    try:
        d = s.recv(2048)
        n += d[1] == 0x45  # 2.05 Content
    except socket.timeout:
        pass
print(n)
"""
    p = subprocess.run([*link["in"], "python3", "-c", code],
                       capture_output=True, text=True, timeout=wait + 20)
    assert p.returncode == 0, p.stderr
    return int(p.stdout.strip())


def test_answers_are_capped_per_second(broker_factory, gateway_factory, link):
    port, dport = free_port(socket.SOCK_DGRAM), free_port(socket.SOCK_DGRAM)
    gw = gateway_factory(broker_factory(), start=False)
    gw.config["coap"]["listen"] = [f"coaps://[::]:{port}"]
    gw.config["discovery"] = {"multicast": True, "interfaces": [link["here"]],
                              "port": dport, "leisure": 1, "max_answers": 3}
    gw.write_config()
    gw.start()
    wait_mqtt_connected(gw)
    # 50 requests in one burst: at most 3 answers per second, and the burst spans at most two
    # seconds of the gateway's clock
    n = raw_requests(link, "ff02::fd", dport, 50, 4)
    assert 1 <= n <= 6, n
    gw.wait_for_log(r'discovery: answers=3 max_answers=reached reason="the rest of this '
                    r'second gets no answer"', timeout=10)


def test_check_refuses_bad_discovery_settings(broker_factory, gateway_factory):
    from conftest import GW_BIN
    gw = gateway_factory(broker_factory(), start=False)
    for change, message in (
            ({"multicast": True}, "interfaces is required with multicast: true"),
            ({"multicast": True, "interfaces": ["eth/0"]}, "is not an interface name"),
            ({"multicast": True, "interfaces": ["eth0"], "leisure": 0},
             "leisure: 0 is out of range 1..60"),
            ({"multicast": True, "interfaces": ["eth0"], "advertise": ["coap://h:5683"]},
             "is not a coaps:// URI")):
        gw.config["discovery"] = change
        gw.write_config()
        p = subprocess.run([GW_BIN, "-c", str(gw.config_path), "--check"],
                           capture_output=True, text=True, timeout=30)
        assert p.returncode != 0 and message in p.stdout + p.stderr, p.stdout + p.stderr


def test_advertise_names_the_endpoints(broker_factory, gateway_factory, link):
    dport = free_port(socket.SOCK_DGRAM)
    gw = gateway_factory(broker_factory(), start=False)
    gw.config["discovery"] = {"multicast": True, "interfaces": [link["here"]], "port": dport,
                              "leisure": 1, "advertise": ["coaps://gw.plant.example:5684"]}
    gw.write_config()
    gw.start()
    wait_mqtt_connected(gw)
    got = links(client(link, f"coap://224.0.1.187:{dport}/.well-known/core"))
    assert ("coaps://gw.plant.example:5684", "coap2mqtt") in got, got
    assert all(t.startswith("coaps://gw.plant.example:5684") for t, _ in got), got
