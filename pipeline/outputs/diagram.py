"""The circuit diagrams (circuit.svg/png: supernodes; circuit_nodes.svg/png: every node) and the Graphviz
DOT export (circuit.dot).

Both put positions along the bottom (the harmful tokens, the rest of the instruction, then each chat
template token up to the final one) and layers upward, the harmful tokens' embeddings below layer 0 (an
input: edges from it are measured too) and the refusal logit at the top above the final token.

The main figure draws supernodes: a circuit's heads (or MLPs) at one position class over nearby layers,
as a box spanning those layers. Its colour is its in-circuit effect (the share of the faithfulness lost
when the whole group takes the harmless value, the rest of the circuit kept); a solid outline marks a
group whose every member is a core node (kept in most bootstrap resamples of the pairs), a dashed one
the rest; arrows are path effects between groups (a group's paths among its own members are in
circuit.json and the report, not drawn). The node figure draws every node: its outer colour is
its in-circuit effect, its inner dot its single-node effect (the share of the refusal gap lost when it
alone takes the harmless value), the outline solid for core nodes. Everything is drawn from circuit.json.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from pipeline.analysis.circuit.result import Circuit, CircuitNode, Edge  # noqa: E402
from pipeline.outputs.files import (  # noqa: E402
    CIRCUIT_DOT,
    CIRCUIT_NODES_PNG,
    CIRCUIT_NODES_SVG,
    CIRCUIT_PNG,
    CIRCUIT_SVG,
    RunFolder,
)
from pipeline.store import publish_bytes, publish_file  # noqa: E402

CMAP = "RdBu_r"
LOGITS = "logits"
TOKENS = "EMB@harm"


def _norm(values: list[float]) -> TwoSlopeNorm:
    bound = max([abs(v) for v in values] + [1e-3])
    return TwoSlopeNorm(vcenter=0.0, vmin=-bound, vmax=bound)


def _axes(circuit: Circuit, title: str):
    """A figure with the positions x layers grid, the embeddings and the logits marked."""
    n_positions, n_layers = len(circuit.positions), circuit.n_layers
    per_layer = 0.9 if n_layers <= 8 else max(0.35, 8.0 / n_layers)  # inches: deep models stay one page tall
    fig, ax = plt.subplots(figsize=(max(6.0, 1.9 * n_positions + 3.0), max(4.5, per_layer * n_layers + 2.5)),
                           layout="constrained")
    ax.set_xticks(range(n_positions))
    ax.set_xticklabels([_readable(p.label) for p in circuit.positions], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(n_layers))
    ax.set_yticklabels([f"L{layer}" for layer in range(n_layers)], fontsize=8)
    ax.set_xlim(-0.7, n_positions - 0.3)
    ax.set_ylim(-1.3, n_layers + 0.8)
    ax.grid(True, color="#eeeeee", zorder=0)
    ax.set_xlabel("position (counted from the end; earlier tokens are the same in both prompts)", fontsize=8)
    random, stability = circuit.random_control, circuit.stability
    ax.set_title(
        f"{circuit.model or 'model'}: {circuit.size} of {circuit.candidates} nodes, faithfulness "
        f"{circuit.faithfulness:.2f} [{circuit.faithfulness_ci[0]:.2f}, {circuit.faithfulness_ci[1]:.2f}] on "
        f"{circuit.n_pairs} pairs; core {stability.core_size}/{circuit.size} (in >= "
        f"{100 * stability.core_threshold:.0f}% of {stability.n_resamples} resamples)\n"
        f"random circuits of this size: {random.mean:.2f} ± {random.std:.2f}; {title}", fontsize=9)
    lx, ly = len(circuit.positions) - 1, n_layers + 0.3
    ax.scatter([lx], [ly], s=500, marker="h", c="#fee090", edgecolors="black", zorder=3)
    ax.annotate("refusal\nlogit", (lx, ly), ha="center", va="center", fontsize=7, zorder=4)
    return fig, ax, (lx, ly)


def _tokens_xy(circuit: Circuit) -> tuple[float, float]:
    return [p.name for p in circuit.positions].index("harm"), -0.8


def _draw_tokens(ax, xy) -> None:
    ax.scatter([xy[0]], [xy[1]], s=300, marker="D", c="#d9d9d9", edgecolors="black", zorder=3)
    ax.annotate("harmful tokens", xy, xytext=(11, 0), textcoords="offset points", ha="left", va="center", fontsize=7,
                zorder=4)


def _draw_edges(ax, edges: tuple[Edge, ...], xy: dict, shrink: float = 9) -> None:
    drawn = [e for e in edges if e.drawn and e.sender in xy and e.receiver in xy and e.sender != e.receiver]
    widest = max([abs(e.effect) for e in drawn] + [1e-9])
    for edge in sorted(drawn, key=lambda e: abs(e.effect)):
        colour = "#b2182b" if edge.effect > 0 else "#2166ac"
        ax.add_patch(FancyArrowPatch(xy[edge.sender], xy[edge.receiver], arrowstyle="-|>", mutation_scale=10,
                                     linewidth=0.6 + 5.0 * abs(edge.effect) / widest, color=colour, alpha=0.55,
                                     shrinkA=shrink, shrinkB=shrink, connectionstyle="arc3,rad=0.08", zorder=1))


# ---- supernodes (the main figure) -------------------------------------------------------------------

def group_layout(circuit: Circuit) -> dict[str, tuple[float, float, float, float]]:
    """Supernode id -> (x, y_low, y_high, width): heads left of their column, MLPs right of it."""
    columns = {p.name: i for i, p in enumerate(circuit.positions)}
    out = {}
    for group in circuit.supernodes:
        x = columns[group.position] + (-0.18 if group.component == "head" else 0.18)
        low, high = group.layers
        offset = 0.5 if group.component == "mlp" else 0.0
        out[group.id] = (x, low + offset - 0.3, high + offset + 0.3, 0.3)
    return out


def draw_groups(circuit: Circuit):
    """The supernode diagram as a matplotlib figure."""
    fig, ax, logits_xy = _axes(circuit, "boxes: supernodes, arrows: path effects between them")
    core = {n.id for n in circuit.nodes if n.core}
    norm, cmap = _norm([g.in_circuit_effect for g in circuit.supernodes]), plt.get_cmap(CMAP)
    boxes, centres = group_layout(circuit), {LOGITS: logits_xy}
    for group in circuit.supernodes:
        x, low, high, width = boxes[group.id]
        all_core = all(m in core for m in group.members)
        ax.add_patch(FancyBboxPatch((x - width / 2, low), width, high - low,
                                    boxstyle="round,pad=0.02,rounding_size=0.08",
                                    facecolor=cmap(norm(group.in_circuit_effect)), edgecolor="black",
                                    linewidth=1.4 if all_core else 0.9, linestyle="-" if all_core else "--", zorder=2))
        n_core = sum(m in core for m in group.members)
        kind = "heads" if group.component == "head" else "MLPs"
        ax.annotate(f"{group.id}\n{len(group.members)} {kind}, core {n_core}\n"
                    f"in-circuit {group.in_circuit_effect:+.2f}",
                    (x + width / 2, (low + high) / 2), xytext=(4, 0), textcoords="offset points", ha="left",
                    va="center", fontsize=6, zorder=4)
        centres[group.id] = (x, (low + high) / 2)
    if any(e.sender == TOKENS for e in circuit.supernode_edges):
        centres[TOKENS] = _tokens_xy(circuit)
        _draw_tokens(ax, centres[TOKENS])
    _draw_edges(ax, circuit.supernode_edges, centres, shrink=12)
    ax.set_ylabel("layer (heads left of a column, MLPs right)", fontsize=8)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, shrink=0.7,
                 label="in-circuit effect (share of faithfulness lost without the group)")
    return fig


# ---- every node (the second figure) ------------------------------------------------------------------

def layout(circuit: Circuit) -> dict[str, tuple[float, float]]:
    """Node id -> (x, y): x = position column (heads of one layer and position side by side), y = layer
    (+0.5 for MLPs); embeddings (EMB@class) below layer 0; the logits above the final position."""
    columns = {p.name: i for i, p in enumerate(circuit.positions)}
    cells: dict[tuple, list[CircuitNode]] = {}
    for node in circuit.nodes:
        cells.setdefault((node.position, node.layer, node.component), []).append(node)
    xy = {}
    for (position, layer, component), members in cells.items():
        members.sort(key=lambda n: n.head if n.head is not None else -1)
        width = min(0.7, 0.22 * (len(members) - 1))
        for i, node in enumerate(members):
            offset = -width / 2 + (width * i / (len(members) - 1) if len(members) > 1 else 0)
            xy[node.id] = (columns[position] + offset, layer + (0.5 if component == "mlp" else 0.0))
    xy[LOGITS] = (len(columns) - 1, circuit.n_layers + 0.3)
    for edge in circuit.edges:
        if edge.sender.startswith("EMB@"):
            xy[edge.sender] = (columns[edge.sender[4:]], -0.8)
    return xy


def _effect(node: CircuitNode) -> float:
    value = node.effect if node.effect is not None else node.attribution
    return float(value or 0.0)


def draw(circuit: Circuit):
    """The node diagram as a matplotlib figure."""
    fig, ax, _ = _axes(circuit, "outer colour: in-circuit effect, inner dot: single-node effect, "
                                "solid outline: core; edge width = path effect")
    xy = layout(circuit)
    in_circuit = [float(n.in_circuit_effect or 0.0) for n in circuit.nodes]
    single = [_effect(n) for n in circuit.nodes]
    norm, cmap = _norm(in_circuit + single), plt.get_cmap(CMAP)
    _draw_edges(ax, circuit.edges, xy)
    labels: dict[tuple, list] = {}  # one label per (layer, position, component): "L21.H0,1,4" / "L21.MLP"
    for node, outer, inner in zip(circuit.nodes, in_circuit, single):
        x, y = xy[node.id]
        marker = "o" if node.component == "head" else "s"
        ax.scatter([x], [y], s=130, c=[cmap(norm(outer))], marker=marker, edgecolors="black",
                   linewidths=1.1 if node.core else 0.8, linestyle="-" if node.core else "--", zorder=3)
        ax.scatter([x], [y], s=28, c=[cmap(norm(inner))], marker=marker, edgecolors="none", zorder=4)
        labels.setdefault((node.layer, node.position, node.component), []).append((x, y, node.head))
    for (layer, _, component), members in labels.items():
        x, y = max(m[0] for m in members), members[0][1]
        text = f"L{layer}.MLP" if component == "mlp" else f"L{layer}.H" + ",".join(str(m[2]) for m in members)
        ax.annotate(text, (x, y), xytext=(8, 3), textcoords="offset points", ha="left", va="bottom", fontsize=6.5,
                    zorder=5)
    for name, point in xy.items():
        if name.startswith("EMB@"):
            _draw_tokens(ax, point)
    ax.set_ylabel("layer (heads on the row, MLP half a row above)", fontsize=8)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, shrink=0.7,
                 label="effect (share of faithfulness / of the refusal gap)")
    return fig


def to_dot(circuit: Circuit) -> str:
    """Graphviz DOT: a cluster per supernode, one rank per layer (bottom to top), node fill by in-circuit
    effect, dashed outline off the core, edge width by path effect."""
    lines = ["digraph circuit {", "  rankdir=BT;", '  node [style=filled, fontsize=10, fontname="Helvetica"];',
             f'  label="{circuit.model or "model"}: faithfulness {circuit.faithfulness:.3f}, '
             f'{circuit.size} of {circuit.candidates} nodes, core {circuit.stability.core_size}"; labelloc=t;']
    cmap = plt.get_cmap(CMAP)
    bound = max([abs(float(n.in_circuit_effect or 0.0)) for n in circuit.nodes] + [1e-3])
    nodes = {n.id: n for n in circuit.nodes}
    for g, group in enumerate(circuit.supernodes):
        lines.append(f'  subgraph cluster_{g} {{ label="{_escape(group.id)}"; style=rounded;')
        for member in group.members:
            node = nodes[member]
            effect = float(node.in_circuit_effect or 0.0)
            r, gr, b, _ = cmap(0.5 + 0.5 * effect / bound)
            colour = f"#{int(255 * r):02x}{int(255 * gr):02x}{int(255 * b):02x}"
            shape = "ellipse" if node.component == "head" else "box"
            style = "filled" if node.core else '"filled,dashed"'
            label = "\\n".join(_escape(part) for part in (node.id, _readable(node.token),
                                                          f"in-circuit {effect:+.2f}",
                                                          f"seen {node.inclusion_frequency:.2f}"))
            lines.append(f'    "{node.id}" [label="{label}", shape={shape}, fillcolor="{colour}", style={style}];')
        lines.append("  }")
    lines.append(f'  "{LOGITS}" [label="refusal logit", shape=hexagon, fillcolor="#fee090"];')
    for sender in sorted({e.sender for e in circuit.edges if e.sender.startswith("EMB@")}):
        lines.append(f'  "{sender}" [label="{sender[4:]} tokens (embedding)", shape=diamond, fillcolor="#d9d9d9"];')
    by_layer: dict[int, list[str]] = {}
    for node in circuit.nodes:
        by_layer.setdefault(node.layer, []).append(node.id)
    for layer in sorted(by_layer):
        members = " ".join(f'"{i}"' for i in by_layer[layer])
        lines.append(f"  {{ rank=same; {members} }}")
    drawn = [e for e in circuit.edges if e.drawn]
    widest = max([abs(e.effect) for e in drawn] + [1e-9])
    for edge in drawn:
        colour = "#b2182b" if edge.effect > 0 else "#2166ac"
        width = 0.5 + 5.0 * abs(edge.effect) / widest
        lines.append(f'  "{edge.sender}" -> "{edge.receiver}" [penwidth={width:.2f}, color="{colour}", '
                     f'label="{edge.effect:+.2f}", fontsize=8];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _readable(token: str) -> str:
    """Byte-level BPE spells a newline "Ċ" and a leading space "Ġ"."""
    return token.replace("Ċ", "\\n").replace("Ġ", "␣")


def _escape(text: str) -> str:
    """Text inside a DOT string: backslashes and quotes escaped."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


def render_circuit(circuit: Circuit, out_dir: str | Path) -> dict[str, Path]:
    """Write circuit.svg/png (supernodes), circuit_nodes.svg/png (every node) and circuit.dot into out_dir
    (each published atomically)."""
    folder = RunFolder(out_dir)
    paths = {}
    for (svg, png), figure in (((CIRCUIT_SVG, CIRCUIT_PNG), draw_groups(circuit)),
                               ((CIRCUIT_NODES_SVG, CIRCUIT_NODES_PNG), draw(circuit))):
        paths[svg.name], paths[png.name] = folder / svg, folder / png
        publish_file(folder / svg, lambda tmp, fig=figure: fig.savefig(tmp, format="svg"))
        publish_file(folder / png, lambda tmp, fig=figure: fig.savefig(tmp, format="png", dpi=130))
        plt.close(figure)
    paths[CIRCUIT_DOT.name] = folder / CIRCUIT_DOT
    publish_bytes(folder / CIRCUIT_DOT, to_dot(circuit).encode())
    return paths
