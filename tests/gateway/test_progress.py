"""`pdmesh bench` progress (gateway.progress): a line per phase on stderr when it is not a
terminal, rich bars when it is; stdout keeps only the figures."""
from __future__ import annotations

import io
import json
import logging
import re

from click.testing import CliRunner

from gateway.cli import main
from gateway.progress import LOGGER, shown

LINE = re.compile(r"^pdmesh bench (\S+): \[\d+\.\d s\] (.+)$")


def _phases(text: str, command: str) -> list[str]:
    found = [LINE.match(line) for line in text.splitlines()]
    return [m.group(2) for m in found if m and m.group(1) == command]


def test_phase_lines_name_each_phase_once_and_steps_by_quarters():
    stream, log = io.StringIO(), logging.getLogger(LOGGER)
    with shown("demo", stream):
        log.info("loading")
        log.info("loading")  # the same phase again: no new line
        for done in range(9):
            log.info("steps", extra={"done": done, "total": 8})
        log.info("done")
    assert _phases(stream.getvalue(), "demo") == ["loading", "steps", "steps: 2/8", "steps: 4/8", "steps: 6/8",
                                                  "steps: 8/8", "done"]
    log.info("after the run: not shown")
    assert "after the run" not in stream.getvalue()


class _Terminal(io.StringIO):
    def isatty(self) -> bool:
        return True


def test_a_terminal_gets_bars_with_the_steps_done():
    stream, log = _Terminal(), logging.getLogger(LOGGER)
    with shown("demo", stream):
        log.info("loading")
        for done in range(4):
            log.info("steps", extra={"done": done, "total": 3})
    text = stream.getvalue()
    assert "\x1b[" in text and "steps" in text and "3/3" in text
    assert not _phases(text, "demo")  # bars, not lines


def test_bench_gateway_shows_its_phases_on_stderr_and_only_json_on_stdout():
    result = CliRunner().invoke(main, ["bench", "gateway", "--requests", "5", "--concurrency", "2",
                                       "--seconds", "0.2", "--output", "json"], catch_exceptions=False)
    assert result.exit_code == 0, result.output
    json.loads(result.stdout)
    assert _phases(result.stderr, "gateway") == ["starting a gateway on stand-in actors",
                                                 "5 requests straight to the service",
                                                 "5 requests over gRPC, then over HTTP",
                                                 "2 gRPC callers for 0.2 s"]
