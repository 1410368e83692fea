"""pyproject.toml names its packages one by one: a new subpackage left out works from a checkout (editable
install) and is missing from the wheel and the Debian package."""

import tomllib
from pathlib import Path

ROOT = Path(__file__).parent.parent


def test_every_subpackage_of_relay_is_packaged():
    packages = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]["packages"]
    found = sorted(".".join(path.parent.relative_to(ROOT).parts) for path in (ROOT / "relay").rglob("__init__.py"))
    assert sorted(packages) == found
