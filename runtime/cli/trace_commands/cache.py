"""`golem-trace cache`: list what golem keeps on disk, and remove it.

Lists generated checkpoints (``golem-run --demo``'s and the benchmarks'), saved warm-start
profiles and lock files in golem's cache folder (``$GOLEM_CACHE``, else ``~/.cache/golem``);
``--remove`` deletes some or all of them, each under its own lock (what another process is
building or writing now is kept and named). The work is ``golem.runtime.cache_dir``'s.
"""

from __future__ import annotations

import argparse
import json

from golem.runtime.cache_dir import GROUPS, cache_root, describe_entry, kinds_of, list_cache, remove
from golem.runtime.units import format_nbytes


def add_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser(
        "cache",
        help="List (or --remove) golem's generated checkpoints, saved profiles and lock files.",
        description="List what golem keeps in its cache folder ($GOLEM_CACHE, else ~/.cache/golem): generated "
                    "checkpoints (golem-run --demo, benchmarks), saved warm-start profiles (golem-run "
                    "--save-profile, -W saved) and lock files. --remove deletes them; anything another "
                    "process is building or writing right now is kept.",
    )
    p.add_argument("--remove", default=None, metavar="WHAT",
                   help=f"Remove {', '.join(GROUPS)} (comma-separated, e.g. checkpoints,locks). "
                        "Files golem did not make are never removed.")
    p.add_argument("--dir", default=None, metavar="FOLDER",
                   help="The cache folder (default: $GOLEM_CACHE, else ~/.cache/golem).")
    p.add_argument("--json", action="store_true", help="Print one JSON object as the last line.")
    p.set_defaults(func=run)
    return p


def run(args) -> int:
    root = cache_root(args.dir)
    kinds = kinds_of(args.remove) if args.remove is not None else None  # a bad name fails before anything
    if root.exists() and not root.is_dir():
        raise ValueError(f"--dir {root}: is a file, not golem's cache folder")
    entries = list_cache(root)
    print(f"golem's cache: {root}")
    if kinds is None:
        if not entries:
            print("empty: nothing generated or saved yet")
        for entry in entries:
            print("  " + describe_entry(entry, root))
        if entries:
            total = sum(e.nbytes for e in entries)
            print(f"{len(entries)} entries, {format_nbytes(total)}; remove with: golem-trace cache --remove "
                  f"{','.join(g for g in GROUPS if g != 'all')} (or all)")
        if args.json:
            print(json.dumps({"cache": str(root), "entries": [e.to_dict(root) for e in entries],
                              "nbytes": sum(e.nbytes for e in entries)}))
        return 0

    done = remove(entries, kinds, root)
    for entry in done.removed:
        print("  removed " + describe_entry(entry, root))
    for entry in done.busy:
        print("  kept (in use by another process) " + describe_entry(entry, root))
    print(f"removed {len(done.removed)} entries, {format_nbytes(done.freed_nbytes)} freed"
          + (f"; {len(done.busy)} in use, kept" if done.busy else ""))
    if args.json:
        print(json.dumps({"cache": str(root), "removed": [e.to_dict(root) for e in done.removed],
                          "busy": [e.to_dict(root) for e in done.busy], "freed_nbytes": done.freed_nbytes}))
    return 0
