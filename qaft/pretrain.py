"""Pretraining small Llama models on a local text, so that training recipes control a model's
whole history (papers A and D: how the training run shapes PTQ robustness).

Pieces, each usable alone:
  train_tokenizer(text, vocab_size)  a byte-level BPE tokenizer (the `tokenizers` library) on the
                                     train split, wrapped for transformers; no BOS is added, so
                                     every window is plain stream tokens
  ModelShape / SIZES                 Llama shapes from ~1M to ~20M parameters by short name, or
                                     any width/depth
  build_model(shape, tokenizer, ..)  a LlamaForCausalLM from config (tied embeddings), seeded
  pretrain(out, ...)                 trains it with `qaft.train.finetune` (the one training loop:
                                     schedules, WSD cooldown branches, mixed precision, seeded
                                     checkpoints and resume) on the train split cut into
                                     consecutive blocks, cycling over epochs as the token budget
                                     needs, then writes a plain transformers folder (model,
                                     tokenizer, qalign-pretrain.json) that every qalign command
                                     loads with --model OUT
  unigram_nll(train, windows, V)     the held-out NLL of the add-one unigram model of the train
                                     split: the bar any trained model has to clear

Training checkpoints live in OUT/checkpoints/step-*/ (`qaft.checkpoints`), so LAWA
(`qaft.averaging`) and cooldown branches read them.
"""

from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from torch import nn

from compare.data import TextSplits, tokenize
from compare.evaluate import evaluate_nll, heldout_windows
from compare.io import write_json
from ptq.errors import OptionsError

from .checkpoints import checkpoint_meta
from .fp_train import QTrainConfig, prepare_qtrain, restore_linears
from .train import TrainConfig, TrainResult, finetune

__all__ = ["ModelShape", "SIZES", "ModelConfig", "train_tokenizer", "build_model",
           "parameter_count", "train_blocks", "unigram_nll", "pretrain", "PretrainResult",
           "finished", "check_memory", "REPORT"]

REPORT = "qalign-pretrain.json"
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


@dataclass
class PretrainResult:
    out: Path
    parameters: int
    train: TrainResult
    epochs: float  # passes over the train split the token budget made
    heldout_nll: float  # nats per token on the held-out split's first eval_tokens
    unigram_nll: float  # the add-one unigram model's on the same tokens


def pretrain(out: str | os.PathLike, text: TextSplits, tokenizer, model_cfg: ModelConfig,
             train_cfg: TrainConfig, *, resume: bool = False,
             branch_from: str | os.PathLike | None = None, eval_fn=None,
             eval_tokens: int = 16384, progress: bool = True,
             qtrain: QTrainConfig | None = None, extra: dict | None = None) -> PretrainResult:
    """Train `model_cfg`'s model on text.train as `train_cfg` says (its max_tokens or max_steps
    is the budget) and write OUT as a transformers model folder with its tokenizer and
    qalign-pretrain.json (configs, history, parameters, seconds, the held-out NLL on eval_tokens
    tokens of text.heldout beside the unigram model's, and `extra`).

    Checkpoints go to OUT/checkpoints; resume continues the latest; branch_from starts at another
    run's checkpoint with this schedule (see qaft.train). eval_fn(model) -> float or dict is
    recorded every train_cfg.eval_every steps. qtrain: quantized training (paper C,
    `qaft.fp_train`): the decoder blocks' linear layers compute with rounded GEMM inputs; the
    saved model is plain, and heldout_nll is measured as trained (forward rounding on) with
    heldout_nll_plain beside it."""
    out = Path(out)
    if train_cfg.epochs != 1 or not (train_cfg.max_tokens or train_cfg.max_steps):
        raise OptionsError("pretraining is budgeted in tokens or steps: set max_tokens (or "
                           "max_steps) and leave epochs at 1")
    step_tokens = train_cfg.batch_size * train_cfg.grad_accum * model_cfg.seq_len
    steps = train_cfg.max_steps or train_cfg.max_tokens // step_tokens
    if branch_from is not None:  # before anything is written (qaft.train checks the rest)
        if not (Path(branch_from) / "train.json").is_file():
            raise OptionsError(f"branch_from={branch_from} is not a training checkpoint (no "
                               "train.json); give a step-* folder of a run's checkpoints")
        at = checkpoint_meta(branch_from)["step"]
        if at >= steps:
            raise OptionsError(f"the branch point {branch_from} is at step {at}, at or after "
                               f"the end of this run ({steps} steps of {step_tokens} tokens); "
                               "give the branch a budget beyond its branch point")
    blocks = train_blocks(tokenize(tokenizer, text.train), model_cfg.seq_len)
    windows, _ = heldout_windows(tokenizer, text, model_cfg.seq_len, eval_tokens)
    check_memory(model_cfg, train_cfg.batch_size)
    model = build_model(model_cfg, tokenizer)
    params = parameter_count(model)
    if qtrain is not None:
        prepare_qtrain(model, qtrain)
    epochs = steps * step_tokens / blocks.numel()
    if epochs > 1 and progress:
        print(f"qaft.pretrain: {steps * step_tokens:,} tokens are {epochs:.2f} epochs of the "
              f"{blocks.numel():,}-token train split of {text.name}; a larger text (a file or "
              "hf: dataset) gives more unique tokens", flush=True)
    tokenizer.save_pretrained(out)  # first, so that a resumed run finds the same tokenizer
    result = finetune(model, blocks, train_cfg, checkpoint_dir=out / "checkpoints",
                      resume=resume, branch_from=branch_from, eval_fn=eval_fn,
                      progress=progress)
    heldout = evaluate_nll(model, windows, batch_size=8, progress=False).nll
    plain = {}
    if qtrain is not None:
        restore_linears(model)
        plain = {"qtrain": asdict(qtrain), "heldout_nll_plain": evaluate_nll(
            model, windows, batch_size=8, progress=False).nll}
    model.save_pretrained(out)
    unigram = unigram_nll(blocks, windows, len(tokenizer))
    report = {"model": asdict(model_cfg), "shape": asdict(model_cfg.shape), "parameters": params,
              "train": asdict(train_cfg), "text": text.name, "train_tokens": blocks.numel(),
              "epochs": epochs, "steps": result.steps, "tokens_processed": result.tokens_processed,
              "seconds": result.seconds, "heldout_nll": heldout, "unigram_nll": unigram,
              "eval_tokens": windows.numel(), "branched_from": None if branch_from is None
              else str(branch_from), "history": result.history, **plain, **(extra or {})}
    write_json(out / REPORT, report)  # last: its presence marks a finished run
    return PretrainResult(out, params, result, epochs, heldout, unigram)


def finished(out: str | os.PathLike) -> dict | None:
    """The report of a finished pretraining run in `out`, or None."""
    path = Path(out) / REPORT
    return json.loads(path.read_text()) if path.is_file() else None

