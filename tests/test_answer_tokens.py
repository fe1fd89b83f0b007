"""Answer tokens: the top-k first tokens of the model's refusals and of its compliances, kept disjoint,
measured with refusal_logodds (logsumexp over each set); k=1 keeps the single-token behaviour."""
from __future__ import annotations

import pytest
import torch

from conftest import screened_pairs
from pipeline.analysis.behaviour import derive_answer_tokens, final_answer_logits
from pipeline.analysis.pairs import grammar_pairs, pair_batch
from pipeline.engine.adapters import get_adapter
from pipeline.engine.patching import sweep, variants_for
from pipeline.store import write_table


def replies(tok, counts: dict[str, int]) -> list[list[int]]:
    """`count` replies starting with each word (the rest of a reply does not matter)."""
    return [[tok.convert_tokens_to_ids(word), tok.convert_tokens_to_ids(".")]
            for word, count in counts.items() for _ in range(count)]


def derive(tok, refusals: dict[str, int], compliances: dict[str, int], top_k: int, **named):
    generations = replies(tok, refusals) + replies(tok, compliances)
    refused = [True] * sum(refusals.values()) + [False] * sum(compliances.values())
    answers = derive_answer_tokens(tok, generations, refused, top_k=top_k, **named)
    return tok.convert_ids_to_tokens(list(answers.refusal)), tok.convert_ids_to_tokens(list(answers.compliance)), \
        answers.source


def test_top_k_first_tokens_by_frequency_and_disjoint(tiny):
    _, tok = tiny
    refusals = {"I": 6, "You": 2, "no": 1}
    # "I" also starts a compliance ("I can help"), but a far smaller share of them than of refusals.
    compliances = {"Sure": 5, "here": 3, "I": 1, "Answer": 1}
    assert derive(tok, refusals, compliances, 1) == (["I"], ["Sure"], "generated")
    assert derive(tok, refusals, compliances, 2) == (["I", "You"], ["Sure", "here"], "generated")
    assert derive(tok, refusals, compliances, 10) == (["I", "You", "no"], ["Sure", "here", "Answer"], "generated")


def test_a_shared_first_token_belongs_to_the_side_it_starts_more_often(tiny):
    _, tok = tiny
    # "I" starts 2 of 3 refusals but 4 of 5 compliances ("I would be happy to"): the compliances' token,
    # where the single-token rule used to fail on the overlap.
    assert derive(tok, {"I": 2, "no": 1}, {"I": 4, "Sure": 1}, 1) == (["no"], ["I"], "generated")
    assert derive(tok, {"I": 2, "no": 1}, {"I": 4, "Sure": 1}, 2) == (["no"], ["I", "Sure"], "generated")
    # An equal share goes to the refusals.
    assert derive(tok, {"I": 1, "no": 1}, {"I": 1, "Sure": 1}, 2) == (["I", "no"], ["Sure"], "generated")
    with pytest.raises(ValueError, match="compliances start with no token of their own.*prompts.refusal_tokens"):
        derive(tok, {"I": 3}, {"I": 1}, 2)


def test_fallback_and_named_tokens_with_top_k(tiny):
    _, tok = tiny
    # No refusals: the refusal side falls back to "I", which the derived compliance set then leaves out.
    assert derive(tok, {}, {"I": 3, "Sure": 2, "here": 1}, 2) == (["I"], ["Sure", "here"], "default/generated")
    # Named tokens are used as given, whatever k.
    assert derive(tok, {"I": 3}, {"Sure": 3, "here": 2}, 2, refusal_tokens=["no", "cannot"]) == \
        (["no", "cannot"], ["Sure", "here"], "override/generated")
    with pytest.raises(ValueError, match="top_k=0 must be at least 1.*prompts.answer_top_k"):
        derive(tok, {"I": 1}, {"Sure": 1}, 0)


def test_refusal_tiny_pairs_are_unchanged_by_top_k(tiny):
    """refusal-tiny starts every refusal with "I" and every compliance with "Sure": any k gives the
    single-token table, whose metric is the plain logit difference."""
    model, tok = tiny
    pairs = grammar_pairs(12, seed=3)
    one, report = screened_pairs(model, tok, pairs)
    many, _ = screened_pairs(model, tok, pairs, answer_top_k=4)
    assert one.equals(many)
    assert report["refusal_tokens"] == ["I"] and report["compliance_tokens"] == ["Sure"]
    prompts = one.column("clean_ids").to_pylist()
    logits = final_answer_logits(model, prompts, [tok.convert_tokens_to_ids(w) for w in ("I", "Sure")])
    assert torch.allclose(torch.tensor(one.column("metric_clean").to_pylist()), logits[:, 0] - logits[:, 1],
                          atol=1e-5, rtol=1e-5)


def test_several_answer_tokens_reach_the_engine_as_sets(tiny, tmp_path):
    """Pairs with two refusal and three compliance tokens: pairs.parquet carries the lists, the patching
    stage's batch turns them into the engine's answer sets, and refusal_logodds is logsumexp over each."""
    model, tok = tiny
    refusal, compliance = ["I", "cannot"], ["Sure", "here", "is"]
    table, _ = screened_pairs(model, tok, grammar_pairs(8, seed=4), refusal_tokens=refusal,
                              compliance_tokens=compliance)
    ref_ids, com_ids = tok.convert_tokens_to_ids(refusal), tok.convert_tokens_to_ids(compliance)
    assert set(map(tuple, table.column("refusal_ids").to_pylist())) == {tuple(ref_ids)}
    assert set(map(tuple, table.column("compliance_ids").to_pylist())) == {tuple(com_ids)}
    clean = table.column("clean_ids").to_pylist()
    logits = final_answer_logits(model, clean, ref_ids + com_ids)
    expected = torch.logsumexp(logits[:, :2], -1) - torch.logsumexp(logits[:, 2:], -1)
    assert torch.allclose(torch.tensor(table.column("metric_clean").to_pylist()), expected, atol=1e-5)

    path = write_table(tmp_path / "pairs.parquet", table)
    rows = [i for i, n in enumerate(table.column("seq_len").to_pylist()) if n == table.column("seq_len")[0].as_py()]
    batch = pair_batch(str(path), rows)
    assert batch["answers"].refusal.shape == (len(rows), 2) and batch["answers"].compliance.shape == (len(rows), 3)
    variants = variants_for(get_adapter(model), "resid_pre", batch["clean_ids"].shape[1], per_position=False)
    result = sweep(model, batch["clean_ids"], batch["corrupted_ids"], batch["answers"], variants, "denoise",
                   metric="refusal_logodds")
    assert torch.allclose(result.metric_clean, expected[rows], atol=1e-4)
    # Patching the whole residual stream at layer 0 turns the harmless run into the harmful one.
    assert torch.allclose(result.metric_patched[:, 0], result.metric_clean, atol=1e-4)
