"""golem-run --demo: a small generated checkpoint with random weights, run offloaded, its text
shown printable, its figures explained in plain words, and the text compared with stock
mlx-lm's from the same checkpoint, prompt, sampler and seed. Knows nothing of flags: the
caller (``golem.runtime.cli.run``) passes what they say.
"""

from __future__ import annotations

from golem.runtime.cli.progress import StageProgress

DEMO_SLOTS = 8
DEMO_SIZE = dict(hidden=256, layers=8, experts=32, top_k=4, expert_hidden=256, vocab=384, group_size=64)


def demo_model() -> str:
    """The demo checkpoint's folder in the cache, built once (with a progress line)."""
    from golem.runtime.synthetic import Size, build_checkpoint, default_cache_dir

    path = default_cache_dir() / "demo-qwen3_moe"
    if (path / "config.json").exists():
        return str(path)
    stage = f"building the demo checkpoint in {path} (once)"
    with StageProgress(finished={stage: f"built the demo checkpoint in {path}:"}) as progress:
        return str(build_checkpoint("qwen3_moe", path, size=Size(**DEMO_SIZE),
                                    progress=lambda done, total: progress(stage, done, total)))


def printable(text: str) -> str:
    """``text`` with control and other unprintable characters escaped (``\\x07``); newlines kept."""
    return "".join(c if c == "\n" or c.isprintable() else
                   (f"\\x{ord(c):02x}" if ord(c) < 0x100 else f"\\u{ord(c):04x}") for c in text)


def _all_resident(runtime) -> bool:
    return all(p.fully_resident for p in runtime.engine.pools.values())


def explain(runtime) -> str:
    """The statistics in plain words, for a newcomer (the demo)."""
    engine = runtime.engine
    e = runtime.num_experts
    layers = len(engine.pools)
    sizes = sorted({p.cache_size for p in engine.pools.values()})
    slots = f"{sizes[0]} of {e}" if len(sizes) == 1 else f"{sizes[0]}-{sizes[-1]} of {e}"
    if _all_resident(runtime):
        return (f"Memory: each of the {layers} MoE layers keeps all {e} of its experts in memory (read once at "
                "load), so nothing was read from disk while generating.")
    lines = [f"Memory: each of the {layers} MoE layers keeps slots for {slots} experts; "
             "the rest stay on disk until a token needs them."]
    t = engine.stats.total()
    steps = max(engine.stats.decode_steps, 1)
    lines.append(f"Hit rate {100 * t.hit_rate:.1f}%: of {t.requests} expert uses, {t.hits} found their expert "
                 f"already in memory and {t.misses} read it from disk ({t.bytes_read / 1e6:.2f} MB in all).")
    lines.append(f"Stall {1000 * engine.stats.decode_read_s / steps:.2f} ms per token: the time generation "
                 "waited for those reads.")
    return "\n".join(lines)


def demo_generate(runtime, tokenizer, tokens, options, stream_generate, verbose: bool) -> str:
    """mlx-lm's ``generate`` layout, with only printable text shown."""
    model = runtime.model
    print(f"[golem] demo: a generated {runtime.config.get('model_type')} model with RANDOM weights "
          f"({len(runtime.engine.pools)} MoE layers of {runtime.num_experts} experts, top-{runtime.top_k}), "
          "so the text is gibberish by design (unprintable characters shown as \\x..). What matters: "
          "it must equal stock mlx-lm's text, token for token.")
    text, response = "", None
    if verbose:
        print("=" * 10)
    for response in stream_generate(model, tokenizer, tokens, **options):
        if verbose:
            print(printable(response.text), end="", flush=True)
        text += response.text
    if verbose:
        print()
        print("=" * 10)
        if not text:
            print("No text generated for this prompt")
        else:
            print(f"Prompt: {response.prompt_tokens} tokens, {response.prompt_tps:.3f} tokens-per-sec")
            print(f"Generation: {response.generation_tokens} tokens, {response.generation_tps:.3f} tokens-per-sec")
            print(f"Peak memory: {response.peak_memory:.3f} GB")
    else:
        print(printable(text))
    return text


def compare_with_stock(model_path: str, tokens, options, text: str, seed: int, quiet: bool = False) -> int:
    """Run stock mlx-lm on the same checkpoint, prompt, sampler and seed; say whether the text
    is the same (``quiet``: only return 0 when it is, 1 when not)."""
    import mlx.core as mx
    from mlx_lm import load as mlx_lm_load
    from mlx_lm.generate import stream_generate

    model, tokenizer = mlx_lm_load(model_path)
    mx.random.seed(seed)
    stock = "".join(r.text for r in stream_generate(model, tokenizer, tokens, **{**options, "draft_model": None}))
    if quiet:
        return 0 if stock == text else 1
    if stock == text:
        print(f"Matches stock mlx-lm: yes, the same text ({len(text)} characters) from the same checkpoint")
        return 0
    at = next((i for i, (a, b) in enumerate(zip(stock, text)) if a != b), min(len(stock), len(text)))
    print(f"Matches stock mlx-lm: NO, the texts differ from character {at} on")
    return 1
