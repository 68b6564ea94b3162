"""What pyproject.toml declares agrees with the code that uses it.

notify.py speaks the Apprise 2 API: ``AppriseAsset(service_timeout=...)``,
``apprise.AppriseResultStatus`` and ``NotifyResult.logs()``. Apprise 1.x has none of them
(its ``AppriseAsset`` raises on the keyword), so with 1.x every notification fails and
``check`` crashes. The declared lower bound must therefore admit no 1.x, and the Apprise
installed here must satisfy the declaration.
"""

from __future__ import annotations

import tomllib
from importlib.metadata import version

import pytest
from packaging.requirements import Requirement
from packaging.specifiers import SpecifierSet
from packaging.utils import canonicalize_name
from packaging.version import Version

from helpers import REPO

PYPROJECT = REPO / "pyproject.toml"

# The Apprise major version whose API notify.py uses.
APPRISE_API_MAJOR = Version("2")

# Operators that put a floor under the versions a specifier set admits.
FLOOR_OPERATORS = {">=", ">", "==", "~=", "==="}


def declared(name: str) -> Requirement:
    """The requirement on ``name`` in ``[project] dependencies``; fail if there is none
    or more than one."""
    deps = tomllib.loads(PYPROJECT.read_text())["project"]["dependencies"]
    found = [r for r in map(Requirement, deps)
             if canonicalize_name(r.name) == canonicalize_name(name)]
    assert len(found) == 1, f"pyproject.toml should require {name} once, has {found}"
    return found[0]


def lower_bound(spec: SpecifierSet) -> Version | None:
    """The highest floor among ``spec``'s specifiers (``>=2.0,>=2.1`` -> 2.1), or None when
    nothing bounds the versions from below. A wildcard ``==2.*`` counts as 2."""
    floors = [Version(s.version.removesuffix(".*")) for s in spec
              if s.operator in FLOOR_OPERATORS]
    return max(floors, default=None)


@pytest.mark.parametrize(("text", "floor"), [
    ("apprise>=1.6", Version("1.6")),
    ("apprise", None),
    ("apprise<3", None),
    ("apprise!=1.9", None),
    ("apprise>=2.0,<3", Version("2.0")),
    ("apprise~=2.1", Version("2.1")),
    ("apprise==2.*", Version("2")),
    ("apprise>1.13,>=1.6", Version("1.13")),
])
def test_lower_bound_reads_the_floor_of_a_requirement(text: str, floor: Version | None) -> None:
    assert lower_bound(Requirement(text).specifier) == floor


def test_declared_apprise_admits_no_version_older_than_the_api_notify_uses() -> None:
    req = declared("apprise")
    floor = lower_bound(req.specifier)
    assert floor is not None, (
        f"pyproject.toml lets any Apprise in ({req}): notify.py needs {APPRISE_API_MAJOR}+")
    assert floor >= APPRISE_API_MAJOR, (
        f"pyproject.toml allows Apprise {floor} ({req}), but notify.py uses the Apprise "
        f"{APPRISE_API_MAJOR.major} API")
    # and the last 1.x (the one nixpkgs ships at the time of writing) is kept out
    assert not req.specifier.contains("1.13.1", prereleases=True)


def test_installed_apprise_satisfies_the_declared_requirement() -> None:
    req = declared("apprise")
    installed = version("apprise")
    assert req.specifier.contains(installed, prereleases=True), (
        f"Apprise {installed} is installed, pyproject.toml requires {req}")


def test_installed_apprise_has_the_api_notify_uses() -> None:
    """The names notify.py relies on, so a lower bound that is too low shows up here too."""
    import apprise

    apprise.AppriseAsset(storage_mode="memory", service_timeout=5)
    assert hasattr(apprise.AppriseResultStatus, "TIMEOUT")
    # what async_notify returns: false when not delivered, with the reason in logs()
    result = apprise.Apprise().notify(body="nobody listens")
    assert not result
    assert callable(result.logs)
