"""Shared test set-up: stop the shared rank pools after each test module, so pools started with
``launch(..., pool=True)`` in one file never pile up (or count as leftovers) in the next."""
import pytest


@pytest.fixture(autouse=True, scope="module")
def _stop_shared_pools_after_module():
    yield
    import labkit

    labkit.shutdown_pools()
