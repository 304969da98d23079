"""The misalignment study's units: what is planned, the shared reference, and how one solution
is produced (with matched tuning) and measured. `recipes.misalignment` runs them and resumes.

A *plan* is one (method, spec, seed) solution. With tuning on, a solution is the best of
`trials` trials drawn from the method's search space (recipes.tuning), chosen by NLL on the
validation slice of its seed's budget; fine-tuning trials also keep their best validation
checkpoint (early stopping). Every trial is recorded; only the chosen one is measured on the
held-out text.
"""

from __future__ import annotations

import dataclasses
import math
import time
import zlib

import torch

import qaft
from compare.alignment import first_crossing
from compare.data import DataBudget, bos_token_id, load_text, tokenize
from compare.dtypes import describe_dtype_choice, resolve_dtype
from compare.evaluate import evaluate_nll, heldout_windows, reference_logprobs
from compare.memory import PeakRSS
from compare.models import check_seq_len, load_model
from compare.probes import (block_reference, heldout_hessians, nll_along, one_layer_sensitivity, probe,
                            random_direction, solution_weights, swapped_weights)
from ptq import quantize_model
from ptq.arch import block_prefix, decoder_blocks
from ptq.formats import parse_spec
from ptq.layers import linear_weight, quantizable_linears
from ptq.metrics import layer_loss, output_energy, relative_output_error_from_hessian
from ptq.registry import get_method
from recipes.common import check_specs
from recipes.misalignment_config import QAFT_ARMS, MisalignmentConfig, parse_variant
from recipes.tuning import draw_trials, merge_spaces
from recipes.flags import field_types

__all__ = ["Plan", "plan_runs", "Study", "measure", "sensitivity", "search_spaces"]

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


def _train_layers_only(model, names: list[str]) -> None:
    """Freeze everything except the selected layers' weights (embeddings, norms, head)."""
    keep = {id(linear_weight(model.get_submodule(n))) for n in names}
    keep |= {id(model.get_submodule(n).weight) for n in names}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def _finetune(study: Study, plan: Plan, model, point: dict, out: dict) -> None:
    cfg = study.cfg
    _train_layers_only(model, study.names)
    train_fields = set(field_types(qaft.TrainConfig))
    pinned = {"lr": cfg.lr, "schedule": cfg.schedule, "warmup_steps": cfg.warmup_steps}
    keep_best = cfg.keep_best  # the number of steps is chosen on the validation slice too
    train = qaft.TrainConfig(**{**pinned, **{k: v for k, v in point.items() if k in train_fields}},
                             epochs=cfg.epochs, seed=plan.seed, eval_every=cfg.checkpoint_every,
                             mixed_precision=study.mixed_precision,
                             validate_every=cfg.checkpoint_every if keep_best else 0,
                             patience=cfg.patience if keep_best else 0)
    validate = (lambda m: study.validation_nll(m, plan.seed)) if keep_best else None
    if plan.method == "fp-ft":
        start_weights = {}
        run = lambda: qaft.finetune_fp(model, study.calib[plan.seed], train,  # noqa: E731
                                       eval_fn=study.checkpoint, validate_fn=validate,
                                       progress=study.progress)
    else:
        # tuned runs: the group extremes of dynamic scales keep their gradient (qaft.fake_quant)
        config = qaft.QAFTConfig(init=QAFT_ARMS[plan.method], clip_dynamic=cfg.clip_dynamic,
                                 **{k: v for k, v in point.items() if k not in train_fields})
        # step 0 of an RTN start is RTN (dynamic min/max scales give exactly RTN's grid)
        start_weights = study.rtn_weights(plan.spec) if config.init == "rtn" else None
        # a GPTQ start is the GPTQ arm's chosen solution, the same for every trial
        key = (plan.spec, plan.seed)
        start = study.gptq_start(*key) if config.init == "gptq" else None
        out["start"] = None if start is None else {
            "method": "gptq", "options": study.gptq_chosen.get(key, {}),
            "from": "gptq arm" if key in study.gptq_chosen else "defaults"}
        run = lambda: qaft.finetune_qaft(model, study.calib[plan.seed], plan.spec,  # noqa: E731
                                         config, train, eval_fn=study.checkpoint,
                                         validate_fn=validate, progress=study.progress,
                                         solution=start)
    if start_weights is not None:
        with swapped_weights(model, start_weights):
            out["trajectory"].append({"step": 0, "tokens_processed": 0,
                                      **study.checkpoint(model)})
    res = run()
    res.model.to(study.dtype)  # evaluated like every other solution
    keys = ("step", "tokens_processed", "unique_tokens", "loss", "seconds", "nll",
            "local_fp_mean", "local_prop_mean", "block_fp_mean", "distance", "val_nll")
    out["trajectory"] += [{k: r[k] for k in keys if k in r} for r in res.train.history
                          if "nll" in r]
    out.update(unique_tokens=res.train.unique_tokens,
               tokens_processed=res.train.tokens_processed, steps=res.train.steps,
               best_step=getattr(res.train, "best_step", None))


def solve(study: Study, plan: Plan, model, point: dict) -> dict:
    """Turn the FP `model` into the plan's solution with the options `point` overrides, in
    place; returns budget, trajectory and the calibration record."""
    cfg = study.cfg
    out = {"unique_tokens": 0, "tokens_processed": 0, "steps": 0, "trajectory": [],
           "calibration_layers": []}
    if plan.method == "fp":
        return out
    if plan.method in FINETUNE:
        _finetune(study, plan, model, point, out)
        return out
    method = get_method(plan.method)
    base = parse_variant(plan.variant, cfg.granularity)[0] if plan.variant else method.options()
    options = dataclasses.replace(base, **point)
    if not method.needs_data:
        quantize_model(model, plan.spec, plan.method, options, progress=False)
        return out
    n_blocks = len(decoder_blocks(model))
    every = cfg.trajectory_every

    def on_block(k, rows):
        if not plan.variant and ((k + 1) % every == 0 or k + 1 == n_blocks):
            out["trajectory"].append({"block": k, "calib_rel_sum": sum(
                r.rel_output_error for r in rows), **study.checkpoint(model)})

    budget = study.budgets[plan.seed]
    res = quantize_model(model, plan.spec, plan.method, options, calib=study.calib[plan.seed],
                         progress=study.progress, on_block=on_block)
    out["calibration_layers"] = [{"name": r.name, "proxy_loss": r.proxy_loss,
                                  "calib_rel_err": r.rel_output_error} for r in res.layers]
    if plan.method == "gptq" and not plan.variant:
        out["quantized"] = res.quantized  # QAFT from GPTQ starts here if this trial is chosen
    out.update(unique_tokens=budget.unique_tokens, tokens_processed=budget.unique_tokens)
    return out


def _tuned(study: Study, plan: Plan):
    """(model, solved, chosen point, trials): the plan's solution, the best of its trials."""
    cfg = study.cfg
    space = study.spaces.get(plan.method, {}) if cfg.tune and not plan.variant else {}
    points = (draw_trials(space, cfg.trials, zlib.crc32(plan.method.encode()))
              if space else [{}])
    best, trials = None, []
    for i, point in enumerate(points):
        model = study.fresh_model(torch.float32 if plan.method in FINETUNE else None)
        t0 = time.perf_counter()
        solved = solve(study, plan, model, point)
        val = (study.validation_nll(model, plan.seed)
               if cfg.tune or (cfg.keep_best and plan.method in FINETUNE) else None)
        trials.append({"trial": i, "options": point, "val_nll": val,
                       "seconds": time.perf_counter() - t0,
                       "tokens_processed": solved["tokens_processed"],
                       "best_step": solved.get("best_step")})
        if best is None or (val is not None and val < best[0]):
            best = (val, model, solved, point)
        del model
    return best[1], best[2], best[3], trials


def landscape(study: Study, model, plan: Plan, distance: float, solution_nll: float) -> dict:
    """NLL along the solution's direction and along a random one of the same per-layer norms."""
    fp = study.fp_weights
    sol = solution_weights(model, study.names)
    direction = {n: sol[n].cpu().float() - fp[n].cpu().float() for n in study.names}
    ts = sorted(set(study.cfg.landscape_t))
    model_fp = study.fresh_model()  # paths start from W with every other parameter at FP
    todo = [t for t in ts if t != 1.0]  # t = 1 is the solution itself, already measured
    at = dict(zip(todo, nll_along(model_fp, study.probe_windows, fp, direction, todo,
                                  batch_size=study.cfg.batch_size)))
    at[1.0] = solution_nll
    along = [at[t] for t in ts]
    rand = random_direction({n: float(d.norm()) for n, d in direction.items()},
                            {n: d.shape for n, d in direction.items()},
                            seed=study.cfg.seed + zlib.crc32(plan.id.encode()))
    random_nll = nll_along(model_fp, study.probe_windows, fp, rand, ts,
                           batch_size=study.cfg.batch_size)
    grid = [0.0] + ts
    crossing = {}
    for key, values in (("solution", along), ("random", random_nll)):
        t = first_crossing(grid, [study.fp_probe_nll] + values, study.limit)
        crossing[key] = None if t is None else t * distance
    return {"t": ts, "nll_solution": along, "nll_random": random_nll,
            "radius_solution": crossing["solution"], "radius_random_same_norm": crossing["random"]}


def level(method: str) -> str | None:
    """Where the method's objective sits on the locality ladder: "layer" (a layer method's
    reconstruction), "block" (a block method's), "global" (fine-tuning on the model's loss);
    None for the FP model."""
    if method == "fp":
        return None
    if method in FINETUNE:
        return "global"
    return get_method(method).kind


def measure(study: Study, plan: Plan) -> dict:
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        model, solved, chosen, trials = _tuned(study, plan)
    solve_s = time.perf_counter() - t0
    if "quantized" in solved:  # the GPTQ arm's choice: where QAFT from GPTQ will start
        study.gptq_chosen[(plan.spec, plan.seed)] = chosen
        study.gptq_starts[(plan.spec, plan.seed)] = solved.pop("quantized")
    if plan.method == "qaft-gptq":  # its only user is done with it
        study.gptq_starts.pop((plan.spec, plan.seed), None)
    t1 = time.perf_counter()
    ev = evaluate_nll(model, study.windows, batch_size=study.cfg.batch_size,
                      reference=study.reference, progress=study.progress, desc=f"eval {plan.id}",
                      bos_id=study.bos_id)
    pr = study.probe(model, grad=plan.main)
    calib = {r["name"]: r for r in solved.pop("calibration_layers")}
    layers = [{"name": n, "block": study.block_of[n], "kind": n.rsplit(".", 1)[-1],
               **pr["layers"][n],
               **{k: v for k, v in calib.get(n, {}).items() if k != "name"}}
              for n in study.names]
    row = {"id": plan.id, "method": plan.method, "level": level(plan.method),
           "variant": plan.variant, "bits": plan.bits, "spec": plan.spec, "seed": plan.seed,
           "metrics": {"nll": ev.nll, "perplexity": ev.perplexity, "kl": ev.kl,
                       "scored_tokens": ev.scored_tokens, "window_nll": ev.window_nll,
                       "probe_nll": pr["nll"], "local_fp_mean": pr["local_fp_mean"],
                       "local_prop_mean": pr["local_prop_mean"],
                       "block_fp_mean": pr["block_fp_mean"], "distance": pr["distance"],
                       "val_nll": trials[[t["options"] for t in trials].index(chosen)]["val_nll"]},
           "chosen": chosen, "trials": trials,
           "budget": {k: solved.pop(k) for k in ("unique_tokens", "tokens_processed", "steps")},
           "trajectory": solved.pop("trajectory"), "layers": layers, "blocks": pr["blocks"],
           "landscape": None, "start": solved.pop("start", None)}
    if plan.main and plan.method != "fp-ft":
        row["landscape"] = landscape(study, model, plan, pr["distance"], pr["nll"])
    row["seconds"] = {"solve": solve_s, "measure": time.perf_counter() - t1}
    row["peak_rss_bytes"] = mem.peak
    return row


def sensitivity(study: Study, bits: int) -> dict:
    """RTN on one layer at a time (layers of every sensitivity_stride-th block), rest FP."""
    cfg = study.cfg
    spec = cfg.spec(bits)
    chosen = [n for n in study.names if study.block_of[n] % cfg.sensitivity_stride == 0]
    solution = study.rtn_weights(spec, chosen)
    model = study.fresh_model()
    t0 = time.perf_counter()
    delta = one_layer_sensitivity(model, study.probe_windows, solution, study.fp_probe_nll,
                                  batch_size=cfg.batch_size, progress=study.progress,
                                  desc=f"sensitivity {spec}")
    rows = [{"name": n, "block": study.block_of[n], "kind": n.rsplit(".", 1)[-1],
             "rel_err_fp": relative_output_error_from_hessian(study.fp_weights[n], solution[n],
                                                              study.hessians[n],
                                                              energy=study.energies[n]),
             "proxy_loss": layer_loss(study.fp_weights[n], solution[n], study.hessians[n]),
             "delta_nll": delta[n]} for n in chosen]
    return {"spec": spec, "method": "rtn", "layers": rows,
            "seconds": time.perf_counter() - t0}
