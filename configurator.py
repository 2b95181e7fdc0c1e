"""Overrides for a script's module-level defaults, as nanoGPT does it, with checks:

    python train.py configs/prefix_simba.py configs/tiny.py --n_layer=6 --learning_rate=3e-4

Arguments are applied in order: a path runs as a Python file whose assignments override the defaults (it can
read the values set so far, as configs/tiny.py does); a
--key=value sets one default (the value is read as a Python literal, else taken as a string). A key that is
not a default, or a value of another type than the default's, stops the run with a one-line message.
"""
import ast
import difflib
import sys


def _check(script, defaults, key, value, where):
    if key not in defaults:
        close = difflib.get_close_matches(key, list(defaults), n=1)
        hint = f"; did you mean {close[0]}?" if close else ""
        sys.exit(f"{script}: unknown config key {key!r} in {where}{hint}")
    default = defaults[key]
    if default is None or value is None:
        return value
    if isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if isinstance(default, (tuple, list)) and isinstance(value, (tuple, list)):
        return type(default)(value)
    if type(value) is not type(default):
        sys.exit(f"{script}: config key {key!r} in {where} should be {type(default).__name__}, "
                 f"got {value!r} ({type(value).__name__})")
    return value


def configure(defaults, argv, script):
    """Apply config files and --key=value flags from argv to the dict `defaults` (a module's globals) in place;
    return {key: value} of every overridable default (what the checkpoint records)."""
    keys = {k: v for k, v in defaults.items() if not k.startswith("_") and isinstance(v, (int, float, bool, str, tuple, list, type(None)))}
    for arg in argv:
        if not arg.startswith("--"):
            try:
                source = open(arg).read()
            except OSError as e:
                sys.exit(f"{script}: cannot read config file {arg}: {e.strerror}")
            values = {}  # the file sees the values so far (tiny.py scales n_layer) and sets new ones
            exec(compile(source, arg, "exec"), dict(keys), values)
            for key, value in values.items():
                if not key.startswith("_"):
                    keys[key] = defaults[key] = _check(script, keys, key, value, arg)
        else:
            key, sep, text = arg[2:].partition("=")
            if not sep:
                sys.exit(f"{script}: expected --key=value, got {arg}")
            try:
                value = ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a plain string
            keys[key] = defaults[key] = _check(script, keys, key, value, f"--{key}")
    return {k: defaults[k] for k in keys}
