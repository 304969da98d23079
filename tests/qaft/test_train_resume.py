import dataclasses
import itertools
import json

import pytest
import torch

import qaft
from compare.models import tiny_model
from ptq.errors import OptionsError
from qaft.checkpoints import checkpoint_steps
from qaft.train import TrainConfig, finetune

# 10 blocks, batch 2, grad_accum 2: 5 micro-steps an epoch, so optimizer steps straddle epochs;
# 3 epochs = 7 optimizer steps
CONFIG = TrainConfig(lr=3e-3, epochs=3, batch_size=2, grad_accum=2, schedule="cosine",
                     warmup_steps=2, min_lr_ratio=0.1, weight_decay=0.1, checkpoint_every=2,
                     eval_every=1, seed=4)


def data():
    return torch.randint(0, 256, (10, 16), generator=torch.Generator().manual_seed(7))


def model():
    # dropout draws from the global RNG at every step; tied embeddings are one shared tensor
    m = tiny_model("llama", seed=3, attention_dropout=0.3, tie_word_embeddings=True)
    qaft.prepare(m, "int4-g16")
    return m


class Interrupt(Exception):
    pass


def stop_at(step):
    """An eval_fn that raises at `step`: the run dies after step `step`, before its checkpoint."""
    calls = itertools.count(1)

    def eval_fn(m):
        if next(calls) == step:
            raise Interrupt
        return 0.0
    return eval_fn


def no_stop(m):
    return 0.0


def run(directory, rng_seed, **kw):
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(rng_seed)
        m = model()
        return finetune(m, data(), CONFIG, checkpoint_dir=directory, progress=False, **kw), m


def without_time(history):
    return [{k: v for k, v in r.items() if k != "seconds"} for r in history]


def test_an_interrupted_and_resumed_run_equals_the_uninterrupted_one(tmp_path):
    full, m_full = run(tmp_path / "full", 0, eval_fn=no_stop)
    assert full.steps == 7 and checkpoint_steps(tmp_path / "full") == [7]

    with pytest.raises(Interrupt):
        run(tmp_path / "cut", 0, eval_fn=stop_at(5))
    assert checkpoint_steps(tmp_path / "cut") == [4]  # step 5 is lost and redone
    # another global RNG state and another model: everything must come from the checkpoint
    resumed, m_resumed = run(tmp_path / "cut", 99, eval_fn=no_stop, resume=True)

    assert resumed.resumed_from == 4 and resumed.steps == 7
    for (name, a), b in zip(m_full.state_dict().items(), m_resumed.state_dict().values()):
        assert torch.equal(a, b), name
    assert without_time(resumed.history) == without_time(full.history)
    assert (resumed.tokens_processed, resumed.unique_tokens) == (full.tokens_processed,
                                                                full.unique_tokens)
    # and the test can fail: without the saved RNG state, dropout gives other weights
    other, m_other = run(tmp_path / "other", 1, eval_fn=no_stop)
    assert not torch.equal(m_other.lm_head.weight, m_full.lm_head.weight)


def test_checkpoints_are_complete_safe_to_load_and_pruned(tmp_path):
    config = dataclasses.replace(CONFIG, keep_checkpoints=2)

    def run_kept(rng_seed, **kw):
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(rng_seed)
            m = model()
            return finetune(m, data(), config, checkpoint_dir=tmp_path, eval_fn=no_stop,
                            progress=False, **kw), m

    res, m = run_kept(0)
    assert checkpoint_steps(tmp_path) == [6, 7]  # every 2 steps and the last; 2, 4 pruned
    last = tmp_path / "step-000007"
    assert sorted(p.name for p in last.iterdir()) == ["model.safetensors", "state.pt",
                                                      "train.json"]
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # no temp folder left
    meta = json.loads((last / "train.json").read_text())
    assert meta["config"] == dataclasses.asdict(config) and meta["step"] == 7
    assert meta["tokens_processed"] == res.tokens_processed == 7 * 4 * 16
    state = torch.load(last / "state.pt", weights_only=True)
    assert state["seen"].tolist() == list(range(10))
    # resuming a finished run trains nothing and gives its result back
    again, m_again = run_kept(5, resume=True)
    assert again.resumed_from == 7 and without_time(again.history) == without_time(res.history)
    assert all(torch.equal(a, b) for a, b in zip(m.parameters(), m_again.parameters()))


def test_resume_is_refused_under_another_config_and_without_a_directory(tmp_path):
    with pytest.raises(Interrupt):
        run(tmp_path, 0, eval_fn=stop_at(3))
    fresh = model()
    before = [p.detach().clone() for p in fresh.parameters()]
    with pytest.raises(OptionsError, match=r"another TrainConfig \(lr: 0.003 there, 0.001 here"):
        finetune(fresh, data(), dataclasses.replace(CONFIG, lr=1e-3),
                 checkpoint_dir=tmp_path, resume=True, progress=False)
    assert all(torch.equal(a, b) for a, b in zip(before, fresh.parameters()))  # refused first
    with pytest.raises(OptionsError, match="resume=True"):  # would silently mix two runs
        finetune(model(), data(), CONFIG, checkpoint_dir=tmp_path, progress=False)
    with pytest.raises(OptionsError, match="checkpoint_dir"):
        finetune(model(), data(), CONFIG, progress=False)


class Stream:
    """A streaming DataSource: block i of an endless corpus is drawn from its own seed, so any
    batch can be produced without reading the ones before it."""
    seq_len = 16
    num_blocks = None

    def __init__(self):
        self.read = 0

    def batches(self, seed, epoch, size, start=0):
        for b in itertools.count(start):
            ids = torch.arange(b * size, (b + 1) * size)
            self.read += 1
            yield ids, torch.stack([torch.randint(0, 256, (16,), generator=torch.Generator()
                                                  .manual_seed(seed * 100003 + int(i)))
                                    for i in ids])


def test_a_streaming_source_resumes_without_replaying(tmp_path):
    cfg = TrainConfig(lr=1e-3, max_steps=6, batch_size=2, checkpoint_every=3, eval_every=1)
    ref = tiny_model("llama", seed=0)
    full = finetune(ref, Stream(), cfg, checkpoint_dir=tmp_path / "full", eval_fn=no_stop,
                    progress=False)
    with pytest.raises(Interrupt):
        finetune(tiny_model("llama", seed=0), Stream(), cfg, checkpoint_dir=tmp_path / "cut",
                 eval_fn=stop_at(5), progress=False)
    stream, resumed = Stream(), tiny_model("llama", seed=0)
    res = finetune(resumed, stream, cfg, checkpoint_dir=tmp_path / "cut", resume=True,
                   eval_fn=no_stop, progress=False)
    assert stream.read == 3 and res.unique_tokens == full.unique_tokens == 6 * 2 * 16
    assert all(torch.equal(a, b) for a, b in zip(ref.parameters(), resumed.parameters()))
    with pytest.raises(OptionsError, match="max_steps or max_tokens"):
        finetune(tiny_model("llama"), Stream(), TrainConfig(), progress=False)
