"""The circuit diagram (circuit.svg, circuit.png) and its Graphviz DOT export (circuit.dot).

Positions run along the bottom (the harmful tokens, the rest of the instruction, then each chat
template token up to the final one), layers upward (a layer's heads at its row, its MLP half a row
above), the harmful tokens' embeddings below layer 0 (an input: edges from it are measured too), the
refusal logit at the top above the final token. A node's size is its single-node effect
(the share of the refusal gap lost when it alone takes the harmless value), its colour the same
effect on a red (carries refusal) to blue (works against it) scale; an edge's width is its measured
path effect. Everything is drawn from circuit.json alone.
"""
from __future__ import annotations

from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
from matplotlib.colors import TwoSlopeNorm  # noqa: E402
from matplotlib.patches import FancyArrowPatch  # noqa: E402

from pipeline.store import publish_bytes, publish_file  # noqa: E402

CMAP = "RdBu_r"
LOGITS = "logits"


def layout(circuit: dict) -> dict[str, tuple[float, float]]:
    """Node id -> (x, y): x = position column (heads of one layer and position side by side), y = layer
    (+0.5 for MLPs); embeddings (EMB@class) below layer 0; the logits above the final position."""
    columns = {p["name"]: i for i, p in enumerate(circuit["positions"])}
    cells: dict[tuple, list[dict]] = {}
    for node in circuit["nodes"]:
        cells.setdefault((node["position"], node["layer"], node["component"]), []).append(node)
    xy = {}
    for (position, layer, component), members in cells.items():
        members.sort(key=lambda n: n["head"] if n["head"] is not None else -1)
        width = min(0.7, 0.22 * (len(members) - 1))
        for i, node in enumerate(members):
            offset = -width / 2 + (width * i / (len(members) - 1) if len(members) > 1 else 0)
            xy[node["id"]] = (columns[position] + offset, layer + (0.5 if component == "mlp" else 0.0))
    xy[LOGITS] = (len(columns) - 1, circuit["n_layers"] + 0.3)
    for edge in circuit["edges"]:
        if edge["from"].startswith("EMB@"):
            xy[edge["from"]] = (columns[edge["from"][4:]], -0.8)
    return xy


def _effect(node: dict) -> float:
    value = node["effect"] if node["effect"] is not None else node["attribution"]
    return float(value or 0.0)


def draw(circuit: dict):
    """The diagram as a matplotlib figure."""
    xy = layout(circuit)
    n_positions, n_layers = len(circuit["positions"]), circuit["n_layers"]
    per_layer = 0.9 if n_layers <= 8 else max(0.35, 8.0 / n_layers)  # inches: deep models stay one page tall
    fig, ax = plt.subplots(figsize=(max(6.0, 1.7 * n_positions + 3.0), max(4.5, per_layer * n_layers + 2.5)),
                           layout="constrained")
    effects = [_effect(n) for n in circuit["nodes"]]
    bound = max([abs(e) for e in effects] + [1e-3])
    norm = TwoSlopeNorm(vcenter=0.0, vmin=-bound, vmax=bound)
    cmap = plt.get_cmap(CMAP)

    drawn = [e for e in circuit["edges"] if e["drawn"]]
    widest = max([abs(e["effect"]) for e in drawn] + [1e-9])
    for edge in sorted(drawn, key=lambda e: abs(e["effect"])):
        colour = "#b2182b" if edge["effect"] > 0 else "#2166ac"
        arrow = FancyArrowPatch(xy[edge["from"]], xy[edge["to"]], arrowstyle="-|>", mutation_scale=9,
                                linewidth=0.6 + 5.0 * abs(edge["effect"]) / widest, color=colour, alpha=0.55,
                                shrinkA=9, shrinkB=9, connectionstyle="arc3,rad=0.08", zorder=1)
        ax.add_patch(arrow)

    labels: dict[tuple, list] = {}  # one label per (layer, position, component): "L21.H0,1,4" / "L21.MLP"
    for node, effect in zip(circuit["nodes"], effects):
        x, y = xy[node["id"]]
        size = 60 + 340 * abs(effect) / bound
        ax.scatter([x], [y], s=size, c=[cmap(norm(effect))], marker="o" if node["component"] == "head" else "s",
                   edgecolors="black", linewidths=1.1 if node["core"] else 0.8, linestyle="-" if node["core"] else "--",
                   zorder=3)
        labels.setdefault((node["layer"], node["position"], node["component"]), []).append((x, y, node["head"]))
    for (layer, _, component), members in labels.items():
        x, y = max(m[0] for m in members), members[0][1]
        text = f"L{layer}.MLP" if component == "mlp" else f"L{layer}.H" + ",".join(str(m[2]) for m in members)
        ax.annotate(text, (x, y), xytext=(8, 3), textcoords="offset points", ha="left", va="bottom", fontsize=6.5,
                    zorder=4)

    for name, (x, y) in xy.items():
        if name.startswith("EMB@"):
            ax.scatter([x], [y], s=300, marker="D", c="#d9d9d9", edgecolors="black", zorder=3)
            ax.annotate("tokens", (x, y), xytext=(11, 0), textcoords="offset points", ha="left", va="center",
                        fontsize=7, zorder=4)

    lx, ly = xy[LOGITS]
    ax.scatter([lx], [ly], s=500, marker="h", c="#fee090", edgecolors="black", zorder=3)
    ax.annotate("refusal\nlogit", (lx, ly), ha="center", va="center", fontsize=7, zorder=4)

    ax.set_xticks(range(n_positions))
    ax.set_xticklabels([_readable(p["label"]) for p in circuit["positions"]], rotation=30, ha="right", fontsize=8)
    ax.set_yticks(range(n_layers))
    ax.set_yticklabels([f"L{layer}" for layer in range(n_layers)], fontsize=8)
    ax.set_xlim(-0.7, n_positions - 0.3)
    ax.set_ylim(-1.3, n_layers + 0.8)
    ax.grid(True, color="#eeeeee", zorder=0)
    ax.set_xlabel("position (counted from the end; earlier tokens are the same in both prompts)", fontsize=8)
    ax.set_ylabel("layer (heads on the row, MLP half a row above)", fontsize=8)
    random = circuit["random_control"]
    ax.set_title(
        f"{circuit['model'] or 'model'}: {circuit['size']} of {circuit['candidates']} nodes, "
        f"faithfulness {circuit['faithfulness']:.2f} [{circuit['faithfulness_ci'][0]:.2f}, "
        f"{circuit['faithfulness_ci'][1]:.2f}]\nrandom circuits of this size: {random['mean']:.2f} ± {random['std']:.2f}"
        f"; edge width = path effect", fontsize=9)
    mappable = plt.cm.ScalarMappable(norm=norm, cmap=cmap)
    fig.colorbar(mappable, ax=ax, shrink=0.7, label="single-node effect (share of refusal gap)")
    return fig


def to_dot(circuit: dict) -> str:
    """Graphviz DOT: one rank per layer (bottom to top), node fill and edge width by effect."""
    lines = ["digraph circuit {", "  rankdir=BT;", '  node [style=filled, fontsize=10, fontname="Helvetica"];',
             f'  label="{circuit["model"] or "model"}: faithfulness {circuit["faithfulness"]:.3f}, '
             f'{circuit["size"]} of {circuit["candidates"]} nodes"; labelloc=t;']
    cmap = plt.get_cmap(CMAP)
    bound = max([abs(_effect(n)) for n in circuit["nodes"]] + [1e-3])
    by_layer: dict[int, list[str]] = {}
    for node in circuit["nodes"]:
        effect = _effect(node)
        r, g, b, _ = cmap(0.5 + 0.5 * effect / bound)
        colour = f"#{int(255 * r):02x}{int(255 * g):02x}{int(255 * b):02x}"
        shape = "ellipse" if node["component"] == "head" else "box"
        label = "\\n".join(_escape(part) for part in (node["id"], _readable(node["token"]), f"effect {effect:+.2f}"))
        lines.append(f'  "{node["id"]}" [label="{label}", shape={shape}, fillcolor="{colour}"];')
        by_layer.setdefault(node["layer"], []).append(node["id"])
    lines.append(f'  "{LOGITS}" [label="refusal logit", shape=hexagon, fillcolor="#fee090"];')
    for sender in sorted({e["from"] for e in circuit["edges"] if e["from"].startswith("EMB@")}):
        lines.append(f'  "{sender}" [label="{sender[4:]} tokens (embedding)", shape=diamond, fillcolor="#d9d9d9"];')
    for layer in sorted(by_layer):
        members = " ".join(f'"{i}"' for i in by_layer[layer])
        lines.append(f"  {{ rank=same; {members} }}")
    drawn = [e for e in circuit["edges"] if e["drawn"]]
    widest = max([abs(e["effect"]) for e in drawn] + [1e-9])
    for edge in drawn:
        colour = "#b2182b" if edge["effect"] > 0 else "#2166ac"
        width = 0.5 + 5.0 * abs(edge["effect"]) / widest
        lines.append(f'  "{edge["from"]}" -> "{edge["to"]}" [penwidth={width:.2f}, color="{colour}", '
                     f'label="{edge["effect"]:+.2f}", fontsize=8];')
    lines.append("}")
    return "\n".join(lines) + "\n"


def _readable(token: str) -> str:
    """Byte-level BPE spells a newline "Ċ" and a leading space "Ġ"."""
    return token.replace("Ċ", "\\n").replace("Ġ", "␣")


def _escape(text: str) -> str:
    """Text inside a DOT string: backslashes and quotes escaped."""
    return text.replace("\\", "\\\\").replace('"', '\\"')


def render_circuit(circuit: dict, out_dir: str | Path) -> dict[str, Path]:
    """Write circuit.svg, circuit.png and circuit.dot into out_dir (each published atomically)."""
    out_dir = Path(out_dir)
    fig = draw(circuit)
    paths = {"svg": out_dir / "circuit.svg", "png": out_dir / "circuit.png", "dot": out_dir / "circuit.dot"}
    publish_file(paths["svg"], lambda tmp: fig.savefig(tmp, format="svg"))
    publish_file(paths["png"], lambda tmp: fig.savefig(tmp, format="png", dpi=130))
    plt.close(fig)
    publish_bytes(paths["dot"], to_dot(circuit).encode())
    return paths
