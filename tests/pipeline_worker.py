"""One rank of a pipeline run for tests/test_pipeline.py (started once per rank).

argv[1] is a JSON list of runs ``{"path", "depth", "cache", "tokens", "prefill", "split"}``;
each is loaded with ``pipeline=split`` and decoded greedily through mlx-lm's ``generate_step``
(prefill in chunks of ``prefill`` tokens); every rank prints one JSON line per run. With
``"forever": true`` it decodes until stopped, printing ``{"decoding": rank}`` after the first
token. A lost rank is reported as golem-run reports it, exit status 1.
"""

import json
import sys

import mlx.core as mx

from golem.runtime.pipeline import is_peer_loss, peer_lost_line


def run(spec: dict) -> dict:
    from mlx_lm.generate import generate_step

    import golem.runtime
    from golem.runtime.prefetch import PrefetchConfig

    from helpers import prompt_tokens

    depth = spec.get("depth", 0)
    options = dict(emulate_storage=spec.get("storage"))
    if spec.get("budget"):
        options["memory_budget"] = spec["budget"]
    else:
        options["cache_size"] = spec.get("cache", 4)
    if depth:  # a fixed depth: the governor's choices follow timing, and the tests compare recall
        options["prefetch"] = PrefetchConfig(depth=depth, threshold=0.1, governor=False)
    from golem.runtime.pipeline import PipelineConfig

    pipeline = PipelineConfig(split=spec.get("split", "even"), boundary_prefetch=spec.get("boundary", True))
    with golem.runtime.load(spec["path"], pipeline=pipeline, **options) as (model, tokenizer):
        runtime = model.golem
        prompt = mx.array(prompt_tokens(tokenizer, spec.get("prompt", "Once upon a time " * 3)))
        n = 10**9 if spec.get("forever") else spec.get("tokens", 20)
        out = []
        for token, _ in generate_step(prompt, model, max_tokens=n, sampler=lambda x: mx.argmax(x, axis=-1),
                                      prefill_step_size=spec.get("prefill", 8)):
            out.append(int(token))
            if len(out) == 1 and spec.get("forever"):
                print(json.dumps({"decoding": runtime.pipeline.rank}), flush=True)
        from golem.runtime.pipeline import gather_statistics

        rows = gather_statistics(runtime)
        t = runtime.engine.stats.total()
        from mlx.utils import tree_flatten

        from golem.runtime.pipeline import LAYER_OF_TENSOR

        held = sorted({int(m.group(1)) for name, _ in tree_flatten(model.parameters())
                       if (m := LAYER_OF_TENSOR.search(name))})
        return dict(rank=runtime.pipeline.rank, layers=sorted(runtime.engine.pools), held=held,
                    split=list(runtime.pipeline.split), tokens=out, misses=t.misses,
                    bytes_read=t.bytes_read, rows=rows, path=spec["path"], depth=depth)


def main() -> int:
    sys.path.insert(0, __file__.rsplit("/", 1)[0])
    try:
        for spec in json.loads(sys.argv[1]):
            print(json.dumps(run(spec)), flush=True)
    except RuntimeError as e:
        if not is_peer_loss(e):
            raise
        print(f"error: {peer_lost_line(e)}", file=sys.stderr, flush=True)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
