"""People label replies: the labeling page's items and server, its label file, and how far labelers agree.

Teaches the human side of RLHF's feedback step (Stiennon et al. 2020; Ouyang et al. 2022, InstructGPT): K replies per
prompt, sampled once from a checkpoint so that every labeler sees the same ones, each scored 1-5 on accuracy,
relevance, naturalness and conciseness and then ranked. How often two people order a pair of replies the same way
(InstructGPT: about 73%) bounds how well any reward model can fit them; Kendall's τ (Kendall 1938) says the same per
prompt on a -1..1 scale. The page is nanollm/web/label.html; the script is label.py.
"""
import ipaddress
import itertools
import json
import os
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from nanollm.annotators import DIMENSIONS, WEIGHTS, GoldAnnotator, feedback_prompts, sample_responses
from nanollm.configurator import MissingFileError, UserError
from nanollm.loader import load_model
from nanollm.metrics import kendall_tau
from nanollm.records import read_json, read_jsonl
from nanollm.reward import prompt_key
from nanollm.sft import read_prompts
from nanollm.world import World

PAGE_PATH = os.path.join(os.path.dirname(os.path.abspath(__file__)), "web", "label.html")
MAX_NAME = 64  # characters of a labeler's name


def write_atomically(path, text):
    """Write the whole file through a temporary file, flushed to disk, then renamed over `path`: a crash at any moment
    leaves either the old file or the new one, never half of one."""
    temporary = f"{path}.tmp"
    with open(temporary, "w", encoding="utf-8") as handle:
        handle.write(text)
        handle.flush()
        os.fsync(handle.fileno())
    os.replace(temporary, path)


# ----------------------------------------------------------------------------- items: prompts and their K replies
def items_path(labels_path):
    """Where the sampled replies are kept: labels.jsonl -> labels.items.json, beside the labels."""
    return os.path.splitext(labels_path)[0] + ".items.json"


def labeling_prompts(prompts, n_prompts=20, seed=0, world_seed=0):
    """'world': n_prompts of the world's training questions (never a PPO test or validation question); else a prompts
    file (sft.read_prompts: text or chat messages ending on a user turn)."""
    if prompts == "world":
        return feedback_prompts(World(world_seed), n_prompts, seed, "train")
    return read_prompts(prompts)


def prepare_items(out_dir, prompts, k, path, max_new_tokens=32, temperature=1.0, seed=0, device="cpu"):
    """The items [{"input": prompt, "responses": [K replies]}]: sampled once from the model in out_dir (seeded) and
    kept in `path`, so that every labeler and every restart sees the same replies. A kept file made for other prompts
    or another k is an error (delete it, or label into another file)."""
    if os.path.exists(path):
        kept = read_json(path)
        if kept.get("k") != k or [item["input"] for item in kept.get("items", [])] != prompts:
            raise UserError(f"{path}: its replies were sampled for other prompts or k={kept.get('k')} (asked: "
                            f"{len(prompts)} prompts, k={k}); delete it to sample again, or choose another labels file")
        return kept["items"]
    model, tokenizer, _, _ = load_model(out_dir, device)
    if tokenizer is None:
        raise MissingFileError(f"{out_dir}: no tokenizer.model beside the model")
    replies = sample_responses(model, tokenizer, prompts, k, (temperature,), max_new_tokens, seed=seed)
    items = [{"input": prompt, "responses": group} for prompt, group in zip(prompts, replies)]
    write_atomically(path, json.dumps({"out_dir": os.path.abspath(out_dir), "k": k, "seed": seed,
                                       "temperature": temperature, "items": items}, ensure_ascii=False, indent=1))
    return items


# ----------------------------------------------------------------------------- one answer -> one record
def overall(scores, reply):
    """The reply's 1-5 score: Σ WEIGHTS[d] · score_d (the gold annotator's weights: accuracy counts most)."""
    return round(sum(WEIGHTS[d] * scores[d][reply] for d in DIMENSIONS), 4)


def make_record(items, item, labeler, scores, ranking):
    """A labeler's answer on items[item] -> the record written: the seed's {"input", "outputs": [{"response", "score"}]}
    (score = the weighted mean of the four dimensions; train_rm.py reads it) plus "scores" (each dimension, 1-5 per
    reply), "ranking" (1-based reply numbers, best first: train_rm.py takes its pairs from it), "labeler", "item".
    ValueError with a readable message for anything malformed."""
    if not isinstance(labeler, str) or not labeler.strip() or len(labeler.strip()) > MAX_NAME:
        raise ValueError(f"labeler: a name of 1 to {MAX_NAME} characters is needed")
    if isinstance(item, bool) or not isinstance(item, int) or not 0 <= item < len(items):
        raise ValueError(f"item: expected a number from 0 to {len(items) - 1}, got {item!r}")
    k = len(items[item]["responses"])
    if not isinstance(scores, dict) or set(scores) != set(DIMENSIONS):
        raise ValueError(f"scores: expected one list per dimension {', '.join(DIMENSIONS)}")
    for dimension in DIMENSIONS:
        values = scores[dimension]
        if not isinstance(values, list) or len(values) != k or \
                not all(isinstance(v, int) and not isinstance(v, bool) and 1 <= v <= 5 for v in values):
            raise ValueError(f"scores.{dimension}: expected {k} whole numbers from 1 to 5, got {values!r}")
    if not isinstance(ranking, list) or sorted(ranking) != list(range(1, k + 1)):
        raise ValueError(f"ranking: expected the reply numbers 1..{k}, each once, best first; got {ranking!r}")
    responses = items[item]["responses"]
    return {"input": items[item]["input"],
            "outputs": [{"response": response, "score": overall(scores, i)} for i, response in enumerate(responses)],
            "scores": {d: scores[d] for d in DIMENSIONS}, "ranking": ranking, "labeler": labeler.strip(), "item": item}


class LabelStore:
    """The labels file: one JSON line per answer (a labeler's later answer on an item replaces the earlier one), the
    whole file rewritten atomically at every answer. Reopening it resumes each labeler at their first unlabeled item."""

    def __init__(self, path, items):
        self.path, self.items, self.lock = path, items, threading.Lock()
        self.records = [record for _, record in read_jsonl(path)] if os.path.exists(path) else []
        for number, record in enumerate(self.records, start=1):
            item = record.get("item") if isinstance(record, dict) else None
            if not isinstance(item, int) or not 0 <= item < len(items) or record.get("input") != items[item]["input"] \
                    or not isinstance(record.get("labeler"), str):
                raise UserError(f"{path}:{number}: this label is not about an item of {len(items)} being labeled "
                                f"(another prompt list?); label into another file")

    def done(self, labeler):
        return {record["item"] for record in self.records if record["labeler"] == labeler}

    def next_item(self, labeler):
        """The first item this labeler has not labeled, or None when all are."""
        done = self.done(labeler)
        return next((index for index in range(len(self.items)) if index not in done), None)

    def add(self, record):
        with self.lock:
            self.records = [r for r in self.records if (r["labeler"], r["item"]) != (record["labeler"], record["item"])]
            self.records.append(record)
            write_atomically(self.path, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in self.records))


# ----------------------------------------------------------------------------- agreement
def places(ranking):
    """1-based reply numbers, best first -> per reply, a preference (higher is better): [2, 3, 1] -> [-2, 0, -1]."""
    preference = [0] * len(ranking)
    for place, reply in enumerate(ranking):
        preference[reply - 1] = -place
    return preference


def pair_agreement(first, second):
    """(pairs ordered the same way, pairs): over the replies i < j, of two preferences (higher is better); a pair one
    of them ties is skipped."""
    agree = total = 0
    for i, j in itertools.combinations(range(len(first)), 2):
        if first[i] != first[j] and second[i] != second[j]:
            total += 1
            agree += (first[i] > first[j]) == (second[i] > second[j])
    return agree, total


def agreement_report(records, judge=None):
    """{"labelers": [(a, b, items both labeled, pairwise agreement, mean Kendall τ over those items)],
    "gold": [(labeler, items the judge knows, pairwise agreement with the judge's overall scores)]}: rankings
    compared pair by pair (the per-dimension scores are not), on the items both labeled (same prompt and replies)."""
    rankings = {}  # labeler -> {item key: preference}
    for record in records:
        key = (prompt_key(record["input"]), tuple(output["response"] for output in record["outputs"]))
        rankings.setdefault(record["labeler"], {})[key] = places(record["ranking"])
    report = {"labelers": [], "gold": []}
    for a, b in itertools.combinations(sorted(rankings), 2):
        common = sorted(set(rankings[a]) & set(rankings[b]))
        if common:
            counts = [pair_agreement(rankings[a][key], rankings[b][key]) for key in common]
            taus = [kendall_tau(rankings[a][key], rankings[b][key]) for key in common]
            agreement = sum(agreed for agreed, _ in counts) / max(1, sum(pairs for _, pairs in counts))
            report["labelers"].append((a, b, len(common), agreement, sum(taus) / len(taus)))
    for labeler in sorted(rankings) if judge is not None else []:
        agree = total = items = 0
        for (prompt, replies), preference in rankings[labeler].items():
            messages = [{"role": role, "content": content} for role, content in prompt]
            if judge.question(messages) is not None:
                gold = [judge.judge(messages, reply).overall for reply in replies]
                agreed, pairs = pair_agreement(preference, gold)
                agree, total, items = agree + agreed, total + pairs, items + 1
        if items:
            report["gold"].append((labeler, items, agree / total if total else float("nan")))
    return report


def format_report(report):
    lines = ["| labelers | items both labeled | pairwise agreement | Kendall τ (mean over items) |", "|---|---|---|---|"]
    lines += [f"| {a} / {b} | {n} | {agreement:.1%} | {tau:+.3f} |" for a, b, n, agreement, tau in report["labelers"]]
    if not report["labelers"]:
        lines.append("| (no item labeled by two labelers yet) | | | |")
    if report["gold"]:
        lines += ["", "| labeler | world prompts labeled | pairwise agreement with the gold annotator |",
                  "|---|---|---|"]
        lines += [f"| {labeler} | {n} | {agreement:.1%} |" for labeler, n, agreement in report["gold"]]
    return "\n".join(lines)


def report_labels(labels_path, world_seed=0):
    """The agreement tables of a labels file (gold agreement on the prompts that are world questions)."""
    if not os.path.exists(labels_path):
        raise MissingFileError(f"labels={labels_path!r}: no such file")
    records = [record for _, record in read_jsonl(labels_path)]
    return format_report(agreement_report(records, GoldAnnotator(World(world_seed))))


# ----------------------------------------------------------------------------- the page's server
def shown_prompt(prompt):
    """A prompt as the page shows it: the text, or a conversation as 'role: content' lines."""
    return prompt if isinstance(prompt, str) else "\n".join(f"{m['role']}: {m['content']}" for m in prompt)


class LabelHandler(BaseHTTPRequestHandler):
    """GET / (the page), GET /api/item?labeler=NAME (that labeler's next item), POST /api/label (an answer, JSON; the
    reply is the next item). Requests must name this machine (an IP address or localhost) as their Host."""

    def log_message(self, format, *args):  # quiet: one line per request would drown the script's output
        pass

    def next_for(self, labeler):
        store = self.server.store
        index = store.next_item(labeler)
        body = {"done": len(store.done(labeler)), "total": len(store.items), "dimensions": list(DIMENSIONS)}
        if index is None:
            return dict(body, item=None)
        item = store.items[index]
        return dict(body, item=index, prompt=shown_prompt(item["input"]), responses=item["responses"])

    def host_allowed(self):
        name = urlsplit(f"//{self.headers.get('Host', '')}").hostname or ""
        try:
            ipaddress.ip_address(name)
            return True
        except ValueError:
            return name == "localhost"

    def send(self, status, body, content_type="application/json; charset=utf-8"):
        data = body if isinstance(body, bytes) else json.dumps(body, ensure_ascii=False).encode("utf-8")
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(data)

    def do_GET(self):
        url = urlsplit(self.path)
        if not self.host_allowed():
            return self.send(403, {"error": "use an IP address or localhost to reach this page"})
        if url.path == "/":
            with open(PAGE_PATH, "rb") as handle:
                return self.send(200, handle.read(), "text/html; charset=utf-8")
        if url.path == "/api/item":
            labeler = parse_qs(url.query).get("labeler", [""])[0].strip()
            if not labeler or len(labeler) > MAX_NAME:
                return self.send(400, {"error": f"labeler: a name of 1 to {MAX_NAME} characters is needed"})
            return self.send(200, self.next_for(labeler))
        self.send(404, {"error": f"no page {url.path}"})

    def do_POST(self):
        if not self.host_allowed() or self.headers.get("Content-Type", "").split(";")[0] != "application/json":
            return self.send(403, {"error": "POST JSON (Content-Type: application/json) from this machine"})
        if urlsplit(self.path).path != "/api/label":
            return self.send(404, {"error": f"no page {self.path}"})
        try:
            length = int(self.headers.get("Content-Length", "0"))
            if not 0 < length <= 1 << 20:
                raise ValueError("the request body must be 1 byte to 1 MiB of JSON")
            answer = json.loads(self.rfile.read(length).decode("utf-8"))
            if not isinstance(answer, dict):
                raise ValueError("expected a JSON object")
            record = make_record(self.server.store.items, answer.get("item"), answer.get("labeler"),
                                 answer.get("scores"), answer.get("ranking"))
        except (ValueError, UnicodeDecodeError) as error:  # json.JSONDecodeError is a ValueError
            return self.send(400, {"error": str(error)})
        self.server.store.add(record)
        self.send(200, self.next_for(record["labeler"]))


class LabelServer(ThreadingHTTPServer):
    daemon_threads = True

    def __init__(self, address, store):
        self.store = store
        super().__init__(address, LabelHandler)

