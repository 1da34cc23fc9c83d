"""Prompt text to token ids without stalling the gateway's event loop.

A 4 MB prompt takes seconds to tokenize; on the event loop that would stall every other
request, /health included. Short prompts (the common case, well under a millisecond) are
tokenized inline; longer ones go to a few worker threads (the tokenizer releases the GIL).
At most `max_pending` long prompts are admitted at once, running or waiting for a thread: one
more is refused at once with RESOURCE_EXHAUSTED rather than queued without bound. A slot is
held until its thread is done, even when the client has left, so the bound is on real work."""
from __future__ import annotations

import asyncio
import threading
from concurrent.futures import Future, ThreadPoolExecutor

from gateway.errors import GatewayError
from mesh import Tokenizer

INLINE_CHARS = 1024  # tokenized on the loop: about a millisecond at worst


def max_prompt_chars(tokenizer: Tokenizer, max_model_len: int) -> int:
    """The longest text that can fit the context: each token covers at most as many characters
    as its longest vocabulary entry has (byte-level entries have one character a byte). Only a
    normalizer that shortens text (NFC composing accents) could beat it, by a small factor, on a
    prompt made of nothing but the longest tokens."""
    return max_model_len * max(map(len, tokenizer.backend.get_vocab()))


class Tokenizing:
    def __init__(self, threads: int, max_pending: int, retry_after_s: float = 0.5):
        self.max_pending = max_pending
        self.retry_after_s = retry_after_s
        self._pool = ThreadPoolExecutor(threads, thread_name_prefix="pdmesh-tokenize")
        self._lock = threading.Lock()  # `pending` is released from the worker threads
        self.pending = 0

    async def encode(self, tokenizer: Tokenizer, text: str) -> list[int]:
        if len(text) <= INLINE_CHARS:
            return tokenizer.encode(text)
        with self._lock:
            if self.pending >= self.max_pending:
                raise GatewayError("resource_exhausted", f"{self.pending} long prompts are being tokenized, the "
                                                         "most this gateway takes at once "
                                                         "(gateway.max_tokenizing); retry later",
                                   retry_after_s=self.retry_after_s)
            self.pending += 1
        work = self._pool.submit(tokenizer.encode, text)
        work.add_done_callback(self._done)
        return await asyncio.wrap_future(work)  # a cancelled wait cancels the work if not yet started

    def _done(self, _: Future) -> None:
        with self._lock:
            self.pending -= 1

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
