"""Repository-wide pytest setup (the tests' own fixtures live in tests/conftest.py).

On torch < 2.14 the docstring examples that take second derivatives are skipped: jvpgraph refuses
Hessian-vector products there (the refusal is tested in tests/test_errors.py).
"""

import pytest

_SECOND_ORDER_EXAMPLES = ("jvpgraph.hessian", "jvpgraph.testing.check_opinfo_sample_second_order")


def pytest_collection_modifyitems(config, items):
    from jvpgraph.hessian import _hvp_works

    if _hvp_works():
        return
    refused = pytest.mark.skip(reason="torch < 2.14: jvpgraph refuses Hv (wrong there)")
    for item in items:
        if isinstance(item, pytest.DoctestItem) and item.name.startswith(_SECOND_ORDER_EXAMPLES):
            item.add_marker(refused)
