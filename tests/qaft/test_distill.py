import copy

import pytest
import torch
import torch.nn.functional as F

import qaft
from compare.evaluate import kl_divergence, token_nll
from compare.models import tiny_model
from ptq.errors import OptionsError
from qaft.distill import causal_nll, kd_loss
from qaft.train import TrainConfig, finetune
from tests.qaft.test_train import blocks


def first_batch(data, batch_size, seed=0):
    """The blocks of the loop's first optimizer step (epoch 0's seeded permutation)."""
    order = torch.randperm(data.shape[0], generator=torch.Generator().manual_seed(seed))
    return data[order[:batch_size]]


def test_kd_loss_is_the_mean_kl_over_the_scored_positions():
    g = torch.Generator().manual_seed(0)
    student, teacher = torch.randn(2, 7, 11, generator=g), 3 * torch.randn(2, 7, 11, generator=g)
    log_q = torch.log_softmax(student[:, :-1], -1)
    log_p = torch.log_softmax(teacher[:, :-1], -1)
    by_hand = (log_p.exp() * (log_p - log_q)).sum(-1).mean()  # KL(p_FP || p_Q), 2 x 6 positions
    assert torch.allclose(kd_loss(student, teacher), by_hand, rtol=1e-6)
    # the last position predicts nothing: changing its logits changes nothing
    moved = student.clone()
    moved[:, -1] += 5.0
    assert torch.equal(kd_loss(moved, teacher), kd_loss(student, teacher))
    ids = torch.randint(0, 11, (2, 7), generator=g)
    assert torch.allclose(causal_nll(student, ids), token_nll(student, ids).mean(), rtol=1e-6)


def test_the_loop_trains_on_the_kl_to_the_fp_model_and_records_the_nll_too():
    teacher = tiny_model("llama", seed=0)
    model = copy.deepcopy(teacher)
    qaft.prepare(model, "int2-g16")
    data = blocks()
    batch = first_batch(data, 2)
    with torch.no_grad():
        student_logits = model(input_ids=batch).logits
        teacher_logits = teacher(input_ids=batch).logits
        hf_nll = model(input_ids=batch, labels=batch).loss
    # the project's evaluation KL (float64 per position) and torch's kl_div, both on the batch
    log_q, log_p = (torch.log_softmax(z[:, :-1].float(), -1) for z in (student_logits,
                                                                       teacher_logits))
    want = kl_divergence(log_p, log_q).mean()
    torch_kl = F.kl_div(log_q.flatten(0, 1), log_p.flatten(0, 1), reduction="batchmean",
                        log_target=True)
    assert torch.allclose(torch_kl.double(), want, rtol=1e-5)
    assert want > 1e-4  # int2 changes the distributions: a test that can fail

    res = finetune(model, data, TrainConfig(lr=1e-3, max_steps=3, batch_size=2, loss="kd"),
                   teacher=teacher, progress=False)
    row = res.history[0]  # measured before the first update
    assert row["loss"] == pytest.approx(float(want), rel=1e-5)
    assert row["batch_nll"] == pytest.approx(float(hf_nll), rel=1e-5)
    assert all(p.grad is None for p in teacher.parameters())  # frozen: never backpropagated
    assert [r["step"] for r in res.history] == [1, 2, 3]


def test_an_fp_model_distilled_from_itself_has_zero_loss_and_zero_gradient():
    teacher = tiny_model("llama", seed=1)
    student = copy.deepcopy(teacher)
    ids = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        target = teacher(input_ids=ids).logits
    loss = kd_loss(student(input_ids=ids).logits, target)
    loss.backward()
    assert loss.item() == 0.0
    # d kd / d logits = (p_Q - p_FP * sum(p_FP)) / n: zero up to the float rounding of sum(p_FP)
    kd_grad = torch.cat([p.grad.flatten() for p in student.parameters()])
    student.zero_grad()
    causal_nll(student(input_ids=ids).logits, ids).backward()
    nll_grad = torch.cat([p.grad.flatten() for p in student.parameters()])
    assert kd_grad.norm() < 1e-6 * nll_grad.norm()

    # and through the loop, whose teacher logits come from its own forward under no_grad
    student.zero_grad(set_to_none=True)
    res = finetune(student, blocks(), TrainConfig(lr=1e-3, max_steps=1, batch_size=2,
                                                  loss="kd"), teacher=teacher, progress=False)
    assert res.history[0]["loss"] == 0.0 and res.history[0]["batch_nll"] > 1.0


def test_finetune_qaft_distills_from_a_copy_made_before_quantization():
    model = tiny_model("llama", seed=4)
    fp = copy.deepcopy(model)
    data = blocks()
    batch = first_batch(data, 2)
    quantized = copy.deepcopy(model)
    qaft.prepare(quantized, "int3-g16")
    with torch.no_grad():
        want = kd_loss(quantized(input_ids=batch).logits, fp(input_ids=batch).logits)
    res = qaft.finetune_qaft(model, data, "int3-g16", train=TrainConfig(
        lr=1e-3, max_steps=1, batch_size=2, loss="kd"), progress=False)
    assert res.train.history[0]["loss"] == pytest.approx(float(want), rel=1e-5)
    assert res.train.config["loss"] == "kd"


def test_kd_options_are_checked():
    model = tiny_model("llama")
    with pytest.raises(OptionsError, match="loss="):
        TrainConfig(loss="mse")
    with pytest.raises(OptionsError, match="pass teacher="):
        finetune(model, blocks(), TrainConfig(loss="kd", max_steps=1), progress=False)
    with pytest.raises(OptionsError, match="loss is 'nll'"):
        finetune(model, blocks(), TrainConfig(max_steps=1), teacher=tiny_model("llama"),
                 progress=False)
    with pytest.raises(OptionsError, match="the model being trained"):
        finetune(model, blocks(), TrainConfig(loss="kd", max_steps=1), teacher=model,
                 progress=False)
    with pytest.raises(OptionsError, match="copy of itself"):
        qaft.finetune_fp(model, blocks(), TrainConfig(loss="kd", max_steps=1), progress=False)
