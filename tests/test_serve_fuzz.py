"""Fuzzing ``xmodal serve``'s API from its own OpenAPI schema with schemathesis (v4).

The schema is read from the app (``/openapi.json`` over ASGI, in process) serving a tiny pixel
run's image index (a table dataset: rows carry their captions) and caption index. For every
operation, hypothesis draws schema-valid requests (positive) and, where the operation has
parameters, schema-violating ones (negative), a bounded number each; every response goes
through schemathesis' default checks: no 5xx, the status code, content type, headers and body
documented for the operation (errors in the one JSON error shape), invalid data rejected with
a 4xx, valid data accepted. Afterwards the server must still answer a normal text query.

``@schema.parametrize()`` needs the schema at import time (``from_fixture`` does not work with
pytest 9), so each operation's strategy is driven with ``@given`` inside the test instead.
"""
from __future__ import annotations

import io
import time

import pytest

pytest.importorskip("fastapi", reason="the serve extra is not installed (pip install 'xmodal[serve]')")
schemathesis = pytest.importorskip("schemathesis", reason="schemathesis is not installed")

from fastapi.testclient import TestClient  # noqa: E402
from hypothesis import HealthCheck, Phase, given, settings  # noqa: E402
from PIL import Image  # noqa: E402
from schemathesis import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import positive_data_acceptance  # noqa: E402

from test_serve import build_pixel_fixture  # noqa: E402
from xmodal.serve import create_app, load_service  # noqa: E402

OPERATIONS = ["GET /api/health", "GET /api/info", "GET /api/search", "POST /api/search/image", "GET /api/thumb/{row}"]
#: examples per operation and generation mode (the whole file runs in about 30 s on 2 busy cores)
EXAMPLES = {"GET /api/health": 5, "GET /api/info": 5, "GET /api/search": 60, "POST /api/search/image": 60,
            "GET /api/thumb/{row}": 50}
FUZZ = settings(deadline=None, database=None, phases=[Phase.generate], derandomize=True,
                suppress_health_check=list(HealthCheck))


@pytest.fixture(scope="module")
def fx(tmp_path_factory):
    return build_pixel_fixture(tmp_path_factory.mktemp("serve_fuzz"), table_index=True)


@pytest.fixture(scope="module")
def app(fx):
    return create_app(load_service(fx["table_index"], fx["text_index"]))


@pytest.fixture(scope="module")
def api(app):
    return schemathesis.openapi.from_asgi("/openapi.json", app)


def test_the_schema_lists_every_operation(api):
    labels = sorted(op.ok().label for op in api.get_all_operations())
    assert labels == sorted(OPERATIONS)  # a new route must be added to OPERATIONS to be fuzzed


def _has_inputs(op) -> bool:
    return bool(list(op.iter_parameters())) or bool(op.body)


@pytest.mark.parametrize("mode", [GenerationMode.POSITIVE, GenerationMode.NEGATIVE], ids=["valid", "invalid"])
@pytest.mark.parametrize("label", OPERATIONS)
def test_fuzz_operation(api, label, mode):
    op = api.find_operation_by_label(label)
    if mode == GenerationMode.NEGATIVE and not _has_inputs(op):
        pytest.skip(f"{label} has no parameters or body to make invalid")
    # the schema cannot say "a decodable image": random bytes uploaded as one are rightly refused
    # (415 not_an_image, 400 bad_image); test_real_uploads_conform checks real images are accepted
    excluded = [positive_data_acceptance] if label == "POST /api/search/image" else []
    statuses: dict[int, int] = {}

    @given(case=op.as_strategy(generation_mode=mode))
    @settings(FUZZ, max_examples=EXAMPLES[label])
    def run(case):
        response = case.call_and_validate(excluded_checks=excluded)
        statuses[response.status_code] = statuses.get(response.status_code, 0) + 1

    t0 = time.perf_counter()
    run()
    print(f"{label} {mode.value}: {sum(statuses.values())} requests in {time.perf_counter() - t0:.1f} s, "
          f"statuses {dict(sorted(statuses.items()))}")
    assert statuses and max(statuses) < 500
    if mode == GenerationMode.NEGATIVE:  # some "invalid" requests only add unknown query parameters,
        assert any(400 <= s < 500 for s in statuses), statuses  # which are ignored: 200 is right for them


def _png(rgb=(20, 20, 220)) -> bytes:
    buf = io.BytesIO()
    Image.new("RGB", (40, 48), rgb).save(buf, "PNG")
    return buf.getvalue()


def test_real_uploads_conform(api):
    """Real images, as multipart and as a raw image/* body: accepted (200) and documented."""
    op = api.find_operation_by_label("POST /api/search/image")
    for case in (op.Case(media_type="multipart/form-data", body={"file": _png()}, query={"k": 3}),
                 op.Case(media_type="image/png", body=_png((220, 20, 20)), query={"k": 2})):
        response = case.call_and_validate()
        assert response.status_code == 200
        body = response.json()
        assert body["images"] and all(r["label"].startswith("a ") and r["captions"] for r in body["images"])


def test_still_answers_a_text_query_after_fuzzing(app):
    with TestClient(app) as client:
        resp = client.get("/api/search", params={"q": "a red picture", "k": 3})
        assert resp.status_code == 200
        results = resp.json()["results"]
        assert len(results) == 3 and all(r["label"] == r["captions"][0] for r in results)
        assert client.get("/api/health").json()["status"] == "ok"
