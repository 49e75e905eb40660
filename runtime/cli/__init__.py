"""golem.runtime.cli: the command lines, thin over the library.

``run`` is golem-run; ``trace`` is golem-trace, with one module per subcommand in
``trace_commands``. Each turns flags into library calls and user mistakes into one line,
``PROG: error: WHAT`` on stderr (``error_line``).
"""

import sys as _sys


def error_line(prog: str, error: BaseException, kind: str = "error") -> str:
    """``golem-run: error: <the first line of the message>`` (the exception's type when it
    has no message): every command's one-line form of a user's mistake."""
    text = str(error).strip()
    return f"{prog}: {kind}: {text.splitlines()[0] if text else type(error).__name__}"


from golem.runtime.backend import backend_conflict_message as _backend_conflict_message
from golem.runtime.backend import missing_backend_message as _missing_backend_message

# Every command line starts here: an install without MLX's backend (Linux without an extra)
# ends in one line naming the extras, not in a loader traceback; two backends at once, which
# overwrite each other's library, get a warning saying how to keep one.
if (_message := _missing_backend_message()) is not None:
    print(f"golem: error: {_message}", file=_sys.stderr)
    raise SystemExit(1)
if (_message := _backend_conflict_message()) is not None:
    print(f"golem: warning: {_message}", file=_sys.stderr)
