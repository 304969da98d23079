"""Replaying the captured block inputs reproduces the model's own forward, block by block."""

from types import SimpleNamespace

import pytest
import torch
from torch import nn

import ptq
from compare.models import TINY_CONFIGS, tiny_model
from ptq.capture import BlockInputs, capture_block_inputs

# families whose layers alternate sliding-window and full attention (layer_types)
ALTERNATING = ["cohere2", "gemma2", "gemma3_text", "olmo3", "qwen2", "qwen3"]
SEQ, WINDOW = 24, 4  # the tiny configs' sliding window is shorter than the sequence


def _first(out):
    return out[0] if isinstance(out, tuple) else out


def calib_ids(vocab_size=256, n=3):
    # 3 samples in batches of 2: two batches, the last smaller
    return torch.randint(1, vocab_size, (n, SEQ), generator=torch.Generator().manual_seed(0))


@torch.no_grad()
def reference_outputs(model, calib, batch_size):
    """outs[k][i]: block k's output on batch i in the full forward, and the forward's
    hidden_states per batch."""
    blocks = ptq.decoder_blocks(model)
    outs = [[] for _ in blocks]
    handles = [b.register_forward_hook(lambda m, a, o, k=k: outs[k].append(_first(o)))
               for k, b in enumerate(blocks)]
    try:
        hidden = [model(input_ids=b, use_cache=False, output_hidden_states=True).hidden_states
                  for b in calib.split(batch_size)]
    finally:
        for h in handles:
            h.remove()
    return outs, hidden


@torch.no_grad()
def replay(model, bi: BlockInputs, kwargs_of_block):
    """outs[k][i]: block k's output on batch i, running the blocks one by one from bi.hidden."""
    blocks = ptq.decoder_blocks(model)
    outs, x = [], list(bi.hidden)
    for k, block in enumerate(blocks):
        x = [_first(block(h, **kw)) for h, kw in zip(x, kwargs_of_block(k))]
        outs.append(x)
    return outs


def test_alternating_families_really_alternate():
    for t in ALTERNATING:
        c = tiny_model(t).config
        assert c.sliding_window == WINDOW < SEQ and len(set(c.layer_types)) == 2, t


@pytest.mark.parametrize("model_type", sorted(TINY_CONFIGS))
def test_replay_equals_the_full_forward(model_type):
    model = tiny_model(model_type, seed=1)
    assert not model.training
    calib = calib_ids()
    ref, hidden_states = reference_outputs(model, calib, batch_size=2)
    bi = capture_block_inputs(model, calib, 2, "cpu")
    n = len(ptq.decoder_blocks(model))
    assert bi.n_blocks == n and [h.shape[0] for h in bi.hidden] == [2, 1]
    assert all(len(bi.kwargs(k)) == 2 for k in range(n))
    for i, hs in enumerate(hidden_states):
        assert torch.equal(bi.hidden[i], hs[0])
        # the hooked block outputs are the model's hidden states (the last one is post-norm)
        assert all(torch.equal(ref[k][i], hs[k + 1]) for k in range(n - 1))
    for kw in (kw for k in range(n) for kw in bi.kwargs(k)):
        assert not {"hidden_states", "past_key_values", "cache", "use_cache"} & set(kw)
    out = replay(model, bi, bi.kwargs)
    for k in range(n):
        for i in range(2):
            assert torch.equal(out[k][i], ref[k][i]), f"block {k}, batch {i}"


@pytest.mark.parametrize("model_type", ["gemma2", "gemma3_text", "qwen2"])
def test_block_0_kwargs_for_every_block_is_wrong(model_type):
    # the old capture replayed block 0's (sliding-window) arguments for every block
    model = tiny_model(model_type, seed=1)
    calib = calib_ids()
    ref, _ = reference_outputs(model, calib, batch_size=2)
    bi = capture_block_inputs(model, calib, 2, "cpu")
    old = replay(model, bi, lambda k: bi.kwargs(0))
    assert torch.equal(old[0][0], ref[0][0])  # block 0 is sliding: its own arguments
    assert model.config.layer_types[1] == "full_attention"
    for i in range(2):  # block 1 is full attention, calibrated with the sliding-window mask
        assert (old[1][i] - ref[1][i]).abs().max() > 1e-3


def test_layer_types_get_their_own_mask_and_rope_shared_not_copied():
    model = tiny_model("gemma3_text", seed=1)
    bi = capture_block_inputs(model, calib_ids(), 2, "cpu")
    for i in range(2):
        sliding, full, sliding2, full2 = (bi.kwargs(k)[i] for k in range(4))
        for name in ("attention_mask", "position_embeddings"):
            assert sliding[name] is sliding2[name] and full[name] is full2[name], name
        # Gemma 3 has a local and a global RoPE base: different embeddings per layer type
        assert not torch.equal(sliding["position_embeddings"][0], full["position_embeddings"][0])
        assert not torch.equal(_dense(sliding["attention_mask"]), _dense(full["attention_mask"]))
    assert bi.kwargs(0)[0]["attention_mask"] is not bi.kwargs(0)[1]["attention_mask"]


def _dense(mask):
    # sdpa may pass None for a plain causal mask
    return torch.ones(1) if mask is None else mask.float()


def test_blocks_are_restored_even_when_the_forward_fails():
    model = tiny_model("gemma3_text", seed=2)
    blocks = list(ptq.decoder_blocks(model))
    ids = torch.randint(0, 256, (2, 12))
    with torch.no_grad():
        before = model(ids).logits
    capture_block_inputs(model, calib_ids(), 2, "cpu")
    with pytest.raises(IndexError):  # token ids past the vocabulary fail in the embedding
        capture_block_inputs(model, torch.full((2, 8), 10_000), 2, "cpu")
    assert all(a is b for a, b in zip(ptq.decoder_blocks(model), blocks))
    assert len(ptq.decoder_blocks(model)) == len(blocks)
    with torch.no_grad():
        assert torch.equal(model(ids).logits, before)


class _Block(nn.Module):
    """A block taking an argument positionally and returning a tuple, like older layers."""

    def __init__(self, kind: str):
        super().__init__()
        self.kind = kind
        self.lin = nn.Linear(8, 8)

    def forward(self, x, scale, *, shift=0.0, use_cache=False, **extra):
        return self.lin(x) * scale + shift + extra.get("bias", 0.0), None


class _Base(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Embedding(16, 8)
        self.layers = nn.ModuleList([_Block("a"), _Block("b"), _Block("a")])

    def forward(self, input_ids, use_cache=False):
        h = self.embed(input_ids)
        scale = {"a": torch.tensor(0.5), "b": torch.full((input_ids.shape[0], 1, 1), 2.0)}
        for i, layer in enumerate(self.layers):  # reads an attribute of each block
            h = layer(h, scale[layer.kind], shift=float(i), use_cache=use_cache, bias=-1.0)[0]
        return h


class _Toy(nn.Module):
    _no_split_modules = ["_Block"]
    config = SimpleNamespace(model_type="toy-replay")

    def __init__(self):
        super().__init__()
        self.model = _Base()


def test_positional_arguments_and_tuple_outputs_are_replayed_by_name():
    torch.manual_seed(0)
    toy = _Toy().eval()
    calib = torch.randint(0, 16, (3, 5))
    ref = [[] for _ in range(3)]
    handles = [b.register_forward_hook(lambda m, a, o, k=k: ref[k].append(o[0]))
               for k, b in enumerate(toy.model.layers)]
    with torch.no_grad():
        for b in calib.split(2):
            toy.model(b)
    for h in handles:
        h.remove()
    bi = capture_block_inputs(toy, calib, 2, "cpu")
    assert sorted(bi.kwargs(1)[0]) == ["bias", "scale", "shift"]
    assert bi.kwargs(0)[1]["scale"] is bi.kwargs(2)[1]["scale"]  # one object, not copies
    assert [kw["shift"] for kw in (bi.kwargs(k)[0] for k in range(3))] == [0.0, 1.0, 2.0]
    out = replay(toy, bi, bi.kwargs)
    assert all(torch.equal(out[k][i], ref[k][i]) for k in range(3) for i in range(2))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_capture_on_cuda_leaves_the_model_home():
    model = tiny_model("gemma3_text", seed=3)
    calib = calib_ids()
    bi = capture_block_inputs(model, calib, 2, "cuda")
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert bi.hidden[0].device.type == "cuda"
    ref, _ = reference_outputs(model, calib, batch_size=2)
    model.cuda()
    out = replay(model, bi, bi.kwargs)
    for k in range(len(out)):
        for i in range(2):
            torch.testing.assert_close(out[k][i].cpu(), ref[k][i], atol=1e-4, rtol=1e-4)
