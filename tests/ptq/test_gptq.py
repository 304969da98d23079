import pytest
import torch

import ptq
from ptq.formats import QParams, compute_qparams, fake_quantize_broadcast, parse_spec
from ptq.hessian import gram


def correlated_inputs(n=1024, d=128, rank=16, seed=0):
    """Activations with low-rank structure, like real ones: H is far from diagonal."""
    g = torch.Generator().manual_seed(seed)
    X = torch.randn(n, rank, generator=g) @ torch.randn(rank, d, generator=g)
    return X + 0.05 * torch.randn(n, d, generator=g), g


def hessian(X):
    return 2.0 / X.shape[0] * X.double().T @ X.double()


def plain_gptq(W, H, spec, damp=0.01, act_order=False, static_groups=False):
    """Column-by-column GPTQ, no blocks, no lazy updates: the reference for the blocked one."""
    spec = parse_spec(spec)
    W = W.clone().float()
    H = H.clone().double()
    dead = torch.diagonal(H) == 0
    H[dead, dead] = 1
    W[:, dead] = 0
    n = W.shape[1]
    perm = torch.argsort(torch.diagonal(H), descending=True, stable=True) if act_order \
        else torch.arange(n)
    W, H = W[:, perm], H[perm][:, perm]
    H.diagonal().add_(damp * torch.diagonal(H).mean())
    U = torch.linalg.cholesky(torch.cholesky_inverse(torch.linalg.cholesky(H)), upper=True).float()
    inv = torch.argsort(perm)
    params = {}
    if spec.granularity != "group":
        p = compute_qparams(W, spec)
    elif static_groups:
        for g in range(n // spec.group_size):
            params[g] = compute_qparams(W[:, inv[g * spec.group_size:(g + 1) * spec.group_size]],
                                        spec.per_channel())
    Q = torch.zeros_like(W)
    for i in range(n):
        if spec.granularity == "group":
            g = int(perm[i]) // spec.group_size
            if g not in params:
                cols = inv[g * spec.group_size:(g + 1) * spec.group_size]
                params[g] = compute_qparams(W[:, cols], spec.per_channel())
            p = params[g]
        Q[:, i:i + 1] = fake_quantize_broadcast(W[:, i:i + 1], p, spec)
        err = (W[:, i] - Q[:, i]) / U[i, i]
        W[:, i:] -= torch.outer(err, U[i, i:])
    return Q[:, inv]


@pytest.mark.parametrize("spec", ["int2-ch", "int3-ch", "int4-ch", "int2-g32", "int3-g32",
                                  "int4-g32", "int3-sym-g32", "e2m1-g32", "e3m2-ch"])
@pytest.mark.parametrize("act_order", [False, True])
def test_gptq_loss_clearly_below_rtn_on_correlated_hessian(spec, act_order):
    X, g = correlated_inputs()
    W = torch.randn(64, 128, generator=g)
    H = hessian(X)
    rtn = ptq.rtn_quantize(W, ptq.LayerStats(H=H), parse_spec(spec))
    res = ptq.gptq_quantize(W, H, spec, act_order=act_order)
    assert res.loss < 0.5 * rtn.loss
    # the reported loss is the output error it stands for: 2/n ||X dW^T||^2
    dW = (W - res.weight).double()
    assert res.loss == pytest.approx(float(2 / X.shape[0] * (X.double() @ dW.T).pow(2).sum()),
                                     rel=1e-5)


@pytest.mark.parametrize("spec", ["int3-g32", "int4-ch", "e2m1-g16", "int2-sym-t"])
def test_identity_hessian_gives_exactly_rtn(spec):
    W = torch.randn(48, 128, generator=torch.Generator().manual_seed(1))
    res = ptq.gptq_quantize(W, torch.eye(128), spec)
    assert torch.equal(res.weight, ptq.fake_quantize(W, spec))


@pytest.mark.parametrize("spec", ["int3-g32", "int4-ch", "e2m1-g16"])
@pytest.mark.parametrize("act_order,static_groups", [(False, False), (True, False),
                                                     (False, True), (True, True)])
@pytest.mark.parametrize("block_size", [1, 16, 48, 128])
def test_blocked_equals_plain_column_by_column(spec, act_order, static_groups, block_size):
    X, g = correlated_inputs(d=96, seed=2)
    W = torch.randn(40, 96, generator=g)
    H = hessian(X)
    want = plain_gptq(W, H, spec, act_order=act_order, static_groups=static_groups)
    got = ptq.gptq_quantize(W, H, spec, block_size=block_size, act_order=act_order,
                            static_groups=static_groups).weight
    # Same algorithm, other float summation order: a group's scale may differ in the last bits
    # (every value of that group moves by an ulp), and a rounding tie may rarely flip a code.
    close = torch.isclose(got, want, rtol=1e-5, atol=1e-6).float().mean()
    assert close > 0.995
    assert ptq.layer_loss(W, got, H) == pytest.approx(ptq.layer_loss(W, want, H), rel=1e-4)


def test_result_is_on_the_grid_with_codes():
    X, g = correlated_inputs(seed=3)
    W = torch.randn(32, 128, generator=g)
    res = ptq.gptq_quantize(W, hessian(X), "int3-g32", act_order=True)
    qt = res.quantized
    assert torch.equal(ptq.dequantize(qt), res.weight)
    assert qt.scale.shape == (32, 4) and int(qt.codes.max()) <= 7
    groups = res.weight.view(32, 4, 32)
    for r in range(32):
        for k in range(4):
            assert groups[r, k].unique().numel() <= 2**3
    # every weight is its own round trip with the stored scales: on the grid
    assert torch.equal(ptq.fake_quantize_with(res.weight, QParams(qt.scale, qt.zero.float()),
                                              "int3-g32"), res.weight)


def test_incremental_hessian_equals_batch_hessian():
    X, _ = correlated_inputs(n=1000)
    acc = ptq.HessianAccumulator(128)
    for chunk in X.split([1, 99, 300, 600]):
        acc.update(chunk.view(-1, 1, 128) if chunk.shape[0] > 1 else chunk)
    assert acc.n_tokens == 1000
    assert torch.allclose(acc.H, hessian(X), rtol=1e-5, atol=1e-6 * float(hessian(X).abs().max()))


@pytest.mark.parametrize("scale", [1.0, 1e-3, 1e4])
def test_bfloat16_inputs_get_float32_products_and_sums_in_the_fast_gemm(scale):
    # the bf16 path multiplies the bf16 values exactly and sums in float32: as close to the
    # float64 X^T X as the plain float32 GEMM is (a GEMM that rounded its sums to bfloat16 would
    # be ~1e-3 off), and the global matmul precision is what it was before
    g = torch.Generator().manual_seed(0)
    X = (torch.randn(2000, 96, generator=g) * scale).to(torch.bfloat16)
    before = torch.backends.mkldnn.matmul.fp32_precision
    ref = X.double().T @ X.double()
    tol = 4 * float((X.float().T @ X.float()).double().sub(ref).abs().max())
    got = gram(X)
    assert got.dtype == torch.float32 and torch.backends.mkldnn.matmul.fp32_precision == before
    # float32 sums of 2000 products land a few ulps from float64 in an order that depends on the
    # GEMM's blocking (it differs between CPUs: 4.01x the plain GEMM's error on one machine), so
    # the floor is 1e-5 relative: 10x what float32 sums show here, 400x below bfloat16 sums
    assert float((got.double() - ref).abs().max()) <= max(tol, 1e-5 * float(ref.abs().max()))
    acc = ptq.HessianAccumulator(96)
    for chunk in X.split(700):
        acc.update(chunk)
    assert torch.allclose(acc.H, 2 / 2000 * ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))


def test_dead_inputs_and_failed_cholesky_are_handled():
    X, g = correlated_inputs(d=64)
    X[:, 5] = 0  # a dead input
    W = torch.randn(16, 64, generator=g)
    res = ptq.gptq_quantize(W, hessian(X), "int4-ch")
    assert res.dead_columns == 1 and torch.isfinite(res.weight).all()
    assert (res.weight[:, 5] == 0).all()
    # rank-deficient H (fewer tokens than inputs) with no damping: the damping is raised
    Xs = torch.randn(8, 64, generator=g)
    res = ptq.gptq_quantize(W, hessian(Xs), "int4-ch", damp=0.0)
    assert res.damp > 0 and torch.isfinite(res.weight).all()


def test_bf16_weight_keeps_dtype_and_registry_selects_gptq():
    X, g = correlated_inputs(d=64)
    W = torch.randn(16, 64, generator=g).to(torch.bfloat16)
    m = ptq.get_method("gptq")
    assert m.needs_hessian
    res = m.fn(W, ptq.LayerStats(H=hessian(X)), parse_spec("int4-g32"),
               m.make_options(act_order=True))
    assert res.weight.dtype == torch.bfloat16 and res.weight.shape == W.shape
    with pytest.raises(ptq.OptionsError, match="block_size"):
        ptq.GPTQOptions(block_size=0)
