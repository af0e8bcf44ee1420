"""Token-weighted perplexity over text or JSONL files, in windows, data-parallel under ``mlx.launch``.

Each document is encoded with BOS and cut into windows of at most ``seq_len`` tokens: a window scores the
``stride`` tokens after the previous window's (at most ``seq_len - 1``) and holds as many tokens before them as
fit, as context; so every token after BOS is scored exactly once, with at least ``seq_len - stride`` tokens of
context once the document is long enough. Windows are batched in document order; batches are shared among
ranks and the per-window sums are gathered and added up in window order, so the figure does not depend on the
number of processes.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from ..bench import check_output
from ..hub import resolve_model
from ..load import check_folder
from .distributed import agree_on_job, digest, exchange, group, my_batches
from .inputs import documents

Window = tuple[int, int, int, int]  # (document, start, end, first scored position)


@dataclass(frozen=True)
class PerplexityResult:
    """The figures of one run; ``nll`` is the mean negative log-likelihood per scored token (nats)."""

    tokens: int
    nll: float
    ppl: float
    documents: int
    windows: int
    seq_len: int
    stride: int
    batch_size: int
    ranks: int
    seconds: float
    tokens_per_second: float
    peak_memory_bytes: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def summary(self) -> str:
        """The figures in one line, for a terminal."""
        return (f"perplexity {self.ppl:.4f} (nll {self.nll:.5f}) over {self.tokens} tokens in {self.windows} windows "
                f"of {self.seq_len} (stride {self.stride}); {self.ranks} process(es), {self.tokens_per_second:.1f} "
                f"tok/s, peak memory {self.peak_memory_bytes / 1e9:.3f} GB")


def windows(n: int, seq_len: int, stride: int) -> list[tuple[int, int, int]]:
    """``(start, end, first scored)`` windows over ``n`` tokens. Position 0 (BOS) is never scored, every other
    position exactly once: each window scores the next ``stride`` tokens (at most ``seq_len - 1``, so that even
    its first scored token has context) after as many earlier tokens as fit in ``seq_len``."""
    out, step, first = [], min(stride, seq_len - 1), 1
    while first < n:
        end = min(first + step, n)
        out.append((max(0, end - seq_len), end, first))
        first = end
    return out


def check_settings(seq_len: int, stride: int | None, batch_size: int, max_context: int) -> int:
    """Validate the window settings; returns the stride (``seq_len`` when not given)."""
    if not 2 <= seq_len <= max_context:
        raise ValueError(f"--seq-len must be between 2 and the model's context of {max_context}, got {seq_len}")
    stride = seq_len if stride is None else stride
    if not 1 <= stride <= seq_len:
        raise ValueError(f"--stride must be between 1 and --seq-len ({seq_len}), got {stride}")
    if batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
    return stride


def check_job(model: str | Path, data: str | Path, *, seq_len: int = 512, stride: int | None = None,
              batch_size: int = 4, json_path: str | Path | None = None) -> Path:
    """Everything a perplexity run can reject, before the model's weights load: the JSON path, the data, the window
    settings against the model's config. Returns the model's folder."""
    if json_path is not None:
        check_output(json_path)
    documents(data)
    folder = resolve_model(model)
    check_settings(seq_len, stride, batch_size, check_folder(folder).max_context_length)
    return folder


def window_nll(model: Any, ids: list[list[int]], batch: list[Window]) -> list[tuple[float, int]]:
    """``(sum of nll, tokens scored)`` per window of ``batch``, in one padded forward pass (float64 sums)."""
    length = max(end - start for _, start, end, _ in batch) - 1
    x = np.zeros((len(batch), length), np.int32)
    y = np.zeros_like(x)
    mask = np.zeros(x.shape, np.float32)
    for row, (doc, start, end, first) in enumerate(batch):
        tokens = ids[doc][start:end]
        x[row, : len(tokens) - 1], y[row, : len(tokens) - 1] = tokens[:-1], tokens[1:]
        mask[row, first - start - 1 : end - start - 1] = 1.0  # predicting position p uses the logits at p - 1
    logits = model(mx.array(x)).astype(mx.float32)
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    nll = -mx.take_along_axis(logprobs, mx.array(y)[..., None], axis=-1)[..., 0]
    sums = np.array((nll * mx.array(mask)).astype(mx.float32)).astype(np.float64).sum(axis=1)
    return [(float(s), int(m.sum())) for s, m in zip(sums, mask)]


def perplexity(model: Any, tokenizer: Any, data: str | Path, *, seq_len: int = 512, stride: int | None = None,
               batch_size: int = 4, progress: Callable[[int, int], None] | None = None) -> PerplexityResult:
    """Perplexity of ``model`` over the documents of ``data`` (a file or folder; JSONL lines' ``text``).

    Under ``mlx.launch`` the processes first check that they have the same documents and settings, then compute a
    batch each per round and exchange the round's sums: a process that fails makes all of them stop at that round
    (``distributed.exchange``), and none waits longer than one batch for a slower host."""
    g = group()
    job: dict[str, Any] = {}

    def prepare() -> str:
        job["stride"] = check_settings(seq_len, stride, batch_size, model.args.max_context_length)
        job["docs"] = docs = documents(data)
        job["ids"] = [tokenizer.encode(text) for _, text in docs]
        if not any(len(ids) > 1 for ids in job["ids"]):
            raise ValueError(f"--data {data}: no document has a token to score after BOS")
        return digest(json.dumps([seq_len, job["stride"], batch_size]), repr(model.args), str(tokenizer.vocab_size),
                      *(text for _, text in docs))

    agree_on_job(prepare, g)
    docs, ids, stride = job["docs"], job["ids"], job["stride"]
    wins = [(d, *w) for d, doc in enumerate(ids) for w in windows(len(doc), seq_len, stride)]
    batches = [wins[i : i + batch_size] for i in range(0, len(wins), batch_size)]
    mine = my_batches(len(batches), g)
    rounds = -(-len(batches) // g.size())
    mx.reset_peak_memory()
    tic = time.perf_counter()
    per_window: list[tuple[float, int]] = []
    for r in range(rounds):
        # Round r computes batches r * N ... r * N + N - 1, one per rank: the shares come back in batch order.
        b = mine[r] if r < len(mine) else None
        shares = exchange(lambda b=b: window_nll(model, ids, batches[b]) if b is not None else [], g,
                          f"round {r + 1} of {rounds}")
        per_window += [tuple(w) for share in shares for w in share]
        if progress:
            progress(r + 1, rounds)
    seconds = time.perf_counter() - tic
    total = math.fsum(s for s, _ in per_window)
    tokens = sum(n for _, n in per_window)
    peak = max(exchange(mx.get_peak_memory, g, "the end of the job"))
    return PerplexityResult(tokens=tokens, nll=total / tokens, ppl=math.exp(total / tokens), documents=len(docs),
                            windows=len(wins), seq_len=seq_len, stride=stride, batch_size=batch_size,
                            ranks=g.size(), seconds=seconds, tokens_per_second=tokens / seconds,
                            peak_memory_bytes=peak)
