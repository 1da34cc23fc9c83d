"""Errors the engine raises for bad input: each message says what to fix."""


class EngineError(Exception):
    """Base class of the engine's own errors."""


class CheckpointError(EngineError):
    """A checkpoint folder is missing files or describes an unsupported model."""


class RequestError(EngineError, ValueError):
    """A request cannot be served as given (prompt too long, bad sampling values...)."""


class SequenceError(EngineError):
    """One request failed inside a step (its probabilities were not finite, or the step raised
    with it and not without it); the other requests of the step went on."""
