from __future__ import annotations

import math

import pytest

from metaembed.errors import InputError
from metaembed.index import DuplicateIdError
from metaembed.index.validate import check_ids, check_metadata, check_unique


def test_check_ids_accepts_strings_and_names_the_bad_position():
    assert check_ids(("a", "b")) == ["a", "b"]
    for bad, match in [("abc", "single str"), (["a", ""], r"ids\[1\] is empty"), (["a", 3], r"ids\[1\] must be a str")]:
        with pytest.raises(InputError, match=match):
            check_ids(bad)
    with pytest.raises(InputError, match=r"ids\[0\]"):
        check_ids(["\ud800"])


def test_check_unique_names_the_repeated_ids():
    check_unique(["a", "b"])
    with pytest.raises(DuplicateIdError, match=r"\['a'\]"):
        check_unique(["a", "b", "a"])


def test_check_metadata_counts_entries_and_refuses_what_json_cannot_store():
    assert check_metadata(None) is None
    assert check_metadata(None, 2) == [None, None]
    entry = {"t": (1, 2)}
    copied = check_metadata([entry, None], 2)
    assert copied == [{"t": [1, 2]}, None] and copied[0] is not entry
    for bad, match in [
        ({"a": 1}, "sequence of dicts"),
        ([1], r"metadata\[0\] must be a dict"),
        ([{"x": math.nan}], r"metadata\[0\] is not JSON"),
        ([{"x": object()}], r"metadata\[0\] is not JSON"),
    ]:
        with pytest.raises(InputError, match=match):
            check_metadata(bad)
    with pytest.raises(InputError, match="2 metadata entries for 3 items"):
        check_metadata([None, None], 3)
