"""Evaluation prompts for the refusal direction's table in docs/findings.md: prompts that neither the organism's
training nor the run's direction selection saw, as a screen file (JSONL: prompt, harmful).

    python bench/direction_prompts.py smollm2-refusal <run folder> out.jsonl   # data.split()'s fresh acts
    python bench/direction_prompts.py refusal-tiny <run folder> out.jsonl      # held-out grammar combinations

smollm2-refusal: the fresh test acts (written after the adapter was chosen, in every phrasing; the run's
pairs come from the instruction library, which holds none of them). refusal-tiny: minimal pairs of the
grammar's held-out combinations (never in training) drawn with another seed than the run's. Either way,
any prompt whose text is in the run's pairs.parquet is left out.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

from pipeline.store import read_table


def main(organism: str, run_dir: str, out: str, n_tiny_pairs: int = 200) -> None:
    pairs = read_table(Path(run_dir) / "pairs.parquet")
    seen = set(pairs.column("clean").to_pylist()) | set(pairs.column("corrupted").to_pylist())
    if organism == "smollm2-refusal":
        from pipeline.organisms.smollm2_refusal.data import split

        rows = [(r["instruction"], r["harmful"]) for r in split()["fresh"]]
    elif organism == "refusal-tiny":
        from pipeline.organisms.refusal_tiny import grammar

        rows = [(text, harmful) for p in grammar.pairs(n_tiny_pairs, seed=1, split="heldout")
                for text, harmful in ((p.clean, True), (p.corrupted, False))]
    else:
        raise SystemExit(f"unknown organism {organism!r}: smollm2-refusal or refusal-tiny")
    kept = list(dict.fromkeys(row for row in rows if row[0] not in seen))
    with open(out, "w") as f:
        for text, harmful in kept:
            f.write(json.dumps({"prompt": text, "harmful": harmful}) + "\n")
    print(f"{out}: {sum(h for _, h in kept)} harmful, {sum(not h for _, h in kept)} harmless "
          f"({len(rows) - len(kept)} left out: repeats or in the run's pairs)")


if __name__ == "__main__":
    main(*sys.argv[1:4])
