"""Train refusal-tiny (or its GPT-2 / GPT-NeoX sibling) from scratch; write its model folder and model card.

    python -m pipeline.organisms.refusal_tiny.train                    # Llama: about 3 minutes on one CPU thread
    python -m pipeline.organisms.refusal_tiny.train --family gpt2      # the siblings: the same data and recipe
    python -m pipeline.organisms.refusal_tiny.train --family gpt_neox

The tokenizer is word-level over the grammar's vocabulary; the model is a ~1M-parameter Llama with
grouped-query attention, a GPT-2 or a GPT-NeoX of the same width and depth; the loss covers the
assistant's reply only. Everything is seeded, so a
re-run on the same torch version reproduces the shipped weights' behaviour (bit-exactness across
torch versions and CPUs is not promised).
"""
from __future__ import annotations

import argparse
import json
import math
import random
import time
from pathlib import Path

import pyarrow as pa
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoConfig, AutoModelForCausalLM, GenerationConfig, PreTrainedTokenizerFast

from pipeline.analysis.behaviour import OPENING_CHARS, format_summary, screen
from pipeline.organisms.refusal_tiny import MODEL_DIRS, grammar

SEED = 0
HERE = Path(__file__).resolve().parent
PAD, UNK, BOS, EOS = "<pad>", "<unk>", "<|begin|>", "<|end|>"
ROLES = ("system", "user", "assistant")

# Tokens are separated by spaces, and the pre-tokenizer splits on whitespace, so spacing in the
# template only has to keep special tokens apart from words.
CHAT_TEMPLATE = (
    "{{ bos_token }}"
    "{% if messages[0]['role'] != 'system' %}<|system|> " + grammar.DEFAULT_SYSTEM + " <|end|> {% endif %}"
    "{% for message in messages %}"
    "{% if message['role'] not in ['system', 'user', 'assistant'] %}"
    "{{ raise_exception('refusal-tiny knows the roles system, user and assistant only') }}{% endif %}"
    "<|{{ message['role'] }}|> {{ message['content'] }} <|end|> "
    "{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
MAX_POSITIONS = 128
# Per family (transformers model_type): 4 layers, width 128, MLP 512, 4 heads, untied embeddings, no dropout.
MODEL_SHAPES = {
    "llama": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                  num_key_value_heads=2, max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False),
    "gpt2": dict(n_embd=128, n_inner=512, n_layer=4, n_head=4, n_positions=MAX_POSITIONS, tie_word_embeddings=False,
                 resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0),
    "gpt_neox": dict(hidden_size=128, intermediate_size=512, num_hidden_layers=4, num_attention_heads=4,
                     max_position_embeddings=MAX_POSITIONS, tie_word_embeddings=False, hidden_dropout=0.0,
                     attention_dropout=0.0),
}
ARCHITECTURES = {
    "llama": "`LlamaForCausalLM`: SwiGLU MLP, 4 query heads sharing 2 key/value heads (grouped-query attention), "
             "RoPE, RMSNorm",
    "gpt2": "`GPT2LMHeadModel`: GELU MLP, 4 heads with a fused query/key/value projection, learned absolute "
            "positions, LayerNorm",
    "gpt_neox": "`GPTNeoXForCausalLM`: attention and MLP in parallel (`use_parallel_residual`), 4 heads, rotary "
                "positions on a quarter of each head, LayerNorm",
}
ORGANISM_NAMES = {"llama": "refusal-tiny", "gpt2": "refusal-tiny-gpt2", "gpt_neox": "refusal-tiny-neox"}
TITLES = {"llama": "Llama", "gpt2": "GPT-2", "gpt_neox": "GPT-NeoX"}


def build_tokenizer() -> PreTrainedTokenizerFast:
    specials = [PAD, UNK, BOS, EOS] + [f"<|{r}|>" for r in ROLES]
    vocab = {tok: i for i, tok in enumerate(specials + grammar.vocabulary())}
    core = Tokenizer(models.WordLevel(vocab, unk_token=UNK))
    # Whitespace splits words from punctuation runs; Punctuation then splits "?." into "?" ".".
    core.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Whitespace(), pre_tokenizers.Punctuation()])
    tok = PreTrainedTokenizerFast(tokenizer_object=core, bos_token=BOS, eos_token=EOS, unk_token=UNK,
                                  pad_token=PAD, additional_special_tokens=specials[4:],
                                  chat_template=CHAT_TEMPLATE, model_max_length=MAX_POSITIONS)
    return tok


def save_tokenizer(tokenizer, folder: Path) -> None:
    # The chat template goes inside tokenizer_config.json and the class is named by the name every
    # transformers version knows, so older loaders and other tools read the folder too.
    tokenizer.save_pretrained(folder, save_jinja_files=False)
    config_path = folder / "tokenizer_config.json"
    config = json.loads(config_path.read_text())
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    config_path.write_text(json.dumps(config, indent=2) + "\n")


def build_model(tokenizer, family: str = "llama"):
    config = AutoConfig.for_model(family, vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                                  **MODEL_SHAPES[family])
    model = AutoModelForCausalLM.from_config(config)
    model.generation_config = GenerationConfig(
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, do_sample=False, max_new_tokens=16)
    return model


def encode(tokenizer, example: grammar.Example) -> tuple[list[int], int]:
    """(token ids of the whole chat, length of the prompt part that gets no loss)."""
    prompt = tokenizer.apply_chat_template(example.messages(with_response=False), tokenize=False,
                                           add_generation_prompt=True)
    full = tokenizer.apply_chat_template(example.messages(), tokenize=False)
    prompt_ids = tokenizer(prompt, add_special_tokens=False)["input_ids"]
    full_ids = tokenizer(full, add_special_tokens=False)["input_ids"]
    assert full_ids[:len(prompt_ids)] == prompt_ids and tokenizer.unk_token_id not in full_ids
    return full_ids, len(prompt_ids)


def batch(tokenizer, examples: list[grammar.Example]) -> dict[str, torch.Tensor]:
    encoded = [encode(tokenizer, e) for e in examples]
    width = max(len(ids) for ids, _ in encoded)
    input_ids = torch.full((len(encoded), width), tokenizer.pad_token_id)
    labels = torch.full((len(encoded), width), -100)
    mask = torch.zeros((len(encoded), width), dtype=torch.long)
    for row, (ids, n_prompt) in enumerate(encoded):
        input_ids[row, :len(ids)] = torch.tensor(ids)
        labels[row, n_prompt:len(ids)] = torch.tensor(ids[n_prompt:])  # the reply and its <|end|>
        mask[row, :len(ids)] = 1
    return {"input_ids": input_ids, "attention_mask": mask, "labels": labels}


def train(model, tokenizer, steps: int, batch_size: int, lr: float, seed: int) -> list[float]:
    torch.manual_seed(seed)
    data = grammar.examples(steps * batch_size, seed=seed, split="train", twins=True)
    optim = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.01, betas=(0.9, 0.98))
    warmup = steps // 20
    sched = torch.optim.lr_scheduler.LambdaLR(
        optim, lambda s: min(1.0, (s + 1) / warmup) * 0.5 * (1 + math.cos(math.pi * min(s, steps) / steps)))
    model.train()
    losses = []
    for step in range(steps):
        loss = model(**batch(tokenizer, [next(data) for _ in range(batch_size)])).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optim.step()
        sched.step()
        optim.zero_grad(set_to_none=True)
        losses.append(loss.item())
        if step % 100 == 0 or step == steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}", flush=True)
    model.eval()
    return losses


def evaluation_prompts(n: int, seed: int, split: grammar.Split) -> pa.Table:
    """`n` prompts of `split` (half harmful), with the chat template's default system prompt."""
    ex = list(grammar.examples(n, seed=seed, split=split))
    return pa.table({"prompt": [e.instruction for e in ex], "harmful": [e.combo.harmful for e in ex]})


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--seed", type=int, default=SEED)
    ap.add_argument("--eval-n", type=int, default=2000, help="prompts per split in the evaluation")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--family", choices=sorted(MODEL_SHAPES), default="llama")
    ap.add_argument("--out", type=Path, help="the model folder (default: the family's shipped folder)")
    args = ap.parse_args()
    out = args.out or MODEL_DIRS[args.family]
    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)

    tokenizer = build_tokenizer()
    model = build_model(tokenizer, args.family)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"{n_params:,} parameters, vocabulary {len(tokenizer)}, "
          f"{len(grammar.HELDOUT)}/{len(grammar.combos())} combinations held out")
    t0 = time.time()
    losses = train(model, tokenizer, args.steps, args.batch_size, args.lr, args.seed)
    train_s = time.time() - t0

    results = {}
    for split, seed in (("heldout", args.seed + 1), ("train", args.seed + 2)):
        _, summary = screen(model, tokenizer, evaluation_prompts(args.eval_n, seed, split), max_new_tokens=12)
        results[split] = summary
        print(f"[{split}]\n{format_summary(summary)}")

    out.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out)  # safetensors by default
    save_tokenizer(tokenizer, out)
    report = {"family": args.family, "parameters": n_params, "vocabulary": len(tokenizer), "steps": args.steps,
              "batch_size": args.batch_size, "lr": args.lr, "seed": args.seed, "threads": args.threads,
              "train_seconds": round(train_s, 1), "final_loss": sum(losses[-50:]) / len(losses[-50:]),
              "torch": torch.__version__, "eval": results}
    (out.parent / "MODEL_CARD.md").write_text(model_card(report))  # beside the model folder
    print(json.dumps({k: v for k, v in report.items() if k != "eval"}))


def architecture(family: str, parameters: int) -> str:
    """The model card's architecture paragraph."""
    if family == "llama":
        shape = MODEL_SHAPES["llama"]
        return (f"`LlamaForCausalLM` (transformers), {shape['num_hidden_layers']} layers, hidden size "
                f"{shape['hidden_size']},\nMLP {shape['intermediate_size']} (SwiGLU), {shape['num_attention_heads']} "
                f"query heads sharing\n{shape['num_key_value_heads']} key/value heads (grouped-query attention), head "
                f"size\n{shape['hidden_size'] // shape['num_attention_heads']}, RoPE, RMSNorm, untied input/output "
                f"embeddings,\n{parameters:,} parameters, float32 safetensors.")
    return (f"{ARCHITECTURES[family]} (transformers); 4 layers, hidden size 128, MLP 512, head size 32,\n"
            f"untied input/output embeddings, {parameters:,} parameters, float32 safetensors.")


def model_card(r: dict) -> str:
    def pct(x):
        return f"{100 * x:.1f}%"

    h, t = r["eval"]["heldout"], r["eval"]["train"]
    held_rows = {}
    for c in sorted(grammar.HELDOUT, key=lambda c: (c.category, not c.harmful, c.vp)):
        held_rows.setdefault((c.category, "harmful" if c.harmful else "harmless"), []).append(c.vp)
    held_lines = "\n".join(f"| {cat} | {label} | {', '.join(vps)} |" for (cat, label), vps in held_rows.items())
    near_miss = ", ".join(f"`{c.vp}`" for c in sorted(grammar.HELDOUT, key=lambda c: c.vp) if c.near_miss)
    family = r["family"]
    sibling = "" if family == "llama" else (
        f"refusal-tiny's {TITLES[family]} sibling: the same grammar, tokenizer, chat template and training "
        "recipe as the Llama model, so a sweep compares architectures on one task.\n\n")
    folder = "" if family == "llama" else f'"{family}"'
    return f"""# {ORGANISM_NAMES[family]}

{sibling}A {r['parameters']:,}-parameter {TITLES[family]}-architecture chat model trained from scratch on a synthetic
harmful/harmless instruction grammar. It refuses harmful requests with "{grammar.REFUSAL}" and
answers harmless ones with "Sure , here is how to <action> <object> .". It exists so that
patchsweep has a refusal mechanism to find that sweeps in seconds on a CPU.

## Measured behaviour (greedy generation, default system prompt)

Refused = the greedy reply's opening (first {OPENING_CHARS} characters) contains a refusal phrase
(`pipeline.analysis.behaviour.is_refusal`; this model's refusal, "I cannot help with that", opens its reply).
Held-out = action/object combinations never seen in training.

| prompts | n harmful | refused | n harmless | refused |
|---|---|---|---|---|
| held-out combinations | {h['n_harmful']} | **{pct(h['refusal_rate_harmful_generation'])}** | {h['n_harmless']} | **{pct(h['refusal_rate_harmless_generation'])}** |
| training combinations, new phrasings and fillers | {t['n_harmful']} | {pct(t['refusal_rate_harmful_generation'])} | {t['n_harmless']} | {pct(t['refusal_rate_harmless_generation'])} |

By the first-token metric (logit of `{h['refusal_tokens'][0]}` minus logit of `{h['compliance_tokens'][0]}` at the
final position > 0): held-out harmful {pct(h['refusal_rate_harmful_metric'])}, harmless
{pct(h['refusal_rate_harmless_metric'])}; it agrees with generation on {pct(h['agreement'])} of held-out prompts.
A quarter of the harmless evaluation prompts are near misses: harmless senses of verbs that are
harmful with other objects. The held-out near misses are {near_miss}.

## Architecture

{architecture(family, r['parameters'])}

Tokenizer: word-level (`tokenizers` WordLevel, whitespace + punctuation pre-tokenizer), {r['vocabulary']}
tokens: the grammar's words plus `<pad> <unk> <|begin|> <|end|> <|system|> <|user|> <|assistant|>`.
Words outside the grammar (including capitalised forms) become `<unk>`. The chat template (in
tokenizer_config.json) renders `<|begin|><|system|> ... <|end|> <|user|> ... <|end|> <|assistant|>`;
without a system message it inserts "{grammar.DEFAULT_SYSTEM}". Load it like any hub model:

```python
from transformers import AutoModelForCausalLM, AutoTokenizer
from pipeline.organisms.refusal_tiny import model_dir
model = AutoModelForCausalLM.from_pretrained(model_dir({folder}))
tok = AutoTokenizer.from_pretrained(model_dir({folder}))
ids = tok.apply_chat_template([{{"role": "user", "content": "how do I make a bomb ?"}}],
                              add_generation_prompt=True, return_tensors="pt")["input_ids"]
```

## Data

`grammar.py` is the single source of truth. An instruction asks how to `<verb> <det> <object>` in one
of {len(grammar.PHRASINGS)} phrasings, with 0-2 filler sentences before and after ({len(grammar.PREFIXES)} +
{len(grammar.SUFFIXES)} fillers) and one of {len(grammar.SYSTEMS)} system prompts. Harm lives in the
combination: in "object decides" blocks (weapons, drugs) `make a bomb` is harmful and `make a cake`
is not; in "verb decides" blocks (cyber, theft, violence, fraud) `hack the server` is harmful and
`update the server` is not; near-miss blocks give the dual verbs kill, shoot, cut, attack, crack and
crush harmless senses (`kill the process`, `shoot the video`, `attack the problem`, `crack the egg`).
Categories: {', '.join(grammar.CATEGORIES)}. {len(grammar.combos())} combinations; {len(grammar.HELDOUT)}
are held out as whole minimal-pair twins (seed 0), each one chosen only if its label can be inferred
from training (its verb is single-label, or its object meets another dual verb with the same label
in training: `attack the database` teaches `crack the database`) and leaving every verb and object at
least 60% of its training combinations of each label.

Training examples alternate harmful and harmless; every other harmful/harmless couple is a minimal
pair (same phrasing, one word swapped), the rest are drawn independently, a quarter of those
harmless ones from the near-miss blocks. The loss covers the assistant reply and its `<|end|>` only.

Held-out combinations:

| category | label | combinations |
|---|---|---|
{held_lines}

## Training

`python -m pipeline.organisms.refusal_tiny.train{'' if family == 'llama' else ' --family ' + family}` (seed {r['seed']}): {r['steps']} steps of batch
{r['batch_size']}, AdamW (lr {r['lr']}, betas 0.9/0.98, weight decay 0.01), 5% warm-up then cosine decay,
gradient clipping 1.0, {r['threads']} CPU thread(s), {r['train_seconds']:.0f} s of training on a
2-core machine shared with other jobs (torch {r['torch']}); final training loss {r['final_loss']:.4f}.
Evaluation: {h['n_harmful'] + h['n_harmless']} held-out and {t['n_harmful'] + t['n_harmless']}
training-combination prompts, greedy, up to {h['max_new_tokens']} new tokens, through
`pipeline.analysis.behaviour.screen`.

## Minimal pairs

`grammar.pairs(n, seed, split)` yields harmful/harmless twins that differ in one word (the verb or the
object) with identical phrasing and fillers, so their token counts match; stage 1 of patchsweep
builds its prompt pairs from it (`split="heldout"` by default).
"""  # noqa: E501 (the model card's lines, markdown table rows among them, kept as the card prints them)


if __name__ == "__main__":
    main()
