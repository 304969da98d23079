import pytest
import torch

from compare.alignment import cosine
from ptq.metrics import relative_output_error_grad as local_loss_grad
from compare.evaluate import evaluate_nll
from compare.local import capture_linear_inputs
from compare.models import tiny_model
from compare.probes import (heldout_hessians, nll_along, one_layer_sensitivity, probe,
                            random_direction, random_radius, solution_weights, swapped_weights)
from ptq import quantizable_linears, quantize_model
from ptq.metrics import relative_output_error


@pytest.fixture
def setup():
    model = tiny_model("llama", seed=4)
    windows = torch.randint(0, 256, (4, 24), generator=torch.Generator().manual_seed(1))
    names = [n for n, _ in quantizable_linears(model)]
    fp = solution_weights(model, names)
    return model, windows, names, fp


def test_hessians_match_captured_inputs_and_are_shared(setup):
    model, windows, names, _ = setup
    H = heldout_hessians(model, windows, names, batch_size=3)
    X = capture_linear_inputs(model, windows, names)
    for n in names:
        x = X[n].double()
        assert torch.allclose(H[n].double(), 2 / x.shape[0] * x.T @ x, rtol=1e-5, atol=1e-6)
    q, k, v = (f"model.layers.0.self_attn.{p}_proj" for p in "qkv")
    assert H[q] is H[k] is H[v] and H[q] is not H["model.layers.0.self_attn.o_proj"]


def test_probe_local_losses_with_fp_and_propagated_inputs(setup):
    model, windows, names, fp = setup
    H = heldout_hessians(model, windows, names)
    at_fp = probe(model, windows, fp, H)
    assert at_fp["local_fp_mean"] == 0 and at_fp["distance"] == 0
    assert at_fp["nll"] == pytest.approx(evaluate_nll(model, windows, progress=False).nll, rel=1e-6)
    X_fp = capture_linear_inputs(model, windows, names)
    quantize_model(model, "int3-g16", progress=False)
    X_q = capture_linear_inputs(model, windows, names)
    res = probe(model, windows, fp, H, batch_size=3)
    Wq = solution_weights(model, names)
    for n in names:
        row = res["layers"][n]
        assert row["rel_err_fp"] == pytest.approx(relative_output_error(fp[n], Wq[n], X_fp[n]),
                                                  rel=1e-4)
        assert row["rel_err_prop"] == pytest.approx(relative_output_error(fp[n], Wq[n], X_q[n]),
                                                    rel=1e-4)
    # later layers see inputs the quantized layers before them changed
    last = names[-1]
    assert res["layers"][last]["rel_err_prop"] != pytest.approx(res["layers"][last]["rel_err_fp"],
                                                                rel=1e-3)
    assert res["nll"] == pytest.approx(evaluate_nll(model, windows, progress=False).nll, rel=1e-6)


def test_probe_gradient_cosine_matches_autograd(setup):
    model, windows, names, fp = setup
    H = heldout_hessians(model, windows, names)
    quantize_model(model, "int2-g16", progress=False)
    flags = [p.requires_grad for p in model.parameters()]
    res = probe(model, windows, fp, H, grad=True, batch_size=3)
    assert [p.requires_grad for p in model.parameters()] == flags  # restored
    model.zero_grad()
    model(input_ids=windows, labels=windows).loss.backward()
    for n in names[:3] + names[-2:]:
        g = model.get_submodule(n).weight.grad
        Wq = model.get_submodule(n).weight.detach()
        expected = cosine(g, local_loss_grad(fp[n], Wq, H[n]))
        assert res["layers"][n]["grad_cosine"] == pytest.approx(expected, abs=1e-4)


def test_sensitivity_and_paths_leave_the_model_as_it_was(setup):
    model, windows, names, fp = setup
    base = evaluate_nll(model, windows, progress=False).nll
    q = tiny_model("llama", seed=4)
    quantize_model(q, "int2-g16", progress=False)
    Wq = solution_weights(q, names)
    one = names[5]
    delta = one_layer_sensitivity(model, windows, {one: Wq[one]}, base, progress=False)
    with swapped_weights(model, {one: Wq[one]}):
        expected = evaluate_nll(model, windows, progress=False).nll - base
    assert delta[one] == pytest.approx(expected) and delta[one] != 0
    D = {n: Wq[n] - fp[n] for n in names}
    v0, v1 = nll_along(model, windows, fp, D, [0.0, 1.0])
    assert v0 == pytest.approx(base, rel=1e-6)
    assert v1 == pytest.approx(evaluate_nll(q, windows, progress=False).nll, rel=1e-5)
    after = solution_weights(model, names)
    assert all(torch.equal(after[n], fp[n]) for n in names)


def test_random_direction_and_radius(setup):
    model, windows, names, fp = setup
    norms = {n: 0.5 for n in names}
    shapes = {n: w.shape for n, w in fp.items()}
    d1, d2 = random_direction(norms, shapes, seed=3), random_direction(norms, shapes, seed=3)
    assert all(torch.equal(d1[n], d2[n]) for n in names)
    assert all(float(d1[n].norm()) == pytest.approx(0.5, rel=1e-5) for n in names)
    # fit the windows first, so that the FP weights sit near a minimum that noise climbs out of
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for _ in range(40):
        opt.zero_grad()
        model(input_ids=windows, labels=windows).loss.backward()
        opt.step()
    fp = solution_weights(model, names)
    base = evaluate_nll(model, windows, progress=False).nll
    res = random_radius(model, windows, fp, base + 0.1, seed=0)
    below = [r for r, v in res["points"] if v < base + 0.1]
    above = [r for r, v in res["points"] if v >= base + 0.1]
    assert res["radius"] is not None and max(below) <= res["radius"] <= min(above)
