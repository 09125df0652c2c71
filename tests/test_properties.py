"""Property tests (issue 8, item 1): every op, on every available backend, agrees with the reference.

Hypothesis draws the shapes (1, odd and prime sizes come up), the dtype, the
layout of the activations (contiguous, channels-last, a sliced view), the mask
spec and dilation of the convolutions and K of the mixture; each backend's
forward and backward are compared with the reference in float64 within
:mod:`pixelcnn_kernels.testing`'s tolerance table.

Profiles: ``ci`` (the default: few, tiny examples, derandomized so that a CI
run is reproducible; the Triton kernels run in the interpreter) and ``gpu``
(``HYPOTHESIS_PROFILE=gpu``: more and larger examples on a GPU; the GPU check passes
the variable on, and runs ``ci``'s examples on the GPU when it is unset, to fit one call).

The op table and the profiles are in ``op_table.py``, shared with
``test_bad_inputs.py`` and ``test_determinism.py``.
"""

from __future__ import annotations

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st
from op_table import BACKENDS, DEVICE, LAYOUTS, LIMITS, OPS, PROFILE_SETTINGS, check_against_reference, kernel_dtypes, with_layout


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name", list(OPS))
@PROFILE_SETTINGS
@given(data=st.data())
def test_every_backend_agrees_with_the_reference(name, backend, data):
    case = OPS[name]
    params = data.draw(case.params(LIMITS), label="params")
    dtype = data.draw(st.sampled_from(kernel_dtypes(backend)), label="dtype")
    layout = data.draw(st.sampled_from(LAYOUTS), label="layout")
    generator = torch.Generator().manual_seed(data.draw(st.integers(0, 2**31 - 1), label="seed"))
    inputs = with_layout(case.make(params, dtype, DEVICE, generator), case, layout)
    check_against_reference(case, backend, inputs, dtype)
