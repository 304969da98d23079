"""The misalignment study's units: what is planned (`Plan`, `plan_runs`, the search spaces) and
the shared reference every solution is measured against (`Study`). How one solution is produced
(with matched tuning) and measured is `recipes.misalignment.measure`.

A *plan* is one (method, spec, seed) solution. With tuning on, a solution is the best of
`trials` trials drawn from the method's search space (recipes.shared.tuning), chosen by NLL on the
validation slice of its seed's budget; fine-tuning trials also keep their best validation
checkpoint (early stopping). Every trial is recorded; only the chosen one is measured on the
held-out text.
"""

from __future__ import annotations

import dataclasses
import math

import torch

import qaft
from compare.data import DataBudget, bos_token_id, load_text, tokenize
from compare.dtypes import describe_dtype_choice, resolve_dtype
from compare.evaluate import evaluate_nll, heldout_windows, reference_logprobs
from compare.models import check_seq_len, load_model
from compare.probes import block_reference, heldout_hessians, probe, solution_weights
from ptq import quantize_model
from ptq.arch import block_prefix
from ptq.formats import parse_spec
from ptq.layers import quantizable_linears
from ptq.metrics import output_energy
from ptq.registry import get_method
from recipes.misalignment.config import QAFT_ARMS, MisalignmentConfig, parse_variant
from recipes.shared.common import check_specs
from recipes.shared.flags import field_types
from recipes.shared.tuning import merge_spaces

__all__ = ["FINETUNE", "Plan", "plan_runs", "Study", "search_spaces"]

FINETUNE = ("fp-ft", *QAFT_ARMS)


@dataclasses.dataclass(frozen=True)
class Plan:
    """One solution to produce and measure."""
    id: str
    method: str  # fp, fp-ft, rtn, gptq, qaft, qaft-mse, qaft-gptq or a registered PTQ method
    bits: int | None = None
    spec: str = "fp32"
    variant: str = ""  # a gptq_variants entry, "" for the method's defaults
    seed: int = 0

    @property
    def main(self) -> bool:
        """Solutions that get the gradient and landscape measurements (not fp or variants)."""
        return self.method != "fp" and not self.variant


def plan_runs(cfg: MisalignmentConfig) -> list[Plan]:
    multi = len(cfg.seeds) > 1

    def pid(base: str, seed: int) -> str:  # one seed keeps the plain ids
        return f"{base}@{seed}" if multi else base

    plans = [Plan("fp", "fp")] + [Plan(pid("fp-ft", s), "fp-ft", seed=s) for s in cfg.seeds]
    # the fine-tuning arms after the PTQ methods: QAFT from GPTQ starts at the GPTQ arm's choice
    methods = sorted(cfg.methods, key=lambda m: m in QAFT_ARMS)
    for b in cfg.bits:
        for m in methods:
            for s in cfg.seeds:
                plans.append(Plan(pid(f"{m}/{cfg.spec(b)}", s), m, b, cfg.spec(b), seed=s))
                if m == "gptq":
                    for v in cfg.gptq_variants:
                        spec = cfg.spec(b, parse_variant(v, cfg.granularity)[1])
                        plans.append(Plan(pid(f"gptq[{v}]/{spec}", s), "gptq", b, spec, v, s))
    return plans


def _finetune_fields(method: str) -> dict:
    fields = {k: v for k, v in field_types(qaft.TrainConfig).items()
              if k in ("lr", "loss", "schedule", "warmup_steps", "weight_decay")}
    if method != "fp-ft":
        fields.update({k: v for k, v in field_types(qaft.QAFTConfig).items() if k != "init"})
    else:
        fields.pop("loss")  # distilling the FP model from itself is a zero loss
    return fields


def search_spaces(cfg: MisalignmentConfig) -> dict[str, dict[str, tuple]]:
    """{method: {field: values}} for every tunable method of the study, declared spaces with
    the config's `search` entries on top."""
    from ptq.registry import available_methods

    used = [*cfg.methods, "fp-ft"]
    # entries may name any tunable method (a preset narrows spaces of methods a study may leave
    # out); the study draws from the spaces of its own methods
    defaults, types = {}, {}
    for m in [*available_methods(), *QAFT_ARMS, "fp-ft"]:
        if m in FINETUNE:
            types[m] = _finetune_fields(m)
            defaults[m] = {k: v for k, v in qaft.QAFT_SEARCH_SPACE.items() if k in types[m]}
        else:
            method = get_method(m)
            types[m] = field_types(method.options)
            defaults[m] = dict(method.search_space)
    spaces = merge_spaces(defaults, cfg.search, types)
    return {m: spaces[m] for m in used}


class Study:
    """What every solution is measured against: the FP weights, the held-out Hessians, windows
    and reference log-probs; and, per seed, the budget's blocks and its validation slice."""

    def __init__(self, cfg: MisalignmentConfig, device: str, progress: bool):
        self.cfg, self.device, self.progress = cfg, device, progress
        # QAFT from GPTQ starts at the GPTQ arm's chosen solution: {(spec, seed): its options}
        # (recorded when the arm runs, or read back from results.json on resume) and
        # {(spec, seed): its codes} (kept from the arm's run, or recomputed from the options)
        self.gptq_chosen: dict = {}
        self.gptq_starts: dict = {}
        self.spaces = search_spaces(cfg)  # bad search entries fail before any work
        self.dtype = resolve_dtype(cfg.dtype, device)
        print(f"dtype: {describe_dtype_choice(cfg.dtype, device)}", flush=True)
        model, tokenizer = load_model(cfg.model, device=device, dtype=self.dtype)
        check_seq_len(model, cfg.seq_len, "seq_len")
        check_seq_len(model, cfg.eval_seq_len, "eval_seq_len")
        check_specs(model, {p.spec for p in plan_runs(cfg) if p.bits})
        text = load_text(cfg.data)
        self.windows, self.bos_id = heldout_windows(tokenizer, text, cfg.eval_seq_len,
                                                    cfg.eval_tokens, cfg.add_bos)
        if self.windows.numel() < cfg.eval_tokens:
            print(f"note: the held-out text gives {self.windows.numel():,} of the "
                  f"{cfg.eval_tokens:,} eval tokens asked for", flush=True)
        self.probe_windows = self.windows[: max(cfg.probe_tokens // cfg.eval_seq_len, 1)]
        train = tokenize(tokenizer, text.train)
        bos = bos_token_id(tokenizer, cfg.add_bos)
        self.budgets = {s: DataBudget(cfg.samples, cfg.seq_len, s) for s in cfg.seeds}
        self.calib = {s: b.blocks(train, bos_id=bos) for s, b in self.budgets.items()}
        self.val = {s: b.validation_blocks(train, cfg.val_samples, bos_id=bos)
                    for s, b in self.budgets.items()}
        self.names = [n for n, _ in quantizable_linears(model)]
        prefix = block_prefix(model) + "."
        self.block_of = {n: int(n[len(prefix):].split(".")[0]) for n in self.names}
        self.fp_weights = solution_weights(model, self.names)
        self.hessians = heldout_hessians(model, self.probe_windows, self.names,
                                         batch_size=cfg.batch_size)
        # every probe's denominators, tr(W H W^T) of the FP weights: computed once
        self.energies = {n: output_energy(self.fp_weights[n].float(), self.hessians[n])
                         for n in self.names}
        self.reference = reference_logprobs(model, self.windows, batch_size=cfg.batch_size,
                                            progress=progress)
        self.block_ref = block_reference(model, self.probe_windows, batch_size=cfg.batch_size)
        self.fp_probe_nll = probe(model, self.probe_windows, self.fp_weights, self.hessians,
                                  batch_size=cfg.batch_size)["nll"]
        self.limit = self.fp_probe_nll + math.log(cfg.radius_ppl_ratio)

    def rtn_weights(self, spec: str, names: list[str] | None = None) -> dict:
        """{name: RTN solution of the FP weight} for the named layers (default: all)."""
        rtn = get_method("rtn")
        return {n: rtn.fn(self.fp_weights[n], None, parse_spec(spec), rtn.options()).weight
                for n in (names if names is not None else self.names)}

    def gptq_start(self, spec: str, seed: int) -> dict:
        """{layer: QuantizedTensor}: where QAFT from GPTQ starts, the solution the GPTQ arm
        chose on the validation slice for this spec and seed (GPTQ's default options when the
        study has no GPTQ arm). The arm's own codes when it ran in this invocation; otherwise
        GPTQ is run again with its chosen options, which gives the same codes (deterministic)."""
        key = (spec, seed)
        if key not in self.gptq_starts:
            method = get_method("gptq")
            options = dataclasses.replace(method.options(), **self.gptq_chosen.get(key, {}))
            self.gptq_starts[key] = quantize_model(self.fresh_model(), spec, "gptq", options,
                                                   calib=self.calib[seed],
                                                   progress=self.progress).quantized
        return self.gptq_starts[key]

    def fresh_model(self, dtype: torch.dtype | None = None):
        return load_model(self.cfg.model, device=self.device, dtype=dtype or self.dtype,
                          with_tokenizer=False)[0]

    @property
    def mixed_precision(self) -> str:
        """Fine-tuning keeps float32 weights (a bfloat16 weight would lose updates of lr 1e-5)
        and computes in the study's dtype through autocast."""
        return "bf16" if self.dtype == torch.bfloat16 else "no"

    def probe(self, model, grad: bool = False) -> dict:
        return probe(model, self.probe_windows, self.fp_weights, self.hessians, grad=grad,
                     batch_size=self.cfg.batch_size, blocks=self.block_ref,
                     energies=self.energies)

    def _compute(self, model):
        """A float32 model being fine-tuned is measured in the study's dtype (autocast), as the
        solutions are; a model already in that dtype runs as it is."""
        fp32 = next(model.parameters()).dtype == torch.float32
        enabled = fp32 and self.dtype != torch.float32
        return torch.autocast(torch.device(self.device).type, dtype=self.dtype, enabled=enabled)

    def checkpoint(self, model) -> dict:
        """The probe summary recorded along QAFT / GPTQ runs."""
        with self._compute(model), qaft.weights_computed_once(model):
            p = self.probe(model)
        return {k: p[k] for k in ("nll", "local_fp_mean", "local_prop_mean", "block_fp_mean",
                                  "distance")}

    def validation_nll(self, model, seed: int) -> float:
        """Mean NLL on the seed's validation slice: what tuning and early stopping choose by."""
        with self._compute(model):
            return evaluate_nll(model, self.val[seed], batch_size=self.cfg.batch_size,
                                progress=False).nll
