"""How one solution of the misalignment study is produced and measured: `solve` runs a method
(PTQ or fine-tuning) for one trial, `measure` tunes it (the best of the trials by validation NLL)
and measures the chosen solution on the held-out text (NLL, KL, local losses, trajectories,
gradient alignment, landscape), and `sensitivity` puts one layer at a time on the grid.
`recipes.misalignment.recipe` runs these per plan and resumes.
"""

from __future__ import annotations

import dataclasses
import time
import zlib

import torch

import qaft
from compare.alignment import first_crossing
from compare.evaluate import evaluate_nll
from compare.memory import PeakRSS
from compare.probes import (nll_along, one_layer_sensitivity, random_direction, solution_weights,
                            swapped_weights)
from ptq import quantize_model
from ptq.arch import decoder_blocks
from ptq.layers import linear_weight
from ptq.metrics import layer_loss, relative_output_error_from_hessian
from ptq.registry import get_method
from recipes.misalignment.config import QAFT_ARMS, parse_variant
from recipes.misalignment.study import FINETUNE, Plan, Study
from recipes.shared.flags import field_types
from recipes.shared.tuning import draw_trials

__all__ = ["solve", "measure", "sensitivity", "landscape", "level"]


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
