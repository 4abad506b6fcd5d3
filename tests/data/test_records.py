"""The record readers: a broken JSONL line or parquet file is named by file and line (or row); parquet rows
are read one way (ParquetRows) by evaluation, the builders and training."""

from __future__ import annotations

import json

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from metaembed.data.records import JsonlRows, ParquetRows, iter_records, parquet_files, parse_line
from metaembed.errors import DataError, RecordError


def _write_parquet(path, rows, row_group_size=None):
    path.parent.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.Table.from_pylist(rows), path, row_group_size=row_group_size)


def test_parse_line_names_where_for_every_kind_of_broken_line():
    assert parse_line('{"a": 1}', "f.jsonl:1") == {"a": 1}
    with pytest.raises(RecordError, match=r"^f.jsonl:7: invalid JSON"):
        parse_line("{not json", "f.jsonl:7")
    with pytest.raises(RecordError, match=r"^f.jsonl:8: a record must be a JSON object, got list"):
        parse_line("[1, 2]", "f.jsonl:8")
    with pytest.raises(RecordError, match=r"^f.jsonl:9: not UTF-8"):
        parse_line(b'{"a": "\xff\xfe"}', "f.jsonl:9")


def test_jsonl_errors_name_the_file_and_its_line_counting_blank_lines(tmp_path):
    path = tmp_path / "queries.jsonl"
    path.write_bytes(b'{"id": 1}\n\n{"id": 2}\n{"id": \xff}\n{"id": 4\n')
    rows = JsonlRows([path])
    assert len(rows) == 4 and rows[1] == {"id": 2} and rows.where(1) == f"{path}:3"
    with pytest.raises(RecordError, match=rf"^{path}:4: not UTF-8"):
        rows[2]
    with pytest.raises(RecordError, match=rf"^{path}:5: invalid JSON"):
        rows[3]
    seen = []
    with pytest.raises(RecordError, match=rf"^{path}:4: "):
        for where, _ in iter_records(path):
            seen.append(where)
    assert seen == [f"{path}:1", f"{path}:3"]
    assert [where for where, _ in iter_records(path, on_bad_record="skip")] == seen


def test_parquet_rows_random_access_over_files_and_row_groups(tmp_path):
    first = [{"id": i, "text": f"a{i}"} for i in range(7)]
    second = [{"id": 100 + i, "text": f"b{i}"} for i in range(5)]
    _write_parquet(tmp_path / "d" / "part-0.parquet", first, row_group_size=3)  # groups of 3, 3, 1
    _write_parquet(tmp_path / "d" / "part-1.parquet", second, row_group_size=2)
    rows = ParquetRows(sorted((tmp_path / "d").glob("*.parquet")))
    expected = first + second
    assert len(rows) == 12 and list(rows) == expected
    for i in (11, 0, 5, 3, 8, 2, 7, -1):  # out of order: a row group is decoded again when needed
        assert rows[i] == expected[i]
    assert rows[2:5] == expected[2:5]
    assert rows.where(6) == f"{tmp_path / 'd' / 'part-0.parquet'} row 6"
    assert rows.where(7) == f"{tmp_path / 'd' / 'part-1.parquet'} row 0"
    assert rows.where(-1) == f"{tmp_path / 'd' / 'part-1.parquet'} row 4"
    with pytest.raises(IndexError):
        rows[12]
    assert [w for w, _ in iter_records(tmp_path / "d")][6:8] == [rows.where(6), rows.where(7)]


def test_parquet_files_prefer_the_test_split(tmp_path):
    for name in ("train-0.parquet", "test-1.parquet", "sub/test-0.parquet"):
        _write_parquet(tmp_path / name, [{"x": 1}])
    assert parquet_files(tmp_path) == [tmp_path / "sub" / "test-0.parquet", tmp_path / "test-1.parquet"]
    (tmp_path / "test-1.parquet").unlink()
    (tmp_path / "sub" / "test-0.parquet").unlink()
    assert parquet_files(tmp_path) == [tmp_path / "train-0.parquet"]


def test_broken_parquet_files_are_named(tmp_path):
    good = tmp_path / "good.parquet"
    _write_parquet(good, [{"id": i} for i in range(4)])
    truncated = tmp_path / "truncated.parquet"
    truncated.write_bytes(good.read_bytes()[: good.stat().st_size // 2])
    foreign = tmp_path / "foreign.parquet"
    foreign.write_text(json.dumps({"id": 1}))
    for broken in (truncated, foreign):
        with pytest.raises(DataError, match=rf"cannot read parquet file {broken}"):
            ParquetRows([good, broken])
        with pytest.raises(DataError, match=rf"cannot read parquet file {broken}"):
            list(iter_records(broken))
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match=r"holds no \.parquet files"):
        list(iter_records(tmp_path / "empty"))


def test_a_corrupt_row_group_names_the_file_and_its_rows(tmp_path):
    path = tmp_path / "pages.parquet"
    _write_parquet(path, [{"id": i, "blob": bytes([i]) * 4000} for i in range(6)], row_group_size=3)
    meta = pq.ParquetFile(path).metadata.row_group(1).column(1)
    data = bytearray(path.read_bytes())
    start = meta.dictionary_page_offset or meta.data_page_offset
    data[start : start + meta.total_compressed_size] = b"\x07" * meta.total_compressed_size  # footer intact
    path.write_bytes(bytes(data))
    rows = ParquetRows([path])
    assert len(rows) == 6 and rows[0]["id"] == 0  # the first group still reads
    with pytest.raises(DataError, match=rf"cannot read parquet file {path} rows 3–5"):
        rows[4]
