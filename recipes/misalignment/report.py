"""The misalignment recipe's report, from its results.json state alone.

SCHEMA_DOC below documents results.json; `write_outputs` adds the `alignment` summary
(compare.alignment.summarize_alignment) and writes
results.json, layers.csv, the PNG plots and report.md, all atomically.
"""

from __future__ import annotations

from pathlib import Path

from compare.alignment import summarize_alignment
from compare.io import atomic_write_text, write_csv, write_json
from recipes.misalignment.plots import PLOTS, fmt, write_plots

__all__ = ["SCHEMA", "SCHEMA_DOC", "write_outputs"]

SCHEMA = "qalign.misalignment/3"
MAIN = ("rtn", "gptq", "qaft", "qaft-gptq")  # the methods whose gradient cosines are tabled

SCHEMA_DOC = """results.json (schema "qalign.misalignment/3"):
  config          the MisalignmentConfig (recipes.misalignment.config), every field
  versions        python, torch, transformers, accelerate, peft, qalign, cpu threads
  budget          n_samples, seq_len, seed (the first), seeds, unique_tokens, val_samples: the
                  one data budget of every method (per seed), and its validation slice
  search_spaces   {method: {field: [values]}} the spaces tuning drew its trials from
  heldout         eval_windows, probe_windows, seq_len, bos (probe windows = first eval windows)
  fp_probe_nll    FP model's mean NLL on the probe windows (nats/token)
  runs            {id: run}, id "METHOD/SPEC", "gptq[VARIANT]/SPEC", "fp", "fp-ft", with
                  "@SEED" appended when the study has several seeds; a run is
    method, level ("layer", "block" or "global": where the method's objective sits on the
                  locality ladder; null for fp), variant, bits (null for fp/fp-ft), spec, seed
    metrics       nll, perplexity, kl (KL(FP || run), nats/token), scored_tokens, window_nll
                  (per held-out window, for paired comparisons); probe_nll, local_fp_mean /
                  local_prop_mean (mean over layers of the relative output error with FP /
                  propagated inputs), block_fp_mean (mean over decoder blocks of the block's
                  relative output error on FP inputs, ptq.metrics), distance (||W_hat - W|| /
                  ||W||), val_nll (validation slice; null without tuning)
    chosen        the options the winning trial overrode ({} = pinned values)
    trials        every trial: {trial, options, val_nll, seconds, tokens_processed, best_step}
    budget        unique_tokens, tokens_processed, steps
    seconds       solve (all trials), measure (everything after); peak_rss_bytes
    start         QAFT from GPTQ: {method "gptq", options, from}: the GPTQ solution it starts
                  at, the one the GPTQ arm chose (from "gptq arm") or GPTQ's defaults when the
                  study has no GPTQ arm (from "defaults"); its solve seconds leave that GPTQ
                  run out (the GPTQ arm's row has it); null for the other runs
    trajectory    GPTQ: per probed block {block, calib_rel_sum, nll, local_fp_mean, ...};
                  QAFT / fp-ft: per checkpoint {step, tokens_processed, unique_tokens, loss,
                  seconds, nll, local_fp_mean, local_prop_mean, distance, val_nll} (step 0 =
                  start), of the chosen trial
    layers        per layer {name, block, kind, rel_err_fp, rel_err_prop, distance,
                  grad_cosine (main solutions), proxy_loss and calib_rel_err (GPTQ-style)}
    blocks        per decoder block: its relative output error on FP inputs
    landscape     main PTQ/QAFT solutions: {t, nll_solution, nll_random, radius_solution,
                  radius_random_same_norm} (probe NLL at W + t D; radii relative to ||W||)
  sensitivity     {bits: {spec, method "rtn", seconds, layers [{name, block, kind, rel_err_fp,
                  proxy_loss, delta_nll}]}}: one layer quantized at a time, the rest FP
  radius          {radius, points [[r, nll]], limit_nll, seconds}: random direction, ||D_l||
                  proportional to ||W_l||, NLL reaching FP + log(radius_ppl_ratio)
  alignment       {bits: {per_layer (rel_err_fp vs delta_nll), per_layer_proxy (proxy_loss vs
                  delta_nll), across_solutions (local_fp_mean vs probe_nll over runs and QAFT
                  checkpoints), qaft_trajectory, gptq_trajectory (per probed block: increase
                  of local_fp_mean vs increase of NLL): each {spearman, kendall, n,
                  spearman_ci / kendall_ci {low, high, fisher_low, fisher_high, significant}};
                  ladder {methods {method: {level, perplexity (seed spread), layer_local,
                  block_local}}, layer_alignment / block_alignment (local_fp_mean /
                  block_fp_mean vs probe_nll across the same solutions, as across_solutions)};
                  grad_cosine {method: {mean, median}}; landscape {method: {distance,
                  radius_solution, radius_random_same_norm}}; perplexity {method: mean ppl};
                  methods {method: {perplexity, nll: {mean, min, max, std, low, high, n} over
                  seeds, chosen}}; comparisons {"A vs B": {per_seed [{seed, diff (mean
                  window NLL of B - A), low, high, ratio (ppl B / A), ratio_low, ratio_high,
                  excludes_zero}], holds ("a", "b" or null), seeds}}}}
  timings         setup_s, this_invocation_s
  extended        (when a rerun grew the study) per growth: the bits, methods and seeds it
                  added, and the versions it ran with
Correlations are null where undefined (fewer than 3 points or a constant side)."""

def _corr(c) -> str:
    return "n/a" if not c else f"{fmt(c['spearman'])} / {fmt(c['kendall'])} (n={c['n']})"


def layer_rows(state: dict) -> list[dict]:
    rows = []
    for r in state["runs"].values():
        for layer in r["layers"]:
            rows.append({"run": r["id"], "method": r["method"], "bits": r["bits"], **layer})
    for b, sens in state["sensitivity"].items():
        for layer in sens["layers"]:
            rows.append({"run": f"sensitivity/{sens['spec']}", "method": "rtn-one-layer",
                         "bits": int(b), **layer})
    return rows


def _ci(c: dict, key: str) -> str:
    ci = c.get(f"{key}_ci") or {}
    if c.get(key) is None:
        return "n/a"
    if ci.get("low") is None:
        return f"{c[key]:.2f}"
    mark = "" if ci.get("significant") else " (n.s.)"
    return f"{c[key]:.2f} [{ci['low']:.2f}, {ci['high']:.2f}]{mark}"


def _ppl(spread: dict) -> str:
    if spread["n"] < 2:
        return f"{spread['mean']:,.2f}"
    return f"{spread['mean']:,.2f} ({spread['min']:,.2f}-{spread['max']:,.2f})"


NAMES = {"rtn": "RTN", "gptq": "GPTQ", "qaft": "QAFT from RTN", "qaft-mse": "QAFT from MSE",
         "qaft-gptq": "QAFT from GPTQ", "fp-ft": "the FP fine-tuned control"}


def _claim(key: str, cmp: dict) -> str:
    """One sentence per comparison, stated only when every seed's interval supports it."""
    a, b = key.split(" vs ")
    name_a, name_b = NAMES.get(a, a), NAMES.get(b, b)
    ratios = ", ".join(f"{c['ratio']:.3g}x [{c['ratio_low']:.3g}, {c['ratio_high']:.3g}]"
                       for c in cmp["per_seed"])
    if not cmp["per_seed"]:
        return ""
    seeds = f"{cmp['seeds']} seed{'s' if cmp['seeds'] > 1 else ''}"
    if cmp["holds"] == "b":
        return (f"{name_b} beats {name_a} (perplexity ratio {ratios}, 95% paired bootstrap "
                f"over held-out windows; {seeds})")
    if cmp["holds"] == "a":
        return (f"{name_a} beats {name_b} (perplexity ratio {name_b}/{name_a} {ratios}; "
                f"{seeds})")
    return f"{name_b} vs {name_a}: not resolved on this budget (ratio {ratios}; {seeds})"


def _findings(bits: int, s: dict) -> str:
    """One paragraph for one bit width, generated from the intervals: a claim is stated only
    when it holds on every seed with an interval that excludes zero."""
    ppl = ", ".join(f"{NAMES.get(m, m)} {_ppl(v['perplexity'])}" for m, v in s["methods"].items())
    out = [f"**int{bits}**: perplexity {ppl}"]
    out += [c for c in (_claim(k, v) for k, v in s["comparisons"].items()) if c]
    c = s["per_layer"]
    if c["spearman"] is not None:
        verdict = ("significant" if c["spearman_ci"]["significant"] else
                   "not significant on this sample")
        out.append(f"one layer at a time, the local loss ranks the NLL cost with Spearman "
                   f"{_ci(c, 'spearman')} ({verdict})")
    if s["grad_cosine"]:
        cos = ", ".join(f"{m} {v['mean']:.3f}" for m, v in s["grad_cosine"].items())
        out.append(f"mean cosine of the local and global gradients: {cos}")
    return "; ".join(out) + "."


def _trials_run(runs: dict, asked: int) -> str:
    """How many trials the tuned runs had: `asked`, or fewer where a space has fewer points."""
    counts = sorted({len(r["trials"]) for rid, r in runs.items()
                     if rid != "fp" and r.get("trials")})
    if not counts or counts == [asked]:
        return f"{asked} trial(s)"
    shown = f"{counts[0]}" if len(counts) == 1 else f"{counts[0]}-{counts[-1]}"
    return f"{shown} trial(s) (as many as the space has points, at most {asked})"


def report(state: dict, summary: dict) -> str:
    cfg = state["config"]
    runs = state["runs"]
    seeds = cfg.get("seeds", [cfg.get("seed", 0)])
    tuning = (f"matched tuning: {_trials_run(runs, cfg['trials'])} per method from its search "
              f"space, chosen by NLL on {cfg['val_samples']} validation blocks of the train split "
              "(disjoint from the budget and the held-out text)" if cfg.get("tune")
              else f"no tuning (QAFT and control: lr {cfg['lr']}, {cfg.get('schedule')})")
    lines = [f"# Local vs global loss: {cfg['model']} on {cfg['data']}", "",
             f"Budget {cfg['samples']} x {cfg['seq_len']} = {state['budget']['unique_tokens']:,} "
             f"unique tokens for every method, seeds {', '.join(map(str, seeds))}; QAFT and the "
             f"FP control {cfg['epochs']} epoch(s); {tuning}. Held-out: "
             f"{state['heldout']['eval_windows']} x {state['heldout']['seq_len']} tokens for "
             f"NLL/KL, the first {state['heldout']['probe_windows']} windows for the probes.", "",
             "| run | perplexity | KL(FP‖Q) | probe NLL | val NLL | mean local (FP in) | mean local "
             "(propagated) | distance | tokens processed | chosen | solve s |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in runs.values():
        m = r["metrics"]
        chosen = ", ".join(f"{k}={v}" for k, v in (r.get("chosen") or {}).items()) or "-"
        lines.append(f"| {r['id']} | {m['perplexity']:,.2f} | {fmt(m['kl'], 4)} | "
                     f"{m['probe_nll']:.4f} | {fmt(m.get('val_nll'), 4)} | "
                     f"{m['local_fp_mean']:.4g} | {m['local_prop_mean']:.4g} | "
                     f"{m['distance']:.4f} | {r['budget']['tokens_processed']:,} | {chosen} | "
                     f"{r['seconds']['solve']:.0f} |")
    starts = sorted({r["id"] for r in runs.values()
                     if (r.get("start") or {}).get("from") == "gptq arm"})
    if starts:
        lines += ["", f"{', '.join(starts)}: QAFT from the solution the GPTQ run of the same "
                  "width and seed chose (`start` in results.json); its solve seconds leave that "
                  "GPTQ run out."]
    lines += ["", "## Comparisons (held-out perplexity ratio B / A, 95% paired bootstrap over "
              "windows, per seed)", "", "| bits | A vs B | ratio per seed | verdict |",
              "|---|---|---|---|"]
    for b, s in summary.items():
        for key, cmp in s["comparisons"].items():
            ratios = "; ".join(f"{c['ratio']:.3g} [{c['ratio_low']:.3g}, {c['ratio_high']:.3g}]"
                               for c in cmp["per_seed"])
            a, bb = key.split(" vs ")
            verdict = {"a": f"{a} better", "b": f"{bb} better"}.get(cmp["holds"], "not resolved")
            lines.append(f"| {b} | {key} | {ratios or 'n/a'} | {verdict} |")
    lines += ["", "## Alignment (Spearman rho / Kendall tau with 95% bootstrap intervals; "
              "n.s.: an interval spans zero)", "",
              "| bits | per layer (one at a time) | per layer, absolute proxy | across solutions | "
              "QAFT trajectory | GPTQ per-block increments | grad cosine mean (" +
              " / ".join(MAIN) + ") |", "|---|---|---|---|---|---|---|"]
    for b, s in summary.items():
        cos = " / ".join(fmt(s["grad_cosine"].get(m, {}).get("mean"), 3) for m in MAIN)
        cells = [f"{_ci(s[k], 'spearman')} / {_ci(s[k], 'kendall')} (n={s[k]['n']})"
                 for k in ("per_layer", "per_layer_proxy", "across_solutions",
                           "qaft_trajectory", "gptq_trajectory")]
        lines.append(f"| {b} | " + " | ".join(cells) + f" | {cos} |")
    lines += ["", "## Locality ladder (layer-local, block-local, global objectives)", "",
              "Local losses on the probe windows with FP inputs: the layer level is the mean "
              "relative output error over layers, the block level the mean over decoder blocks "
              "of ||B_hat(X) - B(X)||² / ||B(X) - X||²; alignment is each level's Spearman rho "
              "with the probe NLL across the same solutions (runs and QAFT checkpoints).", "",
              "| bits | method | level | perplexity | layer-local | block-local |",
              "|---|---|---|---|---|---|"]
    for b, s in summary.items():
        for m, row in s["ladder"]["methods"].items():
            lines.append(f"| {b} | {m} | {row['level']} | {_ppl(row['perplexity'])} | "
                         f"{row['layer_local']:.4g} | {fmt(row['block_local'], 4)} |")
    lines += ["", "| bits | layer-local vs NLL | block-local vs NLL |", "|---|---|---|"]
    for b, s in summary.items():
        lad = s["ladder"]
        lines.append(f"| {b} | {_ci(lad['layer_alignment'], 'spearman')} "
                     f"(n={lad['layer_alignment']['n']}) | "
                     f"{_ci(lad['block_alignment'], 'spearman')} "
                     f"(n={lad['block_alignment']['n']}) |")
    rad = state.get("radius") or {}
    lines += ["", "## Landscape", "",
              f"Random-direction radius (||D_l|| proportional to ||W_l||) at which perplexity "
              f"reaches FP x {cfg['radius_ppl_ratio']}: "
              f"{fmt(rad.get('radius'), 4)} (relative to ||W||).", "",
              "| bits | method | distance | radius along the solution | radius along a random "
              "direction of the same norms |", "|---|---|---|---|---|"]
    for b, s in summary.items():
        for method, land in s["landscape"].items():
            lines.append(f"| {b} | {method} | {land['distance']:.4f} | "
                         f"{fmt(land['radius_solution'], 4)} | "
                         f"{fmt(land['radius_random_same_norm'], 4)} |")
    lines += ["", "## Findings", "", "Generated from the intervals above: a comparison is "
              "stated only when it holds on every seed with a 95% interval that excludes zero.",
              ""]
    for b, s in summary.items():
        lines += [_findings(int(b), s), ""]
    lines += ["## Plots", ""]
    for name, caption in PLOTS.items():
        lines += [f"![{caption}]({name})", "", f"*{caption}*", ""]
    return "\n".join(lines)


def write_outputs(state: dict, out: Path) -> None:
    out = Path(out)
    summary = summarize_alignment(state)
    state["alignment"] = summary
    write_json(out / "results.json", state)
    write_csv(out / "layers.csv", layer_rows(state))
    write_plots(state, out, summary)
    atomic_write_text(out / "report.md", report(state, summary))
