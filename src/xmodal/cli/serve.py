"""``xmodal serve INDEX [--host 127.0.0.1] [--port 8000] [--text-index CAPTIONS.idx] [--read-timeout 15]
[--max-batch 32] [--batch-wait-ms 2] [--threads N]``."""
from __future__ import annotations

import logging
import sys

from . import arguments, command
from .search import rerank_arguments

log = logging.getLogger(__name__)


def _args(p) -> None:
    p.add_argument("index", help="image index folder written by xmodal index")
    p.add_argument("--text-index", default=None,
                   help="a caption index of the same model: image uploads also find captions")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1, this machine only)")
    p.add_argument("--port", type=int, default=8000, help="port (default 8000; 0 picks a free one)")
    p.add_argument("--run", default=None, help="the run folder, if it moved since the index was built")
    rerank_arguments(p)
    p.add_argument("--image-root", default=None,
                   help="folder thumbnails may be read from (default: the folder all indexed images share)")
    p.add_argument("--read-timeout", type=float, default=None, metavar="SECONDS",
                   help="longest wait for a request's headers, or for the next part of an upload, before the "
                        "server answers 408 and closes the connection (default 15)")
    p.add_argument("--max-batch", type=int, default=None, metavar="N",
                   help="most concurrent queries encoded and searched together in one batch (default 32; "
                        "1 answers each query on its own)")
    p.add_argument("--batch-wait-ms", type=float, default=None, metavar="MS",
                   help="under load, how long a batch waits for more queries before it runs (default 2; "
                        "a lone query never waits)")
    p.add_argument("--threads", type=int, default=None, metavar="N",
                   help="torch intra-op threads for the batched encodes (default: half the usable cores, at "
                        "least 1: the other half parses HTTP and writes JSON)")


@command("serve", help="serve an index over HTTP: a search API and a web page")
@arguments(_args)
def run(args) -> int:
    from ..errors import XmodalError
    from ..serve.app import (READ_TIMEOUT, create_app, is_loopback, load_service, require_server_packages,
                             server_config)
    from ..serve.batching import BATCH_WAIT_MS, MAX_BATCH, MAX_BATCH_LIMIT, MAX_WAIT_LIMIT_MS

    require_server_packages()  # before loading any model: say which extra is missing
    if not 0 <= args.port <= 65535:
        raise XmodalError(f"--port {args.port}: must be between 0 and 65535")
    read_timeout = READ_TIMEOUT if args.read_timeout is None else args.read_timeout
    if not 0 < read_timeout <= 3600:  # also refuses nan
        raise XmodalError(f"--read-timeout {args.read_timeout}: must be more than 0 and at most 3600 seconds")
    max_batch = MAX_BATCH if args.max_batch is None else args.max_batch
    if not 1 <= max_batch <= MAX_BATCH_LIMIT:
        raise XmodalError(f"--max-batch {args.max_batch}: must be between 1 and {MAX_BATCH_LIMIT}")
    wait_ms = BATCH_WAIT_MS if args.batch_wait_ms is None else args.batch_wait_ms
    if not 0 <= wait_ms <= MAX_WAIT_LIMIT_MS:  # also refuses nan
        raise XmodalError(f"--batch-wait-ms {args.batch_wait_ms}: must be between 0 and {MAX_WAIT_LIMIT_MS:g} ms")
    if args.threads is not None and not 1 <= args.threads <= 1024:
        raise XmodalError(f"--threads {args.threads}: must be between 1 and 1024")
    if not is_loopback(args.host):
        print(f"warning: binding to {args.host}, not a loopback address: anyone who can reach this machine "
              "can query the index and see its images (there is no authentication)", file=sys.stderr)
    sock = _bind(args.host, args.port)  # a busy port fails before the model loads
    try:
        service = load_service(args.index, args.text_index, run=args.run, image_root=args.image_root,
                               rerank=args.rerank, rerank_k=args.rerank_k,
                               rerank_fusion=args.rerank_fusion, max_batch=max_batch, batch_wait_ms=wait_ms)
        import torch

        torch.set_num_threads(args.threads if args.threads is not None else default_threads())
        app = create_app(service, read_timeout=read_timeout)
    except BaseException:
        sock.close()
        raise
    import uvicorn

    port = sock.getsockname()[1]
    host = f"[{args.host}]" if ":" in args.host else args.host
    print(f"serving {service.index.path} ({len(service.index)} images) on http://{host}:{port}/ "
          "(Ctrl-C to stop)", file=sys.stderr, flush=True)
    config = server_config(app, log_level="info" if args.verbose else "warning", access_log=bool(args.verbose))
    uvicorn.Server(config).run(sockets=[sock])
    return 0


def default_threads() -> int:
    """Half the cores this process may use, at least 1: with the batched encodes on one worker
    thread, more intra-op threads than that compete with HTTP handling (and, on a shared
    machine, with other processes: a busy-waiting thread team can then be many times slower)."""
    import os

    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not on Linux
        cores = os.cpu_count() or 1
    return max(1, cores // 2)


def _bind(host: str, port: int):
    """A listening socket, bound here so that a busy port is a one-line error and port 0 is reported."""
    import socket

    from ..errors import XmodalError

    try:
        infos = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM, flags=socket.AI_PASSIVE)
    except socket.gaierror as e:
        raise XmodalError(f"--host {host!r}: cannot resolve ({e.strerror})") from None
    family, _, _, _, addr = infos[0]
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind(addr)
        sock.listen(2048)
    except OSError as e:
        sock.close()
        raise XmodalError(f"cannot listen on {host}:{port}: {e.strerror}") from None
    sock.set_inheritable(True)
    return sock
