"""graphs imports no torch and no calibless; where the two sides must agree, they are checked here."""
import ml_dtypes
import numpy as np

import calibless.quant
from calibless.formats import GROUP_SIZES, WeightFormat, branch_format
from graphs import constants
from graphs.tensors import int_dtype


def test_activation_scale_floor_is_the_same_on_both_sides():
    assert calibless.quant.ACT_SCALE_EPS == constants.ACT_SCALE_EPS


def test_every_group_size_is_a_matmulnbits_block_size():
    assert {g for g in GROUP_SIZES if g is not None} <= set(constants.MATMULNBITS_BLOCK_SIZES)


def test_storage_types_match_storage_bits():
    for bits in (4, 6, 8):
        for signed in (True, False):
            fmt = WeightFormat(bits, signed, 64)
            assert np.dtype(int_dtype(bits, signed)).itemsize * 8 >= fmt.storage_bits
    assert np.dtype(int_dtype(4, True)) == np.dtype(ml_dtypes.int4)
    assert np.dtype(int_dtype(6, True)) == np.dtype(np.int8)  # 6-bit rides in int8
    assert branch_format("w6a6").weight.storage_bits == 8


def test_writer_names_match_the_suffixes_checks_rely_on():
    from graphs.synthetic import single_model
    names = {i.name for i in single_model(64, 32, 8).graph.initializer}
    assert any(n.endswith(constants.MAIN_WEIGHT_SUFFIX) for n in names)
    for suffix in constants.BRANCH_SUFFIXES:
        assert any(n.endswith(suffix) for n in names), suffix
