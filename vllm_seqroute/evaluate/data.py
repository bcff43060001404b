"""Held-out text windows: the same token windows for every engine and policy.

Documents are tokenised without special tokens and joined into one stream with the EOS token
after each; the stream is cut into consecutive non-overlapping windows of ``window`` tokens (the
remainder dropped); ``max_windows`` keeps that many, evenly spaced over the stream
(window ``floor(i * n / max_windows)``). Each window is scored as an independent sequence: the
loss averages ``-log p(token | earlier tokens of its window)`` over positions 2..window.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from vllm_seqroute.adapt.data import list_text_files, read_text


def load_texts(specs: str | Sequence[str],
               suffixes: Sequence[str] = (".py", ".txt", ".md", ".rst")) -> list[str]:
    """Documents named by folders / globs / files, in sorted path order."""
    return [read_text(f) for f in list_text_files(specs, suffixes)]


def token_windows(tokenizer: Any, texts: Sequence[str], window: int = 512,
                  max_windows: int | None = None) -> list[list[int]]:
    if window < 2:
        raise ValueError(f"window: need at least 2 tokens, got {window}")
    eos = tokenizer.eos_token_id
    stream: list[int] = []
    for t in texts:
        stream.extend(tokenizer(t, add_special_tokens=False)["input_ids"])
        if eos is not None:
            stream.append(eos)
    n = len(stream) // window
    if n == 0:
        raise ValueError(f"texts: {len(stream)} tokens is less than one window of {window}")
    picks = range(n) if max_windows is None or max_windows >= n else (
        (i * n) // max_windows for i in range(max_windows))
    return [stream[i * window:(i + 1) * window] for i in picks]


def windows_for(model_dir: str | Path, texts: Sequence[str], window: int = 512,
                max_windows: int | None = None) -> list[list[int]]:
    from transformers import AutoTokenizer

    return token_windows(AutoTokenizer.from_pretrained(str(model_dir)), texts, window, max_windows)
