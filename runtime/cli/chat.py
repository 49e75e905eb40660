"""golem-chat: ``mlx_lm.chat`` (same flags, prompts and commands) on a golem model, plus
golem's runtime flags (expert cache, memory budget, prefetch, storage, traces), and one
command of its own: ``s`` prints the expert statistics (they are printed on stderr at exit too).

Knows nothing of chat itself: mlx-lm's main runs unchanged with golem's loader and a chat UI
that answers ``s`` itself.
"""

from __future__ import annotations

import sys
from typing import Optional

PROG = "golem-chat"
DESCRIPTION = ("Chat with an MoE model whose experts stream from disk, as mlx_lm.chat does "
               "(every mlx_lm.chat flag works; golem's own flags follow). Type 'q' to quit, "
               "'r' to reset the conversation, 's' for the expert statistics, 'h' for help.")
STATS_COMMAND = "s"
STATS_HELP = f"  {STATS_COMMAND} expert statistics (golem: hits, misses, bytes read, stall, prefetch, per layer)"


def _stats_text(loads, table: bool) -> str:
    from golem.runtime.report import layer_table, summary

    if not loads.loaded:
        return "Experts: no model loaded"
    runtime = loads.loaded[-1].runtime
    stats = runtime.stats()
    text = summary(stats, runtime.num_experts)
    if table and not stats.all_resident:
        text += "\n" + layer_table(stats, runtime.num_experts)
    return text


def _check_text(query: str) -> None:
    """A line typed at a terminal that is not UTF-8 text (Python keeps its bytes as
    surrogates) is an error naming the first bad byte, not a tokenizer traceback (piped
    prompts are checked as they are read: ``golem.runtime.cli.stdin.TextLines``)."""
    try:
        query.encode("utf-8")
    except UnicodeEncodeError as e:
        bad = query[e.start]
        byte = ord(bad) - 0xDC00 if 0xDC80 <= ord(bad) <= 0xDCFF else ord(bad)
        raise ValueError(f"stdin: the prompt is not UTF-8 text (byte 0x{byte:02x} at character {e.start})") from None


def _chat_ui(base: type, holder: list) -> type:
    """mlx-lm's ``ChatUI`` plus the ``s`` command (the figures and the per-layer table on
    stdout) and the figures on stderr when the chat ends."""

    class GolemChatUI(base):
        def __enter__(self):
            super().__enter__()
            print(STATS_HELP)
            return self

        def prompt(self) -> str:
            while True:
                query = super().prompt()
                _check_text(query)
                if query.strip() != STATS_COMMAND:
                    return query
                print(_stats_text(holder[0], table=True), flush=True)

        def say_help(self):
            super().say_help()
            print(STATS_HELP)

        def __exit__(self, *exc):
            if holder and (exc[0] is None or issubclass(exc[0], (EOFError, KeyboardInterrupt))):
                sys.stdout.flush()
                print(_stats_text(holder[0], table=False), file=sys.stderr, flush=True)
            return super().__exit__(*exc)

    return GolemChatUI


def main(argv: Optional[list] = None) -> int:
    from mlx_lm import chat

    from golem.io.read_errors import ReadError
    from golem.runtime.cli.stock import GolemLoads, check_model, run_stock_main

    def on_args(args, config):
        if args.model == chat.DEFAULT_MODEL:  # mlx_lm.chat's default is a dense model
            raise ValueError("--model is required: an MoE model folder or Hugging Face repo id")
        check_model(args, config)
        holder.append(GolemLoads(config))
        return holder[-1]

    holder: list = []
    from golem.runtime.cli.stdin import TextLines

    stdin = sys.stdin
    if stdin is not None and hasattr(stdin, "buffer") and not stdin.isatty():
        sys.stdin = TextLines(stdin.buffer)  # piped prompts: text or a one-line error
    try:
        run_stock_main(chat, PROG, DESCRIPTION, on_args, argv, replace={"ChatUI": _chat_ui(chat.ChatUI, holder)})
    except (ValueError, FileNotFoundError) as e:  # ModelError, CheckpointError, ConfigError
        print(f"{PROG}: error: {str(e).splitlines()[0] if str(e) else type(e).__name__}", file=sys.stderr)
        return 2
    except ReadError as e:
        print(f"{PROG}: read failed: {e}", file=sys.stderr)
        return 1
    except EOFError:  # stdin ended without 'q'
        return 0
    except KeyboardInterrupt:
        print(f"\n{PROG}: interrupted", file=sys.stderr)
        return 130
    finally:
        sys.stdin = stdin
    return 0


if __name__ == "__main__":
    sys.exit(main())
