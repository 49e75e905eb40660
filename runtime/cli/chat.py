"""golem-chat: ``mlx_lm.chat`` (same flags, prompts and commands) on a golem model, plus
golem's runtime flags (expert cache, memory budget, prefetch, storage, traces).

Knows nothing of chat itself: mlx-lm's main runs unchanged with golem's loader.
"""

from __future__ import annotations

import sys
from typing import Optional

PROG = "golem-chat"
DESCRIPTION = ("Chat with an MoE model whose experts stream from disk, as mlx_lm.chat does "
               "(every mlx_lm.chat flag works; golem's own flags follow). Type 'q' to quit, "
               "'r' to reset the conversation, 'h' for help.")


def main(argv: Optional[list] = None) -> int:
    import mlx.core as mx
    from mlx_lm import chat

    from golem.io.reads import ReadError
    from golem.runtime.cli.stock import GolemLoads, check_model, run_stock_main

    def on_args(args, config):
        if mx.distributed.init().size() > 1:
            raise ValueError("golem-chat runs on one machine (no distributed group)")
        if args.model == chat.DEFAULT_MODEL:  # mlx_lm.chat's default is a dense model
            raise ValueError("--model is required: an MoE model folder or Hugging Face repo id")
        check_model(args, config)
        return GolemLoads(config)

    from golem.runtime.cli.stdin import TextLines

    stdin = sys.stdin
    if stdin is not None and hasattr(stdin, "buffer") and not stdin.isatty():
        sys.stdin = TextLines(stdin.buffer)  # piped prompts: text or a one-line error
    try:
        run_stock_main(chat, PROG, DESCRIPTION, on_args, argv)
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
