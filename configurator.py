"""Settings for every script, as nanoGPT gives them, with checks:

    python train.py configs/prefix_simba.py configs/tiny.py --n_layer=6 --learning_rate=3e-4
    python prepare.py --audio_dir=music --captions=musiccaps.csv --name=musiccaps
    python prepare.py --help                     # every setting, its default and its comment

A script's settings are its defaults (train.py's module-level assignments; a dict in the others),
each with a comment. Arguments are applied in order: a path runs as a Python file whose assignments
override the defaults (it can read the values set so far, as configs/tiny.py does); a --key=value
sets one (the value is read as a Python literal, else taken as a string; a setting whose default is
a string takes the text as it is); a tuple setting also takes words, --key A B C (up to the next
--flag). A key that is not a setting, or a value of another type than the default's, stops the run
with a one-line message.
"""
import ast
import difflib
import re
import sys
from pathlib import Path


def _check(script, defaults, key, value, where):
    if key not in defaults:
        close = ([k for k in defaults if k.startswith(key)][:1]  # --cfg: cfg_scale
                 or difflib.get_close_matches(key, list(defaults), n=1))
        hint = f"; did you mean {close[0]}?" if close else ""
        sys.exit(
            f"{script}: unknown config key {key!r} in {where}{hint} (see python {script} --help)")
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


def run_config_file(path, values, script):
    """A config file (Python assignments) run seeing `values`, the settings so far (tiny.py scales
    n_layer) -> {key: value} of what it sets."""
    try:
        source = open(path).read()
    except OSError as e:
        sys.exit(f"{script}: cannot read config file {path}: {e.strerror}")
    assigned = {}
    exec(compile(source, str(path), "exec"), dict(values), assigned)
    return {k: v for k, v in assigned.items() if not k.startswith("_")}


def _help(script, keys, doc):
    """The script's docstring, then each setting as --key=default with the comment on its line in
    the script."""
    source = (Path(__file__).parent / script).read_text().splitlines()
    lines = [(doc or "").strip(), "", "settings (--key=value, or a Python file of assignments):"]
    for key, value in keys.items():
        line = next((s for s in source if re.match(rf"\s*{key}\s*=", s) and "  # " in s), "")
        comment = line.split("  # ", 1)[1] if "  # " in line else ""
        setting = f"  --{key}={value!r}"
        lines.append(f"{setting:<36} {comment}".rstrip())
    print("\n".join(lines))
    sys.exit(0)


def configure(defaults, argv, script, doc=None, choices=None):
    """Apply config files and --key=value flags from argv to the dict `defaults` (train.py: its
    module's globals; the other scripts: a copy of their DEFAULTS) in place; return {key: value} of
    every setting. --help prints the settings (doc: the script's docstring) and exits. choices:
    {key: allowed values}, checked at the end."""
    keys = {k: v for k, v in defaults.items()
            if not k.startswith("_")
            and isinstance(v, (int, float, bool, str, tuple, list, type(None)))}
    if "--help" in argv or "-h" in argv:
        _help(script, keys, doc if doc is not None else defaults.get("__doc__"))
    argv = list(argv)
    while argv:
        arg = argv.pop(0)
        if not arg.startswith("--"):
            for key, value in run_config_file(arg, keys, script).items():
                keys[key] = defaults[key] = _check(script, keys, key, value, arg)
        else:
            key, sep, text = arg[2:].partition("=")
            # --key A B C: the words up to the next --flag
            if not sep and isinstance(keys.get(key), tuple):
                words = []
                while argv and not argv[0].startswith("--"):
                    words.append(argv.pop(0))
                if not words:
                    sys.exit(f"{script}: --{key} needs one or more values")
                keys[key] = defaults[key] = tuple(words)
                continue
            if not sep:
                sys.exit(
                    f"{script}: expected --key=value, got {arg} (see python {script} --help)")
            try:
                value = text if isinstance(keys.get(key), str) else ast.literal_eval(text)
            except (ValueError, SyntaxError):
                value = text  # a plain string
            keys[key] = defaults[key] = _check(script, keys, key, value, f"--{key}")
    for key, allowed in (choices or {}).items():
        if keys[key] not in allowed:
            sys.exit(f"{script}: --{key}={keys[key]!r}: "
                     f"expected one of {', '.join(map(str, allowed))}")
    return {k: defaults[k] for k in keys}
