"""The pipeline report (nanollm/report.py) on small hand-written metrics.jsonl files whose numbers are known."""
import json
import math
import os
import shutil
import sys

import pytest

from nanollm.configurator import UserError
from nanollm.report import MARKER, PLOT_NAME, best_gold, build_report, main, ppo_evals, read_run, run_label

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def write_run(folder, records, marker=None):
    os.makedirs(folder, exist_ok=True)
    with open(os.path.join(folder, "metrics.jsonl"), "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in records)
    if marker is not None:
        with open(os.path.join(folder, MARKER), "w") as f:
            json.dump(marker, f)
    return str(folder)


def ppo_records(beta, golds, scores, kls, every=5):
    """Training lines every iteration (β logged) and held-out lines every `every` iterations."""
    records = []
    for index, (gold, score, kl) in enumerate(zip(golds, scores, kls)):
        iteration = index * every
        records.append({"iter": iteration, "phase": "eval", "eval_score": score, "eval_gold": gold, "eval_kl": kl,
                        "eval_response_length": 10.0 + index, "eval_eos_rate": 1.0 - 0.25 * index})
        if index < len(golds) - 1:
            records += [{"iter": iteration + k, "score": score, "gold": gold, "kl": kl, "beta": beta}
                        for k in range(every)]
    return records


@pytest.fixture
def stages(tmp_path):
    """Every stage of a pipeline folder, with values chosen so the expected cells can be written by hand."""
    folder = tmp_path / "pipe"
    write_run(folder / "pretrain", [
        {"iter": 0, "train_loss": 5.0, "val_loss": 5.25, "val_ppl": math.exp(5.25)},
        {"iter": 0, "loss": 5.0, "tokens_per_sec": 1000.0},  # warm-up: left out of the mean
        {"iter": 10, "loss": 3.0, "tokens_per_sec": 3000.0},
        {"iter": 20, "loss": 2.0, "tokens_per_sec": 5000.0},
        {"iter": 30, "train_loss": 1.5, "val_loss": 1.75, "val_ppl": math.exp(1.75)}],
        marker={"command": [], "finished": True, "wall_s": 100.0, "resumed": False})
    write_run(folder / "sft", [
        {"iter": 0, "phase": "before", "val_loss": 4.0, "val_ppl": 54.6, "token_f1": 0.125},
        {"iter": 0, "loss": 4.0},
        {"iter": 50, "phase": "after", "val_loss": 1.0, "val_ppl": 2.72, "token_f1": 0.625}],
        marker={"command": [], "finished": True, "wall_s": 30.5, "resumed": False})
    write_run(folder / "rm", [
        {"iter": 0, "val_loss": 0.7, "val_pair_acc": 0.5, "val_gold_pair_acc": 0.4375, "val_gold_kendall": -0.1,
         "val_length_corr": -0.05, "val_label_length_corr": 0.2, "val_gold_length_corr": -0.3},
        {"iter": 10, "val_loss": 0.6, "val_pair_acc": 0.625, "val_gold_pair_acc": 0.875, "val_gold_kendall": 0.5,
         "val_length_corr": 0.25, "val_label_length_corr": 0.2, "val_gold_length_corr": -0.3},
        {"iter": 10, "phase": "final", "val_loss": 0.6, "val_pair_acc": 0.625, "val_gold_pair_acc": 0.875,
         "val_gold_kendall": 0.5, "val_length_corr": 0.25, "val_label_length_corr": 0.2,
         "val_gold_length_corr": -0.3}],
        marker={"command": [], "finished": True, "wall_s": 20.0, "resumed": False})
    write_run(folder / "ppo", ppo_records(0.05, [2.0, 2.4, 2.6], [0.0, 0.5, 0.75], [0.0, 1.0, 2.0]),
              marker={"command": [], "finished": True, "wall_s": 40.0, "resumed": False})
    write_run(folder / "ppo-beta0", ppo_records(0.0, [2.0, 2.9, 2.2], [0.0, 1.5, 3.25], [0.0, 4.0, 16.0]),
              marker={"command": [], "finished": True, "wall_s": 45.0, "resumed": True})
    return folder


def stage_dirs(folder):
    return {"pretrain": str(folder / "pretrain"), "sft": str(folder / "sft"), "rm": str(folder / "rm"),
            "ppo": str(folder / "ppo"), "ppo_beta0": str(folder / "ppo-beta0")}


def test_tables_show_the_hand_known_numbers(stages, tmp_path):
    markdown = build_report(stage_dirs(stages), str(tmp_path / "report"))
    assert open(tmp_path / "report" / "report.md").read() == markdown
    # pretraining: first and last evaluation, mean tokens/s over iterations 10 and 20 = 4000
    assert "| val loss | 5.2500 | 1.7500 |" in markdown
    assert f"| val perplexity | {math.exp(5.25):.2f} | {math.exp(1.75):.2f} |" in markdown
    assert "4,000 tokens/s (mean of 2 logged iterations)" in markdown
    # SFT before / after
    assert "| val_loss | 4.0000 | 1.0000 |" in markdown and "| token_f1 | 0.1250 | 0.6250 |" in markdown
    assert "after SFT (iteration 50)" in markdown
    # reward model: accuracies in percent, correlations signed, the final line used
    assert "| pairwise accuracy vs the gold annotator | 43.8% | 87.5% |" in markdown
    assert "| pairwise accuracy vs the labelers | 50.0% | 62.5% |" in markdown
    assert "| Kendall vs gold (per prompt) | -0.100 | +0.500 |" in markdown
    assert "| corr(reward, response length) | -0.050 | +0.250 |" in markdown
    assert "| corr(label, response length) | +0.200 | +0.200 |" in markdown
    assert "iteration 10 (final)" in markdown
    # PPO: iteration 0 and last of both runs, plus the β = 0 run's best gold (iteration 5)
    assert "ppo, β = 0.05: iteration 0 | iteration 10 | ppo-beta0, β = 0: iteration 0 | iteration 10 | " \
           "best gold (iteration 5) |" in markdown
    assert "| gold score (1-5) | 2.000 | 2.600 | 2.000 | 2.200 | 2.900 |" in markdown
    assert "| reward-model score | +0.000 | +0.750 | +0.000 | +3.250 | +1.500 |" in markdown
    assert "| KL to the SFT model (nats per response) | 0.000 | 2.000 | 0.000 | 16.000 | 4.000 |" in markdown
    assert "| response length (tokens) | 10.0 | 12.0 | 10.0 | 12.0 | 11.0 |" in markdown
    assert "| eos rate | 1.00 | 0.50 | 1.00 | 0.50 | 0.75 |" in markdown
    assert "gold 2.000 → 2.600 (+0.600)" in markdown and "Best gold 2.900 at iteration 5 (chosen on the test" in markdown
    # wall time: each stage and the total 100 + 30.5 + 20 + 40 + 45 = 235.5
    assert "| sft | 30.5 | finished |" in markdown and "| **total** | **235.5** |" in markdown
    assert "| ppo_beta0 | 45.0 | finished (resumed after an interruption) |" in markdown


def test_best_gold_is_the_highest_held_out_gold_and_the_first_on_ties():
    records = ppo_records(0.0, [2.0, 2.5, 2.5, 2.1], [0, 0, 0, 0], [0, 0, 0, 0])
    assert best_gold(records)["iter"] == 5
    assert best_gold([{"iter": 0, "score": 1.0}]) is None


def test_best_gold_is_chosen_on_the_validation_prompts_when_the_run_has_them():
    records = ppo_records(0.0, [2.0, 2.9, 2.2], [0, 0, 0], [0, 0, 0])
    for record, validation_gold in zip(ppo_evals(records), [2.0, 2.1, 2.5]):
        record["val_gold"] = validation_gold
    assert best_gold(records)["iter"] == 10  # not iteration 5, the best on the test prompts


def test_run_label_reads_beta_fixed_or_adaptive():
    assert run_label("ppo", [{"iter": 0, "beta": 0.05}, {"iter": 1, "beta": 0.05}]) == "ppo, β = 0.05"
    assert run_label("ppo", [{"iter": 0, "beta": 0.05}, {"iter": 1, "beta": 0.1}]) == "ppo, adaptive β 0.05 → 0.1"
    assert run_label("ppo", [{"iter": 0, "phase": "eval"}]) == "ppo"


def test_missing_stages_are_reported_as_missing(tmp_path):
    dirs = {"pretrain": str(tmp_path / "nowhere"), "rm": str(tmp_path / "empty")}
    os.makedirs(tmp_path / "empty")
    markdown = build_report(dirs, str(tmp_path / "report"))
    assert markdown.count("_missing: no metrics.jsonl") == 3  # pretrain, sft (not given), rm
    assert f"in `{tmp_path / 'nowhere'}`" in markdown
    assert "_ppo: missing: no held-out evaluation" in markdown and "_ppo-beta0: missing" in markdown
    assert "## Wall time" not in markdown and "Plot" not in markdown and "![" not in markdown
    assert not os.path.exists(tmp_path / "report" / PLOT_NAME)


def test_unfinished_stages_say_so(tmp_path):
    sft = write_run(tmp_path / "sft", [{"iter": 0, "phase": "before", "val_loss": 4.0}, {"iter": 0, "loss": 4.0}])
    rm = write_run(tmp_path / "rm", [{"iter": 0, "val_loss": 0.7, "val_pair_acc": 0.5}],
                   marker={"command": [], "finished": False, "wall_s": None, "resumed": False})
    markdown = build_report({"sft": sft, "rm": rm}, str(tmp_path / "report"))
    assert "after SFT (unfinished)" in markdown and "| val_loss | 4.0000 | n/a |" in markdown
    assert "iteration 0 (unfinished)" in markdown
    assert "| rm | n/a | unfinished |" in markdown


def test_plot_is_a_png_with_both_runs(stages, tmp_path):
    markdown = build_report(stage_dirs(stages), str(tmp_path / "report"))
    path = tmp_path / "report" / PLOT_NAME
    with open(path, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    assert os.path.getsize(path) > 10_000  # three panels of curves, not an empty canvas
    assert f"]({PLOT_NAME})" in markdown


def test_without_matplotlib_the_report_says_the_plot_was_skipped(stages, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # `import matplotlib` now raises ImportError
    markdown = build_report(stage_dirs(stages), str(tmp_path / "report"))
    assert "Plot skipped: matplotlib is not installed (pip install matplotlib)" in markdown
    assert not os.path.exists(tmp_path / "report" / PLOT_NAME)
    assert "| gold score (1-5) | 2.000 | 2.600 |" in markdown  # the tables are still there


def test_cli_rebuilds_from_a_pipeline_dir_or_from_separate_runs(stages, tmp_path, capsys):
    main([f"--pipeline_dir={stages}"])
    assert os.path.exists(stages / "report.md") and os.path.exists(stages / PLOT_NAME)
    assert "| **total** | **235.5** |" in open(stages / "report.md").read()
    main([f"--ppo={stages / 'ppo'}", f"--ppo_beta0={stages / 'ppo-beta0'}", f"--report_dir={tmp_path / 'readme'}"])
    markdown = open(tmp_path / "readme" / "report.md").read()
    assert "best gold (iteration 5)" in markdown and "_missing: no metrics.jsonl in `(not given)`" in markdown
    with open(tmp_path / "readme" / PLOT_NAME, "rb") as f:
        assert f.read(8) == PNG_MAGIC
    with pytest.raises(UserError, match="give --pipeline_dir"):
        main([])  # nothing to report on


def test_a_broken_metrics_line_names_the_file_and_line(tmp_path):
    (tmp_path / "metrics.jsonl").write_text('{"iter": 0}\n{"iter": 1, \n')
    with pytest.raises(ValueError, match=r"metrics.jsonl:2: not a JSON line"):
        read_run(str(tmp_path))
    assert read_run(str(tmp_path / "absent")) is None


# ---- the methods side by side (nanollm/comparison.py): hand-written runs whose cells are known
def method_run(folder, kl, gain, se, score, command, wall_s, iterations=20, **extra):
    """A training run whose last evaluation (iteration `iterations`) has these numbers; iteration 0 is the SFT model."""
    start = {"iter": 0, "phase": "eval", "eval_score": 0.5, "eval_gold": 3.0, "eval_kl": 0.0, "eval_gold_gain": 0.0,
             "eval_gold_gain_se": 0.0, "eval_response_length": 9.0}
    last = {"iter": iterations, "phase": "eval", "eval_score": score, "eval_gold": 3.0 + gain, "eval_kl": kl,
            "eval_gold_gain": gain,
            "eval_gold_gain_se": se, "eval_response_length": 8.0}
    first_extra = {key: value[0] for key, value in extra.items()}
    last_extra = {key: value[1] for key, value in extra.items()}
    return write_run(folder, [dict(start, **first_extra), {"iter": 1, "loss": 1.0}, dict(last, **last_extra)],
                     marker={"command": command, "finished": True, "wall_s": wall_s, "resumed": False})


@pytest.fixture
def methods(tmp_path):
    """PPO at two β, DPO, GRPO, GRPO on the arithmetic reward and best-of-N for N = 1, 2, 4 (KL 0, 0.5, 1.5)."""
    folder = tmp_path / "methods"
    method_run(folder / "ppo", 1.0, 0.3, 0.05, 0.9, ["train_ppo.py"], 150.0)  # β: train_ppo.py's default
    method_run(folder / "ppo-beta0.05", 2.0, 0.5, 0.05, 1.2, ["train_ppo.py", "--init_kl_coef=0.05"], 160.0)
    method_run(folder / "dpo", 0.25, -0.1, 0.02, 0.4, ["train_dpo.py", "--beta=0.1", "--beta=0.3"], 90.0, 120)
    method_run(folder / "grpo", 0.5, 0.3, 0.03, 0.8, ["train_grpo.py"], 120.0)
    method_run(folder / "rloo", 0.0, 0.0, 0.0, 0.5, ["train_grpo.py"], None, 0)  # started: iteration 0 only
    method_run(folder / "grpo-arithmetic", 0.7, 0.2, 0.05, 0.1, ["train_grpo.py", "--reward=arithmetic"], 110.0,
               eval_accuracy=(0.1, 0.4), eval_accuracy_se=(0.02, 0.04))
    os.makedirs(folder / "best-of-n")
    rows = [{"n": 1, "kl": 0.0, "gold_gain": 0.0, "gold_gain_se": 0.0, "score": 0.5, "response_length": 9.0},
            {"n": 2, "kl": 0.5, "gold_gain": 0.1, "gold_gain_se": 0.02, "score": 0.7, "response_length": 9.5},
            {"n": 4, "kl": 1.5, "gold_gain": 0.3, "gold_gain_se": 0.04, "score": 0.9, "response_length": 10.0}]
    json.dump({"rows": rows}, open(folder / "best-of-n" / "best_of_n.json", "w"))
    json.dump({"command": [], "finished": True, "wall_s": 80.0}, open(folder / "best-of-n" / MARKER, "w"))
    return folder


def test_the_comparison_table_has_the_hand_known_cells(methods, tmp_path):
    main([f"--pipeline_dir={methods}"])
    markdown = open(methods / "report.md").read()
    assert "## The methods side by side" in markdown
    assert "| SFT model (the start) | 0 | 0 |  | +0.500 | 0 | 9.0 |  |" in markdown
    # best-of-N at KL 1.0: halfway between N = 2 and N = 4, gain 0.2 ± 0.03; 0.3 − 0.2 ± √(0.05² + 0.03²)
    assert "| PPO, β = 0.2 | 20 | +0.300 ± 0.050 | +0.100 ± 0.058 (within 2 SE) | +0.900 | 1.000 | 8.0 | 150 |" \
        in markdown
    assert "| PPO, β = 0.05 | 20 | +0.500 ± 0.050 | n/a (KL beyond N = 4) | +1.200 | 2.000 | 8.0 | 160 |" in markdown
    # at KL 0.25: 0.05 ± 0.01; −0.1 − 0.05 = −0.15 ± 0.022: below; the last --beta of the command is the one used
    assert "| DPO, β = 0.3 | 120 | -0.100 ± 0.020 | -0.150 ± 0.022 (below) | +0.400 | 0.250 | 8.0 | 90 |" in markdown
    assert "| GRPO, β = 0.1 | 20 | +0.300 ± 0.030 | +0.200 ± 0.036 (above) |" in markdown
    assert "RLOO" not in markdown and markdown.index("## PPO (RLHF)") < markdown.index("## The methods side by side")
    assert "| best-of-N, N = 1 | 0 | +0.000 ± 0.000 |  | +0.500 | 0.000 | 9.0 | 80 (all N) |" in markdown
    assert "| best-of-N, N = 4 | 0 | +0.300 ± 0.040 |  | +0.900 | 1.500 | 10.0 |  |" in markdown
    # rows by family, then by KL; the arithmetic run only in its own table (other test prompts)
    order = [markdown.index(f"| {label} |") for label in ("PPO, β = 0.2", "PPO, β = 0.05", "DPO, β = 0.3",
                                                            "GRPO, β = 0.1", "best-of-N, N = 1")]
    assert order == sorted(order)
    assert "| GRPO, arithmetic reward, β = 0.1 | 0.100 ± 0.020 | 0.400 ± 0.040 | +0.200 ± 0.050 | 0.700 |" in markdown
    assert markdown.count("GRPO, arithmetic reward, β = 0.1") == 1
    # the wall-time table lists the methods that ran, by their stage names
    assert "| ppo_beta0.05 | 160.0 | finished |" in markdown and "| best_of_n | 80.0 | finished |" in markdown
    with open(methods / "gold_vs_kl.png", "rb") as f:
        assert f.read(8) == PNG_MAGIC
    assert os.path.getsize(methods / "gold_vs_kl.png") > 10_000 and "](gold_vs_kl.png)" in markdown


def test_without_best_of_n_the_comparison_says_n_a_and_the_default_report_has_none(methods, stages, tmp_path):
    shutil.rmtree(methods / "best-of-n")
    markdown = build_report({name: str(methods / name.replace("_", "-")) for name in ("ppo", "dpo")},
                            str(tmp_path / "report"))
    assert "| DPO, β = 0.3 | 120 | -0.100 ± 0.020 | n/a | +0.400 | 0.250 | 8.0 | 90 |" in markdown
    default = build_report(stage_dirs(stages), str(tmp_path / "default"))  # the pipeline's two PPO runs only
    assert "## The methods side by side" not in default and not os.path.exists(tmp_path / "default" / "gold_vs_kl.png")
