"""The labeling library (nanollm/labeling.py): answers become records train_rm.py reads, the label file is rewritten
atomically and resumes each labeler where they stopped, the sampled replies are kept, and agreement between labelers
(pairwise, Kendall τ) and with the gold annotator matches hand-computed values."""
import json
import os

import pytest

from nanollm.annotators import GoldAnnotator
from nanollm.configurator import UserError
from nanollm.labeling import (LabelStore, agreement_report, items_path, make_record, pair_agreement, places,
                              prepare_items)
from nanollm.reward import load_groups
from nanollm.world import World
from script_runner import run_script

ITEMS = [{"input": "火星与地球相比有何不同?", "responses": ["火星更冷。", "不知道。", "火星是红色的。"]},
         {"input": "Say hi.", "responses": ["Hi.", "Hello there, friend.", "No."]},
         {"input": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "2+2?"}],
          "responses": ["4", "5", "22"]}]
SCORES = {"accuracy": [5, 2, 4], "relevance": [5, 3, 4], "naturalness": [4, 4, 4], "conciseness": [3, 5, 4]}


def test_a_record_is_the_seed_format_with_dimensions_ranking_and_labeler():
    record = make_record(ITEMS, 0, " ana ", SCORES, [1, 3, 2])
    # overall = 0.6·accuracy + 0.15·relevance + 0.125·naturalness + 0.125·conciseness
    assert [output["score"] for output in record["outputs"]] == [4.625, 2.775, 4.0]
    assert record["input"] == ITEMS[0]["input"] and [o["response"] for o in record["outputs"]] == ITEMS[0]["responses"]
    assert record["scores"] == SCORES and record["ranking"] == [1, 3, 2] and record["labeler"] == "ana"
    for item, labeler, scores, ranking, message in (
            (0, "", SCORES, [1, 2, 3], "labeler"), (3, "ana", SCORES, [1, 2, 3], "item"),
            (0, "ana", dict(SCORES, accuracy=[5, 2, 6]), [1, 2, 3], "scores.accuracy"),
            (0, "ana", {"accuracy": [5, 2, 4]}, [1, 2, 3], "scores:"), (0, "ana", SCORES, [1, 1, 3], "ranking")):
        with pytest.raises(ValueError, match=message):
            make_record(ITEMS, item, labeler, scores, ranking)


def test_train_rm_reads_the_labels_with_pairs_from_the_ranking(tmp_path):
    path = tmp_path / "labels.jsonl"
    store = LabelStore(str(path), ITEMS)
    store.add(make_record(ITEMS, 0, "ana", SCORES, [3, 1, 2]))  # the ranking disagrees with the scores on purpose
    store.add(make_record(ITEMS, 2, "ana", SCORES, [1, 2, 3]))
    groups = load_groups(str(path))
    assert [g.prompt for g in groups] == [[{"role": "user", "content": ITEMS[0]["input"]}], ITEMS[2]["input"]]
    assert groups[0].pairs == [(2, 0), (2, 1), (0, 1)] and groups[0].preference == [4.625, 2.775, 4.0]
    assert groups[0].has_scores  # loss='mse' trains on the overall scores


def test_the_seed_feedback_examples_are_reward_data():
    groups = load_groups(os.path.join(os.path.dirname(__file__), "data", "seed_examples", "feedback_dimensions.json"))
    assert [g.preference for g in groups] == [[5.0, 2.5, 4.0], [5.0, 1.0, 2.0], [4.0, 5.0, 3.0]]  # dimension means
    assert groups[2].pairs == [(1, 0), (1, 2), (0, 2)]  # ranking [2, 1, 3]


def test_the_label_file_is_rewritten_whole_and_resumes_each_labeler(tmp_path):
    path = str(tmp_path / "labels.jsonl")
    store = LabelStore(path, ITEMS)
    assert store.next_item("ana") == 0
    store.add(make_record(ITEMS, 0, "ana", SCORES, [1, 2, 3]))
    store.add(make_record(ITEMS, 1, "ana", SCORES, [1, 2, 3]))
    store.add(make_record(ITEMS, 0, "ana", SCORES, [2, 1, 3]))  # a second answer on item 0 replaces the first
    assert not os.path.exists(path + ".tmp")
    reopened = LabelStore(path, ITEMS)  # a restarted server
    assert len(reopened.records) == 2 and reopened.records[-1]["ranking"] == [2, 1, 3]
    assert reopened.next_item("ana") == 2 and reopened.next_item("ben") == 0
    with pytest.raises(UserError, match="labels.jsonl:1: this label is not about an item"):
        LabelStore(path, ITEMS[1:])


def test_agreement_and_kendall_tau_against_hand_computed_values(tmp_path):
    assert places([2, 3, 1]) == [-2, 0, -1]
    assert pair_agreement([0, -1, -2], [0, -2, -1]) == (2, 3)
    records = [make_record(ITEMS, 0, "ana", SCORES, [1, 2, 3]), make_record(ITEMS, 0, "ben", SCORES, [1, 3, 2]),
               make_record(ITEMS, 1, "ana", SCORES, [3, 2, 1]), make_record(ITEMS, 1, "ben", SCORES, [1, 2, 3]),
               make_record(ITEMS, 2, "ana", SCORES, [1, 2, 3])]  # only ana: not compared
    (a, b, items, agreement, tau), = agreement_report(records)["labelers"]
    # item 0: pairs (1,2) (1,3) agree, (2,3) not: 2/3, τ = (2 - 1)/3; item 1: reversed: 0/3, τ = -1
    assert (a, b, items) == ("ana", "ben", 2)
    assert agreement == pytest.approx(2 / 6) and tau == pytest.approx((1 / 3 - 1) / 2)
    path = tmp_path / "labels.jsonl"
    path.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in records), encoding="utf-8")
    printed = run_script("label.py", ["--report=True", f"--labels={path}"]).stdout
    assert "| ana / ben | 2 | 33.3% | -0.333 |" in printed


def test_agreement_with_the_gold_annotator_on_world_prompts():
    gold = GoldAnnotator(World(0))
    question = next(q for q in gold.questions if gold.question(q).language == "en")
    truth = gold.question(question)
    wrong = next(value for value in truth.candidates if value != truth.answer) if truth.candidates else "0"
    items = [{"input": question, "responses": [truth.reference, truth.reference.replace(truth.answer, wrong)]},
             ITEMS[1]]
    two = {d: [3, 3] for d in SCORES}
    records = [make_record(items, 0, "ana", two, [1, 2]), make_record(items, 0, "ben", two, [2, 1]),
               make_record(items, 1, "ana", {d: [3, 3, 3] for d in SCORES}, [1, 2, 3])]  # not a world question
    assert gold.judge(question, items[0]["responses"][0]).overall > gold.judge(question, items[0]["responses"][1]).overall
    report = agreement_report(records, gold)
    assert report["gold"] == [("ana", 1, 1.0), ("ben", 1, 0.0)]
    assert report["labelers"] == [("ana", "ben", 1, 0.0, -1.0)]


def test_the_sampled_replies_are_kept_so_every_labeler_sees_the_same(tmp_path):
    from test_serve import make_checkpoint

    checkpoint = make_checkpoint(tmp_path)
    prompts = ["where does person 3 live?", [{"role": "user", "content": "where does person 5 live?"}]]
    path = items_path(str(tmp_path / "labels.jsonl"))
    assert path == str(tmp_path / "labels.items.json")
    items = prepare_items(str(checkpoint), prompts, 3, path, max_new_tokens=8, seed=1)
    assert [item["input"] for item in items] == prompts and all(len(item["responses"]) == 3 for item in items)
    again = prepare_items("no-such-model", prompts, 3, path, seed=2)  # kept: no model is loaded, the seed is moot
    assert again == items == json.load(open(path, encoding="utf-8"))["items"]
    with pytest.raises(UserError, match="sampled for other prompts or k=3"):
        prepare_items(str(checkpoint), prompts, 4, path)
