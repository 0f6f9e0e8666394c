"""``xmodal serve``'s API through FastAPI's TestClient, on a tiny pixel-model run and its indexes."""
from __future__ import annotations

import io
import json
from pathlib import Path

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'xmodal[serve]')")
pytest.importorskip("httpx", reason="FastAPI's TestClient needs httpx")

from fastapi.testclient import TestClient  # noqa: E402
from PIL import Image  # noqa: E402

from xmodal.cli import main  # noqa: E402
from xmodal.serve import MAX_UPLOAD_BYTES, create_app, is_loopback, load_service  # noqa: E402

from image_fixtures import train_pixel_run  # noqa: E402


def build_pixel_fixture(root: Path, table_index: bool = False) -> dict[str, Path]:
    """A frozen EfficientNet-lite0 (64 px) + BiGRU run on 8 coloured PNGs; an image index of the
    folder and a caption index (and, with ``table_index``, an image index of the table dataset,
    whose rows store their captions)."""
    imgs, run = train_pixel_run(root)
    assert main(["index", str(run), "--data", str(imgs), "--out", str(root / "images.idx"), "--no-progress"]) == 0
    assert main(["index", str(run), "--data", f"table:{root / 'data.csv'}:all", "--out", str(root / "caps.idx"),
                 "--modality", "text", "--no-progress"]) == 0
    out = {"imgs": imgs, "run": run, "index": root / "images.idx", "text_index": root / "caps.idx"}
    if table_index:
        assert main(["index", str(run), "--data", f"table:{root / 'data.csv'}:all", "--out",
                     str(root / "table.idx"), "--no-progress"]) == 0
        out["table_index"] = root / "table.idx"
    return out


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return build_pixel_fixture(tmp_path_factory.mktemp("serve"), table_index=True)


@pytest.fixture(scope="module")
def client(fx):
    service = load_service(fx["index"], fx["text_index"])
    with TestClient(create_app(service)) as c:
        yield c


def _png(rgb=(20, 20, 220), size=(48, 48)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", size, rgb).save(buf, "PNG")
    return buf.getvalue()


def _error(resp, status: int, match: str) -> dict:
    assert resp.status_code == status, resp.text
    body = resp.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message"}, body
    assert match in body["error"]["message"], body
    return body["error"]


def _still_serving(client) -> None:
    resp = client.get("/api/search", params={"q": "a red picture", "k": 3})
    assert resp.status_code == 200 and len(resp.json()["results"]) == 3


def test_page_health_info_openapi(client):
    resp = client.get("/")
    assert resp.status_code == 200 and resp.headers["content-type"].startswith("text/html")
    assert 'id="q"' in resp.text and "/api/search" in resp.text
    assert "http://" not in resp.text and "https://" not in resp.text  # self-contained: no CDN
    assert client.get("/api/health").json() == {"status": "ok", "index_size": 8}
    info = client.get("/api/info").json()
    assert info["index"]["size"] == 8 and info["index"]["modality"] == "image"
    assert info["text_index"]["size"] == 8 and info["text_index"]["modality"] == "text"
    assert info["model"]["type"] == "DualEncoder" and info["model"]["image_input"] == "pixels"
    # the folder's name (with its parent's for a generic "run"), never the full path
    run_name = info["model"]["run"]
    assert run_name.endswith("run") and run_name.count("/") <= 1 and not run_name.startswith("/")
    assert info["model"]["name"] == "pix"  # the run's config name; the page's header shows both
    assert info["limits"]["max_thumb_size"] == 1024
    assert info["capabilities"] == {"text_search": True, "image_search": True, "image_to_text": True,
                                    "thumbnails": True}
    schema = client.get("/openapi.json").json()
    assert {"/api/search", "/api/search/image", "/api/thumb/{row}", "/api/info", "/api/health"} <= set(schema["paths"])
    assert "multipart/form-data" in schema["paths"]["/api/search/image"]["post"]["requestBody"]["content"]
    # the schema documents the errors as they are sent: 400 in the JSON shape, never FastAPI's 422
    search_op = schema["paths"]["/api/search"]["get"]["responses"]
    assert "422" not in search_op and search_op["400"]["content"]["application/json"]["schema"]["required"] == ["error"]
    assert {"408", "413", "415"} <= set(schema["paths"]["/api/search/image"]["post"]["responses"])


def test_text_search_matches_library(client, fx):
    from xmodal.index import Index
    from xmodal.index.build import load_index_run
    from xmodal.search import search_text

    resp = client.get("/api/search", params={"q": "  a blue picture ", "k": 5})
    assert resp.status_code == 200
    body = resp.json()
    assert body["query"] == "a blue picture" and body["k"] == 5
    res = body["results"]
    assert [r["rank"] for r in res] == [1, 2, 3, 4, 5]
    assert [r["score"] for r in res] == sorted((r["score"] for r in res), reverse=True)
    assert all(r["thumb"] == f"/api/thumb/{r['row']}" for r in res)
    # server file-system paths are not sent to clients
    assert all("path" not in r and "folder" not in r for r in res)
    index = Index.open(fx["index"])
    lib = search_text(index, load_index_run(index), "a blue picture", 5)
    assert [r["id"] for r in res] == [r["id"] for r in lib]
    assert [r["score"] for r in res] == pytest.approx([r["score"] for r in lib], abs=1e-5)
    # k above the index size is capped at it
    assert len(client.get("/api/search", params={"q": "red", "k": 100}).json()["results"]) == 8


def test_image_upload_search(client, fx):
    data = (fx["imgs"] / "sub" / "blue1.png").read_bytes()
    resp = client.post("/api/search/image", params={"k": 3}, files={"file": ("blue1.png", data, "image/png")})
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["query"] == {"filename": "blue1.png", "width": 48, "height": 48}
    top = body["images"][0]
    assert top["id"] == "sub/blue1.png" and top["score"] == pytest.approx(1.0, abs=1e-4)  # finds itself
    assert len(body["images"]) == 3 and len(body["texts"]) == 3
    assert all("caption" in t and "thumb" not in t for t in body["texts"])
    # a raw image/* body works too, with the same answer
    raw = client.post("/api/search/image?k=3", content=data, headers={"content-type": "image/png"})
    assert raw.status_code == 200 and raw.json()["images"][0]["id"] == "sub/blue1.png"


def test_thumbnails(client, fx):
    ids = [json.loads(x) for x in (fx["index"] / "ids.jsonl").read_text().splitlines()]
    row = ids.index("sub/red1.png")
    resp = client.get(f"/api/thumb/{row}")
    assert resp.status_code == 200 and resp.headers["content-type"] == "image/jpeg"
    img = Image.open(io.BytesIO(resp.content))
    assert img.size == (48, 48)
    r, g, b = img.convert("RGB").getpixel((40, 40))
    assert r > 180 and g < 80 and b < 80  # the red picture
    assert client.get(f"/api/thumb/{row}").content == resp.content  # cached, same bytes


@pytest.mark.parametrize("params, match", [
    ({"q": ""}, "empty query"),
    ({"q": "   "}, "empty query"),
    ({}, "q: Field required"),
    ({"q": "x" * 1001}, "at most 1000 characters"),
    ({"q": "red", "k": 0}, "k: Input should be greater than or equal to 1"),
    ({"q": "red", "k": 10**6}, "k: Input should be less than or equal to 100"),
    ({"q": "red", "k": "ten"}, "k: Input should be a valid integer"),
])
def test_bad_text_queries(client, params, match):
    _error(client.get("/api/search", params=params), 400, match)
    _still_serving(client)


def test_bad_uploads(client):
    big = b"\x89PNG" + b"\0" * (50 * 1024 * 1024)
    err = _error(client.post("/api/search/image", files={"file": ("big.png", big, "image/png")}), 413, "10 MB")
    assert err["code"] == "too_large"
    # just over the limit, as a raw body
    _error(client.post("/api/search/image", content=b"\0" * (MAX_UPLOAD_BYTES + 1),
                       headers={"content-type": "image/png"}), 413, "10 MB")
    # a chunked body with no Content-Length is refused at the cap (TestClient buffers the body
    # itself; test_serve_browser.py checks over a real socket that the server stops reading)
    def chunks():
        for _ in range(40):
            yield b"\0" * (1024 * 1024)

    _error(client.post("/api/search/image", content=chunks(), headers={"content-type": "image/png"}), 413, "refused")
    err = _error(client.post("/api/search/image", files={"file": ("notes.txt", b"hello, not an image", "text/plain")}),
                 415, "not a recognised image")
    assert err["code"] == "not_an_image" and "notes.txt" in err["message"]
    _error(client.post("/api/search/image", files={"file": ("x.png", _png()[:60], "image/png")}), 400, "x.png")
    _error(client.post("/api/search/image", files={"file": ("e.png", b"", "image/png")}), 400, "empty")
    _error(client.post("/api/search/image", files={"other": ("x.png", _png(), "image/png")}), 400, "'file'")
    _error(client.post("/api/search/image", content=b'{"a": 1}', headers={"content-type": "application/json"}),
           415, "multipart/form-data")
    _error(client.post("/api/search/image", params={"k": 0}, files={"file": ("x.png", _png(), "image/png")}),
           400, "k:")
    # a decompression bomb: a tiny file declaring a huge canvas is refused from its header
    buf = io.BytesIO()
    Image.new("1", (6000, 6000)).save(buf, "PNG")
    _error(client.post("/api/search/image", files={"file": ("bomb.png", buf.getvalue(), "image/png")}),
           400, "oversized")
    _still_serving(client)
    ok = client.post("/api/search/image", files={"file": ("q.png", _png(), "image/png")})
    assert ok.status_code == 200 and ok.json()["images"]


def test_bad_thumb_requests(client):
    _error(client.get("/api/thumb/8"), 404, "out of range")
    _error(client.get("/api/thumb/-1"), 400, "row:")
    _error(client.get("/api/thumb/abc"), 400, "row: Input should be a valid integer")
    # an encoded "/" is decoded before routing: the path no longer matches the route
    _error(client.get("/api/thumb/..%2F..%2Fetc%2Fpasswd"), 404, "Not Found")
    _error(client.get("/api/thumb/..%2E"), 400, "row:")
    _error(client.get("/api/thumb/1.5"), 400, "row:")
    # dot segments never reach a handler with a path: at most an unknown route
    resp = client.get("/api/thumb/../../etc/passwd")
    assert resp.status_code == 404 and "root:" not in resp.text and resp.json()["error"]["code"] == "not_found"
    _error(client.get("/api/nope"), 404, "Not Found")
    _error(client.post("/api/search", params={"q": "x"}), 405, "Method Not Allowed")
    _still_serving(client)


def test_thumb_refuses_paths_outside_the_indexed_root(fx, tmp_path):
    """An index whose metadata points outside its folder (edited, or a symlink) serves no such file."""
    import shutil

    idx = tmp_path / "evil.idx"
    shutil.copytree(fx["index"], idx)
    secret = tmp_path / "secret.png"
    Image.new("RGB", (8, 8), "black").save(secret)
    meta_file = idx / "metadata.jsonl"
    lines = meta_file.read_text().splitlines()
    m = json.loads(lines[0])
    m["path"] = str(Path(m["folder"]) / ".." / ".." / "secret.png")
    lines[0] = json.dumps(m)
    meta_file.write_text("\n".join(lines) + "\n")
    # the manifest records file hashes: rewrite it through the store's own verification switch
    from xmodal.index import Index

    index = Index.open(idx, verify=False)
    from xmodal.index.build import load_index_run
    from xmodal.serve import SearchService

    service = SearchService(index, load_index_run(index), image_root=fx["imgs"])
    with TestClient(create_app(service)) as c:
        _error(c.get("/api/thumb/0"), 403, "outside the indexed image folder")
        assert c.get("/api/thumb/1").status_code == 200


def test_feature_model_has_no_image_search(tmp_path):
    """A run reading precomputed features: text search works, uploads get a clear 400."""
    from train_fixtures import write_synthetic_precomp, write_tiny_config

    data = write_synthetic_precomp(tmp_path / "data")
    cfg = write_tiny_config(tmp_path / "tiny.yaml", data, steps=5)
    assert main(["train", str(cfg), "--out", str(tmp_path / "run"), "--no-progress"]) == 0
    assert main(["index", str(tmp_path / "run"), "--data", "split:test", "--out", str(tmp_path / "t.idx"),
                 "--no-progress"]) == 0
    with TestClient(create_app(load_service(tmp_path / "t.idx"))) as c:
        assert c.get("/api/info").json()["capabilities"]["image_search"] is False
        assert c.get("/api/search", params={"q": "a red circle"}).status_code == 200
        _error(c.post("/api/search/image", files={"file": ("q.png", _png(), "image/png")}), 400, "feature rows")
        _error(c.get("/api/thumb/0"), 404, "no image file")


def test_cli_errors(fx, capsys, monkeypatch):
    assert is_loopback("127.0.0.1") and is_loopback("localhost") and is_loopback("::1")
    assert not is_loopback("0.0.0.0") and not is_loopback("192.168.1.10")
    # a caption index as INDEX is refused with a hint
    assert main(["serve", str(fx["text_index"]), "--port", "0"]) == 2
    assert "serve an image index" in capsys.readouterr().err
    assert main(["serve", str(fx["index"]), "--text-index", str(fx["index"])]) == 2
    assert "must be a text" in capsys.readouterr().err
    assert main(["serve", str(fx["index"]), "--port", "70000"]) == 2
    # without the extra installed: one line naming it
    import builtins

    real_import = builtins.__import__

    def no_fastapi(name, *a, **kw):
        if name == "fastapi" or name.startswith("fastapi."):
            raise ImportError(name)
        return real_import(name, *a, **kw)

    monkeypatch.setattr(builtins, "__import__", no_fastapi)
    assert main(["serve", str(fx["index"])]) == 2
    assert "pip install 'xmodal[serve]'" in capsys.readouterr().err


def test_emoji_thumbnails(fx, tmp_path):
    """Emoji dataset rows have virtual paths (``<assets>/emoji:/<style>/<unified>``): served from the pack."""
    import numpy as np

    from xmodal.data import emoji
    from xmodal.index import Index
    from xmodal.index.build import load_index_run
    from xmodal.serve import SearchService

    model = load_index_run(Index.open(fx["index"]))
    base = str(emoji.default_path())
    meta = [{"dataset": "emoji", "split": "test", "image_id": "google/1F642", "path": f"{base}/emoji:/google/1f642"},
            {"dataset": "emoji", "split": "test", "image_id": "google/ZZZZ", "path": f"{base}/emoji:/google/zzzz"}]
    vecs = np.random.default_rng(0).standard_normal((2, 16)).astype(np.float32)
    vecs /= np.linalg.norm(vecs, axis=1, keepdims=True)
    with Index.create(tmp_path / "emoji.idx", dim=16, modality="image") as index:
        index.add(vecs, ["test/google/1F642", "test/google/ZZZZ"], meta)
    with TestClient(create_app(SearchService(Index.open(tmp_path / "emoji.idx"), model))) as c:
        resp = c.get("/api/thumb/0")
        assert resp.status_code == 200
        img = Image.open(io.BytesIO(resp.content)).convert("RGB")
        want = emoji.open_uri("emoji://google/1f642", base)
        assert img.size == want.size == (64, 64)
        diff = np.abs(np.asarray(img, np.int16) - np.asarray(want, np.int16)).mean()
        assert diff < 6, diff  # the same emoji, up to JPEG loss
        err = _error(c.get("/api/thumb/1"), 404, "no emoji 'google/zzzz'")
        assert base not in err["message"]  # no server paths in messages
        # rows indexed before captions were stored are named from the emoji pack, not by code
        res = c.get("/api/search", params={"q": "smile", "k": 2}).json()["results"]
        labels = {r["id"]: r["label"] for r in res}
        assert labels == {"test/google/1F642": "slightly smiling face", "test/google/ZZZZ": "google/ZZZZ"}


def test_results_carry_captions_and_names(fx):
    """Images indexed from a dataset carry their captions; the label names each result for people."""
    service = load_service(fx["table_index"])
    with TestClient(create_app(service)) as c:
        res = c.get("/api/search", params={"q": "a red picture", "k": 8}).json()["results"]
        assert len(res) == 8
        for r in res:
            colour = Path(r["image_id"]).stem.rstrip("01")
            assert r["captions"] == [f"a {colour} picture"] and r["label"] == f"a {colour} picture"
            assert "path" not in r and "folder" not in r
        data = (fx["imgs"] / "sub" / "blue1.png").read_bytes()
        body = c.post("/api/search/image", params={"k": 2}, files={"file": ("b.png", data, "image/png")}).json()
        assert body["images"][0]["label"] == "a blue picture"
    # a folder index: the file name (no captions)
    with TestClient(create_app(load_service(fx["index"]))) as c:
        res = c.get("/api/search", params={"q": "red", "k": 8}).json()["results"]
        assert {r["label"] for r in res} == {f"{n}{j}.png" for n in ("red", "green", "blue", "yellow") for j in (0, 1)}
        assert all("captions" not in r for r in res)


def test_page_shows_captions_viewer_and_run(client):
    html = client.get("/").text
    for needle in ('id="run"', 'id="viewer"', 'role="dialog"', "Escape", "captionsOf", "max_thumb_size",
                   'className = "caption"'):
        assert needle in html, needle


def test_thumbnail_sizes(client, fx):
    big = client.get("/api/thumb/0", params={"size": 1024})
    assert big.status_code == 200 and Image.open(io.BytesIO(big.content)).size[1] == 48  # never enlarged
    small = client.get("/api/thumb/0", params={"size": 32})
    assert small.status_code == 200 and max(Image.open(io.BytesIO(small.content)).size) == 32
    assert client.get("/api/thumb/0").content == client.get("/api/thumb/0", params={"size": 256}).content
    _error(client.get("/api/thumb/0", params={"size": 4096}), 400, "size:")
    _error(client.get("/api/thumb/0", params={"size": 8}), 400, "size:")


def test_unexpected_failure_is_one_logged_500(fx, caplog):
    """An exception in a handler: a JSON 500, logged once with its traceback; the server goes on."""
    service = load_service(fx["index"])
    real = service.search_text
    calls = []

    def flaky(text, k):
        calls.append(text)
        if len(calls) == 1:
            raise RuntimeError("boom")
        return real(text, k)

    service.search_text = flaky
    with TestClient(create_app(service)) as c, caplog.at_level("WARNING"):
        err = _error(c.get("/api/search", params={"q": "red"}), 500, "internal server error")
        assert err["code"] == "internal_error" and "boom" not in err["message"]
        tracebacks = [r for r in caplog.records if r.exc_info]
        assert len(tracebacks) == 1 and "GET /api/search failed" in tracebacks[0].getMessage()
        _still_serving(c)
