"""Model families: one module per model_type, each complete, found by name; a new one is a file."""

from __future__ import annotations

import ast
import copy
import sys
import textwrap
from pathlib import Path

import mlx.nn as nn
import pytest

from golem.predictors import families
from golem.predictors.families import Family, RouterAdapter, UnknownFamily
from golem.predictors.routers import find_moe_blocks, model_type_of, router_for
from golem.runtime.synthetic import FAMILIES, TINY

FOLDER = Path(families.__file__).parent
ROOT = Path(__file__).resolve().parent.parent
SUPPORTED = {"qwen3_moe", "qwen3_next", "qwen3_5_moe", "glm4_moe", "deepseek_v3", "minimax", "mixtral", "olmoe", "gpt_oss"}


def _module_names():
    return sorted(p.stem for p in FOLDER.glob("*.py") if not p.stem.startswith("_"))


def _build(fam: Family, model_type: str) -> nn.Module:
    """A tiny stock mlx-lm model of ``fam`` (from its generated config) reporting ``model_type``."""
    config = copy.deepcopy(fam.generated_config(TINY))
    text = config.get("text_config")
    if model_type != fam.model_type and not (text and text.get("model_type") == model_type):
        config["model_type"] = model_type  # a name mlx-lm remaps onto this family's model
    model_cls, args_cls = fam.model_classes()
    model = model_cls(args_cls.from_dict(config))
    if model_type_of(model) != model_type:  # the text model inside a multimodal one
        model = model.language_model
    assert model_type_of(model) == model_type
    return model


def test_the_registry_lists_exactly_the_modules_in_the_folder():
    assert families.model_types() == _module_names()
    primaries = [n for n in _module_names() if families.family(n).model_type == n]
    assert families.family_names() == primaries
    assert set(primaries) == SUPPORTED
    assert FAMILIES == tuple(primaries)  # every family gets a generated checkpoint


@pytest.mark.parametrize("model_type", _module_names())
def test_every_family_module_has_what_it_must(model_type):
    fam = families.family(model_type)
    assert isinstance(fam, Family) and model_type in fam.model_types
    assert families.family(fam.model_type) is fam  # an alias shares its family, not a copy
    assert isinstance(fam.router, RouterAdapter) and router_for(model_type) is fam.router
    for keys in (fam.top_k_keys, fam.num_experts_keys):
        assert keys and all(isinstance(k, str) and k for k in keys)

    config = fam.generated_config(TINY)
    assert config["model_type"] == fam.model_type
    assert families.config_top_k(config) == TINY.top_k
    assert families.config_num_experts(config) == TINY.experts
    quant = fam.generated_quantization(TINY)
    assert set(quant) == {"group_size", "bits", "mode"} and quant["bits"] == 4

    model = _build(fam, model_type)
    blocks = find_moe_blocks(model)
    assert blocks and all(b.family is fam for b in blocks)
    for b in blocks:
        assert b.block is getattr(b.layer, fam.router.block_attr)
        assert fam.router.experts_attr in b.block
        assert (b.num_experts, b.top_k) == (TINY.experts, TINY.top_k)
        for kind in families.NORM_KINDS:
            assert isinstance(getattr(b.layer, b.norm_attr(kind)), nn.Module), (model_type, kind)


@pytest.mark.parametrize("name", ["llama", "", "_base", "_shared", "qwen3_moe.x", "../olmoe", "Qwen3_Moe", None])
def test_an_unknown_model_type_is_a_clear_error(name):
    assert families.find_family(name) is None
    with pytest.raises(UnknownFamily) as e:
        families.family(name)
    message = str(e.value)
    assert repr(name) in message and "supported: " + ", ".join(families.model_types()) in message
    assert isinstance(e.value, ValueError)


def test_config_keys_are_the_familys_own_and_any_familys_for_unknown_types():
    # a family reads its own keys only, text_config first
    assert families.config_num_experts({"model_type": "glm4_moe", "num_experts": 8}) is None
    assert families.config_num_experts({"model_type": "glm4_moe", "n_routed_experts": 8}) == 8
    assert families.config_top_k({"model_type": "gpt_oss", "experts_per_token": 4}) == 4
    nested = {"model_type": "qwen3_5_moe", "num_experts_per_tok": 2, "text_config": {"num_experts_per_tok": 8}}
    assert families.config_top_k(nested) == 8
    # a model type golem does not know (the estimator still sizes it)
    assert families.config_top_k({"model_type": "glm_moe_dsa", "moe_topk": 6}) == 6
    assert families.config_num_experts({"model_type": "glm_moe_dsa", "n_routed_experts": 256}) == 256
    assert families.config_top_k({"model_type": "llama"}) is None


def test_norm_kinds_are_checked():
    with pytest.raises(ValueError, match="norm kind must be one of layer_input, post_attn, got 'pre_attn'"):
        families.family("olmoe").norm_attr("pre_attn")


@pytest.fixture
def extra_family_folder(tmp_path, monkeypatch):
    """A second folder searched for family modules; what it adds is forgotten afterwards."""
    monkeypatch.setattr(families, "__path__", [*families.__path__, str(tmp_path)])
    before = set(sys.modules)
    yield tmp_path
    for name in set(sys.modules) - before:
        if name.startswith(families.__name__ + "."):
            del sys.modules[name]


def test_a_new_family_is_one_file(extra_family_folder):
    (extra_family_folder / "toy_moe.py").write_text(textwrap.dedent('''
        """A family that routes like OLMoE under its own name and keys."""
        import dataclasses

        from golem.predictors.families.olmoe import FAMILY as OLMOE


        def generated_config(size):
            return {**OLMOE.generated_config(size), "model_type": "toy_moe"}


        FAMILY = dataclasses.replace(OLMOE, model_type="toy_moe", mlx_lm_module="olmoe",
                                     top_k_keys=("toy_top_k",), generated_config=generated_config)
    '''))
    assert "toy_moe" in families.model_types() and "toy_moe" in families.family_names()
    fam = families.family("toy_moe")
    assert families.config_top_k({"model_type": "toy_moe", "toy_top_k": 3, "num_experts_per_tok": 5}) == 3
    blocks = find_moe_blocks(_build(fam, "toy_moe"))
    assert len(blocks) == TINY.layers and blocks[0].family is fam


def test_a_broken_family_module_is_not_mistaken_for_a_missing_one(extra_family_folder):
    (extra_family_folder / "no_family.py").write_text("FAMILY = None\n")
    (extra_family_folder / "bad_import.py").write_text("import golem_no_such_package\n")
    with pytest.raises(TypeError, match=r"golem\.predictors\.families\.no_family must define FAMILY"):
        families.family("no_family")
    with pytest.raises(ModuleNotFoundError, match="golem_no_such_package"):
        families.family("bad_import")


def test_no_private_mlx_lm_names_are_used():
    """golem calls mlx-lm's public API only (an underscore name may change in any release)."""
    private = []
    for folder in ("io", "predictors", "runtime", "benchmarks", "tests"):
        for path in sorted((ROOT / folder).rglob("*.py")):
            for node in ast.walk(ast.parse(path.read_text(), str(path))):
                if isinstance(node, ast.ImportFrom) and (node.module or "").split(".")[0] == "mlx_lm":
                    names = [f"{node.module}.{a.name}" for a in node.names]
                elif isinstance(node, ast.Import):
                    names = [a.name for a in node.names if a.name.split(".")[0] == "mlx_lm"]
                elif isinstance(node, ast.Attribute) and ast.unparse(node).startswith("mlx_lm."):
                    names = [ast.unparse(node)]
                else:
                    continue
                private += [f"{path.relative_to(ROOT)}:{node.lineno} {n}" for n in names
                            if any(p.startswith("_") and not p.startswith("__") for p in n.split("."))]
    assert not private, private
