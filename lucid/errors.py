"""
What a user sees when a script stops on bad input: one line naming the file, the record and the
problem, exit status 1, no traceback. A traceback is for our bugs, not for a typo in a data file.

    error: data/train.json: record 2 (id 'id-2'): image not found: data/images/x.png

configure() installs the hook, so every stage script that reads its settings through the
configurator inherits it. LUCID_TRACEBACK=1 prints the traceback as well (debugging, bug reports).
Our own warnings (a skipped sample, answers that match no question) are one line too:

    warning: skipping bad sample: data/train.json: record 2 (id 'id-2'): image not found: ... (further ...)
"""
import os
import sys
import warnings

HERE = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))  # the repository: warnings raised in any of its files


class UserError(ValueError):
    """Bad input the user can fix (a data file, a record, a setting); the message names which and why.
    data.DataError and configurator.ConfigError are the two kinds."""


# FileNotFoundError: a path in the settings that does not exist (init_from, a config file, ...);
# its message carries the path.
USER_ERRORS = (UserError, FileNotFoundError)


def message(exc):
    """The one line to show. An error in a DataLoader worker comes back re-raised with the worker's
    traceback inside its message; the problem is its last line, after the exception's type name."""
    text = str(exc).strip()
    if "Original Traceback" in text:
        text = text.splitlines()[-1].split(": ", 1)[-1]
    return text


def excepthook(exc_type, exc, tb):
    if issubclass(exc_type, USER_ERRORS) and not os.environ.get("LUCID_TRACEBACK"):
        rank = f" (rank {os.environ.get('RANK', '?')})" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else ""
        print(f"error{rank}: {message(exc)}", file=sys.stderr, flush=True)
        return  # the interpreter still exits with status 1
    sys.__excepthook__(exc_type, exc, tb)


def formatwarning(text, category, filename, lineno, line=None):
    ours = os.path.abspath(filename).startswith(HERE + os.sep) and "site-packages" not in filename
    if ours and not os.environ.get("LUCID_TRACEBACK"):
        return f"warning: {text}\n"
    return _formatwarning(text, category, filename, lineno, line)  # a library's: where it came from helps


_formatwarning = warnings.formatwarning


def install():
    sys.excepthook = excepthook
    warnings.formatwarning = formatwarning
