"""Training data: documents from local text files, JSONL / JSON / Parquet records or a saved
``datasets`` folder (a text field, or chat messages rendered with the tokenizer's chat
template), tokenised and cut into training rows, either packed (several documents per row,
``position_ids`` restarting per document: each document is its own attention block and
routing segment) or one document per row with padding. Deterministic given the seed."""

from __future__ import annotations

import glob
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

TEXT_SUFFIXES = (".py", ".txt", ".md", ".rst")
RECORD_SUFFIXES = (".jsonl", ".json", ".parquet")
IGNORE = -100  # label of tokens that are not predicted (document starts, padding)


def list_text_files(specs: str | Sequence[str], suffixes: Iterable[str] = TEXT_SUFFIXES,
                    max_file_bytes: int | None = None) -> list[Path]:
    """Files named by ``specs``: a folder (searched recursively for ``suffixes``), a glob
    (``**`` allowed) or a file. Sorted, duplicates dropped; ``ValueError`` if none. A saved
    ``datasets`` folder is not searched (see :func:`documents`)."""
    if isinstance(specs, str):
        specs = [specs]
    suffixes = tuple(suffixes)
    found: set[Path] = set()
    for spec in specs:
        p = Path(spec).expanduser()
        if is_saved_dataset(p):
            continue
        if p.is_dir():
            found.update(f for f in p.rglob("*") if f.is_file() and f.suffix in suffixes)
        elif p.is_file():
            found.add(p)
        else:
            found.update(Path(f) for f in glob.glob(str(p), recursive=True) if Path(f).is_file())
    files = sorted(f for f in found if max_file_bytes is None or f.stat().st_size <= max_file_bytes)
    if not files and not any(is_saved_dataset(Path(s).expanduser()) for s in specs):
        raise ValueError(f"corpus: no text files found in {list(specs)}")
    return files


def is_saved_dataset(path: Path) -> bool:
    """A folder written by ``Dataset.save_to_disk`` / ``DatasetDict.save_to_disk``."""
    return path.is_dir() and any((path / f).is_file() for f in ("state.json", "dataset_dict.json"))


def read_text(path: Path) -> str:
    return path.read_text(encoding="utf-8", errors="replace")


def _load_records(specs: Sequence[str], files: Sequence[Path]) -> list[Any]:
    """One ``datasets.Dataset`` per saved folder in ``specs`` and per record file in ``files``."""
    out: list[Any] = []
    saved = [Path(s).expanduser() for s in specs if is_saved_dataset(Path(s).expanduser())]
    record_files = [f for f in files if f.suffix in RECORD_SUFFIXES]
    if not saved and not record_files:
        return out
    try:
        import datasets
    except ImportError as e:
        raise ValueError("corpus: record files need the `datasets` package (pip install datasets)") from e
    for folder in saved:
        ds = datasets.load_from_disk(str(folder))
        if isinstance(ds, datasets.DatasetDict):
            if "train" not in ds:
                raise ValueError(f"corpus: {folder}: a DatasetDict without a 'train' split ({list(ds)})")
            ds = ds["train"]
        out.append(ds)
    for f in record_files:
        kind = "parquet" if f.suffix == ".parquet" else "json"
        out.append(datasets.load_dataset(kind, data_files=str(f), split="train"))
    return out


def _record_text(tokenizer: Any, ds: Any, idx: Sequence[int], text_field: str,
                 messages_field: str) -> list[str]:
    cols = ds.column_names
    if text_field in cols:
        return [str(t) for t in ds.select(idx)[text_field]]
    if messages_field in cols:
        if not getattr(tokenizer, "chat_template", None):
            raise ValueError(f"corpus: records have '{messages_field}' but the tokenizer has no chat "
                             "template")
        return [tokenizer.apply_chat_template(m, tokenize=False) for m in ds.select(idx)[messages_field]]
    raise ValueError(f"corpus: records have neither a '{text_field}' nor a '{messages_field}' field "
                     f"(fields: {cols}); set --text-field or --messages-field")


def documents(tokenizer: Any, specs: str | Sequence[str], *, suffixes: Iterable[str] = TEXT_SUFFIXES,
              max_file_bytes: int | None = None, text_field: str = "text", messages_field: str = "messages",
              max_tokens: int | None = None, seed: int = 0, progress: bool = False,
              batch: int = 64) -> list[list[int]]:
    """Token ids of every document named by ``specs`` (text files, record files with suffixes
    in ``RECORD_SUFFIXES``, saved ``datasets`` folders; a record is one document), each
    followed by the EOS token, in an order shuffled by ``seed``, until ``max_tokens``."""
    if isinstance(specs, str):
        specs = [specs]
    suffixes = tuple(suffixes)
    files = list_text_files(specs, suffixes, max_file_bytes)
    texts = [f for f in files if f.suffix not in RECORD_SUFFIXES]
    records = _load_records(specs, files)
    # a document is (source, index): source -1 is texts[index], source i the i-th record set
    refs = [(-1, i) for i in range(len(texts))]
    refs += [(s, i) for s, ds in enumerate(records) for i in range(len(ds))]
    if not refs:
        raise ValueError(f"corpus: no documents in {list(specs)}")
    random.Random(seed).shuffle(refs)
    eos = tokenizer.eos_token_id
    out: list[list[int]] = []
    total = 0
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=max_tokens or None, desc="tokenize corpus", unit="tok", leave=False)
    for start in range(0, len(refs), batch):
        chunk = refs[start:start + batch]
        strings: list[str] = [""] * len(chunk)
        by_source: dict[int, list[int]] = {}
        for j, (src, _) in enumerate(chunk):
            by_source.setdefault(src, []).append(j)
        for src, js in by_source.items():
            if src < 0:
                got = [read_text(texts[chunk[j][1]]) for j in js]
            else:
                got = _record_text(tokenizer, records[src], [chunk[j][1] for j in js], text_field,
                                   messages_field)
            for j, t in zip(js, got, strict=True):
                strings[j] = t
        enc = tokenizer(strings, add_special_tokens=False)["input_ids"]
        n0 = total
        for ids in enc:
            doc = list(ids) + ([eos] if eos is not None else [])
            if doc:
                out.append(doc)
                total += len(doc)
        if bar is not None:
            bar.update(total - n0)
        if max_tokens is not None and total >= max_tokens:
            break
    if bar is not None:
        bar.close()
    return out


def pack(docs: Sequence[Sequence[int]], seq_len: int) -> dict[str, torch.Tensor]:
    """Concatenate ``docs`` and cut the stream into rows of ``seq_len`` (the remainder
    dropped). ``position_ids`` restart at every document start and every row start (a document
    cut by a row end continues as a new segment in the next row); a start's label is
    ``IGNORE``, so no token is predicted across a boundary. No padding."""
    lengths = torch.tensor([len(d) for d in docs], dtype=torch.int64)
    n = int(lengths.sum()) // seq_len * seq_len
    if n == 0:
        raise ValueError(f"corpus: {int(lengths.sum())} tokens is less than one sequence of {seq_len}")
    stream = torch.tensor([t for d in docs for t in d][:n], dtype=torch.int64)
    idx = torch.arange(n)
    start = torch.zeros(n, dtype=torch.bool)
    doc_starts = torch.cumsum(lengths, 0)[:-1]
    start[doc_starts[doc_starts < n]] = True
    start |= idx % seq_len == 0
    last_start = torch.cummax(torch.where(start, idx, 0), 0).values
    labels = torch.where(start, IGNORE, stream)
    return {"input_ids": stream.view(-1, seq_len), "position_ids": (idx - last_start).view(-1, seq_len),
            "labels": labels.view(-1, seq_len)}


def pad_rows(docs: Sequence[Sequence[int]], seq_len: int, pad_id: int) -> dict[str, torch.Tensor]:
    """One row per document (a longer one is cut into several rows), right-padded to
    ``seq_len``: ``attention_mask`` 0 and label ``IGNORE`` on padding."""
    pieces = [d[i:i + seq_len] for d in docs for i in range(0, len(d), seq_len)]
    if not pieces:
        raise ValueError("corpus: no tokens")
    lengths = torch.tensor([len(p) for p in pieces], dtype=torch.int64)
    mask = torch.arange(seq_len)[None, :] < lengths[:, None]
    ids = torch.full((len(pieces), seq_len), pad_id, dtype=torch.int64)
    ids[mask] = torch.tensor([t for p in pieces for t in p], dtype=torch.int64)
    labels = torch.where(mask, ids, IGNORE)
    labels[:, 0] = IGNORE
    return {"input_ids": ids, "attention_mask": mask.to(torch.int64), "labels": labels}


class TokenRows(torch.utils.data.Dataset):
    """Training rows (the tensors of :func:`pack` or :func:`pad_rows`) as a map-style dataset
    of dicts, the form ``transformers.Trainer`` and its default collator take."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        self.tensors = tensors

    def __len__(self) -> int:
        return int(next(iter(self.tensors.values())).shape[0])

    def __getitem__(self, i: int) -> dict[str, torch.Tensor]:
        return {k: v[i] for k, v in self.tensors.items()}
