"""orchestrator.data.text: the stdlib and local corpora, the document split, the byte-level BPE tokenizer, the
token shards, prepare_corpus's reuse and rebuild, and the windows TokenWindows serves."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from torch.utils.data import DataLoader

from orchestrator.data import text
from orchestrator.data.text import (
    EOT,
    TokenWindows,
    list_shards,
    load_tokenizer,
    local_corpus,
    prepare_corpus,
    read_document,
    read_shards,
    split_documents,
    stdlib_corpus,
    stdlib_root,
    train_tokenizer,
    write_token_shards,
)

SMALL_FILES = 200  # about 3 MB of the stdlib
SMALL_VOCAB = 512
ROUND_TRIP = "def f(x):\n    return x ** 2  # ünïcødé ✓ 😀\r\n\tÀ la carte: 東京, Ω≈ç√, \x00\x7f end"


@pytest.fixture(scope="module")
def prepared(tmp_path_factory: pytest.TempPathFactory) -> text.CorpusInfo:
    out = tmp_path_factory.mktemp("stdlib") / "corpus"
    return prepare_corpus(stdlib_corpus(SMALL_FILES), out, vocab_size=SMALL_VOCAB, val_fraction=0.1,
                          shard_tokens=100_000)


@pytest.fixture
def notes(tmp_path: Path) -> Path:
    """A local corpus of 12 small text files: stdlib modules' docstrings and code, saved as .txt."""
    root = tmp_path / "notes"
    (root / "sub").mkdir(parents=True)
    for i, source in enumerate(stdlib_corpus()[200:212]):
        folder = root / "sub" if i % 3 == 0 else root
        (folder / f"note{i:02d}.txt").write_text(read_document(source)[:4000])
    return root


def _stream(files: list[Path], tokenizer) -> np.ndarray:
    """The expected stream: each document's ids directly from the tokenizer, followed by EOT."""
    eot = tokenizer.token_to_id(EOT)
    return np.array([i for f in files for i in (*tokenizer.encode(read_document(f)).ids, eot)], dtype=np.int64)


def _meta(out_dir: Path) -> dict:
    return json.loads((out_dir / "meta.json").read_text())


# ---------------------------------------------------------------------------------------------- documents


def test_stdlib_corpus_is_deterministic_and_leaves_out_tests():
    root = stdlib_root()
    files = stdlib_corpus()
    assert files == stdlib_corpus() and len(files) > 300
    names = [f.relative_to(root).as_posix() for f in files]
    assert names == sorted(names) and "os.py" in names and "json/decoder.py" in names
    assert all(f.suffix == ".py" and f.is_file() for f in files)
    excluded = {"site-packages", "test", "tests", "idle_test"}
    assert not any(excluded & set(Path(name).parts) for name in names)
    assert not any(name.startswith(("test/", "lib2to3/tests/", "idlelib/idle_test/")) for name in names)
    assert stdlib_corpus(50) == files[:50]


def test_local_corpus_patterns_and_errors(tmp_path: Path, notes: Path):
    (notes / "readme.md").write_text("# notes\n")
    (notes / ".hidden.txt").write_text("skip me\n")
    (notes / ".git").mkdir()
    (notes / ".git" / "log.txt").write_text("skip me too\n")
    txt = local_corpus(notes)
    assert len(txt) == 12 and all(f.suffix == ".txt" and ".git" not in f.parts for f in txt)
    assert [f.relative_to(notes).as_posix() for f in txt] == sorted(f.relative_to(notes).as_posix() for f in txt)
    assert len(local_corpus(notes, ("**/*.txt", "**/*.md"))) == 13
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match=str(empty)):
        local_corpus(empty)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "missing")):
        local_corpus(tmp_path / "missing")


# ---------------------------------------------------------------------------------------------- split


def test_split_is_deterministic_disjoint_and_stable():
    files = stdlib_corpus()
    train, val = split_documents(files, 0.05)
    assert (train, val) == split_documents(files, 0.05)
    assert not set(train) & set(val) and sorted(train + val) == sorted(files)
    assert 0.01 < len(val) / len(files) < 0.12
    fewer_train, fewer_val = split_documents(files[:-1], 0.05, root=stdlib_root())
    assert fewer_train == [f for f in train if f != files[-1]] and fewer_val == [f for f in val if f != files[-1]]
    with pytest.raises(ValueError, match="val_fraction"):
        split_documents(files, 1.0)


def test_split_keeps_a_document_on_each_side(tmp_path: Path):
    pair = [tmp_path / "a.txt", tmp_path / "b.txt"]
    for path in pair:
        path.write_text("x")
    for fraction in (1e-9, 0.999999):
        train, val = split_documents(pair, fraction)
        assert len(train) == len(val) == 1
    assert split_documents(pair[:1], 0.5) == (pair[:1], [])


# ---------------------------------------------------------------------------------------------- tokenizer


def test_tokenizer_round_trip_eot_and_vocab(tmp_path: Path):
    path = tmp_path / "tokenizer.json"
    trained = train_tokenizer(stdlib_corpus(40), SMALL_VOCAB, path)
    loaded = load_tokenizer(path)
    for tokenizer in (trained, loaded):
        assert 256 < tokenizer.get_vocab_size() <= SMALL_VOCAB
        assert tokenizer.token_to_id(EOT) is not None
        assert tokenizer.decode(tokenizer.encode(ROUND_TRIP).ids) == ROUND_TRIP
        literal = f"a{EOT}b"  # the string in a document stays text, never the EOT id
        ids = tokenizer.encode(literal).ids
        assert tokenizer.token_to_id(EOT) not in ids and tokenizer.decode(ids) == literal
    assert loaded.encode(ROUND_TRIP).ids == trained.encode(ROUND_TRIP).ids


def test_tokenizer_on_a_tiny_corpus_and_bad_arguments(tmp_path: Path):
    tiny = tmp_path / "tiny.txt"
    tiny.write_text("hello hello world world\n" * 3)
    assert train_tokenizer([tiny], 8192).get_vocab_size() < 8192
    with pytest.raises(ValueError, match="vocab_size"):
        train_tokenizer([tiny], 200)
    with pytest.raises(FileNotFoundError, match=str(tmp_path / "nope.json")):
        load_tokenizer(tmp_path / "nope.json")


# ---------------------------------------------------------------------------------------------- shards


def test_shards_hold_the_encoded_documents(prepared: text.CorpusInfo):
    meta = _meta(prepared.out_dir)
    tokenizer = load_tokenizer(prepared.tokenizer_path)
    assert prepared.vocab_size == tokenizer.get_vocab_size() <= SMALL_VOCAB
    assert prepared.eot_id == meta["eot_id"] == tokenizer.token_to_id(EOT)
    for split, shards, tokens in (("train", prepared.train_shards, prepared.train_tokens),
                                  ("val", prepared.val_shards, prepared.val_tokens)):
        documents = [stdlib_root() / name for name in meta["documents"][split]]
        encoded = [tokenizer.encode(read_document(d)).ids for d in documents]
        assert tokens == meta["tokens"][split] == sum(map(len, encoded)) + len(documents)
        expected = np.array([i for ids in encoded for i in (*ids, prepared.eot_id)], dtype=np.int64)
        ids = read_shards(shards)
        assert ids.dtype == np.uint16 and np.array_equal(ids.astype(np.int64), expected)
        assert shards == list_shards(prepared.out_dir, split)
    assert len(prepared.train_shards) > 1
    first = pq.ParquetFile(prepared.train_shards[0])
    assert first.metadata.num_rows == 100_000 and first.metadata.num_row_groups == 2
    assert first.schema_arrow.names == ["ids"]
    assert sorted(meta["documents"]["train"] + meta["documents"]["val"]) == sorted(
        f.relative_to(stdlib_root()).as_posix() for f in stdlib_corpus(SMALL_FILES))


def test_write_token_shards_lists_only_finished_shards(tmp_path: Path, prepared: text.CorpusInfo):
    tokenizer = load_tokenizer(prepared.tokenizer_path)
    files = stdlib_corpus(10)
    out = tmp_path / "shards"
    many = write_token_shards(files, tokenizer, out, "train", shard_tokens=5_000)
    assert [p.name for p in many[:2]] == ["train-00000.parquet", "train-00001.parquet"]
    (out / "train-00000.parquet.tmp").write_bytes(b"half")
    (out / "train-00099.parquet.tmp").write_bytes(b"half")
    assert list_shards(out, "train") == many and list_shards(out, "val") == []
    ids = read_shards(many)
    assert np.array_equal(ids.astype(np.int64), _stream(files, tokenizer))
    one = write_token_shards(files, tokenizer, out, "train", shard_tokens=10**9)  # rewritten: stale shards go
    assert one == list_shards(out, "train") == [out / "train-00000.parquet"]
    assert np.array_equal(read_shards(one), ids)


# ---------------------------------------------------------------------------------------------- prepare_corpus


def _count_builds(monkeypatch: pytest.MonkeyPatch) -> list[Path]:
    builds: list[Path] = []
    real = text._build_corpus

    def counting(files, out_dir, *args):
        builds.append(out_dir)
        real(files, out_dir, *args)

    monkeypatch.setattr(text, "_build_corpus", counting)
    return builds


def test_prepare_corpus_reuses_and_rebuilds(tmp_path: Path, notes: Path, monkeypatch: pytest.MonkeyPatch):
    builds = _count_builds(monkeypatch)
    out = tmp_path / "prepared"
    first = prepare_corpus(local_corpus(notes), out, vocab_size=300, val_fraction=0.2, root=notes)
    stamp = (out / "meta.json").stat()
    again = prepare_corpus(local_corpus(notes), out, vocab_size=300, val_fraction=0.2, root=notes)
    assert again == first and len(builds) == 1
    assert (out / "meta.json").stat().st_mtime_ns == stamp.st_mtime_ns
    assert first.vocab_size <= 300 and first.train_tokens > 0 and first.val_tokens > 0

    edited = notes / "note01.txt"
    edited.write_text(edited.read_text() + "\nOne more line.\n")
    changed = prepare_corpus(local_corpus(notes), out, vocab_size=300, val_fraction=0.2, root=notes)
    assert len(builds) == 2 and changed.train_tokens + changed.val_tokens > first.train_tokens + first.val_tokens

    old_split = _meta(out)["documents"]
    (notes / "new").mkdir()
    (notes / "new" / "extra.txt").write_text("A new document in a new directory.\n")
    prepare_corpus(local_corpus(notes), out, vocab_size=300, val_fraction=0.2, root=notes)
    new_split = _meta(out)["documents"]
    for split in ("train", "val"):
        assert set(old_split[split]) <= set(new_split[split])
    prepare_corpus(local_corpus(notes), out, vocab_size=280, val_fraction=0.2, root=notes)
    assert len(builds) == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "prepared"]  # no build or stale dirs left


def test_prepare_corpus_uses_the_winner_of_a_race(tmp_path: Path, notes: Path, monkeypatch: pytest.MonkeyPatch):
    """A second process installs the same corpus while this one builds: this one keeps the winner's directory."""
    out = tmp_path / "prepared"
    real = text._build_corpus
    builds: list[Path] = []
    winner: list[int] = []  # the inode of the winner's meta.json

    def racing(files, out_dir, *args):
        builds.append(out_dir)
        if len(builds) == 1:
            prepare_corpus(files, out, vocab_size=300, val_fraction=0.2, root=notes)
            winner.append((out / "meta.json").stat().st_ino)
        real(files, out_dir, *args)

    monkeypatch.setattr(text, "_build_corpus", racing)
    info = prepare_corpus(local_corpus(notes), out, vocab_size=300, val_fraction=0.2, root=notes)
    assert len(builds) == 2 and (out / "meta.json").stat().st_ino == winner[0]
    assert info == text.load_corpus_info(out) and info.train_tokens > 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes", "prepared"]


def test_prepare_corpus_refuses_a_foreign_directory(tmp_path: Path, notes: Path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("precious")
    with pytest.raises(ValueError, match=str(out)):
        prepare_corpus(local_corpus(notes), out, vocab_size=300)
    assert (out / "thesis.tex").read_text() == "precious"


# ---------------------------------------------------------------------------------------------- windows


def test_token_windows(prepared: text.CorpusInfo):
    seq_len = 64
    windows = TokenWindows(prepared.out_dir, "train", seq_len)
    stream = read_shards(prepared.train_shards).astype(np.int64)
    assert len(windows) == (prepared.train_tokens - 1) // seq_len
    first, second = windows[0], windows[1]
    assert first["input_ids"].dtype == first["labels"].dtype == torch.int64
    assert first["input_ids"].shape == first["labels"].shape == (seq_len,)
    assert torch.equal(first["labels"][:-1], first["input_ids"][1:])
    assert first["labels"][-1] == second["input_ids"][0]  # across the window boundary
    assert np.array_equal(second["input_ids"].numpy(), stream[seq_len : 2 * seq_len])
    last = windows[len(windows) - 1]
    end = len(windows) * seq_len
    assert np.array_equal(last["labels"].numpy(), stream[end - seq_len + 1 : end + 1])
    with pytest.raises(IndexError):
        windows[len(windows)]
    windows.set_epoch(3)
    batch = next(iter(DataLoader(windows, batch_size=4)))
    assert batch["input_ids"].shape == batch["labels"].shape == (4, seq_len)
    val = TokenWindows(prepared.out_dir, "val", seq_len)
    assert len(val) == (prepared.val_tokens - 1) // seq_len > 0


def test_token_windows_exact_fit_and_errors(prepared: text.CorpusInfo):
    seq_len = prepared.val_tokens - 1  # exactly one window, whose last label is the stream's last token
    windows = TokenWindows(prepared.out_dir, "val", seq_len)
    assert len(windows) == 1 and windows[0]["labels"][-1] == prepared.eot_id
    with pytest.raises(ValueError, match="fewer than seq_len"):
        TokenWindows(prepared.out_dir, "val", prepared.val_tokens)
    with pytest.raises(ValueError, match="split"):
        TokenWindows(prepared.out_dir, "test", 8)
    with pytest.raises(FileNotFoundError, match="meta.json"):
        TokenWindows(prepared.out_dir / "missing", "train", 8)
