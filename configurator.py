"""
Poor Man's Configurator, after nanoGPT's configurator.py, with its sharp edges fixed.

Usage, in a stage script right after its block of global defaults:

    batch_size = 32
    learning_rate = 3e-4
    vision_path = None
    from configurator import configure
    config = configure(globals())   # reads sys.argv[1:]; returns {key: value} for logging

Command line, processed left to right (later args win):

    $ python train.py config/my_run.py --batch_size=64 --vision_path='ckpt/v.pt'

- an argument without a leading '--' is a Python config file, exec'd and applied
- '--key=value' overrides one key; value is parsed with ast.literal_eval,
  falling back to the raw string (so --init_from=resume needs no quotes)

Config keys are the public globals (no leading '_') whose values are plain data:
int, float, bool, str, None, list, tuple, dict.

Fixes versus nanoGPT:
- config files run in a fresh namespace, not in globals(), so a typo there
  (bacth_size = 64) is reported instead of silently creating a new global;
  names that are modules/functions/classes (e.g. `import math`) are ignored.
  The flip side: a config file can't read the script's defaults.
- '--key=value' is split on the first '=' only (--data_path=a=b.json works).
- unknown keys and bad types raise ConfigError (a ValueError) with the key,
  close matches, the expected type and the given value -- never a bare assert,
  which `python -O` would strip.
- types: int is accepted for a float key; a None default accepts anything;
  a str default keeps the raw string (--init_from=123 is '123', not 123),
  except None, which switches off an optional path (--val_data_path=None);
  bools take True/False/true/false only -- 0/1 are rejected; lists and tuples
  are interchangeable. Type checks use the script's defaults, not whatever an
  earlier config file set.
- '--key' without '=' is an error, not a crash on an assert.
- '--help' (or '-h') prints the script's docstring and its settings as the script writes them
  (default and comment), then exits.
- printing happens only on rank 0 (env RANK, set by torchrun), so a DDP run
  doesn't repeat every override once per process.
- configure() installs errors.excepthook: a ConfigError, a data.DataError or a missing file ends the
  script with one line naming the file, record and problem, not a traceback (see lucid/errors.py).
"""

import ast
import difflib
import os
import re
import sys
import types

from lucid import errors

_CONFIG_TYPES = (int, float, bool, str, type(None), list, tuple, dict)


class ConfigError(errors.UserError):
    """A bad command line, config file or combination of settings."""


def _is_config_key(name, value):
    return not name.startswith('_') and isinstance(value, _CONFIG_TYPES)


def _unknown_key(key, known, where):
    msg = f"Unknown config key {key!r} {where}"
    matches = difflib.get_close_matches(key, known)
    if matches:
        msg += f"; did you mean {', '.join(repr(m) for m in matches)}?"
    return ConfigError(msg)


def _check_type(key, value, default, raw=None):
    """Return value converted to the default's type, or raise ConfigError.
    raw is the command-line string the value was parsed from (None for config files)."""
    if default is None:
        return value  # no type to check against: anything goes
    if isinstance(default, bool):
        # checked before int: bool is a subclass of int, but 1/0 for a flag is almost always a slip
        if isinstance(value, bool):
            return value
        raise ConfigError(f"Config key {key!r} expects a bool (True/False/true/false), got {value!r}; "
                          f"0/1 are not accepted for bools")
    if isinstance(default, str):
        if isinstance(value, str) or value is None:
            return value  # None switches off an optional path (--val_data_path=None)
        if raw is not None:
            return raw  # strings are strings: --init_from=123 means the string '123'
    elif isinstance(default, float) and isinstance(value, int) and not isinstance(value, bool):
        return float(value)  # --learning_rate=1 means 1.0
    elif isinstance(default, (list, tuple)) and isinstance(value, (list, tuple)):
        return type(default)(value)
    elif type(value) is type(default):
        return value
    raise ConfigError(f"Config key {key!r} expects type {type(default).__name__}, "
                      f"got {value!r} ({type(value).__name__})")


def _help(g, keys):
    """--help: the script's docstring, then each setting as its source writes it (the default and the
    comments after it), so a newcomer's first try shows every knob."""
    print((g.get('__doc__') or '').strip() + '\n')
    path = g.get('__file__') or ''
    src = open(path).read().split('\n') if os.path.isfile(path) else []
    spec = g.get('__spec__')  # run as `python -m shapes.prepare`: say so
    cmd = f"python -m {spec.name}" if spec is not None else f"python {os.path.relpath(path) if path else 'script.py'}"
    print(f"settings (override with --key=value, or a config file of such lines: {cmd} config/x.py --key=value):")
    for key in keys:
        i = next((i for i, line in enumerate(src) if re.match(rf'{key}\s*=', line)), None)
        first = src[i] if i is not None else ''
        try:  # the line as written when it holds the whole assignment; else the value as it is
            ast.parse(first)
        except SyntaxError:
            first = ''
        if not first:
            print(f"{key} = {g[key]!r}")
            continue
        print(first)
        for line in src[i + 1:]:  # a comment continued on the next lines
            if not re.match(r'\s+#', line):
                break
            print(line)


def configure(g, argv=None):
    """Apply config files and --key=value overrides from argv (default sys.argv[1:]) to the
    dict g (a script's globals()). Returns {key: value} of the final config."""
    errors.install()
    argv = sys.argv[1:] if argv is None else argv
    verbose = int(os.environ.get('RANK', 0)) == 0
    # snapshot the defaults: keys and types come from the script, not from earlier overrides
    defaults = {k: v for k, v in g.items() if _is_config_key(k, v)}
    if '--help' in argv or '-h' in argv:
        if verbose:
            _help(g, list(defaults))
        sys.exit(0)

    for arg in argv:
        if not arg.startswith('--'):
            # config file: run it on its own so every name it binds can be checked
            try:
                with open(arg) as f:
                    src = f.read()
            except OSError as e:
                raise ConfigError(f"Cannot read config file {arg!r}: {e}") from e
            if verbose:
                print(f"Overriding config with {arg}:")
                print(src)
            ns = {}
            exec(compile(src, arg, 'exec'), ns)
            updates = {}
            for key, value in ns.items():
                # helpers the file imported or defined are not config
                if key.startswith('_') or isinstance(value, (types.ModuleType, type)) or callable(value):
                    continue
                if key not in defaults:
                    raise _unknown_key(key, defaults, f"in config file {arg!r}")
                updates[key] = _check_type(key, value, defaults[key])
            g.update(updates)  # only after the whole file checked out
        else:
            key, eq, raw = arg[2:].partition('=')  # first '=' only: values may contain '='
            if not eq:
                raise ConfigError(f"Argument {arg!r} has no value; use --key=value")
            if key not in defaults:
                raise _unknown_key(key, defaults, "on the command line")
            default = defaults[key]
            if isinstance(default, bool) and raw.lower() in ('true', 'false'):
                value = raw.lower() == 'true'
            else:
                try:
                    value = ast.literal_eval(raw)
                except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
                    value = raw  # not a Python literal: take it as a plain string
            value = _check_type(key, value, default, raw)
            if verbose:
                print(f"Overriding: {key} = {value!r}")
            g[key] = value

    return {k: g[k] for k in defaults}


# nanoGPT's idiom, `exec(open('configurator.py').read())` after a script's defaults, runs this file in
# the script's own globals (its __name__ is then the script's, not 'configurator'): apply the command
# line there, as nanoGPT's configurator does, instead of defining configure() and silently ignoring it.
if __name__ != "configurator" and not globals().get("__file__", "").endswith("configurator.py"):
    config = configure(globals())
