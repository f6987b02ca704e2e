"""Incremental detokenization with stop strings: constant work per new token.

NOTE: decoding a sequence's whole output again for every new token (what the first runtime
did) costs O(n) per token, O(n^2) per request. Here each step decodes only a short window
of tokens (the prefix-offset / read-offset method of vLLM and text-generation-inference):
`decode(tokens[prefix:])` minus `decode(tokens[prefix:read])` is the new text, which keeps
byte-level merges and sentencepiece spaces right at the window's edge. A window that ends in
an incomplete UTF-8 sequence (U+FFFD) waits for the next token.

The detokenizer also owns stop strings: it cuts the text at the first stop string and holds
back the tail that may still become one, so a consumer never sees text it must retract.

NOTE: the text is kept as a list of pieces: `self.text += piece` on an attribute copies the
whole text every token (O(n) again). Stop-string checks, hold-back and `take_delta` read only
the tail; `text` joins the pieces when a consumer asks for all of it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol

_REPLACEMENT = "\ufffd"
# Tokens of context decoded before the new ones (enough for any merge at the window edge).
_CONTEXT = 5


class Decoder(Protocol):
    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str: ...


class IncrementalDetokenizer:
    """One sequence's output text. Feed tokens with `append`; take text with `take_delta`.

    `decoded_tokens` counts the token ids passed to the tokenizer (a test shows it grows by a
    constant per token however long the output gets).
    """

    def __init__(self, tokenizer: Decoder, skip_special_tokens: bool = True,
                 stop: Sequence[str] = (), include_stop_str_in_output: bool = False) -> None:
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.stop = tuple(stop)
        self.include_stop = include_stop_str_in_output
        self._max_stop = max((len(s) for s in self.stop), default=0)
        self.tokens: list[int] = []
        self._prefix = 0  # window start: context tokens already turned into text
        self._read = 0  # tokens before this are in `text`
        self._pieces: list[str] = []  # "".join(_pieces) is the text
        self._len = 0  # characters of text
        self._sent = 0  # characters already handed out by take_delta
        self.stopped: str | None = None  # the stop string that ended the text
        self.decoded_tokens = 0

    @property
    def text(self) -> str:
        """The output text so far (cut at a stop string)."""
        if len(self._pieces) > 1:
            self._pieces = ["".join(self._pieces)]
        return self._pieces[0] if self._pieces else ""

    def _add(self, piece: str) -> None:
        if piece:
            self._pieces.append(piece)
            self._len += len(piece)

    def _tail(self, n: int) -> str:
        """The last n characters of the text (work proportional to n, not to the text)."""
        if n <= 0:
            return ""
        parts, got = [], 0
        for piece in reversed(self._pieces):
            parts.append(piece)
            got += len(piece)
            if got >= n:
                break
        return "".join(reversed(parts))[-n:]

    def _cut(self, end: int) -> None:
        """Keep the first `end` characters (once, at a stop string)."""
        self._pieces = [self.text[:end]]
        self._len = end

    def _decode(self, ids: list[int]) -> str:
        self.decoded_tokens += len(ids)
        return self.tokenizer.decode(ids, skip_special_tokens=self.skip_special_tokens)

    def append(self, token_ids: Sequence[int], check_stop: bool = True) -> str | None:
        """Add generated tokens. Returns the stop string if the text now ends at one (no
        further text is produced after that). `check_stop` False (the first min_tokens
        tokens) lets text through that contains a stop string."""
        if self.stopped is not None:
            return self.stopped
        self.tokens.extend(token_ids)
        window = self.tokens[self._prefix:]
        prefix_text = self._decode(self.tokens[self._prefix:self._read]) \
            if self._read > self._prefix else ""
        full = self._decode(window)
        if full.endswith(_REPLACEMENT) or len(full) <= len(prefix_text):
            return None  # an incomplete character (or nothing new yet): wait
        before = self._len
        self._add(full[len(prefix_text):])
        self._prefix = max(self._read, len(self.tokens) - _CONTEXT)
        self._read = len(self.tokens)
        return self._check_stop(before) if check_stop else None

    def _check_stop(self, before: int) -> str | None:
        if not self.stop:
            return None
        start = max(0, before - self._max_stop + 1)
        window = self._tail(self._len - start)  # text[start:]: where a new match can be
        hits = [(i, s) for s in self.stop if (i := window.find(s)) >= 0]
        if not hits:
            return None
        i, s = min(hits)
        self._cut(start + i + (len(s) if self.include_stop else 0))
        self.stopped = s
        return s

    def flush(self) -> None:
        """The sequence ended: turn a trailing incomplete character into text too."""
        if self.stopped is None and self._read < len(self.tokens):
            prefix_text = self._decode(self.tokens[self._prefix:self._read]) \
                if self._read > self._prefix else ""
            before = self._len
            self._add(self._decode(self.tokens[self._prefix:])[len(prefix_text):])
            self._read = len(self.tokens)
            self._check_stop(before)

    def _held(self) -> int:
        """Characters at the end of `text` that may still start a stop string."""
        if self.stopped is not None or not self.stop:
            return 0
        text = self._tail(min(self._max_stop - 1, self._len))
        for n in range(len(text), 0, -1):
            tail = text[-n:]
            if any(s.startswith(tail) for s in self.stop):
                return n
        return 0

    def take_delta(self, finished: bool = False) -> str:
        """Text not handed out before and safe to show (everything once `finished`)."""
        end = self._len if finished else self._len - self._held()
        if end <= self._sent:
            return ""
        delta = self._tail(self._len - self._sent)[:end - self._sent]
        self._sent = end
        return delta
