"""Reading, normalising and splitting the instruction dataset. Pure functions except `read_source`.

Every usable row becomes one conversation: `{"id": ..., "messages": [{"role": system|user|assistant,
"content": ...}, ...]}`, ending with an assistant turn. `id` is the first 16 hex of the sha256 of the
canonical messages, so the same row has the same id in every run.

Streaming, so memory does not grow with the file: JSON lines are read one at a time (as bytes, decoded
strictly: a line that is not UTF-8 is dropped as `invalid_utf8`, never silently replaced), Parquet in
record batches, a `.json` document (a JSON array of rows, or an object with a `data` list) record by
record (`ijson`), S3 objects one after the other. Usable rows go to a spool file on disk (`Spool`: one
prepared JSONL line each, and its offset); what stays in memory per row is its offset, a 16-byte digest
for de-duplication and, for the shuffle, its index.

A `.json` file is one JSON document unless it really is JSON lines: its first non-space byte decides
(`[`: an array; `{`: an object holding the rows, or JSON lines when that first object has no list of rows
and more values follow). A document that ends early (an interrupted download) fails with the byte offset
of its end and the number of complete records before it, or, under `dataset.allowTruncated`, gives those
records and one row dropped as `truncated`.
"""

from __future__ import annotations

import hashlib
import json
import random
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ftc_api.spec import DatasetFormat, FieldMapping, SplitSpec
from ftc_step.errors import StepError, transient

DATA_EXTENSIONS = (".jsonl", ".ndjson", ".json", ".parquet")
ROLES = {
    "system": "system",
    "user": "user",
    "human": "user",
    "assistant": "assistant",
    "gpt": "assistant",
    "model": "assistant",
    "bot": "assistant",
    "chatgpt": "assistant",
}
MAX_EXAMPLES = 3
EXAMPLE_CHARS = 160

# Drop reasons, as counted in PrepareResult.dropped.
EMPTY = "empty"
DUPLICATE = "duplicate"
UNPARSEABLE = "unparseable"
INVALID_UTF8 = "invalid_utf8"
NO_ASSISTANT = "no_assistant_turn"
TRUNCATED = "truncated"
PARQUET_BATCH_ROWS = 1024


class Unparseable:
    """A source line that is not valid JSON (`reason` unparseable) or not UTF-8 (`reason` invalid_utf8)."""

    def __init__(self, text: str, error: str, reason: str = UNPARSEABLE) -> None:
        self.text = text
        self.error = error
        self.reason = reason

    def __repr__(self) -> str:
        return self.text


class DropRow(Exception):
    """Why one row is not usable (one of the drop reasons)."""

    def __init__(self, reason: str, detail: str = "") -> None:
        super().__init__(detail or reason)
        self.reason = reason


# ---------------------------------------------------------------------------------------------- reading


def data_files(root: Path) -> list[Path]:
    """Data files below a local directory, sorted."""
    return sorted(p for p in root.rglob("*") if p.is_file() and p.suffix.lower() in DATA_EXTENSIONS)


def read_file(path: Path, label: str | None = None, allow_truncated: bool = False) -> Iterator[Any]:
    """Rows of one JSONL, JSON or Parquet file, streamed; JSONL lines that do not parse or are not UTF-8 come
    back as `Unparseable`. Errors name the file as `label` (the S3 URI of a downloaded object), else by its
    file name. `allow_truncated`: a `.json` document that ends early gives its complete records and one
    `Unparseable` of reason `truncated` (else it fails)."""
    name = label or path.name
    suffix = path.suffix.lower()
    if suffix == ".parquet":
        yield from _read_parquet(path, name)
        return
    if suffix not in (".jsonl", ".ndjson", ".json"):
        raise StepError(f"unknown dataset file format {name!r}: expected .jsonl, .json or .parquet")
    if suffix == ".json":
        layout = json_layout(path, name)
        if layout is not None:  # one JSON document (else JSON lines in a .json file: read as such below)
            yield from _read_json_records(path, name, *layout, allow_truncated=allow_truncated)
            return
    with path.open("rb") as lines:
        for raw in lines:
            raw = raw.rstrip(b"\r\n")
            if not raw.strip():
                continue
            try:
                line = raw.decode("utf-8")
            except UnicodeDecodeError as err:
                shown = raw[: EXAMPLE_CHARS * 2].decode("utf-8", errors="backslashreplace")
                yield Unparseable(shown, f"invalid UTF-8 at byte {err.start} of the line", INVALID_UTF8)
                continue
            try:
                yield json.loads(line)
            except (ValueError, RecursionError) as err:
                yield Unparseable(line[: EXAMPLE_CHARS * 2], str(err) if isinstance(err, ValueError) else "nested too deeply")


# ---------------------------------------------------------------------------------------------- .json documents

JSON_LIST_KEYS = ("data", "rows", "train", "examples")  # an object's list of rows: the first of these that is a list
JSON_CHUNK = 1 << 16  # bytes fed to the streaming parser at a time
_BOM = b"\xef\xbb\xbf"
_JSON_HINT = "a .json file is one JSON document (an array of rows, or an object with a `data` list); name JSON lines .jsonl"


def json_layout(path: Path, name: str) -> tuple[int, str] | None:
    """Where a `.json` file's records are: (the byte offset its document starts at, the `ijson` prefix of its
    records: `item` for an array, `data.item` for an object's `data` list), or None when the file is JSON
    lines (or blank). Decided by the first non-space byte; `{` is JSON lines only when the first object holds
    no list of rows and more values follow it. Raises StepError for anything else."""
    import ijson

    with path.open("rb") as f:
        pos = len(_BOM) if f.read(len(_BOM)) == _BOM else 0
        f.seek(pos)
        while True:
            block = f.read(JSON_CHUNK)
            if not block:
                return None  # blank: no rows
            stripped = block.lstrip(b" \t\r\n")
            if stripped:
                start = pos + len(block) - len(stripped)
                break
            pos += len(block)
        if stripped.startswith(b"["):
            return start, "item"
        if not stripped.startswith(b"{"):
            shown = stripped[:40].decode("utf-8", errors="backslashreplace")
            raise StepError(
                f"{name}: expected a JSON array of rows or an object with a `data` list, found {shown!r} at byte {start}"
            )
        # An object: read its events until a top-level list of rows (the document's records), or the end of the
        # first object (JSON lines if more values follow, else an object without rows).
        events = ijson.sendable_list()
        parser = ijson.parse_coro(events, multiple_values=True, use_float=True)
        f.seek(start)
        offset, key, first_done = start, None, False
        while True:
            chunk = f.read(JSON_CHUNK)
            error: Exception | None = None
            try:
                if chunk:
                    parser.send(chunk)
                else:
                    parser.close()
            except ijson.JSONError as err:
                error = err
            for prefix, event, value in events:
                if first_done:
                    return None  # a second value: JSON lines
                if key is not None and event == "start_array":
                    return start, f"{key}.item"
                key = value if prefix == "" and event == "map_key" and value in JSON_LIST_KEYS else None
                first_done = prefix == "" and event == "end_map"
            del events[:]
            if error is not None:
                if first_done:
                    return None  # a second value that does not parse: a bad JSON line
                if not chunk:
                    raise StepError(
                        f"{name}: the JSON document ends early at byte {offset}, before any list of rows: the file looks "
                        "cut off (an interrupted download?); download it again"
                    ) from error
                where = _break_offset(path, start, offset, chunk, multiple_values=True)
                raise StepError(f"{name}: not valid JSON at byte {where}: {_reason(error)}; {_JSON_HINT}") from error
            if not chunk:
                raise StepError(f"{name}: a JSON object without a `data`, `rows`, `train` or `examples` list of rows")
            offset += len(chunk)


def _read_json_records(path: Path, name: str, start: int, prefix: str, allow_truncated: bool) -> Iterator[Any]:
    """The records at `prefix` of the JSON document starting at byte `start`, streamed (`ijson`, bounded
    memory: one chunk and the records it completes)."""
    import ijson

    records = ijson.sendable_list()
    parser = ijson.items_coro(records, prefix, use_float=True)
    complete, offset, tail = 0, start, b""
    with path.open("rb") as f:
        f.seek(start)
        while chunk := f.read(JSON_CHUNK):
            try:
                parser.send(chunk)
            except ijson.JSONError as err:
                complete += len(records)
                yield from records
                where = _break_offset(path, start, offset, chunk)
                raise StepError(f"{name}: not valid JSON at byte {where}, after {_records(complete)}: {_reason(err)}") from err
            offset += len(chunk)
            complete += len(records)
            yield from records
            del records[:]
            tail = chunk
    try:
        parser.close()
    except ijson.JSONError as err:
        complete += len(records)
        yield from records
        if not _ends_early(err):
            raise StepError(f"{name}: not valid JSON at byte {offset}: {_reason(err)}") from err
        why = f"the JSON document ends early at byte {offset}, after {_records(complete)}"
        if not allow_truncated:
            raise StepError(
                f"{name}: {why}: the file looks cut off (an interrupted download?). Download it again, or set "
                f"dataset.allowTruncated: true to use the {_records(complete)}"
            ) from err
        shown = "..." + " ".join(tail[-(EXAMPLE_CHARS - 10) :].decode("utf-8", errors="backslashreplace").split())
        yield Unparseable(shown, f"{why} (dataset.allowTruncated: the complete records are used)", TRUNCATED)
        return
    yield from records


def _ends_early(err: Exception) -> bool:
    return "premature EOF" in str(err) or "Incomplete JSON" in str(err)


def _reason(err: Exception) -> str:
    """The parser's own first line (yajl's message may come as bytes)."""
    text = err.args[0] if err.args else ""
    if isinstance(text, bytes):
        text = text.decode("utf-8", errors="backslashreplace")
    lines = str(text).strip().splitlines()
    return lines[0].rstrip(".") if lines else type(err).__name__


def _records(n: int) -> str:
    return f"{n} complete record" + ("" if n == 1 else "s")


def _break_offset(path: Path, start: int, chunk_start: int, chunk: bytes, multiple_values: bool = False) -> int:
    """The byte offset where the JSON document starting at `start` stops parsing, `chunk` (read at
    `chunk_start`) being the one that failed: parses again, events only, up to the chunk in large reads and
    through it byte by byte."""
    import ijson

    events = ijson.sendable_list()
    parser = ijson.basic_parse_coro(events, multiple_values=multiple_values)
    with path.open("rb") as f:
        f.seek(start)
        left = chunk_start - start
        while left > 0 and (block := f.read(min(left, 1 << 20))):
            parser.send(block)
            del events[:]
            left -= len(block)
    for i in range(len(chunk)):
        try:
            parser.send(chunk[i : i + 1])
        except ijson.JSONError:
            return chunk_start + i
        del events[:]
    return chunk_start + len(chunk)


def _read_parquet(path: Path, name: str) -> Iterator[dict[str, Any]]:
    import pyarrow.parquet as pq

    try:
        parquet = pq.ParquetFile(path)
        batches = parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS)
        for batch in batches:
            yield from batch.to_pylist()
    except StepError:
        raise
    except Exception as err:
        detail = str(err).replace(f"'{path}'", repr(name)).replace(str(path), name)
        raise StepError(f"cannot read {name} as Parquet: {detail}") from err


def read_source(source: str, store: Any, workdir: Path, hf_split: str = "train", allow_truncated: bool = False) -> Iterator[Any]:
    """Every row of the dataset at `source`, streamed: an s3:// object or prefix (objects downloaded one at a
    time, each deleted once read), a local file or directory, or a Hugging Face dataset id. Raises StepError
    naming the source when it cannot be read (the existence checks at once, the rest while reading).
    `allow_truncated`: see `read_file`."""
    from ftc_step.storage import StorageError, is_s3

    if is_s3(source):
        try:
            single = store.exists(source)
            names = [""] if single else [n for n in store.list(source) if Path(n).suffix.lower() in DATA_EXTENSIONS]
        except StorageError as err:
            raise StepError(f"cannot read dataset {source}: {err}", retryable=transient(err)) from err
        if not names:
            raise StepError(f"no dataset at {source}: no such object and no .jsonl/.json/.parquet objects under it")
        return _read_s3(source, names, store, workdir, allow_truncated)
    path = Path(source[len("file://") :] if source.startswith("file://") else source)
    if path.is_file():
        return read_file(path, allow_truncated=allow_truncated)
    if path.is_dir():
        files = data_files(path)
        if not files:
            raise StepError(f"no .jsonl/.json/.parquet files under {source}")
        return (row for f in files for row in read_file(f, allow_truncated=allow_truncated))
    if source.startswith(("/", ".", "~")) or source.count("/") > 1:
        raise StepError(f"dataset {source!r} not found: no such file or directory")
    return _read_hub(source, hf_split)


def _read_s3(source: str, names: list[str], store: Any, workdir: Path, allow_truncated: bool) -> Iterator[Any]:
    from ftc_step.storage import StorageError, join

    for i, name in enumerate(names):
        uri = join(source, name) if name else source
        local = workdir / "source" / f"{i:04d}-{Path(uri).name}"
        try:
            store.download_file(uri, local)
        except StorageError as err:
            raise StepError(f"cannot read dataset object {uri}: {err}", retryable=transient(err)) from err
        yield from read_file(local, label=uri, allow_truncated=allow_truncated)
        local.unlink(missing_ok=True)


def _read_hub(dataset_id: str, split: str) -> Iterator[Any]:
    try:
        import datasets

        rows = datasets.load_dataset(dataset_id, split=split)
    except Exception as err:
        raise StepError(
            f"dataset {dataset_id!r} is not an s3:// URI or a local path, and loading it as a Hugging Face "
            f"dataset (split {split!r}) failed: {type(err).__name__}: {err}"
        ) from err
    return iter(rows)


# ---------------------------------------------------------------------------------------------- normalising


def _text(value: Any, name: str) -> str:
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    raise DropRow(UNPARSEABLE, f"{name} is a {type(value).__name__}, not a string")


def _turns(value: Any, column: str, role_key: str, content_key: str) -> list[dict[str, str]]:
    if value is None:
        return []
    if not isinstance(value, list):
        raise DropRow(UNPARSEABLE, f"{column} is not a list")
    turns = []
    for turn in value:
        if not isinstance(turn, dict):
            raise DropRow(UNPARSEABLE, f"{column} holds a {type(turn).__name__}, not an object")
        role = ROLES.get(str(turn.get(role_key, "")).lower())
        if role is None:
            raise DropRow(UNPARSEABLE, f"{column}: unknown role {turn.get(role_key)!r}")
        turns.append({"role": role, "content": _text(turn.get(content_key), f"{column}.{content_key}")})
    return turns


def normalise(row: Any, fmt: DatasetFormat, fields: FieldMapping | None = None) -> list[dict[str, str]]:
    """One row as a conversation ending in an assistant turn; raises DropRow with the reason otherwise."""
    fields = fields or FieldMapping()
    if isinstance(row, Unparseable):
        raise DropRow(row.reason, f"invalid JSON: {row.error}" if row.reason == UNPARSEABLE else row.error)
    if not isinstance(row, dict):
        raise DropRow(UNPARSEABLE, f"a {type(row).__name__}, not an object")
    system = _text(row.get(fields.system), fields.system).strip()
    if fmt == DatasetFormat.ALPACA:
        instruction = _text(row.get(fields.instruction), fields.instruction).strip()
        extra = _text(row.get(fields.input), fields.input).strip()
        output = _text(row.get(fields.output), fields.output).strip()
        if not (instruction or extra or output):
            raise DropRow(EMPTY)
        user = "\n\n".join(p for p in (instruction, extra) if p)
        if not user:
            raise DropRow(EMPTY, "no instruction")
        if not output:
            raise DropRow(NO_ASSISTANT, f"no {fields.output}")
        messages = [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    else:
        if fmt == DatasetFormat.CHAT:
            column, role_key, content_key = fields.messages, "role", "content"
        else:
            column, role_key, content_key = fields.conversations, "from", "value"
        if column not in row and any(isinstance(v, str) and v.strip() for v in row.values()):
            raise DropRow(UNPARSEABLE, f"no {column!r} column")
        messages = [
            {"role": t["role"], "content": t["content"].strip()} for t in _turns(row.get(column), column, role_key, content_key)
        ]
        if not any(m["content"] for m in messages):
            raise DropRow(EMPTY)
        messages = [m for m in messages if m["content"]]
        while messages and messages[-1]["role"] != "assistant":
            messages.pop()
        # An assistant turn before the first user turn answers nothing: it is not trained on (dropped).
        first_user = next((i for i, m in enumerate(messages) if m["role"] == "user"), len(messages))
        messages = [m for i, m in enumerate(messages) if i >= first_user or m["role"] != "assistant"]
        if not any(m["role"] == "user" for m in messages):
            raise DropRow(NO_ASSISTANT if not messages else UNPARSEABLE, "no assistant turn after a user turn")
    if system and messages[0]["role"] != "system":
        messages.insert(0, {"role": "system", "content": system})
    return messages


def canonical(messages: list[dict[str, str]]) -> str:
    return json.dumps(messages, sort_keys=True, ensure_ascii=False, separators=(",", ":"))


class Spool(Sequence[dict[str, Any]]):
    """Prepared rows on disk, in order: one byte-stable JSONL line each (`to_jsonl`), found by offset."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._out = self.path.open("wb")
        self._offsets = array("Q")
        self._end = 0
        self._reader: Any = None

    def append(self, row: dict[str, Any]) -> None:
        line = to_jsonl([row])
        self._offsets.append(self._end)
        self._out.write(line)
        self._end += len(line)

    def line(self, index: int) -> bytes:
        """Row `index` as its JSONL line (newline included)."""
        if self._reader is None:
            self._out.flush()
            self._reader = self.path.open("rb")
        self._reader.seek(self._offsets[index])
        return self._reader.readline()

    def __len__(self) -> int:
        return len(self._offsets)

    def __getitem__(self, index: Any) -> Any:
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        return json.loads(self.line(index))

    def write(self, order: Iterable[int], path: Path) -> int:
        """Write the rows at `order` to a JSONL file (what `to_jsonl` of those rows gives); returns the count."""
        n = 0
        with Path(path).open("wb") as out:
            for index in order:
                out.write(self.line(index))
                n += 1
        return n

    def close(self) -> None:
        self._out.close()
        if self._reader is not None:
            self._reader.close()


@dataclass
class Cleaned:
    """Usable conversations in source order (spooled to disk), with counts and examples of what was dropped."""

    rows: Spool
    read: int = 0
    dropped: dict[str, int] = field(default_factory=dict)
    examples: dict[str, list[str]] = field(default_factory=dict)

    def drop(self, reason: str, index: int, row: Any, detail: str) -> None:
        self.dropped[reason] = self.dropped.get(reason, 0) + 1
        examples = self.examples.setdefault(reason, [])
        if len(examples) < MAX_EXAMPLES:
            if isinstance(row, Unparseable):
                shown = row.text
            else:
                try:
                    shown = json.dumps(row, ensure_ascii=False, default=str)
                except (ValueError, RecursionError):
                    shown = f"a {type(row).__name__} nested too deeply to show"
            if len(shown) > EXAMPLE_CHARS:
                shown = shown[: EXAMPLE_CHARS - 3] + "..."
            examples.append(f"row {index + 1}: {shown}" + (f" ({detail})" if detail and detail != reason else ""))


def clean(rows: Iterable[Any], fmt: DatasetFormat, fields: FieldMapping | None = None, spool: Spool | None = None) -> Cleaned:
    """Normalise every row; drop empty, duplicate, unparseable, non-UTF-8 and answerless rows and count each
    reason. Usable rows go to `spool` (a temporary file when None); duplicates are found by digest."""
    if spool is None:  # a temporary spool, removed with the Spool object
        import shutil
        import tempfile
        import weakref

        directory = tempfile.mkdtemp(prefix="ftc-rows-")
        spool = Spool(Path(directory) / "rows.jsonl")
        weakref.finalize(spool, shutil.rmtree, directory, True)
    out = Cleaned(rows=spool)
    seen: set[bytes] = set()
    for index, row in enumerate(rows):
        out.read += 1
        try:
            messages = normalise(row, fmt, fields)
        except DropRow as drop:
            out.drop(drop.reason, index, row, str(drop))
            continue
        except RecursionError:
            out.drop(UNPARSEABLE, index, row, "nested too deeply")
            continue
        key = canonical(messages)
        digest = hashlib.sha256(key.encode()).digest()
        if digest[16:] in seen:
            out.drop(DUPLICATE, index, row, "")
            continue
        seen.add(digest[16:])
        spool.append({"id": digest.hex()[:16], "messages": messages})  # the row id: its digest's first 16 hex
    return out


def no_rows_message(cleaned: Cleaned) -> str:
    reasons = ", ".join(f"{n} {reason}" for reason, n in sorted(cleaned.dropped.items())) or "the source is empty"
    return f"no usable rows: read {cleaned.read} rows, dropped {reasons}"


# ---------------------------------------------------------------------------------------------- splitting


def split_rows(
    rows: Sequence[dict[str, Any]], split: SplitSpec, seed: int, max_rows: int | None = None
) -> dict[str, list[dict[str, Any]]]:
    """The rows of each split (`split_order` applied to `rows`)."""
    return {name: [rows[i] for i in indices] for name, indices in split_order(len(rows), split, seed, max_rows).items()}


def split_order(n_rows: int, split: SplitSpec, seed: int, max_rows: int | None = None) -> dict[str, list[int]]:
    """Row indices of each split: shuffle with `seed`, keep at most `max_rows`, then cut test, eval and train
    (in that order)."""
    order = list(range(n_rows))
    random.Random(seed).shuffle(order)
    if max_rows is not None:
        order = order[:max_rows]
    n = len(order)
    n_eval, n_test = split.resolved(n)
    if n - n_eval - n_test < 1:
        raise StepError(
            f"{n} usable rows are too few for the split: eval {n_eval} + test {n_test} rows leave no training rows; "
            "add rows or lower dataset.split"
        )
    return {
        "test": order[:n_test],
        "eval": order[n_test : n_test + n_eval],
        "train": order[n_test + n_eval :],
    }


def to_jsonl(rows: Iterable[dict[str, Any]]) -> bytes:
    """Byte-stable JSONL: sorted keys, no ASCII escaping, one row per line."""
    return "".join(json.dumps(r, sort_keys=True, ensure_ascii=False, separators=(",", ":")) + "\n" for r in rows).encode()


def read_jsonl(path: Path, split: str = "train") -> list[dict[str, Any]]:
    """Rows of a prepared split; each must be a conversation with an assistant turn."""
    rows = []
    for number, line in enumerate(Path(path).read_text().splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            messages = row["messages"]
            roles = [m["role"] for m in messages]
            [m["content"] for m in messages]
        except (ValueError, KeyError, TypeError) as err:
            raise StepError(f"data/{split}.jsonl line {number}: not a prepared conversation ({err})") from err
        if "assistant" not in roles:
            raise StepError(f"data/{split}.jsonl line {number}: a row with no assistant turn")
        rows.append(row)
    return rows
