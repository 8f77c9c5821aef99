"""Token streams for training: real text, no downloads, deterministic batches.

`load_corpus` reads one of:
  * nothing (`path=""`): a byte-level corpus (vocab 256) of the Python standard library's own
    source files, sorted by path and capped at `max_bytes`; the same bytes on every machine
    that has the same Python;
  * a text file, or a folder of text files (read recursively, sorted), as bytes (vocab 256);
  * a pre-tokenised `.npy` array, or a raw `.bin` array of `bin_dtype` (uint16 or int32).
It splits the stream deterministically into train and validation: a byte corpus (in memory,
capped) is cut into blocks and `val_fraction` of them, spread evenly, go to validation; a
token-array file (memory-mapped, possibly huge, of any integer dtype) keeps its last
`val_fraction` for validation, so its split is not copied.

`batch_at(tokens, seed, step, ...)` draws batch `step` from (seed, step) alone, so a resumed run
sees exactly the data order of a run that never stopped.
"""

from __future__ import annotations

import dataclasses
import os
import sysconfig
from fractions import Fraction

import numpy as np

BIN_DTYPES = ("uint16", "int32")
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst", ".json", ".csv", ".html", ".c", ".h", ".tex")


@dataclasses.dataclass(frozen=True)
class Corpus:
    train: np.ndarray  # [N_train] integer tokens
    validation: np.ndarray  # [N_val]
    vocab_size: int  # smallest vocabulary that holds every token (256 for bytes)
    source: str  # where it came from, for logs


def stdlib_files() -> list[str]:
    """The standard library's .py files (no site-packages, no tests' data), sorted."""
    root = sysconfig.get_paths()["stdlib"]
    files = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in ("site-packages", "__pycache__"))
        files.extend(os.path.join(dirpath, f) for f in filenames if f.endswith(".py"))
    return sorted(files)


def _read_files(files: list[str], max_bytes: int) -> bytes:
    chunks, total = [], 0
    for name in files:
        with open(name, "rb") as f:
            chunk = f.read(max(0, max_bytes - total))
        chunks.append(chunk + b"\n")
        total += len(chunk) + 1
        if total >= max_bytes:
            break
    return b"".join(chunks)[:max_bytes]


def _text_files(folder: str) -> list[str]:
    files = []
    for dirpath, dirnames, filenames in os.walk(folder):
        dirnames[:] = sorted(d for d in dirnames if not d.startswith("."))
        files.extend(os.path.join(dirpath, f) for f in filenames
                     if f.endswith(TEXT_SUFFIXES) or "." not in f)
    return sorted(files)


def _vocab(tokens: np.ndarray, scan: int = 100_000_000) -> int:
    """1 + the largest id among the first `scan` tokens (a full pass over huge files is slow)."""
    return int(tokens[:scan].max()) + 1 if tokens.size else 0


def load_tokens(path: str = "", max_bytes: int = 4_000_000,
                bin_dtype: str = "uint16") -> tuple[np.ndarray, int, str]:
    """(tokens, vocab_size, source) for `path` (see the module docstring)."""
    if not path:
        raw = _read_files(stdlib_files(), max_bytes)
        return np.frombuffer(raw, np.uint8), 256, "python-stdlib"
    if not os.path.exists(path):
        raise ValueError(f"data.path={path!r} does not exist; give a text file, a folder of "
                         "text files, or a .npy/.bin token array (or '' for the stdlib corpus).")
    if os.path.isdir(path):
        files = _text_files(path)
        if not files:
            raise ValueError(f"data.path={path!r} is a folder with no text files "
                             f"({', '.join(TEXT_SUFFIXES)}); put text files in it.")
        tokens = np.frombuffer(_read_files(files, max_bytes), np.uint8)
        vocab = 256
    elif path.endswith(".npy"):
        tokens = np.load(path, mmap_mode="r")  # memory-mapped whatever its dtype
        if tokens.ndim != 1 or tokens.dtype.kind not in "iu":
            raise ValueError(f"data.path={path!r} holds a {tokens.dtype} array of shape "
                             f"{tokens.shape}; expected a 1-D integer token array.")
        vocab = _vocab(tokens)
    elif path.endswith(".bin"):
        if bin_dtype not in BIN_DTYPES:
            raise ValueError(f"data.bin_dtype={bin_dtype!r} is unknown; use one of {BIN_DTYPES}.")
        itemsize = np.dtype(bin_dtype).itemsize
        if os.path.getsize(path) % itemsize:
            raise ValueError(f"data.path={path!r} has {os.path.getsize(path)} bytes, not a "
                             f"multiple of {itemsize}; is data.bin_dtype={bin_dtype!r} right?")
        tokens = (np.memmap(path, dtype=bin_dtype, mode="r") if os.path.getsize(path)
                  else np.zeros((0,), bin_dtype))
        vocab = _vocab(tokens)
    else:
        with open(path, "rb") as f:
            tokens = np.frombuffer(f.read(max_bytes), np.uint8)
        vocab = 256
    if tokens.size == 0:
        raise ValueError(f"data.path={path!r} is empty; give it some text or tokens.")
    if tokens.dtype.kind == "i" and int(tokens[:100_000_000].min()) < 0:
        raise ValueError(f"data.path={path!r} holds negative token ids.")
    return tokens, vocab, path


def split(tokens: np.ndarray, val_fraction: float, block: int = 8192) -> tuple[np.ndarray,
                                                                                np.ndarray]:
    """Blocks of `block` tokens to validation, spread evenly, val_fraction of them (as p/q
    with q ≤ 1000: block i goes to validation when ⌊(i+1)p/q⌋ > ⌊ip/q⌋, so 0.1 takes every
    10th block), the rest to train. Blocks shrink for small streams so that validation gets at
    least two blocks.
    """
    if not 0 < val_fraction < 1:
        raise ValueError(f"data.val_fraction={val_fraction} must be in (0, 1).")
    fraction = Fraction(val_fraction).limit_denominator(1000)
    p, q = fraction.numerator, fraction.denominator
    if p in (0, q):
        raise ValueError(f"data.val_fraction={val_fraction} leaves no train or no validation "
                         "blocks; use a value in [0.001, 0.999].")
    block = max(1, min(block, len(tokens) * p // (2 * q)))
    index = np.arange(len(tokens)) // block
    is_val = (index + 1) * p // q > index * p // q
    return np.asarray(tokens[~is_val]), np.asarray(tokens[is_val])


def is_token_array(path: str) -> bool:
    """Whether `path` names a pre-tokenised array file (.npy / .bin) rather than text."""
    return bool(path) and not os.path.isdir(path) and path.endswith((".npy", ".bin"))


def load_corpus(path: str = "", max_bytes: int = 4_000_000, val_fraction: float = 0.1,
                bin_dtype: str = "uint16") -> Corpus:
    tokens, vocab, source = load_tokens(path, max_bytes, bin_dtype)
    if not is_token_array(path):  # bytes in memory: blocks spread over the stream
        train, val = split(tokens, val_fraction)
    else:
        if not 0 < val_fraction < 1:
            raise ValueError(f"data.val_fraction={val_fraction} must be in (0, 1).")
        cut = len(tokens) - max(1, int(len(tokens) * val_fraction))
        train, val = tokens[:cut], tokens[cut:]
    return Corpus(train, val, vocab, source)


def check_fits(corpus: Corpus, seq_len: int, vocab_size: int) -> None:
    """One-line errors when the corpus cannot feed the model."""
    for name, part in (("train", corpus.train), ("validation", corpus.validation)):
        if len(part) < seq_len + 1:
            raise ValueError(f"the {name} split of {corpus.source!r} has {len(part)} tokens, "
                             f"fewer than seq_len + 1 = {seq_len + 1}; use more data or a "
                             "shorter seq_len.")
    if corpus.vocab_size > vocab_size:
        raise ValueError(f"{corpus.source!r} has token ids up to {corpus.vocab_size - 1}, but "
                         f"model.vocab_size={vocab_size}; raise model.vocab_size.")


def batch_offsets(num_tokens: int, seed: int, step: int, batch_size: int,
                  seq_len: int) -> np.ndarray:
    """Start offsets of batch `step`: uniform over the stream, a function of (seed, step) only."""
    rng = np.random.default_rng([seed, step])
    return rng.integers(0, num_tokens - seq_len, size=batch_size)


def windows(tokens: np.ndarray, offsets: np.ndarray, seq_len: int,
            vocab_size: int | None = None) -> np.ndarray:
    """[len(offsets), seq_len + 1] int32 windows (inputs are [:, :-1], targets [:, 1:]).

    vocab_size: ids at or above it raise (loading scans only a huge file's first tokens)."""
    out = np.stack([np.asarray(tokens[o:o + seq_len + 1]) for o in offsets]).astype(np.int32)
    if vocab_size is not None and out.size and int(out.max()) >= vocab_size:
        row, col = np.unravel_index(int(np.argmax(out)), out.shape)
        raise ValueError(f"token id {int(out.max())} at position {int(offsets[row]) + col} of "
                         f"the data is outside model.vocab_size={vocab_size}; fix the data or "
                         "raise model.vocab_size.")
    if out.size and int(out.min()) < 0:  # negative, or past int32 in a wider source dtype
        row, col = np.unravel_index(int(np.argmin(out)), out.shape)
        raise ValueError(f"token id at position {int(offsets[row]) + col} of the data is "
                         "negative or past int32; token ids must lie in [0, vocab_size).")
    return out


def batch_at(tokens: np.ndarray, seed: int, step: int, batch_size: int, seq_len: int,
             rows: slice | None = None) -> np.ndarray:
    """Training batch `step` as [batch_size, seq_len + 1] int32; `rows` picks this host's part."""
    offsets = batch_offsets(len(tokens), seed, step, batch_size, seq_len)
    return windows(tokens, offsets[rows] if rows is not None else offsets, seq_len)


def eval_offsets(num_tokens: int, num_batches: int, batch_size: int,
                 seq_len: int) -> list[np.ndarray]:
    """Start offsets of the fixed validation batches: windows evenly spaced over the stream."""
    offsets = np.linspace(0, num_tokens - seq_len - 1, num_batches * batch_size).astype(np.int64)
    return [offsets[b * batch_size:(b + 1) * batch_size] for b in range(num_batches)]
