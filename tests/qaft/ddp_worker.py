"""Run by test_ddp.py under torchrun: QAFT of a tiny model, data-parallel; rank 0 saves."""

import sys

import torch
from safetensors.torch import save_file

sys.path.insert(0, sys.argv[2])  # the repository root

import qaft  # noqa: E402
from compare.models import tiny_model  # noqa: E402
from qaft.train import TrainConfig, finetune  # noqa: E402
from tests.qaft.test_ddp import CONFIG, SPEC, make_blocks  # noqa: E402

model = tiny_model("llama", seed=11)
qaft.prepare(model, SPEC)
res = finetune(model, make_blocks(), TrainConfig(**{**CONFIG, "batch_size": 1}), progress=False)
assert res.world_size == 2, res.world_size
if torch.distributed.get_rank() == 0:
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    state["losses"] = torch.tensor([r["loss"] for r in res.history])
    save_file(state, sys.argv[1])
# leave the process group before exit: gloo's threads outliving it abort the process at
# interpreter teardown ("terminate called without an active exception")
torch.distributed.barrier()
torch.distributed.destroy_process_group()
