"""Incremental detokenization with stop strings, one per request."""
from __future__ import annotations

from tokenizers.decoders import DecodeStream

from mesh.engine.tokenizer import Tokenizer


class Detokenizer:
    """Turns a request's tokens into text deltas and spots its stop strings.

    While stop strings are set, the last (longest stop - 1) characters are held
    back, so that no delta sent to a client ever holds part of a stop string.
    Only a finished request's last delta releases them: a prefill handing its
    request on is not finished, and the decode side `resume`s from the same tokens
    to the same point, so every character is sent once, on one side or the other.
    """

    def __init__(self, tokenizer: Tokenizer, stop: tuple[str, ...]):
        self._tokenizer = tokenizer.backend
        self._stream = DecodeStream(skip_special_tokens=True)
        self._stop = stop
        self._hold = max((len(s) for s in stop), default=1) - 1
        self.text = ""
        self._sent = 0
        self.stopped = False

    def add(self, token_id: int) -> None:
        """Adds a generated token; sets `stopped` when a stop string appeared (the text ends before it)."""
        piece = self._stream.step(self._tokenizer, token_id)
        if not piece or self.stopped:
            return
        start = max(0, len(self.text) - self._hold)
        self.text += piece
        hits = [at for at in (self.text.find(s, start) for s in self._stop) if at >= 0]
        if hits:
            self.text = self.text[:min(hits)]
            self.stopped = True

    def resume(self, token_ids: list[int]) -> None:
        """Takes over a request from the side that generated token_ids and sent their
        unfinished deltas: the same tokens give the same text, of which that side sent
        exactly what one non-final delta now gives."""
        for t in token_ids:
            self.add(t)
        self.delta(final=False)

    def delta(self, final: bool) -> str:
        """The text not sent yet; all of it once the request is finished."""
        end = len(self.text) if final or self.stopped else max(self._sent, len(self.text) - self._hold)
        out = self.text[self._sent:end]
        self._sent = end
        return out
