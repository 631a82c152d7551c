"""Reading forget/retain files: every accepted schema and every bad input."""

import json

import pytest

from mdu_cli.data.records import load_dataset
from mdu_cli.errors import DataError, MduError


def _write(tmp_path, text, name="data.jsonl", mode="w"):
    path = tmp_path / name
    if isinstance(text, bytes):
        path.write_bytes(text)
    else:
        path.write_text(text, encoding="utf-8")
    return path


def test_all_schemas_become_messages(tmp_path):
    lines = [
        {"question": "q1", "answer": "a1", "extra": 3},
        {"prompt": "q2", "completion": "a2"},
        {"prompt": "q3", "response": "a3"},
        {"messages": [{"role": "system", "content": "s"}, {"role": "user", "content": "q4"},
                      {"role": "assistant", "content": "a4"}]},
    ]
    data = load_dataset(_write(tmp_path, "\n".join(json.dumps(x) for x in lines) + "\n\n"))
    assert len(data) == 4
    assert data.records[0].prompt_messages == [{"role": "user", "content": "q1"}]
    assert data.records[1].response == "a2"
    assert data.records[2].response == "a3"
    assert [m["role"] for m in data.records[3].prompt_messages] == ["system", "user"]
    assert data.records[3].response == "a4"
    assert data.records[3].source.endswith(":4")


def test_json_array_with_line_numbers(tmp_path):
    text = '[\n  {"question": "q", "answer": "a"},\n  {"question": "q",\n   "answer": ""}\n]\n'
    with pytest.raises(DataError) as err:
        load_dataset(_write(tmp_path, text, "data.json"))
    assert err.value.problems == [f"{tmp_path / 'data.json'}:3: field \"answer\" is empty"]


def test_json_array_ok(tmp_path):
    text = json.dumps([{"question": "q", "answer": "a"}, {"prompt": "p", "response": "r"}], indent=2)
    assert len(load_dataset(_write(tmp_path, text, "data.json"))) == 2


def test_single_line_jsonl(tmp_path):
    assert len(load_dataset(_write(tmp_path, '{"question": "q", "answer": "a"}'))) == 1


def test_every_bad_record_is_reported_with_its_line(tmp_path):
    lines = [
        '{"question": "fine", "answer": "fine"}',
        '{"question": "q", "answer": ',                     # 2 invalid JSON
        '{"question": "q"}',                                # 3 missing answer
        '{"question": "q", "answer": "   "}',               # 4 empty
        '{"question": 5, "answer": "a"}',                   # 5 non-string
        '{"messages": [{"role": "user", "content": "q"}]}',  # 6 no final assistant turn
        '{"title": "x"}',                                   # 7 unrecognised
        '["not", "an", "object"]',                          # 8 not an object
        '{"prompt": "p"}',                                  # 9 missing completion
        '{"messages": [{"role": "assistant", "content": "a"}]}',  # 10 no prompt turn
    ]
    path = _write(tmp_path, "\n".join(lines) + "\n")
    with pytest.raises(DataError) as err:
        load_dataset(path)
    problems = err.value.problems
    assert [p.split(":")[1] for p in problems] == ["2", "3", "4", "5", "6", "7", "8", "9", "10"]
    assert all(p.startswith(f"{path}:") for p in problems)
    text = "\n".join(problems)
    assert "invalid JSON" in problems[0] and "fix the syntax" in problems[0]
    assert 'missing field "answer"' in problems[1]
    assert 'field "answer" is empty' in problems[2]
    assert 'field "question" must be a string' in problems[3]
    assert "no final assistant turn" in problems[4]
    assert "no recognised fields" in problems[5] and "messages" in problems[5]
    assert "must be a JSON object" in problems[6]
    assert 'missing field "completion" (or "response")' in problems[7]
    assert "add the prompt turn" in problems[8]
    assert "Traceback" not in text


def test_not_utf8_names_the_line(tmp_path):
    path = _write(tmp_path, b'{"question": "q", "answer": "a"}\n{"question": "caf\xe9", "answer": "a"}\n')
    with pytest.raises(DataError) as err:
        load_dataset(path)
    assert err.value.problems == [f"{path}:2: not valid UTF-8 text; save the file as UTF-8"]


@pytest.mark.parametrize("text", ["", "\n\n  \n", "[]"])
def test_empty_file_is_an_error(tmp_path, text):
    with pytest.raises(DataError, match="empty"):
        load_dataset(_write(tmp_path, text))


@pytest.mark.parametrize("text", ['{\n  "data": [{"question": "q", "answer": "a"}]\n}\n', '"just a string"', "42"])
def test_json_document_that_is_not_a_list(tmp_path, text):
    with pytest.raises(DataError, match="not a list of records"):
        load_dataset(_write(tmp_path, text, "data.json"))


def test_missing_file(tmp_path):
    with pytest.raises(MduError, match="no such file"):
        load_dataset(tmp_path / "nope.jsonl")


def test_hash_and_count_but_no_content_in_summary(tmp_path):
    path = _write(tmp_path, '{"question": "secret name", "answer": "secret address"}\n')
    summary = load_dataset(path).summary()
    assert summary["records"] == 1 and len(summary["sha256"]) == 64
    assert "secret" not in json.dumps(summary)


def test_perturbed_answers_are_kept_and_checked(tmp_path):
    good = {"question": "q", "answer": "a", "perturbed_answer": ["b", "c"]}
    single = {"question": "q", "answer": "a", "perturbed_answer": "b"}
    bad = {"question": "q", "answer": "a", "perturbed_answer": ["b", 3]}
    path = _write(tmp_path, "\n".join(json.dumps(x) for x in (good, single)) + "\n")
    data = load_dataset(path)
    assert data.records[0].perturbed == ("b", "c") and data.records[1].perturbed == ("b",)
    with pytest.raises(DataError) as err:
        load_dataset(_write(tmp_path, json.dumps(bad) + "\n", "bad.jsonl"))
    assert err.value.problems[0].endswith(':1: field "perturbed_answer" must be a non-empty string or a list of them')


def test_utf8_byte_order_mark_is_not_part_of_the_first_record(tmp_path):
    records = [{"question": "q1", "answer": "a1"}, {"question": "q2", "answer": "a2"}]
    jsonl = tmp_path / "bom.jsonl"
    jsonl.write_bytes(b"\xef\xbb\xbf" + "".join(json.dumps(r) + "\n" for r in records).encode())
    array = tmp_path / "bom.json"
    array.write_bytes(b"\xef\xbb\xbf" + json.dumps(records, indent=1).encode())
    for path in (jsonl, array):
        data = load_dataset(path)
        assert [r.messages[0]["content"] for r in data.records] == ["q1", "q2"]
        assert data.records[0].source == f"{path}:1" or path == array
    bad = tmp_path / "bom-bad.jsonl"
    bad.write_bytes(b"\xef\xbb\xbf" + b'{"question": "q"}\n')
    with pytest.raises(DataError) as err:
        load_dataset(bad)
    assert err.value.problems == [f'{bad}:1: missing field "answer"']


def test_reported_problems_are_capped_with_a_count_of_the_rest(tmp_path):
    path = tmp_path / "many.jsonl"
    path.write_text("".join('{"question": "q"}\n' for _ in range(60)) + '{"question": "q", "answer": "a"}\n')
    with pytest.raises(DataError) as err:
        load_dataset(path)
    problems = err.value.problems
    assert len(problems) == 51
    assert problems[:50] == [f'{path}:{n}: missing field "answer"' for n in range(1, 51)]
    assert problems[50] == f"{path}: ... and 10 more bad records"
