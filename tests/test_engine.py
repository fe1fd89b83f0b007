"""The packed engine against the plain reference, on small random-weight models of six families."""
import pytest
import torch
from transformers import AutoConfig, AutoModelForCausalLM

from pipeline.engine.adapters import UnsupportedArchitecture, get_adapter
from pipeline.engine.hooks import COMPONENTS, rows_that_fit, run_with_cache
from pipeline.engine.metrics import DIRECTIONS, Answers, normalised_effect
from pipeline.engine.patching import Variants, group_position, patched_final_resid, sweep, variants_for
from pipeline.engine.reference import reference_sweep

torch.set_num_threads(1)  # tiny models: threads cost more than they save
VOCAB = 64
ARCHITECTURES = {
    "llama": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2),  # GQA
    "qwen2": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=1),
    "mistral": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2),
    # head_dim != hidden / heads, logit soft-capping, and a sliding window shorter than the prompt
    "gemma2": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
                   head_dim=12, final_logit_softcapping=5.0, sliding_window=4),
    "gpt2": dict(n_embd=32, n_head=4, n_positions=32),
    "gpt_neox": dict(hidden_size=32, intermediate_size=64, num_attention_heads=4),  # parallel residual
}


def tiny_model(model_type: str, n_layers: int = 3):
    torch.manual_seed(0)
    config = AutoConfig.for_model(
        model_type, vocab_size=VOCAB, num_hidden_layers=n_layers, initializer_range=0.2,
        bos_token_id=0, eos_token_id=0, pad_token_id=0, **ARCHITECTURES[model_type],
    )
    return AutoModelForCausalLM.from_config(config).eval()


def pairs(n_pairs=2, seq_len=6, seed=1):
    gen = torch.Generator().manual_seed(seed)
    clean = torch.randint(1, VOCAB, (n_pairs, seq_len), generator=gen)
    corrupted = clean.clone()
    # one differing token, as minimal pairs, at a different position per pair (each pair's shared prefix
    # is skipped on its own)
    differing = 2 + torch.arange(n_pairs) % (seq_len - 2)
    corrupted[torch.arange(n_pairs), differing] = torch.randint(1, VOCAB, (n_pairs,), generator=gen)
    answers = Answers(torch.tensor([[3, -1], [4, 5]])[:n_pairs], torch.tensor([[6, 7], [8, -1]])[:n_pairs])
    return clean, corrupted, answers


def every_variant(adapter, seq_len):
    per_position = [variants_for(adapter, c, seq_len) for c in COMPONENTS]
    all_positions = [variants_for(adapter, c, seq_len, per_position=False) for c in COMPONENTS]
    return Variants.concat(per_position + all_positions)


CASES = [(t, "logit_diff") for t in sorted(ARCHITECTURES)] + [("llama", "refusal_logodds"), ("gemma2", "kl")]


@pytest.mark.parametrize("model_type,metric", CASES)
def test_packed_equals_reference(model_type, metric):
    model = tiny_model(model_type, n_layers=2)
    clean, corrupted, answers = pairs(seq_len=5)
    variants = every_variant(get_adapter(model), clean.shape[1])
    for direction in DIRECTIONS:
        # a small batch so that batches split layers and prefix lengths mid-way
        fast = sweep(model, clean, corrupted, answers, variants, direction, metric, max_batch_rows=7)
        ref = reference_sweep(model, clean, corrupted, answers, variants, direction, metric)
        moved = (ref.metric_patched - ref.metric_base[:, None]).abs().max()
        assert moved > 0.01, "the patches must move the metric for the comparison to mean anything"
        torch.testing.assert_close(fast.metric_clean, ref.metric_clean, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast.metric_corrupted, ref.metric_corrupted, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(fast.metric_patched, ref.metric_patched, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox"])
def test_batch_size_and_prefix_reuse_do_not_change_results(model_type):
    model = tiny_model(model_type)
    clean, corrupted, answers = pairs(seq_len=8)
    variants = every_variant(get_adapter(model), clean.shape[1])
    one = sweep(model, clean, corrupted, answers, variants, "noise", max_batch_rows=1)
    many = sweep(model, clean, corrupted, answers, variants, "noise", max_batch_rows=10_000)
    plain = sweep(model, clean, corrupted, answers, variants, "noise", reuse_prefix=False)
    torch.testing.assert_close(one.metric_patched, many.metric_patched, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(plain.metric_patched, many.metric_patched, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_identical_inputs_give_zero_effect(model_type):
    model = tiny_model(model_type)
    clean, _, answers = pairs()
    variants = every_variant(get_adapter(model), clean.shape[1])
    for direction in DIRECTIONS:
        result = sweep(model, clean, clean.clone(), answers, variants, direction)
        torch.testing.assert_close(result.metric_patched, result.metric_base[:, None].expand_as(result.metric_patched),
                                   atol=1e-5, rtol=0)
        assert torch.count_nonzero(result.effects()) == 0


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_layer0_resid_pre_everywhere_reproduces_source_logits(model_type):
    model = tiny_model(model_type)
    adapter = get_adapter(model)
    clean, corrupted, answers = pairs()
    base = run_with_cache(model, adapter, corrupted, keep_kv=True)
    source = run_with_cache(model, adapter, clean)
    variants = variants_for(adapter, "resid_pre", clean.shape[1], per_position=False, layers=[0])
    rows = torch.arange(clean.shape[0])
    final = patched_final_resid(model, adapter, base, source, 0, rows, variants.select(torch.zeros_like(rows)))
    with torch.no_grad():
        source_logits = model(clean).logits[:, -1]
        base_logits = model(corrupted).logits[:, -1]
    assert (base_logits - source_logits).abs().max() > 0.1
    torch.testing.assert_close(adapter.logits(final), source_logits, atol=1e-5, rtol=0)
    result = sweep(model, clean, corrupted, answers, variants, "denoise")
    torch.testing.assert_close(result.effects(), torch.ones_like(result.effects()), atol=1e-4, rtol=0)


def test_normalised_effect():
    patched, base, source = torch.tensor([1.0, 2.0, 3.0]), torch.tensor([1.0, 1.0, 3.0]), torch.tensor([3.0, 3.0, 3.0])
    assert normalised_effect(patched, base, source).tolist() == [0.0, 0.5, 0.0]  # last pair: no signal


def test_unknown_architecture_names_the_supported_ones():
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        "bloom", vocab_size=VOCAB, hidden_size=32, n_layer=1, n_head=4))
    with pytest.raises(UnsupportedArchitecture, match=r"unsupported architecture 'bloom'.*llama.*FAMILIES"):
        get_adapter(model)


def test_out_of_range_layer_and_head_and_unknown_component():
    adapter = get_adapter(tiny_model("llama"))
    with pytest.raises(ValueError, match="layer 3 out of range"):
        variants_for(adapter, "resid_pre", 4, layers=[3])
    with pytest.raises(ValueError, match="head 4 out of range"):
        variants_for(adapter, "head", 4, heads=[4])
    with pytest.raises(ValueError, match="unknown component 'mlp'"):
        variants_for(adapter, "mlp", 4)


def test_unequal_shapes_are_refused():
    model = tiny_model("llama")
    clean, corrupted, answers = pairs()
    with pytest.raises(ValueError, match="equal token counts"):
        sweep(model, clean, corrupted[:, :-1], answers, variants_for(get_adapter(model), "resid_pre", 6))


def test_rows_that_fit_is_positive_and_shrinks_with_length():
    model = tiny_model("llama")
    adapter = get_adapter(model)
    assert rows_that_fit(model, adapter, 16) >= rows_that_fit(model, adapter, 4096) >= 1


@pytest.mark.parametrize("model_type", ["llama", "gpt2"])
@pytest.mark.parametrize("clean_len,corrupted_len", [(7, 5), (5, 7)])
def test_pairs_of_unequal_length_aligned_from_the_end(model_type, clean_len, corrupted_len):
    model = tiny_model(model_type, n_layers=2)
    gen = torch.Generator().manual_seed(3)
    suffix = torch.randint(1, VOCAB, (2, 3), generator=gen)  # the aligned tail, e.g. the chat template's end
    clean = torch.cat([torch.randint(1, VOCAB, (2, clean_len - 3), generator=gen), suffix], dim=1)
    corrupted = torch.cat([torch.randint(1, VOCAB, (2, corrupted_len - 3), generator=gen), suffix], dim=1)
    _, _, answers = pairs()
    variants = every_variant(get_adapter(model), clean_len)  # positions are clean positions
    with pytest.raises(ValueError, match="prompts.align=end"):
        sweep(model, clean, corrupted, answers, variants)
    for direction in DIRECTIONS:
        fast = sweep(model, clean, corrupted, answers, variants, direction, align_end=True, max_batch_rows=5)
        ref = reference_sweep(model, clean, corrupted, answers, variants, direction, align_end=True)
        assert (ref.metric_patched - ref.metric_base[:, None]).abs().max() > 0.01
        torch.testing.assert_close(fast.metric_patched, ref.metric_patched, atol=1e-5, rtol=0)
        # a clean position with no corrupted counterpart changes nothing
        unmatched = (variants.position >= 0) & (variants.position < clean_len - corrupted_len)
        if unmatched.any():
            torch.testing.assert_close(fast.metric_patched[:, unmatched],
                                       fast.metric_base[:, None].expand(-1, int(unmatched.sum())), atol=0, rtol=0)


def group_variants(adapter, seq_len, n_groups):
    return Variants.concat([variants_for(adapter, c, seq_len, n_groups=n_groups) for c in COMPONENTS])


def some_groups(n_pairs, seq_len, seed=5):
    """Three position groups per pair, different in each pair: a random set, the last two tokens, and
    an empty one (a group a pair lacks, which patches nothing)."""
    gen = torch.Generator().manual_seed(seed)
    groups = torch.zeros(n_pairs, 3, seq_len, dtype=torch.bool)
    groups[:, 0] = torch.rand(n_pairs, seq_len, generator=gen) < 0.5
    groups[:, 1, -2:] = True
    return groups


@pytest.mark.parametrize("model_type", ["llama", "gpt2", "gpt_neox", "gemma2"])
def test_position_groups_packed_equal_reference(model_type):
    """Patches at a set of positions per pair (a position class: the harmful tokens, the template's end)."""
    model = tiny_model(model_type, n_layers=2)
    clean, corrupted, answers = pairs(seq_len=6)
    groups = some_groups(clean.shape[0], clean.shape[1])
    variants = group_variants(get_adapter(model), clean.shape[1], groups.shape[1])
    for direction in DIRECTIONS:
        fast = sweep(model, clean, corrupted, answers, variants, direction, max_batch_rows=5, position_groups=groups)
        ref = reference_sweep(model, clean, corrupted, answers, variants, direction, position_groups=groups)
        assert (ref.metric_patched - ref.metric_base[:, None]).abs().max() > 0.01
        torch.testing.assert_close(fast.metric_patched, ref.metric_patched, atol=1e-5, rtol=1e-5)
        empty = group_position(2)
        assert torch.equal(fast.metric_patched[:, variants.position == empty],
                           fast.metric_base[:, None].expand(-1, int((variants.position == empty).sum())))


def test_a_group_of_every_position_equals_the_all_positions_patch():
    model = tiny_model("llama")
    clean, corrupted, answers = pairs(seq_len=6)
    adapter = get_adapter(model)
    groups = torch.ones(clean.shape[0], 1, clean.shape[1], dtype=torch.bool)
    grouped = sweep(model, clean, corrupted, answers, group_variants(adapter, 6, 1), position_groups=groups)
    everywhere = sweep(model, clean, corrupted, answers,
                       Variants.concat([variants_for(adapter, c, 6, per_position=False) for c in COMPONENTS]))
    torch.testing.assert_close(grouped.metric_patched, everywhere.metric_patched, atol=1e-5, rtol=1e-5)
    columns = grouped.to_columns([0, 1], "tiny", ("every",))
    assert set(columns["position_class"].to_pylist()) == {"every"} and columns["position"].mask.all()


@pytest.mark.parametrize("clean_len,corrupted_len", [(7, 5), (5, 7)])
def test_position_groups_aligned_from_the_end(clean_len, corrupted_len):
    model = tiny_model("llama", n_layers=2)
    gen = torch.Generator().manual_seed(3)
    suffix = torch.randint(1, VOCAB, (2, 3), generator=gen)
    clean = torch.cat([torch.randint(1, VOCAB, (2, clean_len - 3), generator=gen), suffix], dim=1)
    corrupted = torch.cat([torch.randint(1, VOCAB, (2, corrupted_len - 3), generator=gen), suffix], dim=1)
    _, _, answers = pairs()
    groups = some_groups(2, clean_len)
    variants = group_variants(get_adapter(model), clean_len, 3)
    for direction in DIRECTIONS:
        fast = sweep(model, clean, corrupted, answers, variants, direction, align_end=True, position_groups=groups)
        ref = reference_sweep(model, clean, corrupted, answers, variants, direction, align_end=True,
                              position_groups=groups)
        torch.testing.assert_close(fast.metric_patched, ref.metric_patched, atol=1e-5, rtol=1e-5)


def test_group_variants_without_groups_are_refused():
    model = tiny_model("llama")
    clean, corrupted, answers = pairs(seq_len=6)
    with pytest.raises(ValueError, match="no position_groups"):
        sweep(model, clean, corrupted, answers, group_variants(get_adapter(model), 6, 2))
