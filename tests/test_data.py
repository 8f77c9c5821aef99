"""Data: the stdlib corpus, every path kind, deterministic split and batches, one-line errors."""

from __future__ import annotations

import numpy as np
import pytest

from occult_jax import data


def test_stdlib_corpus_is_deterministic():
    a = data.load_corpus(max_bytes=300_000)
    b = data.load_corpus(max_bytes=300_000)
    assert a.vocab_size == 256 and a.source == "python-stdlib"
    assert len(a.train) + len(a.validation) == 300_000
    np.testing.assert_array_equal(a.train, b.train)
    np.testing.assert_array_equal(a.validation, b.validation)
    assert 0.05 < len(a.validation) / 300_000 < 0.15
    assert b"def " in bytes(a.train[:100_000])


def test_split_interleaves_blocks():
    tokens = np.arange(1000) % 256
    train, val = data.split(tokens.astype(np.uint8), 0.1, block=10)
    assert len(train) == 900 and len(val) == 100
    np.testing.assert_array_equal(val[:10], np.arange(90, 100))  # block 9 of every 10
    with pytest.raises(ValueError, match="val_fraction"):
        data.split(tokens, 1.5)
    # fractions that are not 1/n: the share of validation blocks follows them (block indices
    # counted independently: block i is validation when the running share passes a whole number)
    for fraction in (0.25, 0.4, 0.75, 0.9):
        train, val = data.split(np.arange(4000).astype(np.uint8), fraction, block=10)
        assert len(val) == round(4000 * fraction) and len(train) + len(val) == 4000
        want = [i for i in range(400) if int((i + 1) * fraction + 1e-9) > int(i * fraction + 1e-9)]
        expected = np.concatenate([np.arange(10 * i, 10 * i + 10) for i in want])
        np.testing.assert_array_equal(val, expected.astype(np.uint8))


def test_batches_are_a_function_of_seed_and_step():
    tokens = np.arange(10_000, dtype=np.int32)
    a = data.batch_at(tokens, seed=0, step=5, batch_size=4, seq_len=8)
    b = data.batch_at(tokens, seed=0, step=5, batch_size=4, seq_len=8)
    c = data.batch_at(tokens, seed=0, step=6, batch_size=4, seq_len=8)
    d = data.batch_at(tokens, seed=1, step=5, batch_size=4, seq_len=8)
    np.testing.assert_array_equal(a, b)
    assert a.shape == (4, 9) and a.dtype == np.int32
    assert not np.array_equal(a, c) and not np.array_equal(a, d)
    np.testing.assert_array_equal(a[:, 1:], a[:, :-1] + 1)  # contiguous windows
    rows = data.batch_at(tokens, seed=0, step=5, batch_size=4, seq_len=8, rows=slice(2, 4))
    np.testing.assert_array_equal(rows, a[2:])  # a host's rows of the global batch
    offsets = data.eval_offsets(10_000, num_batches=2, batch_size=4, seq_len=8)
    assert len(offsets) == 2 and offsets[1].max() == 10_000 - 9


def test_text_file(tmp_path):
    path = tmp_path / "a.txt"
    path.write_text("hello world\n" * 500)
    corpus = data.load_corpus(str(path))
    assert corpus.vocab_size == 256
    joined = np.concatenate([corpus.train, corpus.validation])
    assert sorted(joined.tolist()) == sorted(np.frombuffer(path.read_bytes(), np.uint8).tolist())


def test_folder(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "b.txt").write_text("second " * 300)
    (tmp_path / "sub" / "a.md").write_text("first " * 300)
    (tmp_path / "skip.png").write_bytes(b"\x89PNG")
    tokens, vocab, _ = data.load_tokens(str(tmp_path))
    text = bytes(tokens)
    assert vocab == 256 and b"PNG" not in text
    assert text.index(b"second") < text.index(b"first")  # b.txt sorts before sub/a.md


@pytest.mark.parametrize("suffix,dtype", [(".npy", np.int32), (".npy", np.uint16),
                                          (".npy", np.uint8), (".bin", np.uint16),
                                          (".bin", np.int32)])
def test_token_arrays(tmp_path, suffix, dtype):
    vocab = 250 if dtype == np.uint8 else 1000  # a uint8 array is tokens too, not bytes
    tokens = (np.arange(5000) * 7 % vocab).astype(dtype)
    path = tmp_path / f"tokens{suffix}"
    if suffix == ".npy":
        np.save(path, tokens)
    else:
        tokens.tofile(path)
    corpus = data.load_corpus(str(path), val_fraction=0.1,
                              bin_dtype=np.dtype(dtype).name)
    assert corpus.vocab_size == vocab
    np.testing.assert_array_equal(corpus.train, tokens[:4500])  # tail split, no copy
    np.testing.assert_array_equal(corpus.validation, tokens[4500:])
    assert isinstance(corpus.train, np.memmap) and isinstance(corpus.validation, np.memmap)
    data.check_fits(corpus, seq_len=64, vocab_size=vocab)
    with pytest.raises(ValueError, match=r"raise model\.vocab_size"):
        data.check_fits(corpus, seq_len=64, vocab_size=vocab // 4)


def _one_line_error(path, match, **kwargs):
    with pytest.raises(ValueError, match=match) as info:
        data.load_corpus(str(path), **kwargs)
    assert "\n" not in str(info.value)


def test_errors(tmp_path):
    _one_line_error(tmp_path / "missing.txt", "does not exist")
    (tmp_path / "empty.txt").write_text("")
    _one_line_error(tmp_path / "empty.txt", "is empty")
    (tmp_path / "empty_dir").mkdir()
    _one_line_error(tmp_path / "empty_dir", "no text files")
    np.save(tmp_path / "empty.npy", np.zeros((0,), np.int32))
    _one_line_error(tmp_path / "empty.npy", "is empty")
    (tmp_path / "empty.bin").write_bytes(b"")
    _one_line_error(tmp_path / "empty.bin", "is empty")
    (tmp_path / "odd.bin").write_bytes(b"abc")
    _one_line_error(tmp_path / "odd.bin", "not a multiple of 2")
    np.save(tmp_path / "matrix.npy", np.zeros((4, 4), np.int32))
    _one_line_error(tmp_path / "matrix.npy", "1-D integer")
    (tmp_path / "short.txt").write_text("tiny")
    corpus = data.load_corpus(str(tmp_path / "short.txt"))
    with pytest.raises(ValueError, match="fewer than seq_len"):
        data.check_fits(corpus, seq_len=128, vocab_size=256)


def test_windows_refuse_ids_outside_the_vocabulary():
    rng = np.random.default_rng()
    tokens = rng.integers(0, 100, 5_000).astype(np.uint16)
    offsets = np.array([10, 2_000, 4_000])
    np.testing.assert_array_equal(data.windows(tokens, offsets, 8, vocab_size=100),
                                  data.windows(tokens, offsets, 8))
    bad = int(rng.integers(2_000, 2_009))  # inside the second window
    tokens[bad] = 100
    with pytest.raises(ValueError, match=f"token id 100 at position {bad} .*model.vocab_size=100"):
        data.windows(tokens, offsets, 8, vocab_size=100)
    wide = tokens.astype(np.uint32)
    wide[bad] = 2**31 + 1  # wraps to a negative int32
    with pytest.raises(ValueError, match=f"token id at position {bad} .* negative or past int32"):
        data.windows(wide, offsets, 8, vocab_size=100)
    signed = tokens.astype(np.int32)
    signed[bad] = -3
    with pytest.raises(ValueError, match=f"position {bad} of the data is negative"):
        data.windows(signed, offsets, 8)
