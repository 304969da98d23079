import torch

import ptq
from compare.models import tiny_model
from qaft.lora import LoraOptions, merge_and_requantize, prepare_lora
from qaft.train import TrainConfig, finetune
from tests.qaft.test_train import blocks


def test_lora_on_a_frozen_quantized_base_trains_and_merges_back_onto_the_grid():
    model = tiny_model("llama", seed=2)
    original = model.model.layers[0].mlp.up_proj.weight.detach().clone()
    peft_model = prepare_lora(model, "int3-g16", LoraOptions(rank=4, alpha=8))
    base = peft_model.base_model.model.model.layers[0].mlp.up_proj.base_layer.weight
    assert torch.equal(base, ptq.fake_quantize(original, "int3-g16"))  # base on the grid
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    frozen_before = base.detach().clone()
    res = finetune(peft_model, blocks(), TrainConfig(lr=5e-3, epochs=3, batch_size=2),
                   progress=False)
    assert res.history[-1]["loss"] < res.history[0]["loss"]
    assert torch.equal(base, frozen_before)  # only the adapters moved
    merged, codes = merge_and_requantize(peft_model, "int3-g16")
    assert len(codes) == 14
    for name, qt in codes.items():
        w = merged.get_submodule(name).weight
        assert torch.equal(ptq.dequantize(qt), w)  # re-quantized: on the grid again
    assert not any("lora" in n for n, _ in merged.named_modules())
