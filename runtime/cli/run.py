"""golem-run: ``mlx_lm.generate`` with the experts offloaded.

Owns the command line: mlx-lm's own parser (every ``mlx_lm.generate`` flag, so new ones
arrive with mlx-lm) plus golem's flags (``golem.runtime.cli.flags``), the prompt as
mlx-lm's ``main`` builds it, mlx-lm's output conventions plus golem's statistics lines,
the demo, and turning user mistakes into one clear line (exit 2). Sizing, warm starts,
traces and profiles are the library's (``golem.runtime.load``).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
import time
from typing import Optional

from golem.runtime.cli import error_line
from golem.runtime.cli.about import add_version_flag
from golem.runtime.cli.demo import DEMO_SLOTS, compare_with_stock, demo_generate, demo_model, explain
from golem.runtime.cli.flags import add_runtime_arguments, runtime_config
from golem.runtime.cli.progress import StageProgress, show_library_warnings

# Neutral values of mlx_lm.generate flags that older mlx-lm releases do not have yet.
MLX_LM_NEUTRAL = dict(
    image=(), prefill_response=None, quantize_activations=False, chat_template_config=None,
    xtc_probability=0.0, xtc_threshold=0.0, min_tokens_to_keep=1, min_p=0.0, top_k=0,
    prefill_step_size=2048, max_kv_size=None, kv_bits=None, kv_group_size=64, quantized_kv_start=0,
    draft_model=None, num_draft_tokens=3, prompt_cache_file=None, adapter_path=None,
    trust_remote_code=False, extra_eos_token=(),
)


def setup_arg_parser() -> argparse.ArgumentParser:
    """mlx-lm's ``generate`` parser, renamed, plus golem's flags."""
    from mlx_lm.generate import setup_arg_parser as mlx_lm_parser

    parser = mlx_lm_parser()
    parser.prog = "golem-run"
    parser.description = ("Generate text like mlx_lm.generate with an MoE model whose experts stream "
                          "from disk. Every mlx_lm.generate flag works; golem's own flags follow.")
    model = parser._option_string_actions["--model"]
    model.help = "Model folder or Hugging Face repo id (an MoE model; or --demo)."
    parser.add_argument("--demo", action="store_true",
                        help="Build a small generated checkpoint with random weights once (in the cache folder), "
                             "run it offloaded and check the text against stock mlx-lm's.")
    add_version_flag(parser, "golem-run")
    add_runtime_arguments(parser)
    # One line, as every golem error (mlx-lm's parser prints its whole usage first).
    parser.error = lambda message: parser.exit(2, f"{parser.prog}: error: {message}\n")
    g = parser.add_argument_group("golem output")
    g.add_argument("--plan", action="store_true",
                   help="Print where the memory goes (layers, slots, bytes) and exit.")
    g.add_argument("--stats", action="store_true", help="Print a per-layer table after generation.")
    g.add_argument("--json", action="store_true",
                   help="Print one JSON object on stdout instead (text, token ids, timings, expert "
                        "statistics per layer and in total); --stats then prints the table on stderr.")
    add_pipeline_argument(parser)
    return parser


def add_pipeline_argument(parser: argparse.ArgumentParser) -> None:
    """``--pipeline [SPLIT]``: golem-run, golem-chat and golem-server under ``mlx.launch``."""
    parser.add_argument(
        "--pipeline", nargs="?", const="even", default=None, metavar="SPLIT",
        help="Under mlx.launch: split the layers across the ranks (pipeline parallel, as mlx-lm's --pipeline); "
             "each rank reads and offloads only its layers' experts and only rank 0 prints. SPLIT: 'even' "
             "(the default: mlx-lm's split, rank 0 the last layers), 'bytes' (balance the layers' bytes), or "
             "layers per rank in rank order (e.g. 10,14). --memory-budget A,B gives each rank its own budget.")


def format_stats(runtime, generation_tokens: int = 0) -> str:
    """golem's statistics lines, printed after mlx-lm's."""
    from golem.runtime.report import summary

    text = summary(runtime.stats(), runtime.num_experts)
    pf = runtime.engine.prefetcher
    if pf is not None:
        gov = pf.governor
        text += (f"\nPrefetch depth: governed, at most {gov.max_depth}: {gov.stats.describe()}" if gov is not None
                 else f"\nPrefetch depth: fixed at {pf.depth} (--no-prefetch-governor)")
    return text


def format_layer_table(runtime) -> str:
    from golem.runtime.report import layer_table

    return layer_table(runtime.stats(), runtime.num_experts)


def _sampler(args, tokenizer):
    from mlx_lm.sample_utils import make_sampler

    return make_sampler(
        args.temp, args.top_p, args.min_p, args.min_tokens_to_keep, top_k=args.top_k,
        xtc_probability=args.xtc_probability, xtc_threshold=args.xtc_threshold,
        xtc_special_tokens=tokenizer.encode("\n") + list(tokenizer.eos_token_ids),
    )


def _plan_notes(sizing) -> str:
    """What the plan's totals leave out or set aside, in words."""
    from golem.runtime.units import format_nbytes

    lines = []
    if sizing.plan.reserve_nbytes:
        staging = sizing.staging
        lines.append(f"reserved = {staging.num_buffers} staging buffers of {format_nbytes(staging.buffer_nbytes)} "
                     "(experts being read from disk)")
    lines.append("not counted: the KV cache and activations, which grow with the prompt and the tokens generated")
    return "\n".join(lines)


def _check_unsupported(args) -> None:
    """mlx-lm flags golem cannot honour with offloaded experts."""
    if args.quantize_activations:
        raise ValueError("--quantize-activations: golem's offloaded experts run on the checkpoint's weights "
                         "as stored and do not quantize activations; run without it")
    if args.seed is not None and not 0 <= args.seed < 2**64:
        raise ValueError(f"--seed must be a whole number from 0 to 2^64-1, got {args.seed}")
    if args.max_tokens < 1:
        raise ValueError(f"--max-tokens must be at least 1, got {args.max_tokens}")


def _pil_image():
    """Pillow's ``Image`` module, which ``--image`` needs (golem's ``vision`` extra)."""
    try:
        from PIL import Image
    except ImportError:
        raise ValueError('--image needs Pillow, which is not installed: pip install "golem-moe[vision]"') from None
    return Image


def _prompt(args, tokenizer, using_cache: bool, template_kwargs: dict) -> tuple[str, bool]:
    """The prompt text exactly as mlx_lm.generate's main builds it."""
    prompt = args.prompt.replace("\\n", "\n").replace("\\t", "\t")
    prompt = args.stdin_prompt if prompt == "-" else prompt
    use_chat_template = not args.ignore_chat_template and tokenizer.has_chat_template
    if use_chat_template:
        messages = [] if args.system_prompt is None else [{"role": "system", "content": args.system_prompt}]
        messages.append({"role": "user", "content": prompt})
        has_prefill = args.prefill_response is not None
        if has_prefill:
            messages.append({"role": "assistant", "content": args.prefill_response})
        prompt = tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=has_prefill,
                                               add_generation_prompt=not has_prefill, **template_kwargs)
        if using_cache:  # the prompt is a suffix: its prefix is in the stored KV cache
            messages[-1]["content"] = "<query>"
            test_prompt = tokenizer.apply_chat_template(messages, tokenize=False, continue_final_message=has_prefill,
                                                        add_generation_prompt=not has_prefill)
            prompt = prompt[test_prompt.index("<query>"):]
    return prompt, use_chat_template


def run(args) -> int:
    """golem-run's steps: check the flags, find the model, then plan or load, generate and report."""
    from golem.runtime.pipeline import rank_zero_stdout

    _check_args(args)
    group = _pipeline_group(args)
    config = _config(args)  # every golem flag checked before any work
    prompt_cache, metadata = _prompt_cache(args)
    tokenizer_config = {} if metadata is None else json.loads(metadata["tokenizer_config"])
    tokenizer_config["trust_remote_code"] = args.trust_remote_code
    template_kwargs = _template_kwargs(args)
    model_path = _model_path(args, metadata)
    if args.plan:
        return _print_plan(model_path, config, args, group)
    loaded, load_s = _load(model_path, config, args, tokenizer_config, group)
    with loaded as (model, tokenizer), rank_zero_stdout(loaded.runtime.pipeline):
        runtime = model.golem
        _prepare_runtime(runtime, tokenizer, args)
        tokens, options = _generation_request(runtime, tokenizer, args, model_path, prompt_cache, template_kwargs)
        text, report = _generate(runtime, tokenizer, tokens, options, args, load_s)
        _print_statistics(runtime, args)
        written = runtime.finish()
        if args.json:
            return _print_json(report, written, model_path, tokens, options, text, args)
        _print_written(written, args)
    if args.demo:
        return compare_with_stock(model_path, tokens, options, text or "", args.seed or 0)
    return 0


def _check_args(args) -> None:
    """mlx-lm's flags this mlx-lm lacks set neutral; what needs no model checked (the stdin prompt
    read, Pillow found) before the model loads; the seed set."""
    import mlx.core as mx

    for name, value in MLX_LM_NEUTRAL.items():
        if not hasattr(args, name):
            setattr(args, name, value)
    _check_unsupported(args)
    if args.prompt == "-":  # before the model loads: a prompt that is not text is refused at once
        from golem.runtime.cli.stdin import read_stdin_text

        args.stdin_prompt = read_stdin_text()
    if args.image:
        _pil_image()  # before the model loads
    if args.seed is not None:
        mx.random.seed(args.seed)


def _pipeline_group(args):
    """The ``mlx.launch`` group under ``--pipeline`` (each rank's own ``--memory-budget`` set), else None."""
    import mlx.core as mx

    if args.pipeline is None and mx.distributed.init().size() > 1:
        raise ValueError("under mlx.launch, give --pipeline: golem splits the model's layers across the ranks "
                         "(without it every rank would run the whole model and print)")
    if args.pipeline is None:
        return None
    from golem.runtime.pipeline import init_group, parse_split, per_rank

    if args.demo:
        raise ValueError("--demo compares one machine's text with stock mlx-lm's: run it without --pipeline")
    parse_split(args.pipeline)  # a bad split is an error before any work
    group = init_group()
    args.memory_budget = per_rank(args.memory_budget, group.rank(), group.size(), "--memory-budget")
    return group


def _config(args):
    """The runtime config from golem's flags; the demo, unless sized by a flag, gets ``DEMO_SLOTS``."""
    extra = {}
    if args.demo:
        args.stats = True  # the demo shows where the experts came from, layer by layer
        sized = (args.cache_size is not None or args.memory_budget is not None or args.pin_layers is not None
                 or args.cache_size_override)
        if not sized:
            extra["cache_size"] = DEMO_SLOTS
    return runtime_config(args, **extra)


def _prompt_cache(args) -> tuple:
    """``--prompt-cache-file``'s KV cache and metadata, checked against the KV flags; (None, None) without it."""
    from mlx_lm.models.cache import QuantizedKVCache, load_prompt_cache

    if args.prompt_cache_file is None:
        return None, None
    if args.demo:
        raise ValueError("--demo compares its text with stock mlx-lm's from the same prompt: "
                         "run it without --prompt-cache-file")
    try:
        prompt_cache, metadata = load_prompt_cache(args.prompt_cache_file, return_metadata=True)
    except (RuntimeError, OSError, KeyError) as e:  # MLX reports a missing or damaged file as RuntimeError
        raise ValueError(f"--prompt-cache-file {args.prompt_cache_file}: cannot load a prompt cache "
                         f"({str(e).splitlines()[0] if str(e) else type(e).__name__})") from None
    if isinstance(prompt_cache[0], QuantizedKVCache):
        if args.kv_bits is not None and args.kv_bits != prompt_cache[0].bits:
            raise ValueError("--kv-bits does not match the kv cache loaded from --prompt-cache-file.")
        if args.kv_group_size != prompt_cache[0].group_size:
            raise ValueError("--kv-group-size does not match the kv cache loaded from --prompt-cache-file.")
    return prompt_cache, metadata


def _template_kwargs(args) -> dict:
    """``--chat-template-config``'s keyword arguments for the chat template."""
    if args.chat_template_config is None:
        return {}
    try:
        template_kwargs = json.loads(args.chat_template_config)
    except ValueError as e:
        raise ValueError(f"--chat-template-config: not JSON ({e})") from None
    if not isinstance(template_kwargs, dict):
        raise ValueError(f"--chat-template-config: expected a JSON object of keyword arguments, "
                         f"got {args.chat_template_config}")
    return template_kwargs


def _model_path(args, metadata: Optional[dict]) -> str:
    """The demo's checkpoint, ``--model``, or the prompt cache's model (which ``--model`` must match)."""
    model_path = demo_model() if args.demo else args.model
    if metadata is not None:
        if model_path is None:
            model_path = metadata["model"]
        elif model_path != metadata["model"]:
            raise ValueError(f"Providing a different model ({model_path}) than that used to create the prompt "
                             f"cache ({metadata['model']}) is an error.")
    if model_path is None:
        raise ValueError("--model is required (or --demo for a generated one)")
    return model_path


def _print_plan(model_path: str, config, args, group) -> int:
    """``--plan``: where the memory would go, printed by rank 0."""
    from golem.runtime.api import plan

    sizing = plan(model_path, config, pipeline=args.pipeline, group=group)
    if group is not None and group.rank() != 0:
        return 0  # rank 0 prints its plan
    if sizing.note:
        print(sizing.note)
    if sizing.plan is not None:
        print(sizing.plan.describe())
        print(_plan_notes(sizing))
    return 0


def _load(model_path: str, config, args, tokenizer_config: dict, group) -> tuple:
    """The offloaded model loaded (with progress unless ``--verbose False``), and the seconds it took."""
    from golem.runtime.api import load

    started = time.perf_counter()
    # On a terminal a live line, else one summary line; --verbose False prints the text alone, as mlx-lm.
    with StageProgress() if args.verbose else contextlib.nullcontext() as progress:
        loaded = load(model_path, config, tokenizer_config=tokenizer_config, adapter_path=args.adapter_path,
                      trust_remote_code=args.trust_remote_code, progress=progress, pipeline=args.pipeline,
                      group=group)
    return loaded, time.perf_counter() - started


def _prepare_runtime(runtime, tokenizer, args) -> None:
    """Every pipeline rank seeded alike, the sizing note shown, ``--extra-eos-token`` added."""
    import mlx.core as mx

    if runtime.pipeline is not None and runtime.pipeline.size > 1:
        from golem.runtime.pipeline import common_seed

        mx.random.seed(common_seed(runtime.pipeline, args.seed))  # every rank samples alike
    if runtime.sizing_note and args.verbose:
        print(f"[golem] {runtime.sizing_note}", file=sys.stderr)
    if runtime.index.packed is not None and args.verbose:
        print(f"[golem] experts read from {runtime.index.packed.path}, one read each (golem-pack)", file=sys.stderr)
    for eos_token in args.extra_eos_token:
        tokenizer.add_eos_token(eos_token)


def _generation_request(runtime, tokenizer, args, model_path: str, prompt_cache, template_kwargs: dict) -> tuple:
    """The prompt's tokens and mlx-lm's generation options (sampler, KV cache, draft model, image rows)."""
    import mlx.core as mx

    model = runtime.model
    prompt, use_chat_template = _prompt(args, tokenizer, prompt_cache is not None, template_kwargs)
    prompt, pixel_values = _images(runtime, prompt, args, model_path)
    tokens = tokenizer.encode(prompt, add_special_tokens=not use_chat_template)
    options = dict(
        max_tokens=args.max_tokens, sampler=_sampler(args, tokenizer), max_kv_size=args.max_kv_size,
        prefill_step_size=args.prefill_step_size, prompt_cache=prompt_cache,
        kv_bits=args.kv_bits, kv_group_size=args.kv_group_size, quantized_kv_start=args.quantized_kv_start,
        draft_model=None, num_draft_tokens=args.num_draft_tokens,
    )
    if pixel_values is not None:
        input_embeddings = model.embed_inputs(mx.array(tokens), pixel_values=pixel_values)
        mx.eval(input_embeddings)  # the prefill runs on another stream: the vision rows first
        options["input_embeddings"] = input_embeddings
    options["draft_model"] = _draft_model(args, tokenizer)
    return tokens, options


def _images(runtime, prompt: str, args, model_path: str) -> tuple:
    """``--image``: the prompt as the model's processor rewrites it and the pixel values; else (prompt, None)."""
    if not args.image:
        return prompt, None
    from mlx_lm.processors import load_processor

    processor = load_processor(runtime.model, runtime.config)
    if processor is None:
        raise ValueError(f"The model {model_path} does not take images.")
    import numpy as np

    Image = _pil_image()
    images = [np.asarray(Image.open(f).convert("RGB")) for f in args.image]
    return processor(prompt, images=images)


def _draft_model(args, tokenizer):
    """``--draft-model`` loaded by stock mlx-lm, its tokenizer checked against the model's; else None."""
    if args.draft_model is None:
        return None
    from mlx_lm import load as mlx_lm_load

    try:
        draft_model, draft_tokenizer = mlx_lm_load(args.draft_model)
    except Exception as e:  # mlx-lm and the hub client raise many kinds for a missing model
        raise ValueError(f"--draft-model {args.draft_model}: cannot load it "
                         f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else 'no detail'})") from None
    if draft_tokenizer.vocab_size != tokenizer.vocab_size:
        raise ValueError("Draft model tokenizer does not match model tokenizer.")
    return draft_model


def _generate(runtime, tokenizer, tokens, options: dict, args, load_s: float) -> tuple:
    """The text generated, printed as ``--json``, the demo or mlx-lm's ``generate`` print it, and the
    ``--json`` report (None otherwise)."""
    import mlx.core as mx
    from mlx_lm.generate import generate, stream_generate

    if args.demo:
        mx.random.seed(args.seed or 0)  # the stock run draws the same samples (see _compare_with_stock)
    if args.json:
        report = _json_generate(runtime, tokenizer, tokens, options, stream_generate)
        report["load_s"] = round(load_s, 6)
        if args.stats:
            print(format_layer_table(runtime), file=sys.stderr)
        return report["text"], report
    if args.demo:
        return demo_generate(runtime, tokenizer, tokens, options, stream_generate, args.verbose), None
    text = generate(runtime.model, tokenizer, tokens, verbose=args.verbose, **options)
    if not args.verbose:
        print(text)
    return text, None


def _print_statistics(runtime, args) -> None:
    """golem's figures after the text (the pipeline's ranks gathered: every rank takes part)."""
    # mlx-lm's --verbose False prints the text alone: golem's figures go to stderr then.
    out = sys.stdout if args.verbose else sys.stderr
    if runtime.pipeline is not None:
        from golem.runtime.pipeline import format_rank_table, gather_statistics

        rows = gather_statistics(runtime)  # every rank takes part
        if not args.json:
            print(f"Pipeline: {runtime.pipeline.describe()}", file=out)
            print(format_rank_table(rows), file=out)
    elif not args.json:
        print(format_stats(runtime), file=out)
    if not args.json:
        if args.stats:
            print(format_layer_table(runtime), file=out)
        if args.demo and args.verbose:
            print(explain(runtime))


def _print_json(report: dict, written: dict, model_path: str, tokens, options: dict, text: str, args) -> int:
    """``--json``'s one object (the files written; the demo's comparison with stock mlx-lm)."""
    report.update({k: str(v) for k, v in written.items()})
    if args.demo:
        report["matches_stock"] = compare_with_stock(model_path, tokens, options, text, args.seed or 0,
                                                      quiet=True) == 0
    print(json.dumps(report))
    return 0 if report.get("matches_stock", True) else 1


def _print_written(written: dict, args) -> None:
    """Where the trace and the profile went."""
    if args.verbose:
        if "trace" in written:
            print(f"Trace: {written['trace']}")
        if "profile" in written:
            print(f"Profile: {written['profile']}")


def _json_generate(runtime, tokenizer, tokens, options, stream_generate) -> dict:
    """Generate as mlx-lm's ``generate`` does and return what ``--json`` prints (the expert
    statistics are those of the table, ``golem.runtime.report``)."""
    started = time.perf_counter()
    text, ids, response = "", [], None
    for response in stream_generate(runtime.model, tokenizer, tokens, **options):
        text += response.text
        ids.append(int(response.token))
    wall_s = time.perf_counter() - started
    r = response
    return {
        "model": str(runtime.model_path or runtime.path),
        "text": text,
        "tokens": ids,
        "finish_reason": r.finish_reason if r is not None else None,
        "prompt_tokens": r.prompt_tokens if r is not None else len(tokens),
        "generation_tokens": r.generation_tokens if r is not None else 0,
        "timings": {
            "prompt_tps": r.prompt_tps if r is not None else 0.0,
            "generation_tps": r.generation_tps if r is not None else 0.0,
            "generate_s": round(wall_s, 6),
            "peak_memory_gb": r.peak_memory if r is not None else 0.0,
        },
        "experts": runtime.stats().as_dict(),
    }


def main(argv: Optional[list] = None) -> int:
    args = setup_arg_parser().parse_args(argv)
    show_library_warnings()
    from golem.io.index import CheckpointError
    from golem.io.read_errors import ReadError

    from golem.runtime.checkpoint import ModelError

    try:
        return run(args)
    except (ModelError, CheckpointError, ValueError, FileNotFoundError) as e:
        print(error_line("golem-run", e), file=sys.stderr)
        return 2
    except ReadError as e:
        print(error_line("golem-run", e, "read failed"), file=sys.stderr)
        return 1
    except BrokenPipeError:
        from golem.runtime.cli.trace import stdout_closed

        return stdout_closed()
    except KeyboardInterrupt:
        print("\ngolem-run: interrupted", file=sys.stderr)
        return 130
    except RuntimeError as e:
        from golem.runtime.pipeline import is_peer_loss, peer_lost_line

        if not is_peer_loss(e):
            raise
        print(f"golem-run: error: {peer_lost_line(e)}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
