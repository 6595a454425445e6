"""Data: the embedded default corpus (the Python standard library's own source), token files, per-agent sampling.

Everything is byte-level or pre-tokenised and memory-mapped. Batches are a pure function of
(seed, stream, step, micro-step), so a resumed run draws exactly the batches an uninterrupted run would have drawn.
"""

from __future__ import annotations

import hashlib
import json
import os
import sys
import sysconfig
from dataclasses import dataclass, field

import numpy as np
import torch

VAL_EVERY = 50  # the stdlib corpus holds out every 50th file (sorted order): a file-level, deterministic split
_SKIP_DIRS = {"site-packages", "dist-packages", "__pycache__"}


@dataclass
class Corpus:
    """Train/val token arrays (memory-mapped) plus named train segments for heterogeneous partitioning."""

    train: np.ndarray
    val: np.ndarray
    vocab_size: int
    source: str
    segments: list[tuple[str, int, int]] = field(default_factory=list)  # (domain, start, end) over train

    def domains(self) -> dict[str, int]:
        """Tokens per domain (train split)."""
        sizes: dict[str, int] = {}
        for name, start, end in self.segments:
            sizes[name] = sizes.get(name, 0) + end - start
        return sizes


def default_cache_dir() -> str:
    return os.path.join(os.path.expanduser(os.environ.get("XDG_CACHE_HOME", "~/.cache")), "pisa_zero")


def _atomic_save(path: str, array: np.ndarray) -> None:
    tmp = f"{path}.tmp{os.getpid()}.npy"
    np.save(tmp, array)
    os.replace(tmp, path)


def _atomic_json(path: str, obj) -> None:
    tmp = f"{path}.tmp{os.getpid()}"
    with open(tmp, "w") as f:
        json.dump(obj, f)
    os.replace(tmp, path)


def _text_files(root: str, suffixes: tuple[str, ...] | None) -> list[str]:
    """Relative paths of the files under ``root`` (sorted, deterministic), skipping caches and hidden entries."""
    out = []
    for dirpath, dirnames, filenames in os.walk(root):
        dirnames[:] = sorted(d for d in dirnames if d not in _SKIP_DIRS and not d.startswith("."))
        for name in filenames:
            if name.startswith(".") or (suffixes and not name.endswith(suffixes)):
                continue
            out.append(os.path.relpath(os.path.join(dirpath, name), root))
    return sorted(out)


def _domain(relpath: str) -> str:
    parts = relpath.split(os.sep)
    return parts[0] if len(parts) > 1 else "_toplevel"


def _fingerprint(root: str, files: list[str]) -> str:
    h = hashlib.sha256(f"{sys.version}|{os.path.abspath(root)}".encode())
    for rel in files:
        st = os.stat(os.path.join(root, rel))
        h.update(f"{rel}|{st.st_size}|{int(st.st_mtime)}\n".encode())
    return h.hexdigest()[:16]


def build_byte_corpus(root: str, cache_dir: str, name: str, suffixes: tuple[str, ...] | None = None) -> str:
    """Tokenise the files under ``root`` as bytes into ``cache_dir/<name>-<fingerprint>/`` once; returns that dir.

    Every ``VAL_EVERY``-th file (sorted) is validation; files that contain NUL bytes (binaries) are skipped.
    """
    files = _text_files(root, suffixes) if os.path.isdir(root) else [os.path.basename(root)]
    base = root if os.path.isdir(root) else os.path.dirname(os.path.abspath(root))
    if not files:
        raise ValueError(f"invalid --data={root!r}: no files found")
    out = os.path.join(cache_dir, f"{name}-{_fingerprint(base, files)}")
    if os.path.exists(os.path.join(out, "meta.json")):
        return out
    os.makedirs(out, exist_ok=True)
    train_parts, val_parts, segments, position = [], [], [], 0
    single = len(files) == 1
    for index, rel in enumerate(files):
        with open(os.path.join(base, rel), "rb") as f:
            data = f.read()
        if not data or b"\x00" in data:
            continue
        if not data.endswith(b"\n"):
            data += b"\n"
        array = np.frombuffer(data, dtype=np.uint8)
        if single:  # one text file: the last 2% is validation
            cut = len(array) - max(1, len(array) // VAL_EVERY)
            train_parts.append(array[:cut])
            val_parts.append(array[cut:])
            segments.append(["_all", 0, cut])
        elif index % VAL_EVERY == VAL_EVERY // 2:
            val_parts.append(array)
        else:
            domain = _domain(rel)
            if segments and segments[-1][0] == domain and segments[-1][2] == position:
                segments[-1][2] += len(array)
            else:
                segments.append([domain, position, position + len(array)])
            train_parts.append(array)
            position += len(array)
    if not train_parts or not val_parts:
        raise ValueError(f"invalid --data={root!r}: not enough text for a train/validation split")
    _atomic_save(os.path.join(out, "train.npy"), np.concatenate(train_parts))
    _atomic_save(os.path.join(out, "val.npy"), np.concatenate(val_parts))
    _atomic_json(os.path.join(out, "meta.json"), {"source": root, "vocab_size": 256, "segments": segments})
    return out


def stdlib_root() -> str:
    return sysconfig.get_paths()["stdlib"]


def _token_file(path: str, dtype: str) -> np.ndarray:
    if path.endswith(".npy"):
        return np.load(path, mmap_mode="r")
    return np.memmap(path, dtype=np.dtype(dtype), mode="r")


def load_corpus(
    data: str | None = None,
    cache_dir: str | None = None,
    *,
    token_dtype: str = "uint16",
    vocab_size: int | None = None,
    val_fraction: float = 0.02,
) -> Corpus:
    """The corpus named by ``data``: None → the Python stdlib source (bytes); a text file or folder (bytes);
    a ``.bin``/``.npy`` token file (split ``val_fraction`` off its end); a folder with ``train``/``val`` token files.
    """
    cache_dir = cache_dir or default_cache_dir()
    if data is None:
        root = stdlib_root()
        return _load_built(build_byte_corpus(root, cache_dir, "stdlib", suffixes=(".py",)), f"python-stdlib:{root}")
    if not os.path.exists(data):
        raise ValueError(f"invalid --data={data!r}: no such file or directory")
    if os.path.isdir(data):
        pair = [
            (os.path.join(data, f"train{ext}"), os.path.join(data, f"val{ext}"))
            for ext in (".npy", ".bin")
            if os.path.exists(os.path.join(data, f"train{ext}"))
        ]
        if pair:
            train, val = (_token_file(p, token_dtype) for p in pair[0])
            return _tokens_corpus(train, val, data, vocab_size)
        return _load_built(build_byte_corpus(data, cache_dir, "text"), data)
    if data.endswith((".bin", ".npy")):
        if not 0 < val_fraction < 1:
            raise ValueError(f"invalid --val-fraction={val_fraction}: expected 0 < value < 1")
        tokens = _token_file(data, token_dtype)
        cut = int(len(tokens) * (1 - val_fraction))
        return _tokens_corpus(tokens[:cut], tokens[cut:], data, vocab_size)
    return _load_built(build_byte_corpus(data, cache_dir, "text"), data)


def _tokens_corpus(train: np.ndarray, val: np.ndarray, source: str, vocab_size: int | None) -> Corpus:
    """A corpus of token ids; every id must be < the vocabulary (one pass over the ids: the embedding would raise
    an IndexError mid-training otherwise)."""
    for name, part in (("train", train), ("val", val)):
        if len(part) == 0:
            raise ValueError(f"invalid --data={source!r}: its {name} split is empty")
    low, high = int(min(train.min(), val.min())), int(max(train.max(), val.max()))
    if low < 0:
        raise ValueError(f"invalid --data={source!r}: it holds a negative token id ({low}); check --token-dtype")
    if vocab_size is None:
        vocab_size = high + 1
    elif high >= vocab_size:
        raise ValueError(
            f"invalid --vocab-size={vocab_size}: {source!r} holds token id {high}; the vocabulary must be > {high}"
        )
    return Corpus(train, val, vocab_size, source, [("_all", 0, len(train))])


def _load_built(path: str, source: str) -> Corpus:
    with open(os.path.join(path, "meta.json")) as f:
        meta = json.load(f)
    train = np.load(os.path.join(path, "train.npy"), mmap_mode="r")
    val = np.load(os.path.join(path, "val.npy"), mmap_mode="r")
    return Corpus(train, val, meta["vocab_size"], source, [tuple(s) for s in meta["segments"]])


def partition_domains(corpus: Corpus, parts: int) -> list[list[str]]:
    """Split the corpus's domains over ``parts`` agents, largest first to the lightest agent (deterministic)."""
    sizes = corpus.domains()
    if len(sizes) < parts:
        raise ValueError(f"invalid --heterogeneity with agents={parts}: the corpus has only {len(sizes)} domains")
    loads = [0] * parts
    out: list[list[str]] = [[] for _ in range(parts)]
    for name, size in sorted(sizes.items(), key=lambda kv: (-kv[1], kv[0])):
        i = loads.index(min(loads))
        out[i].append(name)
        loads[i] += size
    return [sorted(x) for x in out]


class Batches:
    """Random windows of ``block_size + 1`` tokens from ``tokens`` (restricted to ``segments`` if given).

    ``get(step, micro)`` depends only on (seed, stream, step, micro): every rank or agent uses its own ``stream``.
    """

    def __init__(self, tokens, block_size: int, batch_size: int, seed: int, stream: int, segments=None):
        self.tokens, self.block_size, self.batch_size = tokens, block_size, batch_size
        self.seed, self.stream = seed, stream
        spans = [(s, e) for _, s, e in (segments or [("_all", 0, len(tokens))]) if e - s > block_size + 1]
        if not spans:
            raise ValueError(f"invalid --block-size={block_size}: longer than every span of the training data")
        self.starts = np.array([s for s, _ in spans], dtype=np.int64)
        self.cumulative = np.cumsum([e - s - block_size - 1 for s, e in spans])

    def get(self, step: int, micro: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
        rng = np.random.default_rng([self.seed, self.stream, step, micro])
        draws = rng.integers(0, self.cumulative[-1], size=self.batch_size)
        span = np.searchsorted(self.cumulative, draws, side="right")
        before = np.concatenate([[0], self.cumulative[:-1]])[span]
        offsets = self.starts[span] + draws - before
        windows = np.stack([np.asarray(self.tokens[o : o + self.block_size + 1], dtype=np.int64) for o in offsets])
        t = torch.from_numpy(windows)
        return t[:, :-1], t[:, 1:]


def val_windows(val: np.ndarray, block_size: int, count: int) -> torch.Tensor:
    """A fixed held-out set: ``count`` evenly spaced windows of ``block_size + 1`` tokens (same for every run)."""
    if len(val) <= block_size + 1:
        raise ValueError(f"invalid --block-size={block_size}: the validation split has only {len(val)} tokens")
    offsets = np.linspace(0, len(val) - block_size - 1, count).astype(np.int64)
    return torch.from_numpy(np.stack([np.asarray(val[o : o + block_size + 1], dtype=np.int64) for o in offsets]))
