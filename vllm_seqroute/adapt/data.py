"""Local text corpora: file lists from folders or globs, token streams cut into training
sequences. Deterministic given the seed."""

from __future__ import annotations

import glob
import random
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Any

import torch

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")


def list_text_files(specs: str | Sequence[str], suffixes: Iterable[str] = TEXT_SUFFIXES,
                    max_file_bytes: int | None = None) -> list[Path]:
    """Files named by ``specs``: a folder (searched recursively for ``suffixes``), a glob
    (``**`` allowed) or a file. Sorted, duplicates dropped; ``ValueError`` if none."""
    if isinstance(specs, str):
        specs = [specs]
    suffixes = tuple(suffixes)
    found: set[Path] = set()
    for spec in specs:
        p = Path(spec).expanduser()
        if p.is_dir():
            found.update(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
        elif p.is_file():
            found.add(p)
        else:
            found.update(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
    files = sorted(f for f in found if max_file_bytes is None or f.stat().st_size <= max_file_bytes)
    if not files:
        raise ValueError(f"corpus: no text files found in {list(specs)}")
    return files


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def token_stream(tokenizer: Any, files: Sequence[Path], *, max_tokens: int | None = None,
                 seed: int = 0, progress: bool = False, batch: int = 32) -> list[int]:
    """Token ids of the files (shuffled by ``seed``), each followed by the EOS token, until
    ``max_tokens`` is reached (whole files, tokenised ``batch`` at a time)."""
    order = list(files)
    random.Random(seed).shuffle(order)
    eos = tokenizer.eos_token_id
    out: list[int] = []
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_tokens or None, desc="tokenize corpus", unit="tok", leave=False)
    for i in range(0, len(order), batch):
        enc = tokenizer([read_text(f) for f in order[i:i + batch]], add_special_tokens=False)["input_ids"]
        n0 = len(out)
        for ids in enc:
            out.extend(ids)
            if eos is not None:
                out.append(eos)
        if bar is not None:
            bar.update(len(out) - n0)
        if max_tokens is not None and len(out) >= max_tokens:
            break
    if bar is not None:
        bar.close()
    return out


def sequences(stream: Sequence[int], seq_len: int) -> torch.Tensor:
    """``[S, seq_len]`` consecutive chunks of the stream (the remainder dropped)."""
    n = len(stream) // seq_len
    if n == 0:
        raise ValueError(f"corpus: {len(stream)} tokens is less than one sequence of {seq_len}")
    return torch.tensor(stream[: n * seq_len], dtype=torch.long).view(n, seq_len)


def batches(seqs: torch.Tensor, rows: int, steps: int, seed: int = 0) -> Iterator[torch.Tensor]:
    """``steps`` batches of ``rows`` sequences, reshuffled every pass over the data."""
    gen = torch.Generator().manual_seed(seed)
    order = torch.randperm(seqs.shape[0], generator=gen)
    pos = 0
    for _ in range(steps):
        idx = []
        while len(idx) < rows:
            if pos == order.numel():
                order, pos = torch.randperm(seqs.shape[0], generator=gen), 0
            take = min(rows - len(idx), order.numel() - pos)
            idx.extend(order[pos:pos + take].tolist())
            pos += take
        yield seqs[idx]
