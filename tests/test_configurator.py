import pytest

from nanollm.configurator import UserError, configure


def script_globals():
    return {"out_dir": "out", "max_iters": 100, "learning_rate": 1e-3, "compile": False, "init_from": "scratch",
            "top_k": None, "_private": 1, "torch": __import__("math")}


def test_key_value_overrides_are_typed_like_the_defaults():
    g = script_globals()
    config = configure(g, ["--max_iters=7", "--learning_rate=3", "--compile=True", "--out_dir=123", "--top_k=5"])
    assert g["max_iters"] == 7 and g["learning_rate"] == 3.0 and isinstance(g["learning_rate"], float)
    assert g["compile"] is True and g["out_dir"] == "123" and g["top_k"] == 5
    assert set(config) == {"out_dir", "max_iters", "learning_rate", "compile", "init_from", "top_k"}


def test_unknown_key_is_an_error_with_a_suggestion():
    with pytest.raises(UserError, match="unknown setting 'max_iter'.*max_iters"):
        configure(script_globals(), ["--max_iter=5"])


def test_wrong_type_is_an_error():
    with pytest.raises(UserError, match="'max_iters' must be int"):
        configure(script_globals(), ["--max_iters=1.5"])
    with pytest.raises(UserError, match="'compile' must be bool"):
        configure(script_globals(), ["--compile=yes"])


def test_config_file_sets_values_and_names_the_line_of_an_unknown_key(tmp_path):
    good = tmp_path / "good.py"
    good.write_text("max_iters = 2 * 21\ninit_from = 'resume'\n")
    g = script_globals()
    configure(g, [str(good), "--max_iters=5"])  # later arguments win
    assert g["max_iters"] == 5 and g["init_from"] == "resume"
    bad = tmp_path / "bad.py"
    bad.write_text("max_iters = 3\n\nlearning_rat = 0.1\n")
    with pytest.raises(UserError, match=r"bad.py:3: unknown setting 'learning_rat'"):
        configure(script_globals(), [str(bad)])


def test_malformed_arguments_are_errors(tmp_path):
    with pytest.raises(ValueError, match="--key=value"):
        configure(script_globals(), ["--max_iters"])
    with pytest.raises(ValueError, match="unexpected argument"):
        configure(script_globals(), ["max_iters=3"])
    with pytest.raises(UserError, match="missing.py"):
        configure(script_globals(), [str(tmp_path / "missing.py")])
