"""Request traces in their published formats, detected from the file, as columns.

- Mooncake JSONL: timestamp (ms), input_length, output_length, hash_ids (512-token prefix blocks)
- Azure LLM inference CSV: TIMESTAMP (wall clock), ContextTokens, GeneratedTokens
- BurstGPT CSV: Timestamp (s), Model, Request tokens, Response tokens, Total tokens, Log Type

A trace is arrival times (seconds from its first request), prompt and output
lengths, tags (BurstGPT's model and log type) and, for Mooncake, prefix block ids.
"""
from __future__ import annotations

import csv
import io
import json
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path

import numpy as np


class TraceError(ValueError):
    """A trace file that cannot be read, with what to fix."""


@dataclass
class Trace:
    kind: str
    arrival_s: np.ndarray  # float64, sorted, from 0
    prompt: np.ndarray  # int64
    output: np.ndarray  # int64, >= 1
    tags: list[tuple[str, ...]] | None = None  # per row, or None
    hash_ids: list[list[int]] | None = None  # per row (Mooncake)
    scenario: np.ndarray | None = None  # per row: an index into a scenario list, set by a workload
    copies: int = 1  # --repeat: rows of copy c have prefix ids shifted by c * hash_span
    hash_span: int = 0
    origin: np.ndarray | None = None  # after --repeat: c * rows + r for row r of copy c
    notes: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.arrival_s)

    def prefix_ids(self, i: int) -> list[int]:
        """Request i's prefix block ids (Mooncake), distinct between copies."""
        if self.hash_ids is None:
            return []
        if self.origin is None:
            return self.hash_ids[i]
        copy, row = divmod(int(self.origin[i]), len(self.hash_ids))
        return [h + copy * self.hash_span for h in self.hash_ids[row]]

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1] - self.arrival_s[0]) if len(self) else 0.0

    def take(self, order: np.ndarray) -> "Trace":
        pick = lambda xs: None if xs is None else [xs[i] for i in order]  # noqa: E731
        return Trace(self.kind, self.arrival_s[order], self.prompt[order], self.output[order], pick(self.tags),
                     pick(self.hash_ids), None if self.scenario is None else self.scenario[order],
                     notes=self.notes)


def read_trace(path: str | Path, time_scale: float = 1.0, limit: int | None = None) -> Trace:
    """Reads a trace in any of the three formats; time_scale < 1 compresses time (more load)."""
    if time_scale <= 0:
        raise TraceError(f"time scale must be positive, got {time_scale}")
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as e:
        raise TraceError(f"cannot read trace {path}: {e.strerror}") from None
    except UnicodeDecodeError:
        raise TraceError(f"{path}: not a text file; expected Mooncake JSONL, Azure CSV or BurstGPT CSV") from None
    head = text.lstrip()[:1]
    if head == "{":
        trace = _mooncake(text, path, limit)
    else:
        header = next(csv.reader(io.StringIO(text)), [])
        cols = [c.strip() for c in header]
        if {"TIMESTAMP", "ContextTokens", "GeneratedTokens"} <= set(cols):
            trace = _azure(text, path, limit)
        elif {"Timestamp", "Request tokens", "Response tokens"} <= set(cols):
            trace = _burstgpt(text, path, limit)
        else:
            raise TraceError(f"{path}: unknown trace format (header {cols[:6]}); expected Mooncake JSONL "
                             "(timestamp, input_length, output_length, hash_ids), Azure CSV (TIMESTAMP, "
                             "ContextTokens, GeneratedTokens) or BurstGPT CSV (Timestamp, Request tokens, "
                             "Response tokens, ...)")
    if not len(trace):
        raise TraceError(f"{path}: no requests")
    order = np.argsort(trace.arrival_s, kind="stable")
    trace = trace.take(order)
    trace.arrival_s = (trace.arrival_s - trace.arrival_s[0]) * time_scale
    return trace


def _fail(path: Path, row: int, what: str) -> TraceError:
    return TraceError(f"{path}: row {row}: {what}")


def _mooncake(text: str, path: Path, limit: int | None) -> Trace:
    t, p, o, h = [], [], [], []
    for i, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            t.append(float(row["timestamp"]) / 1e3)
            p.append(int(row["input_length"]))
            o.append(int(row["output_length"]))
            h.append([int(x) for x in row.get("hash_ids", [])])
        except json.JSONDecodeError as e:
            raise _fail(path, i, f"not JSON ({e.msg})") from None
        except KeyError as e:
            raise _fail(path, i, f"missing {e.args[0]!r} (Mooncake rows need timestamp, input_length, "
                                 "output_length)") from None
        except (TypeError, ValueError):
            raise _fail(path, i, "timestamp, input_length and output_length must be numbers") from None
        if limit and len(t) >= limit:
            break
    return _checked(Trace("mooncake", np.array(t), np.array(p), np.array(o), hash_ids=h), path)


def _rows(text: str, path: Path, limit: int | None):
    reader = csv.DictReader(io.StringIO(text))
    reader.fieldnames = [c.strip() for c in reader.fieldnames or []]
    for i, row in enumerate(reader, 2):
        if limit and i - 2 >= limit:
            return
        yield i, row


def _azure(text: str, path: Path, limit: int | None) -> Trace:
    t, p, o = [], [], []
    for i, row in _rows(text, path, limit):
        try:
            stamp = row["TIMESTAMP"].strip()
            day, _, frac = stamp.partition(".")
            # 7 fractional digits (100 ns): more than datetime parses; read them as a fraction
            t.append(datetime.strptime(day, "%Y-%m-%d %H:%M:%S").timestamp() + float(f"0.{frac or 0}"))
            p.append(int(row["ContextTokens"]))
            o.append(int(row["GeneratedTokens"]))
        except (TypeError, ValueError, AttributeError):
            raise _fail(path, i, "TIMESTAMP must read like 2023-11-16 18:17:03.9799600 and the token "
                                 "counts must be integers") from None
    return _checked(Trace("azure", np.array(t), np.array(p), np.array(o)), path)


def _burstgpt(text: str, path: Path, limit: int | None) -> Trace:
    t, p, o, tags = [], [], [], []
    failed = 0
    for i, row in _rows(text, path, limit):
        try:
            out = int(row["Response tokens"])
            if out == 0:  # a failed request in the log: nothing was generated
                failed += 1
                continue
            t.append(float(row["Timestamp"]))
            p.append(int(row["Request tokens"]))
            o.append(out)
            tags.append((str(row.get("Model", "")).strip(), str(row.get("Log Type", "")).strip()))
        except (TypeError, ValueError):
            raise _fail(path, i, "Timestamp and token counts must be numbers") from None
    trace = _checked(Trace("burstgpt", np.array(t), np.array(p), np.array(o), tags=tags), path)
    if failed:
        trace.notes.append(f"{failed} rows with 0 response tokens (failed requests) skipped")
    return trace


def _checked(trace: Trace, path: Path) -> Trace:
    if len(trace) and (trace.prompt.min() < 1 or trace.output.min() < 1):
        bad = int(np.argmax((trace.prompt < 1) | (trace.output < 1)))
        raise TraceError(f"{path}: request {bad + 1} has {trace.prompt[bad]} prompt and {trace.output[bad]} "
                         "output tokens; both must be at least 1")
    trace.prompt = trace.prompt.astype(np.int64)
    trace.output = trace.output.astype(np.int64)
    trace.arrival_s = trace.arrival_s.astype(np.float64)
    return trace


def repeat(trace: Trace, n: int) -> Trace:
    """n copies of the trace laid over the same span, copy i shifted by i/n of the span (wrapping
    around), with its prefix ids shifted past every other copy's: n times the load, same shape."""
    if n < 1:
        raise TraceError(f"--repeat must be at least 1, got {n}")
    if n == 1:
        return trace
    if trace.origin is not None:
        raise TraceError("a trace can be repeated once")
    span = trace.duration_s or 1.0
    shifts = np.repeat(np.arange(n) * span / n, len(trace))
    arrival = (np.tile(trace.arrival_s, n) + shifts) % span
    order = np.argsort(arrival, kind="stable")
    hash_span = 1 + max((max(h) for h in trace.hash_ids or [] if h), default=-1)
    out = Trace(trace.kind, arrival[order], np.tile(trace.prompt, n)[order], np.tile(trace.output, n)[order],
                None if trace.tags is None else [trace.tags[i % len(trace)] for i in order],
                trace.hash_ids, None if trace.scenario is None else np.tile(trace.scenario, n)[order],
                n, hash_span, order, list(trace.notes))
    out.notes.append(f"{n} copies, shifted by {span / n:.1f} s each; prefix ids offset by {hash_span} per copy")
    return out
