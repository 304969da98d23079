"""What the training recipes (training-dynamics, optimizer-choices, fp-scaling) share: one
tokenizer per output folder, small-model runs through `qaft.pretrain` that resume where they
stopped and are skipped once finished, and the PTQ robustness of a checkpoint
(`compare.robustness`) measured the same way for every run: held-out NLL in full precision and
after each PTQ setting, calibrated on one fixed draw of train-split blocks.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_model as load_safetensors

from compare.data import DataBudget, budget_blocks, load_text, tokenize
from compare.evaluate import evaluate_nll, heldout_windows
from compare.models import load_tokenizer
from compare.robustness import parse_setting, quantized_nll, relative_increase
from qaft.averaging import load_average
from qaft.fp_train import QTrainConfig
from qaft.pretrain import ModelConfig, build_model, train_tokenizer
from qaft.train import TrainConfig
from recipes.shared.common import ConfigError, previous_results, run_or_exit, versions
from recipes.shared.flags import add_dataclass_flags, given_fields, load_preset_config
from recipes.shared.pretraining import finished, pretrain

__all__ = ["Workbench", "settings_of", "RecipeSpec"]


def settings_of(texts) -> list:
    """The PTQ settings, parsed (errors before any work)."""
    return [parse_setting(t) for t in texts]


class Workbench:
    """The text, tokenizer, held-out windows and calibration blocks of one recipe folder."""

    def __init__(self, out: Path, *, data: str, vocab_size: int, seq_len: int, eval_tokens: int,
                 calib_samples: int, settings, progress: bool = True):
        self.progress = progress
        self.settings = settings_of(settings)
        self.text = load_text(data)
        folder = out / "tokenizer"
        if (folder / "tokenizer.json").is_file():  # a resumed recipe keeps its tokenizer
            self.tokenizer = load_tokenizer(str(folder))
        else:
            self.tokenizer = train_tokenizer(self.text.train, vocab_size)
            self.tokenizer.save_pretrained(folder)
        self.train_tokens = tokenize(self.tokenizer, self.text.train)  # once for every run
        self.windows, _ = heldout_windows(self.tokenizer, self.text, seq_len, eval_tokens)
        self.calib = budget_blocks(self.tokenizer, self.text, DataBudget(calib_samples, seq_len))
        self._models: dict[str, torch.nn.Module] = {}

    def train(self, run_dir: Path, model_cfg: ModelConfig, train_cfg: TrainConfig,
              branch_from: Path | None = None, qtrain: QTrainConfig | None = None) -> dict:
        """The report of the run in run_dir: read if finished, else trained (resumed from its
        last checkpoint when it has one)."""
        report = finished(run_dir)
        if report is not None:
            mine = json.loads(json.dumps({"model": asdict(model_cfg), "train": asdict(train_cfg),
                                          "qtrain": asdict(qtrain) if qtrain else None}))
            if {k: report.get(k) for k in mine} != mine:
                raise ConfigError(f"{run_dir} holds a run trained under another model or "
                                  "training config; use another --out, or delete that folder "
                                  "to retrain it")
        else:
            pretrain(run_dir, self.text, self.tokenizer, model_cfg, train_cfg, resume=True,
                     branch_from=branch_from, progress=self.progress, qtrain=qtrain,
                     train_tokens=self.train_tokens, windows=self.windows)
            report = finished(run_dir)
        return report

    def model(self, model_cfg: ModelConfig) -> torch.nn.Module:
        """One model object per model config, reused across checkpoints."""
        key = json.dumps(asdict(model_cfg), sort_keys=True)
        if key not in self._models:
            self._models[key] = build_model(model_cfg, self.tokenizer).eval()
        return self._models[key]

    @staticmethod
    def load(model: torch.nn.Module, weights: Path | dict) -> torch.nn.Module:
        """Weights of a checkpoint folder (step-*) or an averaged state dict, into `model`."""
        if isinstance(weights, dict):
            return load_average(model, weights)
        load_safetensors(model, str(Path(weights) / "model.safetensors"))
        return model

    def measure(self, weights: Path | dict, model_cfg: ModelConfig) -> dict:
        """FP and PTQ held-out NLL of a checkpoint folder (step-*) or averaged weights: {fp_nll,
        ptq: {setting: nll}, qerr: {setting: CE(Wq)/CE(W) - 1}, gap: {setting: nats}}."""
        model = self.model(model_cfg)
        fp = evaluate_nll(self.load(model, weights), self.windows, batch_size=16,
                          progress=False).nll
        ptq = {}
        for setting in self.settings:  # every setting starts from the FP weights
            ptq[setting.name] = quantized_nll(self.load(model, weights), setting, self.windows,
                                              self.calib, batch_size=16)
        return {"fp_nll": fp, "ptq": ptq,
                "qerr": {k: relative_increase(fp, v) for k, v in ptq.items()},
                "gap": {k: v - fp for k, v in ptq.items()}}


@dataclass(frozen=True)
class RecipeSpec:
    """A training recipe's command line: flags from its config dataclass, presets, YAML, the
    results.json state, and the entry points `qalign recipe NAME` and `python -m` call."""
    name: str  # e.g. "training-dynamics"; the module is recipes.training_dynamics
    config: type  # its config dataclass
    presets: dict
    schema: str  # the results.json schema tag
    preset_help: str
    doc: str  # the module docstring
    run_recipe: Callable  # run_recipe(cfg, out, *, fresh) -> state

    def build_parser(self, parser: argparse.ArgumentParser | None = None
                     ) -> argparse.ArgumentParser:
        module = "recipes." + self.name.replace("-", "_")
        p = parser or argparse.ArgumentParser(prog=f"python -m {module}",
                                              description=self.doc.split("\n")[0])
        p.add_argument("--preset", default="cpu", choices=sorted(self.presets),
                       help=f"{self.preset_help} (default: cpu)")
        p.add_argument("--config", type=Path, default=None,
                       help="YAML file whose keys are the flags below (underscored); flags win")
        p.add_argument("--out", type=Path, default=Path(f"results/{self.name}"),
                       help=f"output folder (default: results/{self.name})")
        p.add_argument("--fresh", action="store_true",
                       help="discard measurements in --out (trained runs are kept)")
        add_dataclass_flags(p, self.config, default_label="cpu preset")
        return p

    def config_from_args(self, args):
        return load_preset_config(self.config, self.presets, args.preset, args.config,
                                  given_fields(self.config, args), error=ConfigError)

    def run(self, args: argparse.Namespace) -> dict:
        return self.run_recipe(self.config_from_args(args), args.out, fresh=args.fresh)

    def main(self, argv=None) -> None:
        run_or_exit(self.run, self.build_parser().parse_args(argv))

    def state(self, path: Path, cfg, fresh: bool, **empty) -> dict:
        """The results a previous run of the same config left at `path`, or a new state."""
        config = json.loads(json.dumps(asdict(cfg)))
        previous = previous_results(path, config, fresh,
                                    lambda obj: obj.get("schema") == self.schema)
        if previous is not None:
            return previous
        return {"schema": self.schema, "config": config, "versions": versions(), **empty}
