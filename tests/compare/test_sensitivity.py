"""one_layer_sensitivity run from the perturbed block on cached block inputs equals the plain
whole-model path, on tiny models of several families (sliding/full alternation included)."""

import time
import types
import warnings

import pytest
import torch
from torch import nn

from compare.evaluate import evaluate_nll
from compare.models import tiny_model
from compare.probes import one_layer_sensitivity, solution_weights
from ptq import decoder_blocks, fake_quantize, linear_weight, quantizable_linears


def _rtn_solution(model):
    return {n: fake_quantize(linear_weight(m), "int2-g16") for n, m in quantizable_linears(model)}


def _windows(n, seq, vocab=256, seed=1):
    return torch.randint(0, vocab, (n, seq), generator=torch.Generator().manual_seed(seed))


def _block_calls(model):
    """A list that grows by one at every real call of any decoder block, and the hooks."""
    calls = []
    handles = [b.register_forward_hook(lambda m, a, o: calls.append(1))
               for b in decoder_blocks(model)]
    return calls, handles


# qwen2, gemma2, gemma3_text: 4 blocks alternating sliding (window 4) and full attention, their
# loops pick each block's mask (and Gemma 3's rotary) by the block's position
@pytest.mark.parametrize("family", ["llama", "gpt2", "opt", "qwen2", "gemma3_text", "gemma2"])
def test_fast_deltas_equal_plain_deltas(family):
    model = tiny_model(family, seed=2)
    windows = _windows(3, 12)  # batches of 2 and 1; 12 tokens, past the sliding window of 4
    solution = _rtn_solution(model)
    fp = solution_weights(model, list(solution))
    base = evaluate_nll(model, windows, progress=False).nll
    calls, handles = _block_calls(model)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the fast path must not fall back on these families
        fast = one_layer_sensitivity(model, windows, solution, base, progress=False)
    n_fast = len(calls)
    calls.clear()
    plain = one_layer_sensitivity(model, windows, solution, base, progress=False, fast=False)
    n_plain = len(calls)
    for h in handles:
        h.remove()
    assert fast.keys() == plain.keys() == solution.keys()
    for n in solution:
        assert fast[n] == pytest.approx(plain[n], abs=1e-5), n
    assert sum(v != 0 for v in plain.values()) >= len(plain) - 1
    # the fast path skipped blocks: fewer real block calls than the plain path
    n_blocks = len(decoder_blocks(model))
    assert n_plain == len(solution) * n_blocks * 2
    assert n_fast < n_plain
    after = solution_weights(model, list(solution))
    assert all(torch.equal(after[n], fp[n]) for n in fp)
    assert decoder_blocks(model) is model.get_submodule(
        "transformer.h" if family == "gpt2" else
        "model.decoder.layers" if family == "opt" else "model.layers")


def test_over_the_cache_budget_falls_back_with_the_same_results():
    model = tiny_model("llama", seed=3)
    windows = _windows(3, 12)
    solution = _rtn_solution(model)
    base = evaluate_nll(model, windows, progress=False).nll
    with pytest.warns(UserWarning, match="max_cache_bytes"):
        got = one_layer_sensitivity(model, windows, solution, base, progress=False,
                                    max_cache_bytes=1000)
    plain = one_layer_sensitivity(model, windows, solution, base, progress=False, fast=False)
    assert got == plain


class _Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, hidden_states):
        return hidden_states + torch.tanh(self.fc(hidden_states))


class _CarryLM(nn.Module):
    """A toy LM whose loop feeds each block a running sum of the earlier blocks' outputs as
    well: state that skipping the earlier blocks cannot rebuild from one block's input."""

    _no_split_modules = ["_Block"]

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(16, 8)
        self.layers = nn.ModuleList([_Block() for _ in range(3)])
        self.head = nn.Linear(8, 16)

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        carry = torch.zeros_like(h)
        for block in self.layers:
            out = block(h)
            carry = carry + out
            h = out + 0.5 * carry
        return types.SimpleNamespace(logits=self.head(h))


def test_a_loop_that_carries_state_fails_the_check_and_falls_back():
    model = _CarryLM().eval()
    windows = _windows(4, 10, vocab=16)
    solution = {f"layers.{k}.fc": torch.zeros(8, 8) for k in range(3)}
    base = evaluate_nll(model, windows, progress=False).nll
    with pytest.warns(UserWarning, match="does not reproduce"):
        got = one_layer_sensitivity(model, windows, solution, base, progress=False)
    plain = one_layer_sensitivity(model, windows, solution, base, progress=False, fast=False)
    assert got == plain and all(v != 0 for v in got.values())


def test_speedup_on_an_8_block_llama():
    """Prints plain vs fast seconds (no assertion on time: the machine is shared) and the
    decoder-block forwards each path runs, which it asserts: a layer of block k runs 8 - k
    blocks per batch instead of 8."""
    model = tiny_model("llama", seed=5, num_hidden_layers=8)
    windows = _windows(2, 64)  # one batch
    solution = _rtn_solution(model)  # 7 layers in each block
    base = evaluate_nll(model, windows, progress=False).nll
    seconds, out, blocks_run = {False: [], True: []}, {}, {}
    calls, handles = _block_calls(model)
    for _ in range(2):  # the faster of two runs each, alternated
        for fast in (False, True):
            calls.clear()
            t0 = time.perf_counter()
            out[fast] = one_layer_sensitivity(model, windows, solution, base, progress=False,
                                              fast=fast)
            seconds[fast].append(time.perf_counter() - t0)
            blocks_run[fast] = len(calls)
    for h in handles:
        h.remove()
    assert all(out[True][n] == pytest.approx(out[False][n], abs=1e-5) for n in solution)
    # plain: 56 layers x 8 blocks; fast: 8 (the cache pass) + 7 x (8 + 7 + ... + 1) + the
    # check, 7 + 6 + ... + 1 for blocks 1..7
    assert blocks_run == {False: 56 * 8, True: 8 + 7 * 36 + 28}
    t_plain, t_fast = min(seconds[False]), min(seconds[True])
    print(f"\n8-block tiny llama, {len(solution)} layers, 2 x 64 tokens: plain {t_plain:.2f} s, "
          f"fast {t_fast:.2f} s, speed-up {t_plain / t_fast:.2f}x (shared machine: noisy); "
          f"block forwards {blocks_run[False]} vs {blocks_run[True]}")
