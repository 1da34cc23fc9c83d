"""OpenAI's response objects for one request of n choices: whole, or as stream chunks.

Log-probabilities carry each token's text (its bytes decoded alone, as vLLM and OpenAI do;
vLLM's `return_tokens_as_token_ids` gives "token_id:<id>" instead) and the top alternatives
the client asked for. Completions' `text_offset` counts each choice's characters so far
across the chunks of a stream."""
from __future__ import annotations

import time
from typing import Callable

from gateway.service import Chunk

CHAT = "chat.completion"
COMPLETION = "text_completion"


class ResponseShape:
    def __init__(self, kind: str, request_id: str, model: str, token_text: Callable[[int], str]):
        self.kind, self.model, self.created = kind, model, int(time.time())
        self.id = ("chatcmpl-" if kind == CHAT else "cmpl-") + request_id
        self.token_text = token_text
        self._offsets: dict[int, int] = {}  # choice -> characters of its tokens so far

    @property
    def _chunk_object(self) -> str:
        return "chat.completion.chunk" if self.kind == CHAT else COMPLETION

    def _object(self, obj: str, choices: list, usage: dict | None = None) -> dict:
        out = {"id": self.id, "object": obj, "created": self.created, "model": self.model, "choices": choices}
        if usage is not None:
            out["usage"] = usage
        return out

    def _choice(self, index: int, chunk: Chunk, delta: bool) -> dict:
        choice: dict = {"index": index, "finish_reason": chunk.finish_reason,
                        "logprobs": self._logprobs(index, chunk)}
        if self.kind == COMPLETION:
            choice["text"] = chunk.text
        else:
            choice["delta" if delta else "message"] = ({"content": chunk.text} if delta else
                                                       {"role": "assistant", "content": chunk.text})
        return choice

    def whole(self, choices: list[list[Chunk]]) -> dict:
        """choices[i]: choice i's chunks, in order."""
        return self._object(self.kind, [self._choice(i, _merged(chunks), delta=False)
                                        for i, chunks in enumerate(choices)],
                            usage([chunks[-1] for chunks in choices]))

    def openings(self, n: int) -> list[dict]:
        """Chat streams open with the assistant's role, one chunk per choice, as OpenAI's do."""
        if self.kind != CHAT:
            return []
        return [self._object(self._chunk_object, [{"index": i, "delta": {"role": "assistant", "content": ""},
                                                   "finish_reason": None, "logprobs": None}]) for i in range(n)]

    def delta(self, index: int, chunk: Chunk) -> dict:
        return self._object(self._chunk_object, [self._choice(index, chunk, delta=True)])

    def usage_only(self, lasts: list[Chunk]) -> dict:
        return self._object(self._chunk_object, [], usage(lasts))

    def _logprobs(self, index: int, chunk: Chunk) -> dict | None:
        if not chunk.logprobs:
            return None
        texts = [self.token_text(t) for t in chunk.token_ids]
        tops = [[(self.token_text(t), lp) for t, lp in row] for row in chunk.top_logprobs or [[] for _ in texts]]
        if self.kind == COMPLETION:
            start = self._offsets.get(index, 0)
            offsets = [start + sum(len(t) for t in texts[:k]) for k in range(len(texts))]
            self._offsets[index] = start + sum(len(t) for t in texts)
            return {"tokens": texts, "token_logprobs": chunk.logprobs, "text_offset": offsets,
                    "top_logprobs": [_by_text(row) for row in tops] if chunk.top_logprobs else None}
        return {"content": [{"token": text, "logprob": lp, "bytes": _bytes(text),
                             "top_logprobs": [{"token": t, "logprob": tlp, "bytes": _bytes(t)} for t, tlp in top]}
                            for text, lp, top in zip(texts, chunk.logprobs, tops)]}


def usage(lasts: list[Chunk]) -> dict:
    """The request's usage from each choice's last chunk: the prompt counts once."""
    completion = sum(c.completion_tokens for c in lasts)
    return {"prompt_tokens": lasts[0].prompt_tokens, "completion_tokens": completion,
            "total_tokens": lasts[0].prompt_tokens + completion}


def _merged(chunks: list[Chunk]) -> Chunk:
    last = chunks[-1]
    return Chunk([t for c in chunks for t in c.token_ids], "".join(c.text for c in chunks),
                 [lp for c in chunks for lp in (c.logprobs or [])] or None, last.finish_reason,
                 last.prompt_tokens, last.completion_tokens, last.request_id, last.scenario,
                 [row for c in chunks for row in (c.top_logprobs or [])] or None)


def _by_text(row: list[tuple[str, float]]) -> dict[str, float]:
    """Completions' {text: logprob}: of tokens whose texts coincide, the most likely keeps the key."""
    out: dict[str, float] = {}
    for text, logprob in row:
        out.setdefault(text, logprob)
    return out


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))
