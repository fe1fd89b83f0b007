"""The pairs stage: prompt pairs for the model, sourced (the user's file, refusal-tiny's grammar or the
instruction library), length-checked under its tokenizer and chat template, screened by its behaviour
-> pairs.parquet (the contract is in pipeline.analysis.pairs).

The screen runs in four phases, each a kind of work item writing small Arrow/JSON files under the run
folder's `pairs/` that the next phase reads, so only a batch's pairs are in an actor's memory at a time
and a resumed run reuses every batch it finished:

- `tokenize` (TokensItem): source, tokenize and drop repeated pairs over the whole set -> pairs/tokens/<key>.arrow
  (the unique pairs' token ids and spans; how many repeats were dropped in its metadata);
- `reply` (RepliesItem): one batch of resources.pairs_shard_size pairs' greedy replies, judged ->
  pairs/replies/<key>.arrow;
- `derive_answers` (AnswersItem): the answer tokens from every batch's replies at once -> pairs/answers/<key>.json;
- `screen` (ScreenItem): one batch's first-token metric and the pairs it keeps -> pairs/screen/<key>.arrow
  (its `ScreenCounts` in the metadata).

`screen_pairs` runs the phases in order through whoever runs items (the sweep's actors, or this process:
`run_in_process`, for a notebook or a test); `collect` puts the screened batches together into
pairs.parquet with its report.

The transfer pairs (pipeline.analysis.pairs.transfer_source: another source than the study's) go through
the same phases under pairs/transfer/, after the study's: `tokenize_transfer` (TransferTokensItem) keeps
those of equal token length that share no prompt with the study's pairs, and their batches are screened
under the study's answer tokens (derived from the study's replies alone, so the study's pairs and
everything computed from them are the same with or without transfer pairs); `collect_transfer` writes
them to transfer_pairs.parquet. Only the circuit step reads that file: the cache, patch and summary
stages see the study's pairs alone.
"""
from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import pyarrow as pa

from pipeline.analysis.behaviour import AnswerTokens
from pipeline.analysis.pairs import (
    InstructionPair,
    Replies,
    ScreenCounts,
    TokenizedPair,
    answers_from_replies,
    check_answer_source,
    has_transfer_source,
    pair_replies,
    pairs_report,
    screen_batch,
    sharing_no_prompt_with,
    source_pairs,
    tokenize_pairs,
    transfer_source,
    unique_pairs,
    with_report,
)
from pipeline.outputs.files import RunFolder
from pipeline.schema import PromptsConfig, ResourcesConfig
from pipeline.store import (
    code_identity,
    content_key,
    provenance,
    publish_json,
    read_schema,
    read_table,
    sha256_file,
    with_columns,
    write_table,
)

IDS = pa.list_(pa.int32())


@dataclass(frozen=True)
class TokensItem:
    """The whole set, tokenized at once so that a pair repeated in two batches still counts once."""

    model_path: str  # the model's path as configured (which generator supplies its pairs)
    prompts: PromptsConfig
    out: str
    provenance: dict

    name = "pairs"


@dataclass(frozen=True)
class TransferTokensItem:
    """The transfer pairs, tokenized; those sharing a prompt with the study's (its tokens file) left out."""

    model_path: str
    prompts: PromptsConfig
    study_tokens: str
    out: str
    provenance: dict

    name = "transfer pairs"


@dataclass(frozen=True)
class RepliesItem:
    """One batch's greedy replies: rows [start, stop) of the tokens file."""

    tokens: str
    start: int
    stop: int
    max_new_tokens: int
    out: str
    provenance: dict

    @property
    def name(self) -> str:
        return f"replies {self.start}-{self.stop}"


@dataclass(frozen=True)
class AnswersItem:
    """The answer tokens, from every batch's replies (in pair order; none when generation is off)."""

    replies: tuple[str, ...]
    prompts: PromptsConfig
    out: str

    name = "answers"


@dataclass(frozen=True)
class ScreenItem:
    """One batch screened under the answer tokens."""

    tokens: str
    start: int
    stop: int
    replies: str | None  # this batch's replies file; None when generation is off
    answers: str  # the answers file
    out: str
    provenance: dict

    @property
    def name(self) -> str:
        return f"screen {self.start}-{self.stop}"


def tokenize(model, tokenizer, item: TokensItem) -> list[Path]:
    prompts = item.prompts
    pairs = source_pairs(item.model_path, tokenizer, path=prompts.path, n=prompts.n_pairs, seed=prompts.seed,
                         split=prompts.split)
    tokenized, n_duplicates = unique_pairs(tokenize_pairs(tokenizer, pairs, prompts.align))
    check_answer_source(prompts.generate, prompts.refusal_tokens, prompts.compliance_tokens)
    return [write_table(item.out, tokens_table(tokenized), {**item.provenance, "n_duplicates": str(n_duplicates)})]


def tokenize_transfer(model, tokenizer, item: TransferTokensItem) -> list[Path]:
    """Circuits patch position by position, so pairs of unequal token length are left out here (aligned
    from the end only to be counted); so is every pair sharing a prompt with the study's."""
    prompts = item.prompts
    source = transfer_source(item.model_path, path=prompts.transfer, n=prompts.transfer_pairs, seed=prompts.seed,
                             split=prompts.split)
    tokenized, n_duplicates = unique_pairs(tokenize_pairs(tokenizer, source.pairs, "end"))
    equal = [t for t in tokenized if t.align_offset == 0]
    study = read_tokens(item.study_tokens, 0, read_table(item.study_tokens).num_rows)
    # Numbered after the study's pairs: a pair id names one pair of the run.
    first = max(t.pair_id for t in study) + 1
    kept = [replace(t, pair_id=first + t.pair_id) for t in sharing_no_prompt_with(equal, study)]
    report = {"source": source.name, "n_pairs": len(source.pairs), "n_duplicates": n_duplicates,
              "n_unequal_length": len(tokenized) - len(equal), "n_shared_with_study": len(equal) - len(kept)}
    return [write_table(item.out, tokens_table(kept), {**item.provenance, "n_duplicates": str(n_duplicates),
                                                       "transfer_report": json.dumps(report)})]


def has_transfer(model_path: str, prompts: PromptsConfig) -> bool:
    """Whether the run has transfer pairs (pipeline.analysis.pairs.transfer_source)."""
    return prompts.transfer_pairs > 0 and has_transfer_source(model_path, prompts.transfer)


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


def transfer_report(tokens_path: str | Path) -> dict:
    """A transfer tokens file's report: the source, how many pairs it gave and how many were left out."""
    return json.loads(provenance(read_schema(tokens_path))["transfer_report"])


def read_tokens(path: str | Path, start: int, stop: int) -> list[TokenizedPair]:
    """Rows [start, stop) of a tokens file, as the pairs they were written from."""
    rows = read_table(path).slice(start, stop - start).to_pylist()
    return [TokenizedPair(r["pair_id"], InstructionPair(r["clean"], r["corrupted"], r["category"]), r["clean_ids"],
                          r["corrupted_ids"], r["align_offset"], r["instruction_start"], r["instruction_end"],
                          r["harmful_positions"]) for r in rows]


def n_duplicates(tokens_path: str | Path) -> int:
    return int(provenance(read_schema(tokens_path))["n_duplicates"])


def reply(model, tokenizer, item: RepliesItem) -> list[Path]:
    batch = pair_replies(model, tokenizer, read_tokens(item.tokens, item.start, item.stop), item.max_new_tokens)
    table = pa.table({"text": pa.array(batch.texts, pa.string()), "refused": pa.array(batch.refused, pa.bool_()),
                      "first_token": pa.array(batch.first_tokens, pa.int32())})
    return [write_table(item.out, table, item.provenance)]


def read_replies(path: str | Path) -> Replies:
    table = read_table(path)
    return Replies(*(table.column(c).to_pylist() for c in ("text", "refused", "first_token")))


def derive_answers(model, tokenizer, item: AnswersItem) -> list[Path]:
    prompts = item.prompts
    answer_tokens = answers_from_replies(tokenizer, [read_replies(p) for p in item.replies], prompts.refusal_tokens,
                                         prompts.compliance_tokens, prompts.answer_top_k)
    publish_json(item.out, answer_tokens.to_dict(tokenizer))
    return [Path(item.out)]


def read_answers(path: str | Path) -> dict:
    """An answers file: `AnswerTokens.to_dict`, what the pairs report lists."""
    return json.loads(Path(path).read_text())


def screen(model, tokenizer, item: ScreenItem) -> list[Path]:
    saved = read_answers(item.answers)
    answer_tokens = AnswerTokens(tuple(saved["refusal_ids"]), tuple(saved["compliance_ids"]), saved["answer_source"])
    batch = read_tokens(item.tokens, item.start, item.stop)
    screened = screen_batch(model, batch, read_replies(item.replies) if item.replies else None, answer_tokens)
    # The clean prompt's tokens as strings: labels for positions in heatmaps and diagrams.
    labels = [tokenizer.convert_ids_to_tokens(ids) for ids in screened.table.column("clean_ids").to_pylist()]
    table = screened.table.append_column("clean_tokens", pa.array(labels, pa.list_(pa.string())))
    return [write_table(item.out, table, {**item.provenance, "counts": json.dumps(asdict(screened.counts))})]


def read_counts(path: str | Path) -> ScreenCounts:
    return ScreenCounts(**json.loads(provenance(read_schema(path))["counts"]))


# ---- the phases in order, and what the driver makes of them -------------------------------------------

# Runs a phase's items: (phase, its folder, the compute function, items) -> each item's output, in item order.
RunItems = Callable[[str, Path, Callable, list], "list[Path]"]


def content_key_of(model_path: str, prompts: PromptsConfig, weights_hash: str, tokenizer_hash: str) -> str:
    """The key pairs.parquet and transfer_pairs.parquet are recorded under: the model as loaded, its tokenizer
    and chat template (an edited template gives other token ids), and everything that chooses the pairs
    and the transfer pairs (a user's prompt files by their content: an edited file gives new pairs, never
    the old ones)."""
    prompts_file = sha256_file(prompts.path) if prompts.path else None
    transfer_file = sha256_file(prompts.transfer) if prompts.transfer else None
    return content_key("pairs", code_identity(__name__), weights_hash, tokenizer_hash, model_path, asdict(prompts),
                       prompts_file, transfer_file)


@dataclass(frozen=True)
class Screened:
    """The files the phases left, which `collect` puts together."""

    tokens: Path
    answers: Path
    batches: list[Path]  # each batch's screened pairs, in pair order
    transfer: Screened | None = None  # the transfer pairs' (under the same answers); None: the run has none


def screen_pairs(run_items: RunItems, folder: Path, key: str, model_path: str, prompts: PromptsConfig,
                 batch_size: int, provenance: dict) -> Screened:
    """The phases in order under `folder` (the run folder's pairs/), every file named by a content key
    derived from `key`: the set tokenized once, then batches of `batch_size` pairs replied to, the answer
    tokens derived once from every batch's replies, and the batches screened; then the transfer pairs'
    tokens, replies and screen (under pairs/transfer/) where the run has them."""
    [tokens] = run_items("pairs", folder / "tokens", tokenize, [
        TokensItem(model_path, prompts, str(folder / "tokens" / f"{key}.arrow"), provenance)])
    replies = reply_batches(run_items, folder, key, Path(tokens), prompts, batch_size, provenance)
    answers_key = content_key("answers", key, [path.name for path in replies])
    [answers] = run_items("answers", folder / "answers", derive_answers, [
        AnswersItem(tuple(str(path) for path in replies), prompts, str(folder / "answers" / f"{answers_key}.json"))])
    screened = screen_batches(run_items, folder, answers_key, Path(tokens), replies, Path(answers), batch_size,
                              provenance)
    transfer = None
    if has_transfer(model_path, prompts):
        transfer_folder, transfer_key = folder / "transfer", content_key("transfer", key)
        [transfer_tokens] = run_items("pairs", transfer_folder / "tokens", tokenize_transfer, [
            TransferTokensItem(model_path, prompts, str(tokens),
                               str(transfer_folder / "tokens" / f"{transfer_key}.arrow"), provenance)])
        transfer_replies = reply_batches(run_items, transfer_folder, transfer_key, Path(transfer_tokens), prompts,
                                         batch_size, provenance)
        transfer = Screened(Path(transfer_tokens), Path(answers), screen_batches(
            run_items, transfer_folder, content_key("transfer", answers_key), Path(transfer_tokens),
            transfer_replies, Path(answers), batch_size, provenance))
    return Screened(Path(tokens), Path(answers), screened, transfer)


def _batches(tokens: Path, batch_size: int) -> list[tuple[int, int]]:
    n = read_table(tokens).num_rows
    return [(start, min(start + batch_size, n)) for start in range(0, n, batch_size)]


def reply_batches(run_items: RunItems, folder: Path, key: str, tokens: Path, prompts: PromptsConfig,
                  batch_size: int, provenance: dict) -> list[Path]:
    """Each batch's greedy replies under folder/replies (none when generation is off)."""
    return [Path(p) for p in run_items("replies", folder / "replies", reply, [
        RepliesItem(str(tokens), start, stop, prompts.max_new_tokens, str(
            folder / "replies" / f"{content_key('replies', key, start, stop)}.arrow"), provenance)
        for start, stop in _batches(tokens, batch_size)] if prompts.generate else [])]


def screen_batches(run_items: RunItems, folder: Path, key: str, tokens: Path, replies: list[Path], answers: Path,
                   batch_size: int, provenance: dict) -> list[Path]:
    """Each batch screened under the answer tokens, under folder/screen."""
    return [Path(p) for p in run_items("screen", folder / "screen", screen, [
        ScreenItem(str(tokens), start, stop, str(replies[i]) if replies else None, str(answers), str(
            folder / "screen" / f"{content_key('screen', key, start, stop)}.arrow"), provenance)
        for i, (start, stop) in enumerate(_batches(tokens, batch_size))])]


def collect(screened: Screened, prompts: PromptsConfig, out: Path, run: dict, provenance: dict) -> tuple[Path, dict]:
    """The screened batches' kept pairs -> `out` (pairs.parquet) with the run's own columns and the pairs
    report over the whole set (raises when no pair survived); returns the file and the report."""
    counts = sum((read_counts(path) for path in screened.batches), ScreenCounts())
    report = pairs_report(counts, n_duplicates(screened.tokens), prompts.align, prompts.generate,
                          read_answers(screened.answers))
    kept = pa.concat_tables([read_table(path).replace_schema_metadata(None) for path in screened.batches])
    return write_table(out, with_columns(with_report(kept, report), run),
                       {**provenance, "pairs_report": json.dumps(report)}), report


def collect_transfer(screened: Screened, out: Path, provenance: dict) -> Path | None:
    """The transfer pairs' screened batches -> `out` (transfer_pairs.parquet) with their report (where they
    came from, how many were left out and why, how many the screen kept); None where the run has none."""
    transfer = screened.transfer
    if transfer is None:
        return None
    counts = sum((read_counts(path) for path in transfer.batches), ScreenCounts())
    report = transfer_report(transfer.tokens) | {"n_screened": counts.n_pairs, "n_kept": counts.n_kept}
    tables = [read_table(path).replace_schema_metadata(None) for path in transfer.batches]
    kept = pa.concat_tables(tables) if tables else read_schema(screened.batches[0]).empty_table()
    return write_table(out, kept.replace_schema_metadata(None), {**provenance, "transfer_report": json.dumps(report)})


def run_in_process(model, tokenizer, model_path: str, prompts: PromptsConfig, folder: Path,
                   batch_size: int = ResourcesConfig.pairs_shard_size) -> tuple[pa.Table, dict]:
    """The whole stage in this process (a notebook, a test), each item run as an actor runs it, into
    `folder`: pairs.parquet's table (without the run's own columns) and its report; the transfer pairs,
    where the run has them, into `folder`'s transfer_pairs.parquet."""
    def run_items(phase: str, phase_folder: Path, compute: Callable, items: list) -> list[Path]:
        return [path for item in items for path in compute(model, tokenizer, item)]

    key = content_key_of(model_path, prompts, "in-process", "in-process")
    run_folder = RunFolder(folder)
    screened = screen_pairs(run_items, run_folder.pairs_batches, key, model_path, prompts, batch_size, {})
    path, report = collect(screened, prompts, run_folder.pairs, {}, {})
    collect_transfer(screened, run_folder.transfer_pairs, {})
    return read_table(path), report
