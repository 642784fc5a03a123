"""Data sources that are not clean UTF-8 or are empty: errors name the file and the byte offset, replaced bytes are
counted in one warning, empty files are named."""

from __future__ import annotations

import json
import warnings

import pytest

from memzoo.train.data import DataWarning, iter_documents, prepare


def docs(source, **kw):
    return list(iter_documents(source, **kw))


def test_non_utf8_text_warns_once_with_the_count_of_replaced_bytes(tmp_path):
    (tmp_path / "a.txt").write_bytes("caf\u00e9 ok\n".encode("latin-1") + b"\xff\xfe end")  # 3 bad bytes
    (tmp_path / "b.txt").write_bytes("na\u00efve".encode("latin-1"))  # 1 bad byte
    (tmp_path / "c.txt").write_text("clean text")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        out = docs(f"file:{tmp_path}/*.txt")
    ours = [w for w in caught if issubclass(w.category, DataWarning)]
    assert len(ours) == 1
    msg = str(ours[0].message)
    assert "4 byte(s) in 2 file(s) are not valid UTF-8" in msg
    assert f"first in {tmp_path / 'a.txt'} at byte offset 3" in msg and "decode_errors='strict'" in msg
    assert out[0].startswith("caf\ufffd ok") and out[2] == "clean text"


def test_strict_decoding_names_the_file_and_byte_offset(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"hello \xe9 world")
    with pytest.raises(ValueError, match=rf"{tmp_path / 'a.txt'}: not valid UTF-8 at byte offset 6 .*byte 0xe9"):
        docs(f"file:{tmp_path}/*.txt", errors="strict")


def test_latin1_jsonl_names_the_file_line_and_offset(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_bytes(b'{"text": "fine"}\n' + '{"text": "caf\u00e9"}\n'.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{path}: not valid UTF-8 at byte offset 30"):
        docs(f"file:{path}", errors="strict")
    with pytest.warns(DataWarning, match=r"1 byte\(s\) in 1 file\(s\).*rows.jsonl at byte offset 30"):
        assert docs(f"file:{path}") == ["fine", "caf\ufffd"]


def test_bad_jsonl_lines_are_named(tmp_path):
    path = tmp_path / "rows.jsonl"
    path.write_text('{"text": "a"}\n\n{"text": "b", oops}\n')
    with pytest.raises(ValueError, match=rf"{path}: line 3 \(byte offset 29\) is not valid JSON"):
        docs(f"file:{path}")
    path.write_text('{"text": "a"}\n{"body": "b"}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl: line 2 has no field 'text' \(got \['body'\]\); set "
                                         r"data.text_field"):
        docs(f"file:{path}")
    path.write_text('{"text": 3}\n')
    with pytest.raises(ValueError, match=r"rows.jsonl: line 1: field 'text' must be a string, got int"):
        docs(f"file:{path}")


def test_jsonl_rows_read_like_the_datasets_reader(tmp_path):
    rows = [{"text": "first \u00e9\u4e2d", "id": 1}, {"text": "second\nline", "id": 2}]
    (tmp_path / "r.jsonl").write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    assert docs(f"file:{tmp_path}/r.jsonl") == [r["text"] for r in rows]


def test_latin1_json_array_is_named_before_the_arrow_reader(tmp_path):
    path = tmp_path / "rows.json"
    path.write_bytes('[{"text": "caf\u00e9"}]'.encode("latin-1"))
    with pytest.raises(ValueError, match=rf"{path}: not valid UTF-8 at byte offset 14"):
        docs(f"file:{path}")


def test_empty_files_are_named(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "blank.jsonl").write_text("\n\n")
    with pytest.raises(ValueError, match=r"every file is empty: .*empty.txt.*blank.jsonl"):
        docs(f"file:{tmp_path}/*")
    (tmp_path / "full.txt").write_text("some text")
    with pytest.warns(DataWarning, match=r"skipped 2 empty file\(s\): .*empty.txt"):
        assert docs(f"file:{tmp_path}/*") == ["some text"]


def test_prepare_passes_decode_errors_through(tmp_path):
    (tmp_path / "a.txt").write_bytes(b"bad \xff byte " * 20)
    with pytest.raises(ValueError, match=r"a.txt: not valid UTF-8 at byte offset 4"):
        prepare(f"file:{tmp_path}/a.txt", "byte", tmp_path / "out", decode_errors="strict")
    with pytest.warns(DataWarning, match=r"20 byte\(s\) in 1 file\(s\)"):
        meta = prepare(f"file:{tmp_path}/a.txt", "byte", tmp_path / "out")
    assert meta["tokens"]["train"] > 0


def test_bad_errors_option_is_named():
    with pytest.raises(ValueError, match=r"errors must be one of \('replace', 'strict'\), got 'ignore'"):
        docs("pydoc", errors="ignore")
