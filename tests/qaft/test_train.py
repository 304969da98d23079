import math

import pytest
import torch
from torch import nn

import qaft
from compare.models import tiny_model
from ptq.errors import OptionsError
from ptq.metrics import relative_output_error
from qaft.fake_quant import FakeQuantLinear
from qaft.train import TokenBlocks, TrainConfig, finetune, lr_factor, param_groups


def blocks(n=8, L=24, seed=0):
    # a learnable stream: repeating short patterns
    g = torch.Generator().manual_seed(seed)
    base = torch.randint(0, 64, (6,), generator=g)
    return base.repeat(n * L // 6 + 1)[: n * L].view(n, L)


def fp_weights(model):
    return {n: m.weight.detach().clone() for n, m in model.named_modules()
            if isinstance(m, nn.Linear) and ".layers." in n}


def test_schedules():
    c = TrainConfig(schedule="cosine", warmup_steps=2, min_lr_ratio=0.1)
    assert lr_factor(0, 10, c) == 0.5 and lr_factor(1, 10, c) == 1.0
    assert lr_factor(9, 10, c) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + torch.cos(
        torch.tensor(7 / 8 * torch.pi)).item()))
    w = TrainConfig(schedule="wsd", decay_fraction=0.5)
    assert [round(lr_factor(s, 4, w), 3) for s in range(4)] == [1.0, 1.0, 0.5, 0.0]
    with pytest.raises(ValueError, match="schedule"):
        TrainConfig(schedule="linear-ish")


def test_the_schedule_runs_over_the_step_budget():
    cfg = TrainConfig(lr=1e-3, max_steps=10, batch_size=2, schedule="cosine", warmup_steps=2,
                      min_lr_ratio=0.1)
    h = finetune(tiny_model("llama"), blocks(), cfg, progress=False).history
    lrs = [r["lr"] for r in h]
    assert lrs[0] == 0.5e-3 and lrs[1] == 1e-3  # warmup (s + 1) / 2
    # cosine over the 8 steps after warmup, total = max_steps (not the 4 steps of one epoch)
    assert lrs[5] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 3 / 8))))
    assert lrs[9] == pytest.approx(1e-3 * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 7 / 8))))


def test_qaft_lowers_the_loss_and_records_everything():
    model = tiny_model("llama", seed=0)
    reference = fp_weights(model)
    qaft.prepare(model, "int4-g16")
    data = blocks()
    X = {name: torch.randn(32, fq.linear.in_features) for name, fq
         in qaft.fake_quant_layers(model).items()}
    res = finetune(model, data, TrainConfig(lr=3e-3, epochs=3, batch_size=2, local_every=2,
                                            eval_every=3), local_inputs=X,
                   local_reference=reference, eval_fn=lambda m: 1.23, progress=False)
    h = res.history
    assert res.steps == 12 and len(h) == 12 and [r["step"] for r in h] == list(range(1, 13))
    assert h[-1]["loss"] < 0.5 * h[0]["loss"]
    assert [r["tokens_processed"] for r in h] == [s * 2 * 24 for s in range(1, 13)]
    assert [r["epoch"] for r in h] == [0] * 4 + [1] * 4 + [2] * 4
    assert res.tokens_processed == 3 * 8 * 24 and res.unique_tokens == 8 * 24
    # unique tokens: the distinct blocks of the epoch-0 permutation read so far, x seq_len
    order = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    assert [r["unique_tokens"] for r in h[:4]] == [len(set(order[:2 * s].tolist())) * 24
                                                   for s in range(1, 5)]
    assert "local" in h[1] and len(h[1]["local"]) == 14 and "local" not in h[0]
    assert all(0 < v < 1 for v in h[1]["local"].values())
    assert h[2]["eval_nll"] == 1.23 and "eval_nll" not in h[3]


def test_the_local_loss_is_measured_against_the_given_fp_reference():
    model = tiny_model("llama", seed=0)
    g = torch.Generator().manual_seed(1)
    # not the weights QAFT starts from, so a loop that measured against those would fail here
    reference = {n: W + 0.01 * torch.randn(W.shape, generator=g)
                 for n, W in fp_weights(model).items()}
    layers = qaft.prepare(model, "int4-g16")
    start = {n: fq.linear.weight.detach().clone() for n, fq in layers.items()}
    name = "model.layers.1.mlp.down_proj"
    X = {name: torch.randn(16, 128, generator=g)}
    res = finetune(model, blocks(), TrainConfig(lr=1e-3, max_steps=3, batch_size=2,
                                                local_every=3), local_inputs=X,
                   local_reference=reference, progress=False)
    recorded = res.history[-1]["local"][name]
    W_hat = layers[name].quantized_weight().detach()  # the weight after the last step
    assert recorded == relative_output_error(reference[name], W_hat, X[name])
    assert recorded != relative_output_error(start[name], W_hat, X[name])
    with pytest.raises(OptionsError, match="local_reference"):
        finetune(model, blocks(), TrainConfig(max_steps=1), local_inputs=X, progress=False)


def test_step_and_token_budgets_cycle_over_fresh_permutations():
    # 10 blocks, global batch 4: 2 batches per epoch, 2 blocks left out of each epoch
    data = blocks(n=10, L=12)
    res = finetune(tiny_model("llama"), data, TrainConfig(lr=1e-3, max_steps=5, batch_size=4,
                                                          seed=3), progress=False)
    h = res.history
    assert res.steps == 5 and [r["epoch"] for r in h] == [0, 0, 1, 1, 2]
    assert res.tokens_processed == 5 * 4 * 12
    seen = set()
    for r, epoch, b in zip(h, [0, 0, 1, 1, 2], [0, 1, 0, 1, 0]):
        order = torch.randperm(10, generator=torch.Generator().manual_seed(3 + epoch))
        seen.update(order[4 * b:4 * (b + 1)].tolist())
        assert r["unique_tokens"] == len(seen) * 12
    assert res.unique_tokens == len(seen) * 12
    # max_tokens rounds down to whole optimizer steps of batch x grad_accum x seq_len tokens
    step_tokens = 2 * 2 * 12
    for max_tokens, steps in ((5 * step_tokens - 1, 4), (5 * step_tokens, 5)):
        res = finetune(tiny_model("llama"), data, TrainConfig(
            lr=1e-3, max_tokens=max_tokens, batch_size=2, grad_accum=2), progress=False)
        assert res.steps == len(res.history) == steps
        assert res.tokens_processed == steps * step_tokens <= max_tokens
    with pytest.raises(OptionsError, match="less than one optimizer step"):
        finetune(tiny_model("llama"), data, TrainConfig(max_tokens=47, batch_size=2,
                                                        grad_accum=2), progress=False)


def test_a_tensor_and_its_token_blocks_source_give_the_same_run():
    def run(data):
        model = tiny_model("llama", seed=1)
        res = finetune(model, data, TrainConfig(lr=1e-3, epochs=2, batch_size=3), progress=False)
        return res, model

    (a, ma), (b, mb) = run(blocks(n=7)), run(TokenBlocks(blocks(n=7)))
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    assert all(torch.equal(x, y) for x, y in zip(ma.parameters(), mb.parameters()))


def test_budgets_and_options_are_validated():
    for bad, match in [(dict(epochs=2, max_steps=3), "set one"),
                       (dict(max_steps=3, max_tokens=100), "set one"),
                       (dict(lr=float("inf")), "lr"), (dict(lr=float("nan")), "lr"),
                       (dict(lr=0.0), "lr"), (dict(grad_clip=-1.0), "grad_clip"),
                       (dict(warmup_steps=-1), "warmup_steps"),
                       (dict(weight_decay=-0.1), "weight_decay"),
                       (dict(weight_decay=float("inf")), "weight_decay"),
                       (dict(max_steps=-1), "max_steps"),
                       (dict(checkpoint_every=-2), "checkpoint_every")]:
        with pytest.raises(OptionsError, match=match):
            TrainConfig(**bad)
    assert issubclass(OptionsError, ValueError)
    assert TrainConfig(grad_clip=0.0).grad_clip == 0.0  # 0 is "off", not an error


def test_no_weight_decay_on_biases_norms_embeddings_and_lsq_scales():
    model = tiny_model("llama", tie_word_embeddings=True)
    name = "model.layers.0.mlp.down_proj"
    mlp = model.get_submodule("model.layers.0.mlp")
    mlp.down_proj = FakeQuantLinear(mlp.down_proj, "int4-g16", scale_mode="learned")
    names = {id(p): n for n, p in model.named_parameters()}
    decay, no_decay = param_groups(model, TrainConfig(weight_decay=0.1))
    assert decay["weight_decay"] == 0.1 and no_decay["weight_decay"] == 0.0
    # every matrix of the decoder blocks; the tied lm_head is the embedding, named once
    assert {names[id(p)] for p in decay["params"]} == {
        n for n in names.values() if n.endswith(("_proj.weight", "_proj.linear.weight"))}
    assert {names[id(p)] for p in no_decay["params"]} == {
        "model.embed_tokens.weight", "model.norm.weight", f"{name}.scale",
        *(f"model.layers.{i}.{k}.weight" for i in range(2)
          for k in ("input_layernorm", "post_attention_layernorm"))}
    assert model.lm_head.weight is model.model.embed_tokens.weight
    (everything,) = param_groups(model, TrainConfig(weight_decay=0.1, decay_all_params=True))
    assert len(everything["params"]) == len(names)


def test_finetune_uses_the_groups():
    # Only the norm gains and the embedding train: with no decay on them, weight_decay must not
    # change a single bit of the result; with decay_all_params it must.
    def run(**kw):
        model = tiny_model("llama", seed=2)
        for n, p in model.named_parameters():
            p.requires_grad_(n in ("model.norm.weight", "model.embed_tokens.weight"))
        finetune(model, blocks(), TrainConfig(lr=1e-2, max_steps=3, batch_size=2, **kw),
                 progress=False)
        return model.model.norm.weight.detach(), model.model.embed_tokens.weight.detach()

    plain, decayed, all_decayed = run(), run(weight_decay=0.5), run(weight_decay=0.5,
                                                                   decay_all_params=True)
    assert all(torch.equal(a, b) for a, b in zip(plain, decayed))
    assert not any(torch.equal(a, b) for a, b in zip(plain, all_decayed))


def test_same_seed_same_numbers_and_grad_accum_matches_larger_batch():
    def run(**kw):
        model = tiny_model("llama", seed=1)
        qaft.prepare(model, "int3-g16")
        return finetune(model, blocks(seed=2), TrainConfig(lr=1e-3, **kw), progress=False), model

    (a, ma), (b, mb) = run(batch_size=2), run(batch_size=2)
    assert [r["loss"] for r in a.history] == [r["loss"] for r in b.history]
    assert all(torch.equal(x, y) for x, y in zip(ma.parameters(), mb.parameters()))
    _, mc = run(batch_size=1, grad_accum=2)
    # two micro-batches of 1 accumulate to the gradient of one batch of 2
    for x, y in zip(ma.parameters(), mc.parameters()):
        assert torch.allclose(x, y, atol=1e-5)


def test_too_small_budget_is_a_clear_error():
    with pytest.raises(ValueError, match="cannot fill one global batch"):
        finetune(tiny_model("llama"), blocks(n=2), TrainConfig(batch_size=4), progress=False)


def test_the_optimizer_is_the_fused_kernel_where_the_device_has_one_with_the_same_steps():
    from qaft.train import fused_adam

    assert fused_adam([torch.zeros(2)]) is True
    assert fused_adam([torch.zeros(2), torch.zeros(2, device="meta")]) is None

    def run(fused):  # five AdamW steps on the same gradients
        g = torch.Generator().manual_seed(0)
        ps = [torch.nn.Parameter(torch.randn(64, 48, generator=g)) for _ in range(3)]
        opt = torch.optim.AdamW(ps, lr=1e-3, weight_decay=0.1, fused=fused)
        for i in range(5):
            for p in ps:
                p.grad = torch.sin(3 * p.detach() + i)
            opt.step()
        return torch.cat([p.detach().flatten() for p in ps])

    fused, plain = run(fused_adam([torch.zeros(1)])), run(None)
    start = torch.randn(64, 48, generator=torch.Generator().manual_seed(0)).flatten()
    assert (fused[: start.numel()] - start).abs().max() > 1e-3  # the steps moved the weights
    assert torch.allclose(fused, plain, rtol=0, atol=1e-6)
