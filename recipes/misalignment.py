"""Recipe: does the global loss follow the local loss? RTN, GPTQ and QAFT on one budget.

    python -m recipes.misalignment --preset quick --out results/misalignment
    qalign recipe misalignment --preset quick --out results/misalignment
    qalign recipe misalignment --config my-recipe.yaml --bits 3 --methods rtn gptq mymethod

For each bit width: RTN, GPTQ (and its variants), any registered PTQ method named, and QAFT (STE,
RTN init) trained on exactly the GPTQ calibration blocks; once: the FP model and the FP model
fine-tuned on the same blocks with the same schedule (the control for plain adaptation). QAFT and
the control train the quantized layers' weights only, so a solution is fully described by those
weights. Every solution is measured the same way (compare.probes): held-out NLL, perplexity and
KL(FP || Q) on `eval_tokens`; on the first `probe_tokens` of them, the per-layer local loss with
FP and with propagated inputs, the gradient cosine, and the loss along W + t (W_hat - W) and along
a random direction of the same per-layer norms. Then the one-layer sensitivity (RTN) per bit
width and the random-direction radius, and the summary (recipes.misalignment_report).

DIR/results.json (schema in recipes.misalignment_report.SCHEMA_DOC), DIR/layers.csv, DIR/*.png
and DIR/report.md. Each finished unit (a solution, a sensitivity sweep, the radius) is written
atomically as it completes; a rerun with the same config skips them.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import time
import zlib
from pathlib import Path


from compare.alignment import first_crossing
from compare.data import DataBudget, budget_blocks, load_text
from compare.evaluate import evaluate_nll, heldout_windows, reference_logprobs
from compare.io import read_json, write_json
from compare.memory import PeakRSS
from compare.models import check_seq_len, load_model
from compare.probes import (heldout_hessians, nll_along, one_layer_sensitivity, probe,
                            random_direction, random_radius, solution_weights,
                            swapped_weights)
import qaft
from ptq import quantize_model
from ptq.arch import block_prefix, decoder_blocks
from ptq.formats import parse_spec
from ptq.gptq import GPTQOptions
from ptq.layers import linear_weight, quantizable_linears
from ptq.metrics import layer_loss, relative_output_error_from_hessian
from ptq.registry import get_method
from recipes.common import ConfigError, check_specs, out_folder, resolve_device, versions
from recipes.flags import given_fields
from recipes.misalignment_config import (PRESETS, MisalignmentConfig, add_config_flags,
                                         load_config, parse_variant)
from recipes.misalignment_report import SCHEMA, SCHEMA_DOC, write_outputs

__all__ = ["Plan", "plan_runs", "run_study", "run", "build_parser", "config_from_args", "main"]


@dataclasses.dataclass(frozen=True)
class Plan:
    """One solution to produce and measure."""
    id: str
    method: str  # fp, fp-ft, rtn, gptq, qaft or a registered PTQ method
    bits: int | None = None
    spec: str = "fp32"
    variant: str = ""  # a gptq_variants entry, "" for the method's defaults

    @property
    def main(self) -> bool:
        """Solutions that get the gradient and landscape measurements (not fp or variants)."""
        return self.method != "fp" and not self.variant


def plan_runs(cfg: MisalignmentConfig) -> list[Plan]:
    plans = [Plan("fp", "fp"), Plan("fp-ft", "fp-ft")]
    for b in cfg.bits:
        for m in cfg.methods:
            plans.append(Plan(f"{m}/{cfg.spec(b)}", m, b, cfg.spec(b)))
            if m == "gptq":
                for v in cfg.gptq_variants:
                    spec = cfg.spec(b, parse_variant(v, cfg.granularity)[1])
                    plans.append(Plan(f"gptq[{v}]/{spec}", "gptq", b, spec, v))
    return plans


class Study:
    """What every solution is measured against: the FP weights, the held-out Hessians, windows
    and reference log-probs, and the data budget."""

    def __init__(self, cfg: MisalignmentConfig, device: str, progress: bool):
        self.cfg, self.device, self.progress = cfg, device, progress
        model, tokenizer = load_model(cfg.model, device=device)
        check_seq_len(model, cfg.seq_len, "seq_len")
        check_seq_len(model, cfg.eval_seq_len, "eval_seq_len")
        check_specs(model, {p.spec for p in plan_runs(cfg) if p.bits})  # before any work
        text = load_text(cfg.data)
        self.windows, self.bos_id = heldout_windows(tokenizer, text, cfg.eval_seq_len,
                                                    cfg.eval_tokens, cfg.add_bos)
        if self.windows.numel() < cfg.eval_tokens:
            print(f"note: the held-out text gives {self.windows.numel():,} of the "
                  f"{cfg.eval_tokens:,} eval tokens asked for", flush=True)
        self.probe_windows = self.windows[: max(cfg.probe_tokens // cfg.eval_seq_len, 1)]
        self.budget = DataBudget(cfg.samples, cfg.seq_len, cfg.seed)
        self.calib = budget_blocks(tokenizer, text, self.budget, cfg.add_bos)
        self.names = [n for n, _ in quantizable_linears(model)]
        prefix = block_prefix(model) + "."
        self.block_of = {n: int(n[len(prefix):].split(".")[0]) for n in self.names}
        self.fp_weights = solution_weights(model, self.names)
        self.hessians = heldout_hessians(model, self.probe_windows, self.names,
                                         batch_size=cfg.batch_size)
        self.reference = reference_logprobs(model, self.windows, batch_size=cfg.batch_size,
                                            progress=progress)
        self.fp_probe_nll = probe(model, self.probe_windows, self.fp_weights, self.hessians,
                                  batch_size=cfg.batch_size)["nll"]
        self.limit = self.fp_probe_nll + math.log(cfg.radius_ppl_ratio)

    def rtn_weights(self, spec: str, names: list[str] | None = None) -> dict:
        """{name: RTN solution of the FP weight} for the named layers (default: all)."""
        rtn = get_method("rtn")
        return {n: rtn.fn(self.fp_weights[n], None, parse_spec(spec), rtn.options()).weight
                for n in (names if names is not None else self.names)}

    def fresh_model(self):
        return load_model(self.cfg.model, device=self.device, with_tokenizer=False)[0]

    def probe(self, model, grad: bool = False) -> dict:
        return probe(model, self.probe_windows, self.fp_weights, self.hessians, grad=grad,
                     batch_size=self.cfg.batch_size)

    def checkpoint(self, model) -> dict:
        """The probe summary recorded along QAFT / GPTQ runs."""
        p = self.probe(model)
        return {k: p[k] for k in ("nll", "local_fp_mean", "local_prop_mean", "distance")}


def _train_layers_only(model, names: list[str]) -> None:
    """Freeze everything except the selected layers' weights (embeddings, norms, head)."""
    keep = {id(linear_weight(model.get_submodule(n))) for n in names}
    keep |= {id(model.get_submodule(n).weight) for n in names}
    for p in model.parameters():
        p.requires_grad_(id(p) in keep)


def solve(study: Study, plan: Plan, model) -> dict:
    """Turn the FP `model` into the plan's solution in place; returns budget and trajectory."""
    cfg = study.cfg
    out = {"unique_tokens": 0, "tokens_processed": 0, "steps": 0, "trajectory": [],
           "calibration_layers": []}
    if plan.method == "fp":
        return out
    if plan.method in ("qaft", "fp-ft"):
        mode = "qaft" if plan.method == "qaft" else "fp"
        _train_layers_only(model, study.names)
        # step 0: QAFT starts from RTN (dynamic min/max scales give exactly RTN's grid)
        start_weights = study.rtn_weights(plan.spec) if mode == "qaft" else {}
        with swapped_weights(model, start_weights):
            start = {"step": 0, "tokens_processed": 0, **study.checkpoint(model)}
        train = qaft.TrainConfig(lr=cfg.lr, epochs=cfg.epochs, seed=cfg.seed,
                                 eval_every=cfg.checkpoint_every)
        if mode == "qaft":
            res = qaft.finetune_qaft(model, study.calib, plan.spec, qaft.QAFTConfig(), train,
                                     eval_fn=study.checkpoint, progress=study.progress)
        else:
            res = qaft.finetune_fp(model, study.calib, train, eval_fn=study.checkpoint,
                                   progress=study.progress)
        train = res.train
        keys = ("step", "tokens_processed", "unique_tokens", "loss", "seconds", "nll",
                "local_fp_mean", "local_prop_mean", "distance")
        out["trajectory"] = [start] + [{k: r[k] for k in keys if k in r}
                                       for r in train.history if "nll" in r]
        out.update(unique_tokens=train.unique_tokens, tokens_processed=train.tokens_processed,
                   steps=train.steps)
        return out
    method = get_method(plan.method)
    if not method.needs_data:
        quantize_model(model, plan.spec, plan.method, progress=False)
        return out
    options, _ = (parse_variant(plan.variant, cfg.granularity) if plan.variant
                  else (GPTQOptions() if plan.method == "gptq" else method.options(), None))
    n_blocks = len(decoder_blocks(model))
    every = cfg.trajectory_every

    def on_block(k, rows):
        if not plan.variant and ((k + 1) % every == 0 or k + 1 == n_blocks):
            out["trajectory"].append({"block": k, "calib_rel_sum": sum(
                r.rel_output_error for r in rows), **study.checkpoint(model)})

    res = quantize_model(model, plan.spec, plan.method, options, calib=study.calib,
                         progress=study.progress, on_block=on_block)
    out["calibration_layers"] = [{"name": r.name, "proxy_loss": r.proxy_loss,
                                  "calib_rel_err": r.rel_output_error} for r in res.layers]
    out.update(unique_tokens=study.budget.unique_tokens,
               tokens_processed=study.budget.unique_tokens)
    return out


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


def measure(study: Study, plan: Plan) -> dict:
    model = study.fresh_model()
    t0 = time.perf_counter()
    with PeakRSS() as mem:
        solved = solve(study, plan, model)
    solve_s = time.perf_counter() - t0
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
    row = {"id": plan.id, "method": plan.method, "variant": plan.variant, "bits": plan.bits,
           "spec": plan.spec,
           "metrics": {"nll": ev.nll, "perplexity": ev.perplexity, "kl": ev.kl,
                       "scored_tokens": ev.scored_tokens, "probe_nll": pr["nll"],
                       "local_fp_mean": pr["local_fp_mean"],
                       "local_prop_mean": pr["local_prop_mean"], "distance": pr["distance"]},
           "budget": {k: solved.pop(k) for k in ("unique_tokens", "tokens_processed", "steps")},
           "trajectory": solved.pop("trajectory"), "layers": layers, "landscape": None}
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
                                                              study.hessians[n]),
             "proxy_loss": layer_loss(study.fp_weights[n], solution[n], study.hessians[n]),
             "delta_nll": delta[n]} for n in chosen]
    return {"spec": spec, "method": "rtn", "layers": rows,
            "seconds": time.perf_counter() - t0}


def _load_state(path: Path, cfg: MisalignmentConfig, fresh: bool) -> dict:
    config = json.loads(json.dumps(dataclasses.asdict(cfg)))
    previous = None if fresh else read_json(path)
    if previous is not None:
        if previous.get("config") != config:
            raise ConfigError(f"{path} holds results of another config; use another --out, or "
                              "--fresh to discard them")
        return previous
    return {"schema": SCHEMA, "config": config, "versions": versions(), "fp_probe_nll": None,
            "runs": {}, "sensitivity": {}, "radius": None, "timings": {}}


def run_study(cfg: MisalignmentConfig, out: Path, *, device: str = "auto", fresh: bool = False,
              progress: bool = True) -> dict:
    """The whole recipe (module docstring); returns the results.json state."""
    out = out_folder(out)
    path = out / "results.json"
    state = _load_state(path, cfg, fresh)
    t0 = time.perf_counter()
    study = Study(cfg, resolve_device(device), progress)
    state["fp_probe_nll"] = study.fp_probe_nll
    state["budget"] = {**dataclasses.asdict(study.budget),
                       "unique_tokens": study.budget.unique_tokens}
    state["heldout"] = {"eval_windows": study.windows.shape[0],
                        "probe_windows": study.probe_windows.shape[0],
                        "seq_len": cfg.eval_seq_len, "bos": study.bos_id is not None}
    state["timings"]["setup_s"] = time.perf_counter() - t0
    for plan in plan_runs(cfg):
        if plan.id in state["runs"]:
            continue
        row = measure(study, plan)
        state["runs"][plan.id] = row
        m = row["metrics"]
        print(f"{plan.id:32s} ppl {m['perplexity']:12,.2f}  KL {m['kl']:.4f}  local "
              f"{m['local_fp_mean']:.4g}  {row['seconds']['solve'] + row['seconds']['measure']:.0f}"
              " s", flush=True)
        write_json(path, state)
    for b in cfg.bits:
        if str(b) not in state["sensitivity"]:
            state["sensitivity"][str(b)] = sensitivity(study, b)
            write_json(path, state)
    if state["radius"] is None:
        t1 = time.perf_counter()
        state["radius"] = {**random_radius(study.fresh_model(), study.probe_windows,
                                           study.fp_weights, study.limit, seed=cfg.seed,
                                           batch_size=cfg.batch_size),
                           "limit_nll": study.limit, "seconds": time.perf_counter() - t1}
    state["timings"]["this_invocation_s"] = time.perf_counter() - t0
    write_outputs(state, out)
    return state


def build_parser(parser: argparse.ArgumentParser | None = None) -> argparse.ArgumentParser:
    p = parser or argparse.ArgumentParser(prog="python -m recipes.misalignment",
                                          description=__doc__.split("\n")[0])
    p.add_argument("--preset", default="quick", choices=sorted(PRESETS),
                   help="quick: the README main job on 2 CPU cores; paper: 128 x 2048 tokens, "
                        "for a GPU (default: quick)")
    p.add_argument("--config", type=Path, default=None,
                   help="YAML file whose keys are the flags below (underscored); flags win")
    p.add_argument("--out", type=Path, default=Path("results/misalignment"),
                   help="output folder (default: results/misalignment)")
    p.add_argument("--device", default="auto", help="cpu, cuda or auto (default: auto)")
    p.add_argument("--fresh", action="store_true", help="discard finished units in --out")
    p.add_argument("--schema", action="store_true",
                   help="print the documented schema of DIR/results.json and exit")
    add_config_flags(p)
    return p


def config_from_args(args) -> MisalignmentConfig:
    return load_config(args.preset, args.config, given_fields(MisalignmentConfig, args))


def run(args: argparse.Namespace) -> dict:
    """Entry point of the CLI: flags (build_parser) -> config -> run_study."""
    if args.schema:
        print(SCHEMA_DOC)
        return {}
    return run_study(config_from_args(args), args.out, device=args.device, fresh=args.fresh)


def main(argv=None) -> None:
    from recipes.cli import run_or_exit

    run_or_exit(run, build_parser().parse_args(argv))


if __name__ == "__main__":
    main()
