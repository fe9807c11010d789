"""Input discovery and streaming for ``engine.prepare``: files, directories and globs of text.

What a document is, per input kind:

* ``.txt`` (and ``.txt.gz``, and any ``text_suffixes`` such as ``.py``): the whole file is one
  document (``txt_mode="file"``, suits source code
  and articles), or each block between blank lines (``txt_mode="blank-line"``, for large prose files);
* ``.jsonl`` / ``.ndjson`` (and ``.gz``): one JSON object per line, the document is its ``text_key``;
* ``.parquet``: the ``text_key`` column, one row per document (needs ``pyarrow``: the ``parquet`` extra).

Inputs are expanded in the order given; a directory contributes its supported files recursively in
sorted order. Nothing holds more than one work unit (about ``unit_bytes`` of text) in memory, except
a whole ``.txt`` file in ``file`` mode.

Work units are what the parent process hands to tokenizer workers: ``("texts", path, [str, ...])`` or
``("jsonl", path, first_line_number, bytes)``; JSON parsing happens in the workers.
"""

from __future__ import annotations

import glob
import gzip
import io
import os
from collections.abc import Iterator

from engine.errors import DataError

TEXT_SUFFIXES = (".txt",)
JSONL_SUFFIXES = (".jsonl", ".ndjson")
PARQUET_SUFFIXES = (".parquet",)


def input_kind(path: str, text_suffixes: tuple[str, ...] = ()) -> str | None:
    """ "txt", "jsonl", "parquet" or None; ``text_suffixes`` (e.g. ``(".py",)``) count as ``.txt``."""
    name = path.lower()
    if name.endswith(".gz"):
        name = name[:-3]
    for kind, suffixes in (
        ("txt", TEXT_SUFFIXES + tuple(text_suffixes)),
        ("jsonl", JSONL_SUFFIXES),
        ("parquet", PARQUET_SUFFIXES),
    ):
        if name.endswith(suffixes):
            return None if kind == "parquet" and path.lower().endswith(".gz") else kind
    return None


def expand_inputs(patterns: list[str], *, text_suffixes: tuple[str, ...] = ()) -> list[str]:
    """Files named by ``patterns`` (files, directories, globs), deduplicated, in a deterministic order."""
    files: list[str] = []
    for pattern in patterns:
        if os.path.isdir(pattern):
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(pattern)
                for name in names
                if input_kind(name, text_suffixes) is not None
            )
        elif os.path.isfile(pattern):
            if input_kind(pattern, text_suffixes) is None:
                raise DataError(
                    f"{pattern}: unsupported input type",
                    hint="use .txt, .jsonl (optionally .gz), .parquet, or --text-suffixes",
                )
            found = [pattern]
        else:
            found = sorted(
                p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p) and input_kind(p, text_suffixes)
            )
        if not found:
            raise DataError(f"--input {pattern}: no .txt/.jsonl/.parquet files found")
        files.extend(found)
    seen: set[str] = set()
    return [f for f in files if not (f in seen or seen.add(f))]


class _Progress:
    """Tracks on-disk bytes consumed of one file (compressed position for .gz)."""

    def __init__(self, raw: io.BufferedReader) -> None:
        self.raw = raw
        self.last = 0

    def advance(self) -> int:
        pos = self.raw.tell()
        delta, self.last = pos - self.last, pos
        return delta


def _open_binary(path: str) -> tuple[io.BufferedIOBase, _Progress]:
    try:
        raw = open(path, "rb")  # noqa: SIM115 - closed by the caller's context
    except OSError as err:
        raise DataError(f"{path}: cannot open ({err.strerror})") from None
    stream = gzip.GzipFile(fileobj=raw, mode="rb") if path.lower().endswith(".gz") else raw
    return stream, _Progress(raw)


def iter_work_units(
    files: list[str],
    *,
    txt_mode: str = "file",
    text_key: str = "text",
    unit_bytes: int = 1 << 18,
    text_suffixes: tuple[str, ...] = (),
) -> Iterator[tuple[tuple, int]]:
    """Yields (work unit, on-disk bytes consumed since the last unit); chunking ignores the worker count."""
    for path in files:
        kind = input_kind(path, text_suffixes)
        if kind == "parquet":
            yield from _parquet_units(path, text_key, unit_bytes)
            continue
        stream, progress = _open_binary(path)
        try:
            with stream:
                if kind == "jsonl":
                    yield from _jsonl_units(path, stream, progress, unit_bytes)
                elif txt_mode == "file":
                    yield ("texts", path, [_decode(stream.read(), path)]), progress.advance()
                else:
                    yield from _blank_line_units(path, stream, progress, unit_bytes)
        except (OSError, EOFError, gzip.BadGzipFile) as err:
            raise DataError(
                f"{path}: read failed ({err})", hint="the file is truncated or not what its name says"
            ) from None
        finally:
            progress.raw.close()


def _decode(data: bytes, path: str) -> str:
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text at byte {err.start}", hint="convert the file to UTF-8") from None


def _jsonl_units(path: str, stream, progress: _Progress, unit_bytes: int):
    line_no = 1
    rest = b""
    while True:
        block = stream.read(unit_bytes)
        if not block:
            break
        data = rest + block
        cut = data.rfind(b"\n") + 1
        if cut == 0:  # one line longer than a unit: keep reading
            rest = data
            continue
        chunk, rest = data[:cut], data[cut:]
        yield ("jsonl", path, line_no, chunk), progress.advance()
        line_no += chunk.count(b"\n")
    if rest.strip():
        yield ("jsonl", path, line_no, rest), progress.advance()


def _blank_line_units(path: str, stream, progress: _Progress, unit_bytes: int):
    docs: list[str] = []
    current: list[str] = []
    size = 0
    text = io.TextIOWrapper(stream, encoding="utf-8", errors="replace", newline="")
    for raw_line in text:
        if raw_line.strip():
            current.append(raw_line)
            size += len(raw_line)
            continue
        if current:
            docs.append("".join(current).rstrip("\r\n"))
            current = []
        if size >= unit_bytes:
            yield ("texts", path, docs), progress.advance()
            docs, size = [], 0
    if current:
        docs.append("".join(current).rstrip("\r\n"))
    text.detach()  # a collected wrapper would close the file under the caller
    if docs:
        yield ("texts", path, docs), progress.advance()


def _parquet_units(path: str, text_key: str, unit_bytes: int):
    try:
        import pyarrow.parquet as pq
    except ImportError:
        raise DataError(
            f"{path}: reading .parquet needs pyarrow",
            hint="pip install 'trident-engine[parquet]' (or pyarrow)",
        ) from None
    try:
        parquet = pq.ParquetFile(path)
    except Exception as err:  # pyarrow raises several types for bad files
        raise DataError(f"{path}: not a readable parquet file ({err})") from None
    if text_key not in parquet.schema_arrow.names:
        raise DataError(
            f"{path}: no column '{text_key}' (columns: {', '.join(parquet.schema_arrow.names)})",
            hint="pass --text-key",
        )
    size = os.path.getsize(path)  # progress: the whole file counts at its first batch
    for n, batch in enumerate(parquet.iter_batches(columns=[text_key], batch_size=4096)):
        texts = [t for t in batch.column(0).to_pylist() if isinstance(t, str)]
        yield ("texts", path, texts), size if n == 0 else 0


def sample_documents(
    files: list[str],
    max_docs: int,
    *,
    txt_mode: str = "file",
    text_key: str = "text",
    text_suffixes: tuple[str, ...] = (),
) -> list[str]:
    """Up to ``max_docs`` documents for tokenizer training: the first ``ceil(max_docs / files)`` per file."""
    from engine.data.tokenize_pipeline import documents_of_unit  # same parsing as the workers

    per_file = -(-max_docs // max(1, len(files)))
    docs: list[str] = []
    for path in files:
        taken = 0
        for unit, _ in iter_work_units(
            [path], txt_mode=txt_mode, text_key=text_key, unit_bytes=1 << 18, text_suffixes=text_suffixes
        ):
            for text in documents_of_unit(unit, text_key):
                docs.append(text)
                taken += 1
                if taken >= per_file or len(docs) >= max_docs:
                    break
            if taken >= per_file or len(docs) >= max_docs:
                break
        if len(docs) >= max_docs:
            break
    return docs
