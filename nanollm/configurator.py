"""Command-line overrides for the plain module-level hyperparameters at the top of each training script.

`python train_x.py [config.py ...] [--key=value ...]`, as in nanoGPT: a config file is Python that assigns
some of the script's variables; `--key=value` sets one. Unlike nanoGPT, nothing is exec'd into the script
blindly: an unknown key or a value of the wrong type is an error that names the file, line and key.
A mistake of the user's (a setting, a file) is a UserError: the script prints it as one line and exits with code 2.
"""
import ast
import difflib
import os
import sys


class UserError(ValueError):
    """A wrong setting or input file. Scripts report it as one line, without a traceback, and exit with code 2
    (NANOLLM_TRACEBACK=1 shows the traceback)."""


class MissingFileError(UserError, FileNotFoundError):
    """A file or folder the user named does not exist."""


def _report_user_error(exc_type, exc, traceback):
    if not issubclass(exc_type, UserError) or os.environ.get("NANOLLM_TRACEBACK"):
        return sys.__excepthook__(exc_type, exc, traceback)
    if int(os.environ.get("RANK", "0")) == 0:  # under torchrun every rank fails the same way: say it once
        print(f"error: {exc}", file=sys.stderr)
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(2)  # the exit code of a command-line mistake; a raise from an excepthook could not set it


def check_ranges(settings, positive=(), non_negative=(), fraction=()):
    """Settings that must be > 0, >= 0, or in [0, 1): one line naming the first that is not, before any work."""
    for names, test, rule in ((positive, lambda v: v > 0, "> 0"), (non_negative, lambda v: v >= 0, ">= 0"),
                              (fraction, lambda v: 0 <= v < 1, "in [0, 1)")):
        for name in names:
            if not test(settings[name]):
                raise UserError(f"{name}={settings[name]!r}: must be {rule}")

SIMPLE_TYPES = (bool, int, float, str, type(None))


def config_keys(namespace):
    """The overridable settings of a script: its public module-level variables of simple types."""
    return [k for k, v in namespace.items()
            if not k.startswith("_") and isinstance(v, SIMPLE_TYPES) and not isinstance(v, type)]


def _unknown_key_message(key, keys, where):
    close = difflib.get_close_matches(key, keys, n=3)
    hint = f" (did you mean {', '.join(close)}?)" if close else ""
    return f"{where}: unknown setting '{key}'{hint}"


def _coerce(key, value, default, where):
    """Check `value` against the type of the script's default; ints are accepted where floats are expected."""
    if default is None or value is None:
        return value
    if isinstance(default, bool):
        if isinstance(value, bool):
            return value
    elif isinstance(default, float):
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif isinstance(value, type(default)) and not isinstance(value, bool):
        return value
    raise UserError(f"{where}: '{key}' must be {type(default).__name__} (default {default!r}), "
                    f"got {type(value).__name__} {value!r}")


def _parse_value(text):
    """'3' -> 3, '1e-3' -> 0.001, 'True' -> True, "'gpt'" -> 'gpt', and bare words stay strings."""
    lowered = text.lower()
    if lowered in ("true", "false"):
        return lowered == "true"
    if lowered in ("none", "null"):
        return None
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def _read_config_file(path, keys):
    """Run a config file and return {key: (value, 'path:line')} for what it assigns."""
    try:
        with open(path, encoding="utf-8") as f:
            source = f.read()
    except FileNotFoundError:
        raise UserError(f"config file not found: {path}") from None
    try:
        tree = ast.parse(source, filename=path)
    except SyntaxError as e:
        raise UserError(f"{path}:{e.lineno}: {e.msg}") from None
    lines = {}
    for node in tree.body:
        targets = node.targets if isinstance(node, ast.Assign) else [getattr(node, "target", None)]
        for target in targets:
            if isinstance(target, ast.Name):
                lines[target.id] = node.lineno
    scope = {}
    exec(compile(tree, path, "exec"), scope)
    assigned = {}
    for key, line in lines.items():
        where = f"{path}:{line}"
        if key.startswith("_"):
            continue
        if key not in keys:
            raise UserError(_unknown_key_message(key, keys, where))
        assigned[key] = (scope[key], where)
    return assigned


def configure(namespace, argv):
    """Apply config files and --key=value overrides from argv to `namespace` (a script's globals()).

    Returns the final settings as a dict (saved in checkpoints). Raises UserError on unknown keys and wrong types;
    from here on a UserError anywhere in the script is printed as one line (exit code 2).
    """
    sys.excepthook = _report_user_error
    keys = config_keys(namespace)
    for arg in argv:
        if arg.startswith("--"):
            key, sep, text = arg[2:].partition("=")
            if not sep:
                raise UserError(f"command line: expected --key=value, got '{arg}'")
            key = key.replace("-", "_")
            if key not in keys:
                raise UserError(_unknown_key_message(key, keys, "command line"))
            updates = {key: (_parse_value(text), "command line")}
        elif arg.endswith(".py"):
            updates = _read_config_file(arg, keys)
        else:
            raise UserError(f"command line: unexpected argument '{arg}' (use a config .py file or --key=value)")
        for key, (value, where) in updates.items():
            default = namespace[key]
            if isinstance(default, str) and not isinstance(value, str) and where == "command line":
                value = str(value) if not isinstance(value, bool) else value  # --out_dir=123 is a string
            namespace[key] = _coerce(key, value, default, where)
    return {k: namespace[k] for k in keys}


def command_line_keys(argv):
    """The setting names a command line gives as --key=value, in order ('--max-iters' is max_iters)."""
    return [arg[2:].partition("=")[0].replace("-", "_") for arg in argv if arg.startswith("--")]


def reject_renamed(argv, renamed):
    """A setting's old name ({old: new}) on the command line is a one-line error that names the new one."""
    sys.excepthook = _report_user_error
    for key in command_line_keys(argv):
        if key in renamed:
            raise UserError(f"command line: --{key} is now --{renamed[key]}")


def configure_command(prog, settings, argv, renamed=None):
    """The command line of a `python -m nanollm.<tool>`, in the scripts' style: words (a subcommand, a file, a text)
    and --key=value overrides of `settings` (a dict of defaults, updated in place) checked by configure(); --help
    prints the settings with their defaults. Returns the words, in order."""
    if "--help" in argv or "-h" in argv:
        print(f"usage: {prog} [--key=value ...]; the settings and their defaults:")
        for key in config_keys(settings):
            print(f"  --{key}={settings[key]}")
        raise SystemExit(0)
    reject_renamed(argv, renamed or {})
    words = [arg for arg in argv if not arg.startswith("--") and not arg.endswith(".py")]
    configure(settings, [arg for arg in argv if arg not in words])
    return words


def script_settings(path):
    """A script's settings read without running it: the module-level assignments of literal values above its
    `configure(...)` call. Lets a driver (pipeline.py) check every stage's arguments before it starts any stage."""
    with open(path, encoding="utf-8") as f:
        tree = ast.parse(f.read(), filename=path)
    settings = {}
    for node in tree.body:
        if isinstance(node, ast.Assign) and isinstance(node.value, ast.Call) and \
                getattr(node.value.func, "id", None) == "configure":
            break
        if isinstance(node, ast.Assign) and len(node.targets) == 1 and isinstance(node.targets[0], ast.Name):
            try:
                settings[node.targets[0].id] = ast.literal_eval(node.value)
            except ValueError:
                pass  # not a literal: not a setting
    return settings
