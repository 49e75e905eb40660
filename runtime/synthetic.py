"""Generated checkpoints: small (or large) MoE models of every supported family, offline.

Builds a checkpoint folder that stock mlx-lm loads (config.json, safetensors shards with an
index, an offline byte-level BPE tokenizer with a chat template), using mlx-lm's own model
classes. Experts are 4-bit quantized, everything else float32. Expert weights are scaled up so
that which experts a token routes to changes the generated text (tests rely on that).
Used by the tests, the benchmarks and ``golem-run --demo``; never downloads anything.
"""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Dict, Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from golem.predictors import families

#: Families a checkpoint can be generated of: one per module of ``golem.predictors.families``.
FAMILIES = tuple(families.family_names())


@dataclass(frozen=True)
class Size:
    """Dimensions of a generated model.

    Args:
        hidden: model width.
        layers: decoder layers.
        experts: routed experts per MoE layer.
        top_k: experts per token.
        expert_hidden: intermediate width of one expert.
        vocab: tokenizer vocabulary size.
        group_size: quantization group of the experts.
    """

    hidden: int = 64
    layers: int = 4
    experts: int = 16
    top_k: int = 4
    expert_hidden: int = 64
    vocab: int = 384
    group_size: int = 32


TINY = Size()


def family_config(family: str, size: Size = TINY) -> dict:
    """The config.json of a generated model of ``family``."""
    if family not in FAMILIES:
        raise ValueError(f"unknown family {family!r}; choose one of: {', '.join(FAMILIES)}")
    return families.family(family).generated_config(size)


def _is_expert_linear(path: str, module) -> bool:
    from mlx_lm.models.switch_layers import SwitchLinear

    return isinstance(module, SwitchLinear)


def _scale_experts(model: nn.Module, expert_scale: float, router_scale: float, residual_scale: float = 1.0) -> None:
    """Make routing matter: larger expert outputs, sharper and more varied routers.

    ``residual_scale`` < 1 shrinks what every block adds to the residual stream (attention
    and MLP output projections), so that it drifts slowly from layer to layer as in trained
    models, where a router applied a layer early already sees most of its input.
    """
    from mlx_lm.models.switch_layers import SwitchLinear

    if residual_scale != 1.0:
        for path, module in model.named_modules():
            leaf = path.rsplit(".", 1)[-1]
            if leaf in ("o_proj", "down_proj", "dense", "out_proj") and "weight" in module:
                module.weight = module.weight * residual_scale
    for path, module in model.named_modules():
        if isinstance(module, SwitchLinear):
            if path.endswith("down_proj"):
                module.weight = module.weight * expert_scale
            if "bias" in module:
                module.bias = mx.random.normal(module.bias.shape) * 0.1
        leaf = path.rsplit(".", 1)[-1]
        if leaf in ("gate", "router") and isinstance(module, nn.Linear):
            module.weight = module.weight * router_scale
        if hasattr(module, "e_score_correction_bias"):
            # Sigmoid routers (glm4_moe, deepseek_v3): a large weight saturates every score
            # and the correction bias alone would choose; keep the logits in sigmoid's slope.
            # (Their gate weights start as zeros in mlx-lm: draw them here.)
            if "weight" in module:
                fan_in = module.weight.shape[-1]
                module.weight = mx.random.normal(module.weight.shape) * (2.0 / fan_in**0.5)
            module.e_score_correction_bias = mx.random.normal(module.e_score_correction_bias.shape) * 0.01


_TOKENIZER_TEXT = """
The quick brown fox jumps over the lazy dog. A mixture of experts routes every token to a few
experts out of many; the rest of the weights stay idle. Memory is the bottleneck, so the experts
live on disk and stream in when a token needs them. def main(): print("hello world") return 0
Once upon a time there was a small computer that wanted to run a very large language model.
It read the weights from its disk, one expert at a time, and it was patient. 0123456789 + - * / = ( ) [ ] { }
Hello, how are you today? I am fine, thank you. What is the capital of France? Paris is the capital.
"""

_CHAT_TEMPLATE = (
    "{% for message in messages %}<|{{ message['role'] }}|>\n{{ message['content'] }}<|end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>\n{% endif %}"
)


def write_tokenizer(path: Path, vocab: int) -> None:
    """A byte-level BPE tokenizer trained offline on a fixed text, with a chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    specials = ["<|end|>", "<|system|>", "<|user|>", "<|assistant|>"]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator([_TOKENIZER_TEXT] * 4, trainer=trainer)
    tok.save(str(path / "tokenizer.json"))
    (path / "tokenizer_config.json").write_text(
        json.dumps(
            {
                "tokenizer_class": "PreTrainedTokenizerFast",
                "eos_token": "<|end|>",
                "bos_token": None,
                "pad_token": "<|end|>",
                "chat_template": _CHAT_TEMPLATE,
                "model_max_length": 4096,
            },
            indent=1,
        )
    )


def build_checkpoint(
    family: str,
    path: str | os.PathLike,
    *,
    size: Size = TINY,
    seed: int = 0,
    expert_scale: float = 24.0,
    router_scale: float = 8.0,
    residual_scale: float = 1.0,
    layers_per_shard: Optional[int] = None,
    overwrite: bool = False,
    progress: Optional[Callable[[int, int], None]] = None,
) -> Path:
    """Generate a checkpoint of ``family`` in ``path`` and return the path.

    Args:
        family: one of ``FAMILIES``.
        path: output folder (created).
        size: model dimensions.
        seed: random seed of the weights.
        expert_scale: factor on the experts' down projections (routing must matter).
        router_scale: factor on router weights (sharper, more varied routing).
        residual_scale: factor on every block's output projection (how fast the residual
            stream drifts from layer to layer).
        layers_per_shard: decoder layers per safetensors shard (default: two shards).
        overwrite: replace an existing folder.
        progress: called as ``progress(done_nbytes, total_nbytes)`` as the weights are made
            and written (first with 0 done); not called when the folder exists already.

    The folder appears whole or not at all: it is written beside ``path`` under a unique name
    and renamed into place, under a lock (``<path>.lock``) so that concurrent builders of one
    folder build it once.
    """
    from filelock import FileLock

    path = Path(path)
    if (path / "config.json").exists() and not overwrite:
        return path
    path.parent.mkdir(parents=True, exist_ok=True)
    # Concurrent builders of one folder take turns; whoever comes second finds it built.
    with FileLock(str(path.with_name(path.name + ".lock"))):
        if (path / "config.json").exists() and not overwrite:
            return path
        for stale in path.parent.glob(path.name + ".partial-*"):  # left by a builder that died
            shutil.rmtree(stale, ignore_errors=True)
        tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".partial-"))
        try:
            _write_checkpoint(family, tmp, size, seed, expert_scale, router_scale, residual_scale, layers_per_shard,
                              progress)
            if path.exists():
                old = Path(tempfile.mkdtemp(dir=path.parent, prefix=path.name + ".partial-old-"))
                os.replace(path, old / path.name)
                shutil.rmtree(old)
            os.replace(tmp, path)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return path


def _write_checkpoint(family: str, tmp: Path, size: Size, seed: int, expert_scale: float, router_scale: float,
                      residual_scale: float, layers_per_shard: Optional[int],
                      progress: Optional[Callable[[int, int], None]] = None) -> None:
    config = family_config(family, size)
    quant = families.family(family).generated_quantization(size)
    config["quantization"] = dict(quant)
    mx.random.seed(seed)
    model_cls, args_cls = families.family(family).model_classes()
    model = model_cls(args_cls.from_dict(copy.deepcopy(config)))
    _scale_experts(model, expert_scale, router_scale, residual_scale)
    nn.quantize(
        model,
        group_size=quant["group_size"],
        bits=quant["bits"],
        mode=quant["mode"],
        class_predicate=_is_expert_linear,
    )
    weights = dict(tree_flatten(model.parameters()))

    def layer_of(name: str) -> int:
        parts = name.split(".")
        if "layers" in parts:
            return int(parts[parts.index("layers") + 1])
        return -1

    per = layers_per_shard or max(1, (size.layers + 1) // 2)
    shards: Dict[int, Dict[str, mx.array]] = {}
    for name, w in weights.items():
        shards.setdefault(max(layer_of(name), 0) // per, {})[name] = w
    count = len(shards)
    weight_map = {}
    total = 0
    report = progress or (lambda done, total: None)
    all_nbytes, made = sum(w.nbytes for w in weights.values()), 0
    report(0, all_nbytes)
    for i, shard_id in enumerate(sorted(shards)):
        fname = f"model-{i + 1:05d}-of-{count:05d}.safetensors"
        tensors = shards[shard_id]
        for w in tensors.values():  # one tensor at a time: Ctrl-C is handled between them
            mx.eval(w)
            made += w.nbytes
            report(made, all_nbytes)
        mx.save_safetensors(str(tmp / fname), tensors, metadata={"format": "mlx"})
        for name, w in tensors.items():
            weight_map[name] = fname
            total += w.nbytes
        del tensors
        shards[shard_id] = {}
    (tmp / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=1)
    )
    write_tokenizer(tmp, size.vocab)
    vocab = json.loads((tmp / "tokenizer.json").read_text())["model"]["vocab"]
    config["eos_token_id"] = vocab["<|end|>"]
    (tmp / "config.json").write_text(json.dumps(config, indent=1))


def as_hub_snapshot(folder: str | os.PathLike, hub_dir: str | os.PathLike, repo_id: str = "golem/synthetic",
                    revision: str = "0" * 40) -> Path:
    """Lay ``folder``'s files out as the Hugging Face hub cache does and return the snapshot:
    ``hub_dir/models--org--name/blobs/<sha256>`` holds the bytes and
    ``snapshots/<revision>/<file>`` is a relative symlink to its blob (``../../blobs/<sha>``)."""
    import hashlib

    repo = Path(hub_dir) / ("models--" + repo_id.replace("/", "--"))
    snapshot = repo / "snapshots" / revision
    (repo / "blobs").mkdir(parents=True, exist_ok=True)
    snapshot.mkdir(parents=True, exist_ok=True)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / "main").write_text(revision)
    for src in sorted(Path(folder).iterdir()):
        if not src.is_file():
            continue
        digest = hashlib.sha256()
        with open(src, "rb") as f:
            for block in iter(lambda: f.read(1 << 20), b""):
                digest.update(block)
        blob = repo / "blobs" / digest.hexdigest()
        if not blob.exists():
            shutil.copyfile(src, blob)
        link = snapshot / src.name
        if link.is_symlink() or link.exists():
            link.unlink()
        link.symlink_to(os.path.relpath(blob, snapshot))
    return snapshot


def default_cache_dir() -> Path:
    """Where generated checkpoints are kept between runs (``GOLEM_CACHE`` overrides)."""
    root = os.environ.get("GOLEM_CACHE") or os.path.join(
        os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "golem"
    )
    return Path(root)
