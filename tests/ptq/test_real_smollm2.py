import pytest

import ptq
from compare.data import load_text
from compare.evaluate import evaluate_nll, heldout_windows
from recipes.shared.common import WeightSnapshot


@pytest.mark.real
def test_smollm2_rtn_perplexity_orders_by_bits(smollm2):
    model, tokenizer = smollm2
    windows, _ = heldout_windows(tokenizer, load_text("wiki"), 512, 2048)
    snapshot = WeightSnapshot(model)
    ppl = {}
    try:
        fp = evaluate_nll(model, windows, progress=False).perplexity
        for bits in (4, 3, 2):
            snapshot.restore()
            ptq.quantize_model(model, f"int{bits}-g64", progress=False)
            ppl[bits] = evaluate_nll(model, windows, progress=False).perplexity
    finally:
        snapshot.restore()
    assert fp < ppl[4] < ppl[3] < ppl[2]
    assert ppl[4] < 1.5 * fp  # 4-bit g64 is close (the weights were distributed 4-bit)
    assert ppl[2] > 100 * fp  # 2-bit RTN collapses


@pytest.mark.real
def test_smollm2_gptq_beats_rtn_at_3_bits(smollm2):
    from compare.data import DataBudget, load_text, tokenize

    model, tokenizer = smollm2
    windows, _ = heldout_windows(tokenizer, load_text("wiki"), 512, 2048)
    calib = DataBudget(16, 512, seed=0).blocks(tokenize(tokenizer, load_text("wiki").train))
    snapshot = WeightSnapshot(model)
    try:
        ptq.quantize_model(model, "int3-g64", progress=False)
        rtn = evaluate_nll(model, windows, progress=False).perplexity
        snapshot.restore()
        res = ptq.quantize_model(model, "int3-g64", "gptq", calib=calib, progress=False)
        gptq = evaluate_nll(model, windows, progress=False).perplexity
    finally:
        snapshot.restore()
    assert gptq < 0.95 * rtn
    assert len(res.layers) == 30 * 7 and all(r.n_tokens == 16 * 512 for r in res.layers)
    assert all(0 < r.rel_output_error < 0.5 for r in res.layers)
