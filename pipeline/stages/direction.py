"""The refusal direction on the run's screened pairs (pipeline.analysis.directions) -> direction.arrow:
every candidate (layer x post-instruction position) with its scores, the ablation and addition directions
(the addition's scale), and in the file's metadata a summary with each role's cost (KL on the scoring
half's harmless prompts, the cross-entropy change on a sample of the shipped general text).

The means come from the cache stage's activation shards (the residuals it already computed for every
pair), so the stage runs only the scoring passes."""
from __future__ import annotations

import json
import sys
import threading
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch
from tqdm import tqdm

from pipeline.analysis.directions import (
    ROLES,
    SUMMARY_KEY,
    example_replies,
    general_text_windows,
    intervention_cost,
    intervention_of,
    post_instruction_count,
    select_directions,
    split_pairs,
)
from pipeline.outputs.files import RunFolder
from pipeline.schema import DirectionConfig
from pipeline.stages.cache import residuals
from pipeline.store import code_identity, content_key, publish_json, read_table, write_table


@dataclass(frozen=True)
class DirectionItem:
    """The refusal direction over the run's screened pairs -> direction.arrow."""

    pairs: str  # pairs.parquet
    activations: tuple[str, ...]  # the cache stage's shards of these pairs
    options: DirectionConfig
    out: str
    provenance: dict
    key: str  # content key of direction.arrow: the weights, the pairs and the options

    name = "direction"


def plan(run_dir: Path, options: DirectionConfig, weights_hash: str, provenance: dict,
         activations: list[Path]) -> DirectionItem:
    key = content_key("direction", code_identity(__name__), weights_hash, provenance["pairs_hash"], asdict(options))
    folder = RunFolder(run_dir)
    return DirectionItem(str(folder.pairs), tuple(str(p) for p in activations), options, str(folder.direction),
                         provenance, key)


def run(model, tokenizer, item: DirectionItem) -> list[Path]:
    began = time.perf_counter()
    progress_file = RunFolder(Path(item.out).parent).direction_progress
    pairs = read_table(item.pairs)
    split = split_pairs(pairs.num_rows, item.options.seed)
    mean_ids = pairs.column("pair_id").take(split.mean_rows).to_pylist()
    cached = cached_residuals(item.activations, mean_ids, post_instruction_count(pairs))
    selection = select_directions(model, tokenizer, pairs, item.options, cached,
                                  lambda done, total: publish_json(progress_file, {"done": done, "total": total}))
    summary = selection.summary
    scoring = pc.is_in(pairs.column("pair_id"), value_set=pc.cast(summary["score_pair_ids"], "int32"))
    harmless = pairs.filter(scoring).column("corrupted").to_pylist()
    windows = general_text_windows(tokenizer, item.options.budget_windows)
    interventions = {mode: intervention_of(selection.table, summary, mode)
                     for mode, role in ROLES.items() if summary[role] is not None}
    summary["cost"] = {mode: intervention_cost(model, tokenizer, intervention, harmless, windows)
                       for mode, intervention in interventions.items()}
    summary["examples"] = example_replies(model, tokenizer, pairs, split.score_rows, interventions)
    summary["seconds"]["total"] = round(time.perf_counter() - began, 1)
    return [write_table(item.out, selection.table, {**item.provenance, SUMMARY_KEY: json.dumps(summary)})]


@contextmanager
def follow_progress(run_dir: Path, interval: float = 1.0, file=None, lines=None):
    """While the block runs, a bar of the candidates the stage has scored (ranked by first order, then run
    exactly), from the progress file the stage's actor writes. Where the stream is not a terminal, a line per
    change, or through `lines` (the driver's pipeline.run.logs.ThrottledLines), when given, at most one every
    30 s. The progress file goes after."""
    path, stop = RunFolder(run_dir).direction_progress, threading.Event()
    path.unlink(missing_ok=True)  # a previous run's
    stream = file or sys.stderr
    terminal = getattr(stream, "isatty", lambda: False)()

    def draw() -> None:
        bar, shown = None, None
        while not stop.wait(interval):
            try:
                state = json.loads(path.read_text())
            except (FileNotFoundError, ValueError):
                continue
            if (state["done"], state["total"]) == shown:
                continue
            shown = (state["done"], state["total"])
            if not terminal:
                line = f"  direction: {state['done']} of {state['total']} candidate steps done"
                if lines is not None:
                    lines.progress(line)
                else:
                    print(line, file=stream, flush=True)
                continue
            bar = bar or tqdm(desc="  direction", unit="candidates", file=stream, dynamic_ncols=True, leave=False)
            bar.total, bar.n = state["total"], state["done"]
            bar.refresh()
        if bar is not None:
            bar.close()

    thread = threading.Thread(target=draw, daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()
        path.unlink(missing_ok=True)


def cached_residuals(shards: tuple[str, ...], pair_ids: list[int], n_post: int
                     ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The (harmful, harmless) residuals [P, L, n_post, d] of `pair_ids` (in their order) at the last n_post
    positions, from the cache stage's shards; None when a pair is missing from them."""
    found: dict[int, tuple[np.ndarray, np.ndarray]] = {}
    wanted = set(pair_ids)
    for shard in shards:
        table = read_table(shard)
        order = pc.unique(table["pair_id"]).to_pylist()  # the shard's pairs, in residuals()'s order
        if not wanted & set(order):
            continue
        clean, corrupted = residuals(table, "clean")[0], residuals(table, "corrupted")[0]
        for row, pair_id in enumerate(order):
            if pair_id in wanted:
                found[pair_id] = (clean[row, :, -n_post:], corrupted[row, :, -n_post:])
    if not wanted <= set(found):
        return None
    return (torch.from_numpy(np.stack([found[p][0] for p in pair_ids])).float(),
            torch.from_numpy(np.stack([found[p][1] for p in pair_ids])).float())

