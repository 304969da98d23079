"""The misalignment recipe's configuration: one dataclass, presets, YAML files and flags, 1:1.

Precedence: the preset's values, then the YAML file's, then the flags given. A YAML file is a
mapping whose keys are the dataclass's field names (plus an optional `preset`); an unknown key is
an error naming the known ones. Files are read with yaml.safe_load.
"""

from __future__ import annotations

import argparse
import math
from dataclasses import dataclass
from pathlib import Path

from ptq.formats import parse_spec
from ptq.gptq import GPTQOptions
from ptq.registry import available_methods
from recipes.shared.common import ConfigError
from recipes.shared.flags import (add_dataclass_flags, coerce, field_types, load_preset_config,
                                  option)

QAFT_ARMS = {"qaft": "rtn", "qaft-mse": "mse", "qaft-gptq": "gptq"}  # method -> QAFT init

__all__ = ["MisalignmentConfig", "QAFT_ARMS", "PRESETS", "ConfigError", "parse_variant", "load_config",
           "add_config_flags"]


@dataclass(frozen=True)
class MisalignmentConfig:
    model: str = option("smollm2-135m", "embedded name, local model folder or hub id")
    data: str = option("wiki", "text: wiki (embedded), a local file/folder, or hf:NAME[:CONFIG]")
    bits: tuple[int, ...] = option((2, 3, 4), "integer bit widths")
    granularity: str = option("g64", "ch, t or gN (groups of N inputs)")
    methods: tuple[str, ...] = option(("rtn", "hqq", "gptq", "block-ap", "qaft", "qaft-gptq"),
                                      "registered PTQ methods (layer: rtn, hqq, gptq; block: "
                                      "block-ap; `qalign methods` lists all) and QAFT from an RTN "
                                      "(qaft), MSE-clipped (qaft-mse) or GPTQ (qaft-gptq) start, "
                                      "per bit width")
    gptq_variants: tuple[str, ...] = option(("act_order=false",),
                                            "extra GPTQ solutions, each KEY=VALUE over "
                                            "GPTQOptions fields or granularity=gN, e.g. "
                                            "damp=0.1 act_order=false granularity=g128")
    samples: int = option(16, "data budget: token blocks (GPTQ calibration = QAFT training data)")
    seq_len: int = option(256, "data budget: tokens per block")
    seeds: tuple[int, ...] = option((0,), "seeds of the budget draw and the data order: each "
                                    "(method, spec, seed) is one result; the first seed also "
                                    "seeds the random directions")
    val_samples: int = option(4, "validation slice: train-split blocks disjoint from the budget, "
                              "for choosing hyperparameters only")
    tune: bool = option(True, "matched tuning: every method gets `trials` trials from its search "
                        "space, the lowest validation NLL wins (off: the pinned values)")
    trials: int = option(3, "trials per method and bit width when tuning")
    search: tuple[str, ...] = option((), "search-space overrides, METHOD.FIELD=V1,V2 (e.g. "
                                     "qaft.lr=1e-4,1e-3 gptq.damp=0.01,0.1)")
    epochs: int = option(2, "QAFT and FP-control epochs over the budget")
    lr: float = option(1e-5, "QAFT and FP-control AdamW learning rate when not tuned")
    schedule: str = option("constant", "QAFT and FP-control learning-rate schedule: constant, "
                           "cosine or wsd")
    warmup_steps: int = option(0, "QAFT and FP-control linear warmup steps")
    keep_best: bool = option(True, "fine-tuning keeps its checkpoint with the lowest NLL on the "
                             "validation slice (checked every checkpoint_every steps)")
    patience: int = option(0, "early stopping: validations without improvement before a "
                           "fine-tuning run stops (0: never; needs keep_best)")
    clip_dynamic: bool = option(False, "QAFT with dynamic scales: zero the gradient of the group "
                                "extremes that the rounded zero point leaves outside the "
                                "grid (the behaviour of earlier versions; off: they keep it)")
    eval_seq_len: int = option(512, "held-out evaluation window")
    eval_tokens: int = option(4096, "held-out tokens for NLL, perplexity and KL")
    probe_tokens: int = option(1024, "the first held-out tokens used for local losses, gradients, "
                               "sensitivity, trajectories and the landscape")
    checkpoint_every: int = option(8, "QAFT / FP-control optimizer steps between probes")
    trajectory_every: int = option(5, "GPTQ decoder blocks between probes")
    sensitivity_stride: int = option(6, "one-layer sensitivity on the layers of every k-th block")
    landscape_t: tuple[float, ...] = option((0.25, 0.5, 1.0, 1.5),
                                            "t of the landscape points W + t (W_hat - W)")
    radius_ppl_ratio: float = option(1.1, "the radius is where perplexity reaches FP x this ratio")
    batch_size: int = option(2, "evaluation batch (windows)")
    dtype: str = option("auto", "compute dtype of forward passes: auto (bfloat16 where the "
                                "hardware runs it fast), float32 or bfloat16; fine-tuning keeps "
                                "float32 weights and computes in bfloat16 (autocast) when this "
                                "is bfloat16")
    add_bos: bool | None = option(None, "start every window and block with BOS (default: the "
                                  "tokenizer's own convention)")

    def __post_init__(self):
        for name in ("bits", "methods", "gptq_variants", "landscape_t", "seeds", "search"):
            value = getattr(self, name)
            value = (value,) if isinstance(value, (str, int, float)) else tuple(value)
            object.__setattr__(self, name, value)
        if not self.bits or any(not 2 <= b <= 8 for b in self.bits):
            raise ConfigError(f"bits={list(self.bits)}: give integer widths from 2 to 8")
        for b in self.bits:
            parse_spec(f"int{b}-{self.granularity}")
        known = set(available_methods()) | set(QAFT_ARMS)
        unknown = [m for m in self.methods if m not in known]
        if unknown or not self.methods:
            raise ConfigError(f"methods={list(self.methods)}: unknown {unknown}; known: "
                              f"{sorted(known)} (register your own with ptq.register_method)")
        for v in self.gptq_variants:
            parse_variant(v, self.granularity)
        if self.dtype not in ("auto", "float32", "fp32", "bfloat16", "bf16"):
            raise ConfigError(f"dtype={self.dtype!r}: use auto, float32 or bfloat16")
        if self.patience and not self.keep_best:
            raise ConfigError(f"patience={self.patience} stops on the validation slice, which "
                              "keep_best=false turns off; set keep_best or patience 0")
        if not self.seeds or len(set(self.seeds)) != len(self.seeds):
            raise ConfigError(f"seeds={list(self.seeds)}: give one or more distinct seeds")
        if self.schedule not in ("constant", "cosine", "wsd") or self.warmup_steps < 0:
            raise ConfigError(f"schedule={self.schedule!r}, warmup_steps={self.warmup_steps}: "
                              "use constant, cosine or wsd and warmup_steps >= 0")
        for name in ("samples", "seq_len", "epochs", "checkpoint_every", "trajectory_every",
                     "sensitivity_stride", "batch_size", "val_samples", "trials"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.probe_tokens < self.eval_seq_len or self.eval_tokens < self.probe_tokens:
            raise ConfigError(f"need eval_seq_len ({self.eval_seq_len}) <= probe_tokens "
                              f"({self.probe_tokens}) <= eval_tokens ({self.eval_tokens}); "
                              "raise eval_tokens or lower probe_tokens")
        if not self.landscape_t or any(not 0 < t < math.inf for t in self.landscape_t):
            raise ConfigError(f"landscape_t={list(self.landscape_t)}: give positive values")
        if not (1 < self.radius_ppl_ratio < math.inf and 0 < self.lr < math.inf):
            raise ConfigError(f"radius_ppl_ratio={self.radius_ppl_ratio}, lr={self.lr}: need "
                              "radius_ppl_ratio > 1 and lr > 0, both finite")

    @property
    def seed(self) -> int:
        """The first seed: random directions and anything seeded once per study."""
        return self.seeds[0]

    def spec(self, bits: int, granularity: str | None = None) -> str:
        return str(parse_spec(f"int{bits}-{granularity or self.granularity}"))


PRESETS = {
    # README main job: SmolLM2-135M on 2 CPU cores (time measured in the README), at int3, where
    # the methods separate without collapsing, one method per rung of the locality ladder next
    # to RTN, and QAFT from both starts, RTN and the GPTQ arm's choice (`--bits 2 3 4 --seeds 0
    # 1 2`: the full study, 2 h 38 min there). Every method gets two trials, the whole of a
    # two-point space around its main knob; the spaces are narrowed here to fit the time, and
    # the paper preset tunes the full declared spaces.
    "quick": {"bits": (3,), "methods": ("rtn", "gptq", "block-ap", "qaft", "qaft-gptq"),
              "gptq_variants": (), "trials": 2, "eval_tokens": 8192,
              "schedule": "cosine", "warmup_steps": 2,
              "search": ("gptq.act_order=true,false", "gptq.damp=0.01", "gptq.clip_search=true",
                         "gptq.static_groups=false", "qaft.lr=1e-4,1e-3",
                         "qaft.scale_mode=learned", "qaft.loss=nll", "qaft-gptq.lr=3e-5,1e-4",
                         "qaft-gptq.scale_mode=learned", "qaft-gptq.loss=nll",
                         "fp-ft.lr=1e-5,1e-4", "hqq.beta=10", "block-ap.init=gptq",
                         "block-ap.scale_lr=1e-4", "block-ap.epochs=2"),
              "trajectory_every": 30, "sensitivity_stride": 15, "checkpoint_every": 16,
              "landscape_t": (0.5, 1.0, 1.5)},
    # the README's untuned comparison of earlier versions: pinned hyperparameters, one QAFT arm
    "untuned": {"tune": False, "keep_best": False, "clip_dynamic": True, "dtype": "float32",
                "methods": ("rtn", "gptq", "qaft")},
    # the papers' budget (128 x 2048 tokens), for a GPU
    "paper": {"samples": 128, "seq_len": 2048, "epochs": 1, "eval_seq_len": 2048,
              "trials": 6, "seeds": (0, 1, 2), "val_samples": 8, "schedule": "cosine",
              "warmup_steps": 8,
              "eval_tokens": 16384, "probe_tokens": 4096, "checkpoint_every": 16,
              "trajectory_every": 1, "sensitivity_stride": 1,
              "gptq_variants": ("act_order=false", "damp=0.1", "clip_search=false",
                                "granularity=g128"),
              "landscape_t": (0.25, 0.5, 0.75, 1.0, 1.25, 1.5)},
}


def parse_variant(text: str, granularity: str) -> tuple[GPTQOptions, str]:
    """'KEY=VALUE[,KEY=VALUE]' -> (GPTQOptions, granularity)."""
    fields = field_types(GPTQOptions)
    overrides = {}
    for part in text.split(","):
        key, sep, value = part.partition("=")
        key = key.strip().replace("-", "_")
        if not sep or (key not in fields and key != "granularity"):
            raise ConfigError(f"GPTQ variant {text!r}: write KEY=VALUE with KEY one of "
                              f"{sorted(fields) + ['granularity']}")
        if key == "granularity":
            granularity = value.strip()
            continue
        overrides[key] = coerce(value.strip(), fields[key], f"GPTQ variant {text!r}")
    return GPTQOptions(**overrides), granularity


def load_config(preset: str = "quick", yaml_path: Path | None = None,
                overrides: dict | None = None) -> MisalignmentConfig:
    return load_preset_config(MisalignmentConfig, PRESETS, preset, yaml_path, overrides,
                              example="recipes/examples/misalignment-int3.yaml",
                              error=ConfigError)


def add_config_flags(p: argparse.ArgumentParser) -> None:
    """One flag per config field (lists take several values), set only when given."""
    add_dataclass_flags(p, MisalignmentConfig, defaults=PRESETS["quick"],
                        default_label="quick preset")
