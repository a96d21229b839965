"""TreeLoRAConfig: presets, validation with named fields, and the option table in the docstring."""

from __future__ import annotations

import math
import re

import pytest

from treelora.cl import TreeLoRAConfig

# The released code's behaviour as PAPER.md §1.2 describes it, option by option.
OFFICIAL_EXPECTED = {
    "signature": "param",  # (b): parameter values, not .grad
    "signature_window": "last_epoch",  # (b): only the last epoch is stored
    "accumulator": "scaled_sum",  # (b): current_grad += A / T every micro-batch
    "scale_signature_by_layers": True,  # (b): the add sits in a loop run L times
    "split": "mean_dot",  # (c): dot product with the group mean
    "use_differences": True,  # (c): D_i = G_i - G_{i-1}
    "normalize_distances": False,  # (d): raw L1 distances
    "search": "softmax",  # (d): per-layer softmax sampling
    "search_reset": "epoch",  # (d): per-epoch state
    "regularizer": "official",  # (e): normalised negative inner product
    "official_signed": True,  # (e): divides by the signed R
    "lambda_warmup": "epoch",  # (e): tmp_reg = reg * t / T within every epoch
    "reg_lambda": 0.5,  # (e) / §4: --reg 0.5 in every script
}


def test_paper_is_the_default():
    assert TreeLoRAConfig() == TreeLoRAConfig.paper()
    cfg = TreeLoRAConfig.paper()
    assert (cfg.signature, cfg.split, cfg.search, cfg.metric, cfg.lcb_c) == ("grad", "principal", "lcb", "l1", 2.0)
    assert cfg.search_reset == "task" and cfg.update_density == 1.0


def test_official_preset_matches_the_released_code():
    cfg = TreeLoRAConfig.official()
    for name, value in OFFICIAL_EXPECTED.items():
        assert getattr(cfg, name) == value, name


def test_presets_take_overrides_and_from_preset():
    assert TreeLoRAConfig.official(official_signed=False).official_signed is False
    assert TreeLoRAConfig.from_preset("official", seed=7) == TreeLoRAConfig.official(seed=7)
    assert TreeLoRAConfig.from_preset("paper") == TreeLoRAConfig()


def test_dict_round_trip():
    cfg = TreeLoRAConfig.official(max_tasks=5, update_density=0.25)
    assert TreeLoRAConfig.from_dict(cfg.to_dict()) == cfg


@pytest.mark.parametrize(
    "field, value",
    [
        ("update_density", 0.0),
        ("update_density", 1.5),
        ("update_density", -0.2),
        ("update_density", math.nan),
        ("metric", "manhattan"),
        ("split", "kd"),
        ("search", "ucb"),
        ("regularizer", "l2"),
        ("signature", "fisher"),
        ("reg_lambda", -0.1),
        ("lcb_c", -1.0),
        ("leaf_size", 0),
        ("max_tasks", 0),
        ("storage_dtype", "float16"),
        ("lambda_warmup", "cosine"),
    ],
)
def test_bad_values_name_the_field(field, value):
    with pytest.raises(ValueError, match=rf"TreeLoRAConfig\.{field}"):
        TreeLoRAConfig(**{field: value})


def test_bad_types_and_combinations():
    with pytest.raises(TypeError, match="use_differences"):
        TreeLoRAConfig(use_differences="yes")
    with pytest.raises(TypeError, match="leaf_size"):
        TreeLoRAConfig(leaf_size=1.5)
    with pytest.raises(ValueError, match="signature_window='last_epoch'"):
        TreeLoRAConfig(accumulator="scaled_sum")
    with pytest.raises(ValueError, match="unknown preset|preset must be one of"):
        TreeLoRAConfig.from_preset("released")
    with pytest.raises(ValueError, match=r"unknown TreeLoRAConfig options \['lambda'\]"):
        TreeLoRAConfig.paper(**{"lambda": 0.1})


def _doc_table() -> dict[str, tuple[str, str]]:
    rows = {}
    for line in TreeLoRAConfig.__doc__.splitlines():
        m = re.match(r"\s*``(\w+)``\s+(\S+)\s+(\S+)\s+\S", line)
        if m:
            rows[m.group(1)] = (m.group(2), m.group(3))
    return rows


def test_docstring_table_lists_every_option_with_both_preset_values():
    table = _doc_table()
    paper, official = TreeLoRAConfig.paper(), TreeLoRAConfig.official()
    for name in TreeLoRAConfig.help():
        assert name in table, f"option {name} is missing from the TreeLoRAConfig docstring table"
        assert table[name] == (str(getattr(paper, name)), str(getattr(official, name))), name
    assert set(table) == set(TreeLoRAConfig.help())


def test_every_option_has_help_text():
    for name, text in TreeLoRAConfig.help().items():
        assert len(text) > 20, name
