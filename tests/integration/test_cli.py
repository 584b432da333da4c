"""Command line: --version, --help, --check on valid and invalid configurations."""
import os
import re
import subprocess

import pytest

from conftest import GW_BIN, DEVICES


def run_gw(*args, timeout=30, cwd=None):
    r = subprocess.run([GW_BIN, *map(str, args)], capture_output=True, timeout=timeout, cwd=cwd,
                       stdin=subprocess.DEVNULL)
    return r.returncode, r.stdout.decode(errors="replace"), r.stderr.decode(errors="replace")


# Line numbers below are those of this text; test cases replace one line with a bad one.
BASE = """\
log_level: info
coap:
  listen: ["coaps://127.0.0.1:5684"]
  max_payload: 1024
devices:
  - identity: "sensor-01"
    key: "sensor-01-Secret-K3y"
mqtt:
  url: "mqtts://127.0.0.1:8883"
  ca_file: "{ca}"
  persistence_dir: "{store}"
routes:
  - path: "sensors/{{name}}"
    topic: "devices/{{identity}}/{{name}}"
    methods: [POST, PUT]
    qos: 1
    ack: stored
"""


def base_lines(pki, tmp_path):
    return BASE.format(ca=pki.ca, store=tmp_path / "store").rstrip("\n").split("\n")


def write(tmp_path, name, text, mode=0o600):
    p = tmp_path / name
    p.write_text(text)
    os.chmod(p, mode)
    return p


def errors_of(path, out):
    """(line, col, rest) of every `FILE:LINE:COL: ...` line."""
    rx = re.compile(r"^" + re.escape(str(path)) + r":(\d+):(\d+): (.+)$", re.M)
    return [(int(l), int(c), rest) for l, c, rest in rx.findall(out)]


def test_version():
    rc, out, err = run_gw("--version")
    assert rc == 0, err
    assert re.search(r"coap2mqtt \d+\.\d+\.\d+", out), out
    assert "libcoap" in out and "4.3.5" in out, out
    assert "wolfSSL" in out, out


def test_help():
    rc, out, err = run_gw("--help")
    assert rc == 0, err
    assert "usage" in out.lower()
    for opt in ("-c", "--check", "--version", "--help"):
        assert opt in out, f"{opt} missing from --help:\n{out}"


def test_unknown_option_is_a_usage_error():
    rc, out, err = run_gw("--no-such-option")
    assert rc != 0
    assert "usage" in (out + err).lower()


def test_check_valid_config(tmp_path, pki):
    p = write(tmp_path, "ok.yaml", "\n".join(base_lines(pki, tmp_path)))
    rc, out, err = run_gw("-c", p, "--check")
    assert rc == 0, out + err
    assert "configuration OK" in out + err


def test_check_needs_no_broker_and_binds_nothing(tmp_path, pki):
    # The listener port in BASE is taken? --check must not care; it only validates.
    import socket
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
        lines = base_lines(pki, tmp_path)
        lines[2] = f'  listen: ["coaps://127.0.0.1:{port}"]'
        p = write(tmp_path, "ok.yaml", "\n".join(lines))
        rc, out, err = run_gw("-c", p, "--check", timeout=10)
    assert rc == 0, out + err


# (line number, replacement text, word the message must name)
BAD_LINES = [
    (1, "log_level: loud", "log_level"),
    (3, '  listen: ["http://127.0.0.1:5684"]', "listen"),
    (4, "  max_payload: 0", "max_payload"),
    (4, "  max_payloadd: 10", "max_payloadd"),
    (6, '  - identity: "evil/+/#"', "identity"),
    (7, '    key: "Kx7#qP"', "key"),
    (9, '  url: "http://127.0.0.1:8883"', "url"),
    (9, '  url: "mqtt://127.0.0.1:1883"', "url"),
    (9, '  url: "mqtts://127.0.0.1:99999"', "url"),
    (10, '  ca_file: "/nonexistent/ca.crt"', "ca_file"),
    (13, '  - path: "sensors/{na-me}"', "path"),
    (14, '    topic: "devices/{identity}/{other}"', "topic"),
    (14, '    topic: "devices/#/{name}"', "topic"),
    (15, "    methods: [POST, FETCH]", "methods"),
    (16, "    qos: 7", "qos"),
    (17, "    ack: maybe", "ack"),
]


@pytest.mark.parametrize("lineno,text,word", BAD_LINES,
                         ids=[f"{n}-{w}-{i}" for i, (n, _, w) in enumerate(BAD_LINES)])
def test_check_reports_file_line_col_key(tmp_path, pki, lineno, text, word):
    lines = base_lines(pki, tmp_path)
    lines[lineno - 1] = text
    p = write(tmp_path, "bad.yaml", "\n".join(lines))
    rc, out, err = run_gw("-c", p, "--check")
    both = out + err
    assert rc == 1, both
    errs = errors_of(p, both)
    assert errs, f"no FILE:LINE:COL: line in:\n{both}"
    mine = [(c, rest) for l, c, rest in errs if l == lineno]
    assert mine, f"no error at line {lineno} ({text!r}):\n{both}"
    col, rest = mine[0]
    key_col = len(text) - len(text.lstrip(" -")) + 1
    assert key_col <= col <= len(text) + 1, f"column {col} outside {text!r}:\n{both}"
    assert re.match(r"[\w.\[\]]+: ", rest), f"no 'key: ' after the position:\n{both}"
    assert word in rest, f"the message does not name {word!r}:\n{both}"
    assert "configuration OK" not in both
    assert "Kx7#qP" not in both, "a key appeared in the output"


def test_check_reports_every_error_in_one_run(tmp_path, pki):
    lines = base_lines(pki, tmp_path)
    wanted = [(1, "log_level: loud"), (4, "  max_payload: 0"), (7, '    key: "short"'),
              (14, '    topic: "devices/{identity}/{other}"'), (16, "    qos: 7")]
    for n, t in wanted:
        lines[n - 1] = t
    p = write(tmp_path, "bad.yaml", "\n".join(lines))
    rc, out, err = run_gw("-c", p, "--check")
    assert rc == 1
    got = {l for l, _, _ in errors_of(p, out + err)}
    assert {n for n, _ in wanted} <= got, out + err


def test_check_duplicate_identity(tmp_path, pki):
    lines = base_lines(pki, tmp_path)
    lines[7:7] = ['  - identity: "sensor-01"', '    key: "another-key-for-01"']
    p = write(tmp_path, "dup.yaml", "\n".join(lines))
    rc, out, err = run_gw("-c", p, "--check")
    assert rc == 1
    errs = errors_of(p, out + err)
    assert any(l == 8 and "identity" in rest for l, _, rest in errs), out + err


def test_check_unknown_top_level_key(tmp_path, pki):
    lines = base_lines(pki, tmp_path) + ["colour: blue"]
    p = write(tmp_path, "unk.yaml", "\n".join(lines))
    rc, out, err = run_gw("-c", p, "--check")
    assert rc == 1
    assert any(l == 18 and "colour" in rest for l, _, rest in errors_of(p, out + err)), out + err


def test_check_missing_file(tmp_path):
    p = tmp_path / "nope.yaml"
    rc, out, err = run_gw("-c", p, "--check")
    assert rc == 1
    assert str(p) in out + err
    assert "configuration OK" not in out + err


def test_check_devices_file(tmp_path, pki):
    keys = tmp_path / "devices.keys"
    keys.write_text("# test devices\nsensor-02 sensor-02-Other-K3y!\n"
                    "sensor-03 hex:00112233445566778899\n")
    lines = base_lines(pki, tmp_path)
    lines.insert(7, "devices_file: devices.keys")  # relative to the config file
    p = write(tmp_path, "keys.yaml", "\n".join(lines))

    os.chmod(keys, 0o600)
    rc, out, err = run_gw("-c", p, "--check", cwd="/")
    assert rc == 0, out + err

    os.chmod(keys, 0o644)  # readable by everyone: refused
    rc, out, err = run_gw("-c", p, "--check", cwd="/")
    assert rc == 1, f"a world-readable keys file was accepted:\n{out + err}"
    assert "devices" in out + err
    assert "sensor-02-Other-K3y!" not in out + err

    os.chmod(keys, 0o600)
    keys.write_text("sensor-02 short\n")
    rc, out, err = run_gw("-c", p, "--check", cwd="/")
    assert rc == 1
    assert "devices.keys" in out + err and ":1" in out + err, out + err
    assert "short" not in re.sub(r"shorter", "", out + err), "a key appeared in the output"


def test_check_does_not_print_keys(tmp_path, pki):
    lines = base_lines(pki, tmp_path)
    lines[6] = f'    key: "{DEVICES["sensor-01"]}"'
    lines[15] = "    qos: 9"
    p = write(tmp_path, "bad.yaml", "\n".join(lines))
    rc, out, err = run_gw("-c", p, "--check")
    assert rc == 1
    assert DEVICES["sensor-01"] not in out + err
