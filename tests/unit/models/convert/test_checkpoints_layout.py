"""`layout_mismatch`: what keeps converted tensors from loading into the target model."""

from __future__ import annotations

import torch

from mmjobs.models.convert.checkpoints import layout_mismatch


def test_a_fitting_state_dict_has_no_mismatch():
    assert layout_mismatch({"a": (2, 3)}, {"a": torch.zeros(2, 3)}) is None


def test_missing_unexpected_and_misshapen_tensors_are_each_named():
    problem = layout_mismatch({"a": (2, 3), "b": (4,), "c": (1,)},
                              {"a": torch.zeros(3, 2), "c": torch.zeros(1), "d": torch.zeros(1)})
    assert problem == "missing ['b']; unexpected ['d']; shape a (3, 2) != (2, 3)"
