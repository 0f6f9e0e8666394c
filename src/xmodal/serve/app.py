"""The HTTP search service behind ``xmodal serve``: a FastAPI app over one image index.

:class:`SearchService` holds the index (and an optional caption index), the model loaded once,
and the micro-batchers (:mod:`.batching`) that gather concurrent queries into one encode and one
index search; :func:`create_app` wraps it in FastAPI:

* ``GET /``                  the web page (``page.html``, self-contained, no CDN)
* ``GET /api/health``        liveness
* ``GET /api/info``          index sizes, modalities, model, limits
* ``GET /api/search?q=&k=``  text -> image over the image index
* ``POST /api/search/image`` an uploaded image (multipart field ``file``, or a raw ``image/*``
  body) -> images, and -> captions when a text index is served
* ``GET /api/thumb/{row}``   a JPEG thumbnail of an indexed image, resolved from the index
  metadata only (the client names a row number, never a path); ``?size=`` up to 1024 px for
  the page's enlarged view

Every client error is a 4xx with ``{"error": {"code": ..., "message": ...}}``; unexpected
failures are logged once (with their traceback) and answered with a 500 of the same shape,
and the server keeps serving. :func:`server_config` runs the app under uvicorn with
:func:`http_protocol`, which answers uvicorn's own errors (malformed HTTP) in that shape too
and times out requests whose headers or body stall (:data:`READ_TIMEOUT`). A client that
disconnects mid-upload is one log line. FastAPI and uvicorn are optional
(``pip install 'xmodal[serve]'``) and imported lazily.
"""

import asyncio
import io
import json
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from functools import lru_cache
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DataError, XmodalError, where
from ..index.build import EMOJI_MARK
from ..models.base import pixel_tower
from ..models.run import Run
from ..search.query import result_label
from .batching import BATCH_WAIT_MS, MAX_BATCH, MicroBatcher, check_batching

log = logging.getLogger(__name__)

#: Longest text query accepted (characters).
MAX_QUERY_CHARS = 1000
#: Largest ``k`` a client may ask for.
MAX_K = 100
#: Largest uploaded image (bytes); bigger requests are refused before their body is read.
MAX_UPLOAD_BYTES = 10 * 1024 * 1024
#: Room for the multipart envelope (boundaries, part headers) around the image bytes.
MULTIPART_OVERHEAD = 64 * 1024
#: Uploaded images above this many pixels are refused from their header, before decoding.
MAX_UPLOAD_PIXELS = 25_000_000
#: Longest side of a thumbnail, and how many encoded thumbnails are kept in memory.
THUMB_SIZE = 256
THUMB_CACHE = 2048
#: Sizes a client may ask for with ``/api/thumb/{row}?size=`` (the page's enlarged view);
#: only :data:`THUMB_SIZE` is cached.
MIN_THUMB_SIZE, MAX_THUMB_SIZE = 32, 1024
#: Indexed images above this many pixels are not thumbnailed.
MAX_THUMB_SOURCE_PIXELS = 64_000_000
#: Metadata keys that hold server file-system paths: not sent to clients.
PRIVATE_KEYS = ("path", "folder")
#: Seconds the server waits for the next piece of a request (its headers, or the next part of
#: an upload's body) before giving up on it: 408 in the JSON error shape, connection closed.
READ_TIMEOUT = 15.0
#: Set in a request's ASGI scope when :func:`http_protocol` refused the rest of it as malformed
#: HTTP (already logged by uvicorn: the handler then says nothing more about the disconnect).
BAD_HTTP_SCOPE_KEY = "xmodal.bad_http"

INSTALL_HINT = "pip install 'xmodal[serve]'"


class ApiError(Exception):
    """A client error: HTTP ``status`` with a stable ``code`` and a readable ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


class ClientGone(Exception):
    """The client closed its connection before its request was read (already logged)."""


def error_body(code: str, message: str) -> bytes:
    """The one JSON error shape, encoded: ``{"error": {"code": ..., "message": ...}}``."""
    return json.dumps({"error": {"code": code, "message": message}}, ensure_ascii=False,
                      separators=(",", ":")).encode("utf-8")


def require_server_packages() -> None:
    """Raise :class:`XmodalError` naming the extra to install when FastAPI / uvicorn are missing."""
    missing = []
    for mod, pkg in (("fastapi", "fastapi"), ("uvicorn", "uvicorn"), ("python_multipart", "python-multipart")):
        try:
            __import__(mod)
        except ImportError:
            missing.append(pkg)
    if missing:
        raise XmodalError(f"xmodal serve needs {', '.join(missing)} (not installed): {INSTALL_HINT}")


# ---------------------------------------------------------------------------------------------
# the service: model + indexes, no HTTP


class SearchService:
    """One image index (plus an optional text index of captions) and the model that built them.

    Thread-safe and batched: text queries from concurrent callers are gathered by one
    :class:`~.batching.MicroBatcher` (up to ``max_batch`` of them, waiting at most
    ``batch_wait_ms`` for more when the server is busy) into one ``encode_text`` call and one
    ``Index.search``; image queries by another. The model's encoders (and their tokenizer, which
    is not re-entrant) run under one lock, index searches under another, so one batch's search
    overlaps the next one's encode. ``max_batch=1`` answers each query on its own.
    """

    def __init__(self, index: Any, run: Any, text_index: Any = None, *,
                 image_root: str | os.PathLike | None = None, reranker: Any = None,
                 max_batch: int = MAX_BATCH, batch_wait_ms: float = BATCH_WAIT_MS) -> None:
        from ..index.build import check_embedding_model

        if index.modality != "image":
            raise ConfigError(f"{where(index.path)}a {index.modality} index; serve an image index as INDEX "
                              "(and a caption index with --text-index)")
        if len(index) == 0:
            raise ConfigError(f"{where(index.path)}the index is empty")
        if text_index is not None and text_index.modality != "text":
            raise ConfigError(f"{where(text_index.path)}--text-index must be a text (caption) index, "
                              f"this one holds {text_index.modality}s")
        if text_index is not None and text_index.dim != index.dim:
            raise ConfigError(f"{where(text_index.path)}dim {text_index.dim} differs from {index.path}'s "
                              f"{index.dim}: built by another model")
        self.index = index
        self.text_index = text_index
        self.run = check_embedding_model(run)
        self.model = self.run.model
        #: a :class:`xmodal.search.Reranker` re-ordering each shortlist with a pair scorer
        self.reranker = reranker
        try:
            self.pixel_tower = pixel_tower(self.model, "an image query")
        except ConfigError:
            self.pixel_tower = None
        self._encode_lock = threading.Lock()
        self._search_lock = threading.Lock()
        max_batch, batch_wait_ms = check_batching(max_batch, batch_wait_ms)
        self.text_batcher = MicroBatcher(self._text_batch, max_batch=max_batch, max_wait_ms=batch_wait_ms,
                                         name="text-queries")
        self.image_batcher = MicroBatcher(self._image_batch, max_batch=max_batch, max_wait_ms=batch_wait_ms,
                                          name="image-queries")
        self._thumbs: OrderedDict[int, bytes] = OrderedDict()
        self._thumb_lock = threading.Lock()
        self.image_root = Path(image_root).resolve() if image_root is not None else self._common_root()

    # -- info --------------------------------------------------------------------------
    def _common_root(self) -> Path | None:
        """The folder every indexed image file lies under (their resolved common path)."""
        folders, files = set(), []
        for meta in self.index.metadata(np.arange(len(self.index))):
            if meta.get("folder"):
                folders.add(str(Path(meta["folder"]).resolve()))
            elif meta.get("path") and EMOJI_MARK not in meta["path"]:
                files.append(str(Path(meta["path"]).resolve().parent))
        roots = sorted(folders) + files
        if not roots:
            return None
        try:
            return Path(os.path.commonpath(roots))
        except ValueError:  # paths on different drives
            return None

    def info(self) -> dict[str, Any]:
        """What the service searches: index sizes, model, which query kinds work, limits."""
        ref = self.index.model_ref or {}

        def describe(ix: Any) -> dict[str, Any] | None:
            if ix is None:
                return None
            return {"name": Path(ix.path).name, "size": len(ix), "modality": ix.modality, "dim": ix.dim,
                    "backend": ix.backend, "metric": ix.metric}

        run_path = self.run.path if isinstance(self.run, Run) else ref.get("run")
        config = self.run.config if isinstance(self.run, Run) else None
        return {
            "index": describe(self.index),
            "text_index": describe(self.text_index),
            "model": {"type": type(self.model).__name__, "run": run_label(run_path) if run_path else None,
                      "name": getattr(config, "name", None) or None,
                      "checkpoint": Path(str(ref.get("checkpoint", ""))).name or None,
                      "weights_sha256": ref.get("weights_sha256"),
                      "image_input": "pixels" if self.pixel_tower is not None else "features"},
            "reranker": None if self.reranker is None else {"type": type(self.reranker.model).__name__,
                                                            "k": self.reranker.k},
            "capabilities": {"text_search": True, "image_search": self.pixel_tower is not None,
                             "image_to_text": self.pixel_tower is not None and self.text_index is not None,
                             "thumbnails": True},
            "limits": {"max_query_chars": MAX_QUERY_CHARS, "max_k": MAX_K, "max_upload_bytes": MAX_UPLOAD_BYTES,
                       "max_upload_pixels": MAX_UPLOAD_PIXELS, "thumb_size": THUMB_SIZE,
                       "max_thumb_size": MAX_THUMB_SIZE},
            "batching": {"text": self.text_batcher.stats(), "image": self.image_batcher.stats()},
        }

    # -- search ------------------------------------------------------------------------
    def _results(self, index: Any, scores: np.ndarray, rows: np.ndarray, thumbs: bool) -> list[dict[str, Any]]:
        keep = rows >= 0
        rows = rows[keep]
        out = []
        for rank, (score, row, id_, meta) in enumerate(zip(scores[keep].tolist(), rows.tolist(), index.ids_of(rows),
                                                           index.metadata(rows)), 1):
            rec: dict[str, Any] = {"rank": rank, "score": round(float(score), 6), "row": int(row), "id": id_,
                                   "label": result_label(meta, id_)}
            rec.update({k: v for k, v in meta.items() if k not in rec and k not in PRIVATE_KEYS})
            if thumbs:
                rec["thumb"] = f"/api/thumb/{row}"
            out.append(rec)
        return out

    def _answer(self, index: Any, q: np.ndarray, ks: list[int], thumbs: bool,
                rerank: tuple[list[Any], str] | None = None) -> list[list[dict[str, Any]]]:
        """Each query's results from one ``index.search`` of the (B, D) batch ``q`` at the largest
        ``k`` asked (each row cut to its own ``k``). With ``rerank=(queries, modality)`` and a
        reranker, each query's shortlist is re-ordered by the pair scorer."""
        if rerank is None or self.reranker is None:
            with self._search_lock:
                scores, rows = index.search(q, min(max(ks), len(index)))  # (B, kmax) each
            return [self._results(index, scores[i, :k], rows[i, :k], thumbs) for i, k in enumerate(ks)]
        queries, modality = rerank
        sizes = [self.reranker.shortlist_size(k, index) for k in ks]
        with self._search_lock:
            first, rows = index.search(q, max(sizes))  # (B, n) each
        out = []
        for i, (k, n) in enumerate(zip(ks, sizes)):
            with self._encode_lock:
                s, r = self.reranker.rerank(index, queries[i], modality, rows[i, :n], k, first_scores=first[i, :n])
            out.append(self._results(index, s, r, thumbs))
        return out

    @torch.inference_mode()
    def _text_batch(self, items: list[tuple[str, int]]) -> list[list[dict[str, Any]]]:
        """One batch of text queries ``(text, k)``: one encode, one search."""
        texts = [text for text, _ in items]
        with self._encode_lock:
            q = self.model.encode_text(texts).float().cpu().numpy()  # (B, D)
        return self._answer(self.index, q, [k for _, k in items], True, rerank=(texts, "text"))

    @torch.inference_mode()
    def _image_batch(self, items: list[tuple[torch.Tensor, Any, int]]) -> list[dict[str, list[dict[str, Any]]]]:
        """One batch of image queries ``(pixels (3, H, W), image, k)``: one encode, one search per index."""
        pixels = torch.stack([px for px, _, _ in items])  # (B, 3, H, W)
        ks = [k for _, _, k in items]
        with self._encode_lock:
            q = self.model.encode_image(pixels).float().cpu().numpy()  # (B, D)
        images = self._answer(self.index, q, ks, True)
        texts: list[list[dict[str, Any]]] = [[] for _ in items]
        if self.text_index is not None:
            texts = self._answer(self.text_index, q, ks, False, rerank=([im for _, im, _ in items], "image"))
        return [{"images": im, "texts": tx} for im, tx in zip(images, texts)]

    def search_text(self, text: str, k: int) -> list[dict[str, Any]]:
        """Top-``k`` images for a text query (validated by the caller), batched with concurrent ones."""
        return self.text_batcher((text, k))

    def search_image(self, image: Any, k: int) -> dict[str, list[dict[str, Any]]]:
        """Top-``k`` images (and captions, with a text index) for a decoded PIL image, batched."""
        if self.pixel_tower is None:
            raise ApiError(400, "image_search_unavailable",
                           f"this index's model ({type(self.model.tower('image')).__name__}) reads precomputed "
                           "feature rows, not pixels: image queries need a pixel model")
        with torch.inference_mode():
            pixels = self.pixel_tower.preprocess(image)  # (3, H, W), on the caller's thread
        return self.image_batcher((pixels, image, k))

    # -- thumbnails --------------------------------------------------------------------
    def _source_image(self, row: int) -> Any:
        """The indexed image of ``row``, from its metadata; paths must stay under the indexed root."""
        from ..data.images import ImageLoadError, open_image

        meta = self.index.metadata(row)
        path = meta.get("path")
        if not path:
            raise ApiError(404, "no_image", f"row {row} ({self.index.ids_of(row)}) has no image file to show")
        if EMOJI_MARK in path:
            # the emoji dataset's virtual paths: <asset folder>/emoji:/<style>/<unified>
            from ..data import emoji

            asset, _, image_id = path.partition(EMOJI_MARK)
            try:
                return emoji.open_uri(emoji.URI_SCHEME + image_id, asset.rstrip("/\\") or "emoji")
            except DataError:
                log.warning("thumbnail of row %d: %s", row, path, exc_info=True)
                raise ApiError(404, "no_image", f"row {row}: no emoji {image_id!r} in the emoji pack") from None
        file = Path(path).resolve()
        roots = [Path(meta["folder"]).resolve()] if meta.get("folder") else []
        if self.image_root is not None:
            roots.append(self.image_root)
        if not any(file.is_relative_to(r) for r in roots):
            log.warning("thumbnail of row %d refused: %s is outside the indexed root", row, file)
            raise ApiError(403, "outside_root", f"row {row}: its image lies outside the indexed image folder")
        try:
            return open_image(file, max_pixels=MAX_THUMB_SOURCE_PIXELS)
        except ImageLoadError as e:
            raise ApiError(404, "no_image", f"row {row}: the indexed image cannot be read ({e.reason})") from None

    def thumbnail(self, row: int, size: int = THUMB_SIZE) -> bytes:
        """JPEG bytes of row ``row``'s image, at most ``size`` pixels a side (cached at
        :data:`THUMB_SIZE`; never enlarged beyond the image's own size)."""
        if not 0 <= row < len(self.index):
            raise ApiError(404, "row_out_of_range", f"row {row} out of range: the index has {len(self.index)} "
                                                    f"rows (0..{len(self.index) - 1})")
        cached = size == THUMB_SIZE
        if cached:
            with self._thumb_lock:
                if row in self._thumbs:
                    self._thumbs.move_to_end(row)
                    return self._thumbs[row]
        img = self._source_image(row).convert("RGB")
        img.thumbnail((size, size))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=88)
        data = buf.getvalue()
        if cached:
            with self._thumb_lock:
                self._thumbs[row] = data
                while len(self._thumbs) > THUMB_CACHE:
                    self._thumbs.popitem(last=False)
        return data


def run_label(run_path: str | Path) -> str:
    """A run's short name for people: its folder's name, with the parent's when the folder has a
    generic name (``runs/demo/run`` -> ``demo/run``)."""
    path = Path(run_path)
    return f"{path.parent.name}/{path.name}" if path.name in ("run", "best", "model") and path.parent.name else path.name


def load_service(index: str | os.PathLike, text_index: str | os.PathLike | None = None, *,
                 run: str | os.PathLike | None = None, image_root: str | os.PathLike | None = None,
                 rerank: str | os.PathLike | None = None, rerank_k: int = 100,
                 rerank_fusion: float | None = None, max_batch: int = MAX_BATCH,
                 batch_wait_ms: float = BATCH_WAIT_MS) -> SearchService:
    """Open the index folders and load their model once (refusing a text index of another model).

    ``rerank``: a pair scorer's run folder that re-orders the top ``rerank_k`` of each search
    (by pair score + ``rerank_fusion`` x index score; default: that run's ``eval.rerank_fusion``).
    ``max_batch`` / ``batch_wait_ms``: how concurrent queries are batched (:class:`SearchService`).
    """
    check_batching(max_batch, batch_wait_ms)  # before any model is loaded
    from ..index import Index
    from ..index.build import load_index_run, same_model

    ix = Index.open(index)
    run_ = load_index_run(ix, run)
    tix = None
    if text_index is not None:
        tix = Index.open(text_index)
        if ix.model_ref is not None and tix.model_ref is not None:
            diff = same_model(tix.model_ref, ix.model_ref)
            if diff is not None and diff != "run":  # a moved run keeps its hashes
                raise ConfigError(f"{where(tix.path)}built by another model than {ix.path} ({diff} differs)")
    reranker = None
    if rerank is not None:
        from ..models import load
        from ..search import Reranker

        reranker = Reranker(load(rerank), k=rerank_k, fusion=rerank_fusion)
    return SearchService(ix, run_, tix, image_root=image_root, reranker=reranker, max_batch=max_batch,
                         batch_wait_ms=batch_wait_ms)


# ---------------------------------------------------------------------------------------------
# HTTP


def _page() -> str:
    return (resources.files("xmodal.serve") / "page.html").read_text(encoding="utf-8")


def _decode_upload(data: bytes, filename: str) -> Any:
    """Decode uploaded bytes with :func:`open_image`'s checks (via a private temp file)."""
    from ..data.images import ImageLoadError, open_image

    fd, tmp = tempfile.mkstemp(prefix="xmodal-upload-")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        return open_image(tmp, max_pixels=MAX_UPLOAD_PIXELS)
    except ImageLoadError as e:
        if "not a recognised image" in e.reason:
            raise ApiError(415, "not_an_image", f"{filename or 'the upload'}: {e.reason}") from None
        raise ApiError(400, "bad_image", f"{filename or 'the upload'}: {e.reason}") from None
    finally:
        os.unlink(tmp)


# -- what the OpenAPI schema documents (plain JSON schemas: no pydantic models to import) ------

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["error"], "additionalProperties": False,
    "properties": {"error": {"type": "object", "required": ["code", "message"], "additionalProperties": False,
                             "properties": {"code": {"type": "string"}, "message": {"type": "string"}}}}}
RESULT_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["rank", "score", "row", "id", "label"], "additionalProperties": True,
    "properties": {
        "rank": {"type": "integer", "minimum": 1}, "score": {"type": "number"},
        "row": {"type": "integer", "minimum": 0}, "id": {"type": "string"},
        "label": {"type": "string", "description": "caption / name of the row, for people"},
        "captions": {"type": "array", "items": {"type": "string"}, "description": "an image's captions (up to 5)"},
        "caption": {"type": "string", "description": "a caption row's text"},
        "thumb": {"type": "string", "description": "URL of the image's thumbnail"}}}
RESULTS_SCHEMA: dict[str, Any] = {"type": "array", "items": RESULT_SCHEMA, "maxItems": MAX_K}
TEXT_SEARCH_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["query", "k", "results"], "additionalProperties": False,
    "properties": {"query": {"type": "string"}, "k": {"type": "integer", "minimum": 1, "maximum": MAX_K},
                   "results": RESULTS_SCHEMA}}
IMAGE_SEARCH_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["query", "k", "images", "texts"], "additionalProperties": False,
    "properties": {
        "query": {"type": "object", "required": ["filename", "width", "height"], "additionalProperties": False,
                  "properties": {"filename": {"type": "string"}, "width": {"type": "integer", "minimum": 1},
                                 "height": {"type": "integer", "minimum": 1}}},
        "k": {"type": "integer", "minimum": 1, "maximum": MAX_K}, "images": RESULTS_SCHEMA, "texts": RESULTS_SCHEMA}}
HEALTH_SCHEMA: dict[str, Any] = {
    "type": "object", "required": ["status", "index_size"], "additionalProperties": False,
    "properties": {"status": {"const": "ok"}, "index_size": {"type": "integer", "minimum": 1}}}
INFO_SCHEMA: dict[str, Any] = {
    "type": "object", "additionalProperties": False,
    "required": ["index", "text_index", "model", "reranker", "capabilities", "limits"],
    "properties": {"index": {"type": "object"}, "text_index": {"type": ["object", "null"]},
                   "model": {"type": "object", "required": ["type", "run", "name", "image_input"]},
                   "reranker": {"type": ["object", "null"]}, "capabilities": {"type": "object"},
                   "limits": {"type": "object"},
                   "batching": {"type": "object", "description": "per query kind: batches run, queries answered, "
                                                                 "mean and largest batch, max_batch, max_wait_ms"}}}
#: what each error status means, as documented per route
ERROR_DESCRIPTIONS = {
    400: "invalid request: a parameter, the multipart body or the image is malformed",
    403: "the row's image lies outside the indexed image folder",
    404: "no such row, or the row has no image",
    408: "the request body stalled (no data within the read time-out); the connection is closed",
    413: "the upload is larger than the limit; the connection is closed",
    415: "the upload is not an image, or is sent with another content type",
    500: "an unexpected server failure (logged); the server keeps serving",
}


def _documented(schema: dict[str, Any] | None, *errors: int, media_type: str = "application/json") -> dict:
    """``responses=`` for a route: its 200 answer and its error statuses, all in the JSON error
    shape (``4XX`` covers unknown routes and methods; FastAPI's 422 is never sent: 400 instead)."""
    body = {"content": {"application/json": {"schema": ERROR_SCHEMA}}}
    out: dict[int | str, Any] = {200: {"description": "OK", "content": {media_type: {"schema": schema or {}}}}}
    out.update({code: {"description": ERROR_DESCRIPTIONS[code], **body} for code in (*errors, 500)})
    out["4XX"] = {"description": "another client error (e.g. 405 method not allowed)", **body}
    return out


def create_app(service: SearchService, *, read_timeout: float = READ_TIMEOUT) -> Any:
    """The FastAPI app serving ``service`` (see the module docstring for the endpoints).

    ``read_timeout``: seconds an upload's body may stall between two reads before it is
    answered 408 and its connection closed (:func:`server_config` applies the same limit to
    request headers).
    """
    require_server_packages()
    from fastapi import FastAPI

    if isinstance(read_timeout, bool) or not isinstance(read_timeout, (int, float)) or not read_timeout > 0:
        raise ConfigError(f"read_timeout={read_timeout!r}: must be a positive number of seconds")
    app = FastAPI(title="xmodal search", version="1", summary="Cross-modal image-text search over an xmodal index.")
    page = _page()
    _add_error_handlers(app)
    app.add_middleware(FailureGuard)
    _add_query_routes(app, service, page)
    _add_image_search_route(app, service, float(read_timeout))
    _add_thumb_route(app, service)
    app.state.service = service
    app.state.read_timeout = float(read_timeout)
    return app


def _client(scope: dict[str, Any]) -> str:
    host_port = scope.get("client") or ("?", 0)
    return f"{host_port[0]}:{host_port[1]}"


class FailureGuard:
    """ASGI middleware (inside Starlette's outermost one): an unexpected exception is logged
    once, with its traceback, and answered ``500 internal_error`` in the JSON shape. It is not
    re-raised, so neither Starlette nor uvicorn logs it a second time."""

    def __init__(self, app: Any) -> None:
        self.app = app

    async def __call__(self, scope: dict[str, Any], receive: Any, send: Any) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = False

        async def send_(message: dict[str, Any]) -> None:
            nonlocal started
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, receive, send_)
        except Exception:
            log.exception("%s %s failed (client %s)", scope.get("method"), scope.get("path"), _client(scope))
            if started:  # the answer was cut short: nothing more can be said on this connection
                return
            body = error_body("internal_error", "internal server error (see the server log)")
            await send({"type": "http.response.start", "status": 500,
                        "headers": [(b"content-type", b"application/json"), (b"content-length", b"%d" % len(body)),
                                    (b"connection", b"close")]})
            await send({"type": "http.response.body", "body": body})


def _add_error_handlers(app: Any) -> None:
    """Answer every failure with ``{"error": {"code", "message"}}`` (unexpected ones as a logged 500)."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException
    from starlette.requests import ClientDisconnect

    def error(status: int, code: str, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
        # after a refused or stalled upload the rest of its body is unread: close the connection
        # rather than let the server drain (read) the remainder to reuse it
        headers = dict(headers or {})
        if status in (408, 413):
            headers["Connection"] = "close"
        return JSONResponse({"error": {"code": code, "message": message}}, status_code=status, headers=headers)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> JSONResponse:
        return error(exc.status, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        parts = []
        for e in exc.errors():
            loc = [str(x) for x in e.get("loc", ()) if x not in ("query", "path", "body")]
            parts.append(f"{'.'.join(loc) or 'request'}: {e.get('msg', 'invalid')}")
        return error(400, "invalid_request", "; ".join(parts))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return error(exc.status_code, code, str(exc.detail), exc.headers)  # 405 keeps its Allow header

    @app.exception_handler(ClientGone)
    async def _gone(request: Request, exc: ClientGone) -> JSONResponse:
        return error(400, "client_disconnected", str(exc))  # nobody reads it: uvicorn drops it

    @app.exception_handler(ClientDisconnect)
    async def _disconnect(request: Request, exc: ClientDisconnect) -> JSONResponse:
        log.warning("client %s disconnected during %s %s", _client(request.scope), request.method, request.url.path)
        return error(400, "client_disconnected", "the client disconnected")

    @app.exception_handler(XmodalError)
    async def _xmodal(request: Request, exc: XmodalError) -> JSONResponse:
        return error(400, "bad_request", str(exc))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:  # a failure of FailureGuard itself
        log.exception("%s %s failed", request.method, request.url.path)
        return error(500, "internal_error", "internal server error (see the server log)")


def _add_query_routes(app: Any, service: SearchService, page: str) -> None:
    """``GET /``, ``/api/health``, ``/api/info`` and ``/api/search`` (text -> image)."""
    from fastapi import Query
    from fastapi.responses import HTMLResponse

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index_page() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/api/health", summary="Liveness", response_model=None, responses=_documented(HEALTH_SCHEMA))
    def health() -> dict[str, Any]:
        return {"status": "ok", "index_size": len(service.index)}

    @app.get("/api/info", summary="Index sizes, modalities, model and limits", response_model=None,
             responses=_documented(INFO_SCHEMA))
    def info() -> dict[str, Any]:
        return service.info()

    @app.get("/api/search", summary="Text -> image search", response_model=None,
             responses=_documented(TEXT_SEARCH_SCHEMA, 400))
    def search(q: str = Query(..., max_length=MAX_QUERY_CHARS, json_schema_extra={"pattern": r"\S"},
                              description="query text (not blank)"),
               k: int = Query(10, ge=1, le=MAX_K, description="number of results")) -> dict[str, Any]:
        text = q.strip()
        if not text:
            raise ApiError(400, "empty_query", "q: empty query; give some text")
        # on a pool thread: it runs a batch of the waiting queries itself, or waits for the
        # thread that runs the batch holding its query
        return {"query": text, "k": k, "results": service.search_text(text, k)}


async def read_body(request: Any, cap: int, timeout: float) -> bytes:
    """The request body, at most ``cap`` bytes (else 413), waiting at most ``timeout`` seconds
    for each piece (else 408); a client that disconnects is logged in one line (:class:`ClientGone`)."""
    chunks: list[bytes] = []
    size = 0
    declared = request.headers.get("content-length")
    of = f" of {int(declared):,}" if declared and declared.isdigit() else ""
    while True:
        try:
            message = await asyncio.wait_for(request.receive(), timeout)
        except asyncio.TimeoutError:
            log.warning("client %s sent no data for %g s during %s %s (%s%s bytes received): answered 408",
                        _client(request.scope), timeout, request.method, request.url.path, f"{size:,}", of)
            raise ApiError(408, "body_timeout", f"the request body stalled: no data for {timeout:g} s after "
                                                f"{size:,} bytes") from None
        if message["type"] == "http.disconnect":
            if not request.scope.get(BAD_HTTP_SCOPE_KEY):
                log.warning("client %s disconnected during %s %s after %s%s bytes", _client(request.scope),
                            request.method, request.url.path, f"{size:,}", of)
            raise ClientGone(f"the client disconnected after {size:,} bytes")
        chunk = message.get("body", b"")
        size += len(chunk)
        if size > cap:  # also bounds a chunked body with no Content-Length
            raise ApiError(413, "too_large", f"upload refused after {size:,} bytes: images up to "
                                             f"{MAX_UPLOAD_BYTES // (1024 * 1024)} MB")
        chunks.append(chunk)
        if not message.get("more_body", False):
            return b"".join(chunks)


def _add_image_search_route(app: Any, service: SearchService, read_timeout: float) -> None:
    """``POST /api/search/image``: an uploaded image (multipart ``file`` or raw ``image/*`` body)."""
    from fastapi import Query, Request
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException as StarletteHTTPException

    upload_doc = {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                           "properties": {"file": {"type": "string", "format": "binary"}}}},
        "image/*": {"schema": {"type": "string", "format": "binary"}}}}}

    @app.post("/api/search/image", summary="Image -> image (and -> caption) search", openapi_extra=upload_doc,
              response_model=None, responses=_documented(IMAGE_SEARCH_SCHEMA, 400, 408, 413, 415))
    async def search_image(request: Request, k: int = Query(10, ge=1, le=MAX_K)) -> dict[str, Any]:
        body = await _read_capped(request)
        data, name = await _image_part(request, body)
        image = await run_in_threadpool(_decode_upload, data, name)
        result = await run_in_threadpool(service.search_image, image, k)
        return {"query": {"filename": name, "width": image.width, "height": image.height}, "k": k, **result}

    async def _read_capped(request: Request) -> bytes:
        cap = MAX_UPLOAD_BYTES + MULTIPART_OVERHEAD
        length = request.headers.get("content-length")
        if length is not None:
            if not length.isdigit():
                raise ApiError(400, "bad_content_length", f"Content-Length {length!r} is not a byte count")
            if int(length) > cap:
                raise ApiError(413, "too_large", f"upload of {int(length):,} bytes refused: images up to "
                                                 f"{MAX_UPLOAD_BYTES // (1024 * 1024)} MB")
        return await read_body(request, cap, read_timeout)

    async def _image_part(request: Request, body: bytes) -> tuple[bytes, str]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype.startswith("image/") or ctype == "application/octet-stream":
            data, name = body, ""
        elif ctype == "multipart/form-data":
            async def replay() -> dict[str, Any]:
                return {"type": "http.request", "body": body, "more_body": False}

            try:
                form = await Request(request.scope, replay).form(max_files=1, max_fields=8)
            except StarletteHTTPException as e:  # malformed multipart, too many parts
                raise ApiError(400, "bad_multipart", f"malformed multipart body: {e.detail}") from None
            part = form.get("file")
            if not isinstance(part, UploadFile):
                raise ApiError(400, "missing_file", "multipart body has no file field named 'file'")
            data, name = await part.read(), part.filename or ""
            await form.close()
        else:
            raise ApiError(415, "unsupported_media_type", f"Content-Type {ctype or '(none)'!r}: send "
                                                          "multipart/form-data with a 'file' field, or an image/* body")
        if len(data) > MAX_UPLOAD_BYTES:
            raise ApiError(413, "too_large", f"image of {len(data):,} bytes refused: images up to "
                                             f"{MAX_UPLOAD_BYTES // (1024 * 1024)} MB")
        if not data:
            raise ApiError(400, "empty_file", "the uploaded file is empty")
        return data, Path(name).name


def _add_thumb_route(app: Any, service: SearchService) -> None:
    """``GET /api/thumb/{row}``: a JPEG thumbnail of an indexed image."""
    from fastapi import Path as PathParam
    from fastapi import Query
    from fastapi.responses import Response

    jpeg = {"type": "string", "format": "binary"}

    @app.get("/api/thumb/{row}", summary="Thumbnail (JPEG) of an indexed image", response_class=Response,
             responses=_documented(jpeg, 400, 403, 404, media_type="image/jpeg"))
    def thumb(row: int = PathParam(..., ge=0, description="row number in the image index",
                                   json_schema_extra={"maximum": len(service.index) - 1}),  # documented: 404 above
              size: int = Query(THUMB_SIZE, ge=MIN_THUMB_SIZE, le=MAX_THUMB_SIZE,
                                description="longest side in pixels (the image is never enlarged)")) -> Response:
        return Response(service.thumbnail(row, size), media_type="image/jpeg",
                        headers={"Cache-Control": "public, max-age=3600"})


# -- running under uvicorn ---------------------------------------------------------------------


def server_config(app: Any, **kwargs: Any) -> Any:
    """A ``uvicorn.Config`` for ``app`` (from :func:`create_app`) with :func:`http_protocol`
    at the app's ``read_timeout``; ``kwargs`` go to ``uvicorn.Config`` (host, port, log_level...)."""
    import uvicorn

    read_timeout = getattr(app.state, "read_timeout", READ_TIMEOUT)
    kwargs.setdefault("timeout_keep_alive", 5)
    return uvicorn.Config(app, http=http_protocol(read_timeout), **kwargs)


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def _raw_response(status: int, reason: str, code: str, message: str) -> bytes:
    """A complete HTTP/1.1 error response in the JSON shape, closing the connection."""
    body = error_body(code, message)
    return (f"HTTP/1.1 {status} {reason}\r\ncontent-type: application/json\r\ncontent-length: {len(body)}\r\n"
            "connection: close\r\n\r\n").encode("ascii") + body


@lru_cache(maxsize=16)
def http_protocol(read_timeout: float = READ_TIMEOUT) -> type:
    """uvicorn's h11 HTTP/1.1 protocol, changed in two ways: its own error answers (malformed
    HTTP: 400) use the API's JSON error shape instead of plain text, and a connection whose
    request headers are not complete ``read_timeout`` seconds after they began (or after the
    connection opened) is closed: with a 408 in the JSON shape when part of them arrived,
    silently when nothing did (an idle pre-opened browser connection)."""
    import h11
    from uvicorn.protocols.http.h11_impl import H11Protocol

    class JsonErrorsH11Protocol(H11Protocol):
        header_timeout = float(read_timeout)
        header_timer: asyncio.TimerHandle | None = None

        def connection_made(self, transport: Any) -> None:
            super().connection_made(transport)
            self.header_timer = self.loop.call_later(self.header_timeout, self.headers_timed_out)

        def data_received(self, data: bytes) -> None:
            super().data_received(data)
            if self.conn.their_state is not h11.IDLE:  # a request's headers are complete
                self.cancel_header_timer()
            elif self.header_timer is None and self.conn.trailing_data[0]:  # the next request began
                self.header_timer = self.loop.call_later(self.header_timeout, self.headers_timed_out)

        def connection_lost(self, exc: Exception | None) -> None:
            self.cancel_header_timer()
            super().connection_lost(exc)

        def cancel_header_timer(self) -> None:
            if self.header_timer is not None:
                self.header_timer.cancel()
                self.header_timer = None

        def headers_timed_out(self) -> None:
            self.header_timer = None
            if self.transport.is_closing() or self.conn.their_state is not h11.IDLE:
                return
            received = len(self.conn.trailing_data[0])
            if received:
                client = "%s:%d" % self.client if self.client else "?"
                log.warning("client %s sent incomplete request headers (%d bytes) for %g s: answered 408",
                            client, received, self.header_timeout)
                self.transport.write(_raw_response(408, "Request Timeout", "header_timeout",
                                                   f"the request headers stalled: incomplete after "
                                                   f"{self.header_timeout:g} s"))
            self.transport.close()

        def send_400_response(self, msg: str) -> None:  # uvicorn's msg: "Invalid HTTP request received."
            if self.cycle is not None and not self.cycle.response_complete:  # the app is reading this request
                self.cycle.scope[BAD_HTTP_SCOPE_KEY] = True  # type: ignore[literal-required]
            try:
                body = error_body("bad_http_request", "malformed HTTP request: not valid HTTP/1.1")
                headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                           (b"connection", b"close")]
                self.transport.write(self.conn.send(h11.Response(status_code=400, headers=headers,
                                                                 reason=b"Bad Request")))
                self.transport.write(self.conn.send(h11.Data(data=body)))
                self.transport.write(self.conn.send(h11.EndOfMessage()))
            except h11.LocalProtocolError:  # a response had already begun: nothing more can be sent
                pass
            self.transport.close()

    return JsonErrorsH11Protocol
