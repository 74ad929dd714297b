"""Tokenizer loading and incremental detokenization with stop strings."""

from __future__ import annotations

from pathlib import Path
from typing import Any

try:
    from tokenizers.decoders import DecodeStream
except ImportError:  # tokenizers < 0.21: the windowed decode below does the same, a little slower
    DecodeStream = None

TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tokenizer_config.json")


def load_tokenizer(path: str | Path) -> Any | None:
    """The Hugging Face tokenizer in ``path``, or None when the directory has no tokenizer files
    (the engine then serves token-id prompts only)."""
    path = Path(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


class IncrementalDetokenizer:
    """Turns a growing list of output token ids into text, a little at a time.

    Byte-level tokenizers may split one character over several tokens; text ending in U+FFFD (an
    incomplete character) is held back until the next token completes it. With a fast tokenizer each token
    goes through the ``tokenizers`` library's streaming decoder (``DecodeStream``, one decode of a few
    tokens in Rust); otherwise decoding restarts from a window of a few recent tokens. Either way a step
    costs O(1) tokens, and stop strings are searched only in the region that new text can affect.
    """

    _WINDOW = 6  # tokens of context decoded before the new ones, so merges at the boundary come out right

    def __init__(self, tokenizer: Any, stop: tuple[str, ...] = (), skip_special_tokens: bool = True) -> None:
        self.tokenizer = tokenizer
        self.stop = stop
        self.skip_special_tokens = skip_special_tokens
        self.text = ""
        self._ids: list[int] = []
        self._prefix_offset = 0  # start of the decoding window in _ids
        self._read_offset = 0  # _ids before this are already in self.text
        self._max_stop_len = max((len(s) for s in stop), default=0)
        self._backend = getattr(tokenizer, "_tokenizer", None)  # the Rust tokenizer behind a fast tokenizer
        self._stream = None
        if DecodeStream is not None and self._backend is not None:
            self._stream = DecodeStream(skip_special_tokens=skip_special_tokens)

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    @property
    def num_tokens(self) -> int:
        """Tokens appended so far."""
        return len(self._ids)

    def append(self, token_id: int) -> str | None:
        """Add one token. Returns the stop string matched (the text is then cut before it), else None."""
        self._ids.append(token_id)
        if self._stream is None:
            return self._emit(final=False)
        piece = self._stream.step(self._backend, token_id)
        if not piece:
            return None  # nothing yet, or an incomplete character
        search_from = max(0, len(self.text) - self._max_stop_len + 1)
        self.text += piece
        self._read_offset = len(self._ids)
        self._prefix_offset = max(0, self._read_offset - self._WINDOW)  # where a flush decodes from
        return self._find_stop(search_from)

    def flush(self) -> str | None:
        """The request ended: emit text held back for an incomplete character (as U+FFFD, like decode())."""
        return self._emit(final=True) if self._read_offset < len(self._ids) else None

    def _emit(self, final: bool) -> str | None:
        prefix = self._decode(self._ids[self._prefix_offset : self._read_offset])
        full = self._decode(self._ids[self._prefix_offset :])
        if len(full) <= len(prefix) or (full.endswith("\ufffd") and not final):
            return None  # a token that decodes to nothing yet, or an incomplete character
        new_text = full[len(prefix) :]
        search_from = max(0, len(self.text) - self._max_stop_len + 1)
        self.text += new_text
        self._prefix_offset = max(self._read_offset, len(self._ids) - self._WINDOW)
        self._read_offset = len(self._ids)
        return self._find_stop(search_from)

    def _find_stop(self, search_from: int) -> str | None:
        best: tuple[int, str] | None = None
        for s in self.stop:
            pos = self.text.find(s, search_from)
            if pos != -1 and (best is None or pos < best[0]):
                best = (pos, s)
        if best is None:
            return None
        self.text = self.text[: best[0]]
        return best[1]
