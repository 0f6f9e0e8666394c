"""Search: answer queries against an index with its run, re-rank shortlists, retrieve for a corpus.

* :mod:`.query`: :func:`search_text` / :func:`search_image`, the query encoders.
* :mod:`.rerank`: :class:`Reranker`, a pair scorer re-ordering an index's shortlist.
* :mod:`.corpus`: :func:`retrieve_corpus`, the best images for every sentence of a text file.

Index building lives in :mod:`xmodal.index.build`.
"""
from __future__ import annotations

from .corpus import corpus_signature, progress_path, retrieve_corpus
from .query import check_k, encode_image_queries, encode_text_queries, search_image, search_text
from .rerank import Reranker

__all__ = ["Reranker", "check_k", "corpus_signature", "encode_image_queries", "encode_text_queries",
           "progress_path", "retrieve_corpus", "search_image", "search_text"]
