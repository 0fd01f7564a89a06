"""End-to-end checks of pipeline.py, run as a user runs it (subprocesses, CPU) with every stage made tiny: one run of
the five stages, then copies of it to check skipping, resuming and a failing stage."""
import json
import os
import shutil

import pytest

from nanollm.comparison import METHODS, check_arguments, method_stages, parse_methods
from nanollm.configurator import UserError
from nanollm.report import MARKER, PLOT_NAME, STAGE_DIRS
from nanollm.world import World
from script_runner import run_script

SECTIONS = ("## Pretraining", "## Supervised fine-tuning", "## Reward model", "## PPO (RLHF)", "## Wall time")


def tiny_settings(corpus):
    """Every stage in a few seconds: a 1-layer GPT over a 400-piece tokenizer of world sentences."""
    return ["--pipeline_dir=run", "--device=cpu",
            f"--pretrain_args=--dataset={corpus} --max_iters=20 --eval_interval=10 --n_layer=1 --n_head=2 "
            "--n_embd=32 --block_size=64 --batch_size=4 --vocab_size=400 --eval_iters=1 --sample_tokens=2",
            "--sft_args=--max_iters=4 --eval_examples=4 --batch_size=4 --max_new_tokens=8 --warmup_iters=1",
            "--rm_args=--demo_prompts=24 --demo_k=3 --demo_max_new_tokens=8 --max_iters=5 --eval_interval=5 "
            "--batch_size=4 --warmup_iters=1 --likelihood_weight=1.0",
            "--ppo_args=--max_iters=2 --eval_interval=1 --eval_prompts=8 --eval_batch_size=8 --train_prompts=16 "
            "--batch_size=8 --minibatch_size=4 --ppo_epochs=1 --max_new_tokens=8 --init_kl_coef=0.2 "
            "--validation_prompts=8",
            "--ppo_beta0_args=--max_iters=3"]


def run(cwd, settings, check=True):
    return run_script("pipeline.py", settings, check=check, cwd=cwd)


def metrics(path):
    with open(path) as f:
        return [json.loads(line) for line in f]


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """(folder, settings, output): the tiny pipeline run once in folder/run."""
    folder = tmp_path_factory.mktemp("pipeline")
    lines = [f"{p.question} {p.answer}" for p in World(0).qa_pairs(0) if p.language == "en"]
    (folder / "text.txt").write_text("\n".join(lines) + "\n", encoding="utf-8")
    settings = tiny_settings(folder / "text.txt")
    return folder, settings, run(folder, settings).stdout


def copy_of(finished, tmp_path):
    folder, settings, _ = finished
    shutil.copytree(folder / "run", tmp_path / "run")
    return settings


def test_one_command_runs_every_stage_and_writes_the_report(finished):
    folder, _, output = finished
    run_dir = folder / "run"
    for stage, name in STAGE_DIRS.items():
        assert f"[pipeline] {stage}: done in" in output
        marker = json.load(open(run_dir / name / MARKER))
        assert marker["finished"] and marker["wall_s"] > 0 and os.path.exists(run_dir / name / "ckpt.pt")
        log = open(run_dir / f"{name}.log").read()
        assert log.startswith("$ ") and f"--out_dir={os.path.join('run', name)}" in log.splitlines()[0]
    assert "--init_kl_coef=0" in open(run_dir / "ppo-beta0.log").readline()
    assert "--data_dir=run/data/rm_demo" in open(run_dir / "rm.log").readline()
    report = open(run_dir / "report.md").read()
    assert all(section in report for section in SECTIONS) and "missing" not in report
    with open(run_dir / PLOT_NAME, "rb") as f:
        assert f.read(8) == b"\x89PNG\r\n\x1a\n"
    # the numbers come from the stages' metrics
    pretrain_final = [r for r in metrics(run_dir / "pretrain" / "metrics.jsonl") if "val_loss" in r][-1]
    assert "| val loss |" in report and f"{pretrain_final['val_loss']:.4f} |" in report
    beta0_final = [r for r in metrics(run_dir / "ppo-beta0" / "metrics.jsonl") if r.get("phase") == "eval"][-1]
    assert beta0_final["iter"] == 3 and f"{beta0_final['eval_gold']:.3f}" in report  # ppo_beta0_args come last
    assert "ppo, β = 0.2" in report and "ppo-beta0, β = 0" in report  # ppo_args reach both; β = 0 wins in one


def test_a_second_invocation_skips_every_finished_stage(finished, tmp_path):
    settings = copy_of(finished, tmp_path)
    before = {name: open(tmp_path / "run" / name / "metrics.jsonl").read() for name in STAGE_DIRS.values()}
    output = run(tmp_path, settings).stdout
    assert output.count("skipped") >= 5 and "running" not in output and "resuming" not in output
    assert before == {name: open(tmp_path / "run" / name / "metrics.jsonl").read() for name in STAGE_DIRS.values()}
    report = open(tmp_path / "run" / "report.md").read()
    assert all(section in report for section in SECTIONS) and "skipped: already done" in report


def test_an_interrupted_stage_resumes_and_only_the_stages_that_read_it_rerun(finished, tmp_path):
    settings = copy_of(finished, tmp_path)
    marker_path = tmp_path / "run" / "ppo" / MARKER
    marker = json.load(open(marker_path))
    json.dump(dict(marker, finished=False), open(marker_path, "w"))  # as if stopped after its last checkpoint
    output = run(tmp_path, settings).stdout
    assert "[pipeline] ppo: resuming" in output
    for stage in ("pretrain", "sft", "rm", "ppo_beta0"):  # ppo_beta0 reads the SFT and reward models, not ppo/
        assert f"[pipeline] {stage}: already done" in output
    assert open(tmp_path / "run" / "ppo.log").read().count("$ ") == 2  # the log is appended to
    assert "--init_from=resume" in output and json.load(open(marker_path))["finished"]


def test_a_failing_stage_stops_the_pipeline_naming_the_stage_and_its_log(finished, tmp_path):
    settings = copy_of(finished, tmp_path)
    settings = [s + " --batch_size=0" if s.startswith("--rm_args=") else s for s in settings]  # a valid int
    settings = [s + " --max_iters=21" if s.startswith("--pretrain_args=") else s for s in settings]  # rerun all
    rm_before = snapshot(tmp_path / "run" / "rm")
    result = run(tmp_path, settings, check=False)
    assert result.returncode != 0
    assert "stage 'rm' (train_rm.py) failed with exit code 2" in result.stderr
    assert os.path.join("run", "rm.log") in result.stderr
    assert "error: batch_size=0: must be > 0" in open(tmp_path / "run" / "rm.log").read()
    assert "[pipeline] ppo:" not in result.stdout  # nothing after the failed stage ran
    after = snapshot(tmp_path / "run" / "rm")
    assert {k: v for k, v in after.items() if k != MARKER} == {k: v for k, v in rm_before.items() if k != MARKER}
    rerun = run(tmp_path, [s for s in settings if not s.startswith("--rm_args=")] + [
        next(s for s in finished[1] if s.startswith("--rm_args=")), "--methods="], check=False)  # fixed: rm reruns,
    # not resumes (no method after it: the PPO stages are not what this test is about)
    assert "[pipeline] rm: running" in rerun.stdout, rerun.stdout[-3000:]


def snapshot(folder):
    return {name: open(os.path.join(folder, name), "rb").read() for name in sorted(os.listdir(folder))
            if os.path.isfile(os.path.join(folder, name))}


def test_a_typo_in_any_stage_is_refused_before_any_stage_is_touched(finished, tmp_path):
    settings = copy_of(finished, tmp_path)
    before = {name: snapshot(tmp_path / "run" / name) for name in STAGE_DIRS.values()}
    typo = [s + " --max_itres=5" if s.startswith("--pretrain_args=") else s for s in settings]
    typo = [s + " --temperature=hot" if s.startswith("--ppo_args=") else s for s in typo]
    result = run(tmp_path, typo, check=False)
    assert result.returncode != 0 and "[pipeline] pretrain (train_pretrain.py)" in result.stderr
    assert "unknown setting 'max_itres' (did you mean max_iters" in result.stderr
    assert before == {name: snapshot(tmp_path / "run" / name) for name in STAGE_DIRS.values()}


def test_bad_stage_arguments_are_refused_before_any_stage_runs(tmp_path):
    result = run(tmp_path, ["--sft_args=--max_iters='4"], check=False)
    assert result.returncode != 0 and "sft_args=" in result.stderr and not os.path.exists(tmp_path / "out-pipeline")
    result = run(tmp_path, ["--methods=ppo,dpoo"], check=False)
    assert result.returncode != 0 and result.stderr.strip().splitlines() == [
        f"[pipeline] methods='ppo,dpoo': unknown method 'dpoo'; choose from {', '.join(METHODS)} or all"]
    assert not os.path.exists(tmp_path / "out-pipeline")


# ---- the methods after the reward model (nanollm/comparison.py)
def test_methods_are_named_ones_or_all_and_run_in_the_listed_order():
    assert parse_methods("all") == list(METHODS) and parse_methods("") == []
    assert parse_methods(" dpo, ppo,,dpo") == ["ppo", "dpo"]  # METHODS order, each once
    with pytest.raises(UserError, match="unknown method 'DPO'"):
        parse_methods("ppo,DPO")


def test_every_method_stage_reads_the_pipelines_models_and_passes_its_scripts_checks():
    stages = method_stages(parse_methods("all"), "run", "cpu", {"train_dpo.py": ["--max_iters=7"]},
                           {"ppo_beta0": ["--max_iters=40"]})
    assert [stage for stage, _, _ in stages] == list(METHODS)
    folders = {args[0] if script != "nanollm/best_of_n.py" else args[2] for _, script, args in stages}
    assert len(folders) == len(METHODS) and not folders & {"--out_dir=run/sft", "--out_dir=run/rm"}
    for stage, script, args in stages:
        check_arguments(stage, script, args)  # every name and type against the script's own settings
        assert "--reward_model=run/rm" in args and ("--init_from=run/sft" in args or "--out_dir=run/sft" in args)
        assert ("--data_dir=run/data/rm_demo" in args) == (script == "train_dpo.py")
        assert ("--max_iters=7" in args) == (script == "train_dpo.py")  # the user's extras reach their script only
    with pytest.raises(UserError, match=r"^best_of_n \(nanollm/best_of_n.py\): .*unknown setting 'nn'"):
        check_arguments("best_of_n", "nanollm/best_of_n.py", ["--nn=2"])
    # the pipeline's two PPO runs keep the commands they always had: earlier pipeline folders stay 'done'
    assert method_stages(["ppo", "ppo_beta0"], "out", "auto", {}, {"ppo_beta0": ["--max_iters=40"]}) == [
        ("ppo", "train_ppo.py", ["--out_dir=out/ppo", "--init_from=out/sft", "--reward_model=out/rm", "--device=auto"]),
        ("ppo_beta0", "train_ppo.py", ["--out_dir=out/ppo-beta0", "--init_from=out/sft", "--reward_model=out/rm",
                                       "--device=auto", "--init_kl_coef=0", "--max_iters=40"])]


@pytest.mark.slow
def test_more_methods_run_after_the_finished_stages_and_the_report_compares_them(finished, tmp_path):
    settings = copy_of(finished, tmp_path) + [
        "--methods=ppo,ppo_beta0,best_of_n,dpo,grpo",
        "--best_of_n_args=--n=1,2 --prompts=8 --max_new_tokens=8 --batch_size=16",
        "--dpo_args=--max_iters=2 --eval_interval=2 --eval_prompts=8 --validation_prompts=8 --eval_batch_size=8 "
        "--batch_size=4 --max_new_tokens=8 --eval_pairs=8 --warmup_iters=1",
        "--grpo_args=--max_iters=1 --eval_interval=1 --eval_prompts=8 --validation_prompts=8 --eval_batch_size=8 "
        "--train_prompts=16 --batch_size=8 --group_size=4 --minibatch_size=4 --epochs=1 --max_new_tokens=8"]
    output = run(tmp_path, settings).stdout
    for stage in ("pretrain", "sft", "rm", "ppo", "ppo_beta0"):
        assert f"[pipeline] {stage}: already done" in output
    for stage in ("best_of_n", "dpo", "grpo"):
        assert f"[pipeline] {stage}: running" in output and f"[pipeline] {stage}: done in" in output
    assert "-m nanollm.best_of_n --out_dir=run/sft --reward_model=run/rm --report_dir=run/best-of-n" in output
    report = open(tmp_path / "run" / "report.md").read()
    assert "## The methods side by side" in report and "| best-of-N, N = 2 |" in report
    dpo_final = [r for r in metrics(tmp_path / "run" / "dpo" / "metrics.jsonl") if r.get("phase") == "eval"][-1]
    assert f"| DPO, β = 0.1 | 2 | {dpo_final['eval_gold_gain']:+.3f} ± " in report
    assert os.path.exists(tmp_path / "run" / "gold_vs_kl.png")
    again = run(tmp_path, settings).stdout  # everything done: nothing runs
    assert ": running " not in again and again.count(": already done in ") == 8
