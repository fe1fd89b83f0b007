"""Attribution patching: its estimate is the exact slope of a scaled patch, and it ranks like exact patching."""
import pytest
import torch

from conftest import ARCHITECTURES, random_model
from conftest import random_pairs as pairs
from pipeline.engine.adapters import get_adapter
from pipeline.engine.attribution import attribution_patching
from pipeline.engine.hooks import COMPONENTS
from pipeline.engine.metrics import Answers
from pipeline.engine.patching import sweep, variants_for
from pipeline.engine.reference import interpolated_metric

torch.set_num_threads(1)


def tiny_model(model_type: str, dtype=torch.float64):
    return random_model(model_type, dtype)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
@pytest.mark.parametrize("direction", ["noise", "denoise"])
def test_estimate_is_the_slope_of_a_scaled_patch(model_type, direction):
    """grad . (a_source - a_base) equals d metric / d alpha at alpha = 0 for a = a_base + alpha (a_source - a_base),
    measured by central finite differences in float64, for every component kind. Llama's RMSNorm computes
    in float32 even in a float64 model, so there the step is larger and the tolerance that rounding's."""
    model = tiny_model(model_type)
    clean, corrupted, answers = pairs()
    result = attribution_patching(model, clean, corrupted, answers, direction=direction)
    base, source = (corrupted, clean) if direction == "denoise" else (clean, corrupted)
    eps, atol, rtol = (1e-3, 3e-4, 1e-3) if model_type == "llama" else (1e-5, 1e-7, 1e-6)
    for component, layer, position, head in [("head", 1, 4, 2), ("mlp_out", 0, 2, None), ("resid_pre", 2, 5, None),
                                             ("attn_out", 1, 6, None), ("head", 2, 6, 0)]:
        up = interpolated_metric(model, base, source, answers, component, layer, position, head, eps)
        down = interpolated_metric(model, base, source, answers, component, layer, position, head, -eps)
        slope = (up - down) / (2 * eps)
        score = result.scores[component][:, layer, position]
        estimate = score if head is None else score[:, head]
        torch.testing.assert_close(estimate, slope.to(estimate.dtype), atol=atol, rtol=rtol)


def test_positions_before_the_first_difference_score_zero():
    model = tiny_model("llama")
    clean, corrupted, answers = pairs()
    result = attribution_patching(model, clean, corrupted, answers, direction="noise")
    for component in COMPONENTS:
        assert torch.count_nonzero(result.scores[component][:, :, :2]) == 0  # tokens 0-1 agree in both runs
    assert torch.equal(result.metric_base, result.metric_clean)


def test_attribution_ranks_like_exact_patching_on_refusal_tiny(tiny):
    """On the real organism (one length group of screened pairs), attribution's per-site effects agree in
    rank with the packed exact sweep, and the exact strongest site of each component is in attribution's top 5."""
    from scipy import stats

    from conftest import screened_pairs
    from pipeline.analysis.pairs import source_pairs
    from pipeline.engine.loading import load_model
    from pipeline.organisms import resolve

    model, tokenizer = load_model(resolve("refusal-tiny"))
    table = screened_pairs(model, tokenizer, source_pairs("refusal-tiny", tokenizer, n=40, seed=0), generate=False,
                           refusal_tokens=["I"], compliance_tokens=["Sure"]).table
    lengths = table.column("seq_len").to_pylist()
    seq_len = max(set(lengths), key=lengths.count)
    group = table.filter(table.column("seq_len").to_numpy() == seq_len)
    assert group.num_rows >= 4
    clean, corrupted = (torch.tensor(group.column(c).to_pylist()) for c in ("clean_ids", "corrupted_ids"))
    answers = Answers(torch.tensor(group.column("refusal_ids").to_pylist()),
                      torch.tensor(group.column("compliance_ids").to_pylist()))
    adapter = get_adapter(model)
    result = attribution_patching(model, clean, corrupted, answers, direction="noise")
    for component in COMPONENTS:
        variants = variants_for(adapter, component, seq_len)
        exact = sweep(model, clean, corrupted, answers, variants, direction="noise").effects().mean(0)
        estimate = result.effects(component).mean(0)
        index = (variants.layer, variants.position) + ((variants.head,) if component == "head" else ())
        estimate = estimate[index]
        assert stats.spearmanr(estimate, exact).statistic > 0.5, component
        assert int(exact.argmax()) in estimate.argsort(descending=True)[:5].tolist(), component


def test_bad_requests_fail_before_compute():
    model = tiny_model("llama")
    clean, corrupted, answers = pairs()
    with pytest.raises(ValueError, match="answer-token metric"):
        attribution_patching(model, clean, corrupted, answers, metric="kl")
    with pytest.raises(ValueError, match="unknown direction"):
        attribution_patching(model, clean, corrupted, answers, direction="sideways")
    with pytest.raises(ValueError, match="unknown components"):
        attribution_patching(model, clean, corrupted, answers, components=("resid_post",))
    with pytest.raises(ValueError, match="differ in shape"):
        attribution_patching(model, clean, corrupted[:, :-1], answers)
