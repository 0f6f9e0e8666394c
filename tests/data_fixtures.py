"""Writers of small datasets in each real on-disk format, for tests (``from data_fixtures import ...``).

Each writer produces the layout the original code reads (SCAN precomp folders, Karpathy
JSON, VinVL feature TSV, FooDI-ML CSV/Parquet, Recipe1M layers, generic tables) and returns
what a reader should recover, so tests compare against values rather than re-derive them.
"""
from __future__ import annotations

import base64
import csv
import json
from pathlib import Path

import numpy as np


# precomp (SCAN / VSE++) ---------------------------------------------------------------------
def write_precomp(folder: Path, split: str = "test", num_images: int = 4, caps_per_image: int = 5,
                  feature_shape: tuple[int, ...] = (3, 8), *, rows_per_caption: bool = False,
                  ids: str | None = None, seed: int = 0) -> dict:
    """``{split}_ims.npy`` + ``{split}_caps.txt`` (+ ``{split}_ids.txt``); ids: None|'image'|'caption'."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    feats = rng.standard_normal((num_images, *feature_shape)).astype(np.float32)
    stored = np.repeat(feats, caps_per_image, axis=0) if rows_per_caption else feats
    np.save(folder / f"{split}_ims.npy", stored)
    captions = [f"image {i} caption {j}" for i in range(num_images) for j in range(caps_per_image)]
    (folder / f"{split}_caps.txt").write_text("\n".join(captions) + "\n")
    image_ids = [str(1000 + 7 * i) for i in range(num_images)]
    if ids == "image":
        (folder / f"{split}_ids.txt").write_text("\n".join(image_ids) + "\n")
    elif ids == "caption":
        (folder / f"{split}_ids.txt").write_text("\n".join(i for i in image_ids for _ in range(caps_per_image)) + "\n")
    return {"features": feats, "captions": captions, "image_ids": image_ids}


# Karpathy split JSON --------------------------------------------------------------------------
def write_karpathy(folder: Path, dataset: str = "coco", splits: tuple[str, ...] = ("train", "restval", "val", "test"),
                   caps_per_image: int = 5, extra_caption_on: int | None = 0) -> Path:
    """``dataset_{dataset}.json`` with one image per split name (two for test); COCO adds filepath/cocoid."""
    folder.mkdir(parents=True, exist_ok=True)
    images, sentid = [], 0
    names = [s for s in splits for _ in range(2 if s == "test" else 1)]
    for imgid, split in enumerate(names):
        n = caps_per_image + (1 if imgid == extra_caption_on else 0)
        sentences = []
        for j in range(n):
            raw = f"A {split} picture {imgid} sentence {j}."
            sentences.append({"tokens": raw.lower().rstrip(".").split(), "raw": raw, "imgid": imgid, "sentid": sentid})
            sentid += 1
        im = {"sentids": [s["sentid"] for s in sentences], "imgid": imgid, "sentences": sentences, "split": split}
        if dataset == "coco":
            sub = "train2014" if split == "train" else "val2014"
            cocoid = 500000 + imgid
            im.update(filepath=sub, filename=f"COCO_{sub}_{cocoid:012d}.jpg", cocoid=cocoid)
        else:
            im["filename"] = f"{1000092795 + imgid}.jpg"
        images.append(im)
    path = folder / f"dataset_{dataset}.json"
    path.write_text(json.dumps({"images": images, "dataset": dataset}))
    return path


# VinVL / Oscar features -----------------------------------------------------------------------
def vinvl_row(key: str, feats: np.ndarray, *, json_column: bool = False) -> str:
    """One feature TSV line for ``feats`` of shape (num_boxes, row_dim)."""
    blob = base64.b64encode(np.ascontiguousarray(feats, dtype=np.float32).tobytes()).decode()
    if json_column:
        return f"{key}\t{json.dumps({'num_boxes': len(feats), 'features': blob})}"
    return f"{key}\t{len(feats)}\t{blob}"


def write_vinvl(folder: Path, split: str = "test", keys: tuple[str, ...] = ("391895", "522418", "184613", "318219"),
                boxes: tuple[int, ...] = (3, 5, 1, 4), feature_dim: int = 16, box_dim: int = 6, caps_per_image: int = 2,
                *, lineidx: bool = True, imageid2idx: bool = True, json_column: bool = False,
                captions: str = "dict", img_keys: tuple[str, ...] | None = None, extra_rows: int = 1,
                seed: int = 0) -> dict:
    """``features.tsv`` (+ ``features.lineidx``, ``imageid2idx.json``), ``{split}_captions.json`` and
    optionally ``{split}_img_keys.tsv``. ``extra_rows`` feature rows of other images come first, so
    row numbers differ from image order. captions: 'dict' | 'coco' | 'list' | 'tsv'."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(seed)
    all_keys = [f"extra{j}" for j in range(extra_rows)] + list(keys)
    all_boxes = [2] * extra_rows + list(boxes)
    arrays = {k: rng.standard_normal((n, feature_dim + box_dim)).astype(np.float32)
              for k, n in zip(all_keys, all_boxes)}
    lines = [vinvl_row(k, arrays[k], json_column=json_column) for k in all_keys]
    data = ("\n".join(lines) + "\n").encode()
    (folder / "features.tsv").write_bytes(data)
    if lineidx:
        offsets, pos = [], 0
        for line in lines:
            offsets.append(pos)
            pos += len(line.encode()) + 1
        (folder / "features.lineidx").write_text("\n".join(map(str, offsets)) + "\n")
    if imageid2idx:
        (folder / "imageid2idx.json").write_text(json.dumps({k: r for r, k in enumerate(all_keys)}))
    caps = {k: [f"caption {j} of {k}" for j in range(caps_per_image)] for k in keys}
    if captions == "dict":
        (folder / f"{split}_captions.json").write_text(json.dumps({int(k): v for k, v in caps.items()}))
    elif captions == "coco":
        anns = [{"image_id": int(k), "id": 10 * int(k) + j, "caption": c}
                for k, v in caps.items() for j, c in enumerate(v)]
        (folder / f"{split}_captions.json").write_text(json.dumps({"images": [], "annotations": anns}))
    elif captions == "list":
        (folder / f"{split}_captions.json").write_text(
            json.dumps([{"image_id": k, "caption": c} for k, v in caps.items() for c in v]))
    elif captions == "tsv":
        (folder / f"{split}.caption.tsv").write_text(
            "".join(f"{k}\t{json.dumps([{'caption': c} for c in v])}\n" for k, v in caps.items()))
    if img_keys is not None:
        (folder / f"{split}_img_keys.tsv").write_text("\n".join(img_keys) + "\n")
    return {"arrays": arrays, "captions": caps, "keys": list(img_keys or keys)}


# FooDI-ML -----------------------------------------------------------------------------------
FOODIML_COLUMNS = ["country_code", "city_code", "store_name", "product_name", "collection_section",
                   "product_description", "subset", "HIER", "s3_path"]


def foodiml_rows() -> list[dict]:
    """Rows with duplicates by caption (same text, other image), by hash (same picture, other path),
    by path (same file), an exact duplicate row, and a missing description."""
    def row(name, section, desc, subset, path, h, cc="ES"):
        return {"country_code": cc, "city_code": "BCN", "store_name": "Shop", "product_name": name,
                "collection_section": section, "product_description": desc, "subset": subset,
                "HIER": "True", "s3_path": path, "hash": h}
    return [
        row("Coca-Cola", "Drinks", "33cl can", "test", "dataset/ES/a.jpg", "h1"),
        row("Coca-Cola", "Drinks", "33cl can", "test", "dataset/ES/b.jpg", "h2"),      # same caption as 0
        row("Pepsi", "Drinks", "", "test", "dataset/ES/c.jpg", "h1"),                   # same hash as 0
        row("Burger", "Mains", "Beef, cheese", "test", "dataset/ES/d.jpg", "h3"),
        row("Fries", "Sides", "Large", "test", "dataset/ES/d.jpg", "h3"),              # same file as 3
        row("Water", "Drinks", "50cl", "test", "dataset/ES/e.jpg", "h4"),
        row("Water", "Drinks", "50cl", "test", "dataset/ES/e.jpg", "h4"),              # exact duplicate of 5
        row("Salad", "Starters", "Green", "train", "dataset/ES/f.jpg", "h5"),
        row("Pizza", "Mains", "Margherita", "val", "dataset/IT/g.jpg", "h6", cc="IT"),
        row("PIZZA", "mains", "margherita", "test", "dataset/IT/h.jpg", "h7", cc="IT"),  # lower-cases to pizza's
    ]


def write_foodiml_csv(path: Path, rows: list[dict] | None = None, *, with_hash: bool = True,
                      pandas_index: bool = False) -> Path:
    """The released CSV (``pandas_index``: with the leading unnamed index column a pandas re-save adds)."""
    rows = foodiml_rows() if rows is None else rows
    cols = FOODIML_COLUMNS + (["hash"] if with_hash else [])
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(([""] if pandas_index else []) + cols)
        for n, r in enumerate(rows):
            w.writerow(([n] if pandas_index else []) + [r.get(c, "") for c in cols])
    return path


def foodiml_caption(r: dict) -> str:
    """The benchmark preprocessing's caption for one CSV row (reference for tests)."""
    return f"{r['product_name']} {r['collection_section']} {r['product_description'] or ''}".lower()


def write_foodiml_parquet(folder: Path, rows: list[dict] | None = None) -> Path:
    """``samples/split=.../*.parquet`` as benchmarks/benchmark_preprocess.py writes (no dedup here)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = foodiml_rows() if rows is None else rows
    samples = folder / "samples"
    table = pa.table({
        "caption": [foodiml_caption(r) for r in rows],
        "s3_path": [r["s3_path"] for r in rows],
        "country_code": [r["country_code"] for r in rows],
        "hash": [r["hash"] for r in rows],
        "img_id": list(range(len(rows))),
        "split": [r["subset"] for r in rows],
    })
    pq.write_to_dataset(table, samples, partition_cols=["split"])
    return samples


# Recipe1M -----------------------------------------------------------------------------------
def write_recipe1m(folder: Path) -> dict:
    """layer1.json / layer2.json: 4 test recipes (one without images, one with two), 1 train, 1 val."""
    folder.mkdir(parents=True, exist_ok=True)
    recipes = [
        ("000018c8a5", "Worlds Best Mac and Cheese", "test", ["6 ounces penne", "2 cups milk"], ["Boil.", "Bake."]),
        ("000033e39b", "Dilly Macaroni Salad", "test", ["1 cup macaroni"], ["Cook macaroni.", "Chill."]),
        ("000035f7ed", "Gazpacho", "test", ["8 tomatoes"], ["Blend."]),
        ("00003a70b1", "Crunchy Onion Potato Bake", "test", ["2 cups milk", "2 onions"], ["Mix.", "Bake 30 min."]),
        ("00004320bb", "Cheesy Potato Soup", "train", ["4 potatoes"], ["Simmer."]),
        ("0000631d90", "Cabbage Rolls", "val", ["1 cabbage"], ["Roll.", "Bake."]),
    ]
    layer1 = [{"id": rid, "title": title, "partition": part, "url": f"http://example.com/{rid}",
               "ingredients": [{"text": t} for t in ingr], "instructions": [{"text": t} for t in instr]}
              for rid, title, part, ingr, instr in recipes]
    images = {
        "000018c8a5": ["3e233001e2.jpg", "7f749987f9.jpg"],
        "000033e39b": ["5d3f8e0a7b.jpg"],
        # 000035f7ed (Gazpacho) has no images
        "00003a70b1": ["ef3dc0de11.jpg"],
        "00004320bb": ["a1b2c3d4e5.jpg"],
        "0000631d90": ["0f1e2d3c4b.jpg"],
    }
    layer2 = [{"id": rid, "images": [{"id": i, "url": f"http://example.com/{i}"} for i in imgs]}
              for rid, imgs in images.items()]
    (folder / "layer1.json").write_text(json.dumps(layer1))
    (folder / "layer2.json").write_text(json.dumps(layer2))
    return {"layer1": layer1, "images": images}


# generic table --------------------------------------------------------------------------------
def table_rows() -> list[dict]:
    return [
        {"image": "imgs/a.jpg", "caption": "a red bus", "split": "train", "lang": "en"},
        {"image": "imgs/a.jpg", "caption": "un autobús rojo", "split": "train", "lang": "es"},
        {"image": "imgs/b.jpg", "caption": "two dogs", "split": "train", "lang": "en"},
        {"image": "imgs/c.jpg", "caption": "a cat", "split": "test", "lang": "en"},
        {"image": "imgs/d.jpg", "caption": "a bird", "split": "test", "lang": "en"},
        {"image": "imgs/c.jpg", "caption": "a cat on a sofa", "split": "test", "lang": "en"},
    ]


def write_table(path: Path, rows: list[dict] | None = None) -> Path:
    """Write rows as CSV, TSV, JSONL or Parquet according to the suffix of ``path``."""
    rows = table_rows() if rows is None else rows
    path.parent.mkdir(parents=True, exist_ok=True)
    cols = list(dict.fromkeys(k for r in rows for k in r))
    if path.suffix in (".csv", ".tsv"):
        with open(path, "w", newline="", encoding="utf-8") as f:
            w = csv.DictWriter(f, cols, delimiter="\t" if path.suffix == ".tsv" else ",")
            w.writeheader()
            w.writerows(rows)
    elif path.suffix == ".jsonl":
        path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in rows), encoding="utf-8")
    elif path.suffix == ".parquet":
        import pyarrow as pa
        import pyarrow.parquet as pq

        pq.write_table(pa.table({c: [r.get(c) for r in rows] for c in cols}), path)
    else:
        raise ValueError(path.suffix)
    return path


# FooDI-ML catalogue with real image files (for end-to-end training) ---------------------------
FOODIML_PRODUCTS = [  # (product_name, collection_section, product_description, RGB, shape)
    ("Coca-Cola", "Bebidas", "lata 33cl", (200, 20, 20), "circle"),
    ("Fanta Naranja", "Bebidas", "lata 33cl", (250, 140, 0), "circle"),
    ("Agua Mineral", "Bebidas", "botella 50cl", (60, 140, 250), "bar"),
    ("Hamburguesa Clásica", "Principales", "ternera, queso y lechuga", (120, 70, 20), "square"),
    ("Pizza Margarita", "Principales", "tomate y mozzarella", (240, 200, 60), "triangle"),
    ("Ensalada César", "Entrantes", "lechuga, pollo y parmesano", (40, 170, 40), "square"),
    ("Patatas Fritas", "Entrantes", "", (250, 230, 90), "bar"),
    ("Helado de Chocolate", "Postres", "tarrina 500ml", (90, 50, 30), "circle"),
    ("Tarta de Queso", "Postres", "porción", (250, 245, 220), "triangle"),
    ("Café con Leche", "Cafés", "taza grande", (180, 140, 100), "circle"),
    ("Zumo Verde", "Bebidas", "kale y manzana", (20, 110, 60), "bar"),
    ("Sushi Variado", "Principales", "12 piezas", (240, 240, 240), "square"),
]


def _product_image(rgb, shape, variant: int, tint: int = 0, size: int = 96):
    """A product photo stand-in: the product's colour and shape on a light background; the
    variant shifts the position and the background, the tint the background, so files differ."""
    from PIL import Image, ImageDraw

    bg = (235 - 12 * variant - tint, 235 - tint, 225 + 6 * variant)
    im = Image.new("RGB", (size, size), bg)
    d = ImageDraw.Draw(im)
    o = 6 * variant
    box = (16 + o, 16 + o, 64 + o, 64 + o)
    if shape == "circle":
        d.ellipse(box, fill=rgb)
    elif shape == "square":
        d.rectangle(box, fill=rgb)
    elif shape == "triangle":
        d.polygon([(box[0], box[3]), (box[2], box[3]), ((box[0] + box[2]) // 2, box[1])], fill=rgb)
    else:  # bar
        d.rectangle((box[0] + 14, box[1] - 8, box[2] - 14, box[3] + 8), fill=rgb)
    return im


def write_foodiml_catalogue(folder: Path) -> tuple[Path, list[dict]]:
    """A released-format CSV of a dozen products sold by several stores, with the images it names.

    In each split a product is listed by 3 stores: stores 0 and 1 share the caption with two
    different pictures (duplicates by caption); store 2 words the description differently but
    reuses store 0's picture under another file name with the same ``hash`` (a duplicate by
    hash). One row is repeated verbatim (an exact duplicate the preprocessing drops). Products
    0-9 are in train and listed again, with other pictures, in val (0-4) or test (5-9);
    10-11 are in test only (unseen words): train 30 rows, val 15, test 21. Returns (csv, rows).
    """
    rows = []
    for p, (name, section, desc, rgb, shape) in enumerate(FOODIML_PRODUCTS):
        subsets = (["train", "val"] if p < 5 else ["train", "test"]) if p < 10 else ["test"]
        for subset in subsets:
            tint = 0 if subset == "train" else 20  # the brand's photo, re-shot when relisted
            for s in range(3):
                variant = 1 if s == 1 else 0
                path = f"dataset/ES/{subset}_{p:02d}_{s}.png"
                _product_image(rgb, shape, variant, tint).save(_mkparent(folder / path))
                rows.append({"country_code": "ES", "city_code": "MAD", "store_name": f"Tienda {s}",
                             "product_name": name, "collection_section": section,
                             "product_description": (f"{desc} oferta" if s == 2 else desc),
                             "subset": subset, "HIER": "True", "s3_path": path,
                             "hash": f"h{subset}{p:02d}v{variant}"})
    rows.append(dict(rows[0]))  # an exact duplicate row
    return write_foodiml_csv(folder / "glovo-foodi-ml-dataset.csv", rows), rows


def _mkparent(path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    return path
