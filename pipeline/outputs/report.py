"""report.md (what a person reads first) and the summary the command prints.

Both say: how many pairs the behaviour screen kept, the effects that matter most (each layer's residual,
attention and MLP output patched at a position class: the harmful tokens, the rest of the instruction,
the template's end; patches that replace the input, complete by construction, left out) with their 95%
bootstrap confidence intervals, where the residual stream carries the
effect layer by layer, the circuit and its faithfulness, the refusal direction (when selected), where the
files are and how to open the UI.
"""
from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from pipeline.analysis.circuit.result import Circuit, Knockout, Spread, StabilitySummary, TransferFaithfulness
from pipeline.analysis.directions import SUMMARY_KEY
from pipeline.analysis.positions import CLASS_TITLES, HEADLINE_CLASSES
from pipeline.analysis.statistics import MIN_PAIRS_FOR_INTERVAL, LayerPoint, interval_coverage
from pipeline.messages import redact
from pipeline.outputs.files import (
    CIRCUIT_NODES_SVG,
    CIRCUIT_SVG,
    LAYERS_PNG,
    OUTPUT_FILES,
    REPORT,
    RUN_MANIFEST,
    RunFolder,
)
from pipeline.schema import PatchsweepConfig
from pipeline.store import provenance, publish_bytes, read_table

DIRECTION_MEANING = {
    "denoise": "clean (harmful) activation patched into the harmless run: is it enough to cause refusal?",
    "noise": "harmless activation patched into the harmful run: is it needed for refusal?",
}


def _site(point_or_row) -> str:
    head, position, token = point_or_row.head, point_or_row.position, point_or_row.token
    parts = []
    if head is not None and not pd.isna(head):
        parts.append(f"head {int(head)}")
    if position is None or pd.isna(position):
        parts.append("all positions")
    else:
        parts.append(f"position {int(position)}" + (f" {token!r}" if isinstance(token, str) else ""))
    return ", ".join(parts)


def headline(summary: pd.DataFrame, k: int) -> pd.DataFrame:
    """What the run leads with: per direction, the k strongest contributions of a layer's attention or MLP
    output (or a head) patched at a position class, or in a run without them (patching.per_class) over all
    positions; patches that replace the input (statistics.replaces_input) left out. Strongest first. The
    residual stream at the classes is a state, not a contribution: `residual_by_class` reads it."""
    informative = summary[~summary["replaces_input"].astype(bool)]
    rows = informative[informative["position_class"].notna() & (informative["component"] != "resid_pre")]
    if rows.empty:
        rows = informative[informative["component"].isin(["head", "attn_out", "mlp_out"])
                           & informative["position"].isna()]
    return rows.sort_values("mean", ascending=False).groupby("direction", sort=True).head(k)


def _where(row) -> str:
    """A headline row's site: `L14 attn_out @ harmful tokens`, `L3H2` (a head over all positions)."""
    name = f"L{row.layer}H{int(row.head)}" if not pd.isna(row.head) else f"L{row.layer} {row.component}"
    return name + (f" @ {CLASS_TITLES[row.position_class]}" if isinstance(row.position_class, str) else "")


LEFT_OUT = ("patches that replace the input (the whole residual stream, or layer 0 at every token where the "
            "prompts differ) left out: their effect is complete by construction")


def residual_stream(curves: dict[tuple[str, str], list[LayerPoint]]) -> dict[str, list[list[LayerPoint]]]:
    """Per direction, the resid_pre curve cut into runs of consecutive layers whose strongest position
    is the same: where the signal sits as it moves through depth (e.g. the harmful word, then the chat
    template, then the final token)."""
    runs: dict[str, list[list[LayerPoint]]] = {}
    for (direction, component), points in sorted(curves.items()):
        if component != "resid_pre":
            continue
        # the whole stream at once replaces the input (complete by construction): no position to show
        for point in sorted((p for p in points if p.position is not None), key=lambda p: p.layer):
            groups = runs.setdefault(direction, [])
            if groups and groups[-1][-1].position == point.position:
                groups[-1].append(point)
            else:
                groups.append([point])
    return runs


def residual_by_class(summary: pd.DataFrame, threshold: float = 0.5) -> dict[str, str]:
    """Per direction, where resid_pre patched at a position class carries the effect (mean >= threshold),
    as the layers of each class: the harmful tokens early, the template's end late, where the model moves
    the decision from the request to the reply."""
    rows = summary[(summary["component"] == "resid_pre") & summary["position_class"].notna()
                   & ~summary["replaces_input"].astype(bool)]
    out = {}
    for direction, part in rows.groupby("direction", sort=True):
        texts = []
        for name in HEADLINE_CLASSES:
            at = part[part["position_class"] == name].sort_values("layer")
            if at.empty:
                continue
            carried = at[at["mean"] >= threshold]["layer"].tolist()
            best = at.loc[at["mean"].idxmax()]
            span = (f"layers {carried[0]}-{carried[-1]}" if len(carried) > 1 else f"layer {carried[0]}" if carried
                    else f"below {threshold} at every layer")
            texts.append(f"{CLASS_TITLES[name]}: {span} (peak {best['mean']:+.2f} at layer {int(best['layer'])})")
        if texts:
            out[direction] = f"effect >= {threshold} at " + "; ".join(texts)
    return out


def _run_text(run: list[LayerPoint]) -> str:
    layers = f"layer {run[0].layer}" if len(run) == 1 else f"layers {run[0].layer}-{run[-1].layer}"
    best = max(run, key=lambda p: p.mean)
    return f"{layers} at {_site(run[0])}: up to {_ci(best.mean, best.ci_low, best.ci_high)} (layer {best.layer})"


NO_INTERVAL = "n too small for an interval"


def _ci(mean: float, low: float, high: float) -> str:
    if pd.isna(low):
        return f"{mean:+.3f} ({NO_INTERVAL})"
    return f"{mean:+.3f} [{low:+.3f}, {high:+.3f}]"


def interval_line(summary: pd.DataFrame, ci: float) -> str:
    """What the `ci` intervals are worth at this run's n (the pairs every pair-wide site is measured on): none
    below the minimum, else the simulated coverage (pipeline.analysis.statistics.COVERAGE; docs/statistics.md).
    Sites fewer pairs reach (positions only long prompts have) are counted apart."""
    if summary.empty:
        return ""
    n = int(summary["n"].max())
    coverage = interval_coverage(n)
    if coverage is None:
        return (f"With n = {n} pairs, {NO_INTERVAL} (the minimum is {MIN_PAIRS_FOR_INTERVAL}: below it the "
                "bootstrap interval falls far short of its nominal coverage; see docs/statistics.md).")
    low, high = coverage
    nominal = "" if ci == 0.95 else " (simulated for 95% intervals)"
    line = (f"At n = {n} pairs, 95% intervals of this kind held the true mean in {100 * low:.0f}-{100 * high:.0f}% "
            f"of simulated runs{nominal} (normal, skewed and refusal-tiny effects; docs/statistics.md).")
    few = int((summary["n"] < MIN_PAIRS_FOR_INTERVAL).sum())
    if few:
        line += (f" {few} site{'s' if few != 1 else ''} reached by fewer than {MIN_PAIRS_FOR_INTERVAL} pairs "
                 "(positions only some prompts have) get no interval.")
    return line


def _pairs_line(report: dict) -> str:
    if not report:
        return ""
    repeats = report.get("n_duplicates", 0)
    dropped = (f" ({repeats} repeated pair{'s' if repeats != 1 else ''} dropped first: the same tokens as an "
               "earlier pair count once)" if repeats else "")
    return (f"{report['n_kept']} of {report['n_pairs']} pairs kept by the behaviour screen "
            f"({100 * report['fraction_kept']:.0f}%){dropped}: refuses harmful, complies with its harmless twin; "
            f"answer tokens {report['refusal_tokens']} vs {report['compliance_tokens']}.")


def ui_hint(cfg: PatchsweepConfig, ui_path: str = "") -> str:
    """How to open the MLflow UI on the store this run logs to (`tracking.uri`, else the output root's
    SQLite store)."""
    uri = cfg.tracking.uri
    if uri and uri.startswith(("http://", "https://")):
        return f"open {uri.rstrip('/')}/{ui_path}"
    if uri:
        command = f"`python -m pipeline.run.tracking ui --uri {uri}`"
    else:
        root = cfg.output_root
        command = (f"`{'make ui' if root == 'outputs' else f'make ui OUTPUT_ROOT={root}'}` "
                   f"(or `python -m pipeline.run.tracking ui --output-root {root}`)")
    return f"open the UI with {command}, then http://127.0.0.1:5000/{ui_path}"


def _circuit_lines(circuit: Circuit | None) -> list[str]:
    if not circuit:
        return ["No circuit in this run (circuit.json absent)."]
    nodes = [n.id for n in circuit.nodes]
    low, high = circuit.faithfulness_ci
    control, stability = circuit.random_control, circuit.stability
    return [f"{len(nodes)} nodes ({', '.join(nodes[:12])}{', ...' if len(nodes) > 12 else ''}), "
            f"{len(circuit.edges)} edges",
            f"faithfulness {circuit.faithfulness:.3f} [{low:.3f}, {high:.3f}] (CMD {circuit.cmd:.3f}, bound "
            f"{1 - circuit.method['target']:.3f}) with {100 * circuit.fraction:.1f}% of {circuit.candidates} "
            f"candidate nodes, on {circuit.n_pairs} pairs",
            *_transfer_lines(circuit.transfer),
            f"stability over {stability.n_resamples} searches on resampled pairs: {_agreement_words(stability)}; "
            f"{_trust_words(stability, circuit.method['target'])}",
            f"random circuits of the same size: faithfulness {control.mean:.3f} on average (n={control.n})"
            ] + _knockout_lines(circuit.knockout)


def _transfer_lines(transfer: TransferFaithfulness | None) -> list[str]:
    """The circuit on the transfer pairs (circuit.json's transfer)."""
    if transfer is None:
        return ["no transfer pairs in this run (prompts.transfer names a pair file to measure the circuit on)"]
    if transfer.faithfulness is None:
        return [f"transfer ({transfer.source}): no pair survived the screen"]
    low, high = transfer.faithfulness_ci
    return [f"transfer ({transfer.source}, {transfer.n_pairs} pairs the search never saw): faithfulness "
            f"{transfer.faithfulness:.3f} [{low:.3f}, {high:.3f}] (CMD {transfer.cmd:.3f})"]


def _knockout_lines(knockout: Knockout | None) -> list[str]:
    """The circuit judged by generation (circuit.json's knockout_generation), when the run has it."""
    if not knockout:
        return []
    rate = knockout.refusal_rate
    return [f"by generation ({knockout.n_pairs} harmful prompts, {knockout.max_new_tokens} greedy tokens, patched "
            f"at the prompt only): refused {100 * rate['plain']:.0f}% as they are, "
            f"{100 * rate['circuit_knocked_out']:.0f}% with the circuit knocked out "
            "(its nodes from the harmless twin), "
            f"{100 * rate['circuit_alone']:.0f}% with the circuit alone (everything else from the twin)"]


def _supernode_lines(circuit: Circuit) -> list[str]:
    """report.md's table of supernodes and the strongest path effects between them."""
    core = {n.id for n in circuit.nodes if n.core}
    lines = ["", "### Supernodes", "", "The circuit's heads (or MLPs) at one position, over nearby layers; in-circuit "
             "effect = the share of faithfulness lost when the group takes the harmless value.", "",
             "| supernode | token | nodes | core | in-circuit effect |", "|---|---|---|---|---|"]
    for group in circuit.supernodes:
        lines.append(f"| {group.id} | {group.token!r} | {len(group.members)} | "
                     f"{sum(m in core for m in group.members)} | {group.in_circuit_effect:+.3f} |")
    edges = [e for e in circuit.supernode_edges if e.drawn]
    between = sorted((e for e in edges if e.sender != e.receiver), key=lambda e: -abs(e.effect))[:10]
    within = sorted((e for e in edges if e.sender == e.receiver), key=lambda e: -abs(e.effect))
    if between:
        lines += ["", "Strongest path effects between them: " + "; ".join(
            f"{e.sender} -> {e.receiver} {e.effect:+.2f}" for e in between)]
    if within:
        lines += ["", "Within a supernode (its earlier members to its later ones): " + "; ".join(
            f"{e.sender} {e.effect:+.2f}" for e in within)]
    return lines


def _agreement_words(stability: StabilitySummary) -> str:
    words = []
    for level, found in (("node", stability.nodes), ("supernode", stability.supernodes)):
        between = found.jaccard_between_searches
        words.append(f"{level} Jaccard {between.mean:.2f} (sd {between.std:.2f})" if between else
                     f"{level} Jaccard not measured (one search)")
    return "independent searches agree at " + ", ".join(words)


def _trust_words(stability: StabilitySummary, target: float) -> str:
    """Which level of the circuit the reader can trust, from the numbers (StabilitySummary.trusted_level)."""
    bar = f"mean Jaccard between searches >= {stability.stable_jaccard:.2f} and the core alone reaching {target:.2f}"
    if stability.trusted_level == "nodes":
        return f"trust the circuit node by node ({bar})"
    if stability.trusted_level == "supernodes":
        return f"trust it by supernode (layer x kind x position class: {bar}), not node by node"
    return f"trust neither its nodes nor its supernodes as such (neither reaches {bar})"


def _stability_lines(circuit: Circuit) -> list[str]:
    """report.md's stability section: how far searches on resampled pairs agree, by node and by supernode,
    the core alone, which level to trust; then the circuit's nodes by how often those searches keep them."""
    stability = circuit.stability
    target = circuit.method["target"]
    with_circuit = ", and each with the circuit (drawn the same way)" if stability.circuit_is_a_draw else ""
    lines = ["", f"### Stability over {stability.n_resamples} searches on resampled pairs", "",
             f"How: {stability.method}; each resample's pairs are {stability.draw}. Core: the circuit's members "
             f"kept by >= {100 * stability.core_threshold:.0f}% of the resampled searches, measured alone on all "
             f"{circuit.n_pairs} pairs. Jaccard between searches: every two resampled ones"
             f"{with_circuit}.", "",
             "| level | Jaccard between searches | Jaccard to the circuit | size (median, range) | core "
             "| core alone |",
             "|---|---|---|---|---|---|"]
    for level, found, size in (("nodes", stability.nodes, circuit.size),
                               ("supernodes (layer x kind x position class)", stability.supernodes,
                                len(stability.supernode_circuit))):
        alone = ("-" if found.core_faithfulness is None else
                 f"{found.core_faithfulness:.3f} [{found.core_faithfulness_ci[0]:.3f}, "
                 f"{found.core_faithfulness_ci[1]:.3f}] ({found.core_nodes} nodes)")
        size_range = "-" if found.size_range is None else f"{found.size_median:.0f} ({found.size_range[0]}-" \
                                                         f"{found.size_range[1]})"
        lines.append(f"| {level} | {_spread(found.jaccard_between_searches)} | {_spread(found.jaccard_to_circuit)} | "
                     f"{size_range} | {len(found.core)} of {size} | {alone} |")
    lines += ["", f"Which level to trust: {_trust_words(stability, target)}.", "",
              "| node | token | inclusion frequency | single-node effect | in-circuit effect |",
              "|---|---|---|---|---|"]
    for node in sorted(circuit.nodes, key=lambda n: -n.inclusion_frequency):
        effect = "" if node.effect is None else f"{node.effect:+.3f}"
        in_circuit = "" if node.in_circuit_effect is None else f"{node.in_circuit_effect:+.3f}"
        lines.append(f"| {node.id}{' (core)' if node.core else ''} | {node.token!r} | "
                     f"{node.inclusion_frequency:.2f} | {effect} | {in_circuit} |")
    if stability.frequent_outside:
        lines += ["", "Found in at least half of the resamples but not in the circuit: " + ", ".join(
            f"{node_id} ({frequency:.2f})" for node_id, frequency in stability.frequent_outside)]
    return lines


def _spread(spread: Spread | None) -> str:
    if spread is None:
        return "-"
    return f"{spread.mean:.2f} (sd {spread.std:.2f}, {spread.min:.2f}-{spread.max:.2f})"


def _direction_lines(run_dir: Path, circuit: Circuit | None, rows_shown: int = 10) -> list[str]:
    """report.md's section on the refusal direction (direction.arrow); without one, what the run has instead."""
    path = RunFolder(run_dir).direction
    if not path.is_file():
        if circuit is None:
            return []
        readout = circuit.mean_difference
        return ["", "## Refusal direction", "",
                "None selected in this run (direction.enabled=true selects one: direction.arrow). circuit.json's "
                f"`mean_difference` holds the {readout.position}'s difference of means per layer, best at layer "
                f"{readout.best_layer} by addition and ablation: the direction the circuit's nodes are projected on, "
                "not one selected as the refusal direction."]
    table = read_table(path)
    summary = json.loads(provenance(table)[SUMMARY_KEY])
    first, last = summary["scored_layers"]
    paper = summary["paper_kl_filter"]
    lines = ["", "## Refusal direction", "",
             f"Difference-of-means candidates at each of {summary['n_layers']} layers x "
             f"{summary['n_post_instruction']} post-instruction positions (after Arditi et al. 2024), means from "
             f"{len(summary['mean_pair_ids'])} pairs, scored on the other {len(summary['score_pair_ids'])} (the "
             f"selection prompts) with `{summary['metric']}` (> 0 = refuses). Scored layers {first}..{last}; all "
             f"{summary['n_scored']} ranked by first-order estimates, the best {summary['n_verified']} of the two "
             "roles run exactly: bypass = harmful prompts with it ablated everywhere, induce = harmless prompts with "
             "it added at its layer, KL = harmless prompts' next-token distribution under ablation. Unintervened: "
             f"harmful {summary['plain_harmful_score']:+.2f}, harmless {summary['plain_harmless_score']:+.2f}. "
             f"The paper's filter KL <= {paper['max_kl']}: {paper['n_passing']} of the {paper['n_verified']} verified "
             f"candidates pass (smallest KL {_number(paper['smallest_kl'], '.3f')}); this run's budgets: KL <= "
             f"{summary['max_kl']} for ablation, cross-entropy change <= {summary['max_ce_change']} nats/token on "
             f"{summary['budget_tokens']} tokens of general text for addition.", ""]
    lines += _role_lines(summary)
    for mode, cost in summary.get("cost", {}).items():
        lines.append(f"- cost of `intervention.mode={mode}`: KL on the {cost['n_harmless']} selection harmless prompts "
                     f"{cost['kl_harmless']:.3f}; cross-entropy on the general text {cost['ce_plain']:.3f} -> "
                     f"{cost['ce_intervened']:.3f} ({cost['ce_change']:+.3f} nats/token, {cost['n_tokens']} tokens)")
    for condition, replies in summary.get("examples", {}).items():
        lines += ["", f"Replies, {condition}:", ""]
        lines += [f"- {prompt!r} -> {reply!r}" for prompt, reply in replies]
    verified = sorted((r for r in table.drop(["direction"]).to_pylist() if r["bypass_score"] is not None),
                      key=lambda r: r["bypass_score"])[:rows_shown]
    lines += ["", f"The {len(verified)} verified candidates with the lowest bypass score (all in direction.arrow):", "",
              "| layer | position | token | bypass | induce | KL | ablation role | addition role |",
              "|---|---|---|---|---|---|---|---|"]
    for r in verified:
        role = "passes" if not r["filtered"] else r["filtered"]
        if r["ablation_rank"] is not None:
            role += f" (direction {r['ablation_rank'] + 1} of the ablation)"
        token = str(r["token"]).replace("|", "\\|")  # chat tokens such as <|im_end|> hold the table's separator
        lines.append(f"| {r['layer']} | {r['position_from_end']} | `{token}` | {r['bypass_score']:+.2f} | "
                     f"{r['induce_score']:+.2f} | {r['kl']:.3f} | {role} | {'chosen' if r['addition'] else ''} |")
    return lines


def _number(x, spec: str) -> str:
    return "n/a" if x is None else format(x, spec)


def _role_lines(summary: dict) -> list[str]:
    """Which candidate does which job, at what scale and cost."""
    def where(d: dict) -> str:
        return f"layer {d['layer']}, position {d['position_from_end']} {d['token']!r}"

    ablation, addition = summary["ablation"], summary["addition"]
    lines = []
    if ablation is None:
        lines.append(f"Ablation: no verified candidate is within KL <= {summary['max_kl']} and induces refusal "
                     "(loosen direction.max_kl; every candidate's scores are in direction.arrow).")
    else:
        d = ablation["directions"][0]
        span = (f"a subspace of k = {ablation['k']} directions ({'; '.join(where(x) for x in ablation['directions'])})"
                if ablation["k"] > 1 else f"one direction, {where(d)}")
        tried = ", ".join(f"k={t['k']}: {100 * t['refused']:.0f}% refused, KL {t['kl']:.2f}" for t in ablation["tried"])
        lines.append(f"Ablation: {span}: bypass {ablation['bypass_score']:+.2f}, KL {ablation['kl']:.3f}, "
                     f"{100 * ablation['refused']:.0f}% of the selection harmful prompts still refuse by the metric "
                     f"(target <= {100 * ablation['target']:.0f}%{'' if ablation['target_met'] else ', not met'}; "
                     f"tried {tried}). Its induce score {d['induce_score']:+.2f}.")
    if addition is None:
        lines.append(f"Addition: no verified candidate induces refusal within {summary['max_ce_change']} nats/token "
                     "of cross-entropy change (loosen direction.max_ce_change).")
    else:
        lines.append(f"Addition: {where(addition)}: induce {addition['induce_score']:+.2f} at its norm, bypass "
                     f"{_number(addition['bypass_score'], '+.2f')}; scale {addition['scale']:.2f} "
                     f"({addition['multiple']} x its norm, the smallest on the grid making >= "
                     f"{100 * addition['target']:.0f}% of the selection harmless prompts refuse by the metric: "
                     f"{100 * addition['induced']:.0f}%"
                     f"{'' if addition['target_met'] else ', target not met'}), cross-entropy change "
                     f"{addition['ce_change']:+.3f} nats/token on the budget's text.")
    if ablation is not None and addition is not None:
        lines.append("One candidate serves both roles." if summary["same_candidate"] else
                     f"Two candidates: cosine {summary['cosine']:+.3f} between the ablation and addition directions.")
    return lines


def write_report(path: Path, cfg: PatchsweepConfig, model_info: dict, pairs_report: dict, stats: list,
                 summary: pd.DataFrame, curves: dict, circuit: Circuit | None) -> Path:
    run_dir = path.parent
    folder = RunFolder(run_dir)
    k = cfg.summary.top_k
    lines = [
        f"# patchsweep: {cfg.name} on {cfg.model.name}",
        "",
        f"Model `{cfg.model.path}` ({model_info['family']}, {model_info['n_layers']} layers x "
        f"{model_info['n_heads']} heads, weights sha256 `{model_info['weights_hash'][:16]}`); "
        f"metric `{cfg.patching.metric}` at the final position.",
        "",
        _pairs_line(pairs_report),
        "",
        "Effect = (patched - base) / (source - base): 0 = no change, 1 = the patch fully restores the source "
        f"run. Intervals: {100 * cfg.summary.ci:.0f}% percentile bootstrap over pairs "
        f"({cfg.summary.n_bootstrap} resamples). Positions count from the end (-1 = the final token).",
        "",
        interval_line(summary, cfg.summary.ci),
        "",
        "## What matters most",
        "",
    ]
    for direction, meaning in DIRECTION_MEANING.items():
        if direction in cfg.patching.directions:
            lines.append(f"- `{direction}`: {meaning}")
    strongest = headline(summary, k)
    if not strongest.empty:
        by_class = strongest["position_class"].notna().any()
        lines += ["", ("Each layer's residual, attention and MLP output patched at one position class at once (the "
                       "harmful tokens, the rest of the instruction, the template's end)" if by_class else
                       "Attention and MLP outputs (and heads, when swept) patched at all positions")
                  + f", strongest first; {LEFT_OUT}:", "",
                  "| direction | component | layer | head | positions | effect [95% CI] | n |",
                  "|---|---|---|---|---|---|---|"]
        for r in strongest.itertuples():
            head = "" if pd.isna(r.head) else int(r.head)
            where = CLASS_TITLES[r.position_class] if isinstance(r.position_class, str) else "all"
            lines.append(f"| {r.direction} | {r.component} | {r.layer} | {head} | {where} "
                         f"| {_ci(r.mean, r.ci_low, r.ci_high)} | {r.n} |")
    runs, by_class = residual_stream(curves), residual_by_class(summary)
    if runs or by_class:
        lines += ["", "## The residual stream", "",
                  "Where resid_pre carries the effect, layer by layer: at each position class, and the position whose "
                  "patch moves the metric most (full curves: MLflow metrics with step = layer; heatmaps below).", ""]
        for direction, text in by_class.items():
            lines.append(f"- `{direction}` by position class: {text}")
        for direction, groups in runs.items():
            lines.append(f"- `{direction}`: " + "; ".join(_run_text(run) for run in groups))
    lines += ["", "## Circuit", ""] + _circuit_lines(circuit)
    if circuit and (folder / CIRCUIT_SVG).is_file():
        lines += ["", f"![circuit]({CIRCUIT_SVG.name})"]
    if circuit:
        lines += _supernode_lines(circuit) + _stability_lines(circuit)
    if circuit and (folder / CIRCUIT_NODES_SVG).is_file():
        lines += ["",
                  "Every node (outer colour: in-circuit effect; inner dot: single-node effect; solid outline: core):",
                  "", f"![circuit nodes]({CIRCUIT_NODES_SVG.name})"]
    lines += _direction_lines(run_dir, circuit)
    lines += ["", "## Heatmaps", "", f"![layers]({LAYERS_PNG.name})", "", "## Files", "", "| file | contents |",
              "|---|---|"]
    for file in OUTPUT_FILES:
        if (folder / file).exists() or file in (REPORT, RUN_MANIFEST):
            lines.append(f"| `{file.name}` | {file.contents} |")
    lines += ["", "## Compute", "", "| stage | work items computed | reused | retried | seconds |",
              "|---|---|---|---|---|"]
    for s in stats:
        lines.append(f"| {s.stage} | {s.computed} | {s.reused} | {s.retried} | {s.seconds:.1f} |")
    lines += ["", "## MLflow", "", f"Experiment `{cfg.tracking.experiment}`, run `{cfg.model.name}`: "
              f"{ui_hint(cfg)}.", ""]
    publish_bytes(path, redact("\n".join(lines)).encode())
    return path


def console_summary(cfg: PatchsweepConfig, run_dir: Path, pairs_report: dict, stats: list, curves: dict,
                    summary: pd.DataFrame, circuit: Circuit | None, tracking: dict | None) -> str:
    k = cfg.summary.top_k
    lines = [f"patchsweep {cfg.name}: {cfg.model.name}", "  " + _pairs_line(pairs_report)]
    strongest = headline(summary, k)
    if not strongest.empty:
        what = ("per layer and position class" if strongest["position_class"].notna().any()
                else "attention / MLP outputs per layer")
        lines.append(f"What matters most ({what}; effect [{100 * cfg.summary.ci:.0f}% CI]; input-replacing "
                     "patches left out):")
        lines.append(f"  {interval_line(summary, cfg.summary.ci)}")
        for r in strongest.itertuples():
            lines.append(f"  {r.direction:<8} {_where(r):<36} {_ci(r.mean, r.ci_low, r.ci_high)}  n={r.n}")
    by_class = residual_by_class(summary)
    if by_class:
        lines.append("Residual stream by position class (resid_pre patched at each class at once):")
        lines += [f"  {direction:<8} {text}" for direction, text in by_class.items()]
    runs = residual_stream(curves)
    if runs:
        lines.append("Residual stream (resid_pre: the strongest position, layer by layer):")
        for direction, groups in runs.items():
            lines += [f"  {direction:<8} {_run_text(run)}" for run in groups]
    lines += ["Circuit: " + "; ".join(_circuit_lines(circuit)), ""]
    work = ", ".join(f"{s.stage} {s.computed} computed/{s.reused} reused"
                     + (f"/{s.retried} retried" if s.retried else "") + f" {s.seconds:.1f}s" for s in stats)
    lines += [f"Work: {work}", f"Files: {run_dir.resolve()}  (report.md first)"]
    if tracking:
        lines.append(f"MLflow: {tracking['uri']}  run {tracking['run_id']}")
        lines.append(f"  {ui_hint(cfg, tracking['ui_path'])}")
    return redact("\n".join(lines))
