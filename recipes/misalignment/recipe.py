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
width and the random-direction radius, and the summary (recipes.misalignment.report).

DIR/results.json (schema in recipes.misalignment.report.SCHEMA_DOC), DIR/layers.csv, DIR/*.png
and DIR/report.md. Each finished unit (a solution, a sensitivity sweep, the radius) is written
atomically as it completes; a rerun with the same config skips them, and a rerun that only adds
widths, methods or seeds (same first seed, everything else equal) measures just the new units.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time
from pathlib import Path

from compare.io import write_json
from compare.probes import random_radius
from recipes.misalignment.config import PRESETS, MisalignmentConfig, add_config_flags, load_config
from recipes.misalignment.measure import measure, sensitivity
from recipes.misalignment.report import SCHEMA, SCHEMA_DOC, write_outputs
from recipes.misalignment.study import Plan, Study, plan_runs
from recipes.shared.common import (out_folder, previous_results, resolve_device, run_or_exit,
                                   versions)
from recipes.shared.flags import given_fields

__all__ = ["Plan", "plan_runs", "extends", "run_study", "run", "build_parser", "config_from_args",
           "main"]


GROWS = ("bits", "methods", "seeds")  # config fields a study may grow by on resume


def extends(old: dict | None, new: dict) -> bool:
    """Whether `new` only adds units (widths, methods, seeds) to the study `old` configured:
    every other field equal, and the same first seed, which also seeds the random directions.
    On one machine a unit depends on its (method, spec, seed) and these fields only, so the
    finished ones stand (another machine changes the last bits: README, reproducibility)."""
    if not isinstance(old, dict) or old.keys() != new.keys():
        return False
    same = all(old[k] == new[k] for k in new if k not in GROWS)
    return (same and all(set(old[k]) <= set(new[k]) for k in GROWS)
            and old["seeds"][:1] == new["seeds"][:1])


def _load_state(path: Path, cfg: MisalignmentConfig, fresh: bool) -> dict:
    config = json.loads(json.dumps(dataclasses.asdict(cfg)))
    previous = previous_results(path, config, fresh, lambda obj: obj.get("schema") == SCHEMA,
                                extends)
    if previous is not None and previous["config"] != config:
        # grown: re-key the finished runs by the new ids (one seed keeps plain ids, several
        # append @SEED), start the report's derived parts afresh, record what was added
        unit = {(r["method"], r["spec"], r["variant"], r["seed"]): r
                for r in previous["runs"].values()}
        runs = {}
        for plan in plan_runs(cfg):
            row = unit.get((plan.method, plan.spec, plan.variant, plan.seed))
            if row is not None:
                runs[plan.id] = {**row, "id": plan.id}
        previous["extended"] = [*previous.get("extended", []),
                                {k: sorted(set(config[k]) - set(previous["config"][k]))
                                 for k in GROWS} | {"versions": versions()}]
        previous.update(config=config, runs=runs)
        previous.pop("alignment", None)
    if previous is not None:
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
    first = study.budgets[cfg.seed]
    state["budget"] = {**dataclasses.asdict(first), "seeds": list(cfg.seeds),
                       "unique_tokens": first.unique_tokens, "val_samples": cfg.val_samples}
    state["search_spaces"] = {m: {k: list(v) for k, v in sp.items()}
                              for m, sp in study.spaces.items()}
    state["heldout"] = {"eval_windows": study.windows.shape[0],
                        "probe_windows": study.probe_windows.shape[0],
                        "seq_len": cfg.eval_seq_len, "bos": study.bos_id is not None}
    state["timings"]["setup_s"] = time.perf_counter() - t0
    plans = plan_runs(cfg)
    for plan in plans:
        row = state["runs"].get(plan.id)
        if row is not None and plan.method == "gptq" and not plan.variant:
            study.gptq_chosen[(plan.spec, plan.seed)] = row["chosen"]  # QAFT from GPTQ's start
        if row is not None:
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
    state["runs"] = {p.id: state["runs"][p.id] for p in plans}  # plan order, also when grown
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
    run_or_exit(run, build_parser().parse_args(argv))

