"""The alignment methods side by side: which runs pipeline.py makes for a comparison, and how they are compared.

Every method starts from the same SFT model, reads the same reward model and preference data, uses the same seeds and
is judged on the same held-out test prompts by the gold annotator it never sees. Compared at matched KL to the SFT
model, as in the over-optimization curves of Gao et al. 2022 ("Scaling Laws for Reward Model Overoptimization"):
a method earns its training only where it beats best-of-N (no training at all) at the same KL.
    python pipeline.py --methods=all          # every method below, after pretrain/sft/rm (finished ones skipped)
"""
import ast
import json
import math
import os
from collections import namedtuple

from nanollm.configurator import UserError, configure, script_settings

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # where the train_*.py scripts are
BEST_OF_N = "nanollm/best_of_n.py"  # run as python -m nanollm.best_of_n; writes best_of_n.json, no checkpoint
# folder: in pipeline_dir; script; settings: its own, after the pipeline's wiring and the user's extras for the
# script; knob: the setting that moves it along its curve (read back from the run's command for the label)
Method = namedtuple("Method", "folder script settings family knob")
METHODS = {  # in the order they run: one run of each method first, then the other points of the β curves
    "ppo": Method("ppo", "train_ppo.py", [], "PPO", "init_kl_coef"),  # β = 0.2, train_ppo.py's default
    "ppo_beta0": Method("ppo-beta0", "train_ppo.py", ["--init_kl_coef=0"], "PPO", "init_kl_coef"),
    "best_of_n": Method("best-of-n", BEST_OF_N, ["--n=1,2,4,8,16,32,64"], "best-of-N", None),
    "dpo": Method("dpo", "train_dpo.py", ["--beta=0.1"], "DPO", "beta"),
    "grpo": Method("grpo", "train_grpo.py", [], "GRPO", "kl_coef"),
    "rloo": Method("rloo", "train_grpo.py", ["--baseline=leave_one_out"], "RLOO", "kl_coef"),
    "ipo": Method("ipo", "train_dpo.py", ["--loss=ipo", "--beta=0.5"], "IPO", "beta"),
    "grpo_arithmetic": Method("grpo-arithmetic", "train_grpo.py", [  # the products of 0-12, which the SFT model
        # sometimes gets right (so a group of 8 carries signal): 45 test, 54 validation and 205 training questions
        "--reward=arithmetic", "--operations=times", "--eval_prompts=45", "--validation_prompts=54",
        "--train_prompts=205", "--eval_samples=8"], "GRPO, arithmetic reward", "kl_coef"),
    "ppo_beta0.05": Method("ppo-beta0.05", "train_ppo.py", ["--init_kl_coef=0.05"], "PPO", "init_kl_coef"),
    "ppo_beta0.5": Method("ppo-beta0.5", "train_ppo.py", ["--init_kl_coef=0.5"], "PPO", "init_kl_coef"),
    "dpo_beta0.03": Method("dpo-beta0.03", "train_dpo.py", ["--beta=0.03"], "DPO", "beta"),
    "dpo_beta0.3": Method("dpo-beta0.3", "train_dpo.py", ["--beta=0.3"], "DPO", "beta"),
}
FAMILIES = ("PPO", "DPO", "IPO", "GRPO", "RLOO", "GRPO, arithmetic reward", "best-of-N")  # rows and plot, in order
PRESETS = {"all": list(METHODS)}


def parse_methods(text):
    """'ppo,dpo' -> the named methods in METHODS order (the order they run in); 'all' -> every method."""
    names = set()
    for word in (part.strip() for part in str(text).split(",")):
        if word in PRESETS:
            names.update(PRESETS[word])
        elif word in METHODS:
            names.add(word)
        elif word:
            raise UserError(f"methods={text!r}: unknown method {word!r}; choose from {', '.join(METHODS)} or "
                            f"{' | '.join(PRESETS)}")
    return [name for name in METHODS if name in names]


def method_stages(names, pipeline_dir, device, script_args, stage_args):
    """[(stage, script, arguments)]: the pipeline's wiring (its SFT model, reward model, preference data, the stage's
    own folder), then the user's extras for the script (script_args: {script: [--key=value]}), the method's settings,
    and the stage's extras (stage_args: {stage: [...]}); a later --key wins."""
    sft, rm = os.path.join(pipeline_dir, "sft"), os.path.join(pipeline_dir, "rm")
    stages = []
    for name in names:
        method = METHODS[name]
        out_dir = os.path.join(pipeline_dir, method.folder)
        if method.script == BEST_OF_N:  # samples from the SFT model (--out_dir), writes into --report_dir
            from nanollm.distributed import pick_device  # a tool has no 'auto' device
            wiring = [f"--out_dir={sft}", f"--reward_model={rm}", f"--report_dir={out_dir}",
                      f"--device={pick_device(device)}"]
        else:
            wiring = [f"--out_dir={out_dir}", f"--init_from={sft}", f"--reward_model={rm}", f"--device={device}"]
        if method.script == "train_dpo.py":  # the preference pairs the rm stage collected
            wiring.append(f"--data_dir={os.path.join(pipeline_dir, 'data', 'rm_demo')}")
        stages.append((name, method.script, wiring + script_args.get(method.script, []) + method.settings
                       + stage_args.get(name, [])))
    return stages


def tool_settings(path):
    """The settings of a `python -m nanollm.<tool>` read without running it: the literal keywords of the
    `settings = dict(...)` in its main()."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign) and getattr(node.targets[0], "id", None) == "settings" and \
                isinstance(node.value, ast.Call) and getattr(node.value.func, "id", None) == "dict":
            return {keyword.arg: ast.literal_eval(keyword.value) for keyword in node.value.keywords}
    return {}


def check_arguments(stage, script, args):
    """A stage's arguments against its script's own settings (names and types), before any stage runs."""
    path = os.path.join(REPO, script)
    try:
        configure(tool_settings(path) if script == BEST_OF_N else script_settings(path), args)
    except UserError as e:
        raise UserError(f"{stage} ({script}): {e}") from None


def command_line(script, args):
    """How a stage is started: a script by its path, a nanollm tool as a module."""
    if script == BEST_OF_N:
        return ["-m", "nanollm.best_of_n"] + args
    return [os.path.join(REPO, script)] + args


def output_file(script):
    """The file a finished stage leaves in its folder (written last, atomically)."""
    return "best_of_n.json" if script == BEST_OF_N else "ckpt.pt"


# ---------------------------------------------------------------------------------------------- the comparison
def knob_value(name, marker):
    """The value of the method's knob (β, ...) the run used: the last --knob= of its command, else the script's
    default."""
    method = METHODS[name]
    command = (marker or {}).get("command") or [method.script] + method.settings
    values = [arg.split("=", 1)[1] for arg in command if arg.startswith(f"--{method.knob}=")]
    return values[-1] if values else script_settings(os.path.join(REPO, method.script)).get(method.knob)


def label(name, marker):
    """'PPO, β = 0.05' (PPO, DPO, IPO, GRPO, RLOO: β of the KL term or of the implicit reward)."""
    method = METHODS[name]
    return f"{method.family}, β = {float(knob_value(name, marker)):g}" if method.knob else method.family


def read_best_of_n(folder):
    """best_of_n.json's rows ({n, kl, gold_gain, gold_gain_se, score, response_length, ...}), or None."""
    path = os.path.join(folder, "best_of_n.json")
    if not os.path.isfile(path):
        return None
    with open(path, encoding="utf-8") as f:
        return json.load(f)["rows"]


def final_eval(records):
    """The last held-out evaluation line of a training run (phase 'eval'), or None."""
    evals = [r for r in records or [] if r.get("phase") == "eval"]
    return evals[-1] if evals else None


def run_row(name, records, marker):
    """One training run's numbers at its last evaluation on the test prompts."""
    evals = [r for r in records if r.get("phase") == "eval"]
    first, last = evals[0], evals[-1]
    return {"stage": name, "label": label(name, marker), "family": METHODS[name].family, "iter": last["iter"],
            "gain": last.get("eval_gold_gain"), "gain_se": last.get("eval_gold_gain_se"),
            "score": last.get("eval_score"), "kl": last.get("eval_kl"), "length": last.get("eval_response_length"),
            "wall_s": (marker or {}).get("wall_s"), "first": first, "last": last,
            "path": [(r.get("eval_kl"), r.get("eval_gold_gain"), r.get("eval_score")) for r in evals]}


def best_of_n_at(kl, rows):
    """Best-of-N's gold gain and its standard error at this KL, linear between the measured N (N = 1 is KL 0);
    None beyond the largest N."""
    points = sorted((r["kl"], r["gold_gain"], r["gold_gain_se"]) for r in rows)
    for (kl0, gain0, se0), (kl1, gain1, se1) in zip(points, points[1:]):
        if kl0 <= kl <= kl1:
            weight = (kl - kl0) / (kl1 - kl0) if kl1 > kl0 else 0.0
            return gain0 + weight * (gain1 - gain0), se0 + weight * (se1 - se0)
    return None


def versus_best_of_n(row, best_rows):
    """(difference of gold gains, its standard error, verdict) of a run against best-of-N at the run's KL; the two
    standard errors combined as if independent, √(se² + se_N²). None when there is nothing to compare with."""
    if not best_rows or row["gain"] is None or row["kl"] is None:
        return None
    at = best_of_n_at(row["kl"], best_rows)
    if at is None:
        return None
    difference, se = row["gain"] - at[0], math.hypot(row["gain_se"] or 0.0, at[1])
    verdict = "above" if difference > 2 * se else "below" if difference < -2 * se else "within 2 SE"
    return difference, se, verdict


def plot_gold_vs_kl(rows, best_rows, path):
    """Gold gain over the SFT model (± SE) and reward-model score against KL to the SFT model: each method's final
    point (PPO and DPO joined over β), best-of-N over N, and each run's evaluations on the way (faint). Returns False
    (and writes nothing) without matplotlib. rows: run_row(...) dicts; best_rows: best-of-N's rows or None."""
    try:
        import matplotlib  # noqa: F401  (raises ImportError when missing)
        from matplotlib.figure import Figure  # no pyplot: no global state, no display needed
    except ImportError:
        return False
    figure = Figure(figsize=(12, 4.6))
    gold_axis, score_axis = figure.subplots(1, 2)
    families = list(dict.fromkeys([r["family"] for r in rows] + (["best-of-N"] if best_rows else [])))
    for index, family in enumerate(families):
        color = f"C{index}"
        if family == "best-of-N":
            points = [(r["kl"], r["gold_gain"], r["gold_gain_se"], r["score"], f"N={r['n']}") for r in best_rows]
        else:
            members = sorted((r for r in rows if r["family"] == family), key=lambda r: r["kl"])
            points = [(r["kl"], r["gain"], r["gain_se"], r["score"], r["label"].split(", ")[-1]) for r in members]
            for member in members:  # the run's evaluations on the way to its final point
                path_points = [p for p in member["path"] if p[0] is not None and p[1] is not None]
                gold_axis.plot([p[0] for p in path_points], [p[1] for p in path_points], color=color, alpha=0.25,
                               linewidth=1)
                score_axis.plot([p[0] for p in path_points if p[2] is not None],
                                [p[2] for p in path_points if p[2] is not None], color=color, alpha=0.25, linewidth=1)
        points = [p for p in points if p[0] is not None and p[1] is not None]  # a run without a gold judge: none
        gold_axis.errorbar([p[0] for p in points], [p[1] for p in points], yerr=[p[2] or 0.0 for p in points],
                           color=color, marker="o", markersize=4, capsize=3, label=family)
        scored = [p for p in points if p[3] is not None]
        score_axis.plot([p[0] for p in scored], [p[3] for p in scored], color=color, marker="o", markersize=4,
                        label=family)
        for kl, gain, _, _, text in points:
            gold_axis.annotate(text, (kl, gain), textcoords="offset points", xytext=(4, 4), fontsize=7, color=color)
    gold_axis.axhline(0.0, color="gray", linewidth=0.8)
    gold_axis.set_title("gold gain over the SFT model, test prompts (± SE)")
    score_axis.set_title("reward-model score (what the methods optimize)")
    for axis in (gold_axis, score_axis):
        axis.set_xlabel("KL to the SFT model (nats per response; best-of-N: log N − (N−1)/N)")
        axis.grid(alpha=0.3)
    gold_axis.legend(fontsize=8)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=110)
    return True
