"""The stages of a sweep, one module each, registered in one table.

A stage is a plain callable `(model, tokenizer, item) -> paths`: it reads its inputs from files named in
the work item (a small dict of paths, row indices and options), computes, and publishes its outputs
atomically, returning their paths. The model is loaded once per Ray actor (pipeline.run.workers) and
passed in; stages know nothing of Ray, MLflow or Hydra, and the checksums and manifests are the
runner's business.
"""
from __future__ import annotations

from pipeline.stages import cache, circuit, direction, pairs, patch, summary

STAGES = {
    "pairs": pairs.run,  # the prompt pairs, tokenized, repeats dropped -> pairs/tokens/<key>.arrow
    "replies": pairs.replies,  # one batch of pairs' greedy replies -> pairs/replies/<key>.arrow
    "answers": pairs.answers,  # the answer tokens from every batch's replies -> pairs/answers/<key>.json
    "screen": pairs.screen,  # one batch of pairs screened -> pairs/screen/<key>.arrow (the driver: pairs.parquet)
    "cache": cache.run,  # one pair shard's clean and corrupted residuals -> activations/<key>.arrow
    "patch": patch.run,  # one (pair shard, component, direction) -> effects/<key>.arrow
    "summary": summary.run,  # effect shards -> effects.parquet, summary.parquet
    "circuit": circuit.run,  # the circuit search -> circuit.json
    "direction": direction.run,  # the refusal direction (opt-in) -> direction.arrow
}
