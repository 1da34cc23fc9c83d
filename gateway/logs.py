"""`pdmesh serve`'s log: one record a line on stderr, as text or as JSON objects, at the level
asked for, and fit for a file: no ANSI colour codes in the lines Ray forwards from the actors,
and an error of Ray's that nobody waited for ("Unhandled error", a remote traceback) as one
line at DEBUG (the mesh handles its actors' failures itself and logs them there)."""
from __future__ import annotations

import json
import logging
import os
import sys
import time

LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("text", "json")
TEXT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
ACCESS = '%a "%r" %s %b %Tfs "%{User-Agent}i" %{X-Request-Id}o'  # aiohttp's access log format


class JsonFormatter(logging.Formatter):
    """One JSON object a record: ts (UTC, ISO 8601), level, logger, message, and exc (the
    traceback as one string) when the record has one."""

    def format(self, record: logging.LogRecord) -> str:
        out = {"ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
               "level": record.levelname.lower(), "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, ensure_ascii=False)


class _UnhandledRayError(logging.Filter):
    """Ray's "Unhandled error" (an actor call's error that no one fetched) as its first line, at DEBUG."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        if message.startswith("Unhandled error"):
            record.msg, record.args = message.splitlines()[0], ()
            record.levelno, record.levelname = logging.DEBUG, "DEBUG"
        return logging.getLogger().isEnabledFor(record.levelno)


def configure(level: str = "info", fmt: str = "text") -> None:
    """Sets up the process's logging; call before Ray starts (its colour setting is read from
    the environment)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT))
    logging.basicConfig(level=getattr(logging, level.upper()), handlers=[handler], force=True)
    if fmt == "json" or not sys.stderr.isatty():
        os.environ.setdefault("RAY_COLOR_PREFIX", "0")  # Ray's prefixes of actor lines, uncoloured
    import ray  # noqa: F401  (importing Ray gives its logger a handler of its own, replaced here)

    logging.getLogger("ray").handlers = [handler]
    logging.getLogger("ray._private.worker").addFilter(_UnhandledRayError())
