"""Accuracy on the paper's terms: lm-evaluation-harness (``lm-eval``) on this project's models.

:class:`OpenELMLM` is an lm-eval model class: ``loglikelihood`` and ``loglikelihood_rolling`` score token sequences
through the decode step in batches, each shared context (a question's choices) computed once (:func:`score`);
``generate_until`` decodes through the batching engine. Prompts are encoded with BOS, as Apple's evaluation did
(``add_bos_token=True``). :func:`evaluate` runs tasks through ``lm_eval.simple_evaluate``; :func:`results_table`
sets each measured figure beside the one Apple published for its eight models. Needs the ``eval`` extra
(``pip install "mlx-openelm[eval]"``: lm-eval's core, no torch).
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import mlx.core as mx
import numpy as np

from . import backend
from .batch import BatchEngine
from .batch import Sequence as Seq
from .cache import KVCache, cache_dtype
from .decode import DecodeStep
from .sample import make_sampler

INSTALL = 'pip install "mlx-openelm[eval]"'
PAPER_TASKS = ("arc_challenge", "arc_easy", "boolq", "hellaswag", "piqa", "sciq", "winogrande")
# Zero-shot accuracies (%) from the model cards of apple/OpenELM-* on Hugging Face (lm-evaluation-harness at commit
# dc90fec, add_bos_token=True, the Llama-2 tokenizer), in the order of PAPER_TASKS. The cards do not say which of
# acc and acc_norm each column is, so both are measured and shown beside it.
PUBLISHED = {
    "OpenELM-270M": (26.45, 45.08, 53.98, 46.71, 69.75, 84.70, 53.91),
    "OpenELM-270M-Instruct": (30.55, 46.68, 48.56, 52.07, 70.78, 84.40, 52.72),
    "OpenELM-450M": (27.56, 48.06, 55.78, 53.97, 72.31, 87.20, 58.01),
    "OpenELM-450M-Instruct": (30.38, 50.00, 60.37, 59.34, 72.63, 88.00, 58.96),
    "OpenELM-1_1B": (32.34, 55.43, 63.58, 64.81, 75.57, 90.60, 61.72),
    "OpenELM-1_1B-Instruct": (37.97, 52.23, 70.00, 71.20, 75.03, 89.30, 62.75),
    "OpenELM-3B": (35.58, 59.89, 67.40, 72.44, 78.24, 92.70, 65.51),
    "OpenELM-3B-Instruct": (39.42, 61.74, 68.17, 76.36, 79.00, 92.50, 66.85),
}
Progress = Callable[[str, int, int], None]


def score(model: Any, rows: Sequence[tuple[list[int], int]], batch_size: int,
          progress: Callable[[int], None] | None = None) -> list[tuple[float, bool]]:
    """For each ``(tokens, first)``: the summed log-probability of ``tokens[first:]``, each given the tokens before
    it, and whether every one of them is the model's most likely token there; in input order.

    Rows that share their context (``tokens[:first]``: the choices of one question) put it into the KV cache once:
    the contexts of a pass are prefilled together as rows of one cache (right-padded, all but their last token),
    each row is then repeated for its continuations, and one pass over ``[last context token, continuation...]``
    gives every logit needed. A pass holds at most ``batch_size`` continuations (more for one larger group)."""
    step = DecodeStep(model, compile=False)  # the shapes vary from pass to pass: nothing to gain from traces
    groups: dict[tuple[int, ...], list[int]] = {}
    for i, (tokens, first) in enumerate(rows):
        groups.setdefault(tuple(tokens[:first]), []).append(i)
    out: list[tuple[float, bool] | None] = [None] * len(rows)
    chunk: list[tuple[int, ...]] = []
    for key in sorted(groups, key=len, reverse=True) + [None]:
        if chunk and (key is None or sum(len(groups[k]) for k in chunk) + len(groups[key]) > batch_size):
            members = [(g, i) for g, k in enumerate(chunk) for i in groups[k]]
            for i, result in zip([i for _, i in members], _score_pass(step, model, chunk, members, rows)):
                out[i] = result
            if progress:
                progress(len(members))
            chunk = []
        if key is not None:
            chunk.append(key)
    return out


def _score_pass(step: DecodeStep, model: Any, contexts: list[tuple[int, ...]], members: list[tuple[int, int]],
                rows: Sequence[tuple[list[int], int]]) -> list[tuple[float, bool]]:
    cache = KVCache(model.args.num_kv_heads, model.args.head_dim, cache_dtype(model), rows=len(contexts))
    width = max(len(c) for c in contexts) - 1
    if width:
        step.prefill(cache, mx.array([list(c[:-1]) + [0] * (width + 1 - len(c)) for c in contexts], dtype=mx.uint32),
                     [len(c) - 1 for c in contexts])
    cache.take([g for g, _ in members])
    targets = [rows[i][0][rows[i][1] :] for _, i in members]
    inputs = [[contexts[g][-1], *t[:-1]] for (g, _), t in zip(members, targets)]
    length = max(map(len, inputs))
    logits = step.verify(cache, mx.array([x + [0] * (length - len(x)) for x in inputs], dtype=mx.uint32))
    logits = logits.astype(mx.float32)
    y = mx.array([t + [0] * (length - len(t)) for t in targets])
    logprobs = logits - mx.logsumexp(logits, axis=-1, keepdims=True)
    picked = np.array(mx.take_along_axis(logprobs, y[..., None], axis=-1)[..., 0]).astype(np.float64)
    greedy = np.array(mx.argmax(logits, axis=-1) == y)
    return [(math.fsum(picked[r, : len(t)]), bool(greedy[r, : len(t)].all())) for r, t in enumerate(targets)]


def _lm_class() -> type:
    try:
        from lm_eval.api.model import LM
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window
    except ImportError as e:
        raise ValueError(f"evaluation needs the eval extra ({e.name} is missing): {INSTALL}") from None

    class OpenELMLM(LM):
        """This project's model as an lm-eval model (``batch_size`` sequences per forward pass)."""

        def __init__(self, model: Any, tokenizer: Any, batch_size: int = 8, progress: Progress | None = None):
            super().__init__()
            if batch_size < 1:
                raise ValueError(f"--batch-size must be >= 1, got {batch_size}")
            self.model, self.tokenizer, self.batch_size, self._progress = model, tokenizer, batch_size, progress
            self.max_length = model.args.max_context_length

        def _count(self, what: str, total: int) -> Callable[[int], None]:
            done = 0

            def step(n: int) -> None:
                nonlocal done
                done += n
                if self._progress:
                    self._progress(what, done, total)

            step(0)
            return step

        def _pair(self, context: str, continuation: str) -> tuple[list[int], int]:
            # As lm-eval's own models: a context's trailing spaces belong to the continuation, and the continuation's
            # tokens are those the whole text has after the context's.
            spaces = len(context) - len(context.rstrip())
            if spaces:
                context, continuation = context[:-spaces], context[-spaces:] + continuation
            if not context:
                head, tail = [self.tokenizer.bos_id], self.tokenizer.encode(continuation, bos=False)
            else:
                whole, head = self.tokenizer.encode(context + continuation), self.tokenizer.encode(context)
                tail = whole[len(head) :]
            tokens = (head + tail)[-(self.max_length + 1) :]
            return tokens, max(1, len(tokens) - len(tail))  # a longer continuation loses its head, never its context

        def loglikelihood(self, requests: list, disable_tqdm: bool = False) -> list[tuple[float, bool]]:
            rows = [self._pair(*r.args) for r in requests]
            return score(self.model, rows, self.batch_size, self._count("scoring choices", len(rows)))

        def loglikelihood_rolling(self, requests: list, disable_tqdm: bool = False) -> list[float]:
            rows, owner = [], []
            for i, r in enumerate(requests):
                ids = self.tokenizer.encode(r.args[0], bos=False)
                for ctx, pred in map(make_disjoint_window, get_rolling_token_windows(
                        ids, self.tokenizer.bos_id, self.max_length, 1)):
                    rows.append((ctx + pred, len(ctx)))
                    owner.append(i)
            totals = [0.0] * len(requests)
            for i, (logprob, _) in zip(owner, score(self.model, rows, self.batch_size,
                                                     self._count("scoring texts", len(rows)))):
                totals[i] += logprob
            return totals

        def generate_until(self, requests: list, disable_tqdm: bool = False) -> list[str]:
            engine, waiting = BatchEngine(self.model), list(enumerate(requests))
            texts: dict[Seq, list[str]] = {}
            index: dict[Seq, int] = {}
            out = [""] * len(requests)
            step = self._count("generating", len(requests))
            try:
                while waiting or engine.active:
                    while waiting and engine.active < self.batch_size:
                        i, r = waiting.pop(0)
                        seq = self._sequence(*r.args)
                        texts[seq], index[seq] = [], i
                        engine.add(seq)
                    while engine.prefilling:
                        engine.prefill(backend.prefill_chunk())
                    for seq, text in engine.decode():
                        texts[seq].append(text)
                        if seq.finish_reason:
                            out[index.pop(seq)] = "".join(texts.pop(seq))
                            step(1)
            finally:
                engine.close()
            return out

        def _sequence(self, context: str, kwargs: dict) -> Seq:
            until = kwargs.get("until") or [self.tokenizer.decode([self.tokenizer.eos_id])]
            until = [until] if isinstance(until, str) else [u for u in until if u]
            budget = min(max(1, int(kwargs.get("max_gen_toks", 256))), self.max_length - 1)
            temperature = float(kwargs.get("temperature", 0.0)) if kwargs.get("do_sample", False) else 0.0
            ids = self.tokenizer.encode(context)[-(self.max_length - budget) :]
            return Seq(self.tokenizer, ids, budget, until, make_sampler(temperature))

        @property
        def tokenizer_name(self) -> str:
            return "llama-2"

    return OpenELMLM


def model_class() -> type:
    """The lm-eval model class (raises ``ValueError`` naming the extra when lm-eval is missing)."""
    return _lm_class()


def check_job(tasks: str | Sequence[str] | None, include_path: str | Path | None = None,
              output: str | Path | None = None) -> tuple[list[str], Any]:
    """Everything an evaluation can reject before the model loads: lm-eval missing, the output path, the task folder,
    unknown task names. Returns the task names (default: the paper's seven) and lm-eval's task manager."""
    model_class()
    from lm_eval.tasks import TaskManager

    from .bench import check_output

    if output is not None:
        check_output(output)
    if include_path is not None and not Path(include_path).is_dir():
        raise FileNotFoundError(f"--include-path {include_path}: no such folder")
    names = list(PAPER_TASKS) if tasks is None else [t.strip() for t in (tasks.split(",") if isinstance(tasks, str)
                                                                         else tasks) if t.strip()]
    if not names:
        raise ValueError("--tasks names no task: give lm-eval task names separated by commas")
    manager = TaskManager(include_path=str(include_path) if include_path is not None else None)
    unknown = [t for t in names if not manager.match_tasks([t])]
    if unknown:
        raise ValueError(f"unknown task(s): {', '.join(unknown)}; lm-eval knows {len(manager.all_tasks)} (see "
                         "`lm_eval ls tasks`), and --include-path adds a folder of your own task YAMLs")
    return names, manager


def evaluate(model: Any, tokenizer: Any, tasks: Sequence[str], manager: Any, *, limit: float | None = None,
             num_fewshot: int | None = None, batch_size: int = 8, progress: Progress | None = None) -> dict[str, Any]:
    """lm-eval's results of ``tasks`` (checked by :func:`check_job`, which gives the task ``manager``)."""
    import lm_eval

    lm = model_class()(model, tokenizer, batch_size=batch_size, progress=progress)
    results = lm_eval.simple_evaluate(model=lm, tasks=list(tasks), num_fewshot=num_fewshot, limit=limit,
                                      task_manager=manager, log_samples=False, bootstrap_iters=0)
    return {"results": results["results"], "n-samples": results.get("n-samples", {}),
            "configs": {k: {"num_fewshot": v.get("num_fewshot")} for k, v in results.get("configs", {}).items()}}


def published_for(name: str) -> dict[str, float]:
    """Apple's published accuracy per task for the model ``name`` (a repo id or folder named after one of the eight
    models), or an empty dict."""
    base = re.sub(r"[-_](bf16|bfloat16|float16|fp16|float32|\d+bit|q\d+|mlx)$", "", Path(str(name)).name, flags=re.I)
    key = next((k for k in PUBLISHED if k.lower() == base.lower()), None)
    return dict(zip(PAPER_TASKS, PUBLISHED[key])) if key else {}


def results_table(results: dict[str, Any], model_name: str) -> tuple[list[str], list[list[str]]]:
    """``(headers, rows)``: per task, acc and acc_norm in %, and Apple's published figure for the model where it is
    one of the eight."""
    published = published_for(model_name)
    rows = []
    for task, metrics in sorted(results["results"].items()):
        acc, norm = (metrics.get(f"{m},none") for m in ("acc", "acc_norm"))
        paper = published.get(task)
        rows.append([task, *("" if v is None else f"{100 * v:.2f}" for v in (acc, norm)),
                     "" if paper is None else f"{paper:.2f}"])
    return ["task", "acc %", "acc_norm %", "published % (Apple's model card)"], rows
