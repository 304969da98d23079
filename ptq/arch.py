"""Where the decoder blocks live in each supported Hugging Face architecture.

One small table keyed by `config.model_type`, instead of one driver per architecture. Each entry
names the dotted path of the `nn.ModuleList` of decoder blocks. Add a family with `register_arch`.
"""

from __future__ import annotations

from dataclasses import dataclass

from torch import nn

from .errors import QalignError


__all__ = ["Arch", "ARCHS", "ArchError", "register_arch", "get_arch", "decoder_blocks"]


class ArchError(QalignError):
    """A model whose architecture is not in the table."""


@dataclass(frozen=True)
class Arch:
    blocks: str  # dotted path from the CausalLM to its ModuleList of decoder blocks


ARCHS: dict[str, Arch] = {
    **{t: Arch("model.layers") for t in
       ("llama", "mistral", "qwen2", "qwen3", "gemma", "gemma2", "phi3", "olmo2", "granite")},
    "gpt2": Arch("transformer.h"),
    "opt": Arch("model.decoder.layers"),
}


def register_arch(model_type: str, arch: Arch) -> None:
    """Teach the toolkit a new `config.model_type`."""
    ARCHS[model_type] = arch


def get_arch(model: nn.Module) -> Arch:
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    if model_type not in ARCHS:
        raise ArchError(
            f"unsupported architecture {model_type!r} ({type(model).__name__}); supported: "
            f"{sorted(ARCHS)}. Add it with ptq.register_arch({model_type!r}, "
            "ptq.Arch(blocks='dotted.path.to.layers'))"
        )
    return ARCHS[model_type]


def decoder_blocks(model: nn.Module) -> nn.ModuleList:
    """The model's decoder blocks, in order."""
    arch = get_arch(model)
    try:
        blocks = model.get_submodule(arch.blocks)
    except AttributeError:
        raise ArchError(
            f"{type(model).__name__} has no module {arch.blocks!r}, where the table expects the "
            f"decoder blocks of model_type {model.config.model_type!r}; fix it with register_arch"
        ) from None
    if not isinstance(blocks, nn.ModuleList):
        raise ArchError(f"{arch.blocks!r} of {type(model).__name__} is not an nn.ModuleList")
    return blocks


def block_prefix(model: nn.Module) -> str:
    """Dotted name prefix of the decoder blocks, e.g. 'model.layers'."""
    return get_arch(model).blocks
