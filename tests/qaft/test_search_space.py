import dataclasses
import itertools

import pytest

import qaft
from ptq.errors import OptionsError


def test_every_trial_of_the_search_space_is_a_valid_pair_of_configs():
    space = qaft.QAFT_SEARCH_SPACE
    assert space["lr"] == (1e-5, 3e-5, 1e-4, 3e-4, 1e-3)
    assert min(space["lr"]) == 1e-5 and max(space["lr"]) == 1e-3
    q_fields = {f.name for f in dataclasses.fields(qaft.QAFTConfig)}
    t_fields = {f.name for f in dataclasses.fields(qaft.TrainConfig)}
    assert not q_fields & t_fields  # a field name says which config it belongs to
    assert set(space) <= q_fields | t_fields
    trials = [dict(zip(space, values)) for values in itertools.product(*space.values())]
    assert len(trials) == 5 * 3 * 2 * 2
    for trial in trials:
        config, train = qaft.trial_configs(trial)
        assert (train.lr, config.init, config.scales, train.loss) == (
            trial["lr"], trial["init"], trial["scale_mode"], trial["loss"])
        assert train.weight_decay == 0.0  # no decay on the quantized weights
    # the rest of the given configs is kept
    _, train = qaft.trial_configs({"lr": 1e-4}, train=qaft.TrainConfig(schedule="cosine"))
    assert (train.lr, train.schedule) == (1e-4, "cosine")
    with pytest.raises(OptionsError, match="neither QAFTConfig's nor TrainConfig's"):
        qaft.trial_configs({"learning_rate": 1e-4})
