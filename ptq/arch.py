"""Where the decoder blocks of a Hugging Face causal LM live.

Found without a per-family table: transformers declares the decoder-block class of every model
in `model._no_split_modules` (e.g. {"LlamaDecoderLayer"}), and the blocks are the one
`nn.ModuleList` whose children are all of such a class. `ARCHS` holds overrides keyed by
`config.model_type`, which win over discovery: add one with `register_arch` for a model where
discovery fails (no `_no_split_modules`, or several such lists, as in a vision-language model).
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import QalignError


__all__ = ["Arch", "ARCHS", "ArchError", "register_arch", "get_arch", "decoder_blocks",
           "block_prefix", "discover_blocks"]


class ArchError(QalignError):
    """A model whose decoder blocks cannot be found."""


@dataclass(frozen=True)
class Arch:
    blocks: str  # dotted path from the CausalLM to its ModuleList of decoder blocks


# Overrides of discovery, keyed by config.model_type. These families are also found by
# discovery (tests/ptq/test_arch.py checks that both agree); they stay as a fixed reference.
ARCHS: dict[str, Arch] = {
    **{t: Arch("model.layers") for t in
       ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo2", "granite")},
    "gpt2": Arch("transformer.h"),
    "opt": Arch("model.decoder.layers"),
}


def register_arch(model_type: str, arch: Arch) -> None:
    """Name the decoder blocks of a `config.model_type`; wins over discovery."""
    ARCHS[model_type] = arch


def _model_type(model: nn.Module) -> str | None:
    return getattr(getattr(model, "config", None), "model_type", None)


def _fix(model: nn.Module) -> str:
    return (f"name them with ptq.register_arch({_model_type(model)!r}, "
            "ptq.Arch(blocks='model.layers')), giving the dotted path of the ModuleList of "
            "decoder blocks")


def discover_blocks(model: nn.Module) -> str:
    """Dotted path of the one `nn.ModuleList` whose children are all of a class named in
    `model._no_split_modules` (the decoder-block class transformers declares)."""
    names = set(getattr(model, "_no_split_modules", None) or ())
    what = f"{type(model).__name__} (model_type {_model_type(model)!r})"
    if not names:
        raise ArchError(f"cannot find the decoder blocks of {what}: it declares no "
                        f"_no_split_modules; {_fix(model)}")
    found = [name for name, m in model.named_modules()
             if isinstance(m, nn.ModuleList) and len(m) > 0
             and all(type(c).__name__ in names for c in m)]
    if len(found) != 1:
        where = f"several ModuleLists of them: {found}" if found else "no ModuleList of them"
        raise ArchError(f"cannot find the decoder blocks of {what}: its block classes "
                        f"{sorted(names)} give {where}; {_fix(model)}")
    return found[0]


def get_arch(model: nn.Module) -> Arch:
    """The registered override for the model's `config.model_type`, else the discovered blocks."""
    override = ARCHS.get(_model_type(model))
    return override if override is not None else Arch(discover_blocks(model))


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks, in order."""
    arch = get_arch(model)
    try:
        blocks = model.get_submodule(arch.blocks)
    except AttributeError:
        raise ArchError(
            f"{type(model).__name__} has no module {arch.blocks!r}, where the registered Arch "
            f"of model_type {_model_type(model)!r} expects the decoder blocks; {_fix(model)}"
        ) from None
    if not isinstance(blocks, nn.ModuleList):
        raise ArchError(f"{arch.blocks!r} of {type(model).__name__} is not an nn.ModuleList; "
                        f"{_fix(model)}")
    return blocks


def block_prefix(model: nn.Module) -> str:
    """Dotted name prefix of the decoder blocks, e.g. 'model.layers'."""
    return get_arch(model).blocks
