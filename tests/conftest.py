import os
from pathlib import Path

import pytest

# A bug inside gpudoctor prints its traceback in tests (users get one line; see cli/main.py).
os.environ.setdefault("GPUDOCTOR_DEBUG", "1")


@pytest.fixture(autouse=True)
def _no_stored_ceilings(tmp_path_factory, monkeypatch):
    """Ceilings stored on the machine running the tests (gpudoctor ceilings) must not change the results."""
    if "GPUDOCTOR_HOME" not in os.environ:
        monkeypatch.setenv("GPUDOCTOR_HOME", str(tmp_path_factory.mktemp("gpudoctor_home")))

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES
