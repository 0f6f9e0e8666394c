"""``xmodal serve`` end to end: a real uvicorn server on 127.0.0.1, driven by headless Chromium.

The browser test needs Playwright (python) and a Chromium binary on PATH (Debian's
``chromium``); it skips with the reason when either is missing. The socket-level test of
upload limits runs whenever the serve extra is installed.
"""
from __future__ import annotations

import http.client
import json
import re
import shutil
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'xmodal[serve]')")
uvicorn = pytest.importorskip("uvicorn", reason="the serve extra is not installed (pip install 'xmodal[serve]')")

from test_serve import build_pixel_fixture  # noqa: E402
from xmodal.serve import MAX_UPLOAD_BYTES, create_app, load_service, server_config  # noqa: E402


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return build_pixel_fixture(tmp_path_factory.mktemp("serve_live"), table_index=True)


@pytest.fixture(scope="module")
def server(fx):
    """(host, port) of a uvicorn server in a thread, on a free loopback port: the table dataset's
    images (which carry their captions) and the caption index."""
    app = create_app(load_service(fx["table_index"], fx["text_index"]))
    config = server_config(app, host="127.0.0.1", port=0, log_level="warning", access_log=False)
    srv = uvicorn.Server(config)
    thread = threading.Thread(target=srv.run, daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not srv.started:
        if time.monotonic() > deadline or not thread.is_alive():
            pytest.fail("uvicorn did not start")
        time.sleep(0.02)
    port = srv.servers[0].sockets[0].getsockname()[1]
    yield "127.0.0.1", port
    srv.should_exit = True
    thread.join(10)


def _get_json(host: str, port: int, path: str) -> tuple[int, dict]:
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.request("GET", path)
    resp = conn.getresponse()
    body = json.loads(resp.read())
    conn.close()
    return resp.status, body


def test_oversized_uploads_are_cut_off_over_a_socket(server):
    host, port = server
    # a declared 50 MB body is refused from its Content-Length, before the server reads it
    conn = http.client.HTTPConnection(host, port, timeout=10)
    conn.putrequest("POST", "/api/search/image")
    conn.putheader("Content-Type", "image/png")
    conn.putheader("Content-Length", str(50 * 1024 * 1024))
    conn.endheaders()
    conn.send(b"\x89PNG" + b"\0" * 65536)  # a little of it; the answer comes without the rest
    resp = conn.getresponse()
    assert resp.status == 413 and json.loads(resp.read())["error"]["code"] == "too_large"
    conn.close()
    # a chunked body with no length: the server stops reading soon after the cap
    conn = http.client.HTTPConnection(host, port, timeout=10)
    sent = []

    def chunks():
        for _ in range(50):
            sent.append(1)
            yield b"\0" * (1024 * 1024)

    try:
        conn.request("POST", "/api/search/image", body=chunks(), encode_chunked=True,
                     headers={"Content-Type": "image/png"})
        resp = conn.getresponse()
        assert resp.status == 413
        resp.read()
    except (BrokenPipeError, ConnectionResetError):
        pass  # the server answered and closed while the client was still sending: also a refusal
    conn.close()
    assert len(sent) < 50 and MAX_UPLOAD_BYTES // (1024 * 1024) <= len(sent)
    # and the server keeps serving
    status, body = _get_json(host, port, "/api/search?q=a%20green%20picture&k=2")
    assert status == 200 and len(body["results"]) == 2


def _browser():
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright (python) is not installed")
    exe = shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("no chromium on PATH (Debian: apt install chromium)")
    return sync_api, exe


def test_web_page_in_headless_chromium(server, fx, tmp_path):
    sync_api, exe = _browser()
    host, port = server
    base = f"http://{host}:{port}"
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=exe, headless=True, args=["--no-sandbox"])
        try:
            page = browser.new_page(viewport={"width": 1100, "height": 760})
            errors: list[str] = []
            page.on("pageerror", lambda e: errors.append(str(e)))
            page.on("console", lambda m: errors.append(m.text) if m.type == "error" else None)
            page.goto(base + "/")
            sync_api.expect(page.locator("#info")).to_contain_text("8 images")
            # a run folder named "run" is shown with its parent's name: PARENT/run
            sync_api.expect(page.locator("#run")).to_have_text(re.compile(r"^run \S+/run · DualEncoder \(config pix\)$"))
            assert re.fullmatch(r"xmodal search · \S+/run", page.title()), page.title()
            sync_api.expect(page.locator("#drop")).to_be_visible()  # the model reads pixels

            # type a query, press Enter: a grid of scored images with ids
            page.fill("#q", "a red picture")
            page.press("#q", "Enter")
            cards = page.locator("#image-results .card")
            sync_api.expect(cards).to_have_count(8)  # k=20 in the page, capped at the 8 images
            sync_api.expect(page.locator("#status")).to_contain_text("8 results")
            page.wait_for_function("[...document.querySelectorAll('#image-results img')]"
                                   ".every(i => i.complete && i.naturalWidth > 0)")
            scores = [float(s) for s in cards.locator(".score").all_inner_texts()]
            assert scores == sorted(scores, reverse=True)
            ids = [json.loads(x) for x in (fx["table_index"] / "ids.jsonl").read_text().splitlines()]
            assert set(cards.locator(".id").all_inner_texts()) == set(ids)
            # each thumbnail is named by its caption, not only by its id
            assert set(cards.locator(".caption").all_inner_texts()) == {f"a {c} picture" for c in
                                                                      ("red", "green", "blue", "yellow")}
            page.screenshot(path=str(tmp_path / "text_search.png"), full_page=True)

            # a click enlarges a thumbnail (a larger rendering, with its captions); Escape closes it
            first_caption = cards.first.locator(".caption").inner_text()
            cards.first.locator("button.img").click()
            viewer = page.locator("#viewer")
            sync_api.expect(viewer).to_be_visible()
            sync_api.expect(page.locator("#viewer-title")).to_have_text(first_caption)
            assert "size=1024" in page.locator("#viewer-img").get_attribute("src")
            page.wait_for_function("(() => { const i = document.getElementById('viewer-img');"
                                   " return i.complete && i.naturalWidth > 0; })()")
            page.screenshot(path=str(tmp_path / "viewer.png"))
            page.keyboard.press("Escape")
            sync_api.expect(viewer).to_be_hidden()
            cards.nth(1).locator("button.img").click()
            sync_api.expect(viewer).to_be_visible()
            viewer.click()  # a click on the overlay closes it too
            sync_api.expect(viewer).to_be_hidden()

            # search by image through the file picker: the image finds itself, plus captions
            page.set_input_files("#file", str(fx["imgs"] / "sub" / "green1.png"))
            sync_api.expect(page.locator("#status")).to_contain_text("green1.png in")
            assert cards.first.locator(".caption").inner_text() == "a green picture"
            sync_api.expect(page.locator("ol.texts li")).to_have_count(8)
            page.screenshot(path=str(tmp_path / "image_search.png"), full_page=True)

            # a bad upload shows the server's message, and the page still works afterwards
            bad = tmp_path / "notes.png"
            bad.write_text("not an image")
            page.set_input_files("#file", str(bad))
            sync_api.expect(page.locator("#status.error")).to_contain_text("not a recognised image")
            page.fill("#q", "blue")
            page.click("button[type=submit]")
            sync_api.expect(cards).to_have_count(8)
            assert not [e for e in errors if "415" not in e], errors  # only the refused upload logs an error
        finally:
            browser.close()
    assert (tmp_path / "text_search.png").stat().st_size > 5000
    print(f"screenshots in {tmp_path}")


def test_cli_serves_and_reports_its_port(fx, server):
    """``python -m xmodal serve IDX --port 0``: prints the real URL, answers, and a busy port is one line."""
    import re
    import subprocess
    import sys

    proc = subprocess.Popen([sys.executable, "-m", "xmodal", "serve", str(fx["index"]), "--port", "0"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        line = proc.stderr.readline()
        m = re.search(r"http://127\.0\.0\.1:(\d+)/", line)
        assert m, line
        status, body = _get_json("127.0.0.1", int(m.group(1)), "/api/health")
        assert status == 200 and body["index_size"] == 8
    finally:
        proc.terminate()
        proc.wait(10)
    # the fixture's server holds its port: refused at once, before loading the model
    busy = subprocess.run([sys.executable, "-m", "xmodal", "serve", str(fx["index"]), "--port", str(server[1])],
                          capture_output=True, text=True, timeout=60)
    assert busy.returncode == 2 and "cannot listen on 127.0.0.1" in busy.stderr and "Traceback" not in busy.stderr
    # a non-loopback address is warned about (192.0.2.1 is a documentation address: binding fails)
    other = subprocess.run([sys.executable, "-m", "xmodal", "serve", str(fx["index"]), "--host", "192.0.2.1"],
                           capture_output=True, text=True, timeout=60)
    assert "warning: binding to 192.0.2.1, not a loopback address" in other.stderr
    assert other.returncode == 2 and "cannot listen" in other.stderr
