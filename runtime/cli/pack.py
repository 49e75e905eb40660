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
    from golem.io.packed_experts import DATA_FILE, open_packed, pack_experts
    from golem.runtime.checkpoint import open_checkpoint

    index = open_checkpoint(args.model, trust_remote_code=args.trust_remote_code).index
    folder = index.index.model_dir
    if args.check:
        packed = open_packed(index)
        if packed is None:
            print(f"{PROG}: {folder}: no packed experts (experts are read tensor by tensor)")
            return 1
        print(f"{PROG}: {folder}: packed experts of {len(packed.layers)} MoE layers in {DATA_FILE}, "
              "up to date")
        return 0
    total = index.total_nbytes()
    print(f"{PROG}: packing {total / 1e9:.2f} GB of experts ({len(index.layers)} MoE layers) into "
          f"{folder / DATA_FILE}", file=sys.stderr)

    def progress(done: int, whole: int) -> None:
        print(f"\r{PROG}: {100 * done / max(whole, 1):5.1f}%", end="", file=sys.stderr, flush=True)

    manifest = pack_experts(index, progress=progress)
    print(file=sys.stderr)
    open_packed(index)  # what a load will check
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
