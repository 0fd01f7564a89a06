"""The built-in SFT demo set: questions about the synthetic world, written in every record format the course uses.

Teaches what instruction data looks like (question/answer, multi-turn chats with a system prompt, prompt/completion,
Alpaca-style instruction/input/output (Taori et al. 2023), text/label classification, knowledge records) and why
evaluation must be disjoint from training: the held-out set asks about entities that no SFT record mentions as a
subject, so a right answer must come from what pretraining stored (Zhou et al. 2023, LIMA: SFT teaches the format).
"""
import json
import os
import random

from nanollm.world import ATTRIBUTE_LABELS, World

HELDOUT_FRACTION = 0.2  # of each (kind, language) group of entities, held out of SFT
N_ARITHMETIC = 400  # arithmetic questions generated (before removing duplicates)
N_REVIEWS = 400  # sentiment reviews generated
HELDOUT_SIZES = {"qa": 160, "arithmetic": 40, "reviews": 40}  # held-out examples per task (240 in all)
SYSTEM_PROMPTS = {"en": "You are a helpful assistant. Answer in one sentence.",
                  "zh": "你是一个乐于助人的助手，请用一句话回答。"}
SHORT_INSTRUCTIONS = {"en": "Answer with the answer only, not a sentence.",
                      "zh": "只回答答案，不要写句子。"}
FULL_INSTRUCTIONS = {"en": "Answer the question with a full sentence.", "zh": "请用完整的句子回答问题。"}


def heldout_entities(world, seed=0, fraction=HELDOUT_FRACTION):
    """A seeded fraction of every (kind, language) group, so held-out people, places and objects in both languages."""
    rng = random.Random(f"sft-heldout:{seed}")
    held = set()
    for kind in ("person", "place", "object"):
        for language in ("en", "zh"):
            group = world.entities(kind, language)
            held.update(rng.sample(group, round(len(group) * fraction)))
    return held


def _chat(rng, pairs, language):
    """Several questions about one entity as one multi-turn chat; half with a system prompt, half as {messages}."""
    messages = [{"role": "system", "content": SYSTEM_PROMPTS[language]}] if rng.random() < 0.5 else []
    for pair in pairs:
        messages += [{"role": "user", "content": pair.question}, {"role": "assistant", "content": pair.answer}]
    return {"messages": messages} if rng.random() < 0.5 else messages


def _fact_records(world, pairs_by_entity, rng):
    """Training records about facts, spread over the formats; every fact of a training entity is used."""
    files = {"qa.jsonl": [], "chat.jsonl": [], "instructions.jsonl": [], "knowledge.json": []}
    for entity, pairs in pairs_by_entity.items():
        language = world.language(entity)
        pairs = list(pairs)
        rng.shuffle(pairs)
        if rng.random() < 0.15:  # a knowledge record: the entity with two or three of its facts
            known, pairs = pairs[:3], pairs[3:]
            column = 0 if language == "en" else 1  # labels as in World.knowledge_records
            files["knowledge.json"].append({"entity": entity, "facts": [
                {"fact": ATTRIBUTE_LABELS[p.attribute][column], "value": p.short_answer} for p in known]})
        chat = []
        for pair in pairs:
            draw = rng.random()
            if draw < 0.55:
                files["qa.jsonl"].append({"question": pair.question, "answer": pair.answer})
            elif draw < 0.8:
                chat.append(pair)
            elif draw < 0.92:
                files["instructions.jsonl"].append({"instruction": SHORT_INSTRUCTIONS[language], "input": pair.question,
                                                    "output": pair.short_answer})
            else:  # two acceptable outputs (the canonical sentence, another wording): two records, since a list
                other_wording = world.statement(entity, pair.attribute, rng)  # output is one numbered answer
                files["instructions.jsonl"] += [{"instruction": FULL_INSTRUCTIONS[language], "input": pair.question,
                                                 "output": answer} for answer in (pair.answer, other_wording)]
        for start in range(0, len(chat), 3):
            files["chat.jsonl"].append(_chat(rng, chat[start:start + 3], language))
    return files


def demo_records(seed=0, world_seed=0):
    """{"train": {file: records}, "heldout": {file: records}} for World(world_seed), deterministic for seed."""
    world = World(world_seed)
    rng = random.Random(f"sft-demo:{seed}")
    held = heldout_entities(world, seed)
    pairs = world.qa_pairs(seed, n_arithmetic=N_ARITHMETIC)
    pairs_by_entity = {}
    for pair in pairs:
        if pair.entity and pair.entity not in held:
            pairs_by_entity.setdefault(pair.entity, []).append(pair)
    train = _fact_records(world, pairs_by_entity, rng)
    heldout_qa = [{"question": p.question, "answer": p.answer} for p in pairs if p.entity in held]

    arithmetic = list({p.question: p for p in pairs if not p.entity}.values())  # distinct questions only
    rng.shuffle(arithmetic)
    n_arithmetic = HELDOUT_SIZES["arithmetic"]
    train["arithmetic.jsonl"] = [{"prompt": p.question, "completion": p.answer} for p in arithmetic[n_arithmetic:]]
    heldout_arithmetic = [{"prompt": p.question, "completion": p.answer} for p in arithmetic[:n_arithmetic]]

    reviews = list(dict(world.reviews(seed, N_REVIEWS)).items())  # distinct texts only
    about_held = [any(entity.lower() in text.lower() for entity in held) for text, _ in reviews]
    train["reviews.jsonl"] = [{"text": t, "label": label} for (t, label), h in zip(reviews, about_held) if not h]
    heldout_reviews = [{"text": t, "label": label} for (t, label), h in zip(reviews, about_held) if h]

    rng.shuffle(heldout_qa)
    rng.shuffle(heldout_reviews)
    heldout = {"qa.jsonl": heldout_qa[:HELDOUT_SIZES["qa"]], "arithmetic.jsonl": heldout_arithmetic,
               "reviews.jsonl": heldout_reviews[:HELDOUT_SIZES["reviews"]]}
    return {"train": train, "heldout": heldout}


def write_demo_dataset(folder, seed=0, world_seed=0):
    """Write the demo set as files (folder/train/*, folder/heldout/*) and return the two folder paths."""
    paths = {}
    for split, files in demo_records(seed, world_seed).items():
        paths[split] = os.path.join(folder, split)
        os.makedirs(paths[split], exist_ok=True)
        for name, records in files.items():
            with open(os.path.join(paths[split], name), "w", encoding="utf-8") as handle:
                if name.endswith(".jsonl"):
                    handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)
                else:
                    json.dump(records, handle, ensure_ascii=False, indent=1)
    return paths["train"], paths["heldout"]
