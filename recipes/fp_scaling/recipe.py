"""Recipe: floating-point quantized training and its scaling law at CPU scale (paper C).

    qalign recipe fp-scaling --out results/fp-scaling                 # CPU preset
    qalign recipe fp-scaling --preset gpu --out results/fp-scaling-gpu

Paper C (Sun et al. 2025, arXiv 2501.02423) fits L(N, D, E, M, B) to a grid of runs trained with
ExMy-rounded GEMM inputs. Here a grid of small Llama models is trained from scratch
(`qaft.pretrain` with `qaft.fp_train.QTrainLinear` in every decoder-block linear layer) over model
sizes N, token budgets D, formats E/M and block sizes B; each run's held-out loss, measured as
trained (the forward GEMMs rounded as in training), enters the fit (`compare.fp_law.fit`), and
the same models, without the rounding, are quantized after training with RTN and GPTQ at ExMy
specs, so the floating-point story meets the local-vs-global one.

Writes DIR/results.json (config, every run, the fit), DIR/runs.csv, DIR/predicted_vs_actual.png,
DIR/loss_vs_tokens.png, DIR/best_split.png and DIR/report.md (fitted constants beside the
published ones, findings). Finished runs are skipped on rerun; a killed run resumes.
"""

from __future__ import annotations

import dataclasses
import itertools
import re
import time
from dataclasses import dataclass
from pathlib import Path

from compare.fp_law import PUBLISHED, fit
from compare.io import write_json
from compare.robustness import parse_setting
from ptq.errors import OptionsError
from ptq.formats import parse_spec
from qaft.fp_train import POSITIONS, QTrainConfig
from qaft.pretrain import SIZES, ModelConfig, check_memory
from qaft.train import TrainConfig
from recipes.shared.common import ConfigError, out_folder
from recipes.shared.flags import option
from recipes.shared.training import RecipeSpec, Workbench

__all__ = ["FPScalingConfig", "PRESETS", "plan", "run_recipe", "build_parser", "run", "SCHEMA"]

SCHEMA = "qalign.fp-scaling/1"
# When the runs cannot identify the constants asked for, the fallback fit: the size and data
# coefficients and the irreducible loss, with the exponents and the precision term published
SCALE_ONLY = ("n", "d", "eps")
_CUSTOM = re.compile(r"^w(\d+)d(\d+)$")


@dataclass(frozen=True)
class FPScalingConfig:
    data: str = option("wiki", "training text: wiki (embedded), a text file, or hf:NAME[:CONFIG]")
    vocab_size: int = option(2048, "BPE vocabulary trained on the train split")
    seq_len: int = option(128, "training block and evaluation window length")
    batch_size: int = option(16, "blocks per optimizer step")
    sizes: tuple[str, ...] = option(("w64d2", "1m"), f"model sizes: {', '.join(SIZES)} or wWdD "
                                    "(width W, depth D)")
    tokens: tuple[int, ...] = option((100_000, 200_000, 400_000), "training token budgets D")
    formats: tuple[str, ...] = option(("e1m2", "e2m1", "e3m2", "e4m3"),
                                      "training formats e{E}m{M}")
    blocks: tuple[int, ...] = option((16, 64), "block sizes B of the scaling factors, along each "
                                     "GEMM's reduction dimension")
    targets: tuple[str, ...] = option(("P2", "P4", "P6"), "rounded GEMM inputs (qaft.fp_train)")
    lr: float = option(3e-3, "peak learning rate, cosine decay to 0")
    warmup_steps: int = option(10, "linear warmup steps")
    seed: int = option(0, "seed of the initialisation and the data order")
    ptq_settings: tuple[str, ...] = option(("rtn:e2m1-g32", "gptq:e2m1-g32", "rtn:e3m2-g32",
                                           "gptq:e3m2-g32", "rtn:e4m3-g32", "gptq:e4m3-g32"),
                                           "PTQ of every trained model (plain weights) afterwards")
    fit_free: tuple[str, ...] = option(("n", "a", "d", "b", "eps", "g", "dl", "nu"),
                                       "constants fitted (the rest stay at the published values)")
    calib_samples: int = option(32, "GPTQ calibration blocks from the train split")
    eval_tokens: int = option(8192, "held-out tokens of every measurement")

    def __post_init__(self):
        for name in ("sizes", "tokens", "formats", "blocks", "targets", "ptq_settings",
                     "fit_free"):
            value = getattr(self, name)
            object.__setattr__(self, name, (value,) if isinstance(value, (str, int))
                               else tuple(value))
        for name in ("vocab_size", "seq_len", "batch_size", "calib_samples", "eval_tokens"):
            if getattr(self, name) < 1:
                raise ConfigError(f"{name}={getattr(self, name)} must be >= 1")
        for s in self.sizes:
            self.model_config(s)
        step = self.batch_size * self.seq_len
        small = [t for t in self.tokens if t < step]
        if small:
            raise ConfigError(f"tokens {small} are less than one optimizer step of {step}; "
                              "raise them or lower batch_size / seq_len")
        for f in self.formats:
            if parse_spec(f).kind != "float":
                raise ConfigError(f"formats: {f} is not e{{E}}m{{M}}; the law is about "
                                  "floating-point formats")
        for B in self.blocks:
            if B < 2:
                raise ConfigError(f"blocks: {B}; a block holds at least 2 values")
            for s in self.sizes:
                shape = self.model_config(s).shape
                for dim in (shape.hidden_size, shape.intermediate_size, step):
                    if dim % B:
                        raise ConfigError(f"blocks: {B} does not divide {dim} (a reduction "
                                          f"dimension of model {s}: its width, MLP width or "
                                          "batch_size x seq_len); choose block sizes that "
                                          "divide them")
        bad = [t for t in self.targets if t not in POSITIONS]
        if bad or not self.targets:
            raise ConfigError(f"targets {list(self.targets)}: give positions among P1..P6")
        for s in self.ptq_settings:
            parse_setting(s)
        points = len(self.sizes) * len(self.tokens) * len(self.formats) * len(self.blocks)
        if points <= len(self.fit_free):
            raise ConfigError(f"{points} runs cannot fit {len(self.fit_free)} constants; add "
                              "runs or fit fewer (fit_free)")
        if not self.lr > 0:
            raise ConfigError(f"lr={self.lr} must be positive")

    def model_config(self, size: str) -> ModelConfig:
        m = _CUSTOM.match(size)
        kw = dict(width=int(m.group(1)), depth=int(m.group(2))) if m else dict(size=size)
        if not m and size not in SIZES:
            raise ConfigError(f"sizes: {size!r}: use one of {', '.join(SIZES)} or wWdD, e.g. "
                              "w64d2")
        try:
            return ModelConfig(vocab_size=self.vocab_size, seq_len=self.seq_len,
                               init_seed=self.seed, **kw)
        except OptionsError as e:
            raise ConfigError(f"sizes: {size}: {e}") from None


PRESETS = {
    # 44 min wall clock on one thread of the 2-core machine beside another recipe (README)
    "cpu": {},
    # paper-like ranges for a GPU: 3 sizes up to 21M parameters (8,192-token vocabulary) on
    # wikitext-103
    "gpu": {"data": "hf:Salesforce/wikitext:wikitext-103-raw-v1", "vocab_size": 8192,
            "seq_len": 512, "batch_size": 32, "sizes": ("3m", "8m", "20m"),
            "tokens": (20_000_000, 50_000_000, 100_000_000),
            "formats": ("e1m2", "e2m1", "e2m3", "e3m2", "e4m3", "e5m2"),
            "blocks": (32, 128, 512), "ptq_settings": ("rtn:e2m1-g32", "gptq:e2m1-g32",
                                                       "rtn:e4m3-g32", "gptq:e4m3-g32"),
            "calib_samples": 128, "eval_tokens": 65536},
}


def plan(cfg: FPScalingConfig) -> list[tuple[str, str, int, str, int]]:
    """(run id, size, tokens, format, block) of every grid point."""
    return [(f"{s}-D{t}-{f}-B{B}", s, t, f, B)
            for s, t, f, B in itertools.product(cfg.sizes, cfg.tokens, cfg.formats, cfg.blocks)]



def run_recipe(cfg: FPScalingConfig, out: Path, *, fresh: bool = False,
               progress: bool = True) -> dict:
    from recipes.fp_scaling.report import write_outputs

    for s in cfg.sizes:
        check_memory(cfg.model_config(s), cfg.batch_size)
    out = out_folder(out)
    path = out / "results.json"
    state = RECIPE.state(path, cfg, fresh, runs={},
                         seconds={"train": 0.0, "measure": 0.0})
    bench = Workbench(out, data=cfg.data, vocab_size=cfg.vocab_size, seq_len=cfg.seq_len,
                      eval_tokens=cfg.eval_tokens, calib_samples=cfg.calib_samples,
                      settings=cfg.ptq_settings, progress=progress)
    step_tokens = cfg.batch_size * cfg.seq_len
    for rid, size, tokens, fmt, B in plan(cfg):
        if rid in state["runs"]:
            continue
        model_cfg = cfg.model_config(size)
        spec = parse_spec(fmt)
        qtrain = QTrainConfig(spec=f"e{spec.exp_bits}m{spec.man_bits}-g{B}",
                              targets=cfg.targets)
        train = TrainConfig(lr=cfg.lr, batch_size=cfg.batch_size, schedule="cosine",
                            warmup_steps=cfg.warmup_steps, seed=cfg.seed,
                            max_steps=tokens // step_tokens)
        t0 = time.perf_counter()
        report = bench.train(out / "runs" / rid, model_cfg, train, qtrain=qtrain)
        t1 = time.perf_counter()
        final = out / "runs" / rid / "checkpoints" / f"step-{report['steps']:06d}"
        ptq = bench.measure(final, model_cfg)  # plain weights, rounded after training
        state["runs"][rid] = {
            "size": size, "N": report["parameters"], "D": report["tokens_processed"],
            "format": fmt, "E": spec.exp_bits, "M": spec.man_bits, "B": B,
            "loss": report["heldout_nll"], "loss_plain": report["heldout_nll_plain"],
            "unigram_nll": report["unigram_nll"], "epochs": report["epochs"],
            "train_seconds": report["seconds"],
            "tokens_per_second": report["tokens_processed"] / max(report["seconds"], 1e-9),
            "ptq": ptq}
        state["seconds"]["train"] += t1 - t0
        state["seconds"]["measure"] += time.perf_counter() - t1
        if progress:
            print(f"{rid:28s} loss {report['heldout_nll']:.4f} (plain weights "
                  f"{report['heldout_nll_plain']:.4f})", flush=True)
        write_json(path, state)
    runs = list(state["runs"].values())
    state["fit"], state["fit_error"] = None, None
    for free in (cfg.fit_free, SCALE_ONLY):
        try:
            state["fit"] = fit(runs, free=free).to_dict()
            break
        except OptionsError as e:  # reported, not fatal: the runs stay
            state["fit_error"] = state["fit_error"] or str(e)
    state["published"] = dataclasses.asdict(PUBLISHED)
    write_outputs(state, cfg, out)
    return state


RECIPE = RecipeSpec("fp-scaling", FPScalingConfig, PRESETS, SCHEMA,
                    "cpu: 2 CPU cores, under an hour (44 min measured); gpu: up to 21M "
                    "parameters on wikitext-103", __doc__, run_recipe)
build_parser, config_from_args, run, main = (RECIPE.build_parser, RECIPE.config_from_args,
                                             RECIPE.run, RECIPE.main)
