"""golem.runtime.cli: the command lines, thin over the library.

``run`` is golem-run; ``trace`` is golem-trace, with one module per subcommand in
``trace_commands``. Each turns flags into library calls and user mistakes into one line.
"""

import sys as _sys

from golem.runtime.backend import missing_backend_message as _missing_backend_message

# Every command line starts here: an install without MLX's backend (Linux without an extra)
# ends in one line naming the extras, not in a loader traceback.
if (_message := _missing_backend_message()) is not None:
    print(f"golem: error: {_message}", file=_sys.stderr)
    raise SystemExit(1)
