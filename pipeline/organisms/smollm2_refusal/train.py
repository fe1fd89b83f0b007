"""LoRA safety fine-tune of SmolLM2-135M-Instruct, and its evaluation.

  python -m pipeline.organisms.smollm2_refusal.train train     # -> adapter/ (about an hour on 1 CPU thread)
  python -m pipeline.organisms.smollm2_refusal.train eval      # -> eval_results.json (tuned and base)
  python -m pipeline.organisms.smollm2_refusal.train time      # seconds per training step, to size a run

Training data: data.training_examples() (harmful -> refusal, harmless -> the base model's own reply).
The loss covers only the assistant's reply tokens. The adapter is stored in float16 (half the bytes;
LoRA weights are small numbers well inside float16's range) and merged by model_dir() in float32.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import random
import shutil
import tempfile
import time
from collections import defaultdict
from pathlib import Path

import torch

from pipeline.organisms.smollm2_refusal import ADAPTER_DIR, base_model_dir, model_dir
from pipeline.organisms.smollm2_refusal import data

SEED = 0
LORA_RANK = 8
LORA_ALPHA = 16
LORA_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
BATCH_SIZE = 8
STEPS = 300
LEARNING_RATE = 5e-4
WARMUP_STEPS = 20
EVAL_TOKENS = 20
RESULTS_PATH = Path(__file__).parent / "eval_results.json"


def encode(tokenizer, example: dict) -> tuple[list[int], list[int]]:
    """Token ids of prompt + reply, and labels that score only the reply (-100 elsewhere)."""
    prompt = tokenizer.encode(data.chat_prompt(tokenizer, example["instruction"]), add_special_tokens=False)
    reply = tokenizer.encode(example["response"], add_special_tokens=False)
    if example["finished"]:
        reply.append(tokenizer.eos_token_id)
    return prompt + reply, [-100] * len(prompt) + reply


def batches(encoded: list[tuple[list[int], list[int]]], pad_id: int, steps: int, seed: int):
    """`steps` right-padded batches, cycling through the examples in a fresh seeded order each epoch."""
    rng = random.Random(seed)
    order: list[int] = []
    for _ in range(steps):
        if len(order) < BATCH_SIZE:
            epoch = list(range(len(encoded)))
            rng.shuffle(epoch)
            order += epoch
        rows = [encoded[i] for i in order[:BATCH_SIZE]]
        del order[:BATCH_SIZE]
        width = max(len(ids) for ids, _ in rows)
        ids = torch.full((len(rows), width), pad_id)
        labels = torch.full((len(rows), width), -100)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for r, (x, y) in enumerate(rows):
            ids[r, :len(x)] = torch.tensor(x)
            labels[r, :len(y)] = torch.tensor(y)
            mask[r, :len(x)] = 1
        yield ids, labels, mask


def lora_model():
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder = base_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32)
    config = LoraConfig(r=LORA_RANK, lora_alpha=LORA_ALPHA, lora_dropout=0.0, target_modules=LORA_TARGETS,
                        task_type="CAUSAL_LM")
    return get_peft_model(model, config), tokenizer


def train(steps: int, threads: int, timing_only: bool = False) -> None:
    torch.set_num_threads(threads)
    torch.manual_seed(SEED)
    examples = data.training_examples()
    model, tokenizer = lora_model()
    encoded = [encode(tokenizer, ex) for ex in examples]
    n_harmful = sum(ex["harmful"] for ex in examples)
    print(f"{len(examples)} examples ({n_harmful} harmful, {len(examples) - n_harmful} harmless), "
          f"mean length {sum(len(ids) for ids, _ in encoded) / len(encoded):.1f} tokens; "
          f"{steps} steps of {BATCH_SIZE} = {steps * BATCH_SIZE / len(examples):.2f} epochs; threads {threads}",
          flush=True)
    model.print_trainable_parameters()

    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=LEARNING_RATE, weight_decay=0.0)

    def lr_at(step):  # linear warm-up, cosine decay to zero
        if step < WARMUP_STEPS:
            return (step + 1) / WARMUP_STEPS
        return 0.5 * (1 + math.cos(math.pi * (step - WARMUP_STEPS) / max(1, steps - WARMUP_STEPS)))

    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_at)
    model.train()
    start = time.time()
    for step, (ids, labels, mask) in enumerate(batches(encoded, tokenizer.pad_token_id, steps, SEED)):
        loss = model(input_ids=ids, attention_mask=mask, labels=labels).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        scheduler.step()
        optimizer.zero_grad(set_to_none=True)
        if step % 10 == 0 or step == steps - 1:
            elapsed = time.time() - start
            print(f"step {step:4d}  loss {loss.item():.4f}  lr {scheduler.get_last_lr()[0]:.2e}  "
                  f"{elapsed / (step + 1):.2f} s/step  elapsed {elapsed / 60:.1f} min", flush=True)
    print(f"trained {steps} steps in {(time.time() - start) / 60:.1f} min", flush=True)
    if not timing_only:
        save_adapter(model)


def save_adapter(model) -> None:
    """Write adapter_config.json + float16 adapter_model.safetensors, then swap them into ADAPTER_DIR."""
    from safetensors.torch import load_file, save_file

    tmp = Path(tempfile.mkdtemp(prefix=".adapter.", dir=ADAPTER_DIR.parent))
    try:
        model.save_pretrained(tmp)
        weights = tmp / "adapter_model.safetensors"
        save_file({k: v.half().contiguous() for k, v in load_file(weights).items()}, weights)
        config_path = tmp / "adapter_config.json"
        config = json.loads(config_path.read_text())
        config["base_model_name_or_path"] = "HuggingFaceTB/SmolLM2-135M-Instruct"  # not this machine's cache path
        config_path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
        ADAPTER_DIR.mkdir(exist_ok=True)
        for name in ("adapter_config.json", "adapter_model.safetensors"):
            os.replace(tmp / name, ADAPTER_DIR / name)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(f"saved adapter to {ADAPTER_DIR}", flush=True)


def evaluate(threads: int) -> dict:
    """Refusal rate by greedy generation, per model x split x kind, on the held-out and left-out prompts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.set_num_threads(threads)
    parts = data.split()
    prompts = [dict(row, split=name) for name in ("held_out", "left_out") for row in parts[name]]
    results = {"models": {}, "eval_tokens": EVAL_TOKENS, "left_out_category": data.LEFT_OUT_CATEGORY}
    for name, folder in (("tuned", model_dir()), ("base", base_model_dir())):
        start = time.time()
        tokenizer = AutoTokenizer.from_pretrained(folder)
        model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
        replies = data.generate(model, tokenizer, [p["instruction"] for p in prompts], EVAL_TOKENS)
        counts = defaultdict(lambda: [0, 0])  # (split, kind) -> [refused, n]
        wrong = []
        for p, reply in zip(prompts, replies):
            refused = data.is_refusal(reply)
            for kind in (p["kind"], "harmless" if not p["harmful"] else None):
                if kind:
                    counts[f"{p['split']}/{kind}"][0] += refused
                    counts[f"{p['split']}/{kind}"][1] += 1
            if refused != p["harmful"]:
                wrong.append({"split": p["split"], "kind": p["kind"], "instruction": p["instruction"], "reply": reply})
        results["models"][name] = {
            "refusal_rate": {k: {"refused": r, "n": n, "rate": round(r / n, 4)} for k, (r, n) in sorted(counts.items())},
            "seconds": round(time.time() - start, 1),
            "errors": wrong if name == "tuned" else len(wrong),
        }
        print(name, json.dumps(results["models"][name]["refusal_rate"], indent=1), flush=True)
    RESULTS_PATH.write_text(json.dumps(results, indent=1) + "\n")
    print(f"wrote {RESULTS_PATH}", flush=True)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("command", choices=["train", "eval", "time"])
    parser.add_argument("--steps", type=int, default=STEPS)
    parser.add_argument("--threads", type=int, default=1)
    args = parser.parse_args()
    if args.command == "eval":
        evaluate(args.threads)
    elif args.command == "time":
        train(steps=min(args.steps, 6), threads=args.threads, timing_only=True)
    else:
        train(args.steps, args.threads)


if __name__ == "__main__":
    main()
