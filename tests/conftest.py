import os

import pytest

from relay import _fastpath_py

try:
    from relay import _fastpath as _fastpath_c
except ImportError:  # not built: the fast-path tests must fail in CI, not vanish
    _fastpath_c = None


@pytest.fixture
def extension():
    """The Cython twin, relay._fastpath."""
    if _fastpath_c is None:
        if os.environ.get("CI"):
            pytest.fail("the Cython extension relay._fastpath is not built")
        pytest.skip("the Cython extension relay._fastpath is not built")
    return _fastpath_c


@pytest.fixture(params=["cython", "python"])
def impl(request):
    """Each fast-path implementation in turn: the same tests must pass on both."""
    return _fastpath_py if request.param == "python" else request.getfixturevalue("extension")
