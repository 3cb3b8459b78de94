import os
from pathlib import Path

import pytest

# A bug inside gpudoctor prints its traceback in tests (users get one line; see cli/main.py).
os.environ.setdefault("GPUDOCTOR_DEBUG", "1")

ROOT = Path(__file__).resolve().parent.parent
FIXTURES = ROOT / "fixtures"


@pytest.fixture
def fixtures_dir() -> Path:
    return FIXTURES
