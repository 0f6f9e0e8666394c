"""Evaluation reports: what ``xmodal demo`` and ``xmodal eval --report`` leave behind for people.

:func:`write_report` writes into one folder

- ``report.html``   one self-contained page (images are base64 data URIs, no external JS/CSS/URLs),
  in this order: a summary of the run (towers, loss, steps, best step, embedding size), the
  metrics of the evaluated split and the validation metrics, the training curves, the Recall@K
  curve, text->image and image->text examples (each query's top 5, correct ones in green, and the
  rank of its first correct item, so a query that missed says where its answer was), and a
  key/value table of run information. Every part is optional: a section whose data is missing is
  left out (or says why), so a config-only model without ``metrics.jsonl`` or a dataset of
  features without images still gets a page.
- ``training_curves.png``  training loss and validation rsum per step (from ``metrics.jsonl``);
- ``recall_curve.png``  Recall@K for K = 1..max(50, largest rank + 1), both directions, log-x;
- ``queries.png``  the text->image query grid as a picture.

``metrics.json`` is the caller's job. :func:`format_table` / :func:`print_metrics` render the same
numbers for the terminal (rich; ``xmodal eval`` and ``xmodal evaluate-embeddings`` both print
this one table) and :func:`metrics_markdown` for docs. :func:`read_metrics_log` reads a run's
``metrics.jsonl``.

Ranks are per query and 0-based: the position of the first correct item in the ranking
(0 = retrieved first), so ``R@K = 100 * mean(rank < K)``. A non-finite rank (a query with no
positive) counts as never retrieved. Example queries carry ``first_correct_rank`` instead, 1-based
as people read it (1 = the first result is correct).
"""
from __future__ import annotations

import base64
import datetime as _dt
import html
import io
import json
import logging
import math
import os
import tempfile
import textwrap
import unicodedata
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageOps
from rich.console import Console
from rich.table import Table

log = logging.getLogger(__name__)

__all__ = [
    "write_report",
    "read_metrics_log",
    "recall_curve",
    "curve_ks",
    "format_table",
    "print_metrics",
    "metrics_markdown",
    "METRIC_KEYS",
]

# Column order shared by the HTML, rich and markdown tables: (label, key suffix, kind).
_COLUMNS: tuple[tuple[str, str, str], ...] = (
    ("R@1", "r1", "recall"),
    ("R@5", "r5", "recall"),
    ("R@10", "r10", "recall"),
    ("medR", "medr", "rank"),
    ("meanR", "meanr", "rank"),
)
_DIRECTIONS: tuple[tuple[str, str], ...] = (
    ("i2t", "image \u2192 text"),
    ("t2i", "text \u2192 image"),
)
METRIC_KEYS: tuple[str, ...] = tuple(
    f"{d}_{suffix}" for d, _ in _DIRECTIONS for _, suffix, _ in _COLUMNS
) + ("rsum",)

THUMB_PX = 96  # thumbnails are fitted into a THUMB_PX x THUMB_PX square
TOP_N = 5  # results shown per query
MAX_QUERIES = 24  # keeps report.html small (each query embeds TOP_N JPEG thumbnails)
_MIN_KMAX = 50
_MAX_CURVE_POINTS = 2000  # beyond this the K grid becomes geometric; the plot is log-x anyway
_GREEN = "#1a9850"
_RED = "#d73027"
_COLORS = {"i2t": "#2166ac", "t2i": "#e08214"}


# --------------------------------------------------------------------------- numbers


def _as_ranks(ranks: Any, name: str = "ranks") -> np.ndarray:
    """Validate per-query 0-based ranks into a 1-D float array (inf = never retrieved)."""
    arr = np.asarray(ranks, dtype=np.float64).reshape(-1)  # (Q,)
    if arr.size == 0:
        raise ValueError(f"{name} is empty")
    arr = np.where(np.isnan(arr), np.inf, arr)
    if (arr < 0).any():
        raise ValueError(f"{name} must be 0-based ranks (>= 0); got min {arr.min():g}")
    return arr


def recall_curve(ranks: Any, ks: Any) -> np.ndarray:
    """Recall@K in percent for every K in ``ks``: ``100 * mean(ranks < K)``.

    ``ranks`` are per-query 0-based ranks of the first correct item; NaN/inf count as misses.
    Sorting once makes each K a binary search, so long K grids over large query sets are cheap.
    """
    r = np.sort(_as_ranks(ranks))  # (Q,)
    k = np.asarray(ks, dtype=np.float64).reshape(-1)  # (nK,)
    hits = np.searchsorted(r, k, side="left")  # number of ranks strictly below each K
    return 100.0 * hits / r.size


def curve_ks(*rank_arrays: np.ndarray | None) -> np.ndarray:
    """The K grid for the curve: 1..max(50, largest finite rank + 1), geometric when long."""
    kmax = _MIN_KMAX
    for ranks in rank_arrays:
        if ranks is None:
            continue
        finite = ranks[np.isfinite(ranks)]
        if finite.size:
            kmax = max(kmax, int(math.floor(finite.max())) + 1)
    if kmax <= _MAX_CURVE_POINTS:
        return np.arange(1, kmax + 1)
    ks = np.unique(np.round(np.geomspace(1, kmax, _MAX_CURVE_POINTS)).astype(np.int64))
    # K = 1, 5, 10 are marked on the plot, so they must be on the grid.
    return np.union1d(ks, [1, 5, 10])


def _num(metrics: Mapping[str, Any], key: str) -> float | None:
    value = metrics.get(key)
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return None if math.isnan(value) else value


def _fmt(value: float | None, kind: str) -> str:
    """Recalls with one decimal; ranks as integers when they are (medR usually is)."""
    if value is None:
        return "\u2013"
    if math.isinf(value):
        return "inf"
    if kind == "rank" and float(value).is_integer():
        return str(int(value))
    return f"{value:.1f}"


def _rows(metrics: Mapping[str, Any]) -> list[tuple[str, str, list[str]]]:
    """(direction, long name, formatted cells) for each direction."""
    return [
        (d, long, [_fmt(_num(metrics, f"{d}_{suffix}"), kind) for _, suffix, kind in _COLUMNS])
        for d, long in _DIRECTIONS
    ]


def _rsum(metrics: Mapping[str, Any]) -> str:
    return _fmt(_num(metrics, "rsum"), "recall")


# --------------------------------------------------------------------------- terminal / markdown


def format_table(metrics: Mapping[str, Any], title: str | None = None) -> Table:
    """A rich table: rows i2t / t2i, columns R@1 R@5 R@10 medR meanR, rsum in the caption."""
    table = Table(title=title, caption=f"rsum = {_rsum(metrics)}", caption_justify="right")
    table.add_column("", style="bold")
    for label, _, _ in _COLUMNS:
        table.add_column(label, justify="right")
    for d, long, cells in _rows(metrics):
        table.add_row(f"{d} ({long})", *cells)
    return table


def print_metrics(
    metrics: Mapping[str, Any], console: Console | None = None, title: str = "Retrieval"
) -> None:
    """Print :func:`format_table` to ``console`` (a fresh stdout console when None)."""
    (console or Console()).print(format_table(metrics, title=title))


def metrics_markdown(metrics: Mapping[str, Any]) -> str:
    """A GitHub-flavoured markdown table of the metrics, rsum on the line below."""
    head = "| | " + " | ".join(label for label, _, _ in _COLUMNS) + " |"
    rule = "|---|" + "---:|" * len(_COLUMNS)
    lines = [head, rule]
    for d, long, cells in _rows(metrics):
        lines.append(f"| {d} ({long}) | " + " | ".join(cells) + " |")
    lines.append("")
    lines.append(f"rsum: **{_rsum(metrics)}**")
    return "\n".join(lines) + "\n"


# --------------------------------------------------------------------------- files


def _atomic_write(path: Path, data: bytes) -> None:
    """Write to a temp file in the same folder, then rename: readers never see half a file."""
    fd, tmp = tempfile.mkstemp(prefix=f".{path.name}.", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
        os.chmod(tmp, 0o644)  # mkstemp makes 0600; a report is meant to be shared
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _remove_stale(path: Path) -> None:
    """A figure left by an earlier run into the same folder would not match this report."""
    if path.exists():
        log.info("report: removing stale %s from an earlier run", path)
        path.unlink()


def _plural(n: int, one: str, many: str) -> str:
    return one if n == 1 else many


def _data_uri(data: bytes, mime: str) -> str:
    return f"data:{mime};base64," + base64.b64encode(data).decode("ascii")


# --------------------------------------------------------------------------- figures


def _new_figure(width_in: float, height_in: float) -> Any:
    """A Figure on an explicit Agg canvas.

    Going through ``Figure`` + ``FigureCanvasAgg`` instead of pyplot never opens a window,
    never touches the global backend of a caller's notebook, and keeps no figure alive in
    pyplot's registry after we are done.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(width_in, height_in), dpi=110)
    FigureCanvasAgg(fig)
    return fig


def _png_bytes(fig: Any) -> bytes:
    buf = io.BytesIO()
    with warnings.catch_warnings():
        # Captions may hold emoji/CJK the bundled font lacks: a box is fine, a warning per glyph
        # is noise.
        warnings.filterwarnings("ignore", message=r".*[Gg]lyph .* missing from.*")
        fig.savefig(buf, format="png", facecolor="white")
    return buf.getvalue()


def _plot_curve(curves: dict[str, tuple[np.ndarray, np.ndarray, np.ndarray]]) -> bytes:
    """Recall@K, log-x, R@1/5/10 marked. ``curves[d] = (ks, recall, ranks)``."""
    from matplotlib.ticker import NullFormatter

    fig = _new_figure(7.0, 4.4)
    ax = fig.add_subplot(1, 1, 1)
    names = dict(_DIRECTIONS)
    marks = np.array([1, 5, 10])
    for d, (ks, rec, ranks) in curves.items():
        color = _COLORS[d]
        vals = recall_curve(ranks, marks)
        # The R@1/5/10 values go in the legend, not next to the points: on-plot labels collide
        # whenever the two curves run close (weak models, both near 0).
        label = (f"{names[d]}  ({ranks.size:,} {_plural(ranks.size, 'query', 'queries')})\n"
                 f"R@1 {vals[0]:.1f}   R@5 {vals[1]:.1f}   R@10 {vals[2]:.1f}")
        # R@K exists only at integer K; joining those points reads better than steps on log-x.
        ax.plot(ks, rec, color=color, lw=2, label=label)
        ax.plot(marks, vals, "o", color=color, ms=6.5, mec="white", mew=1.2, zorder=3)
    kmax = max(int(ks[-1]) for ks, _, _ in curves.values())
    ax.set_xscale("log")
    # A little room left of K=1 so its marker is not cut by the axis.
    ax.set_xlim(0.85, kmax * 1.05)
    # Plain 1, 2, 5, 10, 20, ... ticks read better than 10^0, 10^1 for ranks.
    decades = range(int(math.log10(kmax)) + 1)
    ticks = [m * 10**e for e in decades for m in (1, 2, 5) if m * 10**e <= kmax]
    ax.set_xticks(ticks, [f"{t:,}" for t in ticks])
    ax.xaxis.set_minor_formatter(NullFormatter())
    ax.set_ylim(0, 104)
    for k in (1, 5, 10):
        ax.axvline(k, color="0.85", lw=0.8, zorder=0)
    ax.set_xlabel("K (log scale)")
    ax.set_ylabel("Recall@K (%)")
    ax.set_title("Recall@K")
    ax.grid(True, which="major", color="0.9", lw=0.8)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(loc="lower right", frameon=True, framealpha=0.9, edgecolor="0.85",
              fontsize=9, labelspacing=0.9, handlelength=1.8)
    fig.tight_layout()
    return _png_bytes(fig)


# --------------------------------------------------------------------------- training curves


def read_metrics_log(path: str | os.PathLike[str]) -> list[dict[str, Any]]:
    """The rows of a run's ``metrics.jsonl`` (``{"step", "kind", **values}``), sorted by step.

    A missing file gives ``[]``; unreadable lines are skipped (a crash can leave half a line).
    A resumed run logs the steps after its checkpoint again: the last row of each
    ``(kind, step)`` wins, so every curve has one point per step.
    """
    path = Path(path)
    if not path.is_file():
        return []
    rows: dict[tuple[str, int], dict[str, Any]] = {}
    bad = 0
    with open(path, encoding="utf-8", errors="replace") as fh:
        for line in fh:
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                key = (str(row["kind"]), int(row["step"]))
            except (ValueError, KeyError, TypeError):
                bad += 1
                continue
            rows.pop(key, None)  # re-insert: the later row replaces the earlier one
            rows[key] = row
    if bad:
        log.warning("%s: skipped %d unreadable %s", path, bad, _plural(bad, "line", "lines"))
    return sorted(rows.values(), key=lambda r: int(r["step"]))


def _series(rows: Sequence[Mapping[str, Any]], kind: str, key: str) -> tuple[np.ndarray, np.ndarray]:
    """(steps, values) of one logged value; rows without a finite number for it are left out."""
    pts = [(int(r["step"]), v) for r in rows if r.get("kind") == kind
           for v in [_num(r, key)] if v is not None and math.isfinite(v)]
    if not pts:
        return np.zeros(0), np.zeros(0)
    steps, vals = zip(*pts)
    return np.asarray(steps, dtype=np.float64), np.asarray(vals, dtype=np.float64)


def _loss_keys(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """``loss`` first, then its parts (``*_loss``) when there are several (a sum worth splitting)."""
    keys: list[str] = []
    for r in rows:
        if r.get("kind") == "train":
            keys.extend(k for k in r if (k == "loss" or k.endswith("_loss")) and k not in keys)
    parts = [k for k in keys if k != "loss"]
    head = ["loss"] if "loss" in keys else []
    return head + (parts if len(parts) > 1 or not head else [])


def _plot_training(rows: Sequence[Mapping[str, Any]], best_step: int | None) -> bytes | None:
    """Training loss (left) and validation rsum (right) per step; None when nothing was logged."""
    losses = [(k, *_series(rows, "train", k)) for k in _loss_keys(rows)]
    losses = [x for x in losses if x[1].size]
    val_steps, rsum = _series(rows, "val", "rsum")
    panels = int(bool(losses)) + int(bool(val_steps.size))
    if not panels:
        return None
    fig = _new_figure(4.6 * panels + 0.6, 3.6)
    last = max([float(s[-1]) for _, s, _ in losses] + [float(val_steps[-1]) if val_steps.size else 0.0])
    col = 1
    if losses:
        ax = fig.add_subplot(1, panels, col)
        col += 1
        for i, (key, steps, vals) in enumerate(losses):
            ax.plot(steps, vals, lw=2 if i == 0 else 1.2, label=key, marker="o" if steps.size < 3 else None,
                    color="#333333" if i == 0 else None)
        ax.set_title("Training loss", parse_math=False)
        if len(losses) > 1:
            ax.legend(fontsize=8, frameon=False)
        _style_axes(ax, last)
    if val_steps.size:
        ax = fig.add_subplot(1, panels, col)
        ax.plot(val_steps, rsum, color=_COLORS["t2i"], lw=2, marker="o", ms=4)
        if best_step is not None and best_step in val_steps:
            best = float(rsum[list(val_steps).index(best_step)])
            ax.plot([best_step], [best], "*", color=_GREEN, ms=15, mec="white", zorder=3,
                    label=f"best: {best:.1f} at step {best_step}")
            ax.legend(fontsize=8, frameon=False, loc="lower right")
        ax.set_title("Validation rsum", parse_math=False)
        _style_axes(ax, last)
    fig.tight_layout()
    return _png_bytes(fig)


def _style_axes(ax: Any, last_step: float) -> None:
    """Both panels share the step axis, from 0 to the last logged step."""
    ax.set_xlim(0, max(last_step, 1.0) * 1.04)
    ax.set_xlabel("step")
    ax.grid(True, color="0.9", lw=0.8)
    ax.spines[["top", "right"]].set_visible(False)


# --------------------------------------------------------------------------- queries


def _placeholder() -> Image.Image:
    return Image.new("RGB", (THUMB_PX, THUMB_PX), (200, 200, 200))


def _to_pil(image: Any) -> Image.Image:
    """PIL image, uint8/float array (HxW, HxWx1/3/4) or a path -> RGB PIL image."""
    if isinstance(image, Image.Image):
        return image.convert("RGB")
    if isinstance(image, (str, os.PathLike)):
        with Image.open(image) as im:
            return im.convert("RGB")
    arr = np.asarray(image)
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[:, :, 0]  # (H, W)
    if arr.ndim not in (2, 3) or (arr.ndim == 3 and arr.shape[2] not in (3, 4)):
        raise ValueError(f"expected an HxW or HxWx3 image array, got shape {arr.shape}")
    if arr.dtype != np.uint8:
        arr = arr.astype(np.float64)
        if arr.size and np.nanmax(arr) <= 1.0:
            arr = arr * 255.0  # floats in [0, 1]
        arr = np.clip(np.nan_to_num(arr), 0, 255).astype(np.uint8)
    return Image.fromarray(arr).convert("RGB")


def _thumbnail(image: Any) -> Image.Image:
    """Fit into a THUMB_PX square without cropping (letterboxed), so no content is hidden."""
    if image is None:
        return _placeholder()
    try:
        pil = _to_pil(image)
    except (OSError, ValueError) as exc:
        log.warning("report: cannot render a result image (%s); showing a grey tile", exc)
        return _placeholder()
    return ImageOps.pad(pil, (THUMB_PX, THUMB_PX), method=Image.Resampling.BICUBIC,
                        color=(240, 240, 240))


def _first_correct(q: Mapping[str, Any]) -> float | None:
    """The query's 1-based ``first_correct_rank`` (inf: it has no correct item; None: not given)."""
    value = q.get("first_correct_rank")
    if value is None:
        return None
    try:
        value = float(value)
    except (TypeError, ValueError):
        return None
    return math.inf if math.isnan(value) else value


def _candidates(q: Mapping[str, Any]) -> int | None:
    value = q.get("candidates")
    return None if value is None else int(value)


def _prepare_queries(queries: Sequence[Mapping[str, Any]], limit: int) -> list[dict[str, Any]]:
    """Thumbnails for the first ``limit`` text queries and their top-``TOP_N`` images.

    A result without an image (a dataset of features) keeps ``thumb`` None and shows its label.
    """
    out = []
    for qi, q in enumerate(queries[:limit]):
        if not isinstance(q, Mapping) or "text" not in q:
            raise ValueError(f"queries[{qi}] must be a dict with 'text' and 'results'")
        results = []
        for r in list(q.get("results") or [])[:TOP_N]:
            image = r.get("image")
            results.append({
                "thumb": None if image is None else _thumbnail(image),
                "score": _score(r),
                "correct": bool(r.get("correct", False)),
                "label": None if r.get("label") is None else str(r.get("label")),
            })
        out.append({"text": str(q["text"]), "results": results, "rank": _first_correct(q),
                    "candidates": _candidates(q), "first": _first_item(q)})
    return out


def _score(item: Mapping[str, Any]) -> float | None:
    score = item.get("score")
    return None if score is None else float(score)


def _first_item(q: Mapping[str, Any]) -> dict[str, Any] | None:
    """The query's ``first_correct`` item (shown beside the rank of a query that missed)."""
    item = q.get("first_correct")
    if not isinstance(item, Mapping):
        return None
    image = item.get("image")
    return {"thumb": None if image is None else _thumbnail(image),
            "label": str(item.get("label") or ""), "text": str(item.get("text") or ""), "score": _score(item)}


def _prepare_image_queries(queries: Sequence[Mapping[str, Any]], limit: int) -> list[dict[str, Any]]:
    """The first ``limit`` image queries: a thumbnail (or None), a label and their top texts."""
    out = []
    for qi, q in enumerate(queries[:limit]):
        if not isinstance(q, Mapping) or "results" not in q:
            raise ValueError(f"image_queries[{qi}] must be a dict with 'image' or 'label', and 'results'")
        results = []
        for r in list(q.get("results") or [])[:TOP_N]:
            results.append({"text": str(r.get("text", "")), "correct": bool(r.get("correct", False)),
                            "score": _score(r)})
        image = q.get("image")
        out.append({"thumb": None if image is None else _thumbnail(image),
                    "label": "" if q.get("label") is None else str(q["label"]),
                    "results": results, "rank": _first_correct(q), "candidates": _candidates(q),
                    "first": _first_item(q)})
    return out


def _rank_note(q: Mapping[str, Any], item: str) -> tuple[str, bool] | None:
    """('first correct image at rank 37 of 500', missed) for a prepared query; None if unknown."""
    rank = q["rank"]
    if rank is None:
        return None
    if math.isinf(rank):
        return f"no correct {item} among the candidates", True
    of = f" of {q['candidates']:,}" if q["candidates"] else ""
    missed = not any(r["correct"] for r in q["results"])
    lead = f"not in the top {len(q['results'])}: " if missed else ""
    return f"{lead}first correct {item} at rank {int(rank):,}{of}", missed


def _plain(text: str) -> str:
    """Text for matplotlib: emoji and the joiners/selectors around them dropped (the bundled font
    has none of them, and a box per glyph helps nobody); the HTML keeps the full text."""
    kept = "".join(c for c in text if unicodedata.category(c) not in ("So", "Cf", "Sk", "Cs", "Co")
                   and not 0xFE00 <= ord(c) <= 0xFE0F)
    return " ".join(kept.split())


def _wrap(text: str, width: int, max_lines: int) -> str:
    lines = textwrap.wrap(" ".join(text.split()), width=width, break_long_words=True) or [""]
    if len(lines) > max_lines:
        lines = lines[:max_lines]
        lines[-1] = lines[-1][: width - 1].rstrip() + "\u2026"
    return "\n".join(lines)


def _shorten(text: str, width: int) -> str:
    """Ellipsis in the middle: ids like ``COCO_val2014_000000391895.jpg`` differ at the end."""
    text = " ".join(text.split())
    if len(text) <= width:
        return text
    head = (width - 1) // 2
    return text[:head] + "\u2026" + text[len(text) - (width - 1 - head):]


def _plot_queries(prepared: list[dict[str, Any]], total: int) -> bytes:
    """One row per query: wrapped caption (and where its first correct image is) on the left,
    top-5 thumbnails with coloured borders."""
    rows = len(prepared)
    text_w, cell_w, row_h, head_h = 2.8, 1.15, 1.5, 0.55
    fig = _new_figure(text_w + TOP_N * cell_w, head_h + rows * row_h)
    height = head_h + rows * row_h
    gs = fig.add_gridspec(rows, 1 + TOP_N, width_ratios=[text_w] + [cell_w] * TOP_N,
                          left=0.01, right=0.99, bottom=0.3 / height,
                          top=1 - head_h / height, wspace=0.12, hspace=0.32)
    shown = (f"{rows} of {total} queries" if total > rows
             else f"{rows} {_plural(rows, 'query', 'queries')}")
    fig.text(0.01, 1 - 0.18 / height, f"Text \u2192 image: top-{TOP_N} results ({shown})",
             fontsize=11, weight="bold", va="top", parse_math=False)
    fig.text(0.99, 1 - 0.2 / height, "green = correct match, red = wrong",
             fontsize=8, color="0.4", ha="right", va="top", parse_math=False)
    for i, q in enumerate(prepared):
        tax = fig.add_subplot(gs[i, 0])
        tax.axis("off")
        # parse_math=False: a caption with "$" must not be read as mathtext (it would raise).
        tax.text(0.0, 0.62, _wrap(_plain(q["text"]), 34, 4), fontsize=8.5, va="center", ha="left",
                 transform=tax.transAxes, parse_math=False, linespacing=1.25)
        note = _rank_note(q, "image")
        if note is not None:
            tax.text(0.0, 0.08, _wrap(note[0], 40, 2), fontsize=7.5, va="bottom", ha="left",
                     color=_RED if note[1] else "0.35", transform=tax.transAxes, parse_math=False)
        for j in range(TOP_N):
            ax = fig.add_subplot(gs[i, 1 + j])
            ax.set_xticks([])
            ax.set_yticks([])
            if j >= len(q["results"]):
                ax.axis("off")
                continue
            _draw_result(ax, q["results"][j], j)
    return _png_bytes(fig)


def _draw_result(ax: Any, r: Mapping[str, Any], j: int) -> None:
    color = _GREEN if r["correct"] else _RED
    thumb = r["thumb"] if r["thumb"] is not None else _placeholder()
    ax.imshow(np.asarray(thumb), interpolation="lanczos")
    for spine in ax.spines.values():
        spine.set_edgecolor(color)
        spine.set_linewidth(3.5)
    caption = f"#{j + 1}  {r['score']:.3f}" if r["score"] is not None else f"#{j + 1}"
    if r["label"]:
        caption += "\n" + _shorten(_plain(r["label"]), 18)
    ax.set_xlabel(caption, fontsize=7.5, color=color, labelpad=2, parse_math=False)


def _jpeg(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="JPEG", quality=85)
    return buf.getvalue()


# --------------------------------------------------------------------------- HTML

_CSS = """
body{font-family:system-ui,-apple-system,"Segoe UI",Roboto,sans-serif;margin:2rem auto;
max-width:1100px;color:#222;padding:0 1rem;line-height:1.4}
h1{font-size:1.6rem;margin-bottom:.2rem}
h2{font-size:1.2rem;margin-top:2rem;border-bottom:1px solid #ddd}
h3{font-size:1rem;margin:1rem 0 .3rem}
nav{font-size:.85rem;margin:.6rem 0 0}nav a{color:#2166ac;margin-right:.9rem;text-decoration:none}
.sub{color:#666;font-size:.9rem}
table{border-collapse:collapse;font-variant-numeric:tabular-nums}
th,td{padding:.3rem .8rem;border-bottom:1px solid #e4e4e4}
table.metrics td{text-align:right}table.metrics th{text-align:right}
table.metrics th:first-child,table.metrics td:first-child{text-align:left}
table.metrics tr.rsum td{font-weight:600;border-top:2px solid #bbb}
.pair{display:flex;flex-wrap:wrap;gap:0 2rem}.pair>div{max-width:540px}
table.metrics th,table.metrics td{padding:.3rem .55rem}
table.kv td:first-child{color:#555;font-family:ui-monospace,monospace;white-space:nowrap;
vertical-align:top}
table.kv td:last-child{font-family:ui-monospace,monospace;word-break:break-all}
table.summary td:first-child{color:#555;white-space:nowrap;vertical-align:top}
table.summary td:last-child{word-break:break-word}
details{margin-top:1rem}summary{cursor:pointer;color:#2166ac}
img.curve{max-width:100%;height:auto}
.queries{display:grid;grid-template-columns:repeat(auto-fill,minmax(540px,1fr));gap:1rem}
.query{border:1px solid #e4e4e4;border-radius:6px;padding:.6rem}
.query p{margin:0 0 .5rem 0;font-size:.95rem}
.query p.rank{margin:.4rem 0 0 0;font-size:.85rem;color:#555}
.query p.rank.miss{color:{RED};display:flex;align-items:center;gap:.5rem}
img.mini{width:44px;height:44px;flex:none;box-sizing:border-box;border:3px solid {GREEN}}
.results{display:flex;gap:6px}
figure{margin:0;text-align:center;font-size:.75rem;width:{PX}px}
figure img,figure .tile{display:block;width:{PX}px;height:{PX}px;box-sizing:border-box;border:4px solid}
figure .tile{display:flex;align-items:center;justify-content:center;overflow:hidden;
background:#f4f4f4;font-size:.7rem;word-break:break-all;padding:2px;border-color:#bbb}
figure.ok img,figure.ok .tile{border-color:{GREEN}}figure.bad img,figure.bad .tile{border-color:{RED}}
figure.ok figcaption{color:{GREEN}}figure.bad figcaption{color:{RED}}
figure.q img,figure.q .tile{border-color:#999}
figcaption{overflow:hidden;display:-webkit-box;-webkit-box-orient:vertical;-webkit-line-clamp:3;
line-clamp:3;word-break:break-word;line-height:1.25}
.i2t{display:flex;gap:.8rem;align-items:flex-start}
.i2t figure.q figcaption{white-space:normal}
.i2t ol{margin:0;padding-left:1.6rem;font-size:.9rem;flex:1}
.i2t li.ok{color:{GREEN}}.i2t li.bad{color:{RED}}
.i2t li .score{color:#888;font-size:.8rem;font-variant-numeric:tabular-nums}
footer{margin-top:2rem;color:#888;font-size:.8rem}
""".replace("{PX}", str(THUMB_PX)).replace("{GREEN}", _GREEN).replace("{RED}", _RED)


def _e(value: Any) -> str:
    return html.escape(str(value), quote=True)


def _metrics_html(metrics: Mapping[str, Any]) -> str:
    head = "".join(f"<th>{_e(label)}</th>" for label, _, _ in _COLUMNS)
    body = []
    for d, long, cells in _rows(metrics):
        tds = "".join(f"<td>{_e(c)}</td>" for c in cells)
        body.append(f"<tr><td><b>{_e(d)}</b> ({_e(long)})</td>{tds}</tr>")
    body.append(f'<tr class="rsum"><td>rsum</td><td colspan="{len(_COLUMNS)}">'
                f"{_e(_rsum(metrics))}</td></tr>")
    parts = [f'<table class="metrics"><thead><tr><th></th>{head}</tr></thead>'
             f"<tbody>{''.join(body)}</tbody></table>"]
    others = {k: v for k, v in metrics.items() if k not in METRIC_KEYS}
    if others:
        parts.append("<h3>Other metrics</h3>" + _kv_html(others))
    return "\n".join(parts)


def _flatten(d: Mapping[str, Any], prefix: str = "") -> list[tuple[str, Any]]:
    """Nested dicts (a config) become dotted keys, so one flat table shows everything."""
    items: list[tuple[str, Any]] = []
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping) and v:
            items.extend(_flatten(v, key + "."))
        else:
            items.append((key, v))
    return items


def _kv_value(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.6g}"
    if isinstance(v, (np.floating, np.integer)):
        return _kv_value(v.item())
    if isinstance(v, (list, tuple, dict)):
        try:
            return json.dumps(v, default=str, ensure_ascii=False)
        except (TypeError, ValueError):
            return str(v)
    return str(v)


def _kv_html(d: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(_kv_value(v))}</td></tr>" for k, v in _flatten(d))
    return f'<table class="kv"><tbody>{rows}</tbody></table>'


def _rank_html(q: Mapping[str, Any], item: str) -> str:
    """Where the query's first correct item is; for a miss also that item (what it should have found)."""
    note = _rank_note(q, item)
    if note is None:
        return ""
    text, missed = note
    if not missed:
        return f'<p class="rank">{_e(text)}</p>'
    first, pic, what = q.get("first"), "", ""
    if first:
        if first["thumb"] is not None:
            pic = (f'<img class="mini" alt="{_e(first["label"] or "first correct image")}" '
                   f'src="{_data_uri(_jpeg(first["thumb"]), "image/jpeg")}">')
        what = f"\u201c{first['text']}\u201d" if first["text"] else first["label"]
        if first["score"] is not None:
            what += f"{', ' if what else ''}score {first['score']:.3f}"
    detail = f"<br>{_e(what)}" if what else ""
    return f'<p class="rank miss">{pic}<span><b>\u2717 {_e(text)}</b>{detail}</span></p>'


def _result_figure(j: int, r: Mapping[str, Any]) -> str:
    cls = "ok" if r["correct"] else "bad"
    mark = "\u2713" if r["correct"] else "\u2717"
    cap = f"#{j + 1} {mark}" + (f" {r['score']:.3f}" if r["score"] is not None else "")
    label = r["label"] or ""
    alt = f"rank {j + 1}, {'correct' if r['correct'] else 'wrong'}"
    alt += f", {label}" if label else ""
    if r["thumb"] is not None:
        pic = f'<img alt="{_e(alt)}" src="{_data_uri(_jpeg(r["thumb"]), "image/jpeg")}">'
        cap_html = _e(cap) + (f"<br>{_e(_shorten(label, 48))}" if label else "")
    else:  # no pixels (a dataset of features): the label stands in for the picture
        pic = f'<div class="tile">{_e(_shorten(label, 40))}</div>'
        cap_html = _e(cap)
    return f'<figure class="{cls}" title="{_e(alt)}">{pic}<figcaption>{cap_html}</figcaption></figure>'


def _queries_html(prepared: list[dict[str, Any]], total: int) -> str:
    cards = []
    for q in prepared:
        figs = "".join(_result_figure(j, r) for j, r in enumerate(q["results"]))
        cards.append(f'<div class="query"><p>{_e(q["text"])}</p>'
                     f'<div class="results">{figs}</div>{_rank_html(q, "image")}</div>')
    note = f"Showing {len(prepared)} of {total} queries." if total > len(prepared) else ""
    return (f'<p class="sub">Top-{TOP_N} images per text query; green border = correct match, '
            f"red = wrong; a query whose correct image is not shown says at which rank it is. "
            f"{_e(note)}</p>\n"
            f'<div class="queries">{"".join(cards)}</div>')


def _image_queries_html(prepared: list[dict[str, Any]], total: int) -> str:
    cards = []
    for q in prepared:
        if q["thumb"] is not None:
            pic = f'<img alt="{_e(q["label"] or "query image")}" src="{_data_uri(_jpeg(q["thumb"]), "image/jpeg")}">'
        else:
            pic = f'<div class="tile">{_e(_shorten(q["label"], 40))}</div>'
        items = []
        for r in q["results"]:
            cls, mark = ("ok", "\u2713") if r["correct"] else ("bad", "\u2717")
            score = f' <span class="score">{r["score"]:.3f}</span>' if r["score"] is not None else ""
            items.append(f'<li class="{cls}">{mark} {_e(r["text"])}{score}</li>')
        cards.append(f'<div class="query i2t"><figure class="q">{pic}<figcaption>{_e(q["label"])}'
                     f'</figcaption></figure><div><ol>{"".join(items)}</ol>{_rank_html(q, "caption")}'
                     "</div></div>")
    note = f"Showing {len(prepared)} of {total} queries." if total > len(prepared) else ""
    return (f'<p class="sub">Top-{TOP_N} captions per image query; \u2713 = a caption of that image, '
            f"\u2717 = another image's. {_e(note)}</p>\n"
            f'<div class="queries">{"".join(cards)}</div>')


def _slug(heading: str) -> str:
    return "-".join("".join(c if c.isalnum() else " " for c in heading.lower()).split()) or "section"


def _page(title: str, sections: list[tuple[str, str]], subtitle: str = "") -> str:
    from .._version import __version__

    now = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    body = "\n".join(f'<section id="{_slug(h)}"><h2>{_e(h)}</h2>\n{content}</section>'
                     for h, content in sections)
    nav = " ".join(f'<a href="#{_slug(h)}">{_e(h)}</a>' for h, _ in sections)
    sub = f'<p class="sub">{_e(subtitle)}</p>' if subtitle else ""
    return (
        "<!DOCTYPE html>\n<html lang=\"en\"><head><meta charset=\"utf-8\">"
        '<meta name="viewport" content="width=device-width,initial-scale=1">'
        f"<title>{_e(title)}</title><style>{_CSS}</style></head><body>\n"
        f"<h1>{_e(title)}</h1>\n{sub}<nav>{nav}</nav>\n{body}\n"
        f"<footer>Generated by xmodal {_e(__version__)} on {_e(now)}.</footer>\n"
        "</body></html>\n"
    )


# --------------------------------------------------------------------------- entry point


def write_report(
    out_dir: str | os.PathLike[str],
    *,
    metrics: Mapping[str, Any],
    i2t_ranks: np.ndarray | None,
    t2i_ranks: np.ndarray | None,
    queries: list[dict] | None,
    title: str = "xmodal evaluation",
    extra: Mapping[str, Any] | None = None,
    max_queries: int = MAX_QUERIES,
    image_queries: list[dict] | None = None,
    summary: Mapping[str, Any] | None = None,
    config: Mapping[str, Any] | None = None,
    training_log: Sequence[Mapping[str, Any]] | None = None,
    best_step: int | None = None,
    val_metrics: Mapping[str, Any] | None = None,
    metrics_heading: str = "Retrieval metrics",
    metrics_note: str = "",
    val_note: str = "",
    subtitle: str = "",
) -> dict[str, Path]:
    """Write ``report.html`` and its PNGs into ``out_dir``; return the paths actually written
    (keys ``html``, ``training_curves``, ``recall_curve``, ``queries``).

    - ``metrics`` (the evaluated split, under ``metrics_heading``) and ``val_metrics`` (shown when
      given) are metric dicts with the engine's keys.
    - ``i2t_ranks``/``t2i_ranks`` are per-query 0-based ranks of the first correct item.
    - ``queries`` (text->image) items are ``{"text", "results": [{"image"?, "score", "correct",
      "label"?}], "first_correct_rank"?, "candidates"?}``; ``image_queries`` (image->text) items are
      ``{"image"?, "label", "results": [{"text", "score", "correct"}], "first_correct_rank"?,
      "candidates"?}``. ``first_correct_rank`` is 1-based; a query without a correct item in its
      shown results says at which rank (of ``candidates``) the first one is. Only the first
      ``max_queries`` queries and ``TOP_N`` results each are rendered; an item without ``image``
      shows its label instead.
    - ``summary`` (label -> value) heads the page; ``config`` (nested dict) goes below it, folded.
    - ``training_log`` are the rows of ``metrics.jsonl`` (:func:`read_metrics_log`); ``None`` leaves
      the section out, ``[]`` says that the run logged nothing. ``best_step`` is starred.
    - ``extra`` (nested dict) is the "Run information" table.
    """
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written: dict[str, Path] = {}
    sections: list[tuple[str, str]] = []
    if summary:
        folded = (f"<details><summary>Full configuration</summary>{_kv_html(config)}</details>"
                  if config else "")
        sections.append(("Summary", _summary_html(summary) + folded))
    blocks = [f"<div><h3>{_e(metrics_heading)}</h3>{_note(metrics_note)}{_metrics_html(metrics)}</div>"]
    if val_metrics:
        blocks.append(f"<div><h3>Validation metrics</h3>{_note(val_note)}{_metrics_html(val_metrics)}</div>")
    sections.append(("Metrics", f'<div class="pair">{"".join(blocks)}</div>'))
    if training_log is not None:
        sections.append(("Training curves", _training_section(out, training_log, best_step, written)))
    else:
        _remove_stale(out / "training_curves.png")
    curve = _curve_section(out, i2t_ranks, t2i_ranks, written)
    if curve:
        sections.append(("Recall@K", curve))
    sections += _example_sections(out, queries, image_queries, max(1, int(max_queries)), written)
    if extra:
        sections.append(("Run information", _kv_html(extra)))

    path = out / "report.html"
    _atomic_write(path, _page(title, sections, subtitle).encode("utf-8"))
    written["html"] = path
    log.info("report written to %s", path)
    return written


def _example_sections(out: Path, queries: Any, image_queries: Any, limit: int,
                      written: dict[str, Path]) -> list[tuple[str, str]]:
    sections = []
    if queries:
        prepared = _prepare_queries(queries, limit)
        if any(r["thumb"] is not None for q in prepared for r in q["results"]):
            _atomic_write(out / "queries.png", _plot_queries(prepared, len(queries)))
            written["queries"] = out / "queries.png"
        else:  # no pixels anywhere: a grid of grey squares would say nothing
            _remove_stale(out / "queries.png")
        sections.append(("Text \u2192 image examples", _queries_html(prepared, len(queries))))
    else:
        log.info("report: no queries given, skipping the query grid")
        _remove_stale(out / "queries.png")
    if image_queries:
        prepared = _prepare_image_queries(image_queries, limit)
        sections.append(("Image \u2192 text examples", _image_queries_html(prepared, len(image_queries))))
    return sections


def _note(text: str) -> str:
    return f'<p class="sub">{_e(text)}</p>' if text else ""


def _summary_html(d: Mapping[str, Any]) -> str:
    rows = "".join(f"<tr><td>{_e(k)}</td><td>{_e(_kv_value(v))}</td></tr>" for k, v in d.items())
    return f'<table class="summary"><tbody>{rows}</tbody></table>'


def _training_section(out: Path, rows: Sequence[Mapping[str, Any]], best_step: int | None,
                      written: dict[str, Path]) -> str:
    png = _plot_training(rows, best_step) if rows else None
    if png is None:
        _remove_stale(out / "training_curves.png")
        return _note("No training log (metrics.jsonl) for this model: nothing was trained, "
                     "or the run folder holds no log.")
    path = out / "training_curves.png"
    _atomic_write(path, png)
    written["training_curves"] = path
    train_rows = sum(1 for r in rows if r.get("kind") == "train")
    val_rows = sum(1 for r in rows if r.get("kind") == "val")
    return (_note(f"From metrics.jsonl: {train_rows} training {_plural(train_rows, 'entry', 'entries')}, "
                  f"{val_rows} {_plural(val_rows, 'validation', 'validations')}.")
            + f'<img class="curve" alt="training loss and validation rsum per step" '
              f'src="{_data_uri(png, "image/png")}">')


def _curve_section(out: Path, i2t_ranks: Any, t2i_ranks: Any, written: dict[str, Path]) -> str:
    curves = {}
    for d, ranks in (("i2t", i2t_ranks), ("t2i", t2i_ranks)):
        if ranks is None or np.asarray(ranks).size == 0:
            continue
        curves[d] = _as_ranks(ranks, f"{d}_ranks")
    if not curves:
        log.info("report: no ranks given, skipping the Recall@K curve")
        _remove_stale(out / "recall_curve.png")
        return ""
    ks = curve_ks(*curves.values())
    png = _plot_curve({d: (ks, recall_curve(r, ks), r) for d, r in curves.items()})
    path = out / "recall_curve.png"
    _atomic_write(path, png)
    written["recall_curve"] = path
    return f'<img class="curve" alt="Recall@K curve" src="{_data_uri(png, "image/png")}">'
