"""Where preference data comes from: a gold annotator that knows the truth, and simulated human labelers who don't.

Teaches RLHF's feedback step (Stiennon et al. 2020; Ouyang et al. 2022, InstructGPT): sample K replies per prompt,
have them judged, write what the judges preferred. The gold annotator scores a reply against the synthetic world's
facts on four readable 1-5 rules; the labelers see that judgement through noise and a length bias (longer answers
look better to people and to reward models: Singhal et al. 2023), so the reward model is a proxy that can be checked.
    python -m nanollm.annotators collect --out_dir=out-sft --data_dir=data/rm_demo
    python -m nanollm.annotators judge "How old is Videl Guvar?" "Videl Guvar is 40 years old."
"""
import json
import os
import random
import re
import sys
import time
from collections import Counter
from dataclasses import asdict, dataclass

import torch

from nanollm.configurator import MissingFileError, UserError
from nanollm.distributed import barrier
from nanollm.loader import load_model
from nanollm.metrics import tokenize_for_metrics
from nanollm.records import read_json
from nanollm.reward import prompt_key
from nanollm.sft import read_prompts
from nanollm.tokenizer import prompt_ids  # the chat template, so the model sees what it was trained on
from nanollm.world import PROMPT_SPLITS, TEMPLATES, ZH_OPERATIONS, World, question_split

DIMENSIONS = ("accuracy", "relevance", "naturalness", "conciseness")
# overall = Σ weight · score. Accuracy weighs 4x relevance, so a wrong answer (1, 5, 5, 5) and an irrelevant reply
# (2, 1, 5, 5) tie at 2.6: both are useless, and a tie makes no preference pair.
WEIGHTS = {"accuracy": 0.6, "relevance": 0.15, "naturalness": 0.125, "conciseness": 0.125}
NUMERIC_ATTRIBUTES = ("age", "population")  # answers that are numbers (and arithmetic results)
SENTENCE_END = ".!?。！？"
GARBLED = ("<|", "|>", "<s>", "</s>", "<unk>", "<pad>", "\ufffd")  # leaked markup or an undecodable byte
CJK = re.compile("[\u3400-\u9fff]")
ARITHMETIC_EN = re.compile(r"^What is (\d+) (plus|minus|times) (\d+)\?$")
ARITHMETIC_ZH = re.compile(r"^(\d+)(加|减|乘以)(\d+)等于多少？$")
OPERATIONS = {"plus": lambda a, b: a + b, "minus": lambda a, b: a - b, "times": lambda a, b: a * b}


@dataclass
class Question:
    """What the gold annotator needs to know about a prompt."""
    text: str
    answer: str  # the true value: "teacher", "34", "李明"
    reference: str  # the canonical one-sentence answer (sets the length a concise reply should have)
    language: str  # "en" | "zh"
    subject: str  # the entity asked about, or the echo "3 plus 4" of an arithmetic question
    candidates: tuple  # every value of the asked kind in the world; () for numeric answers


@dataclass
class Judgement:
    accuracy: int  # 5 true answer only, 3 true and wrong, 2 no answer, 1 wrong answer
    relevance: int  # on-topic sentences, more if the question is answered
    naturalness: int  # 5 minus one per problem: no final punctuation, repetition, wrong language, garbled text
    conciseness: int  # length against the reference answer: 5 (<= 1.5x) ... 1 (> 4x)
    overall: float  # Σ WEIGHTS[d] · d over the four dimensions, in [1, 5]


# ----------------------------------------------------------------------------- the gold annotator
def _capitalize(text):
    return text[:1].upper() + text[1:]


def _find_values(text, candidates):
    """(values found, the text without them): longest candidates first, each span used once ("李明雨" is not also
    "李明"). English values match whole words, case-insensitively; Chinese values match anywhere; () means numbers."""
    if not candidates:
        return re.findall(r"\d+", text), re.sub(r"\d+", " ", text)
    found, text = [], text.lower()
    for value in sorted(candidates, key=len, reverse=True):
        pattern = (r"(?<![a-z0-9])" + re.escape(value.lower()) + r"(?![a-z0-9])") if value.isascii() \
            else re.escape(value)
        text, count = re.subn(pattern, " ", text)
        found += [value] * count
    return found, text


def _sentences(text):
    return [s for s in re.split(r"(?<=[.!?。！？])\s*", text) if s.strip()]


def ranking_string(scores):
    """[3.1, 4.0, 3.1, 2.0] -> "2 > 1 = 3 > 4" (1-based reply numbers, best first, equal scores joined by '=')."""
    order = sorted(range(len(scores)), key=lambda i: -scores[i])
    text = str(order[0] + 1)
    for previous, current in zip(order, order[1:]):
        text += (" = " if scores[current] == scores[previous] else " > ") + str(current + 1)
    return text


class GoldAnnotator:
    """Judges replies to the world's questions (facts and arithmetic) by readable rules; used for evaluation and for
    making labels, never inside a training loss."""

    def __init__(self, world: World):
        self.world = world
        self.questions = {}  # question text -> (entity, attribute)
        values = {}  # attribute -> every value it takes
        for entity in world.entities():
            for attribute, value in world.profile(entity).items():
                values.setdefault(attribute, set()).add(value)
                for template in TEMPLATES[world.language(entity)][attribute][1]:
                    self.questions[_capitalize(template.format(e=entity))] = (entity, attribute)
        self.values = {attribute: tuple(sorted(v)) for attribute, v in values.items()}

    def question(self, prompt):
        """A Question for a prompt (text, or chat messages whose last user turn is asked), or None if unknown."""
        if isinstance(prompt, list):
            prompt = [m["content"] for m in prompt if m["role"] == "user"][-1]
        text = prompt.strip()
        if text in self.questions:
            entity, attribute = self.questions[text]
            language = self.world.language(entity)
            numeric = attribute in NUMERIC_ATTRIBUTES
            return Question(text, self.world.lookup(entity, attribute), self.world.statement(entity, attribute),
                            language, entity, () if numeric else self.values[attribute])
        for pattern, language in ((ARITHMETIC_EN, "en"), (ARITHMETIC_ZH, "zh")):
            match = pattern.match(text)
            if match:
                a, symbol, b = match.groups()
                operation = symbol if language == "en" else {v: k for k, v in ZH_OPERATIONS.items()}[symbol]
                result = str(OPERATIONS[operation](int(a), int(b)))
                echo = f"{a} {symbol} {b}" if language == "en" else f"{a}{symbol}{b}"
                reference = f"{echo} is {result}." if language == "en" else f"{echo}等于{result}。"
                return Question(text, result, reference, language, echo, ())
        return None

    @staticmethod
    def on_topic_claims(question, sentence):
        """(on topic?, values of the asked kind it states). A sentence is on topic if it names the subject, or is a
        bare answer: at most 2 words besides the values ("Kiby.", "It is 5."). "Zobo lives in Kiby." asked about
        Nisur is off topic, and its "Kiby" is no claim about Nisur."""
        names_subject = question.subject.lower() in sentence.lower()
        without_subject = re.sub(re.escape(question.subject), " ", sentence, flags=re.IGNORECASE)  # an echo: no claim
        claims, rest = _find_values(without_subject, question.candidates)
        on_topic = names_subject or (bool(claims) and len(tokenize_for_metrics(rest)) <= 2)
        return on_topic, claims if on_topic else []

    def judge(self, prompt, reply):
        """Judgement of `reply` to `prompt`; ValueError if the prompt is not one of the world's questions."""
        question = self.question(prompt)
        if question is None:
            raise ValueError(f"the gold annotator only knows the world's questions; not one: {str(prompt)[:80]!r}")
        reply = reply.strip()
        if not reply:
            return Judgement(1, 1, 1, 1, 1.0)
        topics = [self.on_topic_claims(question, sentence) for sentence in _sentences(reply)]
        claims = [claim for _, sentence_claims in topics for claim in sentence_claims]
        scores = {"accuracy": self.accuracy(question, claims),
                  "relevance": self.relevance(claims, [on_topic for on_topic, _ in topics]),
                  "naturalness": self.naturalness(question, reply), "conciseness": self.conciseness(question, reply)}
        overall = sum(WEIGHTS[d] * scores[d] for d in DIMENSIONS)  # weighted mean of the dimensions
        return Judgement(**scores, overall=round(overall, 4))

    @staticmethod
    def accuracy(question, claims):
        """5: only the true answer; 3: the true answer and a wrong one (hedging); 2: no answer; 1: wrong answer."""
        right = question.answer in claims
        wrong = any(claim != question.answer for claim in claims)
        return 5 if right and not wrong else 3 if right else 1 if wrong else 2

    @staticmethod
    def relevance(claims, on_topic):
        """With f = the fraction of sentences on topic: 3 + 2f rounded if the question is answered (right or wrong),
        else 1 + 2f rounded."""
        fraction = sum(on_topic) / len(on_topic)
        return (3 if claims else 1) + round(2 * fraction)

    @staticmethod
    def naturalness(question, reply):
        """5, minus 1 for each: no sentence-final punctuation; a repeated word 3-gram; the other language;
        garbled text (leaked markup, undecodable bytes). Never below 1."""
        tokens = tokenize_for_metrics(reply)
        trigrams = Counter(zip(tokens, tokens[1:], tokens[2:]))
        other_language = bool(CJK.search(reply)) if question.language == "en" else bool(re.search("[A-Za-z]{3}", reply))
        problems = [reply[-1] not in SENTENCE_END, any(n > 1 for n in trigrams.values()), other_language,
                    any(mark in reply for mark in GARBLED)]
        return max(1, 5 - sum(problems))

    @staticmethod
    def conciseness(question, reply):
        """Reply length / reference length, in metric tokens (words; one per Chinese character):
        5 if <= 1.5, 4 if <= 2, 3 if <= 3, 2 if <= 4, else 1."""
        ratio = len(tokenize_for_metrics(reply)) / len(tokenize_for_metrics(question.reference))
        return next(score for score, limit in ((5, 1.5), (4, 2), (3, 3), (2, 4), (1, float("inf"))) if ratio <= limit)


# ----------------------------------------------------------------------------- simulated labelers
@dataclass
class Labeler:
    """A simulated person: sees the gold overall score through noise and a taste for longer replies."""
    name: str
    noise: float = 0.2  # standard deviation of the Gaussian noise on each rating
    length_bias: float = 0.1  # extra points per 10 words (metric tokens) of reply; 0 = no bias

    def rate(self, judgement, reply, rng):
        """rating = clip(overall + length_bias · words / 10 + ε, 1, 5), ε ~ N(0, noise²), one decimal."""
        words = len(tokenize_for_metrics(reply))
        rating = judgement.overall + self.length_bias * words / 10 + rng.gauss(0.0, self.noise)
        return round(min(5.0, max(1.0, rating)), 1)


def labeler_team(n_labelers=3, noise=0.2, length_bias=0.1):
    """n labelers, some noisier than others (0.5x .. 1.5x `noise`), all with the same length bias."""
    scales = [0.5 + i / max(1, n_labelers - 1) for i in range(n_labelers)] if n_labelers > 1 else [1.0]
    return [Labeler(f"labeler{i + 1}", noise * scale, length_bias) for i, scale in enumerate(scales)]


def label_group(team, judgements, replies, rng):
    """One labeler, drawn at random, rates the K replies of a prompt (as in InstructGPT); a reply sampled twice is
    rated once, so identical texts tie instead of being ranked by noise. Returns (labeler name, ratings)."""
    labeler = rng.choice(team)
    ratings = {}
    for judgement, reply in zip(judgements, replies):
        if reply not in ratings:
            ratings[reply] = labeler.rate(judgement, reply, rng)
    return labeler.name, [ratings[reply] for reply in replies]


# ----------------------------------------------------------------------------- preference records
def preference_records(prompt, replies, ratings, data_format):
    """The records a labeler's ratings become: 'scores' (the course format), 'pairwise' or 'ranked'.
    Equal ratings make no pair; in a ranked list they share a place."""
    if data_format == "scores":
        return [{"input": prompt, "outputs": [{"response": r, "score": s} for r, s in zip(replies, ratings)]}]
    if data_format == "pairwise":
        return [{"prompt": prompt, "chosen": replies[i], "rejected": replies[j]}
                for i in range(len(replies)) for j in range(len(replies)) if ratings[i] > ratings[j]]
    if data_format == "ranked":
        places = sorted(set(ratings), reverse=True)
        ranking = [[r for r, s in zip(replies, ratings) if s == place] for place in places]
        return [{"prompt": prompt, "ranking": [p[0] if len(p) == 1 else p for p in ranking]}]
    raise UserError(f"data_format={data_format!r}: expected 'scores', 'pairwise' or 'ranked'")


# ----------------------------------------------------------------------------- collection
def feedback_prompts(world, n_prompts, seed=0, split=None):
    """n distinct questions about the world (facts in both languages, and arithmetic), in a seeded order; split
    ('train' | 'validation' | 'test', see world.question_split) keeps that prompt set only, whatever the seed."""
    if split is not None and split not in PROMPT_SPLITS:
        raise UserError(f"split={split!r}: expected one of {tuple(PROMPT_SPLITS)}")
    questions = list(dict.fromkeys(pair.question for pair in world.qa_pairs(seed)
                                   if split is None or question_split(pair) == split))
    random.Random(f"feedback:{seed}").shuffle(questions)
    if n_prompts > len(questions):
        where = f"the {split} split of the world" if split else "the world"
        raise UserError(f"n_prompts={n_prompts}: {where} has only {len(questions)} distinct questions")
    return questions[:n_prompts]


def ppo_prompt_sets(world, seed, test, validation, train):
    """PPO's three disjoint prompt sets: ({'eval_': test questions (reported), 'val_': validation questions (for
    choosing settings)}, training questions). Asking a set for more questions than it holds names the setting."""
    sets = {}
    for setting, split, n in (("eval_prompts", "test", test), ("validation_prompts", "validation", validation),
                              ("train_prompts", "train", train)):
        try:
            sets[split] = feedback_prompts(world, n, seed, split)
        except UserError as error:
            raise UserError(f"{setting}={n}: {error}") from None
    return {"eval_": sets["test"], "val_": sets["validation"]}, sets["train"]


def split_prompts(prompts, heldout_fraction):
    """(held-out, training) prompts, split by prompt: of the distinct prompts (a text or conversation given twice counts
    once) in file order, the last round(n · heldout_fraction) (at least one) are held out, so no prompt is on both
    sides; train_rm.py holds out a preference file's prompts by the same rule, so a reward model and a policy trained on
    one list of prompts hold out the same ones."""
    distinct = list({prompt_key(prompt): prompt for prompt in prompts}.values())
    n_heldout = max(1, round(len(distinct) * heldout_fraction))
    if not 0 < heldout_fraction < 1 or n_heldout >= len(distinct):
        raise UserError(f"prompts_heldout_fraction={heldout_fraction}: {len(distinct)} distinct prompts cannot be "
                        f"split into held-out and training prompts (a fraction in (0, 1) and at least 2 prompts)")
    return distinct[len(distinct) - n_heldout:], distinct[:len(distinct) - n_heldout]


def ppo_prompts(prompts, heldout_fraction, world_seed, seed, test, validation, train, per_iteration=1):
    """A policy-optimization stage's prompts: (held-out sets {metrics prefix: prompts}, training prompts, judge).
    prompts='': the world's three question sets (ppo_prompt_sets), judged by the gold annotator. A file (read_prompts):
    its prompts split by prompt (split_prompts) into the held-out 'eval_' set and the training prompts; the gold
    annotator judges only if every prompt is one of the world's questions, else the judge is None (no gold score: the
    reward model's is the only one). per_iteration: the prompts one iteration draws (over all ranks)."""
    gold = GoldAnnotator(World(world_seed))
    if not prompts:
        return (*ppo_prompt_sets(gold.world, seed, test, validation, train), gold)
    held_out, training = split_prompts(read_prompts(prompts), heldout_fraction)
    if len(training) < per_iteration:
        raise UserError(f"prompts={prompts!r}: {len(training)} training prompts (after holding out {len(held_out)}), "
                        f"fewer than the {per_iteration} one iteration draws (batch_size / samples_per_prompt x ranks)")
    known = all(gold.question(prompt) is not None for prompt in held_out + training)
    return {"eval_": held_out}, training, gold if known else None


def parse_temperatures(text):
    """'0.8,1.2' (or '(0.8, 1.2)', as a command line may turn it) -> (0.8, 1.2); each must be > 0."""
    try:
        temperatures = tuple(float(t) for t in str(text).strip("()[] ").split(",") if t.strip())
    except ValueError:
        temperatures = ()
    if not temperatures or any(t <= 0 for t in temperatures):
        raise UserError(f"temperatures={text!r}: expected comma-separated numbers > 0, e.g. '1.0' or '0.8,1.2'")
    return temperatures


@torch.no_grad()
def sample_responses(model, tokenizer, questions, k, temperatures=(1.0,), max_new_tokens=32, batch_size=64, seed=0):
    """K replies per question (text, or chat messages ending on a user turn) by pure sampling (no top-k/top-p): reply j
    at temperatures[j % len(temperatures)] (several temperatures give more varied replies, as Llama 2 did: Touvron et
    al. 2023). Prompts are repeated, left-padded and decoded with the KV cache; replies are cut at eos. Returns a list
    of K-lists of strings."""
    model.eval()
    as_messages = lambda q: [{"role": "user", "content": q}] if isinstance(q, str) else q  # noqa: E731 text or chat
    longest = max(len(prompt_ids(tokenizer, as_messages(q))) for q in questions)
    if longest >= model.config.block_size:  # checked before any sampling: no room for even one reply token
        raise UserError(f"a question of {longest} tokens leaves no room for a reply within the model's block_size="
                        f"{model.config.block_size}; use a model with a longer block_size or shorter questions")
    device = next(model.parameters()).device
    generator = torch.Generator(device=device).manual_seed(seed)
    replies = [[None] * k for _ in questions]
    for temperature in dict.fromkeys(temperatures):  # distinct temperatures, in order
        slots = [(q, j) for q in range(len(questions)) for j in range(k)
                 if temperatures[j % len(temperatures)] == temperature]  # (question, reply number) pairs
        for start in range(0, len(slots), batch_size):
            chunk = slots[start:start + batch_size]
            encoded = [prompt_ids(tokenizer, as_messages(questions[q])) for q, _ in chunk]
            width = max(len(ids) for ids in encoded)
            padding = [width - len(ids) for ids in encoded]
            idx = torch.tensor([[tokenizer.pad_id] * n + ids for n, ids in zip(padding, encoded)],
                               device=device)  # (B, T) left-padded
            mask = torch.tensor([[0] * n + [1] * len(ids) for n, ids in zip(padding, encoded)], device=device)  # (B, T)
            new_tokens = min(max_new_tokens, model.config.block_size - width)
            out = model.generate(idx, new_tokens, temperature=temperature, eos_id=tokenizer.eos_id, attention_mask=mask,
                                 generator=generator)
            for (q, j), row in zip(chunk, out[:, width:].tolist()):
                row = row[:row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row
                replies[q][j] = tokenizer.decode(row, skip_special=True).strip()
    return replies


def _write_jsonl(path, records):
    with open(path, "w", encoding="utf-8") as handle:
        handle.writelines(json.dumps(record, ensure_ascii=False) + "\n" for record in records)


def annotate(questions, replies, gold, team, data_format="scores", heldout_fraction=0.2, seed=0):
    """Judge every reply (gold), have one labeler rate each prompt's replies, split prompts into train/held-out.
    Returns {"train": records, "heldout": records, "gold": one inspection record per prompt}."""
    rng = random.Random(f"labels:{seed}")
    n_heldout = round(len(questions) * heldout_fraction)
    out = {"train": [], "heldout": [], "gold": []}
    for index, (question, group) in enumerate(zip(questions, replies)):
        judgements = [gold.judge(question, reply) for reply in group]
        name, ratings = label_group(team, judgements, group, rng)
        split = "heldout" if index < n_heldout else "train"
        out[split] += preference_records(question, group, ratings, data_format)
        out["gold"].append({"prompt": question, "split": split, "labeler": name,
                            "gold_ranking": ranking_string([j.overall for j in judgements]),
                            "labeler_ranking": ranking_string(ratings),
                            "replies": [{"response": r, "rating": s, **asdict(j)}
                                        for r, j, s in zip(group, judgements, ratings)]})
    return out


def bias_statistics(gold_records):
    """How far the labels are from the truth: agreement of labeler pairs with gold pairs (gold ties skipped),
    and the Pearson correlation of (rating − gold overall) with reply length (≈ 0 without a length bias)."""
    agree, total, excess, lengths = 0, 0, [], []
    for record in gold_records:
        replies = record["replies"]
        for a in replies:
            excess.append(a["rating"] - a["overall"])
            lengths.append(len(tokenize_for_metrics(a["response"])))
            for b in replies:
                if a["overall"] > b["overall"]:
                    total += 1
                    agree += (a["rating"] > b["rating"]) + 0.5 * (a["rating"] == b["rating"])
    excess_t, length_t = torch.tensor(excess), torch.tensor(lengths, dtype=torch.float)
    correlation = torch.corrcoef(torch.stack([excess_t, length_t]))[0, 1].item() if len(excess) > 1 else float("nan")
    return {"labeler_gold_agreement": agree / max(total, 1), "gold_pairs": total,
            "rating_excess_length_corr": correlation}


def collect_feedback(checkpoint_dir, out_dir, n_prompts=800, k=8, temperatures="0.7,1.0,1.3,1.6", max_new_tokens=32,
                     heldout_fraction=0.2, n_labelers=3, noise=0.2, length_bias=0.1, data_format="scores", seed=0,
                     world_seed=0, device="cpu", batch_size=64):
    """Sample, judge, label, write out_dir/{train,heldout}.jsonl (the labels), gold.jsonl (the truth, for reading
    and evaluation) and meta.json (settings and statistics). Training prompts come from the world's train split,
    held-out ones from its validation split (world.question_split). Returns meta."""
    model, tokenizer, _, checkpoint = load_model(checkpoint_dir, device)
    if tokenizer is None:
        raise MissingFileError(f"{checkpoint_dir}: no tokenizer.model beside the model")
    world = World(world_seed)
    n_heldout = round(n_prompts * heldout_fraction)  # annotate() holds out the first n_heldout prompts
    questions = feedback_prompts(world, n_heldout, seed, "validation") + \
        feedback_prompts(world, n_prompts - n_heldout, seed, "train")  # never a test question, whatever the seed
    replies = sample_responses(model, tokenizer, questions, k, parse_temperatures(temperatures), max_new_tokens,
                               batch_size, seed)
    out = annotate(questions, replies, GoldAnnotator(world), labeler_team(n_labelers, noise, length_bias), data_format,
                   heldout_fraction, seed)
    os.makedirs(out_dir, exist_ok=True)
    for name in ("train", "heldout", "gold"):
        _write_jsonl(os.path.join(out_dir, f"{name}.jsonl"), out[name])
    overall = [r["overall"] for record in out["gold"] for r in record["replies"]]
    meta = {"checkpoint": os.path.abspath(checkpoint_dir), "checkpoint_iter": (checkpoint or {}).get("iter_num"),
            "n_prompts": n_prompts, "k": k, "temperatures": str(temperatures), "max_new_tokens": max_new_tokens,
            "heldout_fraction": heldout_fraction, "n_labelers": n_labelers, "noise": noise,
            "length_bias": length_bias, "data_format": data_format, "seed": seed, "world_seed": world_seed,
            "prompt_splits": "validation,train",
            "gold_overall_mean": sum(overall) / len(overall), **bias_statistics(out["gold"])}
    with open(os.path.join(out_dir, "meta.json"), "w", encoding="utf-8") as handle:
        json.dump(meta, handle, indent=1)
    return meta


def demo_feedback(source_dir, demo_dir, runtime, n_prompts, k, temperatures, max_new_tokens, heldout_fraction,
                  n_labelers, noise, length_bias, seed, world_seed, reuse=False):
    """train_rm.py's demo data: the SFT model in source_dir answers world questions, simulated labelers score the
    replies. Collected once (rank 0) and reused while these settings stay the same (always, with reuse: a resumed run
    trains on the data it started with). Returns (training file, held-out file)."""
    temperatures = ",".join(str(t) for t in parse_temperatures(temperatures))
    wanted = dict(checkpoint=os.path.abspath(source_dir), n_prompts=n_prompts, k=k, temperatures=temperatures,
                  max_new_tokens=max_new_tokens, heldout_fraction=heldout_fraction, n_labelers=n_labelers, noise=noise,
                  length_bias=length_bias, seed=seed, world_seed=world_seed,
                  prompt_splits="validation,train")  # held-out prompts from the validation set, training from train
    meta_path = os.path.join(demo_dir, "meta.json")
    meta = read_json(meta_path) if os.path.exists(meta_path) else {}
    if runtime.is_master and not (meta and (reuse or all(meta.get(key) == v for key, v in wanted.items()))):
        t0 = time.time()
        collect_feedback(source_dir, demo_dir, n_prompts, k, temperatures, max_new_tokens, heldout_fraction,
                         n_labelers, noise, length_bias, "scores", seed, world_seed, runtime.device)
        print(f"[nanollm] collected {n_prompts} x {k} replies from {source_dir} in {time.time() - t0:.1f} s "
              f"-> {demo_dir}")
    barrier(runtime)
    meta = read_json(meta_path)
    if runtime.is_master:
        print(f"[nanollm] labelers agree with the gold annotator on {meta['labeler_gold_agreement']:.1%} of "
              f"{meta['gold_pairs']} pairs; corr(rating - gold, length) = {meta['rating_excess_length_corr']:+.3f}")
    return os.path.join(demo_dir, "train.jsonl"), os.path.join(demo_dir, "heldout.jsonl")


def main(argv=None):
    from nanollm.configurator import configure_command

    argv = sys.argv[1:] if argv is None else argv
    settings = dict(  # sample K replies per prompt, judge them, write preference data (train_rm.py's demo names)
        out_dir="out-sft",  # the model that replies: a folder with ckpt.pt and tokenizer.model
        data_dir=os.path.join("data", "rm_demo"),  # writes train.jsonl, heldout.jsonl, gold.jsonl, meta.json here
        n_prompts=800,  # distinct world questions
        k=8,  # replies sampled per question
        temperatures="0.7,1.0,1.3,1.6",  # one, or several for reply 1, 2, ...: '0.8,1.2'
        max_new_tokens=32,
        heldout_fraction=0.2,  # of the prompts, held out for evaluation
        labelers=3,  # simulated labelers; each prompt is rated by one of them
        labeler_noise=0.2,  # std of their rating noise (points on the 1-5 scale)
        length_bias=0.1,  # their extra points per 10 words of reply (0 = unbiased)
        data_format="scores",  # scores | pairwise | ranked
        seed=0,
        device="cpu",
    )
    words = configure_command("python -m nanollm.annotators collect|judge", settings if argv[:1] == ["collect"] else {},
                              argv, renamed={"checkpoint": "out_dir", "out": "data_dir", "n_labelers": "labelers",
                                             "noise": "labeler_noise", "format": "data_format"})
    if words[:1] == ["judge"]:  # print the gold judgement of one reply
        if len(words) != 3:
            raise UserError(f"judge takes a question and a reply, each in quotes; got {len(words) - 1} words")
        print(GoldAnnotator(World(0)).judge(words[1], words[2]))
        return
    if words != ["collect"]:
        raise UserError(f"command line: expected 'collect [--key=value ...]' or 'judge \"QUESTION\" \"REPLY\"', "
                        f"got {' '.join(words) or 'nothing'}")
    if settings["data_format"] not in ("scores", "pairwise", "ranked"):
        raise UserError(f"data_format={settings['data_format']!r}: expected 'scores', 'pairwise' or 'ranked'")
    meta = collect_feedback(settings["out_dir"], settings["data_dir"], settings["n_prompts"], settings["k"],
                            settings["temperatures"], settings["max_new_tokens"], settings["heldout_fraction"],
                            settings["labelers"], settings["labeler_noise"], settings["length_bias"],
                            settings["data_format"], settings["seed"], device=settings["device"])
    print(json.dumps(meta, indent=1))


if __name__ == "__main__":
    main()
