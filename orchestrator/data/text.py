"""Text corpora for decoder-only language models: documents, a byte-level BPE tokenizer and tokenised shards.

    files = stdlib_corpus()                       # or local_corpus("~/notes", "**/*.md")
    info = prepare_corpus(files, "runs/data/stdlib", vocab_size=8192)
    train = TokenWindows(info.out_dir, "train", seq_len=256)
    train[0]                                      # {"input_ids": int64 (256,), "labels": int64 (256,)}

Documents. The default corpus needs no download: the `*.py` files of the running Python's standard library
(tests and site-packages left out), sorted by relative path. Each document is known by its path relative to a
root (the corpus directory; by default the deepest directory holding every file), and is read as UTF-8 bytes,
undecodable bytes becoming U+FFFD.

Split. A document goes to validation when the SHA-1 of its relative path, read as a number in [0, 1), is below
`val_fraction`, so adding or removing files never moves the others between splits. With two documents or more,
validation gets at least one (the lowest hash) and train keeps at least one (the highest hash).

Tokenizer. Byte-level BPE (`tokenizers`) trained on the train documents only, with every byte in the initial
alphabet, so any text encodes without an unknown token and decode(encode(text)) == text. The only special token
is `<|endoftext|>` (EOT); the tokenizers given here encode that string when it occurs in a text as ordinary bytes,
so an EOT id in a stream always comes from the writer, never from a document.

Stream. Each split is one token stream: every document's ids followed by EOT, in document order. A prepared
corpus directory holds
    tokenizer.json             the tokenizer
    train-00000.parquet ...    the train stream cut every `shard_tokens` tokens (documents may span shards)
    val-00000.parquet ...      the validation stream (none when the split is empty)
    meta.json                  written last: vocab size, EOT id, dtype, tokens and shards per split, the documents
                               of each split, the settings and the fingerprint of the corpus
Every shard has one column `ids`, one row per token, uint16 when the vocabulary fits (uint32 otherwise), in
zstd-compressed row groups of 64Ki tokens without dictionary encoding: about 1 byte per token on disk, decoded
at over 100M tokens/s. Shards and meta.json are written to a `.tmp` name and renamed, and only names
`{split}-{i:05d}.parquet` count as shards.

Reuse. `prepare_corpus` rebuilds only when the fingerprint differs: SHA-1 over the settings and, for every
document, its relative path, byte size and mtime (ns); editing, adding, removing or renaming a file changes it.
A build happens in a hidden sibling directory that is renamed into place, so readers never see a partial corpus;
when two processes build at once, the one that loses the rename uses the winner's directory.

Reading. `TokenWindows` decodes the shards of a split (memory-mapped, so no read buffer is allocated) and
concatenates them once into one numpy array: 2 bytes per token (twice that while concatenating), fine for a few
hundred million tokens; each DataLoader worker holds it too (shared copy-on-write under fork).
"""

from __future__ import annotations

import errno
import hashlib
import json
import os
import re
import shutil
import sysconfig
import uuid
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from torch.utils.data import Dataset

EOT = "<|endoftext|>"
FORMAT = 1  # bump when the directory layout changes: older directories are then rebuilt
META_FILE = "meta.json"
TOKENIZER_FILE = "tokenizer.json"
ROW_GROUP_TOKENS = 65_536
ENCODE_BATCH_DOCS = 256
INSTALL_ATTEMPTS = 10
STDLIB_EXCLUDED_DIRS = frozenset({"site-packages", "test", "tests", "idle_test"})
SPLIT_NAME = re.compile(r"[A-Za-z0-9_]+")


# ---------------------------------------------------------------------------------------------- documents


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def stdlib_corpus(max_files: int | None = None) -> list[Path]:
    """The standard library's `*.py` files outside site-packages and test directories, by relative path.

    max_files keeps the first files of that order, so a smaller corpus is a prefix of a larger one.
    """
    root = stdlib_root()
    if not root.is_dir():
        raise FileNotFoundError(f"standard library directory {root} does not exist")
    files = []
    for directory, subdirs, names in os.walk(root):
        subdirs[:] = [d for d in subdirs if d not in STDLIB_EXCLUDED_DIRS]  # prune: never walk into them
        files.extend(Path(directory, name) for name in names if name.endswith(".py"))
    files.sort(key=lambda p: p.relative_to(root).as_posix())
    return files if max_files is None else files[:max_files]


def local_corpus(root: Path | str, pattern: str | Sequence[str] = "**/*.txt") -> list[Path]:
    """The files under `root` matching `pattern` (one glob or several, e.g. ("**/*.md", "**/*.py")), by relative
    path; hidden files and anything inside a hidden directory (.git, .ipynb_checkpoints) are skipped."""
    root = Path(root).expanduser()
    if not root.is_dir():
        raise FileNotFoundError(f"corpus directory {root} does not exist")
    patterns = [pattern] if isinstance(pattern, str) else list(pattern)
    found = {p for pat in patterns for p in root.glob(pat) if p.is_file()}
    files = sorted(
        (p for p in found if not any(part.startswith(".") for part in p.relative_to(root).parts)),
        key=lambda p: p.relative_to(root).as_posix(),
    )
    if not files:
        raise FileNotFoundError(f"no files match {', '.join(patterns)} under {root}")
    return files


def relative_names(files: Sequence[Path], root: Path | str | None = None) -> list[str]:
    """Each file's path relative to `root` (default: the deepest directory holding every file), POSIX style."""
    if not files:
        raise ValueError("no documents: the file list is empty")
    paths = [Path(f).absolute() for f in files]
    base = Path(root).absolute() if root is not None else Path(os.path.commonpath([p.parent for p in paths]))
    names = []
    for path in paths:
        if not path.is_relative_to(base):
            raise ValueError(f"document {path} is not under the corpus root {base}")
        names.append(path.relative_to(base).as_posix())
    duplicates = sorted(name for name, count in Counter(names).items() if count > 1)
    if duplicates:
        raise ValueError(f"documents listed twice under {base}: {', '.join(duplicates[:5])}")
    return names


def read_document(path: Path) -> str:
    return Path(path).read_bytes().decode("utf-8", errors="replace")


# ---------------------------------------------------------------------------------------------- split


def split_documents(
    files: Sequence[Path], val_fraction: float = 0.05, root: Path | str | None = None
) -> tuple[list[Path], list[Path]]:
    """(train, val) files, each in the input order, split by the hash of each document's relative path."""
    if not 0.0 < val_fraction < 1.0:
        raise ValueError(f"val_fraction: expected a number in (0, 1), found {val_fraction!r}")
    scores = [_hash_fraction(name) for name in relative_names(files, root)]
    is_val = [score < val_fraction for score in scores]
    if len(files) >= 2 and not any(is_val):
        is_val[scores.index(min(scores))] = True
    if all(is_val):
        is_val[scores.index(max(scores))] = False
    train = [Path(f) for f, v in zip(files, is_val) if not v]
    val = [Path(f) for f, v in zip(files, is_val) if v]
    return train, val


def _hash_fraction(name: str) -> float:
    """A stable number in [0, 1) for a relative path: the first 8 bytes of its SHA-1 over 2**64."""
    return int.from_bytes(hashlib.sha1(name.encode()).digest()[:8], "big") / 2**64


# ---------------------------------------------------------------------------------------------- tokenizer


def train_tokenizer(
    files: Sequence[Path], vocab_size: int = 8192, out_path: Path | str | None = None, min_frequency: int = 2
) -> Tokenizer:
    """A byte-level BPE tokenizer of at most `vocab_size` tokens (EOT and the 256 bytes included) trained on
    `files`, saved to `out_path` when given. A tiny corpus may run out of merges below `vocab_size`."""
    if vocab_size < 257:
        raise ValueError(f"vocab_size: expected at least 257 (256 bytes and {EOT}), found {vocab_size}")
    if not files:
        raise ValueError("train_tokenizer: the file list is empty")
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[EOT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator((read_document(f) for f in files), trainer, length=len(files))
    tokenizer.encode_special_tokens = True
    if out_path is not None:
        _atomic_write(Path(out_path), tokenizer.to_str().encode())
    return tokenizer


def load_tokenizer(path: Path | str) -> Tokenizer:
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"tokenizer file {path} does not exist")
    tokenizer = Tokenizer.from_file(str(path))
    tokenizer.encode_special_tokens = True  # not saved in tokenizer.json
    return tokenizer


def eot_id(tokenizer: Tokenizer) -> int:
    token_id = tokenizer.token_to_id(EOT)
    if token_id is None:
        raise ValueError(f"the tokenizer has no {EOT} token")
    return token_id


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 2**16 else np.uint32)


# ---------------------------------------------------------------------------------------------- shards


def write_token_shards(
    files: Sequence[Path], tokenizer: Tokenizer, out_dir: Path | str, split_name: str, shard_tokens: int = 1_000_000
) -> list[Path]:
    """Encode `files` into the stream doc0 EOT doc1 EOT ... and write it as `out_dir/{split_name}-{i:05d}.parquet`,
    `shard_tokens` tokens per shard (the last one shorter). Shards of this split left over from an earlier
    write are removed. No files, no shards."""
    if not SPLIT_NAME.fullmatch(split_name):
        raise ValueError(f"split_name: expected letters, digits or _, found {split_name!r}")
    if shard_tokens < 1:
        raise ValueError(f"shard_tokens: expected a positive number, found {shard_tokens}")
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    dtype = token_dtype(tokenizer.get_vocab_size())
    shards: list[Path] = []
    pending: list[np.ndarray] = []  # [(n,) dtype], fewer than shard_tokens tokens in all between batches
    pending_tokens = 0
    for chunk in _encoded_chunks(files, tokenizer, dtype):
        pending.append(chunk)
        pending_tokens += len(chunk)
        if pending_tokens < shard_tokens:
            continue
        stream = np.concatenate(pending)  # (pending_tokens,)
        full = len(stream) - len(stream) % shard_tokens
        for start in range(0, full, shard_tokens):
            path = out_dir / _shard_name(split_name, len(shards))
            shards.append(_write_shard(stream[start : start + shard_tokens], path))
        pending, pending_tokens = [stream[full:]], len(stream) - full
    if pending_tokens:
        shards.append(_write_shard(np.concatenate(pending), out_dir / _shard_name(split_name, len(shards))))
    for stale in set(list_shards(out_dir, split_name)) - set(shards):
        stale.unlink()
    return shards


def list_shards(out_dir: Path | str, split_name: str) -> list[Path]:
    """The finished shards of a split in `out_dir`, in stream order (temporary files never match)."""
    pattern = re.compile(rf"{re.escape(split_name)}-(\d{{5,}})\.parquet")
    matches = [(m, p) for p in Path(out_dir).iterdir() if (m := pattern.fullmatch(p.name))]
    return [p for m, p in sorted(matches, key=lambda mp: int(mp[0].group(1)))]


def _shard_name(split_name: str, index: int) -> str:
    return f"{split_name}-{index:05d}.parquet"


def _encoded_chunks(files: Sequence[Path], tokenizer: Tokenizer, dtype: np.dtype) -> Iterator[np.ndarray]:
    """The stream in pieces, one per batch of documents: (n,) dtype, each document followed by EOT."""
    eot = np.array([eot_id(tokenizer)], dtype=dtype)
    for start in range(0, len(files), ENCODE_BATCH_DOCS):
        texts = [read_document(f) for f in files[start : start + ENCODE_BATCH_DOCS]]
        encodings = tokenizer.encode_batch(texts, add_special_tokens=False)
        yield np.concatenate([part for enc in encodings for part in (np.asarray(enc.ids, dtype=dtype), eot)])


def _write_shard(ids: np.ndarray, path: Path) -> Path:
    tmp = path.with_name(path.name + ".tmp")
    table = pa.table({"ids": pa.array(ids)})
    pq.write_table(table, tmp, row_group_size=ROW_GROUP_TOKENS, compression="zstd", use_dictionary=False)
    os.replace(tmp, path)
    return path


def read_shards(shards: Sequence[Path]) -> np.ndarray:
    """The ids of `shards` concatenated: (n,) uint16/uint32; each file is memory-mapped while it is decoded."""
    chunks = [
        chunk.to_numpy(zero_copy_only=True)
        for shard in shards
        for chunk in pq.read_table(shard, columns=["ids"], memory_map=True).column("ids").chunks
    ]
    return np.concatenate(chunks) if chunks else np.zeros(0, dtype=np.uint16)


# ---------------------------------------------------------------------------------------------- prepared corpus


@dataclass(frozen=True)
class CorpusInfo:
    out_dir: Path
    vocab_size: int  # the tokenizer's actual size, at most the requested one
    eot_id: int
    train_tokens: int
    val_tokens: int
    train_shards: list[Path]
    val_shards: list[Path]

    @property
    def tokenizer_path(self) -> Path:
        return self.out_dir / TOKENIZER_FILE


@dataclass(frozen=True)
class CorpusSettings:
    vocab_size: int = 8192  # requested; the tokenizer may end up smaller
    val_fraction: float = 0.05
    shard_tokens: int = 1_000_000


def prepare_corpus(
    files: Sequence[Path],
    out_dir: Path | str,
    vocab_size: int = 8192,
    val_fraction: float = 0.05,
    shard_tokens: int = 1_000_000,
    root: Path | str | None = None,
) -> CorpusInfo:
    """Split `files`, train the tokenizer on the train split and write both streams to `out_dir`, or reuse
    `out_dir` when it already holds this corpus with these settings. `root` names documents (see
    `relative_names`); pass the corpus directory to keep names stable when files are added in new subdirectories.
    """
    settings = CorpusSettings(vocab_size, val_fraction, shard_tokens)
    out_dir = Path(out_dir)
    fingerprint = corpus_fingerprint(files, settings, root)
    meta = _read_meta(out_dir)
    if meta is not None and meta["fingerprint"] == fingerprint:
        return _corpus_info(out_dir, meta)
    _check_replaceable(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    build = out_dir.with_name(f".{out_dir.name}.build-{uuid.uuid4().hex}")
    try:
        _build_corpus(files, build, settings, fingerprint, root)
        meta = _install(build, out_dir, fingerprint)
    finally:
        shutil.rmtree(build, ignore_errors=True)
    return _corpus_info(out_dir, meta)


def load_corpus_info(out_dir: Path | str) -> CorpusInfo:
    """The `CorpusInfo` of a directory that `prepare_corpus` wrote."""
    out_dir = Path(out_dir)
    meta = _read_meta(out_dir)
    if meta is None:
        raise FileNotFoundError(f"{out_dir / META_FILE} does not exist: prepare the corpus first")
    return _corpus_info(out_dir, meta)


def corpus_fingerprint(files: Sequence[Path], settings: CorpusSettings, root: Path | str | None = None) -> str:
    digest = hashlib.sha1(json.dumps({"format": FORMAT, **asdict(settings)}, sort_keys=True).encode())
    for name, path in sorted(zip(relative_names(files, root), files)):
        stat = Path(path).stat()
        digest.update(f"{name}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def _build_corpus(
    files: Sequence[Path], out_dir: Path, settings: CorpusSettings, fingerprint: str, root: Path | str | None
) -> None:
    names = dict(zip(map(Path, files), relative_names(files, root)))
    train, val = split_documents(files, settings.val_fraction, root)
    out_dir.mkdir()
    tokenizer = train_tokenizer(train, settings.vocab_size, out_dir / TOKENIZER_FILE)
    shards = {split: write_token_shards(docs, tokenizer, out_dir, split, settings.shard_tokens)
              for split, docs in (("train", train), ("val", val))}
    meta = {
        "format": FORMAT,
        "fingerprint": fingerprint,
        "settings": asdict(settings),
        "vocab_size": tokenizer.get_vocab_size(),
        "eot_id": eot_id(tokenizer),
        "dtype": token_dtype(tokenizer.get_vocab_size()).name,
        "tokens": {split: sum(pq.ParquetFile(p).metadata.num_rows for p in paths) for split, paths in shards.items()},
        "shards": {split: [p.name for p in paths] for split, paths in shards.items()},
        "documents": {"train": [names[f] for f in train], "val": [names[f] for f in val]},
    }
    _atomic_write(out_dir / META_FILE, json.dumps(meta, indent=1).encode())


def _install(build: Path, out_dir: Path, fingerprint: str) -> dict[str, Any]:
    """Rename `build` to `out_dir`, first moving aside a stale corpus there; when another process installed this
    same corpus meanwhile, keep theirs. The meta of the installed directory."""
    for _ in range(INSTALL_ATTEMPTS):
        try:
            os.rename(build, out_dir)  # atomic; fails while out_dir is a non-empty directory
            break
        except OSError as error:
            if error.errno not in (errno.EEXIST, errno.ENOTEMPTY):
                raise
        meta = _read_meta(out_dir)
        if meta is not None and meta["fingerprint"] == fingerprint:
            return meta
        _move_aside_and_delete(out_dir)
    else:
        raise RuntimeError(f"could not install the corpus at {out_dir}: other processes kept replacing it")
    meta = _read_meta(out_dir)
    if meta is None:
        raise FileNotFoundError(f"{out_dir / META_FILE} vanished right after the corpus was installed")
    return meta


def _move_aside_and_delete(out_dir: Path) -> None:
    """Remove a stale corpus directory; renaming it first keeps the removal invisible to readers of `out_dir`."""
    _check_replaceable(out_dir)
    stale = out_dir.with_name(f".{out_dir.name}.stale-{uuid.uuid4().hex}")
    try:
        os.rename(out_dir, stale)
    except FileNotFoundError:
        return  # another process moved it first
    shutil.rmtree(stale, ignore_errors=True)


def _check_replaceable(out_dir: Path) -> None:
    """Refuse to replace a directory that is neither empty nor a corpus directory (no meta.json)."""
    if out_dir.is_dir() and any(out_dir.iterdir()) and not (out_dir / META_FILE).is_file():
        raise ValueError(f"{out_dir} exists and is not a corpus directory (no {META_FILE}); choose another out_dir")
    if out_dir.exists() and not out_dir.is_dir():
        raise ValueError(f"{out_dir} exists and is not a directory")


def _read_meta(out_dir: Path) -> dict[str, Any] | None:
    """meta.json of `out_dir`, or None when it is missing or was written by another FORMAT."""
    try:
        meta = json.loads((out_dir / META_FILE).read_text())
    except FileNotFoundError:
        return None
    return meta if meta.get("format") == FORMAT else None


def _corpus_info(out_dir: Path, meta: dict[str, Any]) -> CorpusInfo:
    return CorpusInfo(
        out_dir=out_dir,
        vocab_size=meta["vocab_size"],
        eot_id=meta["eot_id"],
        train_tokens=meta["tokens"]["train"],
        val_tokens=meta["tokens"]["val"],
        train_shards=[out_dir / name for name in meta["shards"]["train"]],
        val_shards=[out_dir / name for name in meta["shards"]["val"]],
    )


def _atomic_write(path: Path, data: bytes) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_bytes(data)
    os.replace(tmp, path)


# ---------------------------------------------------------------------------------------------- dataset


class TokenWindows(Dataset):
    """Non-overlapping windows of one split's stream: item i covers tokens [i*L, i*L + L + 1), L = seq_len.

    item: {"input_ids": int64 (L,), "labels": int64 (L,)}, labels[t] = input_ids[t + 1] (the next token).
    len = (num_tokens - 1) // L; the tail that does not fill a window is dropped.
    """

    def __init__(self, out_dir: Path | str, split: str, seq_len: int):
        if seq_len < 1:
            raise ValueError(f"seq_len: expected a positive number, found {seq_len}")
        info = load_corpus_info(out_dir)
        shards = {"train": info.train_shards, "val": info.val_shards}
        if split not in shards:
            raise ValueError(f"split: expected 'train' or 'val', found {split!r}")
        self.tokens = read_shards(shards[split])  # (num_tokens,) uint16/uint32
        expected = info.train_tokens if split == "train" else info.val_tokens
        if len(self.tokens) != expected:
            raise ValueError(f"{split} shards of {info.out_dir} hold {len(self.tokens)} tokens, meta says {expected}")
        if len(self.tokens) < seq_len + 1:
            raise ValueError(f"{split} split of {info.out_dir} has {len(self.tokens)} tokens, fewer than "
                             f"seq_len + 1 = {seq_len + 1}")
        self.seq_len = seq_len
        self.vocab_size = info.vocab_size
        self.eot_id = info.eot_id

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        if not 0 <= i < len(self):
            raise IndexError(f"window {i} out of range for {len(self)} windows")
        start = i * self.seq_len
        window = torch.from_numpy(self.tokens[start : start + self.seq_len + 1].astype(np.int64))  # (L+1,)
        return {"input_ids": window[:-1], "labels": window[1:]}

    def set_epoch(self, epoch: int) -> None:
        """Windows do not depend on the epoch; present because the launcher calls it on every train set."""
