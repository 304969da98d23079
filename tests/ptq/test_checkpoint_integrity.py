"""A damaged or edited checkpoint is a CheckpointError naming the file and the fix; saving over
a checkpoint never leaves a mix of old and new files; files are readable as the umask says."""

import json
import os
import stat
import struct

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

import ptq
from compare.models import tiny_model
from ptq import checkpoint
from ptq.checkpoint import (CHECKPOINT_FILE, is_quantized_checkpoint, load_quantized,
                            read_quantized, save_quantized)
from ptq.errors import CheckpointError, QalignError

LAYER = "model.layers.0.mlp.down_proj"


@pytest.fixture(scope="module")
def quantized_model():
    model = tiny_model("llama", seed=5)
    res = ptq.quantize_model(model, "int3-g32", "rtn", progress=False)
    return model, res.quantized


@pytest.fixture
def ckpt(tmp_path, quantized_model):
    model, quantized = quantized_model
    return save_quantized(model, quantized, tmp_path / "ckpt", {"method": "rtn"})


def logits(model):
    ids = torch.arange(40).view(2, 20)
    with torch.no_grad():
        return model(ids).logits


def data_offset(path, key) -> int:
    """Absolute byte offset of tensor `key`'s data in a safetensors file."""
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        return 8 + n + json.loads(f.read(n))[key]["data_offsets"][0]


def rewrite(path, edit_tensors=None, edit_meta=None, fix_checksums=False):
    """Write the file again with edited tensors / metadata; with fix_checksums the checksums
    are recomputed, as a careless tool would, so only the size and range checks can object."""
    tensors = load_file(path)
    with safe_open(path, framework="pt") as f:
        header = f.metadata()
    meta = json.loads(header["qalign"])
    if edit_tensors:
        edit_tensors(tensors)
    if edit_meta:
        edit_meta(meta)
    if fix_checksums:
        meta["sha256"] = {k: checkpoint._digest(t) for k, t in tensors.items()}
    text = json.dumps(meta)
    header = {"qalign": text, "qalign_sha256": header["qalign_sha256"]}
    if fix_checksums:
        header["qalign_sha256"] = checkpoint._text_digest(text)
    save_file(tensors, path, metadata=header)


def test_intact_checkpoint_loads_identically(ckpt, quantized_model):
    model, quantized = quantized_model
    loaded, codes = load_quantized(ckpt)
    assert torch.equal(logits(loaded), logits(model))
    for name, qt in quantized.items():
        assert torch.equal(codes[name].codes, qt.codes)


@pytest.mark.parametrize("key", [f"{LAYER}.qcodes", f"{LAYER}.scale", f"{LAYER}.zero",
                                 "model.norm.weight"])
def test_one_flipped_bit_is_refused(ckpt, key):
    path = ckpt / CHECKPOINT_FILE
    at = data_offset(path, key) + 3
    data = bytearray(path.read_bytes())
    data[at] ^= 0x04
    path.write_bytes(bytes(data))
    with pytest.raises(CheckpointError,
                       match=rf"{CHECKPOINT_FILE}.*{key}.*sha256.*qalign quantize"):
        load_quantized(ckpt)


def test_edited_metadata_is_refused(ckpt):
    path = ckpt / CHECKPOINT_FILE

    def to_sym(meta):  # same bits, same scale shape: only the checksum can tell
        meta["layers"][LAYER]["spec"] = "int3-sym-g32"

    rewrite(path, edit_meta=to_sym)
    with pytest.raises(CheckpointError, match="metadata does not match.*qalign quantize"):
        read_quantized(ckpt)


@pytest.mark.parametrize("spec,needle", [
    ("int4-g32", r"qcodes is torch.uint8 \(3072,\); 8192 codes of 4 bits need uint8 \(4096,\)"),
    ("int3-g64", r"scale is torch.float32 \(64, 4\), int3-g64 of a \(64, 128\) weight needs"),
    ("int3-sym-g32", "zero points are present"),
    ("int3-g16", "scale is"), ("bogus", "bad metadata entry")])
def test_metadata_that_does_not_fit_the_tensors_is_refused(ckpt, spec, needle):
    def edit(meta):
        meta["layers"][LAYER]["spec"] = spec

    rewrite(ckpt / CHECKPOINT_FILE, edit_meta=edit, fix_checksums=True)
    with pytest.raises(CheckpointError, match=needle):
        read_quantized(ckpt)


def test_truncated_file_is_refused(ckpt):
    path = ckpt / CHECKPOINT_FILE
    size = path.stat().st_size
    with open(path, "r+b") as f:
        f.truncate(size - 100)
    with pytest.raises(CheckpointError, match="not a readable safetensors file.*qalign quantize"):
        load_quantized(ckpt)


@pytest.mark.parametrize("fix_checksums", [False, True])
def test_truncated_packed_tensor_is_refused(ckpt, fix_checksums):
    def cut(tensors):
        tensors[f"{LAYER}.qcodes"] = tensors[f"{LAYER}.qcodes"][:-1].clone()

    rewrite(ckpt / CHECKPOINT_FILE, edit_tensors=cut, fix_checksums=fix_checksums)
    with pytest.raises(CheckpointError, match=rf"{LAYER}.qcodes is torch.uint8 \(3071,\)"):
        read_quantized(ckpt)


def test_zero_points_out_of_range_and_missing_tensors_are_refused(ckpt):
    def bad_zero(tensors):
        tensors[f"{LAYER}.zero"][0, 0] = 8  # int3: 0..7

    rewrite(ckpt / CHECKPOINT_FILE, edit_tensors=bad_zero, fix_checksums=True)
    with pytest.raises(CheckpointError, match=r"zero points must be uint8 \(64, 4\) in 0..7"):
        read_quantized(ckpt)

    def drop_scale(tensors):
        del tensors[f"{LAYER}.scale"]

    rewrite(ckpt / CHECKPOINT_FILE, edit_tensors=drop_scale, fix_checksums=True)
    with pytest.raises(CheckpointError, match="scale is None"):
        read_quantized(ckpt)


def test_tensor_swapped_in_without_its_checksum_is_refused(ckpt):
    def add(tensors):
        tensors["model.extra"] = torch.zeros(3)

    rewrite(ckpt / CHECKPOINT_FILE, edit_tensors=add)
    with pytest.raises(CheckpointError, match="not the ones its checksums list"):
        read_quantized(ckpt)


def test_padding_bits_past_the_last_code_are_refused(tmp_path, quantized_model):
    model, quantized = quantized_model
    odd = ptq.quantize(torch.randn(3, 5), "int3-ch")  # 45 bits: 3 padding bits in byte 6
    folder = save_quantized(model, {**quantized, "odd": odd}, tmp_path / "c")
    assert torch.equal(read_quantized(folder)[1]["odd"].codes, odd.codes)

    def pad(tensors):
        tensors["odd.qcodes"][-1] |= 0x80

    rewrite(folder / CHECKPOINT_FILE, edit_tensors=pad, fix_checksums=True)
    with pytest.raises(CheckpointError, match="bits set past its last code"):
        read_quantized(folder)


def test_codes_out_of_range_are_refused_at_save(tmp_path, quantized_model):
    model, quantized = quantized_model
    qt = quantized[LAYER]
    bad = ptq.QuantizedTensor(qt.codes.clone(), qt.scale, qt.zero, qt.spec, qt.dtype)
    bad.codes[1, 2] = 8  # int3 codes are 0..7; packing would silently keep 3 bits of it
    with pytest.raises(CheckpointError,
                       match=rf"cannot save {LAYER} \(int3-g32\): codes leave 0..7"):
        save_quantized(model, {**quantized, LAYER: bad}, tmp_path / "c")
    assert not (tmp_path / "c").exists()
    with pytest.raises(QalignError, match="may not set"):
        save_quantized(model, quantized, tmp_path / "c", {"version": 7})


def test_version_1_checkpoints_without_checksums_still_load(ckpt, quantized_model):
    def v1(meta):
        meta["version"] = 1
        del meta["sha256"]

    path = ckpt / CHECKPOINT_FILE
    tensors = load_file(path)
    with safe_open(path, framework="pt") as f:
        meta = json.loads(f.metadata()["qalign"])
    v1(meta)
    save_file(tensors, path, metadata={"qalign": json.dumps(meta)})
    loaded, _ = load_quantized(ckpt)
    assert torch.equal(logits(loaded), logits(quantized_model[0]))


def test_checkpoint_that_does_not_fit_its_config_is_refused(ckpt):
    config = json.loads((ckpt / "config.json").read_text())
    config["intermediate_size"] *= 2
    (ckpt / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="not in its config.json.*qalign quantize"):
        load_quantized(ckpt)


def files_of(folder):
    return {p.name: p.read_bytes() for p in folder.iterdir()}


def test_saving_over_a_checkpoint_replaces_it_and_keeps_other_files(tmp_path, quantized_model):
    model, quantized = quantized_model
    folder = save_quantized(model, quantized, tmp_path / "c")
    (folder / "tokenizer.json").write_text("{}")
    other = tiny_model("llama", seed=6)
    res = ptq.quantize_model(other, "int2-ch", "rtn", progress=False)
    save_quantized(other, res.quantized, folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]  # no temporary folder left
    assert sorted(files_of(folder)) == ["config.json", CHECKPOINT_FILE, "tokenizer.json"]
    loaded, codes = load_quantized(folder)
    assert torch.equal(logits(loaded), logits(other))
    assert codes[LAYER].spec == ptq.parse_spec("int2-ch")


def test_a_failed_save_never_leaves_old_and_new_files_mixed(tmp_path, quantized_model,
                                                            monkeypatch):
    model, quantized = quantized_model
    folder = save_quantized(model, quantized, tmp_path / "c")
    before = files_of(folder)
    other = tiny_model("llama", seed=6, intermediate_size=96)  # a config.json that differs
    res = ptq.quantize_model(other, "int2-ch", "rtn", progress=False)

    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    with monkeypatch.context() as m:  # fails while writing: the old checkpoint is untouched
        m.setattr(checkpoint, "save_file", disk_full)
        with pytest.raises(OSError):
            save_quantized(other, res.quantized, folder)
    assert files_of(folder) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]

    real_replace = os.replace

    def fail_on_weights(src, dst):
        if str(dst).endswith(CHECKPOINT_FILE):
            raise OSError(5, "I/O error")
        real_replace(src, dst)

    with monkeypatch.context() as m:  # fails while moving: no checkpoint, rather than a mix
        m.setattr(checkpoint.os, "replace", fail_on_weights)
        with pytest.raises(OSError):
            save_quantized(other, res.quantized, folder)
    assert not is_quantized_checkpoint(folder)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["c"]
    save_quantized(other, res.quantized, folder)
    assert torch.equal(logits(load_quantized(folder)[0]), logits(other))


@pytest.mark.parametrize("umask", [0o022, 0o077, 0o002])
def test_files_are_readable_as_the_umask_says(tmp_path, quantized_model, umask):
    model, quantized = quantized_model
    old = os.umask(umask)
    try:
        new = save_quantized(model, quantized, tmp_path / "new")  # moved in as one folder
        existing = tmp_path / "existing"
        existing.mkdir()
        save_quantized(model, quantized, existing)  # moved in file by file
    finally:
        os.umask(old)
    assert stat.S_IMODE(new.stat().st_mode) == 0o777 & ~umask
    for folder in (new, existing):
        for name in ("config.json", CHECKPOINT_FILE):
            assert stat.S_IMODE((folder / name).stat().st_mode) == 0o666 & ~umask
