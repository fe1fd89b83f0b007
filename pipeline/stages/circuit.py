"""The circuit search on the screened pairs (pipeline.analysis.circuit_search) -> circuit.json, with
the strongest sites' behaviour flips and per-category effects from effects.parquet."""
from __future__ import annotations

from pathlib import Path

from pipeline.analysis.circuit_search import find_circuit
from pipeline.analysis.statistics import site_breakdown
from pipeline.config import CircuitConfig, SummaryConfig
from pipeline.store import publish_json, read_table


def run(model, tokenizer, item: dict) -> list[Path]:
    """`item`: run_dir, circuit and summary (their configs), metric, model (its name), provenance."""
    run_dir = Path(item["run_dir"])
    summary = SummaryConfig(**item["summary"])
    result = find_circuit(model, read_table(run_dir / "pairs.parquet"), CircuitConfig(**item["circuit"]), summary,
                          item["metric"], item["model"])
    circuit = result.to_json() | {"provenance": item["provenance"],
                                  "breakdown": site_breakdown(run_dir, summary.top_k)}
    path = run_dir / "circuit.json"
    publish_json(path, circuit)
    return [path]
