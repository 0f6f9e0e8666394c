"""Vector indexes: exact (torch) and FAISS (flat, IVF, HNSW) search over a folder of embeddings.

``Index`` is the entry point (``xmodal.Index``); see :mod:`.store` for the folder format and
commit scheme, :mod:`.exact` for blocked exact search and :mod:`.faiss_backend` for FAISS.
"""
from __future__ import annotations

from .exact import BACKENDS, METRICS, Backend, TopK, exact_search, list_backends
from .faiss_backend import auto_nlist, import_faiss
from .store import MAX_K, Index, read_manifest, recover, verify_files

__all__ = ["BACKENDS", "METRICS", "MAX_K", "Backend", "Index", "TopK", "auto_nlist", "exact_search",
           "import_faiss", "list_backends", "read_manifest", "recover", "verify_files"]
