"""The public API is what ``senderqueue.__all__`` says: sorted, complete, and all of it real."""

from __future__ import annotations

import importlib
import inspect
import pkgutil
from types import ModuleType

import pytest

import senderqueue as sq
import senderqueue.testing

# Names a private module lists in its ``__all__`` for the package's own use, not the user's.
INTERNAL: dict[str, set[str]] = {
    "_backend": {"backend_from_url"},  # SenderQueue.open(url) is the public way in
    "_clock": {"ManualClock", "ScaledClock"},  # public from senderqueue.testing
    "_lifecycle": {"allowed", "check", "diagram"},
    "_validation": {
        "MAX_ID_LENGTH",
        "IdMaker",
        "check_address",
        "check_id",
        "check_lease",
        "check_limit",
        "check_messages",
        "check_positive_int",
    },
}
# Subpackages that are not a part of the library's Python API.
NOT_API = {"_cli", "__main__"}


def isort_key(name: str) -> tuple[int, str]:
    """CONSTANTS first, then Classes, then functions (the order ruff's RUF022 calls isort-style)."""
    if name.isupper():
        return (0, name)
    return (1, name) if name[0].isupper() else (2, name)


def private_modules() -> list[ModuleType]:
    modules = []
    for info in pkgutil.iter_modules(sq.__path__):
        if info.ispkg or info.name in NOT_API:
            continue
        modules.append(importlib.import_module(f"senderqueue.{info.name}"))
    return modules


def test_all_is_sorted_constants_classes_functions() -> None:
    assert sq.__all__ == sorted(sq.__all__, key=isort_key)
    assert len(sq.__all__) == len(set(sq.__all__))
    # The groups really are in that order (the key is not vacuous).
    groups = [isort_key(name)[0] for name in sq.__all__]
    assert groups == sorted(groups)
    assert set(groups) == {0, 1, 2}


def test_every_name_in_all_exists() -> None:
    for name in sq.__all__:
        assert getattr(sq, name, None) is not None, name


def test_star_import_gives_exactly_all() -> None:
    namespace: dict[str, object] = {}
    exec("from senderqueue import *", namespace)
    namespace.pop("__builtins__")
    assert set(namespace) == set(sq.__all__)


def test_nothing_public_is_left_out_of_all() -> None:
    submodules = {info.name for info in pkgutil.iter_modules(sq.__path__)}
    public = {name for name in dir(sq) if not name.startswith("_")} - submodules
    assert public == set(sq.__all__)


def test_modules_of_the_package_are_private() -> None:
    names = {info.name: info.ispkg for info in pkgutil.iter_modules(sq.__path__)}
    assert "_queue" in names  # the walk found the package's modules
    public = {name for name in names if not name.startswith("_")}
    assert public == {"testing"}  # the one public subpackage
    assert names["testing"] is True


def test_private_modules_export_their_public_names() -> None:
    modules = private_modules()
    assert len(modules) >= 10
    exported = set(sq.__all__)
    for module in modules:
        short = module.__name__.rpartition(".")[2]
        listed = set(getattr(module, "__all__", ()))
        assert listed, f"{module.__name__} has no __all__"
        for name in listed:
            assert hasattr(module, name), f"{module.__name__}.__all__ lists {name}, which it lacks"
        internal = INTERNAL.get(short, set())
        assert internal <= listed, f"INTERNAL names {internal - listed} are gone from {module.__name__}"
        missing = listed - internal - exported
        assert not missing, f"{module.__name__} lists {sorted(missing)} but senderqueue does not export them"
        assert not internal & exported


def test_private_modules_list_every_class_and_function_they_define() -> None:
    for module in private_modules():
        listed = set(getattr(module, "__all__", ()))
        for name, value in vars(module).items():
            if name.startswith("_") or not (inspect.isclass(value) or inspect.isfunction(value)):
                continue
            if value.__module__ == module.__name__:
                assert name in listed, f"{module.__name__}.{name} is public but not in its __all__"


def test_exported_objects_come_from_private_modules() -> None:
    for name in sq.__all__:
        value = getattr(sq, name)
        module = getattr(value, "__module__", None)
        if inspect.isclass(value) or inspect.isfunction(value):
            assert module is not None
            assert module.startswith("senderqueue._"), (name, module)


def test_testing_exports() -> None:
    assert senderqueue.testing.__all__ == sorted(senderqueue.testing.__all__, key=isort_key)
    for name in senderqueue.testing.__all__:
        assert hasattr(senderqueue.testing, name), name
    assert {"ManualClock", "ScaledClock"} <= set(senderqueue.testing.__all__)


def test_errors_form_one_tree() -> None:
    errors = [
        value
        for value in (getattr(sq, name) for name in sq.__all__)
        if inspect.isclass(value) and issubclass(value, BaseException)
    ]
    assert {e.__name__ for e in errors} == {
        "SenderQueueError",
        "InvalidArgument",
        "InvalidMessage",
        "DuplicateMessage",
        "UnknownMessage",
        "InvalidTransition",
        "LeaseLost",
        "BackendError",
    }
    for error in errors:
        assert issubclass(error, sq.SenderQueueError)
    assert issubclass(sq.InvalidMessage, sq.InvalidArgument)
    assert issubclass(sq.InvalidArgument, ValueError)
    assert issubclass(sq.UnknownMessage, LookupError)


# The names SPEC sections 5 and 7 use as ``sq.<name>``.
SPEC_NAMES = [
    "SenderQueue",
    "RetryPolicy",
    "NewMessage",
    "Delivered",
    "SoftBounce",
    "HardBounce",
    "State",
    "Metrics",
    "Message",
    "Claim",
    "FakeSMTPTransport",
    "SMTPTransport",
    "SenderWorker",
    "SenderQueueError",
    "InvalidMessage",
    "UnknownMessage",
    "InvalidTransition",
    "LeaseLost",
    "DuplicateMessage",
    "BackendError",
]


@pytest.mark.parametrize("name", SPEC_NAMES)
def test_names_the_spec_uses_are_exported(name: str) -> None:
    assert name in sq.__all__
