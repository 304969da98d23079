import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

import qaft
from compare.models import tiny_model
from qaft.train import TrainConfig, finetune

SPEC = "int4-g16"
CONFIG = {"lr": 2e-3, "epochs": 2, "schedule": "cosine", "warmup_steps": 1, "seed": 5}
ROOT = Path(__file__).resolve().parents[2]


def make_blocks():
    return torch.randint(0, 256, (8, 20), generator=torch.Generator().manual_seed(3))


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_cpu_processes_equal_one_process_with_the_same_global_batch(tmp_path):
    out = tmp_path / "ddp.safetensors"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
           "--master_addr", "127.0.0.1", "--master_port", str(free_port()), str(ROOT / "tests" / "qaft" / "ddp_worker.py"), str(out),
           str(ROOT)]
    proc = subprocess.run(cmd, env={**env, "CUDA_VISIBLE_DEVICES": ""}, capture_output=True,
                          text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from safetensors.torch import load_file
    ddp = load_file(out)

    model = tiny_model("llama", seed=11)
    qaft.prepare(model, SPEC)
    res = finetune(model, make_blocks(), TrainConfig(**{**CONFIG, "batch_size": 2}),
                   progress=False)
    losses = torch.tensor([r["loss"] for r in res.history])
    # Same data order, same global batch, gradients averaged by DDP: equal up to float
    # summation order (all-reduce vs one batched backward).
    assert torch.allclose(ddp.pop("losses"), losses, rtol=1e-4, atol=1e-5)
    state = model.state_dict()
    for k, v in ddp.items():
        assert torch.allclose(v, state[k], atol=1e-5), k
