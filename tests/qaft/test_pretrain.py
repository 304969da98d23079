"""Small models of our own: the tokenizer and the sizes."""

import pytest
from transformers import AutoTokenizer

from compare.data import TextSplits
from ptq.errors import OptionsError
from qaft.pretrain import SIZES, ModelConfig, build_model, parameter_count, train_tokenizer
from tests.conftest import markov_text


TEXT = TextSplits("markov", markov_text(6000, 1), markov_text(1200, 2))


@pytest.fixture(scope="module")
def tokenizer():
    return train_tokenizer(TEXT.train, 300)


def test_the_tokenizer_round_trips_through_save_pretrained(tokenizer, tmp_path):
    tokenizer.save_pretrained(tmp_path)
    again = AutoTokenizer.from_pretrained(tmp_path)
    sample = "the cat sat on a mat, and 42 élans!"
    assert again(sample).input_ids == tokenizer(sample).input_ids
    assert again.decode(again(sample).input_ids) == sample  # byte-level: lossless
    assert again("the cat").input_ids[0] != again.bos_token_id  # no BOS added
    assert train_tokenizer(TEXT.train, 300).get_vocab() == tokenizer.get_vocab()  # deterministic


def test_named_sizes_span_1m_to_20m(tokenizer):
    big = train_tokenizer(TEXT.train + " ".join(map(str, range(5000))), 4096)
    counts = {name: parameter_count(build_model(ModelConfig(size=name), big)) for name in SIZES}
    assert 1e6 < counts["1m"] < 2e6 and 15e6 < counts["20m"] < 25e6
    assert list(counts.values()) == sorted(counts.values())
    model = build_model(ModelConfig(width=96, depth=3), big)
    assert model.config.hidden_size == 96 and model.config.num_hidden_layers == 3
    with pytest.raises(OptionsError, match="use one of 1m"):
        ModelConfig(size="huge")
