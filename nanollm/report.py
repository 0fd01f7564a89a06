"""The pipeline's summary: one markdown report built from the stages' metrics.jsonl files, and the PPO curves.

It shows what each stage reached on held-out data, and the lesson of RLHF in one table and one plot: with a KL
penalty the gold score (the truth the policy never sees) rises; without one (β = 0) the reward-model score keeps
rising while the gold score peaks and falls and the KL runs away: reward hacking (Gao et al. 2023, "Scaling Laws
for Reward Model Overoptimization"; the KL penalty of Ziegler et al. 2019 and InstructGPT, Ouyang et al. 2022).
After pipeline.py --methods=all, one more table and plot: every method against best-of-N at matched KL.
Rebuild from existing runs: python -m nanollm.report --pipeline_dir=out-pipeline   (or --ppo=out-ppo ...)
"""
import json
import math
import os
import sys

from nanollm.comparison import (FAMILIES, METHODS, final_eval, plot_gold_vs_kl, read_best_of_n, run_row,
                                versus_best_of_n)

STAGE_DIRS = {"pretrain": "pretrain", "sft": "sft", "rm": "rm", "ppo": "ppo", "ppo_beta0": "ppo-beta0"}  # in a
# pipeline_dir: the out_dir of each stage
ALL_STAGE_DIRS = {**STAGE_DIRS, **{name: method.folder for name, method in METHODS.items()}}  # with every method
MARKER = "pipeline.json"  # written by pipeline.py in a stage's out_dir: its command, finished or not, wall time
PLOT_NAME = "ppo_curves.png"
COMPARISON_PLOT = "gold_vs_kl.png"
EVAL_KEYS = (("eval_score", "reward-model score", "{:+.3f}"), ("eval_gold", "gold score (1-5)", "{:.3f}"),
             ("eval_gold_gain", "gold gain over the SFT model (paired)", "{:+.3f}"),
             ("eval_gold_gain_se", "... its standard error", "{:.3f}"),
             ("eval_kl", "KL to the SFT model (nats per response)", "{:.3f}"),
             ("eval_response_length", "response length (tokens)", "{:.1f}"), ("eval_eos_rate", "eos rate", "{:.2f}"),
             ("eval_score_zh", "reward-model score, Chinese prompts", "{:+.3f}"),
             ("eval_score_en", "reward-model score, English prompts", "{:+.3f}"),
             ("eval_gold_zh", "gold score, Chinese prompts", "{:.3f}"), ("eval_gold_en", "gold score, English prompts",
                                                                          "{:.3f}"))
LANGUAGE_SUFFIXES = ("_zh", "_en")  # per-language rows: shown only for the languages a run's prompts have
RM_KEYS = (("val_loss", "held-out loss", "{:.4f}"),
           ("val_pair_acc", "pairwise accuracy vs the labelers", "{:.1%}"),
           ("val_pair_acc_zh", "... on Chinese prompts", "{:.1%}"),
           ("val_pair_acc_en", "... on English prompts", "{:.1%}"),
           ("val_gold_pair_acc", "pairwise accuracy vs the gold annotator", "{:.1%}"),
           ("val_gold_fact_pair_acc", "... on pairs that differ in facts", "{:.1%}"),
           ("val_gold_form_pair_acc", "... on pairs equally accurate", "{:.1%}"),
           ("val_spearman", "Spearman vs the labels (per prompt)", "{:+.3f}"),
           ("val_kendall", "Kendall vs the labels (per prompt)", "{:+.3f}"),
           ("val_gold_spearman", "Spearman vs gold (per prompt)", "{:+.3f}"),
           ("val_gold_kendall", "Kendall vs gold (per prompt)", "{:+.3f}"),
           ("val_length_corr", "corr(reward, response length)", "{:+.3f}"),
           ("val_label_length_corr", "corr(label, response length)", "{:+.3f}"),
           ("val_gold_length_corr", "corr(gold score, response length)", "{:+.3f}"))
SFT_FORMATS = {"val_loss": "{:.4f}", "val_ppl": "{:.2f}"}  # the generation metrics: {:.4f}


def read_run(out_dir):
    """The records of out_dir/metrics.jsonl, or None when the stage has not run (no folder or no file)."""
    path = os.path.join(out_dir, "metrics.jsonl")
    if not os.path.isfile(path):
        return None
    records = []
    with open(path, encoding="utf-8") as f:
        for line_number, line in enumerate(f, 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise ValueError(f"{path}:{line_number}: not a JSON line ({e.msg})") from None
    return records


def read_marker(out_dir):
    """pipeline.py's record of a stage ({'command', 'finished', 'wall_s', 'resumed'}), or None."""
    path = os.path.join(out_dir, MARKER)
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)


def fmt(value, spec="{:.4f}"):
    """A number for a table cell; missing or nan values read 'n/a'."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "n/a"
    return spec.format(value)


def table(header, rows):
    """A markdown table: header cells, then rows of cells."""
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    return "\n".join(lines + ["| " + " | ".join(row) + " |" for row in rows])


def missing(title, out_dir):
    return f"## {title}\n\n_missing: no metrics.jsonl in `{out_dir}` (the stage has not run)._\n"


def pretrain_section(records, out_dir=""):
    """Validation loss and perplexity at the first and last evaluation; mean training throughput."""
    if records is None:
        return missing("Pretraining", out_dir)
    evals = [r for r in records if "val_loss" in r]
    if not evals:
        return f"## Pretraining\n\n_no evaluation logged yet in `{out_dir}`._\n"
    first, last = evals[0], evals[-1]
    rows = [[label, fmt(first.get(key), spec), fmt(last.get(key), spec)]
            for key, label, spec in (("train_loss", "train loss", "{:.4f}"), ("val_loss", "val loss", "{:.4f}"),
                                     ("val_ppl", "val perplexity", "{:.2f}"))]
    text = "## Pretraining\n\n" + table(["", f"iteration {first['iter']}", f"iteration {last['iter']}"], rows)
    speeds = [r["tokens_per_sec"] for r in records if "tokens_per_sec" in r and r.get("iter", 0) > 0]
    if speeds:  # iteration 0 is left out: it includes warm-up
        text += f"\n\nTraining throughput: {sum(speeds) / len(speeds):,.0f} tokens/s (mean of {len(speeds)} logged " \
                f"iterations)."
    return text + "\n"


def sft_section(records, out_dir=""):
    """The held-out metrics before and after SFT (train_sft.py's 'before' and 'after' lines)."""
    if records is None:
        return missing("Supervised fine-tuning", out_dir)
    before = next((r for r in records if r.get("phase") == "before"), None)
    after = next((r for r in reversed(records) if r.get("phase") == "after"), None)
    if before is None:
        return f"## Supervised fine-tuning\n\n_no 'before' evaluation in `{out_dir}`._\n"
    keys = [k for k in (after or before) if k not in ("iter", "phase")]
    rows = [[key, fmt(before.get(key), SFT_FORMATS.get(key, "{:.4f}")),
             fmt(after.get(key), SFT_FORMATS.get(key, "{:.4f}")) if after else "n/a"] for key in keys]
    text = "## Supervised fine-tuning\n\nHeld-out set: assistant-token loss and greedy replies scored against the " \
           "references.\n\n" + table(["metric", "before SFT", f"after SFT (iteration {after['iter']})" if after
                                      else "after SFT (unfinished)"], rows)
    return text + "\n"


def rm_section(records, out_dir=""):
    """Held-out agreement of the reward model with the labels and with the gold annotator, and the length bias."""
    if records is None:
        return missing("Reward model", out_dir)
    evals = [r for r in records if "val_pair_acc" in r]
    if not evals:
        return f"## Reward model\n\n_no evaluation logged yet in `{out_dir}`._\n"
    first = evals[0]
    final = next((r for r in reversed(evals) if r.get("phase") == "final"), None)
    last = final or evals[-1]
    rows = [[label, fmt(first.get(key), spec), fmt(last.get(key), spec)] for key, label, spec in RM_KEYS
            if key in first or key in last]
    header = ["held-out", f"iteration {first['iter']} (untrained head)",
              f"iteration {last['iter']}" + (" (final)" if final else " (unfinished)")]
    text = "## Reward model\n\n" + table(header, rows)
    if "val_label_length_corr" in last:
        text += "\n\nThe labelers' length bias: compare corr(label, length) with corr(gold score, length); a reward " \
                "model that learned the bias has corr(reward, length) above the gold one."
    return text + "\n"


def ppo_evals(records):
    """The held-out evaluation lines of a train_ppo.py run (phase 'eval'), in iteration order."""
    return [r for r in records if r.get("phase") == "eval"]


def best_gold(records):
    """The evaluation line whose gold score on the validation prompts is highest (the first one on ties): the iteration
    one would pick without looking at the test prompts it is reported on. Runs without validation prompts fall back
    to the test prompts' gold, which then flatters the pick."""
    evals = ppo_evals(records)
    key = "val_gold" if evals and all("val_gold" in r for r in evals) else "eval_gold"
    return max(evals, key=lambda r: (r[key], -r["iter"])) if evals else None


def run_label(name, records):
    """'PPO, β = 0.05' from the β logged on the training lines ('adaptive β 0.05 → 0.08' when it moved)."""
    betas = [r["beta"] for r in records if "beta" in r]
    if not betas:
        return name
    if max(betas) == min(betas):
        return f"{name}, β = {betas[0]:g}"
    return f"{name}, adaptive β {betas[0]:.3g} → {betas[-1]:.3g}"


def ppo_section(runs):
    """One table over both PPO runs on the fixed held-out prompts: iteration 0 (the SFT model), the last
    evaluation and, where asked, the evaluation with the best gold score.

    runs: list of (name, records or None, out_dir, show_best_gold)."""
    header, columns, notes = ["held-out prompts"], [], []
    for name, records, out_dir, show_best in runs:
        evals = ppo_evals(records) if records is not None else []
        if not evals:
            notes.append(f"_{name}: missing: no held-out evaluation in `{out_dir}` (the stage has not run)._")
            continue
        label = run_label(name, records)
        first, last = evals[0], evals[-1]
        header += [f"{label}: iteration {first['iter']}", f"iteration {last['iter']}"]
        columns += [first, last]
        gold = (f"gold {first['eval_gold']:.3f} → {last['eval_gold']:.3f} "
                f"({last['eval_gold'] - first['eval_gold']:+.3f})") if "eval_gold" in last else "no gold judge"
        notes.append(f"{label}: {gold}, reward-model score {first['eval_score']:+.3f} → {last['eval_score']:+.3f}, KL "
                     f"{last['eval_kl']:.3f} at iteration {last['iter']}.")
        if "eval_gold_gain" in last:
            notes[-1] = notes[-1][:-1] + (f"; gold gain over the SFT model on the same seeded samples "
                                          f"{last['eval_gold_gain']:+.3f} ± {last['eval_gold_gain_se']:.3f}.")
        if show_best:
            best = best_gold(records)
            header.append(f"best gold (iteration {best['iter']})")
            columns.append(best)
            chosen_on = "validation" if "val_gold" in best else "test"
            notes[-1] += f" Best gold {best['eval_gold']:.3f} at iteration {best['iter']} (chosen on the {chosen_on} " \
                         f"prompts)."
    text = "## PPO (RLHF)\n\nThe same fixed held-out prompts and sampling seed at every evaluation; the gold score " \
           "is the gold annotator's, which the policy never sees. The paired gain compares each prompt's mean gold " \
           "with the SFT model's on the same seeded samples.\n\n"
    if columns:
        rows = [[label] + [fmt(column.get(key), spec) for column in columns] for key, label, spec in EVAL_KEYS
                if not key.endswith(LANGUAGE_SUFFIXES) or any(key in column for column in columns)]
        text += table(header, rows) + "\n\n"
    return text + "\n".join(f"- {note}" for note in notes) + "\n"


def timing_section(timings):
    """timings: list of (stage, wall seconds or None, note). The total counts the known times."""
    rows = [[stage, fmt(seconds, "{:.1f}"), note] for stage, seconds, note in timings]
    total = sum(seconds for _, seconds, _ in timings if seconds is not None)
    rows.append(["**total**", f"**{total:.1f}**", f"{total / 60:.1f} minutes"])
    return "## Wall time\n\n" + table(["stage", "wall time (s)", ""], rows) + "\n"


def plot_ppo(runs, path):
    """Reward-model score, gold score and KL to the reference against iteration, the runs overlaid: held-out
    evaluations as lines with markers, per-iteration training values faintly behind. Returns False (and writes
    nothing) when matplotlib is not installed. runs: list of (label, records)."""
    try:
        import matplotlib  # noqa: F401  (raises ImportError when missing)
        from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    except ImportError:
        return False
    figure = Figure(figsize=(13, 3.8))
    axes = figure.subplots(1, 3)
    panels = (("eval_score", "score", "reward-model score"), ("eval_gold", "gold", "gold score (never trained on)"),
              ("eval_kl", "kl", "KL to the SFT model (nats/response)"))
    for index, (label, records) in enumerate(runs):
        color = f"C{index}"
        evals = ppo_evals(records)
        training = [r for r in records if "phase" not in r and "score" in r]
        for axis, (eval_key, train_key, title) in zip(axes, panels):  # no gold judge: an empty gold panel
            trained, evaluated = [r for r in training if train_key in r], [r for r in evals if eval_key in r]
            axis.plot([r["iter"] for r in trained], [r[train_key] for r in trained], color=color, alpha=0.2,
                      linewidth=1)
            axis.plot([r["iter"] for r in evaluated], [r[eval_key] for r in evaluated], color=color, marker="o",
                      markersize=3, label=label)
            axis.set_title(title)
            axis.set_xlabel("PPO iteration")
            axis.grid(alpha=0.3)
    axes[0].legend(fontsize=8)
    figure.suptitle("held-out prompts (lines with markers); training batches (faint)", fontsize=9)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=110)
    return True


def plus_minus(value, se, spec="{:+.3f}"):
    return "n/a" if value is None else f"{spec.format(value)} ± {fmt(se, '{:.3f}')}"


def comparison_section(stage_dirs, report_dir):
    """Every method's final evaluation on the test prompts beside best-of-N's, and gold_vs_kl.png (nanollm/
    comparison.py); '' when nothing beyond the pipeline's two PPO runs has run."""
    runs, markers = [], {}
    for name in METHODS:
        folder = stage_dirs.get(name)
        markers[name] = read_marker(folder) if folder else None
        records = read_run(folder) if folder and name != "best_of_n" else None
        if (final_eval(records) or {}).get("iter"):  # a run still at iteration 0 has nothing to show yet
            runs.append(run_row(name, records, markers[name]))
    best_rows = read_best_of_n(stage_dirs["best_of_n"]) if stage_dirs.get("best_of_n") else None
    if not best_rows and all(r["stage"] in STAGE_DIRS for r in runs):
        return ""
    arithmetic = [r for r in runs if "eval_accuracy" in r["last"]]  # its own test prompts: arithmetic questions
    compared = sorted((r for r in runs if r not in arithmetic), key=lambda r: (FAMILIES.index(r["family"]), r["kl"]))
    header = ["method", "iterations", "gold gain over SFT (± SE)", "vs best-of-N at the same KL (± SE)",
              "reward-model score", "KL to SFT", "length", "wall time (s)"]
    rows = []
    if compared:  # iteration 0 of any run is the SFT model itself
        start = compared[0]["first"]
        rows.append(["SFT model (the start)", "0", "0", "", fmt(start.get("eval_score"), "{:+.3f}"), "0",
                     fmt(start.get("eval_response_length"), "{:.1f}"), ""])
    for r in compared:
        versus = versus_best_of_n(r, best_rows)
        beyond = best_rows and r["kl"] is not None and r["kl"] > max(row["kl"] for row in best_rows)
        unfinished = "" if (markers[r["stage"]] or {}).get("finished", True) else " (unfinished)"
        rows.append([r["label"] + unfinished, str(r["iter"]), plus_minus(r["gain"], r["gain_se"]),
                     f"{plus_minus(*versus[:2])} ({versus[2]})" if versus else
                     f"n/a (KL beyond N = {max(row['n'] for row in best_rows)})" if beyond else "n/a",
                     fmt(r["score"], "{:+.3f}"), fmt(r["kl"], "{:.3f}"), fmt(r["length"], "{:.1f}"),
                     fmt(r["wall_s"], "{:.0f}")])
    wall = (markers.get("best_of_n") or {}).get("wall_s")
    for index, row in enumerate(best_rows or []):
        rows.append([f"best-of-N, N = {row['n']}", "0", plus_minus(row["gold_gain"], row["gold_gain_se"]), "",
                     fmt(row["score"], "{:+.3f}"), f"{row['kl']:.3f}", fmt(row["response_length"], "{:.1f}"),
                     f"{fmt(wall, '{:.0f}')} (all N)" if index == 0 else ""])
    text = "## The methods side by side\n\nEach from the same SFT model, reward model, preference data and seeds, at " \
           "its last evaluation on the same test prompts: gold gain over the SFT model on the same seeded samples " \
           "(paired, ± standard error over prompts), KL to the SFT model in nats per response (best-of-N: " \
           "log N − (N−1)/N, an upper bound). 'vs best-of-N': the gain minus best-of-N's at the same KL (linear " \
           "between the measured N), the two standard errors combined as independent; 'above' / 'below' when the " \
           "difference is more than 2 standard errors.\n\n" + table(header, rows) + "\n"
    if arithmetic:
        rows = [[r["label"], plus_minus(r["first"]["eval_accuracy"], r["first"].get("eval_accuracy_se"), "{:.3f}"),
                 plus_minus(r["last"]["eval_accuracy"], r["last"].get("eval_accuracy_se"), "{:.3f}"),
                 plus_minus(r["gain"], r["gain_se"]), fmt(r["kl"], "{:.3f}")] for r in arithmetic]
        text += "\nVerifiable reward, on held-out arithmetic questions (its own test prompts):\n\n" + table(
            ["run", "accuracy before (± SE)", "accuracy after (± SE)", "gold gain (± SE)", "KL to SFT"], rows) + "\n"
    if compared or best_rows:
        if plot_gold_vs_kl(compared, best_rows, os.path.join(report_dir, COMPARISON_PLOT)):
            text += f"\n![gold gain and reward-model score against KL to the SFT model]({COMPARISON_PLOT})\n"
        else:
            text += "\n_Plot skipped: matplotlib is not installed (pip install matplotlib)._\n"
    return text


def build_report(stage_dirs, report_dir, notes=None):
    """Write report_dir/report.md (and report_dir/ppo_curves.png, gold_vs_kl.png when matplotlib is there); return
    the markdown.

    stage_dirs: {'pretrain', 'sft', 'rm', 'ppo', 'ppo_beta0'} -> out_dir (a missing key or folder reads 'missing'),
    and any of comparison.METHODS' stages -> out_dir.
    notes: optional {stage: note} for the wall-time table (e.g. 'skipped: already done')."""
    notes = notes or {}
    records = {stage: read_run(stage_dirs[stage]) if stage_dirs.get(stage) else None for stage in STAGE_DIRS}
    where = {stage: stage_dirs.get(stage) or "(not given)" for stage in STAGE_DIRS}
    runs = [("ppo", records["ppo"], where["ppo"], False),
            ("ppo-beta0", records["ppo_beta0"], where["ppo_beta0"], True)]
    sections = ["# nanollm pipeline report\n", pretrain_section(records["pretrain"], where["pretrain"]),
                sft_section(records["sft"], where["sft"]), rm_section(records["rm"], where["rm"]), ppo_section(runs)]
    plotted = [(run_label(name, r), r) for name, r, _, _ in runs if r is not None and ppo_evals(r)]
    if plotted:
        if plot_ppo(plotted, os.path.join(report_dir, PLOT_NAME)):
            sections.append(f"![reward-model score, gold score and KL against PPO iteration]({PLOT_NAME})\n")
        else:
            sections.append("_Plot skipped: matplotlib is not installed (pip install matplotlib)._\n")
    sections.append(comparison_section(stage_dirs, report_dir))
    timings, recorded = [], False
    methods = [name for name in METHODS if name not in STAGE_DIRS and stage_dirs.get(name)]
    for stage in list(STAGE_DIRS) + [name for name in methods if read_marker(stage_dirs[name])]:
        marker = read_marker(stage_dirs[stage]) if stage_dirs.get(stage) else None
        if marker is None:
            timings.append((stage, None, notes.get(stage, "no pipeline record")))
            continue
        recorded = True
        note = "finished" if marker.get("finished") else "unfinished"
        if marker.get("resumed"):
            note += " (resumed after an interruption" + (")" if marker.get("wall_s") is not None else
                                                         "; a part of it was never timed)")
        timings.append((stage, marker.get("wall_s"), notes.get(stage, note)))
    if recorded:  # the wall-time table needs pipeline.py's records
        sections.append(timing_section(timings))
    markdown = "\n".join(section for section in sections if section)
    os.makedirs(report_dir, exist_ok=True)
    with open(os.path.join(report_dir, "report.md"), "w", encoding="utf-8") as f:
        f.write(markdown)
    return markdown


def main(argv=None):
    from nanollm.configurator import UserError, configure_command

    settings = dict(
        pipeline_dir="",  # a pipeline.py folder: its stages in pretrain/, sft/, rm/, ppo/, ppo-beta0/, dpo/, ...
        **{stage: "" for stage in STAGE_DIRS},  # one stage's out_dir (overrides the one in pipeline_dir)
        report_dir="",  # where report.md and the plot go ('' = pipeline_dir, else 'report')
    )
    words = configure_command("python -m nanollm.report", settings, sys.argv[1:] if argv is None else argv,
                              renamed={"out": "report_dir"})
    if words:
        raise UserError(f"command line: unexpected argument '{words[0]}' (a pipeline folder: "
                        f"--pipeline_dir={words[0]})")
    pipeline_dir = settings["pipeline_dir"]
    stage_dirs = {stage: os.path.join(pipeline_dir, folder) for stage, folder in ALL_STAGE_DIRS.items()} \
        if pipeline_dir else {}
    stage_dirs.update({stage: settings[stage] for stage in STAGE_DIRS if settings[stage]})
    if not stage_dirs:
        raise UserError("give --pipeline_dir or at least one stage folder (e.g. --ppo=out-ppo --ppo_beta0=out-ppo-b0)")
    report_dir = settings["report_dir"] or pipeline_dir or "report"
    print(build_report(stage_dirs, report_dir))
    print(f"[report] wrote {os.path.join(report_dir, 'report.md')}")


if __name__ == "__main__":
    main()
