"""The HTTP search service behind ``xmodal serve``: a FastAPI app over one image index.

:class:`SearchService` holds the index (and an optional caption index), the model loaded once,
and the locks that make concurrent requests safe; :func:`create_app` wraps it in FastAPI:

* ``GET /``                  the web page (``page.html``, self-contained, no CDN)
* ``GET /api/health``        liveness
* ``GET /api/info``          index sizes, modalities, model, limits
* ``GET /api/search?q=&k=``  text -> image over the image index
* ``POST /api/search/image`` an uploaded image (multipart field ``file``, or a raw ``image/*``
  body) -> images, and -> captions when a text index is served
* ``GET /api/thumb/{row}``   a JPEG thumbnail of an indexed image, resolved from the index
  metadata only (the client names a row number, never a path)

Every client error is a 4xx with ``{"error": {"code": ..., "message": ...}}``; unexpected
failures are logged and answered with a 500 of the same shape, and the server keeps serving.
FastAPI and uvicorn are optional (``pip install 'xmodal[serve]'``) and imported lazily.
"""

import io
import logging
import os
import tempfile
import threading
from collections import OrderedDict
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..errors import ConfigError, DataError, XmodalError, where
from ..index.build import EMOJI_MARK
from ..models.base import pixel_tower

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
#: Indexed images above this many pixels are not thumbnailed.
MAX_THUMB_SOURCE_PIXELS = 64_000_000
#: Metadata keys that hold server file-system paths: not sent to clients.
PRIVATE_KEYS = ("path", "folder")

INSTALL_HINT = "pip install 'xmodal[serve]'"


class ApiError(Exception):
    """A client error: HTTP ``status`` with a stable ``code`` and a readable ``message``."""

    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status, self.code, self.message = status, code, message


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

    Thread-safe: the model's encoders (and their tokenizer, which is not re-entrant) run under
    one lock, index searches under another, so a request's search overlaps the next one's encode.
    """

    def __init__(self, index: Any, run: Any, text_index: Any = None, *,
                 image_root: str | os.PathLike | None = None, reranker: Any = None) -> None:
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

        return {
            "index": describe(self.index),
            "text_index": describe(self.text_index),
            "model": {"type": type(self.model).__name__, "run": Path(ref["run"]).name if ref.get("run") else None,
                      "checkpoint": Path(str(ref.get("checkpoint", ""))).name or None,
                      "weights_sha256": ref.get("weights_sha256"),
                      "image_input": "pixels" if self.pixel_tower is not None else "features"},
            "reranker": None if self.reranker is None else {"type": type(self.reranker.model).__name__,
                                                            "k": self.reranker.k},
            "capabilities": {"text_search": True, "image_search": self.pixel_tower is not None,
                             "image_to_text": self.pixel_tower is not None and self.text_index is not None,
                             "thumbnails": True},
            "limits": {"max_query_chars": MAX_QUERY_CHARS, "max_k": MAX_K, "max_upload_bytes": MAX_UPLOAD_BYTES,
                       "max_upload_pixels": MAX_UPLOAD_PIXELS},
        }

    # -- search ------------------------------------------------------------------------
    def _results(self, index: Any, scores: np.ndarray, rows: np.ndarray, thumbs: bool) -> list[dict[str, Any]]:
        keep = rows >= 0
        rows = rows[keep]
        out = []
        for rank, (score, row, id_, meta) in enumerate(zip(scores[keep].tolist(), rows.tolist(), index.ids_of(rows),
                                                           index.metadata(rows)), 1):
            rec: dict[str, Any] = {"rank": rank, "score": round(float(score), 6), "row": int(row), "id": id_}
            rec.update({k: v for k, v in meta.items() if k not in rec and k not in PRIVATE_KEYS})
            if thumbs:
                rec["thumb"] = f"/api/thumb/{row}"
            out.append(rec)
        return out

    def _search(self, index: Any, query: np.ndarray, k: int, thumbs: bool) -> list[dict[str, Any]]:
        with self._search_lock:
            scores, rows = index.search(query, min(k, len(index)))
        return self._results(index, scores[0], rows[0], thumbs)

    def _reranked(self, index: Any, q: np.ndarray, query: Any, modality: str, k: int,
                  thumbs: bool) -> list[dict[str, Any]]:
        """The index's shortlist for ``q``, re-ordered by the pair scorer (two-stage search)."""
        with self._search_lock:
            first, rows = index.search(q, self.reranker.shortlist_size(k, index))
        with self._encode_lock:
            scores, rows = self.reranker.rerank(index, query, modality, rows[0], k, first_scores=first[0])
        return self._results(index, scores, rows, thumbs)

    @torch.inference_mode()
    def search_text(self, text: str, k: int) -> list[dict[str, Any]]:
        """Top-``k`` images for a text query (validated by the caller)."""
        with self._encode_lock:
            q = self.model.encode_text([text]).float().cpu().numpy()  # (1, D)
        if self.reranker is not None:
            return self._reranked(self.index, q, text, "text", k, thumbs=True)
        return self._search(self.index, q, k, thumbs=True)

    @torch.inference_mode()
    def search_image(self, image: Any, k: int) -> dict[str, list[dict[str, Any]]]:
        """Top-``k`` images (and captions, with a text index) for a decoded PIL image."""
        if self.pixel_tower is None:
            raise ApiError(400, "image_search_unavailable",
                           f"this index's model ({type(self.model.tower('image')).__name__}) reads precomputed "
                           "feature rows, not pixels: image queries need a pixel model")
        pixels = self.pixel_tower.preprocess(image)[None]  # (1, 3, H, W)
        with self._encode_lock:
            q = self.model.encode_image(pixels).float().cpu().numpy()  # (1, D)
        out = {"images": self._search(self.index, q, k, thumbs=True), "texts": []}
        if self.text_index is not None:
            if self.reranker is not None:
                out["texts"] = self._reranked(self.text_index, q, image, "image", k, thumbs=False)
            else:
                out["texts"] = self._search(self.text_index, q, k, thumbs=False)
        return out

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

    def thumbnail(self, row: int) -> bytes:
        """JPEG bytes of row ``row``'s image, at most :data:`THUMB_SIZE` pixels a side (cached)."""
        if not 0 <= row < len(self.index):
            raise ApiError(404, "row_out_of_range", f"row {row} out of range: the index has {len(self.index)} "
                                                    f"rows (0..{len(self.index) - 1})")
        with self._thumb_lock:
            if row in self._thumbs:
                self._thumbs.move_to_end(row)
                return self._thumbs[row]
        img = self._source_image(row).convert("RGB")
        img.thumbnail((THUMB_SIZE, THUMB_SIZE))
        buf = io.BytesIO()
        img.save(buf, "JPEG", quality=88)
        data = buf.getvalue()
        with self._thumb_lock:
            self._thumbs[row] = data
            while len(self._thumbs) > THUMB_CACHE:
                self._thumbs.popitem(last=False)
        return data


def load_service(index: str | os.PathLike, text_index: str | os.PathLike | None = None, *,
                 run: str | os.PathLike | None = None, image_root: str | os.PathLike | None = None,
                 rerank: str | os.PathLike | None = None, rerank_k: int = 100,
                 rerank_fusion: float | None = None) -> SearchService:
    """Open the index folders and load their model once (refusing a text index of another model).

    ``rerank``: a pair scorer's run folder that re-orders the top ``rerank_k`` of each search
    (by pair score + ``rerank_fusion`` x index score; default: that run's ``eval.rerank_fusion``).
    """
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
    return SearchService(ix, run_, tix, image_root=image_root, reranker=reranker)


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


def create_app(service: SearchService) -> Any:
    """The FastAPI app serving ``service`` (see the module docstring for the endpoints)."""
    require_server_packages()
    from fastapi import FastAPI

    app = FastAPI(title="xmodal search", version="1", summary="Cross-modal image-text search over an xmodal index.")
    page = _page()
    _add_error_handlers(app)
    _add_query_routes(app, service, page)
    _add_image_search_route(app, service)
    _add_thumb_route(app, service)
    app.state.service = service
    return app


def _add_error_handlers(app: Any) -> None:
    """Answer every failure with ``{"error": {"code", "message"}}`` (unexpected ones as a logged 500)."""
    from fastapi import Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import JSONResponse
    from starlette.exceptions import HTTPException as StarletteHTTPException

    def error(status: int, code: str, message: str) -> JSONResponse:
        # after a refused upload the rest of its body is unread: close the connection rather
        # than let the server drain (read) the remainder to reuse it
        headers = {"Connection": "close"} if status == 413 else None
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
        return error(exc.status_code, code, str(exc.detail))

    @app.exception_handler(XmodalError)
    async def _xmodal(request: Request, exc: XmodalError) -> JSONResponse:
        return error(400, "bad_request", str(exc))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return error(500, "internal_error", "internal server error (see the server log)")


def _add_query_routes(app: Any, service: SearchService, page: str) -> None:
    """``GET /``, ``/api/health``, ``/api/info`` and ``/api/search`` (text -> image)."""
    from fastapi import Query
    from fastapi.responses import HTMLResponse

    @app.get("/", response_class=HTMLResponse, include_in_schema=False)
    def index_page() -> HTMLResponse:
        return HTMLResponse(page, headers={"Cache-Control": "no-cache"})

    @app.get("/api/health", summary="Liveness")
    def health() -> dict[str, Any]:
        return {"status": "ok", "index_size": len(service.index)}

    @app.get("/api/info", summary="Index sizes, modalities, model and limits")
    def info() -> dict[str, Any]:
        return service.info()

    @app.get("/api/search", summary="Text -> image search")
    def search(q: str = Query(..., max_length=MAX_QUERY_CHARS, description="query text"),
               k: int = Query(10, ge=1, le=MAX_K, description="number of results")) -> dict[str, Any]:
        text = q.strip()
        if not text:
            raise ApiError(400, "empty_query", "q: empty query; give some text")
        return {"query": text, "k": k, "results": service.search_text(text, k)}


def _add_image_search_route(app: Any, service: SearchService) -> None:
    """``POST /api/search/image``: an uploaded image (multipart ``file`` or raw ``image/*`` body)."""
    from fastapi import Query, Request
    from starlette.concurrency import run_in_threadpool
    from starlette.datastructures import UploadFile
    from starlette.exceptions import HTTPException as StarletteHTTPException

    upload_doc = {"requestBody": {"required": True, "content": {
        "multipart/form-data": {"schema": {"type": "object", "required": ["file"],
                                           "properties": {"file": {"type": "string", "format": "binary"}}}},
        "image/*": {"schema": {"type": "string", "format": "binary"}}}}}

    @app.post("/api/search/image", summary="Image -> image (and -> caption) search", openapi_extra=upload_doc)
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
        chunks, size = [], 0
        async for chunk in request.stream():  # also bounds a chunked body with no Content-Length
            size += len(chunk)
            if size > cap:
                raise ApiError(413, "too_large", f"upload refused after {size:,} bytes: images up to "
                                                 f"{MAX_UPLOAD_BYTES // (1024 * 1024)} MB")
            chunks.append(chunk)
        return b"".join(chunks)

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
    from fastapi.responses import Response

    @app.get("/api/thumb/{row}", summary="Thumbnail (JPEG) of an indexed image",
             responses={200: {"content": {"image/jpeg": {}}}}, response_class=Response)
    def thumb(row: int = PathParam(..., ge=0, description="row number in the image index")) -> Response:
        return Response(service.thumbnail(row), media_type="image/jpeg",
                        headers={"Cache-Control": "public, max-age=3600"})


def is_loopback(host: str) -> bool:
    """True for ``localhost`` and loopback addresses (127.0.0.0/8, ::1)."""
    import ipaddress

    if host.lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False
