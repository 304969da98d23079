from types import SimpleNamespace

import pytest
from torch import nn

import ptq
from compare.models import TINY_CONFIGS, tiny_model
from ptq.arch import ARCHS, Arch, ArchError, block_prefix, discover_blocks, get_arch, register_arch


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_discovery_finds_the_decoder_blocks_of_every_tiny_family(model_type):
    model = tiny_model(model_type)
    path = discover_blocks(model)
    blocks = model.get_submodule(path)
    assert len(blocks) == model.config.num_hidden_layers
    assert {type(b).__name__ for b in blocks} <= set(model._no_split_modules)
    # the table, where it has the family, agrees with discovery
    assert ARCHS.get(model_type, Arch(path)).blocks == path == block_prefix(model)
    assert ptq.decoder_blocks(model) is blocks


def test_families_outside_the_table_are_found():
    outside = [t for t in TINY_CONFIGS if t not in ARCHS]
    assert {"cohere2", "falcon", "gemma3_text", "gpt_neox", "olmo3", "phi"} <= set(outside)
    assert get_arch(tiny_model("gpt_neox")) == Arch("gpt_neox.layers")
    assert get_arch(tiny_model("falcon")) == Arch("transformer.h")


class _Layer(nn.Module):
    pass


class _Twin(nn.Module):
    """Two ModuleLists of the declared block class, as in a vision-language model."""
    _no_split_modules = ["_Layer"]

    def __init__(self, model_type):
        super().__init__()
        self.config = SimpleNamespace(model_type=model_type)
        self.vision = nn.Module()
        self.vision.layers = nn.ModuleList([_Layer()])
        self.text = nn.Module()
        self.text.layers = nn.ModuleList([_Layer(), _Layer()])


def test_several_candidates_is_an_error_and_the_override_wins():
    name = "test-arch-twin"
    model = _Twin(name)
    with pytest.raises(ArchError, match=r"several ModuleLists.*'text\.layers'.*register_arch"):
        ptq.decoder_blocks(model)
    try:
        register_arch(name, Arch("text.layers"))
        assert ptq.decoder_blocks(model) is model.text.layers
        assert block_prefix(model) == "text.layers"
    finally:
        ARCHS.pop(name, None)


def test_override_wins_over_discovery():
    name = "test-arch-override"
    model = _Twin(name)
    del model.text  # discovery now finds vision.layers
    assert discover_blocks(model) == "vision.layers"
    model.other = nn.ModuleList([_Layer(), _Layer(), _Layer()])
    try:
        register_arch(name, Arch("other"))
        assert ptq.decoder_blocks(model) is model.other
    finally:
        ARCHS.pop(name, None)


def test_model_without_blocks_names_the_fix():
    class Mystery(nn.Module):
        config = SimpleNamespace(model_type="mystery")

    class Declared(Mystery):
        _no_split_modules = ["MysteryLayer"]

    for model in (Mystery(), Declared()):
        with pytest.raises(ArchError) as e:
            ptq.decoder_blocks(model)
        msg = str(e.value)
        assert "\n" not in msg and isinstance(e.value, ValueError)
        assert "ptq.register_arch('mystery', ptq.Arch(blocks='model.layers'))" in msg


def test_a_registered_path_that_is_missing_names_the_fix():
    name = "test-arch-missing"
    try:
        register_arch(name, Arch("model.layers"))
        with pytest.raises(ArchError, match="has no module 'model.layers'.*register_arch"):
            ptq.decoder_blocks(_Twin(name))
    finally:
        ARCHS.pop(name, None)
