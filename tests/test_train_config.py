"""``TrainConfig``: the one conversion of the parsed options into typed components, whose flat
view is exactly the parsed options (the stored checkpoint config and the run signature)."""
import os

import pytest

from blsam.tools.train import parse_args
from blsam.train.config import ModelConfig, TrainConfig
from blsam.train.resume import SIGNATURE_OPTIONS, run_signature

CONFIGS = os.path.join(os.path.dirname(__file__), "..", "blsam", "configs")


@pytest.mark.parametrize("config", [None, "distill_b_t.yaml", "distill_h_b.yaml"])
def test_flat_view_is_the_parsed_options_and_signature_is_unchanged(config):
    argv = ["--config", os.path.join(CONFIGS, config)] if config else []
    ns = parse_args(argv + ["--lr", "3e-4", "--shards", "sa_000001"])
    cfg = TrainConfig.from_options(vars(ns))
    assert cfg.options() == vars(ns) and list(cfg.options()) == list(vars(ns))
    assert cfg.optim.lr == 3e-4 and cfg.data.shards == ["sa_000001"]
    assert isinstance(cfg.model, ModelConfig) and cfg.model.model == ns.model
    keys = ["sa_1", "sa_2"]
    # the signature the loop wrote before the typed config: every option read by name
    old = {k: (list(getattr(ns, k)) if isinstance(getattr(ns, k), (list, tuple))
               else getattr(ns, k)) for k in SIGNATURE_OPTIONS}
    sig = cfg.signature(4, 100, keys)
    assert {k: sig[k] for k in SIGNATURE_OPTIONS} == old
    assert sig == run_signature(vars(ns), 4, 100, keys)


def test_unknown_options_are_kept_and_missing_ones_refused():
    ns = parse_args([])
    cfg = TrainConfig.from_options({**vars(ns), "some_new_flag": 7})
    assert cfg.extra["some_new_flag"] == 7 and cfg.options()["some_new_flag"] == 7
    partial = dict(vars(ns))
    del partial["lr"]
    with pytest.raises(KeyError):
        TrainConfig.from_options(partial)
