"""Prompt pairs for the model: sourced (the user's file, refusal-tiny's grammar or the instruction library),
length-checked under its tokenizer and chat template, screened by its behaviour, in batches of pairs that
the driver puts together into pairs.parquet (the contract is in pipeline.analysis.pairs).

The screen's phases (pipeline.analysis.pairs) are four stages here, each writing small Arrow/JSON files
under the run folder's `pairs/` that the next one reads:

- `run` (stage "pairs"): source, tokenize and drop repeated pairs over the whole set -> pairs/tokens/<key>.arrow
  (the unique pairs' token ids and spans; how many repeats were dropped in its metadata);
- `replies`: one batch of pairs' greedy replies, judged -> pairs/replies/<key>.arrow;
- `answers`: the answer tokens from every batch's replies at once -> pairs/answers/<key>.json;
- `screen`: one batch's first-token metric and the pairs it keeps -> pairs/screen/<key>.arrow (its
  `ScreenCounts` in the metadata), which the driver concatenates into pairs.parquet.
"""
from __future__ import annotations

import json
from dataclasses import asdict
from pathlib import Path

import pyarrow as pa

from pipeline.analysis.behaviour import AnswerTokens
from pipeline.analysis.pairs import (InstructionPair, Replies, ScreenCounts, TokenizedPair, answers_from_replies,
                                     check_answer_source, pair_replies, screen_batch, source_pairs, tokenize_pairs,
                                     unique_pairs)
from pipeline.store import provenance, publish_json, read_schema, read_table, write_table

IDS = pa.list_(pa.int32())


def run(model, tokenizer, item: dict) -> list[Path]:
    """`item`: model_path, prompts (the prompts config), out, provenance. The whole set is tokenized here,
    so that a pair repeated in two batches still counts once."""
    prompts = item["prompts"]
    pairs = source_pairs(item["model_path"], tokenizer, path=prompts["path"], n=prompts["n_pairs"],
                         seed=prompts["seed"], split=prompts["split"])
    tokenized, n_duplicates = unique_pairs(tokenize_pairs(tokenizer, pairs, prompts["align"]))
    check_answer_source(prompts["generate"], prompts["refusal_tokens"], prompts["compliance_tokens"])
    return [write_table(item["out"], tokens_table(tokenized),
                        {**item["provenance"], "n_duplicates": str(n_duplicates)})]


def tokens_table(tokenized: list[TokenizedPair]) -> pa.Table:
    return pa.table({
        "pair_id": pa.array([t.pair_id for t in tokenized], pa.int32()),
        "category": pa.array([t.pair.category for t in tokenized], pa.string()),
        "clean": pa.array([t.pair.clean for t in tokenized], pa.string()),
        "corrupted": pa.array([t.pair.corrupted for t in tokenized], pa.string()),
        "clean_ids": pa.array([t.clean_ids for t in tokenized], IDS),
        "corrupted_ids": pa.array([t.corrupted_ids for t in tokenized], IDS),
        "align_offset": pa.array([t.align_offset for t in tokenized], pa.int32()),
        "instruction_start": pa.array([t.instruction_start for t in tokenized], pa.int32()),
        "instruction_end": pa.array([t.instruction_end for t in tokenized], pa.int32()),
        "harmful_positions": pa.array([t.harmful_positions for t in tokenized], IDS),
    })


def read_tokens(path: str | Path, start: int, stop: int) -> list[TokenizedPair]:
    """Rows [start, stop) of a tokens file, as the pairs they were written from."""
    rows = read_table(path).slice(start, stop - start).to_pylist()
    return [TokenizedPair(r["pair_id"], InstructionPair(r["clean"], r["corrupted"], r["category"]), r["clean_ids"],
                          r["corrupted_ids"], r["align_offset"], r["instruction_start"], r["instruction_end"],
                          r["harmful_positions"]) for r in rows]


def n_duplicates(tokens_path: str | Path) -> int:
    return int(provenance(read_schema(tokens_path))["n_duplicates"])


def replies(model, tokenizer, item: dict) -> list[Path]:
    """`item`: tokens (the tokens file), start, stop (its rows), max_new_tokens, out, provenance."""
    batch = pair_replies(model, tokenizer, read_tokens(item["tokens"], item["start"], item["stop"]),
                         item["max_new_tokens"])
    table = pa.table({"text": pa.array(batch.texts, pa.string()), "refused": pa.array(batch.refused, pa.bool_()),
                      "first_token": pa.array(batch.first_tokens, pa.int32())})
    return [write_table(item["out"], table, item["provenance"])]


def read_replies(path: str | Path) -> Replies:
    table = read_table(path)
    return Replies(*(table.column(c).to_pylist() for c in ("text", "refused", "first_token")))


def answers(model, tokenizer, item: dict) -> list[Path]:
    """`item`: replies (every batch's replies file, in pair order), prompts, out."""
    prompts = item["prompts"]
    answer_tokens = answers_from_replies(tokenizer, [read_replies(p) for p in item["replies"]],
                                         prompts["refusal_tokens"], prompts["compliance_tokens"],
                                         prompts["answer_top_k"])
    publish_json(item["out"], answer_tokens.to_dict(tokenizer))
    return [Path(item["out"])]


def read_answers(path: str | Path) -> dict:
    """An answers file: `AnswerTokens.to_dict`, what the pairs report lists."""
    return json.loads(Path(path).read_text())


def screen(model, tokenizer, item: dict) -> list[Path]:
    """`item`: tokens, start, stop, replies (this batch's replies file, None when generation is off), answers
    (the answers file), out, provenance."""
    saved = read_answers(item["answers"])
    answer_tokens = AnswerTokens(tuple(saved["refusal_ids"]), tuple(saved["compliance_ids"]), saved["answer_source"])
    batch = read_tokens(item["tokens"], item["start"], item["stop"])
    screened = screen_batch(model, batch, read_replies(item["replies"]) if item["replies"] else None, answer_tokens)
    # The clean prompt's tokens as strings: labels for positions in heatmaps and diagrams.
    labels = [tokenizer.convert_ids_to_tokens(ids) for ids in screened.table.column("clean_ids").to_pylist()]
    table = screened.table.append_column("clean_tokens", pa.array(labels, pa.list_(pa.string())))
    return [write_table(item["out"], table, {**item["provenance"], "counts": json.dumps(asdict(screened.counts))})]


def read_counts(path: str | Path) -> ScreenCounts:
    return ScreenCounts(**json.loads(provenance(read_schema(path))["counts"]))
