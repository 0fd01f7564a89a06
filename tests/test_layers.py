"""The package is layered by abstraction: the import graph of nanollm/ (every import, at the top of a module or
inside a function) has no cycle, and no module imports a later stage. A module's main() is its command line
(python -m nanollm.<module>): it sits on top with the scripts, so its imports are not edges of the library."""
import ast
import os

NANOLLM = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "nanollm")
# Lower levels first; a module may import its own level or any lower one, never a higher one.
LEVELS = [
    {"configurator", "records", "clean", "world"},  # plain Python: settings, files, text, the simulated world
    {"tokenizer", "metrics", "parallel", "distributed", "optim", "sampling", "instructions"},
    {"data", "model"},  # token files -> batches; transformer blocks and the GPT
    {"bert", "encdec", "gpt2", "checkpoint", "training", "export", "export_hf", "quantize", "pretraining"},  # other architectures, file formats
    {"sft"},
    {"reward"},
    {"loader"},  # opens every kind of model file the stages before it write (PPO's policy is a GPT)
    {"ppo"},
    {"evaluation", "serving", "annotators", "prune", "report", "comparison"},  # tools built on the loader
    {"labeling"},  # people label replies: the annotators' sampling and dimensions, a page and its label file
    {"dpo", "best_of_n"},  # alignment methods beside PPO, reusing its rollout, scoring and held-out evaluation
    {"grpo"},  # critic-free RL: PPO's pieces and the annotators' arithmetic questions
]
LEVEL = {module: level for level, modules in enumerate(LEVELS) for module in modules}


def import_graph():
    """{module: {nanollm modules it imports}} from the source, without running it."""
    graph = {}
    for name in sorted(os.listdir(NANOLLM)):
        if not name.endswith(".py") or name == "__init__.py":
            continue
        tree = ast.parse(open(os.path.join(NANOLLM, name), encoding="utf-8").read())
        command_line = {id(node) for function in ast.walk(tree)
                        if isinstance(function, ast.FunctionDef) and function.name == "main"
                        for node in ast.walk(function)}
        imported = set()
        for node in ast.walk(tree):
            if id(node) in command_line:
                continue
            if isinstance(node, ast.ImportFrom) and node.module == "nanollm":
                imported |= {alias.name for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and (node.module or "").startswith("nanollm."):
                imported.add(node.module.split(".")[1])
            elif isinstance(node, ast.Import):
                imported |= {alias.name.split(".")[1] for alias in node.names if alias.name.startswith("nanollm.")}
        graph[name[:-3]] = imported - {name[:-3]}
    return graph


def test_every_module_has_a_level():
    assert set(import_graph()) <= set(LEVEL), f"place these in LEVELS: {sorted(set(import_graph()) - set(LEVEL))}"


def test_no_module_imports_a_higher_level():
    graph = import_graph()
    upward = [f"{module} -> {target}" for module, targets in graph.items() for target in targets
              if LEVEL.get(target, -1) > LEVEL.get(module, len(LEVELS))]
    assert not upward, upward


def test_the_import_graph_has_no_cycle():
    graph, state, path = import_graph(), {}, []

    def visit(module):  # depth-first search; a module met again while on the path closes a cycle
        state[module] = "open"
        path.append(module)
        for target in sorted(graph.get(module, ())):
            assert state.get(target) != "open", " -> ".join(path[path.index(target):] + [target])
            if target not in state:
                visit(target)
        state[module] = "done"
        path.pop()

    for module in sorted(graph):
        if module not in state:
            visit(module)
