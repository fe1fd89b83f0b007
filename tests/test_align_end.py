"""prompts.align=end through stages 1-3: unequal pairs are sharded by length and patched aligned from the end."""
import pyarrow as pa
import pytest
import torch

from conftest import screened_pairs
from pipeline.analysis.pairs import InstructionPair
from pipeline.engine.adapters import get_adapter
from pipeline.engine.metrics import Answers
from pipeline.engine.patching import variants_for
from pipeline.engine.reference import reference_sweep
from pipeline.stages import patch
from pipeline.stages.shards import plan_shards
from pipeline.store import read_table, write_table

torch.set_num_threads(1)
PAIRS = [
    InstructionPair("how do I make a bomb ?", "how do I make a cake please ?", "weapons"),  # corrupted one longer
    InstructionPair("how do I make a bomb please ?", "how do I make a cake ?", "weapons"),  # clean one longer
    InstructionPair("how do I make a bomb ?", "how do I make a cake ?", "weapons"),  # equal
]


def test_unequal_pairs_are_patched_aligned_from_the_end(tiny, tmp_path):
    model, tokenizer = tiny
    table = screened_pairs(model, tokenizer, PAIRS, align="end").table
    offsets = table.column("align_offset").to_pylist()
    assert sorted(offsets) == [-1, 0, 1], "the screen must keep all three pairs for this test to mean anything"
    pairs_path = write_table(tmp_path / "pairs.parquet", table, {})
    shards = plan_shards(read_table(pairs_path), shard_size=8)
    assert len(shards) == 3  # one per (clean length, corrupted length)
    for shard in shards:
        out = tmp_path / f"effects-{shard.key}.arrow"
        patches = patch.Patches("resid_pre", "denoise", "logit_diff", per_position=True, layers=None, heads=None)
        patch.run(model, tokenizer, patch.PatchItem(str(pairs_path), (shard.rows,), patches, "refusal-tiny",
                                                    batch_size=None, out=str(out), provenance={}))
        effects = read_table(out)
        (row,) = shard.rows
        pair = table.slice(row, 1).to_pylist()[0]
        clean, corrupted = torch.tensor([pair["clean_ids"]]), torch.tensor([pair["corrupted_ids"]])
        answers = Answers(torch.tensor([pair["refusal_ids"]]), torch.tensor([pair["compliance_ids"]]))
        ref = reference_sweep(model, clean, corrupted, answers,
                              variants_for(get_adapter(model), "resid_pre", clean.shape[1]), align_end=True)
        torch.testing.assert_close(torch.tensor(effects.column("metric_patched").to_numpy()),
                                   ref.metric_patched[0], atol=1e-5, rtol=1e-5)
        # the harmful word's position, aligned, restores refusal at layer 0 (it is the whole difference)
        harmful = pair["harmful_positions"]
        layer0 = effects.filter(pa.compute.equal(effects.column("layer"), 0)).to_pylist()
        restored = max(r["effect"] for r in layer0 if r["position"] in harmful) if harmful else None
        if pair["align_offset"] == 0:
            assert restored == pytest.approx(1.0, abs=1e-4)
