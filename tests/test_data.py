import json

import pytest

from pefrl.data import DataError, PromptStream, load_rows


def test_jsonl_rows_and_columns(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a", "answer": "1"}\n\n{"prompt": "b", "answer": "2"}\n')
    assert load_rows(str(path)) == [{"prompt": "a", "answer": "1"}, {"prompt": "b", "answer": "2"}]


def test_bad_json_names_file_and_line(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"prompt": \n')
    with pytest.raises(DataError, match=r"p\.jsonl:2"):
        load_rows(str(path))


def test_missing_prompt_field_names_row(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text('{"prompt": "a"}\n{"question": "b"}\n')
    with pytest.raises(DataError, match=r"row 1 has no field 'prompt'"):
        load_rows(str(path))


def test_empty_file_is_an_error(tmp_path):
    path = tmp_path / "p.jsonl"
    path.write_text("\n")
    with pytest.raises(DataError, match="no rows"):
        load_rows(str(path))


def test_missing_file_is_an_error(tmp_path):
    with pytest.raises(DataError, match="does not exist"):
        load_rows(str(tmp_path / "nope.jsonl"))


def test_csv_through_datasets(tmp_path):
    path = tmp_path / "p.csv"
    path.write_text("prompt,answer\nx,1\ny,2\n")
    rows = load_rows(str(path))
    assert [r["prompt"] for r in rows] == ["x", "y"] and rows[0]["answer"] == 1


def test_stream_covers_each_row_once_per_pass_and_resumes():
    rows = [{"prompt": str(i)} for i in range(10)]
    stream = PromptStream(rows, seed=3)
    first_pass = stream.next_batch(4) + stream.next_batch(4) + stream.next_batch(2)
    assert sorted(r["prompt"] for r in first_pass) == [str(i) for i in range(10)]
    stream.next_batch(3)
    state = json.loads(json.dumps(stream.state_dict()))
    expected = stream.next_batch(7)
    resumed = PromptStream(rows, seed=3)
    resumed.load_state_dict(state)
    assert resumed.next_batch(7) == expected


def test_online_iterable_ends_the_stream():
    stream = PromptStream(({"prompt": str(i)} for i in range(5)), seed=0)
    assert len(stream.next_batch(2)) == 2
    assert len(stream.next_batch(2)) == 2
    assert stream.next_batch(2) is None
