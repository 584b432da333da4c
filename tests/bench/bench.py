#!/usr/bin/python3
"""Throughput benchmark: real gateway, real mosquitto (TLS), simulated DTLS devices on loopback.

Prints one table, one row per (sessions, mode): readings/s answered 2.04, the gateway's CPU time
per reading, its peak memory, the time from request to 2.04 (p50, p99, as the devices measure it)
and, for durable readings, fsyncs/s and readings per group commit. Modes: "0" = QoS 0 (no
journal), "1" = QoS 1 with ack: stored (2.04 after the journal's fdatasync). Rows with more
sessions and the same load show whether the cost of a reading grows with the number of sessions.
The simulator keeps --window requests in flight per session; with the kernel's default socket
buffers (net.core.rmem_default 212992) such bursts overflow the gateway's UDP socket, which the
"UDP drops" column shows (each drop costs the device a 2 s retransmission).

    tests/bench/bench.py [--sessions 1000,10000] [--readings 20] [--window 4] [--qos 0,1]
                         [--plot bench.svg]

Needs a build (build/coap2mqtt, build/tests/coap2mqtt-sim; or COAP2MQTT_BIN/COAP2MQTT_SIM).
Bounded: every run has a deadline and all processes are stopped at the end.
"""
import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

TOP = Path(__file__).resolve().parents[2]
os.environ.setdefault("COAP2MQTT_BIN", str(TOP / "build" / "coap2mqtt"))
os.environ.setdefault("COAP2MQTT_SIM", str(TOP / "build" / "tests" / "coap2mqtt-sim"))
sys.path.insert(0, str(TOP / "tests" / "integration"))
import conftest as h  # noqa: E402  (the integration tests' broker/gateway/PKI helpers)


def proc_stat(pid):
    """(cpu seconds, peak RSS MiB) of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    hwm = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
    return cpu, hwm


def scrape(port):
    """The gateway's Prometheus numbers as {name: value} (unlabelled series only)."""
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#") and "{" not in line:
            k, v = line.split()
            out[k.replace("coap2mqtt_", "")] = float(v)
    return out


def udp_drops():
    """UDP datagrams the kernel dropped for a full receive buffer (whole machine)."""
    rows = [l.split() for l in Path("/proc/net/snmp").read_text().splitlines()
            if l.startswith("Udp:")]
    return int(rows[1][rows[0].index("RcvbufErrors")]) if len(rows) >= 2 else 0


def pct(v, q):
    return sorted(v)[min(len(v) - 1, int(len(v) * q))] if v else 0.0


def run(tmp, pki, broker, sessions, readings, window, qos):
    d = Path(tempfile.mkdtemp(dir=tmp, prefix=f"s{sessions}-q{qos}-"))
    keys = d / "devices.keys"
    keys.write_text("".join(f"bench-{i:05d} bench-key-{i:05d}\n" for i in range(sessions)))
    os.chmod(keys, 0o600)
    mport = h.free_port(h.socket.SOCK_STREAM)
    gw = h.Gateway(d / "gw", pki, broker.url, devices={},
                   coap={"max_sessions": sessions + 100, "idle_timeout": 600},
                   routes=[{"path": "sensors/{name}", "topic": "bench/{identity}/{name}",
                            "qos": qos, "ack": "stored"}],
                   mqtt_extra={"max_buffered": max(100000, 2 * sessions * readings)},
                   extra={"devices_file": str(keys),
                          "metrics": {"listen": f"127.0.0.1:{mport}"}})
    gw.start()
    try:
        h.wait_mqtt_connected(gw, 30)
        cpu0, _ = proc_stat(gw.proc.pid)
        m0 = scrape(mport)
        drops0 = udp_drops()
        t0 = time.monotonic()
        r = subprocess.run([os.environ["COAP2MQTT_SIM"], "--uri", gw.uri, "--keys", str(keys),
                            "--devices", str(sessions), "--count", str(readings),
                            "--interval", "0", "--window", str(window), "--type", "con",
                            "--path", "sensors/t", "--payload", "{seq}",
                            "--timeout", "240", "--handshake-timeout", "60"],
                           capture_output=True, text=True, timeout=300)
        wall = time.monotonic() - t0
        cpu1, hwm = proc_stat(gw.proc.pid)
        m1 = scrape(mport)
        drops = udp_drops() - drops0
        lines = r.stdout.strip().splitlines()
        kv = h.parse_kv(lines[-1]) if lines else {}
        rtts = [float(x["rtt_ms"]) for x in map(h.parse_kv, lines)
                if x.get("code") == "2.04" and "rtt_ms" in x]
        ok = int(kv.get("ok", 0))
        fs = m1.get("journal_fsyncs_total", 0) - m0.get("journal_fsyncs_total", 0)
        commits = m1.get("journal_commits_total", 0) - m0.get("journal_commits_total", 0)
        recs = m1.get("journal_records_total", 0) - m0.get("journal_records_total", 0)
        return {"sessions": sessions, "qos": qos, "ok": ok, "sent": int(kv.get("sent", 0)),
                "wall": wall, "rate": ok / wall if wall else 0,
                "cpu_us": (cpu1 - cpu0) * 1e6 / ok if ok else 0, "rss": hwm,
                "p50": pct(rtts, 0.5), "p99": pct(rtts, 0.99), "fsyncs": fs / wall if wall else 0,
                "per_commit": recs / commits if commits else 0, "drops": drops}
    finally:
        gw.terminate()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", default="1000,10000")
    ap.add_argument("--readings", type=int, default=20, help="per device")
    ap.add_argument("--window", type=int, default=4, help="CON requests in flight per device")
    ap.add_argument("--qos", default="0,1")
    ap.add_argument("--plot", help="also draw readings/s and p99 per row into this SVG file")
    a = ap.parse_args()
    with tempfile.TemporaryDirectory(prefix="c2m-bench-") as tmp:
        pki = h.PKI(Path(tmp))
        broker = h.Broker(Path(tmp) / "broker", pki)
        broker.start()
        rows = []
        try:
            for qos in (int(q) for q in a.qos.split(",")):
                for n in (int(s) for s in a.sessions.split(",")):
                    rows.append(run(tmp, pki, broker, n, a.readings, a.window, qos))
                    print(f"bench: sessions={n} qos={qos} done", file=sys.stderr, flush=True)
        finally:
            broker.stop()
    print(f"{'sessions':>8} {'mode':>10} {'readings':>11} {'2.04/s':>8} {'gw cpu/reading':>15} "
          f"{'peak RSS':>10} {'p50':>8} {'p99':>8} {'fsyncs/s':>9} {'per commit':>10} "
          f"{'UDP drops':>9}")
    for r in rows:
        mode = "qos0" if r["qos"] == 0 else f"qos{r['qos']} sync"
        print(f"{r['sessions']:>8} {mode:>10} {r['ok']:>5}/{r['sent']:<5} {r['rate']:>8.0f} "
              f"{r['cpu_us']:>12.1f} us {r['rss']:>6.1f} MiB {r['p50']:>5.1f} ms {r['p99']:>5.1f} ms "
              f"{r['fsyncs']:>9.0f} {r['per_commit']:>10.1f} {r['drops']:>9}")
    print("(wall time includes the DTLS handshakes of every session; p50/p99: request to 2.04 as "
          "the simulated devices see it, retransmissions included; UDP drops: datagrams the kernel "
          "dropped for a full socket buffer during the row, each costing a 2 s retransmission: "
          f"net.core.rmem_default is {Path('/proc/sys/net/core/rmem_default').read_text().strip()})")
    if a.plot:
        svg_plot(rows, a.plot)
        print(f"plot: {a.plot}")


def svg_plot(rows, path):
    """Two bar charts side by side: readings/s and p99 ms per (sessions, mode). Plain SVG."""
    w, h_, pad, bw = 360, 240, 40, 28
    parts = []
    for panel, (key, title) in enumerate((("rate", "readings/s answered 2.04"),
                                          ("p99", "p99 request to 2.04 (ms)"))):
        x0 = panel * (w + 20)
        top = max([r[key] for r in rows] + [1])
        parts.append(f'<text x="{x0 + pad}" y="16" font-size="13">{title}</text>')
        parts.append(f'<line x1="{x0 + pad}" y1="{h_ - pad}" x2="{x0 + w}" y2="{h_ - pad}" '
                     'stroke="black"/>')
        for i, r in enumerate(rows):
            bh = (h_ - 2 * pad) * r[key] / top
            x = x0 + pad + 10 + i * (bw + 12)
            color = "#4878cf" if r["qos"] == 0 else "#d65f5f"
            parts.append(f'<rect x="{x}" y="{h_ - pad - bh:.1f}" width="{bw}" height="{bh:.1f}" '
                         f'fill="{color}"/>')
            parts.append(f'<text x="{x}" y="{h_ - pad - bh - 3:.1f}" font-size="9">'
                         f'{r[key]:.0f}</text>')
            parts.append(f'<text x="{x}" y="{h_ - pad + 12}" font-size="9">{r["sessions"]}</text>')
            parts.append(f'<text x="{x}" y="{h_ - pad + 24}" font-size="9">'
                         f'{"q0" if r["qos"] == 0 else "sync"}</text>')
    Path(path).write_text(f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * w + 40}" '
                          f'height="{h_}" font-family="sans-serif">{"".join(parts)}</svg>\n')


if __name__ == "__main__":
    main()
