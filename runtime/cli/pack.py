"""golem-pack: write the packed copy of a model's experts into its folder.

Every later golem-run, golem-chat, golem-server and ``golem.runtime.load`` of that folder
then reads a missing expert with one read instead of one per stacked tensor (nine for a
quantized SwitchGLU), until a shard changes (they refuse a stale pack and say so). The copy
costs the experts' size again on disk; ``--check`` says whether a folder's pack is usable.

    golem-pack --model MODEL [--check]
"""

from __future__ import annotations

import argparse
import sys
from typing import Optional

from golem.runtime.cli import error_line
from golem.runtime.cli.about import add_version_flag

PROG = "golem-pack"


def setup_arg_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n\n")[0].split(": ", 1)[1])
    parser.add_argument("--model", required=True,
                        help="the model's folder (an mlx-lm checkpoint) or a Hugging Face repo id")
    parser.add_argument("--check", action="store_true",
                        help="only say whether the folder holds a pack golem will use, and exit 1 if not")
    parser.add_argument("--trust-remote-code", action="store_true",
                        help="let mlx-lm run model code shipped with the checkpoint")
    add_version_flag(parser, PROG)
    return parser


def run(args) -> int:
    from golem.io.packed_experts import DATA_FILE
    from golem.runtime import pack

    if args.check:
        manifest = pack(args.model, check=True, trust_remote_code=args.trust_remote_code)
        if manifest is None:
            print(f"{PROG}: {args.model}: no packed experts (experts are read tensor by tensor)")
            return 1
        print(f"{PROG}: {manifest.parent}: packed experts in {DATA_FILE}, up to date")
        return 0

    terminal = sys.stderr.isatty()

    def progress(done: int, whole: int) -> None:  # on a terminal: one line, redrawn
        print(f"\r{PROG}: packing the experts into {DATA_FILE}: {done / 1e9:.2f} of {whole / 1e9:.2f} GB",
              end="", file=sys.stderr, flush=True)

    manifest = pack(args.model, trust_remote_code=args.trust_remote_code, progress=progress if terminal else None)
    if terminal:
        print(file=sys.stderr)
    print(f"{PROG}: done: {manifest}")
    return 0


def main(argv: Optional[list] = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    from golem.io.index import CheckpointError
    from golem.io.read_errors import ReadError
    from golem.runtime.checkpoint import ModelError

    try:
        return run(args)
    except (ModelError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(error_line(PROG, e), file=sys.stderr)
        return 2
    except ReadError as e:
        print(error_line(PROG, e, "read failed"), file=sys.stderr)
        return 1
    except OSError as e:
        print(error_line(PROG, e), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted (the folder is as it was)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
