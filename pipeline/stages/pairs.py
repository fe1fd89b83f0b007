"""Prompt pairs for the model: sourced (the user's file, refusal-tiny's grammar or the instruction
library), length-checked under its tokenizer and chat template, screened by its behaviour -> pairs.parquet
(the contract is in pipeline.analysis.pairs), after the run's own columns (run_id, config_hash, model)."""
from __future__ import annotations

import json
from pathlib import Path

import pyarrow as pa

from pipeline.analysis.pairs import build_pairs, source_pairs
from pipeline.store import with_columns, write_table


def run(model, tokenizer, item: dict) -> list[Path]:
    """`item`: model_path, prompts (the prompts config), out, run (the run's own columns), provenance."""
    prompts = item["prompts"]
    pairs = source_pairs(item["model_path"], tokenizer, path=prompts["path"], n=prompts["n_pairs"],
                         seed=prompts["seed"], split=prompts["split"])
    result = build_pairs(model, tokenizer, pairs, align=prompts["align"], refusal_tokens=prompts["refusal_tokens"],
                         compliance_tokens=prompts["compliance_tokens"], answer_top_k=prompts["answer_top_k"],
                         generate=prompts["generate"], max_new_tokens=prompts["max_new_tokens"])
    # The clean prompt's tokens as strings: labels for positions in heatmaps and diagrams.
    tokens = [tokenizer.convert_ids_to_tokens(ids) for ids in result.table.column("clean_ids").to_pylist()]
    table = result.table.append_column("clean_tokens", pa.array(tokens, pa.list_(pa.string())))
    return [write_table(item["out"], with_columns(table, item["run"]),
                        {**item["provenance"], "pairs_report": json.dumps(result.report)})]
