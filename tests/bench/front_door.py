#!/usr/bin/python3
"""Front-door benchmark: what new devices and spoofed datagrams cost the gateway with 0, 1,000 and
20,000 sessions already established (real gateway, real mosquitto with TLS, DTLS devices from the
load generator, tests/bench/loadgen.c, and a raw socket on loopback).

Per row: the established sessions are set up first and their generator then stopped (SIGSTOP:
they are silent, as idle devices are, and use no CPU). Then
  - handshakes: 2,000 new devices connect (40 handshakes at a time); handshakes/s from the first
    ClientHello until the gateway has counted the last one, and the gateway's CPU per handshake;
  - spoofed: 40,000 datagrams from random sources across 127.0.0.0/8 at 20,000/s, half
    ClientHellos, half garbage (Connection ID records included); the gateway's CPU per datagram
    it handled, also net of what it spends idle with that many sessions (measured for 3 s
    before; libcoap's periodic timeout scan visits every session).
The last columns compare each row with the first (0 established).

    tests/bench/front_door.py [--established 0,1000,20000] [--new 2000] [--spoofed 40000]
                              [--rpk] [--plot front_door.svg]

Needs root (the raw socket) and a build (build/coap2mqtt, build/tests/coap2mqtt-loadgen; or
COAP2MQTT_BIN/COAP2MQTT_LOADGEN). Bounded: every wait has a deadline and all processes are stopped
at the end.
"""
import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
os.environ.setdefault("COAP2MQTT_BIN", str(TOP / "build" / "coap2mqtt"))
LOADGEN = os.environ.get("COAP2MQTT_LOADGEN", str(TOP / "build" / "tests" / "coap2mqtt-loadgen"))
sys.path.insert(0, str(TOP / "tests" / "integration"))
sys.path.insert(0, str(TOP / "tests" / "bench"))
import conftest as h  # noqa: E402  (the integration tests' broker/gateway/PKI helpers)
from bench import proc_stat, proc_rss, scrape  # noqa: E402
from test_front_door import spoof_flood  # noqa: E402

SPOOF_RATE = 20000      # spoofed datagrams a second
IDLE_S = 3              # idle CPU measured over this long


def start_load(gw, keys, first, n, tmp, tag, base):
    """The load generator (tests/bench/loadgen.c) with devices first..first+n-1 of keys, each
    from its own loopback address from base on, 40 handshakes at a time; with hold it keeps
    the sessions open (and sends nothing), else it ends once they are all up."""
    part = tmp / f"{tag}.keys"
    part.write_text("".join(keys.read_text().splitlines(keepends=True)[first:first + n]))
    return [subprocess.Popen(
        [LOADGEN, "--port", str(gw.port), "--keys", str(part), "--sessions", str(n),
         "--readings", "0", "--handshakes", "40", "--base", base, "--timeout", "900"]
        + (["--hold"] if tag == "held" else []),
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)]


def wait_handshakes(mport, target, procs, limit_s):
    t0 = time.monotonic()
    while scrape(mport).get("handshakes_total", 0) < target:
        if time.monotonic() - t0 > limit_s or not all(p.poll() is None for p in procs):
            raise RuntimeError(f"handshakes: {scrape(mport).get('handshakes_total', 0)} of "
                               f"{target} after {time.monotonic() - t0:.0f} s")
        time.sleep(0.05)
    return time.monotonic() - t0


def spoof(gw, mport, count):
    """Sends count spoofed datagrams; returns (handled by the gateway, seconds sent over)."""
    def handled():
        m = scrape(mport)
        return m.get("hello_verify_total", 0) + m.get("stranger_datagrams_dropped_total", 0)
    raw = h.RawUDP()
    before = handled()
    try:
        sent_s = spoof_flood(raw, gw.port, count, SPOOF_RATE, 6347)
    finally:
        raw.close()
    last, t_end = -1, time.monotonic() + 30
    while time.monotonic() < t_end:
        n = handled() - before
        if n == last:
            break
        last = n
        time.sleep(0.5)
    return last, sent_s


def row(tmp, pki, broker, established, new, spoofed, rpk_key=None):
    d = Path(tempfile.mkdtemp(dir=tmp, prefix=f"e{established}-"))
    total = established + new
    keys = d / "devices.keys"
    keys.write_text("".join(f"fd-{i:05d} front-door-key-{i:05d}\n" for i in range(total)))
    os.chmod(keys, 0o600)
    mport = h.free_port(h.socket.SOCK_STREAM)
    gw = h.Gateway(d / "gw", pki, broker.url, devices={},
                   coap={"max_sessions": total + 100, "idle_timeout": 900,
                         "receive_buffer": 8 << 20, "max_handshakes_per_ip": 100000,
                         **({"rpk": {"key_file": str(rpk_key)}} if rpk_key else {})},
                   routes=[{"path": "sensors/{name}", "topic": "bench/{identity}/{name}",
                            "qos": 0}],
                   extra={"devices_file": str(keys), "metrics": {"listen": f"127.0.0.1:{mport}"}})
    gw.start()
    held, fresh = [], []
    try:
        h.wait_mqtt_connected(gw, 30)
        if established:
            held = start_load(gw, keys, 0, established, d, "held", "127.1.0.0")
            wait_handshakes(mport, established, held, 300)
            for p in held:
                p.send_signal(signal.SIGSTOP)
        rss = proc_rss(gw.proc.pid)
        cpu0, _ = proc_stat(gw.proc.pid)
        time.sleep(IDLE_S)
        idle_cpu_s = (proc_stat(gw.proc.pid)[0] - cpu0) / IDLE_S

        cpu0, _ = proc_stat(gw.proc.pid)
        fresh = start_load(gw, keys, established, new, d, "new", "127.2.0.0")
        hs_s = wait_handshakes(mport, total, [], 300)
        hs_cpu = proc_stat(gw.proc.pid)[0] - cpu0
        for p in fresh:
            p.kill()
            p.wait()

        cpu0, _ = proc_stat(gw.proc.pid)
        t0 = time.monotonic()
        handled, sent_s = spoof(gw, mport, spoofed)
        spoof_wall = time.monotonic() - t0
        spoof_cpu = proc_stat(gw.proc.pid)[0] - cpu0
        m = scrape(mport)
        return {"established": established, "hs_rate": new / hs_s, "hs_cpu_us": hs_cpu * 1e6 / new,
                "handled": handled, "spoofed": spoofed, "sent_s": sent_s,
                "spoof_cpu_us": spoof_cpu * 1e6 / max(1, handled),
                "spoof_net_us": max(0.0, spoof_cpu - idle_cpu_s * spoof_wall) * 1e6 / max(1, handled),
                "idle_cpu": idle_cpu_s * 100, "rss": rss,
                "evicted": sum(v for k, v in m.items() if k.startswith("evictions_total")),
                "sessions": m.get("sessions", 0)}
    finally:
        for p in held + fresh:
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
                p.kill()
                p.wait()
        gw.terminate()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--established", default="0,1000,20000")
    ap.add_argument("--new", type=int, default=2000, help="devices that handshake in each row")
    ap.add_argument("--spoofed", type=int, default=40000, help="spoofed datagrams in each row")
    ap.add_argument("--plot", help="also draw handshakes/s and CPU per spoofed datagram (SVG)")
    ap.add_argument("--rpk", action="store_true",
                    help="the gateway also serves raw public keys (coap.rpk.key_file): what that "
                         "costs the PSK devices' handshakes")
    a = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("front_door.py: needs root for the raw socket that spoofs source addresses")
    rows = []
    with tempfile.TemporaryDirectory(prefix="c2m-fd-bench-") as tmp:
        pki = h.PKI(Path(tmp))
        broker = h.Broker(Path(tmp) / "broker", pki)
        broker.start()
        rpk_key = None
        if a.rpk:
            rpk_key = Path(tmp) / "rpk.pem"
            subprocess.run(["openssl", "ecparam", "-name", "prime256v1", "-genkey", "-noout",
                            "-out", str(rpk_key)], check=True, capture_output=True)
            os.chmod(rpk_key, 0o600)
        try:
            for e in (int(x) for x in a.established.split(",")):
                rows.append(row(Path(tmp), pki, broker, e, a.new, a.spoofed, rpk_key))
                print(f"front_door: established={e} done", file=sys.stderr, flush=True)
        finally:
            broker.stop()
    base = rows[0]
    # the spoofed datagrams' cost is compared with the first row that has sessions established:
    # with none, the gateway's idle work and caches are another matter
    sbase = next((r for r in rows if r["established"]), base)
    print(f"{'established':>11} {'handshakes/s':>12} {'gw cpu/hs':>10} {'spoofed':>15} "
          f"{'gw cpu/spoofed':>14} {'net of idle':>11} {'idle cpu':>8} {'RSS':>9} {'evicted':>7} "
          f"{'hs/s vs first':>13} {'cpu/spoofed vs ' + str(sbase['established']):>20}")
    for r in rows:
        print(f"{r['established']:>11} {r['hs_rate']:>12.0f} {r['hs_cpu_us']:>7.0f} us "
              f"{r['handled']:>7.0f}/{r['spoofed']:<7} {r['spoof_cpu_us']:>11.1f} us "
              f"{r['spoof_net_us']:>8.1f} us {r['idle_cpu']:>7.1f}% {r['rss']:>5.0f} MiB "
              f"{r['evicted']:>7.0f} {r['hs_rate'] / base['hs_rate']:>12.2f}x "
              f"{r['spoof_net_us'] / max(sbase['spoof_net_us'], 1e-9):>19.2f}x")
    print("(handshakes: new devices while the established ones are silent; spoofed: datagrams "
          "the gateway handled of those sent, at 20,000/s; 'net of idle' subtracts the gateway's "
          "own CPU with that many sessions and no traffic, 'idle cpu'; RSS before the new "
          "devices)")
    if a.plot:
        svg_plot(rows, a.plot)
        print(f"plot: {a.plot}")


def svg_plot(rows, path):
    """Two bar charts side by side: handshakes/s and CPU per spoofed datagram per row."""
    w, hh, pad, bw = 300, 220, 40, 40
    parts = []
    for panel, (key, title, fmt) in enumerate((("hs_rate", "handshakes/s", "{:.0f}"),
                                               ("spoof_net_us", "us CPU per spoofed datagram",
                                                "{:.1f}"))):
        x0 = panel * (w + 20)
        top = max([r[key] for r in rows] + [1e-9])
        parts.append(f'<text x="{x0 + pad}" y="16" font-size="13">{title}</text>')
        parts.append(f'<line x1="{x0 + pad}" y1="{hh - pad}" x2="{x0 + w}" y2="{hh - pad}" '
                     'stroke="black"/>')
        for i, r in enumerate(rows):
            bh = (hh - 2 * pad) * r[key] / top
            x = x0 + pad + 10 + i * (bw + 20)
            parts.append(f'<rect x="{x}" y="{hh - pad - bh:.1f}" width="{bw}" height="{bh:.1f}" '
                         'fill="#4878cf"/>')
            parts.append(f'<text x="{x}" y="{hh - pad - bh - 3:.1f}" font-size="10">'
                         f'{fmt.format(r[key])}</text>')
            parts.append(f'<text x="{x}" y="{hh - pad + 14}" font-size="10">'
                         f'{r["established"]}</text>')
        parts.append(f'<text x="{x0 + pad}" y="{hh - 8}" font-size="10">sessions established'
                     '</text>')
    Path(path).write_text(f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * w + 40}" '
                          f'height="{hh}">' + "".join(parts) + "</svg>\n")


if __name__ == "__main__":
    main()
