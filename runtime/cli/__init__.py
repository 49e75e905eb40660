"""golem.runtime.cli: the command lines, thin over the library.

``run`` is golem-run; ``trace`` is golem-trace, with one module per subcommand in
``trace_commands``. Each turns flags into library calls and user mistakes into one line.
"""

import sys as _sys

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
