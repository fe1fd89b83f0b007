"""The circuit search on the screened pairs (pipeline.analysis.circuit) -> circuit.json (and its exports for
circuit-tracer's viewer and MIB: pipeline.outputs.export), with the
circuit's faithfulness on the transfer pairs (transfer_pairs.parquet, where the run has them) and its
knock-out by generation (pipeline.analysis.knockout).

The search runs on a model actor; it writes where it is (phase, steps done, time left) to its progress file in
the run folder, and `follow_progress` draws that on the driver while the item runs."""
from __future__ import annotations

import json
import sys
import threading
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path

from tqdm import tqdm

from pipeline.analysis.circuit.method import TransferPairs, find_circuit
from pipeline.analysis.circuit.progress import Progress
from pipeline.analysis.circuit.result import read_circuit
from pipeline.analysis.knockout import knockout_by_generation
from pipeline.outputs.export import write_exports
from pipeline.outputs.files import RunFolder
from pipeline.schema import CircuitConfig, PatchsweepConfig, SummaryConfig
from pipeline.store import code_identity, content_key, provenance, publish_json, read_schema, read_table


@dataclass(frozen=True)
class CircuitItem:
    """The circuit search over the run's screened pairs -> circuit.json."""

    run_dir: str
    model: str  # the model's label
    circuit: CircuitConfig
    summary: SummaryConfig  # its intervals
    metric: str
    max_new_tokens: int  # the screen's reply length: the knock-out's too
    provenance: dict
    transfer: str | None  # transfer_pairs.parquet; None: the run has no transfer pairs
    key: str  # content key of circuit.json: the weights, the pairs, the transfer pairs and every option above

    name = "circuit"


def plan(run_dir: Path, cfg: PatchsweepConfig, weights_hash: str, labels_hash: str, transfer_hash: str | None,
         provenance: dict) -> CircuitItem:
    """`labels_hash`: the pairs' category labels (the circuit's faithfulness per category); `transfer_hash`:
    the transfer pairs' content (None: the run has none)."""
    key = content_key("circuit", code_identity(__name__), weights_hash, provenance["pairs_hash"], labels_hash,
                      transfer_hash, asdict(cfg.circuit), asdict(cfg.summary), cfg.patching.metric,
                      cfg.prompts.max_new_tokens)
    transfer = None if transfer_hash is None else str(RunFolder(run_dir).transfer_pairs)
    return CircuitItem(str(run_dir), cfg.model.name, cfg.circuit, cfg.summary, cfg.patching.metric,
                       cfg.prompts.max_new_tokens, provenance, transfer, key)


def run(model, tokenizer, item: CircuitItem) -> list[Path]:
    folder = RunFolder(item.run_dir)
    progress = Progress(lambda state: publish_json(folder.circuit_progress, state))
    transfer = None if item.transfer is None else TransferPairs(
        read_table(item.transfer), json.loads(provenance(read_schema(item.transfer))["transfer_report"])["source"])
    result = find_circuit(model, read_table(folder.pairs), item.circuit, item.summary, item.metric,
                          item.model, progress, transfer)
    # The harmful prompts' replies as they are: the behaviour screen's, when it generated them (as long).
    screened = result.setup.pairs.column("clean_generation")
    knockout = knockout_by_generation(model, tokenizer, result.setup.groups, result.setup.nodes, result.search.circuit,
                                      item.max_new_tokens, plain=None if screened.null_count else screened.to_pylist())
    circuit = result.to_json() | {"provenance": item.provenance, "knockout_generation": knockout}
    publish_json(folder.circuit, circuit)
    # circuit-tracer's graph and MIB's importances (`patchsweep export` writes them for older runs).
    return [folder.circuit, *write_exports(read_circuit(folder.circuit), folder.root).paths]


@contextmanager
def follow_progress(run_dir: Path, interval: float = 1.0, file=None, lines=None):
    """While the block runs, a progress bar of the circuit step: its phase, steps done of the phase's
    total (when known), rows computed and the time the phase has left. Where the stream is not a terminal
    (a Slurm .out file, `kubectl logs`, a redirect) a bar would add a line at every refresh, so it gets a
    line per phase, and through `lines` (the driver's pipeline.run.logs.ThrottledLines), when given, a
    progress line at most every 30 s between. The progress file goes after."""
    path, stop = RunFolder(run_dir).circuit_progress, threading.Event()
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
            phase = f"  circuit {state['index']}/{state['phases']} {state['phase']}"
            if not terminal:
                total = f" of {state['total']}" if state["total"] is not None else ""
                line = f"{phase}: {state['done']}{total} {state['unit']} done, {state['rows']} rows computed"
                if shown != (state["index"], state["phase"]) and lines is not None:
                    lines.milestone(line)
                elif shown != (state["index"], state["phase"]):
                    print(line, file=stream, flush=True)
                elif lines is not None:
                    lines.progress(line)
                shown = (state["index"], state["phase"])
                continue
            if bar is None:
                bar = tqdm(file=stream, dynamic_ncols=True, leave=False)
            if shown != (state["index"], state["phase"]):
                shown = (state["index"], state["phase"])
                bar.reset(total=state["total"])
                bar.unit = state["unit"]
                bar.set_description(phase)
            bar.total = state["total"]
            bar.n = state["done"]
            left = f", ~{state['left']:.0f}s left" if state["left"] is not None else ""
            bar.set_postfix_str(f"{state['rows']} rows computed{left}", refresh=True)
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
