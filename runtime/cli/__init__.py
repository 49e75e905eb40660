"""golem.runtime.cli: the command lines, thin over the library.

``run`` is golem-run; ``trace`` is golem-trace, with one module per subcommand in
``trace_commands``. Each turns flags into library calls and user mistakes into one line.
"""
