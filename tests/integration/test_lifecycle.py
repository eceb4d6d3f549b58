"""The launcher's duties, each on its own server: signals, engine death, ports, TLS."""

from __future__ import annotations

import datetime
import json
import os
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import pytest

pytestmark = pytest.mark.slow

LONG = {"prompt": "Tell me a long story.", "max_tokens": 3000, "ignore_eos": True}
# Deadlines for what should happen in a second or two: generous, so that a machine slowed
# several-fold still passes; only a hang misses them. No test asserts on elapsed time.
DEADLINE_S = 120


def stream_in_background(url: str, body: dict) -> tuple[threading.Thread, dict]:
    """Starts a streaming completion; result gets 'started', then 'events' and 'status'."""
    result: dict = {"events": [], "started": threading.Event()}

    def run() -> None:
        try:
            with httpx.stream(
                "POST", f"{url}/v1/completions", json={**body, "stream": True}, timeout=DEADLINE_S
            ) as r:
                result["status"] = r.status_code
                for line in r.iter_lines():
                    if line.startswith("data: "):
                        result["events"].append(line[6:])
                        result["started"].set()
        except httpx.HTTPError as e:
            result["error"] = e
        finally:
            result["started"].set()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread, result


def test_sigterm_with_zero_timeout_exits_fast_and_fails_inflight(start_server) -> None:
    server = start_server("--shutdown-timeout", "0")
    thread, result = stream_in_background(server.url, LONG)
    assert result["started"].wait(DEADLINE_S)
    server.signal(signal.SIGTERM)
    assert server.process.wait(DEADLINE_S) == 0  # long before 3000 tokens could stream
    thread.join(DEADLINE_S)
    events = result["events"]
    assert events[-1] == "[DONE]"
    assert json.loads(events[-2])["error"]["code"] == 503  # failed cleanly, and said so
    server.assert_no_process_left()


def test_sigterm_drains_inflight_and_refuses_new(start_server) -> None:
    # A drain timeout far longer than 80 tokens take even on a machine slowed many-fold.
    server = start_server("--shutdown-timeout", "600")
    thread, result = stream_in_background(server.url, {**LONG, "max_tokens": 80})
    assert result["started"].wait(DEADLINE_S)
    server.signal(signal.SIGTERM)
    deadline = time.monotonic() + DEADLINE_S
    while httpx.get(f"{server.url}/health", timeout=DEADLINE_S).status_code != 503:
        assert time.monotonic() < deadline, "SIGTERM did not start the drain"
        time.sleep(0.05)
    refused = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi"}, timeout=10)
    assert refused.status_code == 503
    thread.join(600)
    finals = [json.loads(e) for e in result["events"][:-1]]
    assert finals[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for e in finals if e["choices"] and e["choices"][0]["text"]) > 60
    assert server.process.wait(DEADLINE_S) == 0
    server.assert_no_process_left()


def test_rejected_requests_leave_nothing_to_drain(start_server) -> None:
    # A request that failed once stayed in the output processor, and SIGTERM then waited
    # out the whole drain timeout for it.
    server = start_server("--shutdown-timeout", "600")
    url = f"{server.url}/v1/completions"
    for body in (
        {"prompt": "Hi", "seed": 2**64},
        {"prompt": "Hi", "seed": -(2**63) - 1},
        {"prompt": ["Hi"] * 3000},
        {"prompt": "Hi", "temperature": 1e308},
    ):
        assert httpx.post(url, json=body, timeout=DEADLINE_S).status_code == 400, body
    surrogate = httpx.post(
        url,
        content=b'{"prompt": "\\ud800"}',
        headers={"content-type": "application/json"},
        timeout=DEADLINE_S,
    )
    assert surrogate.status_code == 400 and surrogate.json()["error"]["param"] == "prompt"
    with socket.create_connection(("127.0.0.1", server.port), timeout=DEADLINE_S) as raw:
        raw.sendall(
            b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
            b"Content-Length: 100000000\r\n\r\n"
        )
        assert raw.recv(4096).startswith(b"HTTP/1.1 413")  # before any of the body
    ok = httpx.post(url, json={"prompt": "Hi", "max_tokens": 2}, timeout=DEADLINE_S)
    assert ok.status_code == 200
    server.signal(signal.SIGTERM)
    assert server.process.wait(DEADLINE_S) == 0  # nothing to drain: not the 600 s timeout
    server.assert_no_process_left()


def test_engine_death_stops_the_server(start_server) -> None:
    server = start_server()
    server.engine_process.kill()
    assert server.process.wait(DEADLINE_S) != 0
    server.assert_no_process_left()


def test_engine_death_with_keep_alive(start_server) -> None:
    server = start_server(env={"PAGODA_KEEP_ALIVE_ON_ENGINE_DEATH": "1"})
    server.engine_process.kill()
    time.sleep(6.5)  # past a watchdog tick
    assert server.process.poll() is None
    assert httpx.get(f"{server.url}/health").status_code == 503
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi"})
    assert r.status_code == 500 and "dead" in r.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "stream": True})
    assert r.status_code == 500 and "dead" in r.json()["error"]["message"]


def test_hung_engine_is_noticed_on_health(start_server) -> None:
    # 10 s: heartbeats come every second; a loaded machine may delay a few of them.
    server = start_server(
        "--watchdog-timeout", "10", env={"PAGODA_KEEP_ALIVE_ON_ENGINE_DEATH": "1"}
    )
    time.sleep(11)  # idle longer than the timeout: the engine's heartbeats keep it healthy
    assert httpx.get(f"{server.url}/health").status_code == 200
    server.engine_process.send_signal(signal.SIGSTOP)
    deadline = time.monotonic() + DEADLINE_S
    while httpx.get(f"{server.url}/health", timeout=DEADLINE_S).status_code == 200:
        assert time.monotonic() < deadline, "a stopped engine was not noticed"
        time.sleep(0.5)
    health = httpx.get(f"{server.url}/health")
    assert health.status_code == 503 and "no progress" in health.json()["error"]["message"]
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi", "stream": True})
    assert r.status_code == 500
    assert "no progress" in server.log.read_text()


def test_hung_engine_stops_the_server(start_server) -> None:
    server = start_server("--watchdog-timeout", "3")
    server.engine_process.send_signal(signal.SIGSTOP)
    assert server.process.wait(DEADLINE_S) != 0
    server.assert_no_process_left(within=DEADLINE_S)


def test_request_meeting_a_dead_engine_stops_the_server_at_once(start_server) -> None:
    server = start_server()
    server.engine_process.kill()
    time.sleep(0.5)
    r = httpx.post(f"{server.url}/v1/completions", json={"prompt": "Hi"})
    assert r.status_code == 500
    # That the request triggers the check at once, without the watchdog's next tick, is
    # tested on the HTTP layer (test_api_server); here: the server does stop.
    assert server.process.wait(DEADLINE_S) != 0


def test_taken_port_fails_fast(tmp_path: Path) -> None:
    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        port = holder.getsockname()[1]
        done = subprocess.run(
            [sys.executable, "-m", "pagoda", "serve", "--host", "127.0.0.1", "--port", str(port)],
            capture_output=True,
            text=True,
            timeout=DEADLINE_S,
        )
        assert done.returncode != 0
        assert f"port {port}" in done.stderr and "in use" in done.stderr


# ---- TLS ----------------------------------------------------------------------------------


def write_certificate(directory: Path, common_name: str) -> tuple[Path, Path]:
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = datetime.datetime.now(datetime.timezone.utc)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(days=1))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName("localhost")]), critical=False)
        .sign(key, hashes.SHA256())
    )
    key_path, cert_path = directory / f"{common_name}.key", directory / f"{common_name}.crt"
    key_path.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    cert_path.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return key_path, cert_path


def served_common_name(port: int) -> str:
    from cryptography import x509

    context = ssl.create_default_context()
    context.check_hostname = False
    context.verify_mode = ssl.CERT_NONE
    with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
        with context.wrap_socket(raw, server_hostname="localhost") as tls:
            der = tls.getpeercert(binary_form=True)
    cert = x509.load_der_x509_certificate(der)
    return cert.subject.rfc4514_string().removeprefix("CN=")


def live_certificate(directory: Path, common_name: str) -> tuple[Path, Path]:
    """A new certificate behind symlinks (live.key, live.crt), as a certificate manager
    keeps them; returns the links."""
    key, cert = write_certificate(directory, common_name)
    live_key, live_cert = directory / "live.key", directory / "live.crt"
    os.symlink(key, live_key)
    os.symlink(cert, live_cert)
    return live_key, live_cert


def swap_certificate(directory: Path, live_key: Path, live_cert: Path, common_name: str) -> None:
    """Points the links at a new certificate, each atomically, as a certificate manager does."""
    new_key, new_cert = write_certificate(directory, common_name)
    for link, target in ((live_key, new_key), (live_cert, new_cert)):
        tmp_link = link.with_suffix(".tmp")
        os.symlink(target, tmp_link)
        os.replace(tmp_link, link)


def wait_for_common_name(port: int, common_name: str, within_s: float) -> None:
    """Waits until new connections to port get the certificate named common_name."""
    deadline = time.monotonic() + within_s
    while served_common_name(port) != common_name:
        assert time.monotonic() < deadline, "the new certificate was not served"
        time.sleep(0.2)


def test_tls_certificate_is_reloaded(start_server, tmp_path: Path) -> None:
    live_key, live_cert = live_certificate(tmp_path, "first")
    server = start_server(
        "--ssl-keyfile",
        str(live_key),
        "--ssl-certfile",
        str(live_cert),
        "--enable-ssl-refresh",
        scheme="https",
    )
    assert served_common_name(server.port) == "first"
    assert httpx.get(f"{server.url}/health", verify=False).status_code == 200

    swap_certificate(tmp_path, live_key, live_cert, "second")
    wait_for_common_name(server.port, "second", within_s=5)
    assert httpx.get(f"{server.url}/health", verify=False).status_code == 200
