"""Pretraining small Llama models on a local text, so that training recipes control a model's
whole history (papers A and D: how the training run shapes PTQ robustness).

Pieces, each usable alone:
  train_tokenizer(text, vocab_size)  a byte-level BPE tokenizer (the `tokenizers` library) on the
                                     train split, wrapped for transformers; no BOS is added, so
                                     every window is plain stream tokens
  ModelShape / SIZES                 Llama shapes from ~1M to ~20M parameters by short name, or
                                     any width/depth
  build_model(shape, tokenizer, ..)  a LlamaForCausalLM from config (tied embeddings), seeded
  train_blocks(tokens, seq_len)      the train split cut into consecutive blocks
  unigram_nll(train, windows, V)     the held-out NLL of the add-one unigram model of the train
                                     split: the bar any trained model has to clear
  check_memory(cfg, batch)           a run that clearly exceeds RAM, refused from its config

The run itself (text, training through `qaft.train.finetune`, the saved model folder and its
report) is `recipes.shared.pretraining.pretrain`, which `qalign pretrain` and the training
recipes call.
"""

from __future__ import annotations

import os
from dataclasses import asdict, dataclass, field

import torch
from torch import nn

from ptq.errors import OptionsError

__all__ = ["ModelShape", "SIZES", "ModelConfig", "train_tokenizer", "build_model",
           "parameter_count", "train_blocks", "unigram_nll", "check_memory"]

SPECIAL = "<|endoftext|>"


@dataclass(frozen=True)
class ModelShape:
    hidden_size: int
    num_layers: int
    num_heads: int
    intermediate_size: int

    def __post_init__(self):
        for name, value in asdict(self).items():
            if value < 1:
                raise OptionsError(f"{name}={value} must be >= 1")
        if self.hidden_size % self.num_heads:
            raise OptionsError(f"hidden_size={self.hidden_size} is not a multiple of num_heads="
                               f"{self.num_heads}; choose heads that divide the width")


# Widths and MLP sizes are multiples of 64, so int specs with groups of 64 fit every layer.
# Parameters with a 4,096-token vocabulary and tied embeddings: 1.4M, 3.4M, 7.9M, 19.3M.
SIZES = {
    "1m": ModelShape(128, 4, 4, 384),
    "3m": ModelShape(192, 6, 6, 512),
    "8m": ModelShape(256, 8, 8, 768),
    "20m": ModelShape(384, 10, 6, 1024),
}


@dataclass(frozen=True)
class ModelConfig:
    """The model a pretraining run builds: a named size, optionally resized."""
    size: str = field(default="1m", metadata={"help": f"model size: {', '.join(SIZES)}"})
    width: int = field(default=0, metadata={
        "help": "hidden size instead of the size's (0: the size's); the MLP is 3x the width"})
    depth: int = field(default=0, metadata={
        "help": "number of decoder blocks instead of the size's (0: the size's)"})
    vocab_size: int = field(default=4096, metadata={
        "help": "BPE vocabulary of the tokenizer trained on the train split"})
    seq_len: int = field(default=128, metadata={
        "help": "training block length, and the model's positions"})
    dropout: float = field(default=0.0, metadata={
        "help": "attention dropout (Llama's only dropout)"})
    init_seed: int = field(default=0, metadata={"help": "seed of the weight initialisation"})

    def __post_init__(self):
        if self.size not in SIZES:
            raise OptionsError(f"size={self.size!r}: use one of {', '.join(SIZES)}, or set "
                               "width and depth")
        for name in ("width", "depth"):
            if getattr(self, name) < 0:
                raise OptionsError(f"{name}={getattr(self, name)} must be >= 0 (0: the size's)")
        if self.vocab_size < 257:
            raise OptionsError(f"vocab_size={self.vocab_size}: a byte-level BPE needs more than "
                               "the 256 bytes and one special token; use e.g. 4096")
        if self.seq_len < 2:
            raise OptionsError(f"seq_len={self.seq_len} must be >= 2")
        if not 0 <= self.dropout < 1:
            raise OptionsError(f"dropout={self.dropout} must lie in [0, 1)")
        self.shape  # width/heads compatibility, checked now

    @property
    def shape(self) -> ModelShape:
        base = SIZES[self.size]
        if not self.width:
            return ModelShape(base.hidden_size, self.depth or base.num_layers, base.num_heads,
                              base.intermediate_size)
        head_dim = next(d for d in (64, 32, self.width) if self.width % d == 0)
        return ModelShape(self.width, self.depth or base.num_layers, self.width // head_dim,
                          3 * self.width)


def train_tokenizer(text: str, vocab_size: int = 4096):
    """A byte-level BPE tokenizer trained on `text` (split at blank lines), as a transformers
    tokenizer: `save_pretrained` writes it, `AutoTokenizer.from_pretrained` reads it back. Its only
    special token <|endoftext|> is BOS, EOS and pad, and encoding adds none (GPT-2's convention)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=[SPECIAL],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(text.split("\n\n"), trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=SPECIAL, eos_token=SPECIAL,
                                   pad_token=SPECIAL)


def _llama_config(cfg: ModelConfig, tokenizer):
    from transformers import LlamaConfig

    shape = cfg.shape
    special = tokenizer.convert_tokens_to_ids(SPECIAL)
    return LlamaConfig(vocab_size=len(tokenizer), hidden_size=shape.hidden_size,
                       intermediate_size=shape.intermediate_size,
                       num_hidden_layers=shape.num_layers, num_attention_heads=shape.num_heads,
                       num_key_value_heads=shape.num_heads, max_position_embeddings=cfg.seq_len,
                       attention_dropout=cfg.dropout, tie_word_embeddings=True,
                       bos_token_id=special, eos_token_id=special, pad_token_id=special)


def build_model(cfg: ModelConfig, tokenizer) -> nn.Module:
    """A float32 LlamaForCausalLM of `cfg`'s shape for `tokenizer`, initialised from
    cfg.init_seed (the global RNG untouched)."""
    from transformers import LlamaForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(cfg.init_seed)
        return LlamaForCausalLM(_llama_config(cfg, tokenizer))


def parameter_count(model: nn.Module) -> int:
    """Parameters, a tied embedding counted once."""
    return sum(p.numel() for p in {id(p): p for p in model.parameters()}.values())


def check_memory(cfg: ModelConfig, batch_size: int) -> None:
    """Refuse a run whose weights, gradients, AdamW state and activations clearly exceed RAM
    (checked from the config alone, before a tokenizer or model exists)."""
    shape, V = cfg.shape, cfg.vocab_size
    h, L, i = shape.hidden_size, shape.num_layers, shape.intermediate_size
    params = V * h + L * (4 * h * h + 3 * h * i + 2 * h) + h  # tied embeddings
    # fp32 weights + grads + two AdamW moments; activations ~ 40 floats per hidden unit per
    # token per block, plus the logits and their gradient
    need = 16 * params + 4 * batch_size * cfg.seq_len * (40 * h * L + 3 * V)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    if need > 0.8 * total:
        raise OptionsError(f"this model ({params / 1e6:.1f}M parameters, batch {batch_size} x "
                           f"{cfg.seq_len}) needs about {need / 2**30:.1f} GiB to train, more "
                           f"than this machine's {total / 2**30:.1f} GiB allows; choose a "
                           "smaller size or width/depth, or a smaller batch_size")


def train_blocks(tokens: torch.Tensor, seq_len: int) -> torch.Tensor:
    """The token stream cut into consecutive (n, seq_len) blocks, the remainder dropped."""
    n = tokens.numel() // seq_len
    if n < 1:
        raise OptionsError(f"the train split has {tokens.numel()} tokens, fewer than one block of "
                           f"{seq_len}; give a larger text or a shorter seq_len")
    return tokens[:n * seq_len].view(n, seq_len)


def unigram_nll(train_tokens: torch.Tensor, windows: torch.Tensor, vocab_size: int) -> float:
    """Held-out NLL (nats per token) of the add-one-smoothed unigram model of the train tokens,
    scored on the tokens an LM is scored on (every window position but the first)."""
    counts = torch.bincount(train_tokens.flatten(), minlength=vocab_size).double() + 1
    logp = (counts / counts.sum()).log()
    return float(-logp[windows[:, 1:].flatten()].mean())
