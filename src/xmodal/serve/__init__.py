"""``xmodal serve``: an HTTP search API and web page over an xmodal index (see :mod:`.app`);
concurrent queries are answered in batches (:mod:`.batching`).

Needs the optional ``serve`` extra (``pip install 'xmodal[serve]'``): FastAPI, uvicorn and
python-multipart, imported only when an app is created.
"""
from __future__ import annotations

from .batching import BATCH_WAIT_MS, MAX_BATCH, MicroBatcher, check_batching
from .app import (MAX_K, MAX_QUERY_CHARS, MAX_UPLOAD_BYTES, READ_TIMEOUT, ApiError, SearchService, create_app,
                  http_protocol, is_loopback, load_service, require_server_packages, server_config)

__all__ = ["BATCH_WAIT_MS", "MAX_BATCH", "MicroBatcher", "check_batching", "MAX_K", "MAX_QUERY_CHARS", "MAX_UPLOAD_BYTES", "READ_TIMEOUT", "ApiError", "SearchService", "create_app",
           "http_protocol", "is_loopback", "load_service", "require_server_packages", "server_config"]
