"""``xmodal serve`` against misbehaving clients, over real loopback sockets.

A ``python -m xmodal serve IDX --port 0 --read-timeout 1`` subprocess (its stderr is the log a
person reads) is sent raw bytes with :mod:`socket`: clients that disconnect mid-upload, uploads
(and request headers) that stall, malformed HTTP. Every answer must be in the server's JSON
error shape, each bad client at most one log line, and the server must keep serving. An
unexpected exception in a handler is checked under uvicorn in a thread (it needs a patched
service): one logged traceback, a JSON 500.
"""
from __future__ import annotations

import json
import re
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'xmodal[serve]')")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install 'xmodal[serve]')")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from test_serve import build_pixel_fixture  # noqa: E402
from xmodal.cli import main  # noqa: E402
from xmodal.serve import create_app, load_service, server_config  # noqa: E402

READ_TIMEOUT = 1.0  # the subprocess's --read-timeout
UPLOAD_HEAD = (b"POST /api/search/image HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: image/png\r\n"
               b"Content-Length: 100000\r\n\r\n")


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return build_pixel_fixture(tmp_path_factory.mktemp("serve_reliability"))


class Server:
    """``xmodal serve`` in a subprocess; ``lines`` collects its stderr as it comes."""

    def __init__(self, index: Path) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "xmodal", "serve", str(index), "--port", "0",
                                      "--read-timeout", str(READ_TIMEOUT)],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
        first = self.proc.stderr.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", first)
        assert m, first + self.proc.stderr.read()
        self.port = int(m.group(1))
        self.lines: list[str] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            self.lines.append(line.rstrip("\n"))

    def log_after(self, start: int, match: str, settle: float = 0.4) -> list[str]:
        """The log lines written since line ``start``, once one containing ``match`` appeared."""
        deadline = time.monotonic() + 10
        while not any(match in x for x in self.lines[start:]) and time.monotonic() < deadline:
            time.sleep(0.05)
        time.sleep(settle)  # anything else it would log about the same client
        return self.lines[start:]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)


@pytest.fixture(scope="module")
def server(fx):
    srv = Server(fx["index"])
    yield srv
    srv.stop()


def _connect(port: int, timeout: float = 10.0) -> socket.socket:
    return socket.create_connection(("127.0.0.1", port), timeout=timeout)


def _read_response(sock: socket.socket) -> tuple[int, dict[str, str], bytes, bool]:
    """(status, headers, body, closed): one response read off ``sock`` (by its Content-Length,
    else until the server closes); status 0 when the server closed without answering."""
    buf, closed = b"", False
    while b"\r\n\r\n" not in buf:
        chunk = sock.recv(65536)
        if not chunk:
            return 0, {}, buf, True
        buf += chunk
    head, _, body = buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {k.strip().lower(): v.strip() for k, _, v in (x.partition(":") for x in lines[1:])}
    want = int(headers["content-length"]) if "content-length" in headers else None
    while want is None or len(body) < want:
        chunk = sock.recv(65536)
        if not chunk:
            closed = True
            break
        body += chunk
    if want is not None:
        body = body[:want]  # a pipelined answer may follow (the HTTP/2 preface is two requests)
    if not closed and headers.get("connection", "").lower() == "close":
        sock.settimeout(2)
        closed = sock.recv(1) == b""
    return status, headers, body, closed


def _json_error(status: int, headers: dict[str, str], body: bytes) -> dict:
    assert headers.get("content-type", "").startswith("application/json"), (status, headers, body)
    data = json.loads(body)
    assert set(data) == {"error"} and set(data["error"]) == {"code", "message"}, data
    return data["error"]


def _still_serving(port: int) -> None:
    with _connect(port) as s:
        s.sendall(b"GET /api/search?q=a%20red%20picture&k=2 HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        status, _, body, _ = _read_response(s)
    assert status == 200 and len(json.loads(body)["results"]) == 2


# -- clients that go away ----------------------------------------------------------------------


@pytest.mark.parametrize("how", ["declared length", "chunked", "multipart"])
def test_client_disconnecting_mid_upload_is_one_log_line(server, how):
    start = len(server.lines)
    with _connect(server.port) as s:
        if how == "declared length":
            s.sendall(UPLOAD_HEAD + b"\x89PNG" + b"\0" * 4000)
        elif how == "chunked":
            s.sendall(b"POST /api/search/image HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n1000\r\n" + b"\0" * 4096 + b"\r\n")
        else:
            part = b"--b\r\nContent-Disposition: form-data; name=\"file\"; filename=\"q.png\"\r\n\r\n\x89PNG"
            s.sendall(b"POST /api/search/image HTTP/1.1\r\nHost: x\r\nContent-Type: multipart/form-data; "
                      b"boundary=b\r\nContent-Length: 50000\r\n\r\n" + part)
        time.sleep(0.3)  # the server is now waiting for the rest
    log = server.log_after(start, "disconnected")
    assert len(log) == 1, log
    assert "client 127.0.0.1:" in log[0] and "disconnected during POST /api/search/image after" in log[0]
    assert "Traceback" not in "\n".join(server.lines)
    _still_serving(server.port)


# -- clients that stall ------------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"\x89PNG" + b"\0" * 1000, b""], ids=["some of the body", "none of it"])
def test_stalled_upload_body_is_answered_408_and_closed(server, body):
    start = len(server.lines)
    with _connect(server.port) as s:
        s.sendall(UPLOAD_HEAD + body)
        t0 = time.monotonic()
        status, headers, data, closed = _read_response(s)
        waited = time.monotonic() - t0
    assert status == 408 and closed and headers["connection"] == "close"
    err = _json_error(status, headers, data)
    assert err["code"] == "body_timeout" and f"after {len(body):,} bytes" in err["message"]
    assert READ_TIMEOUT * 0.9 <= waited < READ_TIMEOUT + 3, waited
    log = server.log_after(start, "answered 408")
    assert len(log) == 1 and f"({len(body):,} of 100,000 bytes received)" in log[0], log
    _still_serving(server.port)


def test_stalled_chunked_body_is_answered_408(server):
    """A chunked upload that stops between two chunks: the wait is per read, not per request."""
    with _connect(server.port) as s:
        s.sendall(b"POST /api/search/image HTTP/1.1\r\nHost: x\r\nContent-Type: image/png\r\n"
                  b"Transfer-Encoding: chunked\r\n\r\n")
        for _ in range(3):  # pieces arriving within the time-out keep the upload alive
            time.sleep(READ_TIMEOUT * 0.3)
            s.sendall(b"10\r\n" + b"\0" * 16 + b"\r\n")
        status, headers, data, closed = _read_response(s)
    assert status == 408 and closed and _json_error(status, headers, data)["message"].endswith("after 48 bytes")


def test_stalled_request_headers_time_out(server):
    start = len(server.lines)
    with _connect(server.port) as s:  # half a request line: a 408 in the JSON shape
        s.sendall(b"GET /api/health HTTP/1.1\r\nHo")
        t0 = time.monotonic()
        status, headers, data, closed = _read_response(s)
        assert READ_TIMEOUT * 0.9 <= time.monotonic() - t0 < READ_TIMEOUT + 3
    assert status == 408 and closed and _json_error(status, headers, data)["code"] == "header_timeout"
    log = server.log_after(start, "incomplete request headers")
    assert len(log) == 1 and "(28 bytes)" in log[0], log
    start = len(server.lines)
    with _connect(server.port) as s:  # nothing at all (a browser's spare connection): closed, silently
        t0 = time.monotonic()
        assert s.recv(100) == b""
        assert READ_TIMEOUT * 0.9 <= time.monotonic() - t0 < READ_TIMEOUT + 3
    with _connect(server.port) as s:  # a kept-alive connection whose next request stalls
        s.sendall(b"GET /api/health HTTP/1.1\r\nHost: x\r\n\r\n")
        assert _read_response(s)[0] == 200
        s.sendall(b"GET /api/he")
        status, headers, data, closed = _read_response(s)
        assert status == 408 and closed
    assert len(server.log_after(start, "incomplete request headers")) == 1
    _still_serving(server.port)


# -- malformed HTTP: uvicorn's own errors, in the JSON shape -------------------------------------


MALFORMED = {
    "not http": b"GARBAGE\r\n\r\n",
    "header without colon": b"GET /api/health HTTP/1.1\r\nHost: x\r\nBad Header\r\n\r\n",
    "two content lengths": b"POST /api/search/image HTTP/1.1\r\nHost: x\r\nContent-Length: 1\r\nContent-Length: 2\r\n\r\n",
    "bad content length": b"POST /api/search/image HTTP/1.1\r\nHost: x\r\nContent-Length: ten\r\n\r\n",
    "bad chunk size": b"POST /api/search/image HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz\r\n",
    "no host": b"GET /api/health HTTP/1.1\r\n\r\n",
    "space in target": b"GET /api/he alth HTTP/1.1\r\nHost: x\r\n\r\n",
    "TLS hello": b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + b"\0" * 64 + b"\r\n\r\n",
    "endless header": b"GET /api/health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 70000,  # over h11's 16 KiB
}


@pytest.mark.parametrize("raw", MALFORMED.values(), ids=MALFORMED.keys())
def test_malformed_http_is_a_json_400(server, raw):
    start = len(server.lines)
    with _connect(server.port) as s:
        try:
            s.sendall(raw)
        except (BrokenPipeError, ConnectionResetError):
            pass  # the server answered before it read everything (the endless header)
        status, headers, data, closed = _read_response(s)
    assert status == 400 and closed, (status, data)
    assert _json_error(status, headers, data)["code"] == "bad_http_request"
    log = server.log_after(start, "Invalid HTTP request")
    assert len(log) == 1, log
    _still_serving(server.port)


@pytest.mark.parametrize("request_line, status, code", [
    (b"GET /nope HTTP/1.1", 404, "not_found"),
    (b"PRI * HTTP/2.0\r\n\r\nSM", 404, "not_found"),  # HTTP/2 with prior knowledge: parsed as HTTP/1.1
    (b"DELETE /api/health HTTP/1.1", 405, "method_not_allowed"),
    (b"GET /api/search?q=&k=3 HTTP/1.1", 400, "empty_query"),
    (b"GET /api/thumb/99 HTTP/1.1", 404, "row_out_of_range"),
])
def test_app_errors_over_a_socket_are_json(server, request_line, status, code):
    with _connect(server.port) as s:
        s.sendall(request_line + b"\r\nHost: x\r\n\r\n")
        got, headers, data, _ = _read_response(s)
    assert got == status and _json_error(got, headers, data)["code"] == code
    if status == 405:
        assert headers["allow"] == "GET"


TOKENS = st.sampled_from([b"GET", b"POST", b"PUT", b"HEAD", b"OPTIONS", b"G\x00T", b"GET GET"])
TARGETS = st.one_of(st.sampled_from([b"/", b"/api/health", b"/api/search?q=red", b"/api/thumb/1", b"*",
                                     b"/api/search/image", b"http://x/api/info", b"/%", b"/%zz", b"//"]),
                    st.binary(max_size=40))
VERSIONS = st.sampled_from([b"HTTP/1.1", b"HTTP/1.0", b"HTTP/9.9", b"HTTP/1", b"http/1.1"])
HEADERS = st.lists(st.one_of(st.sampled_from([b"Host: x", b"Accept: */*", b"Connection: close", b"Expect: 100-continue",
                                              b"Content-Type: image/png", b"X: \xff\xfe", b": empty name"]),
                             st.binary(max_size=30).filter(lambda b: b"\r\n" not in b)), max_size=4)


@given(method=TOKENS, target=TARGETS, version=VERSIONS, headers=HEADERS)
@settings(max_examples=50, deadline=None, database=None, suppress_health_check=list(HealthCheck))
def test_random_request_heads_get_json_answers(server, method, target, version, headers):
    """Random request lines and headers (ending the head, no body): the server answers below 500,
    every error in the JSON shape, or closes without answering (input it waits on, then times out)."""
    raw = b" ".join(x for x in (method, target, version) if x) + b"\r\n" + b"".join(h + b"\r\n" for h in headers)
    with _connect(server.port, timeout=READ_TIMEOUT + 5) as s:
        s.sendall(raw + b"\r\n")
        status, resp_headers, data, _ = _read_response(s)
    if status == 0:  # closed after the read time-out: the head never parsed as complete
        return
    assert status < 500, (raw, status, data)
    if status >= 400 and method != b"HEAD":  # HEAD answers have no body
        _json_error(status, resp_headers, data)
    elif status >= 400:
        assert resp_headers["content-type"].startswith("application/json"), (raw, resp_headers)


# -- failures inside the app -------------------------------------------------------------------


def test_unexpected_failure_under_uvicorn_logs_one_traceback(fx, caplog):
    """A handler that raises: one logged traceback (not Starlette's and uvicorn's on top), a JSON 500."""
    service = load_service(fx["index"])

    def broken(text, k):
        raise RuntimeError("boom")

    service.search_text = broken
    config = server_config(create_app(service), host="127.0.0.1", port=0, log_level="warning", log_config=None)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    with caplog.at_level("WARNING"):
        thread.start()
        deadline = time.monotonic() + 20
        while not srv.started and time.monotonic() < deadline:
            time.sleep(0.02)
        port = srv.servers[0].sockets[0].getsockname()[1]
        try:
            with _connect(port) as s:
                s.sendall(b"GET /api/search?q=red HTTP/1.1\r\nHost: x\r\n\r\n")
                status, headers, data, _ = _read_response(s)
            time.sleep(0.3)
        finally:
            srv.should_exit = True
            thread.join(10)
    assert status == 500 and _json_error(status, headers, data) == {
        "code": "internal_error", "message": "internal server error (see the server log)"}
    tracebacks = [r for r in caplog.records if r.exc_info]
    assert len(tracebacks) == 1, [r.getMessage() for r in tracebacks]
    assert "GET /api/search failed" in tracebacks[0].getMessage()
    assert not [r for r in caplog.records if "Exception in ASGI application" in r.getMessage()]


def test_read_timeout_option_is_checked(fx, capsys):
    for bad in ("0", "-1", "nan", "7200"):
        assert main(["serve", str(fx["index"]), "--port", "0", "--read-timeout", bad]) == 2
        err = capsys.readouterr().err
        assert "--read-timeout" in err and "Traceback" not in err and len(err.strip().splitlines()) == 1
