"""Recipe: how optimization choices shape PTQ robustness and outlier features (paper D).

    qalign recipe optimizer-choices --out results/optimizer-choices           # CPU preset
    qalign recipe optimizer-choices --preset gpu --out results/oc-gpu

Paper D (Ahmadian et al. 2023, arXiv 2305.19268) finds that weight decay, dropout, gradient
clipping and bf16 rather than fp16 training make models more robust to post-training
quantization, that robustness goes with fewer activation outliers, and that an early checkpoint's
degradation predicts the final one. Here small Llama models (`qaft.pretrain`) are trained from one
initialisation with a baseline recipe and with one choice changed at a time (`variants`); the
baseline is repeated over `baseline_seeds` (initialisation and data order) so that every effect
is read against the seed-to-seed spread. For each run, at the early checkpoint (`early_fraction`
of the steps) and at the end:
  degradation  100 x (CE(Wq) / CE(W) - 1) on held-out text for each PTQ setting: W8A8 (RTN
               int8 per-channel weights x per-token int8 activations) and weight-only RTN
               int4 / int3 (`compare.robustness`)
  outliers     max |x|, input features with |x| >= 6 and kurtosis of every linear layer's input
               on held-out windows (`compare.outliers`), summed or averaged over layers
and across runs the rank correlation of early and final degradation, with its interval.

Writes DIR/results.json, DIR/runs.csv, DIR/degradation.png, DIR/early_vs_final.png and
DIR/report.md with the findings computed from the rows. Runs resume from their last checkpoint;
finished runs and measurements are skipped on rerun.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

from compare.io import write_json
from compare.outliers import activation_outliers, summarize
from qaft.pretrain import ModelConfig, check_memory
from qaft.train import TrainConfig
from recipes.shared.common import ConfigError, out_folder
from recipes.shared.flags import coerce, option
from recipes.shared.training import RecipeSpec, Workbench, settings_of

__all__ = ["ChoicesConfig", "PRESETS", "FACTORS", "Choice", "plan", "run_recipe",
           "build_parser", "run", "SCHEMA"]

SCHEMA = "qalign.optimizer-choices/1"
# The factors a variant may change, their types, and the TrainConfig precision they map to
FACTORS = {"weight_decay": float, "dropout": float, "grad_clip": float, "precision": str}
PRECISIONS = {"fp32": "no", "bf16": "bf16", "fp16": "fp16"}


@dataclass(frozen=True)
class Choice:
    """One training recipe: the baseline's factors with `changed` applied."""
    id: str
    factors: dict
    seed: int
    changed: str | None  # the variant (KEY=VALUE), None for the baseline


def parse_variant(text: str) -> tuple[str, object]:
    key, sep, value = text.partition("=")
    key = key.strip().replace("-", "_")
    if not sep or key not in FACTORS:
        raise ConfigError(f"variant {text!r}: write KEY=VALUE with KEY one of {sorted(FACTORS)}")
    value = coerce(value.strip(), FACTORS[key], f"variant {text!r}")
    if key == "precision" and value not in PRECISIONS:
        raise ConfigError(f"variant {text!r}: precision is one of {sorted(PRECISIONS)}")
    if key != "precision" and not value >= 0:
        raise ConfigError(f"variant {text!r}: {key} must be >= 0")
    if key == "dropout" and not value < 1:
        raise ConfigError(f"variant {text!r}: dropout must be below 1")
    return key, value


@dataclass(frozen=True)
class ChoicesConfig:
    data: str = option("wiki", "training text: wiki (embedded), a text file, or hf:NAME[:CONFIG]")
    size: str = option("1m", "model size (qalign pretrain --size)")
    vocab_size: int = option(4096, "BPE vocabulary trained on the train split")
    seq_len: int = option(128, "training block and evaluation window length")
    batch_size: int = option(16, "blocks per optimizer step")
    steps: int = option(400, "optimizer steps of every run")
    warmup_steps: int = option(20, "linear warmup steps")
    lr: float = option(3e-3, "peak learning rate (cosine decay to 0)")
    weight_decay: float = option(0.1, "baseline AdamW weight decay")
    dropout: float = option(0.0, "baseline attention dropout")
    grad_clip: float = option(1.0, "baseline max gradient norm (0: off)")
    precision: str = option("bf16", "baseline training precision: fp32, bf16 or fp16 autocast")
    variants: tuple[str, ...] = option(("weight_decay=0", "weight_decay=0.01", "dropout=0.1",
                                       "grad_clip=0", "precision=fp32", "precision=fp16"),
                                       "one run per KEY=VALUE, the baseline with that one factor "
                                       f"changed; KEY in {sorted(FACTORS)}")
    baseline_seeds: tuple[int, ...] = option((0, 1, 2), "seeds of the baseline runs (the first "
                                             "also seeds every variant): the noise floor")
    early_fraction: float = option(0.25, "the early checkpoint, as a fraction of steps")
    settings: tuple[str, ...] = option(("w8a8", "rtn:int4-ch", "rtn:int3-ch"),
                                       "PTQ settings METHOD:SPEC[+aB] (w8a8: int8 per-channel "
                                       "weights x int8 per-token activations)")
    outlier_windows: int = option(16, "held-out windows the outlier statistics run on")
    calib_samples: int = option(32, "calibration blocks for settings whose method calibrates")
    eval_tokens: int = option(8192, "held-out tokens of every measurement")

    def __post_init__(self):
        for name in ("variants", "baseline_seeds", "settings"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, (str, int))
                               else tuple(value))
        for name in ("steps", "batch_size", "seq_len", "outlier_windows", "calib_samples",
                     "eval_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if not self.baseline_seeds or len(set(self.baseline_seeds)) != len(self.baseline_seeds):
            raise ConfigError(f"baseline_seeds={list(self.baseline_seeds)}: give one or more "
                              "distinct seeds")
        if not 0 < self.early_fraction < 1 or self.early_step < 1:
            raise ConfigError(f"early_fraction={self.early_fraction}: give a fraction in (0, 1) "
                              f"that is at least one of the {self.steps} steps")
        baseline = {"weight_decay": self.weight_decay, "dropout": self.dropout,
                    "grad_clip": self.grad_clip, "precision": self.precision}
        for key, value in baseline.items():
            parse_variant(f"{key}={value}")
        seen = set()
        for v in self.variants:
            key, value = parse_variant(v)
            if baseline[key] == value or (key, value) in seen:
                raise ConfigError(f"variant {v!r} repeats the baseline or another variant; "
                                  "give each changed factor once")
            seen.add((key, value))
        settings_of(self.settings)
        self.model_config(0.0, 0)
        TrainConfig(lr=self.lr, warmup_steps=self.warmup_steps)

    @property
    def early_step(self) -> int:
        return round(self.early_fraction * self.steps)

    def model_config(self, dropout: float, seed: int) -> ModelConfig:
        return ModelConfig(size=self.size, vocab_size=self.vocab_size, seq_len=self.seq_len,
                           dropout=dropout, init_seed=seed)

    def train_config(self, factors: dict, seed: int) -> TrainConfig:
        return TrainConfig(lr=self.lr, batch_size=self.batch_size, schedule="cosine",
                           warmup_steps=self.warmup_steps, weight_decay=factors["weight_decay"],
                           grad_clip=factors["grad_clip"],
                           mixed_precision=PRECISIONS[factors["precision"]], seed=seed,
                           max_steps=self.steps, checkpoint_every=self.early_step,
                           keep_checkpoints=self.steps // self.early_step + 1)


PRESETS = {
    # 55 min wall clock on one thread of the 2-core machine beside another recipe (README); the
    # fp16 run is most of it, since float16 matmuls are slow on a CPU
    "cpu": {},
    # a 21M-parameter model (8,192-token vocabulary) on wikitext-103, three seeds of everything,
    # for a GPU
    "gpu": {"data": "hf:Salesforce/wikitext:wikitext-103-raw-v1", "size": "20m",
            "vocab_size": 8192, "seq_len": 512, "batch_size": 64, "steps": 5000,
            "warmup_steps": 250, "lr": 2e-3, "calib_samples": 128, "eval_tokens": 65536},
}


def plan(cfg: ChoicesConfig) -> list[Choice]:
    base = {"weight_decay": cfg.weight_decay, "dropout": cfg.dropout,
            "grad_clip": cfg.grad_clip, "precision": cfg.precision}
    runs = [Choice(f"baseline-seed{s}", base, s, None) for s in cfg.baseline_seeds]
    for v in cfg.variants:
        key, value = parse_variant(v)
        runs.append(Choice(f"{key}={value}", {**base, key: value}, cfg.baseline_seeds[0], v))
    return runs



def run_recipe(cfg: ChoicesConfig, out: Path, *, fresh: bool = False,
               progress: bool = True) -> dict:
    from recipes.optimizer_choices.report import write_outputs

    check_memory(cfg.model_config(0.0, 0), cfg.batch_size)
    out = out_folder(out)
    path = out / "results.json"
    state = RECIPE.state(path, cfg, fresh, runs={},
                         seconds={"train": 0.0, "measure": 0.0})
    bench = Workbench(out, data=cfg.data, vocab_size=cfg.vocab_size, seq_len=cfg.seq_len,
                      eval_tokens=cfg.eval_tokens, calib_samples=cfg.calib_samples,
                      settings=cfg.settings, progress=progress)
    outlier_windows = bench.windows[:cfg.outlier_windows]
    for choice in plan(cfg):
        if choice.id in state["runs"]:
            continue
        run_dir = out / "runs" / choice.id
        model_cfg = cfg.model_config(choice.factors["dropout"], choice.seed)
        t0 = time.perf_counter()
        report = bench.train(run_dir, model_cfg, cfg.train_config(choice.factors, choice.seed))
        t1 = time.perf_counter()
        points = {}
        for name, step in (("early", cfg.early_step), ("final", cfg.steps)):
            ckpt = run_dir / "checkpoints" / f"step-{step:06d}"
            row = bench.measure(ckpt, model_cfg)
            per_layer = activation_outliers(bench.load(bench.model(model_cfg), ckpt),
                                            outlier_windows)
            points[name] = {"step": step, **row,
                            "degradation": {k: 100 * v for k, v in row["qerr"].items()},
                            "outliers": summarize(per_layer), "outliers_per_layer": per_layer}
        state["runs"][choice.id] = {"factors": choice.factors, "seed": choice.seed,
                                    "changed": choice.changed, "train_seconds": report["seconds"],
                                    "parameters": report["parameters"], **points}
        state["seconds"]["train"] += t1 - t0
        state["seconds"]["measure"] += time.perf_counter() - t1
        if progress:
            f = points["final"]
            print(f"{choice.id:24s} FP {f['fp_nll']:.4f}  " + "  ".join(
                f"{k} {v:+.2f}%" for k, v in f["degradation"].items())
                + f"  max|x| {f['outliers']['max_abs']:.1f}", flush=True)
        write_json(path, state)
    write_outputs(state, cfg, out)
    return state


RECIPE = RecipeSpec("optimizer-choices", ChoicesConfig, PRESETS, SCHEMA,
                    "cpu: 2 CPU cores, about an hour (55 min measured); gpu: 21M parameters on "
                    "wikitext-103", __doc__, run_recipe)
build_parser, config_from_args, run, main = (RECIPE.build_parser, RECIPE.config_from_args,
                                             RECIPE.run, RECIPE.main)
