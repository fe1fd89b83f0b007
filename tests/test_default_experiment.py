"""The default experiment (`make run`): the circuit step runs, on at least 32 screened pairs that
smollm2-refusal's study pool (requests it never trained on) supplies and the model gets right."""
import pytest

from conftest import compose
from pipeline.config import to_dict


def test_make_run_runs_the_circuit_step_on_every_kept_pair():
    cfg = to_dict(compose())
    circuit = cfg["circuit"]
    assert circuit["enabled"] and circuit["max_pairs"] >= cfg["prompts"]["n_pairs"]  # every kept pair
    assert circuit["search_pairs"] < cfg["prompts"]["n_pairs"]  # the rest measure faithfulness held out


@pytest.mark.slow
def test_the_study_pool_supplies_at_least_32_pairs_smollm2_refusal_gets_right():
    """The preset's pairs (smollm2-refusal's study pool, its seed), screened by the model's own greedy replies."""
    from conftest import screened_pairs
    from pipeline.analysis.pairs import source_pairs
    from pipeline.engine.loading import load_model
    from pipeline.organisms import resolve

    prompts = to_dict(compose())["prompts"]
    model, tokenizer = load_model(resolve("smollm2-refusal"))
    pairs = source_pairs("smollm2-refusal", tokenizer, n=prompts["n_pairs"], seed=prompts["seed"])
    result = screened_pairs(model, tokenizer, pairs, "smollm2-refusal", max_new_tokens=prompts["max_new_tokens"],
                            answer_top_k=prompts["answer_top_k"], transfer_pairs=0)
    assert result.report["n_kept"] >= 32, result.report
