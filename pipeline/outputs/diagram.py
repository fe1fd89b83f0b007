"""The circuit diagrams (circuit.svg/png: supernodes; circuit_nodes.svg/png: every node) and the Graphviz
DOT export (circuit.dot).

Both put positions along the bottom (the harmful tokens, the rest of the instruction, then each chat
template token up to the final one; a position holding no node is left out) and layers upward, the harmful
tokens' embeddings below layer 0 (an input: edges from it are measured too) and the refusal logit at the top
above the final token. Arrows are path effects: red where the path carries refusal, blue where it works
against it, wider and darker the larger it is (a legend below gives the scale), the strongest labelled with
their value. Labels are sized to fit: a supernode's inside its box, a node's beside its row.

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

from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import TwoSlopeNorm, to_rgb  # noqa: E402
from matplotlib.lines import Line2D  # noqa: E402
from matplotlib.patches import FancyArrowPatch, FancyBboxPatch  # noqa: E402

from pipeline.analysis.circuit.result import Circuit, CircuitNode, Edge, Position  # noqa: E402
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
POSITIVE, NEGATIVE = "#b2182b", "#2166ac"  # a path effect's sign: toward refusal, against it
LABELLED_EDGES = 12  # the strongest edges carry their value
LABEL_MAX, LABEL_MIN, LABEL_COMFORTABLE = 9.0, 5.0, 7.0  # points


def _norm(values: list[float]) -> TwoSlopeNorm:
    bound = max([abs(v) for v in values] + [1e-3])
    return TwoSlopeNorm(vcenter=0.0, vmin=-bound, vmax=bound)


def columns(circuit: Circuit) -> list[Position]:
    """The positions drawn: those holding a node or an edge's embeddings, and the final one (the logit)."""
    used = {n.position for n in circuit.nodes} | {circuit.positions[-1].name}
    used |= {e.sender[4:] for e in circuit.edges + circuit.supernode_edges if e.sender.startswith("EMB@")}
    return [p for p in circuit.positions if p.name in used]


def _column_of(circuit: Circuit) -> dict[str, int]:
    return {p.name: i for i, p in enumerate(columns(circuit))}


def _axes(circuit: Circuit, title: str):
    """A figure with the positions x layers grid, the embeddings and the logits marked; returns it with
    the logit's place and the height of a layer in points."""
    drawn, n_layers = columns(circuit), circuit.n_layers
    per_layer = 0.9 if n_layers <= 8 else max(0.42, 8.0 / n_layers)  # inches: room for a row of labels
    fig, ax = plt.subplots(figsize=(max(7.0, 2.6 * len(drawn) + 3.5), max(4.5, per_layer * n_layers + 3.0)),
                           layout="constrained")
    ax.set_xticks(range(len(drawn)))
    ax.set_xticklabels([_readable(p.label) for p in drawn], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(n_layers))
    ax.set_yticklabels([f"L{layer}" for layer in range(n_layers)], fontsize=8)
    ax.set_xlim(-0.7, len(drawn) - 0.3)
    ax.set_ylim(-1.3, n_layers + 0.8)
    ax.grid(True, color="#eeeeee", zorder=0)
    ax.set_xlabel("position (counted from the end; earlier tokens are the same in both prompts; positions without "
                  "a node left out)", fontsize=8)
    random, stability = circuit.random_control, circuit.stability
    ax.set_title(
        f"{circuit.model or 'model'}: {circuit.size} of {circuit.candidates} nodes, faithfulness "
        f"{circuit.faithfulness:.2f} [{circuit.faithfulness_ci[0]:.2f}, {circuit.faithfulness_ci[1]:.2f}] on "
        f"{circuit.n_pairs} pairs; core {stability.core_size}/{circuit.size} (in >= "
        f"{100 * stability.core_threshold:.0f}% of {stability.n_resamples} resamples)\n"
        f"random circuits of this size: {random.mean:.2f} ± {random.std:.2f}; {title}", fontsize=9)
    lx, ly = len(drawn) - 1, n_layers + 0.3
    ax.scatter([lx], [ly], s=500, marker="h", c="#fee090", edgecolors="black", zorder=3)
    ax.annotate("refusal\nlogit", (lx, ly), ha="center", va="center", fontsize=7, zorder=4)
    return fig, ax, (lx, ly), 72.0 * per_layer


def _tokens_xy(circuit: Circuit) -> tuple[float, float]:
    return _column_of(circuit)["harm"], -0.8


def _draw_tokens(ax, xy) -> None:
    ax.scatter([xy[0]], [xy[1]], s=300, marker="D", c="#d9d9d9", edgecolors="black", zorder=3)
    ax.annotate("harmful tokens", xy, xytext=(11, 0), textcoords="offset points", ha="left", va="center", fontsize=7,
                zorder=4)


def _edge_width(relative: float) -> float:
    return 0.6 + 4.4 * relative


@dataclass(frozen=True)
class EdgeLabel:
    """An edge's value, to be written along it once the figure's layout is fixed."""
    start: tuple[float, float]
    end: tuple[float, float]
    text: str
    colour: str


def _draw_edges(ax, edges: tuple[Edge, ...], xy: dict, shrink: float = 9) -> tuple[float, list[EdgeLabel]]:
    """Arrows for the drawn edges between placed ends; returns the largest |effect| and the labels of the
    strongest edges, strongest first."""
    drawn = [e for e in edges if e.drawn and e.sender in xy and e.receiver in xy and e.sender != e.receiver]
    widest = max([abs(e.effect) for e in drawn] + [1e-9])
    for edge in sorted(drawn, key=lambda e: abs(e.effect)):
        relative = abs(edge.effect) / widest
        ax.add_patch(FancyArrowPatch(xy[edge.sender], xy[edge.receiver], arrowstyle="-|>", mutation_scale=10,
                                     linewidth=_edge_width(relative), color=_sign_colour(edge.effect),
                                     alpha=0.3 + 0.5 * relative, shrinkA=shrink, shrinkB=shrink,
                                     connectionstyle="arc3,rad=0.08", zorder=1))
    strongest = sorted(drawn, key=lambda e: -abs(e.effect))[:LABELLED_EDGES]
    return widest, [EdgeLabel(xy[e.sender], xy[e.receiver], f"{e.effect:+.2f}", _sign_colour(e.effect))
                    for e in strongest]


def _sign_colour(effect: float) -> str:
    return POSITIVE if effect > 0 else NEGATIVE


def _write_edge_labels(ax, renderer, labels: list[EdgeLabel]) -> None:
    """Each label at the first place along its edge (from the middle outward) where it covers no text
    already written; a label with no such place is left out (the legend gives the scale)."""
    taken = [t.get_window_extent(renderer) for t in ax.texts]
    for label in labels:
        (x0, y0), (x1, y1) = label.start, label.end
        for along in (0.5, 0.38, 0.62, 0.26, 0.74):
            text = ax.text(x0 + along * (x1 - x0), y0 + along * (y1 - y0), label.text, color=label.colour,
                           fontsize=6.5, ha="center", va="center", zorder=6, label="edge-label",
                           bbox={"boxstyle": "round,pad=0.15", "facecolor": "white", "edgecolor": "none",
                                 "alpha": 0.85})
            extent = text.get_window_extent(renderer)
            if not any(extent.overlaps(other) for other in taken):
                taken.append(extent)
                break
            text.remove()


def _edge_legend(fig, widest: float) -> None:
    """The scale of the arrows, below the plot."""
    handles = [Line2D([], [], color=POSITIVE, alpha=0.8, linewidth=_edge_width(1.0),
                      label=f"{widest:+.2f}: carries refusal"),
               Line2D([], [], color=POSITIVE, alpha=0.55, linewidth=_edge_width(0.5), label=f"{widest / 2:+.2f}"),
               Line2D([], [], color=NEGATIVE, alpha=0.55, linewidth=_edge_width(0.5),
                      label=f"{-widest / 2:+.2f}: works against it")]
    fig.legend(handles=handles, loc="outside lower center", ncols=len(handles), fontsize=7, title_fontsize=7,
               title="path effect (share of the refusal gap along the path; the strongest are labelled)")


def _fit_text(ax, renderer, centre: tuple[float, float], variants: list[str], box, colour: str, name: str):
    """Write in `box` (a window extent) the first of `variants` (fullest first), upright or turned, that fits
    at a comfortable size, else the one that fits largest (at least LABEL_MIN points)."""
    options = [(text, rotation) for text in variants for rotation in (0, 90)]
    sizes = {option: _fitting_size(ax, renderer, centre, *option, box) for option in options}
    text, rotation = next((o for o in options if sizes[o] >= LABEL_COMFORTABLE), max(options, key=sizes.get))
    return ax.text(*centre, text, rotation=rotation, fontsize=max(sizes[text, rotation], LABEL_MIN), ha="center",
                   va="center", color=colour, zorder=5, label=name)


def _fitting_size(ax, renderer, centre: tuple[float, float], text: str, rotation: int, box) -> float:
    """The font size (points, at most LABEL_MAX) at which `text` fills 90% of `box` in its tighter direction."""
    probe = ax.text(*centre, text, rotation=rotation, fontsize=LABEL_MAX, ha="center", va="center")
    extent = probe.get_window_extent(renderer)
    probe.remove()
    return LABEL_MAX * min(1.0, 0.9 * box.width / extent.width, 0.9 * box.height / extent.height)


def _ink(face) -> str:
    """Black or white, whichever reads on `face`."""
    r, g, b = to_rgb(face)
    return "black" if 0.299 * r + 0.587 * g + 0.114 * b > 0.5 else "white"


def _freeze_layout(fig):
    """Lay the figure out once and keep it, so that the labels sized to their boxes stay fitted."""
    fig.canvas.draw()
    fig.set_layout_engine("none")
    return fig.canvas.get_renderer()


# ---- supernodes (the main figure) -------------------------------------------------------------------

def group_layout(circuit: Circuit) -> dict[str, tuple[float, float, float, float]]:
    """Supernode id -> (x, y_low, y_high, width): heads left of their column, MLPs right of it."""
    column = _column_of(circuit)
    out = {}
    for group in circuit.supernodes:
        x = column[group.position] + (-0.2 if group.component == "head" else 0.2)
        low, high = group.layers
        offset = 0.5 if group.component == "mlp" else 0.0
        out[group.id] = (x, low + offset - 0.3, high + offset + 0.3, 0.36)
    return out


def draw_groups(circuit: Circuit):
    """The supernode diagram as a matplotlib figure."""
    fig, ax, logits_xy, _ = _axes(circuit, "boxes: supernodes, arrows: path effects between them")
    core = {n.id for n in circuit.nodes if n.core}
    norm, cmap = _norm([g.in_circuit_effect for g in circuit.supernodes]), plt.get_cmap(CMAP)
    boxes, centres, patches = group_layout(circuit), {LOGITS: logits_xy}, {}
    for group in circuit.supernodes:
        x, low, high, width = boxes[group.id]
        all_core = all(m in core for m in group.members)
        patches[group.id] = ax.add_patch(FancyBboxPatch(
            (x - width / 2, low), width, high - low, boxstyle="round,pad=0.02,rounding_size=0.08",
            facecolor=cmap(norm(group.in_circuit_effect)), edgecolor="black", linewidth=1.4 if all_core else 0.9,
            linestyle="-" if all_core else "--", zorder=2, label=f"box:{group.id}"))
        centres[group.id] = (x, (low + high) / 2)
    if any(e.sender == TOKENS for e in circuit.supernode_edges):
        centres[TOKENS] = _tokens_xy(circuit)
        _draw_tokens(ax, centres[TOKENS])
    widest, edge_labels = _draw_edges(ax, circuit.supernode_edges, centres, shrink=12)
    ax.set_ylabel("layer (heads left of a column, MLPs right)", fontsize=8)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, shrink=0.7,
                 label="in-circuit effect (share of faithfulness lost without the group)")
    _edge_legend(fig, widest)
    renderer = _freeze_layout(fig)
    for group in circuit.supernodes:
        n_core = sum(m in core for m in group.members)
        kind = "heads" if group.component == "head" else "MLPs"
        effect = f"in-circuit {group.in_circuit_effect:+.2f}"
        variants = [f"{group.id}\n{len(group.members)} {kind}, core {n_core}\n{effect}", f"{group.id}\n{effect}",
                    group.id]
        _fit_text(ax, renderer, centres[group.id], variants, patches[group.id].get_window_extent(renderer),
                  _ink(cmap(norm(group.in_circuit_effect))), name=f"label:{group.id}")
    _write_edge_labels(ax, renderer, edge_labels)
    return fig


# ---- every node (the second figure) ------------------------------------------------------------------

def layout(circuit: Circuit) -> dict[str, tuple[float, float]]:
    """Node id -> (x, y): x = position column (heads of one layer and position side by side), y = layer
    (+0.5 for MLPs); embeddings (EMB@class) below layer 0; the logits above the final position."""
    column = _column_of(circuit)
    cells: dict[tuple, list[CircuitNode]] = {}
    for node in circuit.nodes:
        cells.setdefault((node.position, node.layer, node.component), []).append(node)
    xy = {}
    for (position, layer, component), members in cells.items():
        members.sort(key=lambda n: n.head if n.head is not None else -1)
        width = min(0.6, 0.2 * (len(members) - 1))
        for i, node in enumerate(members):
            offset = -width / 2 + (width * i / (len(members) - 1) if len(members) > 1 else 0)
            xy[node.id] = (column[position] + offset, layer + (0.5 if component == "mlp" else 0.0))
    xy[LOGITS] = (len(column) - 1, circuit.n_layers + 0.3)
    for edge in circuit.edges:
        if edge.sender.startswith("EMB@"):
            xy[edge.sender] = (column[edge.sender[4:]], -0.8)
    return xy


def _effect(node: CircuitNode) -> float:
    value = node.effect if node.effect is not None else node.attribution
    return float(value or 0.0)


def draw(circuit: Circuit):
    """The node diagram as a matplotlib figure. A row (heads, or the MLP half a layer above) gets one label,
    heads' on the left of the row and the MLP's on its right, both sized to the row's height."""
    fig, ax, _, layer_pt = _axes(circuit, "outer colour: in-circuit effect, inner dot: single-node effect, "
                                          "solid outline: core")
    xy = layout(circuit)
    in_circuit = [float(n.in_circuit_effect or 0.0) for n in circuit.nodes]
    single = [_effect(n) for n in circuit.nodes]
    norm, cmap = _norm(in_circuit + single), plt.get_cmap(CMAP)
    widest, edge_labels = _draw_edges(ax, circuit.edges, xy)
    diameter = min(11.5, 0.42 * layer_pt)  # points: a head and the MLP half a layer above stay apart
    font = min(7.0, 0.45 * layer_pt)
    labels: dict[tuple, list] = {}  # one label per (layer, position, component): "L21.H0,1,4" / "L21.MLP"
    for node, outer, inner in zip(circuit.nodes, in_circuit, single):
        x, y = xy[node.id]
        marker = "o" if node.component == "head" else "s"
        ax.scatter([x], [y], s=diameter ** 2, c=[cmap(norm(outer))], marker=marker, edgecolors="black",
                   linewidths=1.1 if node.core else 0.8, linestyle="-" if node.core else "--", zorder=3)
        ax.scatter([x], [y], s=(diameter * 0.45) ** 2, c=[cmap(norm(inner))], marker=marker, edgecolors="none",
                   zorder=4)
        labels.setdefault((node.layer, node.position, node.component), []).append((x, y, node.head))
    for (layer, position, component), members in labels.items():
        y = members[0][1]
        if component == "mlp":
            ax.annotate(f"L{layer}.MLP", (members[0][0], y), xytext=(diameter / 2 + 3, 0), textcoords="offset points",
                        ha="left", va="center", fontsize=font, zorder=5, label=f"label:L{layer}.MLP@{position}")
        else:
            text = f"L{layer}.H" + ",".join(str(m[2]) for m in members)
            ax.annotate(text, (min(m[0] for m in members), y), xytext=(-diameter / 2 - 3, 0),
                        textcoords="offset points", ha="right", va="center", fontsize=font, zorder=5,
                        label=f"label:L{layer}.heads@{position}")
    for name, point in xy.items():
        if name.startswith("EMB@"):
            _draw_tokens(ax, point)
    ax.set_ylabel("layer (heads on the row, MLP half a row above)", fontsize=8)
    fig.colorbar(plt.cm.ScalarMappable(norm=norm, cmap=cmap), ax=ax, shrink=0.7,
                 label="effect (share of faithfulness / of the refusal gap)")
    _edge_legend(fig, widest)
    _write_edge_labels(ax, _freeze_layout(fig), edge_labels)
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
