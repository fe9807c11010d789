"""Text/JSONL/parquet -> SentencePiece tokens in Megatron ``.bin/.idx`` shards: what
``python -m engine.prepare`` runs (its options are :func:`build_parser`'s).

Examples::

    python -m engine.prepare --input corpus/ --output-prefix data/web --train-tokenizer --vocab-size 8000
    python -m engine.prepare --input 'dumps/*.jsonl.gz' --output-prefix data/web --tokenizer tok.model \\
        --workers 8 --shard-tokens 1000000000 --dedup
    python -m engine.prepare --verify data/web data/code

Documents: a ``.txt`` file is one document (``--txt-mode blank-line`` splits on blank lines), a
``.jsonl`` line is one document (field ``--text-key``), a parquet row is one document. EOS follows each
document. Tokens are uint16 when the vocabulary fits, else int32. The output is byte-identical for any
``--workers``. Beside the shards: ``P.tokenizer.model`` (a copy) and ``P.meta.json`` (its sha256,
vocab size, counts). See ``engine/data/shards.py`` for how prefixes name shard sets.
"""

from __future__ import annotations

import argparse
import os

from engine.errors import ConfigError, DataError


class _Parser(argparse.ArgumentParser):
    def error(self, message: str):  # one line and exit 2 through cli_main, not argparse's usage dump
        raise ConfigError(f"prepare: {message}", hint="python -m engine.prepare --help")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="python -m engine.prepare",
        description="text/JSONL/parquet -> SentencePiece tokens in Megatron .bin/.idx shards",
    )
    p.add_argument(
        "--input", nargs="+", metavar="PATH", help="files, directories or globs (.txt, .jsonl, .gz, .parquet)"
    )
    p.add_argument("--output-prefix", metavar="P", help="write P.bin/.idx (or P_00000.bin/.idx... with --shard-tokens)")
    p.add_argument("--tokenizer", metavar="M.model", help="an existing SentencePiece model")
    p.add_argument(
        "--train-tokenizer", action="store_true", help="train a SentencePiece model on a sample of the input"
    )
    p.add_argument("--vocab-size", type=int, help="vocabulary of the trained tokenizer; with --verify, the id bound")
    p.add_argument("--model-type", choices=("bpe", "unigram"), default="bpe")
    p.add_argument("--character-coverage", type=float, default=0.9995)
    p.add_argument("--user-symbols", nargs="*", default=[], metavar="SYM", help="extra special tokens")
    p.add_argument(
        "--tokenizer-sample-docs",
        type=int,
        default=100_000,
        metavar="N",
        help="documents to train the tokenizer on, spread over the input files (default 100000)",
    )
    p.add_argument("--text-key", default="text", help="JSONL/parquet field holding the text (default: text)")
    p.add_argument(
        "--text-suffixes",
        nargs="*",
        default=[],
        metavar="SUFFIX",
        help="more file suffixes read like .txt, e.g. .py .md",
    )
    p.add_argument(
        "--txt-mode",
        choices=("file", "blank-line"),
        default="file",
        help=".txt documents: whole file (default) or blank-line separated blocks",
    )
    p.add_argument("--workers", type=int, default=os.cpu_count() or 1, help="tokenizer processes (default: all cores)")
    p.add_argument("--shard-tokens", type=int, metavar="N", help="start a new shard after N tokens")
    p.add_argument("--dedup", action="store_true", help="drop exact duplicate documents (by content hash)")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.add_argument("--verify", nargs="+", metavar="PREFIX", help="verify existing shards instead of preparing")
    return p


def _prepare(args: argparse.Namespace) -> int:
    from engine.data.shards import TOKENIZER_SUFFIX
    from engine.data.text_sources import expand_inputs, iter_work_units, sample_documents
    from engine.data.tokenize_pipeline import run_prepare
    from engine.data.tokenizer import Tokenizer

    if not args.input or not args.output_prefix:
        raise ConfigError("prepare: --input and --output-prefix are required (or use --verify PREFIX...)")
    if bool(args.tokenizer) == bool(args.train_tokenizer):
        raise ConfigError("prepare: give exactly one of --tokenizer M.model or --train-tokenizer")
    if args.train_tokenizer and not args.vocab_size:
        raise ConfigError("prepare: --train-tokenizer needs --vocab-size", hint="e.g. --vocab-size 8000")
    for name in ("workers", "shard_tokens", "tokenizer_sample_docs"):
        value = getattr(args, name)
        if value is not None and value < 1:
            raise ConfigError(f"prepare: --{name.replace('_', '-')} must be >= 1 (got {value})")
    suffixes = tuple(s if s.startswith(".") else "." + s for s in args.text_suffixes)
    files = expand_inputs(args.input, text_suffixes=suffixes)
    prefix = args.output_prefix
    os.makedirs(os.path.dirname(os.path.abspath(prefix)), exist_ok=True)
    if args.train_tokenizer:
        docs = sample_documents(
            files,
            args.tokenizer_sample_docs,
            txt_mode=args.txt_mode,
            text_key=args.text_key,
            text_suffixes=suffixes,
        )
        if not docs:
            raise DataError(f"{files[0]}: no text to train the tokenizer on")
        model_prefix = prefix + TOKENIZER_SUFFIX[: -len(".model")]
        tokenizer = Tokenizer.train(
            docs,
            model_prefix=model_prefix,
            vocab_size=args.vocab_size,
            model_type=args.model_type,
            character_coverage=args.character_coverage,
            user_defined_symbols=args.user_symbols,
            num_threads=args.workers,
        )
    else:
        tokenizer = Tokenizer.load(args.tokenizer)
    units = iter_work_units(files, txt_mode=args.txt_mode, text_key=args.text_key, text_suffixes=suffixes)
    total = sum(os.path.getsize(f) for f in files)
    summary = run_prepare(
        units,
        output_prefix=prefix,
        tokenizer=tokenizer,
        workers=args.workers,
        shard_tokens=args.shard_tokens,
        dedup=args.dedup,
        text_key=args.text_key,
        total_bytes=total,
        progress=not args.no_progress,
        num_files=len(files),
    )
    print("\n".join(summary.lines()), flush=True)
    return 0


def _verify(args: argparse.Namespace) -> int:
    from engine.data.verify import verify_prefix

    for prefix in args.verify:
        r = verify_prefix(prefix, vocab_size=args.vocab_size)
        bound = f", ids < {r['vocab_size']}" if r["vocab_size"] else ", ids unchecked (no vocab size)"
        print(f"ok {prefix}: {r['shards']} shard(s), {r['documents']:,} documents, {r['tokens']:,} tokens{bound}")
    return 0


def run(args: argparse.Namespace) -> int:
    """Prepare shards, or verify them (``--verify``), as the parsed command line asks."""
    if args.verify:
        if args.input:
            raise ConfigError("prepare: --verify cannot be combined with --input")
        return _verify(args)
    return _prepare(args)
