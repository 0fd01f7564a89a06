"""Supervised fine-tuning data: every record format -> one chat -> token ids with an assistant-only loss mask.

Teaches: a chat template built from reserved role tokens (in the spirit of ChatML), training on the assistant's
tokens only (Ouyang et al. 2022, InstructGPT), and batching by padding or by packing several examples into one row
with restarting positions and no attention across examples (Krell et al. 2021, "Efficient Sequence Packing").
See the mask:  python -m nanollm.sft show FILE --tokenizer=out/tokenizer.model

Each record becomes exactly one conversation. A prompt written by a template follows the language of the record's
text: text holding a CJK character gets the Chinese wording.

  format             record                              the conversation it becomes
  chat               [{role, content}, ...]              the messages as given (a system message only first)
                     or {messages: [...]}
  question_answer    {question, answer}                  user: question · assistant: answer
  classification     {text, label}                       user: "Classify: <text>" · assistant: label
                                                         Chinese text: user "判断下面这段话的类别：<text>"
  prompt_completion  {prompt, completion}                user: prompt · assistant: completion
  instruction        {instruction, input?, output}       user: instruction (+ newline + input, when given)
                                                         assistant: output; an output LIST is ONE answer, its items
                                                         in order as numbered lines "1. …\n2. …"
  knowledge          {entity, facts: [{fact, value}]}    one user/assistant pair per fact, in order:
                                                         "What is the <fact> of <entity>?" · "The <fact> of <entity>
                                                         is <value>."; Chinese: "<entity>的<fact>是什么？" ·
                                                         "<entity>的<fact>是<value>。" (多少 for a quantity, 谁 for a
                                                         person, …: see _chinese_fact_turns)
  any format         + "system": "..."                   a system message first
"""
import json
import os
import re
import sys
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from nanollm import records
from nanollm.configurator import MissingFileError, UserError, check_ranges
from nanollm.data import batch_seed, list_input_files, parse_dataset
from nanollm.distributed import barrier
from nanollm.instructions import write_demo_dataset
from nanollm.metrics import accuracy, classification_scores, generation_metrics, mean_token_f1
from nanollm.optim import OPTIMIZERS
from nanollm.parallel import check_parallelism
from nanollm.tokenizer import ROLES, Tokenizer, encode_messages, prompt_ids

IGNORE_INDEX = -100  # targets equal to this are not trained on (F.cross_entropy's ignore_index)
CLASSIFY_PREFIXES = {"en": "Classify: ", "zh": "判断下面这段话的类别："}  # {text, label}: user prefix + text
FORMATS = ("chat: a list of {role, content} or {messages: [...]}", "{question, answer}", "{text, label}",
           "{prompt, completion}", "{instruction, input?, output}", "{entity, facts: [{fact, value}]}")
CJK = re.compile("[\u3400-\u9fff]")
# The Chinese question word a fact takes, by how its label ends (the world's own questions read the same way):
ZH_QUANTITY_ENDINGS = ("数", "数量", "距离", "年龄", "人口", "面积", "长度", "高度", "重量", "温度", "价格", "速度", "直径")  # 多少
ZH_PERSON_ENDINGS = ("朋友", "主人", "作者", "创始人", "发明者", "父亲", "母亲")  # 谁; any other label: 什么


@dataclass
class Conversation:
    messages: list  # [{"role": "system" | "user" | "assistant", "content": str}, ...]
    format: str  # the record format it came from: chat, question_answer, classification, ...
    source: str  # "file:line", for error messages and the mask viewer


# ----------------------------------------------------------------------------- formats -> messages
def _text(record, key, where):
    """record[key] as a string; numbers are accepted (a label 1, a value 34) and written as text."""
    value = record[key]
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise UserError(f"{where}: field '{key}' must be a string, got {type(value).__name__}")
    return str(value)


def _check_chat(messages, where, prompt=False):
    """A list of {role, content}; system only first; at least one assistant turn to learn from (prompt=True: the last
    message is the user's instead, for a model to answer)."""
    if not isinstance(messages, list) or not messages:
        raise UserError(f"{where}: 'messages' must be a non-empty list of {{role, content}}")
    checked = []
    for index, message in enumerate(messages):
        if not isinstance(message, dict) or "role" not in message or "content" not in message:
            seen = sorted(message) if isinstance(message, dict) else type(message).__name__
            raise UserError(f"{where}: messages[{index}] must have 'role' and 'content', saw {seen}")
        if message["role"] not in ROLES:
            raise UserError(f"{where}: messages[{index}]: role {message['role']!r} is not one of {ROLES}")
        if message["role"] == "system" and index > 0:
            raise UserError(f"{where}: messages[{index}]: a system message may only come first")
        checked.append({"role": message["role"], "content": _text(message, "content", f"{where}: messages[{index}]")})
    if prompt and checked[-1]["role"] != "user":
        raise UserError(f"{where}: the last message must be the user's (the model answers it), not "
                        f"{checked[-1]['role']!r}")
    if not prompt and not any(message["role"] == "assistant" for message in checked):
        raise UserError(f"{where}: the chat has no assistant message, so nothing to train on")
    return checked


def language(text):
    """'zh' if the text holds a CJK character, else 'en': the language of the prompts a template writes for it."""
    return "zh" if CJK.search(text) else "en"


def _chinese_fact_turns(entity, label, value):
    """A natural Chinese question and answer about one fact:
        爱因斯坦 / 国籍 / 德国                    -> 爱因斯坦的国籍是什么？          爱因斯坦的国籍是德国。
        太阳系 / 行星数量 / 8                     -> 太阳系的行星数量是多少？        太阳系的行星数量是8。
        太阳系 / 距银河系中心的距离 / 约2.7万光年  -> 太阳系距银河系中心的距离是多少？ 太阳系距银河系中心的距离约为2.7万光年。
    A label that already holds 的 (距…的距离, 最好的朋友) follows the entity directly, not as "X的距…的距离"."""
    subject = entity + label if "的" in label else f"{entity}的{label}"
    asked = "多少" if label.endswith(ZH_QUANTITY_ENDINGS) else "谁" if label.endswith(ZH_PERSON_ENDINGS) else "什么"
    answer = f"{subject}约为{value[1:]}。" if value.startswith("约") else f"{subject}是{value}。"
    return f"{subject}是{asked}？", answer


def _knowledge_turns(record, where):
    """{"entity", "facts": [{"fact", "value"}]} -> one question/answer pair per fact (English or Chinese)."""
    entity, facts = _text(record, "entity", where), record["facts"]
    if not isinstance(facts, list) or not facts:
        raise UserError(f"{where}: field 'facts' must be a non-empty list of {{fact, value}}")
    turns = []
    for index, fact in enumerate(facts):
        if not isinstance(fact, dict) or "fact" not in fact or "value" not in fact:
            seen = sorted(fact) if isinstance(fact, dict) else type(fact).__name__
            raise UserError(f"{where}: facts[{index}] must have 'fact' and 'value', saw {seen}")
        label, value = _text(fact, "fact", f"{where}: facts[{index}]"), _text(fact, "value", f"{where}: facts[{index}]")
        if language(entity + label) == "zh":
            question, answer = _chinese_fact_turns(entity, label, value)
        else:
            question, answer = f"What is the {label} of {entity}?", f"The {label} of {entity} is {value}."
        turns += [("user", question), ("assistant", answer)]
    return turns


def _instruction_output(record, where):
    """The assistant's answer to an instruction record: a string, or a list read as ONE answer whose items are
    numbered lines in order ("give 3 suggestions" -> "1. ...\n2. ...\n3. ...")."""
    output = record["output"]
    if not isinstance(output, list):
        return _text(record, "output", where)
    if not output:
        raise UserError(f"{where}: field 'output' is an empty list")
    items = [_text({"output": item}, "output", f"{where}: output[{index}]") for index, item in enumerate(output)]
    return "\n".join(f"{number}. {item}" for number, item in enumerate(items, start=1))


def normalize_record(record, where="<record>"):
    """One record of any supported format -> [Conversation] (always one; a list, so callers can flatten files).
    The rule per format is the table in the module docstring. A record matching no format raises ValueError naming
    `where` and the keys it saw."""
    if isinstance(record, list) or (isinstance(record, dict) and "messages" in record):
        messages = record if isinstance(record, list) else record["messages"]
        return [Conversation(_check_chat(messages, where), "chat", where)]
    if not isinstance(record, dict):
        raise UserError(f"{where}: expected a JSON object or a list of messages, got {type(record).__name__}")
    keys = set(record)
    if {"question", "answer"} <= keys:
        name, turns = "question_answer", [("user", _text(record, "question", where)),
                                          ("assistant", _text(record, "answer", where))]
    elif {"text", "label"} <= keys:
        text = _text(record, "text", where)
        name, turns = "classification", [("user", CLASSIFY_PREFIXES[language(text)] + text),
                                         ("assistant", _text(record, "label", where))]
    elif {"prompt", "completion"} <= keys:
        name, turns = "prompt_completion", [("user", _text(record, "prompt", where)),
                                            ("assistant", _text(record, "completion", where))]
    elif {"instruction", "output"} <= keys:
        prompt = _text(record, "instruction", where)
        if record.get("input"):
            prompt += "\n" + _text(record, "input", where)  # Alpaca (Taori et al. 2023): instruction, then input
        name, turns = "instruction", [("user", prompt), ("assistant", _instruction_output(record, where))]
    elif {"entity", "facts"} <= keys:
        name, turns = "knowledge", _knowledge_turns(record, where)
    else:
        raise UserError(f"{where}: record matches no SFT format; keys seen: {sorted(keys)}; "
                         f"expected one of: {'; '.join(FORMATS)}")
    system = [{"role": "system", "content": _text(record, "system", where)}] if record.get("system") else []
    return [Conversation(system + [{"role": role, "content": content} for role, content in turns], name, where)]


# ----------------------------------------------------------------------------- files -> records
def _json_array_items(text, path):
    """Yield (line, item) for each element of a top-level JSON array, so errors can name the line."""
    decoder, position = json.JSONDecoder(), text.index("[") + 1
    while True:
        while position < len(text) and text[position] in " \t\r\n,":
            position += 1
        if position >= len(text) or text[position] == "]":
            return
        line = text.count("\n", 0, position) + 1
        try:
            item, position = decoder.raw_decode(text, position)
        except json.JSONDecodeError as error:
            raise UserError(f"{path}:{error.lineno}: malformed JSON ({error.msg})") from None
        except RecursionError:
            raise UserError(f"{path}:{line}: JSON nested too deeply to parse") from None
        yield line, item


def read_records(path):
    """Yield (record, "file:line") from a .jsonl file (one record per line) or a .json file (an array of records,
    one record, or one chat given as an array of {role, content})."""
    path = Path(path)
    if path.suffix == ".jsonl":
        for number, record in records.read_jsonl(path):
            yield record, f"{path}:{number}"
        return
    text = "".join(line + "\n" for _, line in records.read_lines(path))  # UTF-8 checked line by line
    stripped = text.lstrip()
    if not stripped.startswith("["):
        yield records.parse_json(text, str(path)), f"{path}:1"
        return
    items = list(_json_array_items(text, path))
    if items and all(isinstance(item, dict) and "role" in item for _, item in items):
        yield [item for _, item in items], f"{path}:1"  # the whole file is one chat
        return
    for line, item in items:
        yield item, f"{path}:{line}"


def read_prompts(path):
    """The prompts of a .jsonl file (one {"prompt": text or messages} or {"messages": [...]} per line) or a .json
    file (a list of them), in file order: text, or chat messages ending on a user turn. Errors name file:line."""
    if not os.path.isfile(path):
        raise UserError(f"prompts={str(path)!r}: no such file (expected a .jsonl or .json file of prompts)")
    prompts = []
    for record, where in read_records(path):
        value = record.get("prompt", record.get("messages")) if isinstance(record, dict) else record
        if isinstance(value, str) and value.strip():
            prompts.append(value)
        elif isinstance(value, list):
            prompts.append(_check_chat(value, where, prompt=True))
        else:
            seen = sorted(record) if isinstance(record, dict) else type(record).__name__
            raise UserError(f"{where}: expected {{\"prompt\": text or messages}} or {{\"messages\": [...]}} with a "
                            f"non-empty prompt; saw {seen}")
    if not prompts:
        raise UserError(f"prompts={str(path)!r}: the file holds no prompts")
    return prompts


def list_sft_files(dataset):
    """'a.jsonl,folder/' -> the .json/.jsonl files (folders searched recursively, sorted)."""
    return list_input_files(parse_dataset(dataset), suffixes=(".json", ".jsonl"))


def load_conversations(dataset):
    """Every record of every file, normalized. All files are checked before any training starts."""
    conversations = [conversation for path in list_sft_files(dataset) for record, where in read_records(path)
                     for conversation in normalize_record(record, where)]
    if not conversations:
        raise UserError(f"dataset={dataset!r}: no records in {', '.join(map(str, list_sft_files(dataset)))}")
    return conversations


# ------------------------------------------------------------- conversations -> ids + mask (template: tokenizer.py)
@dataclass
class Example:
    ids: list  # token ids of one conversation (at most block_size + 1)
    trained: list  # per token: True if it is a target (assistant text or its closing eos)
    format: str
    source: str


@dataclass
class EncodeStats:
    conversations: int = 0
    truncated: int = 0  # longer than block_size + 1 tokens: the end was cut off
    dropped: int = 0  # truncation left no trained token: the example was dropped
    tokens: int = 0
    trained_tokens: int = 0

    def __str__(self):
        return (f"{self.conversations} conversations, {self.tokens:,} tokens ({self.trained_tokens:,} trained), "
                f"{self.truncated} truncated to block_size, {self.dropped} dropped (nothing left to train on)")


def encode_conversations(tokenizer, conversations, block_size):
    """Conversations -> Examples of at most block_size + 1 tokens (inputs and targets are both block_size long)."""
    examples, stats = [], EncodeStats(conversations=len(conversations))
    for conversation in conversations:
        ids, trained = encode_messages(tokenizer, conversation.messages)
        if len(ids) > block_size + 1:
            ids, trained = ids[:block_size + 1], trained[:block_size + 1]
            stats.truncated += 1
            if not any(trained):
                stats.dropped += 1
                continue
        examples.append(Example(ids, trained, conversation.format, conversation.source))
        stats.tokens += len(ids)
        stats.trained_tokens += sum(trained)
    return examples, stats


# ----------------------------------------------------------------------------- batches
def pack_rows(examples, block_size, packing, seed=0):
    """Rows of example indices. Padding: one example per row. Packing: examples (in a seeded shuffle) fill rows of
    block_size positions greedily; an example of n tokens takes n - 1 positions (inputs ids[:-1])."""
    if not packing:
        return [[index] for index in range(len(examples))]
    order = torch.randperm(len(examples), generator=torch.Generator().manual_seed(seed)).tolist()
    rows, current, used = [], [], 0
    for index in order:
        length = len(examples[index].ids) - 1
        if current and used + length > block_size:
            rows.append(current)
            current, used = [], 0
        current.append(index)
        used += length
    return rows + ([current] if current else [])


@dataclass
class Batch:
    input_ids: torch.Tensor  # (B, T) token ids, pad_id after the last example of a row
    targets: torch.Tensor  # (B, T) the next token where it is trained, else IGNORE_INDEX
    position_ids: torch.Tensor  # (B, T) restarting at 0 for each example
    segment_ids: torch.Tensor  # (B, T) which example of the row (-1 for padding); None if one example per row

    def to(self, device):
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return Batch(move(self.input_ids), move(self.targets), move(self.position_ids), move(self.segment_ids))

    @property
    def n_targets(self):
        return int((self.targets != IGNORE_INDEX).sum())


def collate(rows, pad_id):
    """rows: lists of Examples -> a Batch padded on the right to the longest row.
    Each example contributes inputs ids[:-1] and targets ids[1:], with untrained targets set to IGNORE_INDEX."""
    length = max(sum(len(example.ids) - 1 for example in row) for row in rows)
    input_ids = torch.full((len(rows), length), pad_id, dtype=torch.long)  # (B, T)
    targets = torch.full((len(rows), length), IGNORE_INDEX, dtype=torch.long)  # (B, T)
    position_ids = torch.zeros((len(rows), length), dtype=torch.long)  # (B, T)
    segment_ids = torch.full((len(rows), length), -1, dtype=torch.long)  # (B, T)
    for b, row in enumerate(rows):
        start = 0
        for segment, example in enumerate(row):
            ids = torch.tensor(example.ids)
            trained = torch.tensor(example.trained)
            end = start + len(example.ids) - 1
            input_ids[b, start:end] = ids[:-1]
            targets[b, start:end] = torch.where(trained[1:], ids[1:], IGNORE_INDEX)  # token t+1 is the target at t
            position_ids[b, start:end] = torch.arange(end - start)
            segment_ids[b, start:end] = segment
            start = end
    packed = any(len(row) > 1 for row in rows)
    # one example per row needs no segments: causal attention never lets a real token see the padding after it
    return Batch(input_ids, targets, position_ids, segment_ids if packed else None)


def get_sft_batch(examples, rows, batch_size, pad_id, seed, step, micro_step, device="cpu"):
    """batch_size random rows; a pure function of (seed, step, micro_step), so DDP and resume read the same data."""
    generator = torch.Generator().manual_seed(batch_seed(seed, "sft", step, micro_step))
    chosen = torch.randint(len(rows), (batch_size,), generator=generator).tolist()
    return collate([[examples[i] for i in rows[r]] for r in chosen], pad_id).to(device)


def token_loss_sum(logits, targets):
    """Σ cross-entropy over target tokens (IGNORE_INDEX skipped): a (0-dim) sum, not a mean.
    The caller divides by the number of targets in the whole step; a micro-batch with no targets adds exactly 0 and
    no gradient, where a per-batch mean would be 0/0 = NaN."""
    return F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), targets.reshape(-1),
                           ignore_index=IGNORE_INDEX, reduction="sum")


def distillation_loss_sum(student_logits, teacher_logits, targets, temperature):
    """Σ over target tokens of T²·KL(p_teacher ‖ p_student), both softened: p = softmax(logits / T) (Hinton et al.
    2015, "Distilling the Knowledge in a Neural Network"; the T² keeps the gradient's scale as T changes). Tokens
    whose target is IGNORE_INDEX (prompts, padding) add 0, as in token_loss_sum."""
    trained = targets != IGNORE_INDEX  # (B, T)
    student = F.log_softmax(student_logits[trained].float() / temperature, dim=-1)  # (N, V) log p_student
    teacher = F.log_softmax(teacher_logits[trained].float() / temperature, dim=-1)  # (N, V) log p_teacher
    kl = (teacher.exp() * (teacher - student)).sum()  # Σ_tokens Σ_v p_teacher·(log p_teacher − log p_student)
    return temperature ** 2 * kl


def loss_weight(n_targets, world_size):
    """The factor for one rank's Σ CE so that the step's gradient is the mean over the n_targets target tokens of
    the whole (global) batch: world_size / n_targets, since DDP averages the ranks' gradients (× world_size undoes
    that). A step with no targets at all weighs 1 (its sum is 0), never 1/0."""
    return world_size / max(n_targets, 1)


def model_inputs(batch):
    """Keyword arguments for GPT.forward from a Batch."""
    return {"position_ids": batch.position_ids, "segment_ids": batch.segment_ids}


# ----------------------------------------------------------------------------- evaluation
@torch.no_grad()
def assistant_nll(model, examples, pad_id, batch_size, device, ctx):
    """(Σ NLL, number of targets) over the assistant tokens of `examples`: perplexity = exp(Σ / n)."""
    total, count = 0.0, 0
    for start in range(0, len(examples), batch_size):
        batch = collate([[e] for e in examples[start:start + batch_size]], pad_id).to(device)
        with ctx:
            logits, _ = model(batch.input_ids, **model_inputs(batch))
        total += token_loss_sum(logits, batch.targets).item()
        count += batch.n_targets
    return total, count


@torch.no_grad()
def generate_replies(model, tokenizer, prompts, max_new_tokens, batch_size=64):
    """Greedy replies to message lists that end on a user turn; prompts are left-padded, cut at eos."""
    block_size = model.config.block_size
    replies = []
    for start in range(0, len(prompts), batch_size):
        encoded = [prompt_ids(tokenizer, messages) for messages in prompts[start:start + batch_size]]
        new_tokens = min(max_new_tokens, block_size - 1)
        encoded = [ids[-(block_size - new_tokens):] for ids in encoded]  # keep the end of an overlong prompt
        width = max(len(ids) for ids in encoded)
        device = next(model.parameters()).device
        idx = torch.tensor([[tokenizer.pad_id] * (width - len(ids)) + ids for ids in encoded], device=device)  # (B, T)
        attention_mask = torch.tensor([[0] * (width - len(ids)) + [1] * len(ids) for ids in encoded], device=device)
        out = model.generate(idx, min(new_tokens, block_size - width), temperature=0.0, eos_id=tokenizer.eos_id,
                             attention_mask=attention_mask)
        for row in out[:, width:].tolist():
            row = row[:row.index(tokenizer.eos_id)] if tokenizer.eos_id in row else row
            replies.append(tokenizer.decode(row, skip_special=True).strip())
    return replies


def score_replies(conversations, replies):
    """Text metrics against each conversation's last assistant message; accuracy and per-class precision/recall/F1
    for classification records."""
    references = [conversation.messages[-1]["content"] for conversation in conversations]
    is_label = [conversation.format == "classification" for conversation in conversations]
    scores = {}
    text = [(reply, reference) for reply, reference, label in zip(replies, references, is_label) if not label]
    if text:
        scores.update(generation_metrics([r for r, _ in text], [ref for _, ref in text]))
    labels = [(reply, reference) for reply, reference, label in zip(replies, references, is_label) if label]
    if labels:
        scores.update(classification_scores([r for r, _ in labels], [ref for _, ref in labels]))
    return {**scores, **scores_by_language(conversations, replies, references, is_label)}


def scores_by_language(conversations, replies, references, is_label):
    """The headline metrics per language of the prompt (its user text: 'zh' if it holds a CJK character, else 'en'),
    for each language the set has: token_f1_zh/_en over text answers, accuracy_zh/_en over classification labels."""
    prompt_language = [language(" ".join(m["content"] for m in c.messages[:-1] if m["role"] == "user"))
                       for c in conversations]
    scores = {}
    for name in sorted(set(prompt_language)):
        rows = [i for i, lang in enumerate(prompt_language) if lang == name]
        text = [i for i in rows if not is_label[i]]
        labels = [i for i in rows if is_label[i]]
        if text:
            scores[f"token_f1_{name}"] = mean_token_f1([replies[i] for i in text], [references[i] for i in text])
        if labels:
            scores[f"accuracy_{name}"] = accuracy([replies[i] for i in labels], [references[i] for i in labels])
    return scores


def evaluate(model, tokenizer, conversations, examples, max_new_tokens, batch_size, ctx):
    """Held-out assistant-token perplexity and the generation metrics of greedy replies (eval mode, no grad)."""
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    total, count = assistant_nll(model, examples, tokenizer.pad_id, batch_size, device, ctx)
    with ctx:
        replies = generate_replies(model, tokenizer, [c.messages[:-1] for c in conversations], max_new_tokens)
    model.train(was_training)
    scores = {"val_loss": total / max(count, 1), "val_ppl": torch.exp(torch.tensor(total / max(count, 1))).item()}
    return {**scores, **score_replies(conversations, replies)}, replies


# ----------------------------------------------------------------------------- the mask viewer
def _run_text(tokenizer, ids):
    """Text of a run of tokens: ordinary ids decoded together (multi-byte characters stay whole), reserved ids
    (which decode to nothing) shown as their pieces, e.g. <|user|> and </s>."""
    parts, ordinary = [], []
    for token in ids + [None]:
        if token is not None and token >= 8:
            ordinary.append(token)
            continue
        if ordinary:
            parts.append(tokenizer.decode(ordinary))
            ordinary = []
        if token is not None:
            parts.append(tokenizer.id_to_piece(token))
    return "".join(parts)


def render_example(tokenizer, ids, trained, color=False):
    """The example as text with its trained spans between « » (or in green with color=True)."""
    start, end = ("\033[1;42m", "\033[0m") if color else ("«", "»")
    out, run = [], []
    for position, token in enumerate(ids):
        run.append(token)
        if position + 1 == len(ids) or trained[position + 1] != trained[position]:  # the run ends here
            text = _run_text(tokenizer, run)
            out.append(f"{start}{text}{end}" if trained[position] else text)
            run = []
    return "".join(out)


def show(path, tokenizer_path, first=0, count=3, block_size=1024, tokens=False):
    tokenizer = Tokenizer(tokenizer_path)
    conversations = [c for record, where in read_records(path) for c in normalize_record(record, where)]
    examples, stats = encode_conversations(tokenizer, conversations[first:first + count], block_size)
    color = sys.stdout.isatty()
    print(f"{path}: {len(conversations)} conversations; showing {len(examples)}; trained tokens "
          f"{'in green' if color else 'between « »'}; {stats}")
    for example in examples:
        print(f"\n--- {example.source} ({example.format}): {len(example.ids)} tokens, {sum(example.trained)} trained")
        if tokens:
            for position, (token, is_trained) in enumerate(zip(example.ids, example.trained)):
                print(f"{position:5d} {token:6d} {'TRAIN' if is_trained else '  -  '} {tokenizer.id_to_piece(token)!r}")
        else:
            print(render_example(tokenizer, example.ids, example.trained, color))


# ----------------------------------------------------------------------------- train_sft.py's set-up
def check_settings(settings):
    """train_sft.py's settings, before any work: one line naming the first wrong one."""
    check_ranges(settings, positive=("batch_size", "gradient_accumulation_steps", "eval_interval", "log_interval"),
                 non_negative=("max_iters", "block_size", "learning_rate", "min_lr", "warmup_iters", "weight_decay",
                               "grad_clip", "eval_examples", "max_new_tokens"),
                 fraction=("dropout", "val_fraction"))
    if settings["optimizer"] not in OPTIMIZERS:
        raise UserError(f"optimizer={settings['optimizer']!r}: expected one of {OPTIMIZERS}")
    check_parallelism(settings)  # the heads are the base model's: their split is checked when the model is split
    if settings.get("teacher"):
        check_ranges(settings, positive=("distill_temperature",))
        if not 0 <= settings["distill_alpha"] <= 1:
            raise UserError(f"distill_alpha={settings['distill_alpha']!r}: must be in [0, 1] (the weight of the CE)")
        if not os.path.exists(settings["teacher"]):
            raise MissingFileError(f"teacher={settings['teacher']!r}: not found (an SFT out_dir, e.g. out-sft)")
    if settings["init_from"].startswith("gpt2"):
        raise UserError(f"init_from={settings['init_from']!r}: GPT-2 weights load, but SFT also needs GPT-2's "
                        f"tokenizer, which nanollm does not have; start from a pretraining out_dir such as 'out'")


def check_teacher(teacher, teacher_tokenizer, tokenizer, block_size, where):
    """A distillation teacher must predict over the student's vocabulary (the same token for every id) and see
    examples as long as the student's; else one line naming the teacher."""
    if teacher_tokenizer is None or teacher_tokenizer.vocab_size != tokenizer.vocab_size or any(
            teacher_tokenizer.id_to_piece(i) != tokenizer.id_to_piece(i) for i in range(tokenizer.vocab_size)):
        raise UserError(f"teacher={where!r}: its tokenizer differs from the student's; distillation compares "
                        f"next-token distributions id by id, so both must come from the same tokenizer")
    if teacher.config.block_size < block_size:
        raise UserError(f"teacher={where!r}: block_size {teacher.config.block_size} < the student's {block_size}")


def fit_block_size(block_size, model_args):
    """The examples' block size: 0 = the model's; never longer than the model's positions."""
    if block_size > model_args["block_size"]:
        raise UserError(f"block_size={block_size} exceeds the base model's block_size={model_args['block_size']}")
    return block_size or model_args["block_size"]


def starting_point(init_from, out_dir):
    """(checkpoint folder, tokenizer path) of the model SFT starts from: init_from, or out_dir when resuming."""
    folder = out_dir if init_from == "resume" else init_from
    return folder, os.path.join(folder, "tokenizer.model")


def load_sft_data(dataset, eval_dataset, data_dir, world_seed, val_fraction, seed, runtime):
    """(training conversations, held-out conversations). 'demo' is written from the world once (rank 0); a custom
    dataset without eval_dataset gives a seeded random val_fraction of its records to the held-out set."""
    if dataset == "demo":
        demo_dir = data_dir or os.path.join("data", "sft_demo")
        if runtime.is_master:
            write_demo_dataset(demo_dir, world_seed=world_seed)
        barrier(runtime)
        dataset, eval_dataset = os.path.join(demo_dir, "train"), eval_dataset or os.path.join(demo_dir, "heldout")
    train = load_conversations(dataset)
    if eval_dataset:
        return train, load_conversations(eval_dataset)
    order = torch.randperm(len(train), generator=torch.Generator().manual_seed(seed)).tolist()
    n_val = max(1, round(len(order) * val_fraction))
    return [train[i] for i in sorted(order[n_val:])], [train[i] for i in sorted(order[:n_val])]


def spread(items, count):
    """`count` items evenly spread over the list (every task of a held-out set is generated)."""
    count = min(count, len(items))
    return [items[i * len(items) // count] for i in range(count)]


def main(argv=None):
    from nanollm.configurator import configure_command

    settings = dict(
        tokenizer=os.path.join("out", "tokenizer.model"),
        first=0,  # index of the first conversation shown
        count=3,  # how many conversations to show
        block_size=1024,  # truncate as training would
        tokens=False,  # True: one token per line: position, id, TRAIN, piece
    )
    words = configure_command("python -m nanollm.sft show FILE", settings, sys.argv[1:] if argv is None else argv)
    if len(words) != 2 or words[0] != "show":
        raise UserError(f"command line: expected 'show FILE [--key=value ...]' (FILE: a .json or .jsonl SFT file), "
                        f"got {' '.join(words) or 'nothing'}")
    show(words[1], settings["tokenizer"], settings["first"], settings["count"], settings["block_size"],
         settings["tokens"])


if __name__ == "__main__":
    main()
