"""Streaming a top-level JSON array: equal to json.loads on any array, at any chunk size, with
file-and-line errors; the Recipe1M reader reads through it."""
from __future__ import annotations

import json

import pytest
from hypothesis import given, settings, strategies as st

from xmodal.data.jsonstream import iter_json_array
from xmodal.errors import DataError

JSON = st.recursive(st.none() | st.booleans() | st.integers(-10**30, 10**30) | st.floats(allow_nan=False)
                    | st.text(max_size=8),
                    lambda kids: st.lists(kids, max_size=4) | st.dictionaries(st.text(max_size=4), kids, max_size=4),
                    max_leaves=12)


@settings(max_examples=60, deadline=None)
@given(items=st.lists(JSON, max_size=8), indent=st.sampled_from([None, 0, 2]), chunk=st.integers(1, 64))
def test_equals_json_loads_at_any_chunk_size(tmp_path_factory, items, indent, chunk):
    path = tmp_path_factory.mktemp("js") / "a.json"
    path.write_text(json.dumps(items, indent=indent, ensure_ascii=False), encoding="utf-8")
    assert list(iter_json_array(path, chunk=chunk)) == json.loads(path.read_text(encoding="utf-8"))


def test_numbers_cut_by_a_chunk_are_read_whole(tmp_path):
    path = tmp_path / "n.json"
    path.write_text("[123456789, 0.000125, -7e-12, true, null]")
    for chunk in range(1, 12):
        assert list(iter_json_array(path, chunk=chunk)) == [123456789, 0.000125, -7e-12, True, None]


@pytest.mark.parametrize("text, message", [
    ('{"a": 1}', "a.json: expected a JSON list of objects, got an object"),
    ('\n 12', "a.json: expected a JSON list of objects, got a number"),
    ("", "expected a JSON list of objects, got an empty file"),
    ('[{"a": 1},\n {"b": }]', "a.json:2: invalid JSON: Expecting value"),
    ('[{"a": 1}\n {"b": 2}]', "a.json:2: invalid JSON: expected ',' or ']' after a list element, got '{'"),
    ('[{"a": 1},\n', "the list is not closed"),
    ('[1, 2] x', "extra data after the list"),
])
def test_errors_name_the_file_and_line(tmp_path, text, message):
    path = tmp_path / "a.json"
    path.write_text(text)
    with pytest.raises(DataError, match=message.replace("[", r"\[").replace("]", r"\]")):
        list(iter_json_array(path, chunk=4))


def test_bom_and_non_utf8(tmp_path):
    path = tmp_path / "a.json"
    path.write_bytes("\ufeff[1, 2]".encode("utf-8"))
    assert list(iter_json_array(path)) == [1, 2]
    path.write_bytes(b'["\xff"]')
    with pytest.raises(DataError, match="not UTF-8"):
        list(iter_json_array(path))
    with pytest.raises(DataError, match="no such file"):
        list(iter_json_array(tmp_path / "missing.json"))
