"""The refusal direction on the run's screened pairs (pipeline.analysis.directions) -> direction.arrow:
every candidate (layer x post-instruction position) with its scores, the chosen one, and in the file's
metadata a summary with the chosen direction's cost (KL on the scoring half's harmless prompts, the
cross-entropy change on the shipped general text) under ablation and under addition."""
from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pyarrow.compute as pc
import torch

from pipeline.analysis.directions import SUMMARY_KEY, intervention_cost, select_direction
from pipeline.engine.directions import INTERVENTIONS, Intervention
from pipeline.outputs.files import RunFolder
from pipeline.schema import DirectionConfig
from pipeline.store import code_identity, content_key, read_table, tensor_numpy, write_table


@dataclass(frozen=True)
class DirectionItem:
    """The refusal direction over the run's screened pairs -> direction.arrow."""

    pairs: str  # pairs.parquet
    options: DirectionConfig
    out: str
    provenance: dict
    key: str  # content key of direction.arrow: the weights, the pairs and the options

    name = "direction"


def plan(run_dir: Path, options: DirectionConfig, weights_hash: str, provenance: dict) -> DirectionItem:
    key = content_key("direction", code_identity(__name__), weights_hash, provenance["pairs_hash"], asdict(options))
    folder = RunFolder(run_dir)
    return DirectionItem(str(folder.pairs), options, str(folder.direction), provenance, key)


def run(model, tokenizer, item: DirectionItem) -> list[Path]:
    pairs = read_table(item.pairs)
    return [write_table(item.out, *_selection(model, tokenizer, pairs, item.options, item.provenance))]


def _selection(model, tokenizer, pairs, options: DirectionConfig, provenance: dict):
    """(direction.arrow's table, its metadata)."""
    selection = select_direction(model, pairs, options.max_kl, options.max_layer_fraction, options.seed,
                                 options.max_batch_rows)
    summary = selection.summary
    chosen = summary["chosen"]
    if chosen is not None:
        row = int(np.flatnonzero(selection.table.column("chosen").to_numpy(zero_copy_only=False))[0])
        vector = torch.from_numpy(np.array(tensor_numpy(selection.table.column("direction"))[row]))
        scoring = pc.is_in(pairs.column("pair_id"), value_set=pc.cast(summary["score_pair_ids"], "int32"))
        harmless = pairs.filter(scoring).column("corrupted").to_pylist()
        summary["cost"] = {mode: intervention_cost(model, tokenizer, Intervention(mode, vector, chosen["layer"],
                                                                                  chosen["scale"]), harmless)
                           for mode in INTERVENTIONS}
    return selection.table, {**provenance, SUMMARY_KEY: json.dumps(summary)}
