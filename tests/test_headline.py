"""The headline: effects of a layer's outputs patched at a position class (the harmful tokens, the rest of the
instruction, the template's end), with patches that replace the input (complete by construction) left out."""
import pandas as pd
import pytest

from pipeline.analysis.positions import HEADLINE_CLASSES, headline_groups
from pipeline.analysis.statistics import read_effects, read_summary, replaces_input
from pipeline.outputs.report import headline
from pipeline.store import read_table


def test_position_classes_partition_the_positions_where_the_prompts_differ(tiny_sweep):
    pairs = read_table(tiny_sweep["outcome"].run_dir / "pairs.parquet")
    groups = headline_groups(pairs)  # [P, 3, T]
    assert groups.shape[1] == len(HEADLINE_CLASSES)
    assert int(groups.sum(dim=1).max()) == 1  # no position in two classes
    for row, (harm, end, t) in enumerate(zip(pairs.column("harmful_positions").to_pylist(),
                                             pairs.column("instruction_end").to_pylist(),
                                             pairs.column("seq_len").to_pylist())):
        covered = groups[row].any(dim=0).nonzero().squeeze(1).tolist()
        assert covered == list(range(min(harm), t))  # every position from the first differing token on
        assert groups[row, 0].nonzero().squeeze(1).tolist() == sorted(harm)
        assert groups[row, 2].nonzero().squeeze(1).tolist() == list(range(end, t))


def test_summary_marks_and_the_headline_leaves_out_input_replacing_patches(tiny_sweep):
    summary = read_summary(tiny_sweep["outcome"].run_dir / "summary.parquet")
    classes = summary[summary["position_class"].notna()]
    assert set(classes["position_class"]) == set(HEADLINE_CLASSES)
    assert summary["replaces_input"].tolist() == replaces_input(summary).astype(bool).tolist()
    embedding = summary[(summary["component"] == "resid_pre") & (summary["layer"] == 0)
                        & (summary["position_class"] == "harm")]
    # complete by construction: the embeddings of every token where the prompts differ make the other prompt
    assert len(embedding) == 2 and embedding["replaces_input"].all()
    assert embedding["mean"].sub(1).abs().max() < 1e-4

    top = headline(summary, 5)
    assert not top.empty and not top["replaces_input"].any()
    assert top["position_class"].notna().all() and (top["component"] != "resid_pre").all()
    for direction, rows in top.groupby("direction"):
        candidates = summary[(summary["direction"] == direction) & summary["position_class"].notna()
                             & (summary["component"] != "resid_pre") & ~summary["replaces_input"]]
        assert rows["mean"].tolist() == candidates["mean"].nlargest(len(rows)).tolist()


def test_class_effects_are_the_means_of_the_pairs_rows(tiny_sweep):
    run_dir = tiny_sweep["outcome"].run_dir
    effects = read_effects(run_dir / "effects.parquet")
    summary = read_summary(run_dir / "summary.parquet")
    by_class = effects[effects["position_class"].notna()]
    assert by_class["position"].isna().all()
    means = by_class.groupby(["direction", "component", "layer", "position_class"])["effect"].mean()
    rows = summary[summary["position_class"].notna()].set_index(["direction", "component", "layer", "position_class"])
    pd.testing.assert_series_equal(rows["mean"].sort_index(), means.sort_index().astype(float), check_names=False,
                                   rtol=1e-5, atol=1e-6)


def test_a_run_without_class_patches_leads_with_outputs_over_all_positions():
    summary = pd.DataFrame({
        "direction": ["denoise"] * 3, "component": ["mlp_out", "mlp_out", "resid_pre"], "layer": [0, 2, 2],
        "head": [pd.NA] * 3, "position": [pd.NA] * 3, "position_class": [None] * 3, "mean": [1.0, 0.4, 1.0],
        "ci_low": [0.9, 0.3, 1.0], "ci_high": [1.1, 0.5, 1.0], "n": [12] * 3})
    summary["replaces_input"] = replaces_input(summary)
    assert summary["replaces_input"].tolist() == [True, False, True]
    assert headline(summary, 3)["layer"].tolist() == [2]


@pytest.mark.parametrize("component,layer,where,expected", [
    ("resid_pre", 5, None, True), ("resid_pre", 5, "harm", False), ("resid_pre", 0, "harm", True),
    ("mlp_out", 0, None, True), ("mlp_out", 0, "end", False), ("attn_out", 1, None, False), ("head", 0, None, False),
])
def test_which_patches_replace_the_input(component, layer, where, expected):
    site = pd.DataFrame({"component": [component], "layer": [layer], "position": [pd.NA], "position_class": [where]})
    assert bool(replaces_input(site).iloc[0]) is expected
