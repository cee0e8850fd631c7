"""Model cards and the registry: the cards are the one source of the models' facts; the registry imports nothing.

The literal numbers below are the counts and state-dict layouts of the models before the cards and layer
factories existed (recorded from that code); they guard old checkpoints (same keys, same shapes).
"""

from __future__ import annotations

import ast
import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from modalseg.errors import ConfigError
from modalseg.models import ModelCard, builder_options, create_model, list_models, model_card, model_cards
from modalseg.models.registry import model_cards_markdown

ROOT = Path(__file__).resolve().parents[1]
REGISTRY = ROOT / "src" / "modalseg" / "models" / "registry.py"

#: name -> (count with 1 input channel per modality, count with 3 channels), 2 classes, BN, 2 modalities
#: (1 for the single-modality models); recorded from the code before the cards.
TODAY_PAPER1 = {
    "unet": (34_525_954, 34_527_106),
    "unet_sa": (34_711_969, 34_713_121),
    "fusenet": (44_164_994, 44_167_298),
    "fusenet_concat": (50_431_874, 50_434_178),
    "fuse_origin_unet": (56_161_218, 56_163_522),
    "early_fuse_unet": (34_526_530, 34_528_834),
    "late_fuse_unet": (25_107_202, 25_108_354),
    "fuse_unet": (26_673_922, 26_675_074),
    "fuse_unet_sa": (26_767_200, 26_768_352),
    "master_assistant": (26_720_561, 26_721_713),
}
#: (number of state-dict entries, sha256[:16] of json [(key, shape), ...]) at 3 input channels.
TODAY_KEYS = {
    "unet": (156, "b1b8fe4a12c9a9b9"),
    "unet_sa": (221, "54cb7c6b4554b552"),
    "fusenet": (268, "5cb70060fea6ad5f"),
    "fusenet_concat": (268, "19e96018cc0fe647"),
    "fuse_origin_unet": (226, "2babacd2b020bf88"),
    "early_fuse_unet": (156, "569cd3e2d96cf383"),
    "late_fuse_unet": (226, "625f20b54bf2b939"),
    "fuse_unet": (226, "6fe5a8f37e0dd48b"),
    "fuse_unet_sa": (356, "e9b2c2c006216d4a"),
    "master_assistant": (291, "1f218e80379d6730"),
}
#: dilated FCN, one input channel, two modalities: (classes, norm) -> (count, entries, key hash)
TODAY_DILATED = {
    (4, "msbn"): (36_979_408, 343, "aa193e438bbc0a27"),
    (4, "bn"): (36_960_240, 188, "fa40a33f1f66f3e9"),
    (5, "msbn"): (39_342_552, 343, "5f75df4cd9881b97"),
    (5, "bn"): (39_322_360, 188, "2f0d9af65f553ea9"),
}
PAPER1_ORDER = [
    "unet", "unet_sa", "fusenet", "fusenet_concat", "fuse_origin_unet",
    "early_fuse_unet", "late_fuse_unet", "fuse_unet", "fuse_unet_sa", "master_assistant",
]


def n_params(model: torch.nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def key_fingerprint(model: torch.nn.Module) -> tuple[int, str]:
    keys = [(k, list(v.shape)) for k, v in model.state_dict().items()]
    return len(keys), hashlib.sha256(json.dumps(keys).encode()).hexdigest()[:16]


# ------------------------------------------------------------------------------------------- counts and keys
@pytest.mark.parametrize("name", PAPER1_ORDER)
def test_paper1_counts_and_keys_equal_the_card_and_today(name: str) -> None:
    card = model_card(name)
    m = 1 if card.inputs == "single" else 2
    with torch.device("meta"):
        one = create_model(name, num_modalities=m, in_channels=1, num_classes=2)
        ref = create_model(name, **card.counts[0].kwargs)
    assert card.counts[0].kwargs == {"num_modalities": m, "in_channels": 3, "num_classes": 2}
    assert (n_params(one), n_params(ref)) == TODAY_PAPER1[name]
    assert n_params(ref) == card.params_reconstructed
    assert key_fingerprint(ref) == TODAY_KEYS[name]


@pytest.mark.parametrize(("classes", "norm"), list(TODAY_DILATED))
def test_dilated_fcn_counts_and_keys_equal_today(classes: int, norm: str) -> None:
    with torch.device("meta"):
        model = create_model("dilated_fcn", in_channels=1, num_classes=classes, num_modalities=2, norm=norm)
    assert (n_params(model), *key_fingerprint(model)) == TODAY_DILATED[(classes, norm)]


def test_every_card_count_is_what_the_builder_builds() -> None:
    for card in model_cards():
        assert card.counts, card.name
        for count in card.counts:
            with torch.device("meta"):
                model = create_model(card.name, **count.kwargs)
            assert n_params(model) == count.reconstructed, (card.name, count.kwargs)


# ------------------------------------------------------------------------------------- facts derived from cards
def test_paper1_constants_are_derived_from_the_cards() -> None:
    from modalseg.models.paper1 import (
        PAPER1_MODELS,
        PAPER1_RECONSTRUCTED_PARAMS,
        PAPER1_TABLE1_PARAMS,
        PAPER1_TABLE1_ROWS,
    )

    assert list(PAPER1_MODELS) == PAPER1_ORDER  # Table 1's row order
    assert sorted(PAPER1_MODELS) == list_models(paper="paper1")
    assert [model_card(n).table1_row for n in PAPER1_MODELS] == list(range(1, 11))
    assert list(PAPER1_TABLE1_PARAMS.values()) == [34.5, 34.7, 29.4, 74.0, 56.2, 34.5, 25.1, 26.7, 26.8, 26.7]
    assert PAPER1_RECONSTRUCTED_PARAMS["master_assistant"] == 26.722
    assert PAPER1_RECONSTRUCTED_PARAMS == {n: round(TODAY_PAPER1[n][1] / 1e6, 3) for n in PAPER1_ORDER}
    assert PAPER1_TABLE1_ROWS["master_assistant"] == "Proposed" and PAPER1_TABLE1_ROWS["unet"] == "U-Net (T1C)"


def test_other_derived_constants() -> None:
    from modalseg.models.unpaired import DEFAULT_FEATURE_LAYERS
    from modalseg.training.model_meta import SINGLE_MODALITY_MODELS

    assert SINGLE_MODALITY_MODELS == frozenset({"unet", "unet_sa"})
    assert DEFAULT_FEATURE_LAYERS == {
        "dilated_fcn": ("group5", "group6"),
        "unet": ("master.blocks.3", "decoder.ups.0"),
    }
    assert list_models(paper="paper2") == ["dilated_fcn"]
    assert list_models(inputs="unpaired") == ["dilated_fcn"]
    assert set(list_models(family="fusenet")) == {"fusenet", "fusenet_concat"}


def test_card_fields() -> None:
    card = model_card("master_assistant")
    assert isinstance(card, ModelCard)
    assert (card.paper, card.family, card.inputs, card.default_width) == ("paper1", "fusion_unet", "paired", 32)
    assert (card.table1_row, card.table1_label, card.params_printed_m) == (10, "Proposed", 26.7)
    assert card.spatial_dims == (2, 3) and "spatial_dims" in card.options
    assert model_card("unet").default_width == 64 and model_card("fusenet").counts[0].note
    fcn = model_card("dilated_fcn")
    assert (fcn.width_option, fcn.default_width, fcn.table1_row, fcn.params_printed_m) == ("width", 16, None, None)
    assert [c.reconstructed for c in fcn.counts] == [36_979_408, 39_342_552]
    hash(card)  # frozen and hashable
    with pytest.raises(AttributeError):
        card.default_width = 8  # type: ignore[misc]
    with pytest.raises(ConfigError, match="unknown model"):
        model_card("unet3plus")


def test_default_width_of_the_card_is_the_builders_default() -> None:
    for card in model_cards():
        count = card.counts[0]
        with torch.device("meta"):
            default = create_model(card.name, **count.kwargs)
            explicit = create_model(card.name, **count.kwargs, **{card.width_option: card.default_width})
            other = create_model(card.name, **count.kwargs, **{card.width_option: card.default_width // 2})
        assert n_params(default) == n_params(explicit) != n_params(other)


# ------------------------------------------------------------------------------------------ option checking
@pytest.mark.parametrize("name", [*PAPER1_ORDER, "dilated_fcn"])
def test_unknown_options_name_the_option_and_the_model(name: str) -> None:
    with pytest.raises(ConfigError, match=rf"model {name}: unknown option\(s\) colour"):
        create_model(name, colour="red")
    assert "spatial_dims" in builder_options(name) and "colour" not in builder_options(name)
    with pytest.raises(ConfigError, match=f"model {name}: spatial_dims must be one of 2, 3"):
        create_model(name, spatial_dims=1)


# ----------------------------------------------------------------------------------------- registry imports
def test_registry_source_imports_only_errors_from_modalseg() -> None:
    tree = ast.parse(REGISTRY.read_text())
    imported = set()
    for node in ast.walk(tree):  # every import, at any depth (a lazy import in a function counts too)
        if isinstance(node, ast.Import):
            imported |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            imported.add("." * node.level + (node.module or ""))
    ours = {m for m in imported if m.startswith(("modalseg", "."))}
    assert ours == {"modalseg.errors"}, ours


def test_registry_alone_works_without_the_models() -> None:
    code = f"""
import importlib.util, sys
spec = importlib.util.spec_from_file_location("registry_alone", {str(REGISTRY)!r})
reg = importlib.util.module_from_spec(spec)
sys.modules["registry_alone"] = reg  # dataclasses look their module up
spec.loader.exec_module(reg)
assert "modalseg.models" not in sys.modules, "the package was imported"
assert "modalseg.models.paper1" not in sys.modules
assert reg.list_models() == []
import torch
card = reg.ModelCard(name="tiny", paper="test", family="test", inputs="single", description="d", default_width=1)
@reg.register_model(card)
def build(in_channels: int = 1) -> torch.nn.Module:
    return torch.nn.Conv2d(in_channels, 1, 1)
assert reg.create_model("tiny", in_channels=2).in_channels == 2
try:
    reg.create_model("tiny", width=3)
except Exception as exc:
    assert "model tiny: unknown option(s) width" in str(exc), exc
else:
    raise AssertionError("unknown option accepted")
print("ok")
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "ok"


# --------------------------------------------------------------------------------------------------- docs
def test_docs_models_md_holds_the_current_cards_table() -> None:
    text = (ROOT / "docs" / "models.md").read_text()
    begin, end = "<!-- model-cards:begin -->\n", "<!-- model-cards:end -->"
    assert begin in text and end in text
    table = text.split(begin, 1)[1].split(end, 1)[0]
    assert table == model_cards_markdown(), "regenerate with modalseg.models.registry.model_cards_markdown()"
    assert "| master_assistant | paper1 | 10. Proposed | paired | base_width=32 | 26.7M | 26,721,713 |" in table
