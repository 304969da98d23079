"""Recipe: how the learning-rate schedule shapes PTQ robustness along training (paper A).

    qalign recipe training-dynamics --out results/training-dynamics          # CPU preset
    qalign recipe training-dynamics --preset gpu --out results/td-gpu

Paper A (Catalan-Tatjer et al. 2025, arXiv 2510.06213) finds that the quantization error
CE(Wq)/CE(W) - 1 of 3/4-bit GPTQ jumps when the learning rate decays, and that a higher peak
learning rate and checkpoint averaging (LAWA) reduce it. Here, for each peak learning rate, small
Llama models are trained from one initialisation on the train split (`qaft.pretrain`):
  constant   warmup, then the peak rate for `steps` steps: the WSD stable phase
  wsd        cooldowns branched from the constant run's checkpoints at the fractions
             `cooldown_at` of `steps`, each a linear decay to 0 over cooldown_fraction x the
             branch step (`qaft.train` checks that a branch continues its parent exactly)
  cosine     warmup, then cosine decay to 0 over `steps` steps
and at every checkpoint (and at LAWA averages of the last `lawa_window` constant-run checkpoints)
the held-out NLL in full precision and after each PTQ setting (RTN and GPTQ, 3 and 4 bits) is
measured (`recipes.shared.training`).

Writes DIR/results.json (config, versions, runs, one row per measured point), DIR/points.csv,
DIR/trajectories.png, DIR/quantized_vs_fp.png, DIR/averaging.png and DIR/report.md, whose
findings are computed from the rows. Runs resume from their last checkpoint; measured points are
written as they finish and skipped on rerun.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from pathlib import Path

from compare.io import write_json
from qaft.averaging import lawa
from qaft.checkpoints import checkpoint_steps
from qaft.pretrain import ModelConfig, check_memory
from qaft.train import TrainConfig
from recipes.shared.common import ConfigError, out_folder
from recipes.shared.flags import option
from recipes.shared.training import RecipeSpec, Workbench, settings_of

__all__ = ["DynamicsConfig", "PRESETS", "Run", "plan", "run_recipe", "build_parser", "run",
           "SCHEMA"]

SCHEMA = "qalign.training-dynamics/1"


@dataclass(frozen=True)
class DynamicsConfig:
    data: str = option("wiki", "training text: wiki (embedded), a text file, or hf:NAME[:CONFIG]")
    size: str = option("1m", "model size (qalign pretrain --size)")
    vocab_size: int = option(4096, "BPE vocabulary trained on the train split")
    seq_len: int = option(128, "training block and evaluation window length")
    batch_size: int = option(16, "blocks per optimizer step")
    steps: int = option(800, "optimizer steps of the constant (stable-phase) and cosine runs")
    warmup_steps: int = option(40, "linear warmup steps of every run")
    peak_lrs: tuple[float, ...] = option((1e-3, 3e-3, 1e-2), "peak learning rates")
    cooldown_at: tuple[float, ...] = option((0.25, 0.5, 1.0), "WSD branch points, as fractions of "
                                            "steps (rounded to the nearest checkpoint)")
    cooldown_fraction: float = option(0.2, "each cooldown decays over this fraction of its branch "
                                      "step")
    checkpoint_every: int = option(50, "steps between checkpoints (trajectory points) of the "
                                   "constant and cosine runs")
    lawa_window: int = option(4, "LAWA: the mean of the last this many constant-run checkpoints")
    weight_decay: float = option(0.1, "AdamW weight decay (matrices only)")
    grad_clip: float = option(1.0, "max gradient norm (0: off)")
    mixed_precision: str = option("bf16", "no, bf16 or fp16 autocast")
    seed: int = option(0, "seed of the initialisation and the data order, shared by every run")
    settings: tuple[str, ...] = option(("rtn:int3-g64", "gptq:int3-g64", "rtn:int4-g64",
                                       "gptq:int4-g64"), "PTQ settings METHOD:SPEC[+aB]")
    focus: str = option("gptq:int3-g64", "the setting the plots and findings are about")
    calib_samples: int = option(32, "GPTQ calibration blocks (seq_len long) from the train split")
    eval_tokens: int = option(8192, "held-out tokens of every measurement")

    def __post_init__(self):
        for name in ("peak_lrs", "cooldown_at", "settings"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, (str, int, float))
                               else tuple(value))
        for name in ("steps", "batch_size", "checkpoint_every", "lawa_window", "calib_samples",
                     "eval_tokens", "seq_len"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        if self.checkpoint_every > self.steps:
            raise ConfigError(f"checkpoint_every={self.checkpoint_every} is longer than steps="
                              f"{self.steps}; lower it so the runs have trajectory points")
        if not self.peak_lrs or any(not lr > 0 for lr in self.peak_lrs):
            raise ConfigError(f"peak_lrs={list(self.peak_lrs)}: give positive learning rates")
        late = [a for a in self.cooldown_at if not 0 < a <= 1]
        if late:
            raise ConfigError(f"cooldown_at={list(self.cooldown_at)}: a branch point must lie in "
                              f"(0, 1] of the stable run's {self.steps} steps ({late} do not); "
                              "a cooldown cannot branch after the end of training")
        if self.warmup_steps >= min(self.branch_steps()):
            raise ConfigError(f"warmup_steps={self.warmup_steps} reaches the first cooldown "
                              f"branch point (step {min(self.branch_steps())}); branch after "
                              "the warmup: lower warmup_steps or move cooldown_at later")
        if not 0 < self.cooldown_fraction <= 1:
            raise ConfigError(f"cooldown_fraction={self.cooldown_fraction} must lie in (0, 1]")
        kept = self.steps // self.checkpoint_every
        if self.lawa_window > kept:
            raise ConfigError(f"lawa_window={self.lawa_window} is longer than the {kept} "
                              f"checkpoints a {self.steps}-step run keeps every "
                              f"{self.checkpoint_every} steps; shorten the window or lower "
                              "checkpoint_every")
        if self.focus not in self.settings:
            raise ConfigError(f"focus={self.focus!r} must be one of settings "
                              f"{list(self.settings)}")
        settings_of(self.settings)
        self.model_config  # size, vocabulary and length, checked now
        TrainConfig(mixed_precision=self.mixed_precision, weight_decay=self.weight_decay,
                    grad_clip=self.grad_clip, warmup_steps=self.warmup_steps)

    @property
    def model_config(self) -> ModelConfig:
        return ModelConfig(size=self.size, vocab_size=self.vocab_size, seq_len=self.seq_len,
                           init_seed=self.seed)

    def branch_steps(self) -> list[int]:
        """The cooldown branch points: fractions of steps at the nearest checkpoint."""
        every = self.checkpoint_every
        points = {min(max(round(a * self.steps / every), 1) * every, self.steps // every * every)
                  for a in self.cooldown_at}
        return sorted(points)


PRESETS = {
    # about an hour on the 2-core machine, most of it shared with the other recipes (README)
    "cpu": {},
    # a 21M-parameter model (8,192-token vocabulary) on 330M tokens of wikitext-103, for a GPU
    # (a few hours on one)
    "gpu": {"data": "hf:Salesforce/wikitext:wikitext-103-raw-v1", "size": "20m",
            "vocab_size": 8192, "seq_len": 512, "batch_size": 64, "steps": 10000,
            "warmup_steps": 500, "peak_lrs": (1e-3, 2e-3, 4e-3), "checkpoint_every": 500,
            "lawa_window": 5, "settings": ("rtn:int3-g128", "gptq:int3-g128", "rtn:int4-g128",
                                           "gptq:int4-g128"),
            "focus": "gptq:int3-g128", "calib_samples": 128, "eval_tokens": 65536},
}


@dataclass(frozen=True)
class Run:
    id: str
    kind: str  # constant, wsd or cosine
    peak_lr: float
    train: TrainConfig
    parent: str | None = None  # the run a wsd cooldown branches from
    branch_step: int | None = None


def plan(cfg: DynamicsConfig) -> list[Run]:
    """Every training run, parents before their branches."""
    runs = []
    keep = cfg.steps // cfg.checkpoint_every + 1
    for lr in cfg.peak_lrs:
        base = TrainConfig(lr=lr, batch_size=cfg.batch_size, warmup_steps=cfg.warmup_steps,
                           weight_decay=cfg.weight_decay, grad_clip=cfg.grad_clip,
                           mixed_precision=cfg.mixed_precision, seed=cfg.seed,
                           max_steps=cfg.steps, checkpoint_every=cfg.checkpoint_every,
                           keep_checkpoints=keep)
        constant = Run(f"constant-lr{lr:g}", "constant", lr, base)
        runs.append(constant)
        for s in cfg.branch_steps():
            decay = max(round(cfg.cooldown_fraction * s), 1)
            train = dataclasses.replace(base, schedule="wsd", decay_steps=decay,
                                        max_steps=s + decay,
                                        checkpoint_every=max(decay // 4, 1), keep_checkpoints=8)
            runs.append(Run(f"wsd-lr{lr:g}-at{s}", "wsd", lr, train, constant.id, s))
        runs.append(Run(f"cosine-lr{lr:g}", "cosine", lr,
                        dataclasses.replace(base, schedule="cosine")))
    return runs



def run_recipe(cfg: DynamicsConfig, out: Path, *, fresh: bool = False,
               progress: bool = True) -> dict:
    from recipes.training_dynamics.report import write_outputs

    check_memory(cfg.model_config, cfg.batch_size)
    out = out_folder(out)
    path = out / "results.json"
    state = RECIPE.state(path, cfg, fresh, runs={}, points={},
                         seconds={"train": 0.0, "measure": 0.0})
    bench = Workbench(out, data=cfg.data, vocab_size=cfg.vocab_size, seq_len=cfg.seq_len,
                      eval_tokens=cfg.eval_tokens, calib_samples=cfg.calib_samples,
                      settings=cfg.settings, progress=progress)
    step_tokens = cfg.batch_size * cfg.seq_len
    model_cfg = cfg.model_config
    runs = plan(cfg)
    for r in runs:
        run_dir = out / "runs" / r.id
        t0 = time.perf_counter()
        branch = (out / "runs" / r.parent / "checkpoints" / f"step-{r.branch_step:06d}"
                  if r.parent else None)
        report = bench.train(run_dir, model_cfg, r.train, branch)
        if r.id not in state["runs"]:
            state["runs"][r.id] = {
                "kind": r.kind, "peak_lr": r.peak_lr, "parent": r.parent,
                "branch_step": r.branch_step, "steps": report["steps"],
                "seconds": report["seconds"], "unigram_nll": report["unigram_nll"],
                "parameters": report["parameters"],
                "epochs": report["epochs"],
                "lr": {str(row["step"]): row["lr"] for row in report["history"]
                       if "lr" in row}}
            state["seconds"]["train"] += time.perf_counter() - t0
            write_json(path, state)
        ckpts = run_dir / "checkpoints"
        own = [s for s in checkpoint_steps(ckpts) if r.branch_step is None or s > r.branch_step]
        todo = [(s, False) for s in own]
        if r.kind == "constant":
            todo += [(s, True) for s in own if s // cfg.checkpoint_every >= cfg.lawa_window]
        for step, averaged in todo:
            key = f"{r.id}@{step}" + (f"+lawa{cfg.lawa_window}" if averaged else "")
            if key in state["points"]:
                continue
            t0 = time.perf_counter()
            weights = lawa(ckpts, cfg.lawa_window, at=step) if averaged else \
                ckpts / f"step-{step:06d}"
            row = bench.measure(weights, model_cfg)
            lr = state["runs"][r.id]["lr"]
            state["points"][key] = {
                "run": r.id, "kind": r.kind, "peak_lr": r.peak_lr, "step": step,
                "tokens": step * step_tokens, "lr": lr.get(str(step)),
                "averaged": averaged, **row}
            state["seconds"]["measure"] += time.perf_counter() - t0
            if progress:
                print(f"{key:32s} FP {row['fp_nll']:.4f}  {cfg.focus} qerr "
                      f"{row['qerr'][cfg.focus]:+.4f}", flush=True)
            write_json(path, state)
    write_outputs(state, cfg, out)
    return state


RECIPE = RecipeSpec("training-dynamics", DynamicsConfig, PRESETS, SCHEMA,
                    "cpu: 2 CPU cores, about an hour (62 min measured); gpu: 21M parameters on "
                    "wikitext-103", __doc__, run_recipe)
build_parser, config_from_args, run, main = (RECIPE.build_parser, RECIPE.config_from_args,
                                             RECIPE.run, RECIPE.main)
