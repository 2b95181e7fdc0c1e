"""configurator.py, the one settings mechanism: flags, config files, tuple words, checks, --help."""
import pytest

from configurator import configure

DEFAULTS = dict(name="x", steps=10, rate=0.5, flag=True, runs=(), mode="a")


def settings(*argv, choices=None):
    return configure(dict(DEFAULTS), list(argv), "test.py", "the doc", choices)


def test_flags_are_typed_by_their_defaults():
    s = settings("--steps=3", "--rate=2", "--flag=False", "--name=12", "--runs=('a', 'b')")
    assert s == dict(name="12", steps=3, rate=2.0, flag=False, runs=("a", "b"), mode="a")
    assert isinstance(s["rate"], float)  # an int for a float setting becomes a float
    assert settings("--name=a b, c")["name"] == "a b, c"  # a string setting takes the text as it is


def test_a_tuple_setting_takes_the_words_up_to_the_next_flag():
    assert settings("--runs", "out-a", "out-b", "--steps=2")["runs"] == ("out-a", "out-b")
    assert settings("--steps=2", "--runs", "out-a")["runs"] == ("out-a",)


def test_config_files_run_in_order_and_see_the_values_so_far(tmp_path):
    first, second = tmp_path / "first.py", tmp_path / "second.py"
    first.write_text("steps = 20\nrate = 0.1\n")
    second.write_text("steps = steps * 2  # reads what first.py set\n_scratch = 1\n")
    assert settings(str(first), str(second), "--rate=0.3") == dict(DEFAULTS, steps=40, rate=0.3)


@pytest.mark.parametrize("argv, message", [
    (["--step=3"],  # a typo
     "test.py: unknown config key 'step' in --step; did you mean steps? "
     "(see python test.py --help)"),
    (["--steps=high"], "test.py: config key 'steps' in --steps should be int, got 'high' (str)"),
    (["--steps"], "test.py: expected --key=value, got --steps (see python test.py --help)"),
    (["--runs"], "test.py: --runs needs one or more values"),
    (["--mode=c"], "test.py: --mode='c': expected one of a, b"),
    (["/no/such/config.py"],
     "test.py: cannot read config file /no/such/config.py: No such file or directory"),
])
def test_bad_settings_stop_with_one_line(argv, message):
    with pytest.raises(SystemExit) as e:
        settings(*argv, choices=dict(mode=("a", "b")))
    assert str(e.value.code) == message


def test_help_lists_every_setting_with_its_default(capsys):
    with pytest.raises(SystemExit) as e:
        configure(dict(DEFAULTS), ["--help"], "sample.py", "the doc")
    out = capsys.readouterr().out
    assert e.value.code == 0 and out.startswith("the doc")
    assert all(f"--{k}={v!r}" in out for k, v in DEFAULTS.items())


def test_a_renamed_key_is_suggested_by_its_prefix():
    with pytest.raises(SystemExit) as e:
        configure(dict(cfg_scale=3.0), ["--cfg=2"], "sample.py")
    assert str(e.value.code).startswith("sample.py: unknown config key 'cfg' in --cfg; "
                                        "did you mean cfg_scale?")
