"""Reading a monitored run back from what its tracker wrote, for ``klmonitor report``.

Three formats, each read with the tracker's own public reader where it has one:

- TensorBoard event files, with TensorBoard's ``EventAccumulator``: the scalars, the alerts
  (text under ``{prefix}alerts``) and the log-ratio histograms.
- Lightning ``CSVLogger`` logs (``metrics.csv``: a ``step`` column and one column per metric,
  rows sparse), with the standard library's ``csv``: the scalars only; a CSV log holds no
  alerts and no histograms.
- W&B run directories (``wandb/offline-run-*/run-*.wandb``). wandb has no Python reader of
  its transaction log (``wandb.Api`` reads runs from the server), but its command line has
  one: ``wandb leet inspect --json`` prints each record as a line of JSON. The history rows
  give the scalars (stepped by ``trainer/global_step``, the monitor's step metric) and the
  log-ratio histograms (``bins`` and ``values``); the ``alert`` records give the alerts sent
  with ``run.alert`` (title ``klmonitor: <rule>``, text ``Step N: <message>``).
"""

from __future__ import annotations

import csv
import importlib.util
import json
import math
import os
import re
import struct
import subprocess
import sys
import tempfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from fnmatch import fnmatch
from pathlib import Path
from typing import Any, Literal

import numpy as np

from klmonitor.alerts import parse_alert_text
from klmonitor.sinks import WANDB_ALERT_TITLE

Format = Literal["tensorboard", "csv", "wandb"]
FORMATS: tuple[Format, ...] = ("tensorboard", "csv", "wandb")
_FORMAT_NAMES = {
    "tensorboard": "TensorBoard event files (events.out.tfevents.*)",
    "csv": "CSV logs (CSVLogger's metrics.csv)",
    "wandb": "W&B run files (wandb/*run-*/run-*.wandb)",
}
# When one directory holds several formats written at the same time (TensorBoardLogger and
# CSVLogger share `lightning_logs/version_N` by default), the richer one is read.
_RICHNESS = {"tensorboard": 2, "wandb": 1, "csv": 0}
_EVENTS = "events.out.tfevents.*"
_CSV = "metrics.csv"
_CSV_BOOKKEEPING = frozenset({"step", "epoch"})  # CSVLogger's own columns, not metrics
_WANDB = "run-*.wandb"
_WANDB_STEP_RE = re.compile(r"^\s*Step\s+(?P<step>-?\d+)\s*:\s*")
WANDB_STEP_KEY = "trainer/global_step"
"""The history key W&B runs are stepped by (the monitor's ``define_metric`` step)."""


@dataclass
class AlertMark:
    """An alert read back from a run."""

    step: int
    rule: str
    level: str
    text: str


@dataclass
class Histogram:
    """One logged log-ratio histogram: bucket edges (``len(counts) + 1``) and counts."""

    step: int
    edges: np.ndarray
    counts: np.ndarray
    lo: float
    hi: float


@dataclass
class RunData:
    """What :func:`load_run` read from one run.

    Attributes:
        run_dir: the run directory (or file) read.
        prefix: the metric prefix (``kl/`` by default).
        format: the format it was read from: ``"tensorboard"``, ``"csv"`` or ``"wandb"``.
        scalars: ``{tag: (steps, values)}`` of the tags under ``prefix``, sorted by step
            (for a step logged twice, e.g. after a resume, the last value is kept).
        alerts: the alerts, by step.
        histograms: the log-ratio histograms, by step.
        alerts_recorded: whether the format records alerts at all (a CSV log does not, so
            an empty ``alerts`` there means "unknown", not "none fired").
        others: ``{tag: (steps, values)}`` of the run's other scalars (not under ``prefix``:
            the user's ``reward``, losses, learning rates), sorted by step.
    """

    run_dir: Path
    prefix: str
    format: Format = "tensorboard"
    scalars: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    alerts: list[AlertMark] = field(default_factory=list)
    histograms: list[Histogram] = field(default_factory=list)
    alerts_recorded: bool = True
    others: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)

    def series(self, name: str) -> tuple[np.ndarray, np.ndarray] | None:
        """``(steps, values)`` of ``prefix + name``, or ``None`` when not logged."""
        return self.scalars.get(self.prefix + name)


@dataclass(frozen=True)
class RunRef:
    """A run found under a log directory: where it is, its format, and its age (mtime)."""

    path: Path
    format: Format
    mtime: float


def parse_alert(text: str, step: int) -> AlertMark:
    """Read an alert back from its TensorBoard text (``**rule** (level) at step N: message``).

    Text in another shape is kept as an alert of rule ``"alert"`` at the entry's step.

    >>> parse_alert("**drift** (warn) at step 120: k2 and k3 disagree", step=120)
    AlertMark(step=120, rule='drift', level='warn', text='k2 and k3 disagree')
    """
    parsed = parse_alert_text(text)
    if parsed is None:
        return AlertMark(step, "alert", "warn", text.strip())
    rule, level, at, message = parsed
    return AlertMark(at, rule, level, message)


def parse_wandb_alert(title: str, text: str, level: str, step: int) -> AlertMark:
    """Read an alert back from a W&B ``alert`` record (as ``run.alert`` was called).

    The monitor titles its alerts ``klmonitor: <rule>`` and starts the text with
    ``Step N:``; another alert keeps its title as the rule and ``step`` (the last history
    step before it) as its step.

    >>> parse_wandb_alert("klmonitor: drift", "Step 60: k2 and k3 disagree", "WARN", step=58)
    AlertMark(step=60, rule='drift', level='warn', text='k2 and k3 disagree')
    """
    rule = title[len(WANDB_ALERT_TITLE) :] if title.startswith(WANDB_ALERT_TITLE) else title
    m = _WANDB_STEP_RE.match(text)
    if m is not None:
        step, text = int(m["step"]), text[m.end() :]
    return AlertMark(step, rule.strip() or "alert", level.lower() or "warn", text.strip())


def _classify(directory: Path, names: list[str], formats: tuple[Format, ...]) -> list[RunRef]:
    found: list[RunRef] = []
    patterns: dict[Format, str] = {"tensorboard": _EVENTS, "csv": _CSV, "wandb": _WANDB}
    for fmt in formats:
        files = [directory / n for n in names if fnmatch(n, patterns[fmt])]
        files = [f for f in files if f.is_file()]
        if files:
            found.append(RunRef(directory, fmt, max(f.stat().st_mtime for f in files)))
    return found


def find_runs(logdir: str | os.PathLike[str], format: Format | Literal["auto"] = "auto") -> list[RunRef]:
    """The runs under ``logdir`` (itself included), newest first.

    A run is a directory holding TensorBoard event files, a CSVLogger ``metrics.csv`` or a
    W&B ``run-*.wandb`` file; its age is the modification time of its newest such file. A
    directory holding several formats is listed once per format. ``logdir`` may also be
    one of those files.

    Args:
        logdir: the directory to search (recursively, not following symlinks).
        format: ``"auto"`` (all three) or the one format to look for.

    Raises:
        FileNotFoundError: ``logdir`` does not exist.
        ValueError: no run of the requested format under it, or an unknown ``format``.
    """
    if format != "auto" and format not in FORMATS:
        raise ValueError(f"format must be 'auto', 'tensorboard', 'csv' or 'wandb'; got {format!r}")
    formats: tuple[Format, ...] = FORMATS if format == "auto" else (format,)
    root = Path(logdir)
    if not root.exists():
        raise FileNotFoundError(
            f"{root} does not exist; pass the directory the run was logged to (the save_dir of its "
            "TensorBoardLogger, CSVLogger or WandbLogger)"
        )
    runs: list[RunRef] = []
    if root.is_file():
        runs = [RunRef(root, r.format, r.mtime) for r in _classify(root.parent, [root.name], formats)]
    else:
        for here, _dirs, names in os.walk(root):
            runs.extend(_classify(Path(here), names, formats))
    if not runs:
        what = " or ".join(_FORMAT_NAMES[f] for f in formats)
        raise ValueError(
            f"no {what} under {root}; log the run with KLMonitor and a TensorBoardLogger, CSVLogger "
            f"or WandbLogger (e.g. `klmonitor demo --logdir {root}`) and point the report at that directory"
        )
    return sorted(runs, key=lambda r: (r.mtime, _RICHNESS[r.format], str(r.path)), reverse=True)


def _series(by_tag: dict[str, dict[int, float]]) -> dict[str, tuple[np.ndarray, np.ndarray]]:
    out = {}
    for tag, by_step in by_tag.items():
        steps = np.array(sorted(by_step), dtype=np.int64)
        out[tag] = (steps, np.array([by_step[s] for s in steps.tolist()], dtype=np.float64))
    return out


def _decode_text(proto: Any) -> list[str]:
    from tensorboard.util import tensor_util

    arr = np.asarray(tensor_util.make_ndarray(proto)).reshape(-1)
    return [x.decode("utf-8", "replace") if isinstance(x, bytes) else str(x) for x in arr]


def _tb_histogram(step: int, value: Any) -> Histogram | None:
    limits = np.asarray(value.bucket_limit, dtype=np.float64)
    counts = np.asarray(value.bucket, dtype=np.float64)
    if counts.size == 0 or counts.sum() <= 0 or not (math.isfinite(value.min) and math.isfinite(value.max)):
        return None
    lo, hi = float(value.min), float(value.max)
    # Bucket i spans (limit[i-1], limit[i]]; the outer buckets are cut at the data's min and max.
    edges = np.concatenate([[lo], np.clip(limits, lo, hi)])
    return Histogram(step, edges, counts, lo, hi)


def event_file_problem(file: Path) -> str | None:
    """Why the TensorBoard event file ``file`` is corrupt, or ``None``.

    An event file is a sequence of records (a length, its masked CRC-32C, the data, the data's
    masked CRC-32C). TensorBoard's reader stops silently at the first bad record, so a damaged
    file would read as a shorter run, or as one without scalars. Here every record's checksums
    are verified and its data decoded as an ``Event``. A last record cut short is not
    corruption: a run still being written (or killed mid-write) ends that way.

    Raises:
        OSError: the file cannot be read.
    """
    from tensorboard.compat.proto.event_pb2 import Event
    from tensorboard.compat.tensorflow_stub.pywrap_tensorflow import masked_crc32c

    data = file.read_bytes()
    pos = records = 0
    while len(data) - pos >= 12:
        header = data[pos : pos + 8]
        (length,) = struct.unpack("<Q", header)
        if masked_crc32c(header) != struct.unpack("<I", data[pos + 8 : pos + 12])[0]:
            return f"a record header at byte {pos} fails its checksum ({records} whole records before it)"
        end = pos + 12 + length + 4
        if end > len(data):
            break  # cut short: the tail of a run being written
        body = data[pos + 12 : pos + 12 + length]
        if masked_crc32c(body) != struct.unpack("<I", data[end - 4 : end])[0]:
            return f"the record at byte {pos} fails its checksum ({records} whole records before it)"
        try:
            Event.FromString(body)
        except Exception:  # protobuf's DecodeError
            return f"the record at byte {pos} is not a TensorBoard event"
        records += 1
        pos = end
    if records == 0 and data:
        return "it holds no whole record"
    return None


def read_tensorboard(path: str | os.PathLike[str], prefix: str = "kl/") -> RunData:
    """Read a run's ``prefix`` scalars, alert texts and log-ratio histograms from event files.

    Args:
        path: a directory holding event files (not searched recursively), or one event file.
        prefix: the monitor's metric prefix.

    Raises:
        ValueError: an event file is corrupt (see :func:`event_file_problem`) or unreadable.
    """
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    where = Path(path)
    files = [where] if where.is_file() else sorted(f for f in where.glob(_EVENTS) if f.is_file())
    for file in files:
        try:
            why = event_file_problem(file)
        except OSError as exc:
            raise ValueError(f"cannot read {file}: {exc.strerror or exc}") from None
        if why:
            raise ValueError(
                f"{file} is corrupt: {why}; TensorBoard would read it only up to there. Restore it, or "
                "point --run at another run"
            )

    acc = EventAccumulator(str(path), size_guidance={"scalars": 0, "histograms": 0, "tensors": 0})
    acc.Reload()
    tags = acc.Tags()
    data = RunData(Path(path), prefix, "tensorboard")
    by_tag = {tag: {int(e.step): float(e.value) for e in acc.Scalars(tag)} for tag in tags.get("scalars", [])}
    data.scalars = _series({t: v for t, v in by_tag.items() if t.startswith(prefix)})
    data.others = _series({t: v for t, v in by_tag.items() if not t.startswith(prefix)})
    alert_tag = f"{prefix}alerts"
    for tag in tags.get("tensors", []):
        # TensorBoard's text plugin may suffix the tag (e.g. "kl/alerts/text_summary").
        if tag == alert_tag or tag.startswith(alert_tag + "/"):
            for ev in acc.Tensors(tag):
                for text in _decode_text(ev.tensor_proto):
                    data.alerts.append(parse_alert(text, int(ev.step)))
    data.alerts.sort(key=lambda a: a.step)
    hist_tag = f"{prefix}log_ratio"
    if hist_tag in tags.get("histograms", []):
        by_step_h: dict[int, Histogram] = {}
        for hev in acc.Histograms(hist_tag):
            h = _tb_histogram(int(hev.step), hev.histogram_value)
            if h is not None:
                by_step_h[h.step] = h
        data.histograms = [by_step_h[s] for s in sorted(by_step_h)]
    return data


def _number(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


_STEP_LIMIT = 2.0**63


def _csv_step(text: str | None, file: Path, line: int) -> int | None:
    """The step of a CSV row (``None`` for a row without one); a garbled step is an error."""
    if text is None or not text.strip():
        return None
    value = _number(text)
    if value is None or not math.isfinite(value) or abs(value) >= _STEP_LIMIT or value != int(value):
        raise ValueError(
            f"{file}, line {line}: step {text.strip()!r} is not a whole number in a step's range "
            "(|step| < 2**63); the file is garbled, not a CSVLogger log as written"
        )
    return int(value)


def read_csv(path: str | os.PathLike[str], prefix: str = "kl/") -> RunData:
    """Read a run's ``prefix`` scalars from a Lightning ``CSVLogger`` log.

    Args:
        path: the ``metrics.csv`` file, or the directory holding it.
        prefix: the monitor's metric prefix.

    Raises:
        ValueError: the file has no ``step`` column (not a CSVLogger log).
    """
    run = Path(path)
    file = run / _CSV if run.is_dir() else run
    data = RunData(run, prefix, "csv", alerts_recorded=False)
    by_tag: dict[str, dict[int, float]] = {}
    if not file.is_file():  # a directory, or a FIFO that would wait for a writer forever
        raise ValueError(f"cannot read {file}: it is not a regular file")
    try:
        with open(file, newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            columns = reader.fieldnames or []
            if "step" not in columns:
                raise ValueError(
                    f"{file} has no 'step' column (columns: {', '.join(columns[:8]) or 'none'}); "
                    "klmonitor report reads the metrics.csv that Lightning's CSVLogger writes"
                )
            tags = [c for c in columns if c not in _CSV_BOOKKEEPING]
            for row in reader:
                step = _csv_step(row.get("step"), file, reader.line_num)
                if step is None:
                    continue
                for tag in tags:
                    cell = row.get(tag)
                    if not cell:  # rows are sparse: "" is "not logged here"
                        continue
                    value = _number(cell)
                    if value is None and not tag.startswith(prefix):
                        continue  # a user's column of text: not a scalar to draw
                    if value is None:
                        raise ValueError(
                            f"{file}, line {reader.line_num}: {tag} is {cell!r}, not a number; the file "
                            "is garbled, not a CSVLogger log as written"
                        )
                    by_tag.setdefault(tag, {})[step] = value
    except OSError as exc:
        raise ValueError(f"cannot read {file}: {exc.strerror or exc}") from None
    except UnicodeDecodeError as exc:
        raise ValueError(
            f"{file} is not UTF-8 text (an invalid byte at offset {exc.start}); klmonitor report reads "
            "the metrics.csv that Lightning's CSVLogger writes"
        ) from None
    except csv.Error as exc:
        raise ValueError(
            f"{file} is not a CSV file ({exc}); is it the metrics.csv CSVLogger wrote?"
        ) from None
    data.scalars = _series({t: v for t, v in by_tag.items() if t.startswith(prefix)})
    data.others = _series({t: v for t, v in by_tag.items() if not t.startswith(prefix)})
    return data


def _wandb_file(path: Path) -> Path:
    if path.is_file():
        return path
    files = [f for f in path.glob(_WANDB) if f.is_file()]
    if not files:
        raise ValueError(f"no {_WANDB} file in {path}; pass a W&B run directory (wandb/offline-run-*)")
    return max(files, key=lambda f: (f.stat().st_mtime, f.name))


def wandb_records(path: str | os.PathLike[str]) -> Iterator[dict[str, Any]]:
    """The records of a W&B run file, as ``wandb leet inspect --json`` prints them.

    Args:
        path: a ``run-*.wandb`` file, or the run directory holding it.

    Raises:
        ValueError: wandb is missing, or its command could not read the file.
    """
    file = _wandb_file(Path(path))
    if importlib.util.find_spec("wandb") is None:
        raise ValueError(f"reading the W&B run {file} needs wandb: pip install 'klmonitor[wandb]'")
    # The reader runs offline: no telemetry upload, nothing printed but the records.
    env = {**os.environ, "WANDB_MODE": "offline", "WANDB_ERROR_REPORTING": "false", "WANDB_SILENT": "true"}
    cmd = [sys.executable, "-m", "wandb", "leet", "inspect", "--json", str(file)]
    with tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=err, stdin=subprocess.DEVNULL, env=env)
        assert proc.stdout is not None
        try:
            for line in proc.stdout:
                if line.strip():
                    try:
                        yield json.loads(line)
                    except ValueError:
                        raise ValueError(
                            f"could not read the W&B run file {file}: `wandb leet inspect --json` printed a "
                            f"line that is not JSON ({line[:80]!r})"
                        ) from None
        finally:
            proc.stdout.close()
            code = proc.wait()
        if code != 0:
            err.seek(0)
            lines = [ln.strip() for ln in err.read().decode("utf-8", "replace").splitlines() if ln.strip()]
            raise ValueError(
                f"could not read the W&B run file {file} with `wandb leet inspect --json` (exit {code}: "
                f"{lines[-1] if lines else 'no message'}); is it a run-*.wandb file that wandb wrote? The "
                "report reads W&B runs with that command (wandb 0.31 has it; `pip install -U wandb` if "
                "yours does not)"
            )


def _wandb_histogram(step: int, item: dict[str, Any], key: str) -> Histogram | None:
    bins, values = item.get(f"{key}.bins"), item.get(f"{key}.values")
    if not isinstance(bins, list) or not isinstance(values, list) or len(bins) != len(values) + 1:
        return None
    edges = np.asarray(bins, dtype=np.float64)
    counts = np.asarray(values, dtype=np.float64)
    if counts.sum() <= 0 or not np.isfinite(edges).all():
        return None
    return Histogram(step, edges, counts, float(edges[0]), float(edges[-1]))


def read_wandb(path: str | os.PathLike[str], prefix: str = "kl/") -> RunData:
    """Read a W&B run's ``prefix`` scalars, alerts and log-ratio histograms from its run file.

    Args:
        path: a W&B run directory (``wandb/offline-run-*``) or its ``run-*.wandb`` file.
        prefix: the monitor's metric prefix.

    Raises:
        ValueError: wandb could not read the file (see :func:`wandb_records`).
    """
    data = RunData(Path(path), prefix, "wandb")
    by_tag: dict[str, dict[int, float]] = {}
    by_step_h: dict[int, Histogram] = {}
    hist_key = f"{prefix}log_ratio"
    step = 0
    for rec in wandb_records(path):
        kind = rec.get("type")
        if kind == "history":
            item = rec.get("history", {}).get("item", {})
            got = item.get(WANDB_STEP_KEY, item.get("_step"))
            if isinstance(got, int | float) and not isinstance(got, bool) and math.isfinite(got):
                step = int(got)
            for key, value in item.items():
                if key.startswith("_") or key == WANDB_STEP_KEY:
                    continue  # wandb's own bookkeeping (_step, _runtime, _timestamp) and the step
                if f"{key.rsplit('.', 1)[0]}._type" in item:
                    continue  # a table's or histogram's own fields (kl/top_sequences.nrows, ...)
                if isinstance(value, int | float) and not isinstance(value, bool):
                    by_tag.setdefault(key, {})[step] = float(value)
            if item.get(f"{hist_key}._type") == "histogram":
                h = _wandb_histogram(step, item, hist_key)
                if h is not None:
                    by_step_h[step] = h
        elif kind == "alert":
            a = rec.get("alert", {})
            data.alerts.append(
                parse_wandb_alert(
                    str(a.get("title", "")), str(a.get("text", "")), str(a.get("level", "")), step
                )
            )
    data.scalars = _series({t: v for t, v in by_tag.items() if t.startswith(prefix)})
    data.others = _series({t: v for t, v in by_tag.items() if not t.startswith(prefix)})
    data.histograms = [by_step_h[s] for s in sorted(by_step_h)]
    data.alerts.sort(key=lambda a: a.step)
    return data


_READERS = {"tensorboard": read_tensorboard, "csv": read_csv, "wandb": read_wandb}


def load_run(
    run: RunRef | str | os.PathLike[str], prefix: str = "kl/", format: Format | Literal["auto"] = "auto"
) -> RunData:
    """Read a run's ``prefix`` scalars, alerts and log-ratio histograms, whatever its format.

    Args:
        run: a :class:`RunRef` from :func:`find_runs`, or a run directory or file (its
            format detected from the files in it; the richest if it holds several).
        prefix: the monitor's metric prefix.
        format: for a path, ``"auto"`` or the format to read.

    Returns:
        The :class:`RunData` (its ``scalars`` may be empty).

    Raises:
        ValueError: no run of that format at ``run``.
    """
    if not isinstance(run, RunRef):
        path = Path(run)
        if format != "auto" and format not in FORMATS:
            raise ValueError(f"format must be 'auto', 'tensorboard', 'csv' or 'wandb'; got {format!r}")
        formats: tuple[Format, ...] = FORMATS if format == "auto" else (format,)
        names = [path.name] if path.is_file() else [p.name for p in path.iterdir()] if path.is_dir() else []
        found = _classify(path.parent if path.is_file() else path, names, formats)
        if not found:
            what = " or ".join(_FORMAT_NAMES[f] for f in formats)
            raise ValueError(f"no {what} in {path}")
        run = RunRef(path, max(found, key=lambda r: _RICHNESS[r.format]).format, 0.0)
    return _READERS[run.format](run.path, prefix)
