"""Streaming detokenization with the tiny byte-level BPE tokenizer: the streamed text must be the text a user
would get from decoding all tokens at once, and stop strings must cut it exactly."""

from __future__ import annotations

import random

import pytest

from fs_engine.tokenizer import IncrementalDetokenizer, load_tokenizer

UNICODE_TEXTS = [
    "Héllo, wörld! naïve café, crème brûlée",
    "你好，世界。日本語のテキスト、한국어 텍스트",
    "rocket 🚀 family 👩‍👩‍👧 flag 🇯🇵 ∑x² ≠ 0 — done",
    "The quick brown fox jumps over the lazy dog.\n\tdef f(x):\n        return x ** 2",
]


@pytest.fixture(scope="module", params=["qwen3", "llama"])
def tokenizer(request, tiny_model_dirs):
    tok = load_tokenizer(tiny_model_dirs[request.param])
    assert tok is not None
    return tok


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def stream(tokenizer, ids: list[int], stop: tuple[str, ...] = (), skip_special_tokens: bool = True):
    """Feed ``ids`` one at a time until a stop string matches; returns (detokenizer, tokens fed, stop)."""
    detok = IncrementalDetokenizer(tokenizer, stop, skip_special_tokens)
    for n, token in enumerate(ids, 1):
        matched = detok.append(token)
        if matched is not None:
            return detok, n, matched
    return detok, len(ids), None


@pytest.mark.parametrize("text", UNICODE_TEXTS)
def test_streamed_text_equals_decoding_everything(tokenizer, text):
    ids = encode(tokenizer, text)
    # the unicode cases are only meaningful if some character is split over several tokens
    assert text.isascii() or any("\ufffd" in tokenizer.decode([i]) for i in ids)
    detok, _, matched = stream(tokenizer, ids)
    assert matched is None
    assert detok.text == tokenizer.decode(ids, skip_special_tokens=True) == text


def test_text_grows_monotonically_and_never_shows_a_broken_character(tokenizer):
    ids = encode(tokenizer, UNICODE_TEXTS[2])
    detok = IncrementalDetokenizer(tokenizer)
    previous = ""
    for token in ids:
        detok.append(token)
        assert detok.text.startswith(previous)
        assert "\ufffd" not in detok.text
        previous = detok.text


def test_random_token_sequences_stream_like_a_full_decode(tokenizer):
    # random ids include lone continuation bytes; streamed text is the full decode up to the last point where
    # it did not end in an incomplete character
    rng = random.Random(0)
    special = set(tokenizer.all_special_ids)
    vocab = [i for i in range(len(tokenizer)) if i not in special]
    byte_tokens = [i for i in vocab if tokenizer.decode([i]) == "\ufffd"]
    for _ in range(200):
        ids = [rng.choice(byte_tokens) if rng.random() < 0.7 else rng.choice(vocab) for _ in range(rng.randint(1, 24))]
        detok, _, _ = stream(tokenizer, ids)
        complete = max(j for j in range(len(ids) + 1) if not tokenizer.decode(ids[:j]).endswith("\ufffd"))
        assert detok.text == tokenizer.decode(ids[:complete]), ids
        detok.flush()  # the request ends: whatever was held back comes out as decode() shows it
        assert detok.text == tokenizer.decode(ids), ids


def test_flush_emits_a_trailing_incomplete_character_like_decode(tokenizer):
    ids = encode(tokenizer, "naïve")
    cut = next(j for j in range(1, len(ids)) if tokenizer.decode(ids[:j]).endswith("\ufffd"))
    detok, _, _ = stream(tokenizer, ids[:cut])
    assert "\ufffd" not in detok.text
    assert detok.flush() is None
    assert detok.text == tokenizer.decode(ids[:cut])
    assert detok.text.endswith("\ufffd") and detok.text.startswith("n")


def test_flush_finds_a_stop_string_in_held_back_text(tokenizer):
    ids = encode(tokenizer, "naïve")
    cut = next(j for j in range(1, len(ids)) if tokenizer.decode(ids[:j]).endswith("\ufffd"))
    held_text = tokenizer.decode(ids[:cut]).rstrip("\ufffd")
    stop = held_text[-1]  # the last complete character, held back together with the incomplete one
    detok, _, matched = stream(tokenizer, ids[:cut], stop=(stop,))
    assert matched is None
    assert detok.flush() == stop
    assert detok.text == held_text[: held_text.index(stop)]


def test_flush_with_nothing_held_changes_nothing(tokenizer):
    detok, _, _ = stream(tokenizer, encode(tokenizer, "plain text"))
    assert detok.flush() is None
    assert detok.text == "plain text"


def test_special_tokens_are_skipped_in_text(tokenizer):
    eos, im_start = tokenizer.convert_tokens_to_ids(["<|im_end|>", "<|im_start|>"])
    ids = [im_start] + encode(tokenizer, "hello") + [eos] + encode(tokenizer, " world") + [eos]
    detok, _, _ = stream(tokenizer, ids)
    assert detok.text == "hello world" == tokenizer.decode(ids, skip_special_tokens=True)
    kept, _, _ = stream(tokenizer, ids, skip_special_tokens=False)
    assert kept.text == "<|im_start|>hello<|im_end|> world<|im_end|>"


def test_stop_string_spanning_two_tokens_cuts_the_text_before_it(tokenizer):
    text = "Once upon a time, in a small town by the sea"
    ids = encode(tokenizer, text)
    pieces = [tokenizer.decode([i]) for i in ids]
    # a stop string made of the end of one multi-char token and the start of the next
    i = next(i for i in range(len(pieces) - 1) if len(pieces[i]) >= 2 and len(pieces[i + 1]) >= 2
             and text.count(pieces[i][-2:] + pieces[i + 1][:2]) == 1)
    stop = pieces[i][-2:] + pieces[i + 1][:2]
    detok, fed, matched = stream(tokenizer, ids, stop=(stop,))
    assert matched == stop
    assert fed == i + 2  # found by the token that completes it, not later
    assert detok.text == text[: text.index(stop)]


def test_stop_string_inside_a_multibyte_character_run(tokenizer):
    text = "weather: 你好，世界 and more"
    detok, _, matched = stream(tokenizer, encode(tokenizer, text), stop=("好，世",))
    assert matched == "好，世"
    assert detok.text == "weather: 你"


def test_earliest_stop_string_wins(tokenizer):
    text = "The quick brown fox jumps over the lazy dog."
    ids = encode(tokenizer, text)
    # "brown fox" starts before "fox" although both complete with the same token; "lazy" comes later
    detok, _, matched = stream(tokenizer, ids, stop=("lazy", "fox", "brown fox"))
    assert matched == "brown fox"
    assert detok.text == "The quick "
    detok, _, matched = stream(tokenizer, ids, stop=("lazy", "jumps"))
    assert matched == "jumps"
    assert detok.text == "The quick brown fox "


def test_stop_string_at_the_very_start(tokenizer):
    detok, _, matched = stream(tokenizer, encode(tokenizer, "Hello there"), stop=("Hel",))
    assert matched == "Hel"
    assert detok.text == ""


def test_no_stop_string_returns_none(tokenizer):
    text = UNICODE_TEXTS[0]
    detok, _, matched = stream(tokenizer, encode(tokenizer, text), stop=("xyz", "\n\n"))
    assert matched is None
    assert detok.text == text


def test_stop_string_made_of_a_special_token_when_specials_are_kept(tokenizer):
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    ids = encode(tokenizer, "answer") + [eos] + encode(tokenizer, "junk")
    detok, fed, matched = stream(tokenizer, ids, stop=("<|im_end|>",), skip_special_tokens=False)
    assert matched == "<|im_end|>"
    assert fed == ids.index(eos) + 1
    assert detok.text == "answer"


def test_load_tokenizer_without_tokenizer_files_returns_none(tmp_path):
    (tmp_path / "config.json").write_text("{}")
    assert load_tokenizer(tmp_path) is None
