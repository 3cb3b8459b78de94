"""gpudoctor: why is my GPU program slow, with numbers."""
from pathlib import Path as _Path

__version__ = "0.1.0"

# In a source checkout that is not installed, analyzers/ and dashboards/ sit beside this package.
# Installs map them to gpudoctor.analyzers / gpudoctor.dashboards (pyproject package-dir); here we
# let the import system find them in the checkout so `pytest` from the repo root tests the checkout.
_checkout = _Path(__file__).resolve().parent.parent
if not (_Path(__file__).parent / "analyzers").exists() and (_checkout / "analyzers" / "__init__.py").exists():
    __path__.append(str(_checkout))  # type: ignore[name-defined]
