#!/usr/bin/python3
"""Throughput and latency benchmark: real gateway, real mosquitto (TLS), DTLS devices on loopback
from the load generator (tests/bench/loadgen.c: one process, one socket, a wolfSSL client and a
loopback address of its own per device, CCM_8).

Every row first sets up all its sessions (the generator holds the readings until every
handshake is done: "setup" is how long that took, "KiB/sess" what the gateway's resident
memory grew by per session); what follows is measured from then on. Prints one table, one row per
(sessions, mode, load): readings answered 2.04 of those sent, 2.04/s, the gateway's CPU time per
reading (in all and by thread: the event loop "coap2mqtt", the journal writer "c2m-journal", the
MQTT client's send and receive threads), its peak memory, the time from request to 2.04 (p50, p99,
as the devices measure it), fsyncs/s, readings per group commit, the journal's fdatasync p99, UDP
datagrams the kernel dropped, the generator's CPU and the machine's idle CPU (on a 2-core
machine they compete with the gateway). Modes: "qos0" = QoS 0 (no journal), "qos1 sync" = QoS 1 with ack: stored (2.04 after the
journal's fdatasync). Loads: "max" = closed loop, each device keeps --window requests in flight,
first ones spread over 1 s (the gateway's capacity while the socket buffer holds what is in
flight); "R/s" = open loop, R readings/s offered in all for 10 s, one in flight per device (what a
fleet does: its latency, and the capacity where 2.04/s falls behind R).

    tests/bench/bench.py [--sessions 1000,10000] [--readings 20] [--window 4] [--qos 0,1]
                         [--rate 2000,5000,10000] [--inflight 1000] [--plot bench.svg]

Needs a build (build/coap2mqtt, build/tests/coap2mqtt-loadgen, build/tests/coap2mqtt-mqtt-cost;
or COAP2MQTT_BIN, COAP2MQTT_LOADGEN and COAP2MQTT_MQTT_COST). At the end it measures what a
publish costs in the MQTT client library alone (Debian's Paho, and Debian's libmosquitto beside
it when the build has it), and splits the gateway's CPU per QoS 0 reading between Paho (its
threads, and the loop's calls into it from the qos0_handoff_cpu_microseconds_total metric) and
the loop's own work.
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
STOCK = TOP / "deps" / "stock" / "bin" / "coap-server-wolfssl"
os.environ.setdefault("COAP2MQTT_BIN", str(TOP / "build" / "coap2mqtt"))
LOADGEN = os.environ.get("COAP2MQTT_LOADGEN", str(TOP / "build" / "tests" / "coap2mqtt-loadgen"))
MQTT_COST = os.environ.get("COAP2MQTT_MQTT_COST",
                           str(TOP / "build" / "tests" / "coap2mqtt-mqtt-cost"))
sys.path.insert(0, str(TOP / "tests" / "integration"))
import conftest as h  # noqa: E402  (the integration tests' broker/gateway/PKI helpers)


# closed loop: the devices' first requests spread over this time, not all in one instant (10,000
# devices x 4 requests at once are 40,000 datagrams: more than any socket buffer holds)
RAMP_MS = 1000
CLOSED_MIN = 200000


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


def start_load(d, port, keys, sessions, readings, interval, window, ramp, method, path, limit):
    """The load generator (tests/bench/loadgen.c): every device of the keys file, one process
    on one socket, each device from its own loopback address; at most 40 handshakes at once, the
    readings held until SIGUSR1; everything ends after limit seconds."""
    # stdout to a file: the benchmark reads it once the run is over
    return [subprocess.Popen(
        [LOADGEN, "--port", str(port), "--keys", str(keys), "--sessions", str(sessions),
         "--readings", str(readings), "--hold", "--interval", str(interval),
         "--window", str(window), "--ramp", str(ramp), "--type", "con", "--method", method,
         "--path", path, "--timeout", str(limit), "--handshakes", "40"],
        stdout=open(d / "load-0.out", "w"), stderr=open(d / "load-0.err", "w"))]


def connected(d, ngen):
    """Sessions the generator has up (it says event=dtls-connected once per session)."""
    return sum((d / f"load-{k}.out").read_text().count("event=dtls-connected")
               for k in range(ngen))


def subscriber(d, broker, pki):
    """mosquitto_sub on every bench topic, each message with its arrival time (%U), topic and
    payload ("SEQ SENT-TIME", as the generator writes it): device-to-subscriber latency, losses
    and duplicates."""
    out = d / "sub.out"
    p = subprocess.Popen(["mosquitto_sub", "-h", "127.0.0.1", "-p", str(broker.port),
                          "--cafile", str(pki.ca), "-q", "1", "-t", "bench/#",
                          "-i", f"bench-sub-{os.getpid()}", "-F", "%U %t %p"],
                         stdout=open(out, "w"), stderr=subprocess.DEVNULL)
    time.sleep(0.5)
    return p, out


def run(tmp, pki, broker, sessions, readings, window, qos, inflight, rate=0, seconds=10,
        stock=False):
    """One row. Every session is set up first (the generator holds the readings until all
    their sessions are up); what the row measures starts then. rate 0: closed loop (each device
    keeps `window` requests in flight, as fast as they are answered: the server's capacity).
    rate R: open loop, R readings/s offered in all, each device one reading every sessions/R s
    with one in flight (what a fleet does), for `seconds`. stock: libcoap's own coap-server
    (as released but for a build fix, same wolfSSL) instead of the gateway, answering PUTs to
    example_data and publishing nothing."""
    d = Path(tempfile.mkdtemp(dir=tmp, prefix=f"s{sessions}-q{qos}-"))
    keys = d / "devices.keys"
    keys.write_text("".join(f"bench-{i:05d} " + ("stock-key" if stock else f"bench-key-{i:05d}")
                            + "\n" for i in range(sessions)))
    os.chmod(keys, 0o600)
    mport = h.free_port(h.socket.SOCK_STREAM)
    if stock:
        port = h.free_port(h.socket.SOCK_DGRAM)
        srv = subprocess.Popen([str(STOCK), "-A", "127.0.0.1", "-p", str(port - 1),
                                "-k", "stock-key", "-v", "3"],
                               stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        pid, uri, method, path = srv.pid, f"coaps://127.0.0.1:{port}", "put", "example_data"
        time.sleep(0.5)
    else:
        srv = h.Gateway(d / "gw", pki, broker.url, devices={},
                        # room in the socket buffer for one request per device (~1.5 KiB each
                        # as the kernel counts it); beyond net.core.rmem_max only as root
                        coap={"max_sessions": sessions + 100, "idle_timeout": 600,
                              "receive_buffer": max(4 << 20, sessions * 1536),
                              # 40 handshakes at once from the generator
                              "max_handshakes_per_ip": 100000},
                        routes=[{"path": "sensors/{name}", "topic": "bench/{identity}/{name}",
                                 "qos": qos, "ack": "stored"}],
                        mqtt_extra={"max_buffered": max(100000, 2 * sessions * readings),
                                    "max_inflight": inflight},
                        extra={"devices_file": str(keys),
                               "metrics": {"listen": f"127.0.0.1:{mport}"}})
        srv.start()
        h.wait_mqtt_connected(srv, 30)
        pid, uri, method, path = srv.proc.pid, srv.uri, "post", "sensors/t"
    gens, sub = [], None
    try:
        # closed loop: at most 4,000 requests in flight in all (one per device beyond that): a
        # deeper queue outlasts CoAP's 2 s ACK timeout and devices retransmit what merely waits
        interval, window = 0, max(1, min(window, 4000 // sessions))
        # closed loop: at least CLOSED_MIN readings, or the first second's ramp is the row
        readings = max(readings, -(-CLOSED_MIN // sessions))
        if rate:
            interval = sessions * 1000 // rate
            readings = -(-seconds * 1000 // interval)
            window = 1
        rss0 = proc_rss(pid)
        heap0 = {} if stock else scrape(mport)
        gens = start_load(d, int(uri.rsplit(":", 1)[1]), keys, sessions, readings, interval,
                          window, interval if rate else RAMP_MS, method, path,
                          # stock coap-server walks all its sessions per datagram: with
                          # thousands it answers a few hundred a second, what it answers in
                          # two minutes is its row
                          120 if stock else 600)
        t_setup = time.monotonic()
        while (connected(d, len(gens)) < sessions and time.monotonic() - t_setup < 180
               and all(p.poll() is None for p in gens)):
            time.sleep(0.2)
        setup = time.monotonic() - t_setup
        time.sleep(0.5)  # the server's last handshakes end after the device's
        rss_up = proc_rss(pid) - rss0
        heap1 = {} if stock else scrape(mport)
        heap = {p: (heap1.get(f'heap_bytes{{part="{p}"}}', 0)
                    - heap0.get(f'heap_bytes{{part="{p}"}}', 0)) / 1024 / sessions
                for p in ("all", "dtls")}
        if not stock:
            sub, sub_out = subscriber(d, broker, pki)
        cpu0, _ = proc_stat(pid)
        th0 = thread_cpu(pid)
        gen0 = sum(proc_stat(p.pid)[0] for p in gens if p.poll() is None)
        m0 = {} if stock else scrape(mport)
        drops0 = udp_drops()
        busy0 = cpu_ticks()
        ru0 = resource.getrusage(resource.RUSAGE_CHILDREN)
        t0 = time.monotonic()
        for p in gens:
            p.send_signal(signal.SIGUSR1)
        for p in gens:
            p.wait(timeout=360)
        wall = time.monotonic() - t0
        ru1 = resource.getrusage(resource.RUSAGE_CHILDREN)
        gen_cpu = (ru1.ru_utime + ru1.ru_stime) - (ru0.ru_utime + ru0.ru_stime) - gen0
        outs = [(d / f"load-{k}.out").read_text() for k in range(len(gens))]
        cpu1, hwm = proc_stat(pid)
        th1 = thread_cpu(pid)
        m1 = {} if stock else scrape(mport)
        drops = udp_drops() - drops0
        busy1 = cpu_ticks()
        idle = 100 - 100 * (busy1[0] - busy0[0]) / max(1, busy1[1] - busy0[1])
        lines = [line for out in outs for line in out.strip().splitlines()]
        kvs = [h.parse_kv(out.strip().splitlines()[-1]) for out in outs if out.strip()]
        answered = [x for x in map(h.parse_kv, lines) if x.get("code", "").startswith("2.")]
        rtts = [float(x["rtt_ms"]) for x in answered if "rtt_ms" in x]
        odd = [line for line in lines if " code=2." not in line and not line.startswith("sent=")
               and "event=dtls-connected" not in line]
        if odd:
            print(f"bench: {len(odd)} other generator lines, first: {odd[:3]}", file=sys.stderr)
        ok = sum(int(kv.get("ok", 0)) for kv in kvs)
        sent = sum(int(kv.get("sent", 0)) for kv in kvs)
        e2e, lost, dup = [], None, None
        if sub:
            e2e, lost, dup = delivery(sub, sub_out, answered)
        fs = m1.get("journal_fsyncs_total", 0) - m0.get("journal_fsyncs_total", 0)
        commits = m1.get("journal_commits_total", 0) - m0.get("journal_commits_total", 0)
        recs = m1.get("journal_records_total", 0) - m0.get("journal_records_total", 0)
        handoff = (m1.get("qos0_handoff_cpu_microseconds_total", 0) -
                   m0.get("qos0_handoff_cpu_microseconds_total", 0))
        return {"server": "stock" if stock else "gateway",
                "sessions": sessions, "qos": qos, "ok": ok, "sent": sent,
                "load": f"{rate}/s" if rate else "max",
                "wall": wall, "rate": ok / wall if wall else 0,
                "setup": setup, "kib_session": rss_up * 1024 / sessions,
                "heap_session": heap["all"], "dtls_session": heap["dtls"],
                "cpu_us": (cpu1 - cpu0) * 1e6 / ok if ok else 0, "rss": hwm,
                "p50": pct(rtts, 0.5), "p99": pct(rtts, 0.99),
                "e2e50": pct(e2e, 0.5), "e2e99": pct(e2e, 0.99), "lost": lost, "dup": dup,
                "fsyncs": fs / wall if wall else 0,
                "per_commit": recs / commits if commits else 0, "drops": drops,
                "gen_cpu": gen_cpu * 100 / wall if wall else 0, "idle": idle,
                "fsync_p99": m1.get("journal_fsync_p99_microseconds", 0) / 1000,
                "threads": {k: (v - th0.get(k, 0)) * 1e6 / ok if ok else 0 for k, v in th1.items()},
                "handoff_us": handoff / ok if ok else 0}
    finally:
        for p in gens + ([sub] if sub else []):
            if p.poll() is None:
                p.kill()
                p.wait()
        if stock:
            srv.terminate()
            srv.wait()
        else:
            srv.terminate()


def clients_alone(pki, broker):
    """What a QoS 0 publish costs in an MQTT client library by itself (tests/bench/mqtt_cost.c):
    Debian's Paho as the gateway drives it, and Debian's libmosquitto from one thread as an event
    loop would (when the build has it), each shaped as the gateway publishes a reading (MQTT 5,
    its two user properties) and bare (MQTT 3.1.1, none): handed over in batches of 100, the
    next batch once the last is written, 200,000 each. {(client, shape): (CPU us per publish,
    all threads; of it, the publishing thread's; the allocator)}."""
    out = {}
    for client in ("paho", "mosquitto"):
        for shape, version in (("gateway", "5"), ("bare", "3")):
            r = subprocess.run([MQTT_COST, "--client", client, "--uri",
                                f"ssl://127.0.0.1:{broker.port}", "--cafile", str(pki.ca),
                                "--count", "200000", "--window", "100", "--refill", "0",
                                "--shape", shape, "--version", version, "--timeout", "120"],
                               capture_output=True, text=True, timeout=150)
            if client == "mosquitto" and "built without" in r.stderr:
                print(f"bench: {r.stderr.strip()}: libmosquitto left out", file=sys.stderr)
                break
            kv = dict(f.split("=", 1) for f in r.stdout.split() if "=" in f)
            if r.returncode != 0 or "cpu_us_per_publish" not in kv:
                raise SystemExit(f"bench: {MQTT_COST} failed: {r.stdout}{r.stderr}")
            out[client, shape] = (float(kv["cpu_us_per_publish"]),
                                  float(kv["caller_us_per_publish"]), kv.get("allocator", "?"))
    return out


def delivery(sub, out, answered):
    """(device-to-subscriber latencies in ms, readings answered 2.xx that never arrived,
    readings that arrived more than once), once the subscriber has been quiet for 2 s."""
    size, quiet = -1, time.monotonic()
    while time.monotonic() - quiet < 2 and time.monotonic() - quiet < 60:
        if out.stat().st_size != size:
            size, quiet = out.stat().st_size, time.monotonic()
        time.sleep(0.2)
    sub.terminate()
    sub.wait()
    seen, lat, dup = set(), [], 0
    for line in out.read_text().splitlines():
        f = line.split()
        if len(f) != 4:
            continue
        key = (f[1].split("/")[1], f[2])
        if key in seen:
            dup += 1
            continue
        seen.add(key)
        lat.append((float(f[0]) - float(f[3])) * 1000)
    lost = sum(1 for x in answered if (x["device"], x["seq"]) not in seen)
    return lat, lost, dup


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sessions", default="1000,10000")
    ap.add_argument("--readings", type=int, default=20,
                    help="per device (closed loop: 200,000 in all at least)")
    ap.add_argument("--window", type=int, default=4, help="CON requests in flight per device")
    ap.add_argument("--qos", default="0,1")
    ap.add_argument("--inflight", type=int, default=1000, help="mqtt.max_inflight")
    ap.add_argument("--rate", default="half",
                    help="offered readings/s of the open-loop rows (latency), ',' for several; "
                         "half = half the closed-loop rate of the same row; 0 = none")
    ap.add_argument("--repeat", type=int, default=1,
                    help="run each closed-loop QoS 0 row of the gateway this many times and keep "
                         "the one with the median CPU per reading (the runs are listed)")
    ap.add_argument("--stock", action="store_true",
                    help="also libcoap's own coap-server (deps/stock, scripts/bootstrap --stock) "
                         "at each session count, closed loop")
    ap.add_argument("--markdown", help="also write the run as a page (BENCHMARKS.md) to this file")
    ap.add_argument("--png", help="also plot readings/s, CPU per reading and KiB per session "
                                  "against sessions into this PNG file (gnuplot)")
    a = ap.parse_args()
    rows = []
    with tempfile.TemporaryDirectory(prefix="c2m-bench-") as tmp:
        pki = h.PKI(Path(tmp))
        # the measuring subscriber gets QoS 1 messages without mosquitto's default window of
        # 20 unacknowledged ones: at 10,000/s that window, not the gateway, set its latency.
        # set_tcp_nodelay: mosquitto leaves Nagle's algorithm on for its clients by default, and
        # a QoS 0 reading reaches the subscriber at QoS 0, which it answers with nothing, so the
        # subscriber's delayed TCP ACKs (up to 40 ms) held the broker's next small write: 38 ms
        # device-to-subscriber p99 at 21,000/s, 1.6 ms with it (tests/bench/notes.md)
        broker = h.Broker(Path(tmp) / "broker", pki,
                          extra=("max_inflight_messages 0", "set_tcp_nodelay true"))
        broker.start()
        try:
            for n in (int(s) for s in a.sessions.split(",")):
                for qos in (int(q) for q in a.qos.split(",")):
                    runs = [run(tmp, pki, broker, n, a.readings, a.window, qos, a.inflight)
                            for _ in range(max(1, a.repeat) if qos == 0 else 1)]
                    runs.sort(key=lambda r: r["cpu_us"])
                    rows.append(runs[len(runs) // 2])
                    rows[-1]["runs"] = [r["cpu_us"] for r in runs]
                    print(f"bench: sessions={n} qos={qos} done", file=sys.stderr, flush=True)
                    for x in a.rate.split(","):
                        rate = int(rows[-1]["rate"] // 2) if x == "half" else int(x)
                        if rate <= 0:
                            continue
                        rows.append(run(tmp, pki, broker, n, a.readings, a.window, qos,
                                        a.inflight, rate))
                        print(f"bench: sessions={n} qos={qos} rate={rate} done",
                              file=sys.stderr, flush=True)
                if a.stock:
                    rows.append(run(tmp, pki, broker, n, a.readings, a.window, 0, a.inflight,
                                    stock=True))
                    print(f"bench: sessions={n} stock done", file=sys.stderr, flush=True)
            alone = clients_alone(pki, broker)
            print("bench: MQTT clients alone done", file=sys.stderr, flush=True)
        finally:
            broker.stop()
    text = table(rows, alone)
    print(text)
    if a.png:
        png_plot(rows, a.png)
        print(f"plot: {a.png}")
    if a.markdown:
        Path(a.markdown).write_text(page(rows, text, a))
        print(f"page: {a.markdown}")


NOTE = ("every row starts once all its sessions are up: 'setup' is how long their handshakes "
        "took, 'KiB/sess' what the server's resident memory grew by per session, 'heap' and "
        "'wolfSSL' what its heap in use and wolfSSL's share of it grew by per session (the "
        "gateway's heap_bytes metric); max: closed "
        "loop; R/s: open loop; p50/p99: request to 2.04 as the generator's devices see it, "
        "retransmissions and the generator's own delays included; e2e: from the device building "
        "the request to a subscriber receiving it from the broker; lost: answered 2.xx and never "
        "received; dup: received more than once; UDP drops: datagrams the kernel dropped for a "
        "full socket buffer, machine-wide, each costing a 2 s retransmission; idle: CPU time of "
        "the machine that no process used during the row; stock: libcoap 4.3.5's coap-server, "
        "as released but for a build fix (libcoap patch 0035), same wolfSSL, answering PUTs to "
        "example_data and publishing nothing (its "
        "socket keeps the kernel's default receive buffer); the gateway's coap.receive_buffer "
        "is 4 MiB or more, net.core.rmem_max is "
        f"{Path('/proc/sys/net/core/rmem_max').read_text().strip()}")


def mode(r):
    return "coap-server" if r["server"] == "stock" else (
        "qos0" if r["qos"] == 0 else f"qos{r['qos']} sync")


def table(rows, alone=None):
    head = (f"{'sessions':>8} {'mode':>11} {'load':>8} {'readings':>13} {'2.04/s':>8} "
            f"{'cpu/reading':>12} {'setup':>7} {'KiB/sess':>8} {'heap':>6} {'wolfSSL':>7} "
            f"{'peak RSS':>10} {'p50':>8} "
            f"{'p99':>8} {'e2e p50':>8} {'e2e p99':>8} {'lost':>5} {'dup':>4} {'fsyncs/s':>9} "
            f"{'per commit':>10} {'UDP drops':>9} {'fsync p99':>9} {'gen cpu':>7} {'idle':>5}"
            "  cpu us/reading by thread")
    out = [head]
    for r in rows:
        e2e = (f"{r['e2e50']:>5.1f} ms {r['e2e99']:>5.1f} ms {r['lost']:>5} {r['dup']:>4}"
               if r["lost"] is not None else f"{'-':>8} {'-':>8} {'-':>5} {'-':>4}")
        out.append(
            f"{r['sessions']:>8} {mode(r):>11} {r['load']:>8} {r['ok']:>6}/{r['sent']:<6} "
            f"{r['rate']:>8.0f} {r['cpu_us']:>9.1f} us {r['setup']:>5.1f} s "
            f"{r['kib_session']:>8.1f} {r['heap_session']:>6.1f} {r['dtls_session']:>7.1f} "
            f"{r['rss']:>6.1f} MiB {r['p50']:>5.1f} ms "
            f"{r['p99']:>5.1f} ms {e2e} {r['fsyncs']:>9.0f} {r['per_commit']:>10.1f} "
            f"{r['drops']:>9} {r['fsync_p99']:>6.1f} ms {r['gen_cpu']:>6.0f}% {r['idle']:>4.0f}%  "
            + " ".join(f"{k}={v:.0f}" for k, v in sorted(r["threads"].items())))
    out.append(f"({NOTE})")
    lines = ratios(rows, alone)
    return "\n".join(out + lines)


def ratios(rows, alone=None):
    """The comparisons the targets are stated in."""
    def find(server, qos, n):
        return next((r for r in rows if r["server"] == server and r["qos"] == qos
                     and r["sessions"] == n and r["load"] == "max"), None)
    sizes = sorted({r["sessions"] for r in rows})
    out = []
    for n in sizes:
        g, s, q1 = find("gateway", 0, n), find("stock", 0, n), find("gateway", 1, n)
        if g and s and s["rate"]:
            out.append(f"{n} sessions: gateway QoS 0 {g['rate']:.0f}/s = {g['rate'] / s['rate']:.1f} x "
                       f"coap-server's {s['rate']:.0f}/s")
        if g:
            stock_rss = f"; coap-server (libcoap and wolfSSL alone): {s['kib_session']:.1f} KiB" \
                if s else ""
            out.append(f"{n} sessions, bytes per session: resident {g['kib_session']:.1f} KiB, "
                       f"heap {g['heap_session']:.1f} KiB = wolfSSL {g['dtls_session']:.1f} + "
                       f"libcoap and the gateway {g['heap_session'] - g['dtls_session']:.1f}"
                       f"{stock_rss}")
        if g and q1 and g["rate"]:
            out.append(f"{n} sessions: durable QoS 1 {q1['rate']:.0f}/s = "
                       f"{q1['rate'] / g['rate']:.2f} x QoS 0")
    for n in sizes:
        g = find("gateway", 0, n)
        if g and len(g.get("runs", ())) > 1:
            out.append(f"{n} sessions, QoS 0 closed loop, {len(g['runs'])} runs: CPU per "
                       f"reading " + ", ".join(f"{c:.1f}" for c in g["runs"]) +
                       f" us; the row above is the median")
    if len(sizes) > 1:
        lo, hi = find("gateway", 0, sizes[0]), find("gateway", 0, sizes[-1])
        if lo and hi and lo["cpu_us"]:
            out.append(f"gateway CPU per QoS 0 reading, {sizes[-1]} vs {sizes[0]} sessions: "
                       f"{hi['cpu_us']:.1f} / {lo['cpu_us']:.1f} us = "
                       f"{hi['cpu_us'] / lo['cpu_us']:.2f} x")
    for client, name, how in (("paho", "Paho", "libpaho-mqtt3as, its threads writing"),
                              ("mosquitto", "libmosquitto",
                               "libmosquitto1, written from the publishing thread")):
        if not alone or (client, "gateway") not in alone:
            continue
        (gw, gw_caller, alloc), (bare, bare_caller, _) = (alone[client, "gateway"],
                                                          alone[client, "bare"])
        out.append(f"{name} alone (Debian's {how}, {alloc}, batches of 100 QoS 0 "
                   f"publishes): {gw:.1f} us CPU per publish shaped as a reading (MQTT 5, "
                   f"2 user properties; {gw_caller:.1f} us of it in the publishing thread), "
                   f"{bare:.1f} us bare (MQTT 3.1.1, no properties; {bare_caller:.1f} us)")
    # Paho inside the gateway: its own threads, and the loop's time in its publish calls (the
    # qos0_handoff_cpu_microseconds_total metric); the rest of the loop is DTLS, CoAP, the
    # gateway's own work and the kernel's UDP
    for n in sizes:
        g = find("gateway", 0, n)
        if not g or not g["cpu_us"]:
            continue
        th = g["threads"]
        paho_threads = sum(v for k, v in th.items() if k.startswith("MQTTAsync"))
        loop = th.get("coap2mqtt", 0)
        out.append(f"{n} sessions, QoS 0, CPU per reading: {g['cpu_us']:.1f} us = Paho "
                   f"{paho_threads + g['handoff_us']:.1f} (its threads {paho_threads:.1f}, "
                   f"the loop's calls into it {g['handoff_us']:.1f}) + the loop's own "
                   f"{loop - g['handoff_us']:.1f} (DTLS, CoAP, the gateway, UDP) + other "
                   f"threads {g['cpu_us'] - paho_threads - loop:.1f}")
    return out


def machine():
    model = next((l.split(":", 1)[1].strip() for l in
                  Path("/proc/cpuinfo").read_text().splitlines() if l.startswith("model name")),
                 "?")
    mem = next((int(l.split()[1]) for l in Path("/proc/meminfo").read_text().splitlines()
                if l.startswith("MemTotal:")), 0)
    osr = next((l.split("=", 1)[1].strip('"') for l in
                Path("/etc/os-release").read_text().splitlines() if l.startswith("PRETTY_NAME=")),
               "?")
    return (f"{os.cpu_count()} x {model}, {mem / 1048576:.0f} GiB, {osr}, "
            f"Linux {os.uname().release}")


def page(rows, text, a):
    rev = subprocess.run(["git", "-C", str(TOP), "describe", "--always", "--dirty"],
                         capture_output=True, text=True).stdout.strip() or "?"
    notes = TOP / "tests" / "bench" / "notes.md"
    return "\n".join([
        "# coap2mqtt benchmarks",
        "",
        "Written by `scripts/bench` (tests/bench/bench.py); do not edit by hand: run it again.",
        "",
        f"- run: {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, commit {rev}",
        f"- machine: {machine()}; the load generator, mosquitto and the subscriber run on it too",
        f"- command: `tests/bench/bench.py --sessions {a.sessions} --qos {a.qos} "
        f"--rate {a.rate} --readings {a.readings} --repeat {a.repeat}"
        f"{' --stock' if a.stock else ''}`",
        "",
        f"![readings/s, CPU per reading and KiB per session against sessions]"
        f"({Path(a.png).name if a.png else 'bench.png'})",
        "",
        "```",
        text,
        "```",
        "",
        notes.read_text() if notes.exists() else "",
    ])


def png_plot(rows, path):
    """Three panels against sessions: readings/s, CPU us per reading, KiB per session; one line
    each for the gateway (QoS 0 and QoS 1 sync, closed loop) and libcoap's coap-server."""
    with tempfile.TemporaryDirectory(prefix="c2m-plot-") as tmp:
        series = [("gateway QoS 0", "gateway", 0), ("gateway QoS 1 sync", "gateway", 1),
                  ("libcoap coap-server", "stock", 0)]
        files = []
        for i, (title, server, qos) in enumerate(series):
            pts = sorted((r["sessions"], r["rate"], r["cpu_us"], r["kib_session"]) for r in rows
                         if r["server"] == server and r["qos"] == qos and r["load"] == "max")
            if pts:
                f = Path(tmp) / f"s{i}.dat"
                f.write_text("".join(" ".join(f"{v:.2f}" for v in p) + "\n" for p in pts))
                files.append((f, title))
        panels = []
        # CPU on a log scale: coap-server's walks of every session dwarf the rest
        for col, ylabel, opts in ((2, "readings/s", "unset logscale y; set yrange [0:*]"),
                                  (3, "CPU us per reading (log)", "set logscale y; "
                                   "set yrange [*:*]"),
                                  (4, "KiB per session", "unset logscale y; set yrange [0:*]")):
            plots = ", ".join(f"'{f}' using 1:{col} with linespoints lw 2 title '{t}'"
                              for f, t in files)
            panels.append(f"{opts}\nset ylabel '{ylabel}'\nplot {plots}")
        script = "\n".join([
            "set terminal pngcairo size 1500,450 font 'sans,10'",
            f"set output '{path}'",
            "set multiplot layout 1,3",
            "set xlabel 'sessions'", "set grid", "set key bottom left", "set xtics rotate by -30",
            *panels, "unset multiplot"])
        subprocess.run(["gnuplot"], input=script, text=True, check=True)


if __name__ == "__main__":
    main()
