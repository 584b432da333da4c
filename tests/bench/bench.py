#!/usr/bin/python3
"""Throughput and latency benchmark: real gateway, real mosquitto (TLS), simulated DTLS devices on
loopback (one simulator process per 2,000 devices).

Every row first sets up all its sessions (the simulators hold their readings until the gateway
has counted every handshake: "setup" is how long that took, "KiB/sess" what the gateway's resident
memory grew by per session); what follows is measured from then on. Prints one table, one row per
(sessions, mode, load): readings answered 2.04 of those sent, 2.04/s, the gateway's CPU time per
reading (in all and by thread: the event loop "coap2mqtt", the journal writer "c2m-journal", the
MQTT client's send and receive threads), its peak memory, the time from request to 2.04 (p50, p99,
as the devices measure it), fsyncs/s, readings per group commit, the journal's fdatasync p99, UDP
datagrams the kernel dropped, the simulators' CPU and the machine's idle CPU (on a 2-core machine they compete with the
gateway). Modes: "qos0" = QoS 0 (no journal), "qos1 sync" = QoS 1 with ack: stored (2.04 after the
journal's fdatasync). Loads: "max" = closed loop, each device keeps --window requests in flight,
first ones spread over 1 s (the gateway's capacity while the socket buffer holds what is in
flight); "R/s" = open loop, R readings/s offered in all for 10 s, one in flight per device (what a
fleet does: its latency, and the capacity where 2.04/s falls behind R).

    tests/bench/bench.py [--sessions 1000,10000] [--readings 20] [--window 4] [--qos 0,1]
                         [--rate 2000,5000,10000] [--inflight 1000] [--plot bench.svg]

Needs a build (build/coap2mqtt, build/tests/coap2mqtt-sim; or COAP2MQTT_BIN/COAP2MQTT_SIM).
Bounded: every run has a deadline and all processes are stopped at the end.
"""
import argparse
import os
import resource
import signal
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


SIM_SESSIONS = 2000  # devices per simulator process
# closed loop: the devices' first requests spread over this time, not all in one instant (10,000
# devices x 4 requests at once are 40,000 datagrams: more than any socket buffer holds)
RAMP_MS = 1000
# Device i sends from port SOURCE_PORT + i: ports the kernel picks can repeat (libcoap sets
# SO_REUSEADDR), and two devices on one port are one peer to the gateway. Below the ephemeral range.
SOURCE_PORT = 10000


def proc_stat(pid):
    """(cpu seconds, peak RSS MiB) of a live process."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    cpu = (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")
    hwm = 0
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            hwm = int(line.split()[1]) / 1024
    return cpu, hwm


def proc_rss(pid):
    """Resident memory of a live process now, MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def thread_cpu(pid):
    """{thread name: cpu seconds} of a live process (threads of one name added up)."""
    out = {}
    for t in Path(f"/proc/{pid}/task").iterdir():
        try:
            name = (t / "comm").read_text().strip()
            f = (t / "stat").read_text().rsplit(")", 1)[1].split()
        except OSError:
            continue
        out[name] = out.get(name, 0) + (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    return out


def scrape(port):
    """The gateway's Prometheus numbers as {name: value} (labelled series as name{labels})."""
    import urllib.request
    text = urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5).read().decode()
    out = {}
    for line in text.splitlines():
        if line and not line.startswith("#"):
            k, v = line.rsplit(" ", 1)
            out[k.replace("coap2mqtt_", "")] = float(v)
    return out


def udp_drops():
    """UDP datagrams the kernel dropped for a full receive buffer (whole machine)."""
    rows = [l.split() for l in Path("/proc/net/snmp").read_text().splitlines()
            if l.startswith("Udp:")]
    return int(rows[1][rows[0].index("RcvbufErrors")]) if len(rows) >= 2 else 0


def cpu_ticks():
    """(busy, all) clock ticks of the whole machine so far."""
    f = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    return sum(f) - f[3] - f[4], sum(f)


def pct(v, q):
    return sorted(v)[min(len(v) - 1, int(len(v) * q))] if v else 0.0


def run(tmp, pki, broker, sessions, readings, window, qos, inflight, rate=0, seconds=10):
    """One row. Every session is set up first (the simulators hold their readings until the
    gateway counts every handshake); what the row measures starts then. rate 0: closed loop
    (each device keeps `window` requests in flight, as fast as they are answered: the gateway's
    capacity). rate R: open loop, R readings/s offered in all, each device one reading every
    sessions/R s with one in flight (what a fleet does), for `seconds`."""
    d = Path(tempfile.mkdtemp(dir=tmp, prefix=f"s{sessions}-q{qos}-"))
    keys = d / "devices.keys"
    keys.write_text("".join(f"bench-{i:05d} bench-key-{i:05d}\n" for i in range(sessions)))
    os.chmod(keys, 0o600)
    mport = h.free_port(h.socket.SOCK_STREAM)
    gw = h.Gateway(d / "gw", pki, broker.url, devices={},
                   # room in the socket buffer for one request per device (~1.5 KiB each as
                   # the kernel counts it); beyond net.core.rmem_max only as root
                   coap={"max_sessions": sessions + 100, "idle_timeout": 600,
                         "receive_buffer": max(4 << 20, sessions * 1536),
                         # every simulated device is on 127.0.0.1: one address for all
                         "max_handshakes_per_ip": 100000},
                   routes=[{"path": "sensors/{name}", "topic": "bench/{identity}/{name}",
                            "qos": qos, "ack": "stored"}],
                   mqtt_extra={"max_buffered": max(100000, 2 * sessions * readings),
                               "max_inflight": inflight},
                   extra={"devices_file": str(keys),
                          "metrics": {"listen": f"127.0.0.1:{mport}"}})
    gw.start()
    sims = []
    try:
        h.wait_mqtt_connected(gw, 30)
        # closed loop: at most 4,000 requests in flight in all (one per device beyond that): a
        # deeper queue outlasts CoAP's 2 s ACK timeout and devices retransmit what merely waits
        interval, window = 0, max(1, min(window, 4000 // sessions))
        if rate:
            interval = sessions * 1000 // rate
            readings = -(-seconds * 1000 // interval)
            window = 1
        # one simulator per SIM_SESSIONS devices: its loop visits every device it runs;
        # together they keep at most 40 handshakes going (the gateway holds 100 at once, and a
        # new ClientHello beyond that pushes out the oldest handshake: deps-patches/libcoap/0005)
        nsim = -(-sessions // SIM_SESSIONS)
        hs0 = scrape(mport).get("handshakes_total", 0)
        rss0 = proc_rss(gw.proc.pid)
        for k, first in enumerate(range(0, sessions, SIM_SESSIONS)):
            n = min(SIM_SESSIONS, sessions - first)
            part = d / f"devices-{k}.keys"
            part.write_text("".join(keys.read_text().splitlines(keepends=True)[first:first + n]))
            # stdout to a file: a pipe read one simulator after another stops the others
            sims.append(subprocess.Popen(
                [os.environ["COAP2MQTT_SIM"], "--uri", gw.uri, "--keys", str(part),
                 "--devices", str(n), "--count", str(readings), "--hold",
                 "--interval", str(interval), "--window", str(window),
                 "--ramp", str(interval if rate else RAMP_MS),
                 "--type", "con", "--path", "sensors/t", "--payload", "{seq}",
                 "--timeout", "300", "--handshake-timeout", "60",
                 "--max-handshakes", str(40 // nsim),
                 "--source-port", str(SOURCE_PORT + first)],
                stdout=open(d / f"sim-{k}.out", "w"), stderr=subprocess.DEVNULL))
        t_setup = time.monotonic()
        while (scrape(mport).get("handshakes_total", 0) - hs0 < sessions
               and time.monotonic() - t_setup < 120 and all(p.poll() is None for p in sims)):
            time.sleep(0.2)
        setup = time.monotonic() - t_setup
        rss_up = proc_rss(gw.proc.pid) - rss0
        cpu0, _ = proc_stat(gw.proc.pid)
        th0 = thread_cpu(gw.proc.pid)
        sim0 = sum(proc_stat(p.pid)[0] for p in sims if p.poll() is None)
        m0 = scrape(mport)
        drops0 = udp_drops()
        busy0 = cpu_ticks()
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        for p in sims:
            p.send_signal(signal.SIGUSR1)
        for p in sims:
            p.wait(timeout=360)
        wall = time.monotonic() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        sim_cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime) - sim0
        outs = [(d / f"sim-{k}.out").read_text() for k in range(len(sims))]
        cpu1, hwm = proc_stat(gw.proc.pid)
        th1 = thread_cpu(gw.proc.pid)
        m1 = scrape(mport)
        drops = udp_drops() - drops0
        busy1 = cpu_ticks()
        idle = 100 - 100 * (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1])
        lines = [line for out in outs for line in out.strip().splitlines()]
        kvs = [h.parse_kv(out.strip().splitlines()[-1]) for out in outs if out.strip()]
        rtts = [float(x["rtt_ms"]) for x in map(h.parse_kv, lines)
                if x.get("code") == "2.04" and "rtt_ms" in x]
        odd = [line for line in lines if "code=2.04" not in line and not line.startswith("sent=")]
        if odd:
            print(f"bench: {len(odd)} other simulator lines, first: {odd[:3]}", file=sys.stderr)
        ok = sum(int(kv.get("ok", 0)) for kv in kvs)
        sent = sum(int(kv.get("sent", 0)) for kv in kvs)
        fs = m1.get("journal_fsyncs_total", 0) - m0.get("journal_fsyncs_total", 0)
        commits = m1.get("journal_commits_total", 0) - m0.get("journal_commits_total", 0)
        recs = m1.get("journal_records_total", 0) - m0.get("journal_records_total", 0)
        return {"sessions": sessions, "qos": qos, "ok": ok, "sent": sent,
                "load": f"{rate}/s" if rate else "max",
                "wall": wall, "rate": ok / wall if wall else 0,
                "setup": setup, "kib_session": rss_up * 1024 / sessions,
                "cpu_us": (cpu1 - cpu0) * 1e6 / ok if ok else 0, "rss": hwm,
                "p50": pct(rtts, 0.5), "p99": pct(rtts, 0.99), "fsyncs": fs / wall if wall else 0,
                "per_commit": recs / commits if commits else 0, "drops": drops,
                "sim_cpu": sim_cpu * 100 / wall if wall else 0, "idle": idle,
                "fsync_p99": m1.get("journal_fsync_p99_microseconds", 0) / 1000,
                "threads": {k: (v - th0.get(k, 0)) * 1e6 / ok if ok else 0 for k, v in th1.items()}}
    finally:
        for p in sims:
            if p.poll() is None:
                p.kill()
                p.wait()
        gw.terminate()


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", default="1000,10000")
    ap.add_argument("--readings", type=int, default=20, help="per device")
    ap.add_argument("--window", type=int, default=4, help="CON requests in flight per device")
    ap.add_argument("--qos", default="0,1")
    ap.add_argument("--inflight", type=int, default=1000, help="mqtt.max_inflight")
    ap.add_argument("--rate", default="2000,5000,10000",
                    help="offered readings/s of the open-loop rows (latency), ',' for several; "
                         "0 = none")
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
                    rows.append(run(tmp, pki, broker, n, a.readings, a.window, qos, a.inflight))
                    print(f"bench: sessions={n} qos={qos} done", file=sys.stderr, flush=True)
                    for rate in (int(x) for x in a.rate.split(",") if int(x) > 0):
                        rows.append(run(tmp, pki, broker, n, a.readings, a.window, qos,
                                        a.inflight, rate))
                        print(f"bench: sessions={n} qos={qos} rate={rate} done",
                              file=sys.stderr, flush=True)
        finally:
            broker.stop()
    print(f"{'sessions':>8} {'mode':>10} {'load':>7} {'readings':>13} {'2.04/s':>8} {'gw cpu/reading':>15} "
          f"{'setup':>7} {'KiB/sess':>8} "
          f"{'peak RSS':>10} {'p50':>8} {'p99':>8} {'fsyncs/s':>9} {'per commit':>10} "
          f"{'UDP drops':>9} {'fsync p99':>9} {'sim cpu':>7} {'idle':>5}  gw cpu us/reading by thread")
    for r in rows:
        mode = "qos0" if r["qos"] == 0 else f"qos{r['qos']} sync"
        print(f"{r['sessions']:>8} {mode:>10} {r['load']:>7} {r['ok']:>6}/{r['sent']:<6} {r['rate']:>8.0f} "
              f"{r['cpu_us']:>12.1f} us "
              + f"{r['setup']:>5.1f} s {r['kib_session']:>8.1f} "
              + f"{r['rss']:>6.1f} MiB {r['p50']:>5.1f} ms {r['p99']:>5.1f} ms "
              f"{r['fsyncs']:>9.0f} {r['per_commit']:>10.1f} {r['drops']:>9} {r['fsync_p99']:>6.1f} ms "
              f"{r['sim_cpu']:>6.0f}% {r['idle']:>4.0f}%  "
              + " ".join(f"{k}={v:.0f}" for k, v in sorted(r["threads"].items())))
    print("(every row starts once all its sessions are up: 'setup' is how long their handshakes "
          "took, 'KiB/sess' what the gateway's resident memory grew by per session; max: closed loop; "
          "R/s: open loop; p50/p99: request to 2.04 as the "
          "simulated devices see it, retransmissions and the simulators' own delays included; UDP "
          "drops: datagrams the kernel dropped for a full socket buffer, machine-wide, each costing "
          "a 2 s retransmission; idle: CPU time of the machine that no process used during the "
          "row; coap.receive_buffer is 4 MiB, net.core.rmem_max is "
          f"{Path('/proc/sys/net/core/rmem_max').read_text().strip()})")
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
                         f'{"q0" if r["qos"] == 0 else "sync"} {r["load"]}</text>')
    Path(path).write_text(f'<svg xmlns="http://www.w3.org/2000/svg" width="{2 * w + 40}" '
                          f'height="{h_}" font-family="sans-serif">{"".join(parts)}</svg>\n')


if __name__ == "__main__":
    main()
