"""SnapshotsService's mapping of domain errors to gRPC status codes, without a server."""

from __future__ import annotations

import grpc
import pytest

from snapshotter import errors
from snapshotter.service import _STATUS, SnapshotsService


class _Aborted(Exception):
    def __init__(self, code: grpc.StatusCode, details: str) -> None:
        super().__init__(code, details)
        self.code, self.details = code, details


class _Context:
    """The part of grpc.ServicerContext that SnapshotsService._call uses."""

    def invocation_metadata(self):
        return (("containerd-namespace", "ns"),)

    def abort(self, code: grpc.StatusCode, details: str):
        raise _Aborted(code, details)


def _code(exc: Exception) -> grpc.StatusCode:
    def fail():
        raise exc

    with pytest.raises(_Aborted) as e:
        SnapshotsService(snapshotter=None)._call("Stat", _Context(), "k", fail)
    return e.value.code


def test_every_domain_error_is_in_the_table() -> None:
    defined = {c for c in vars(errors).values()
               if isinstance(c, type) and issubclass(c, errors.SnapshotterError) and c is not errors.SnapshotterError}
    assert defined == set(_STATUS)


@pytest.mark.parametrize("parent", list(_STATUS), ids=lambda c: c.__name__)
def test_an_error_and_its_subclass_get_the_parents_code(parent: type[errors.SnapshotterError]) -> None:
    sub = type(f"Special{parent.__name__}", (parent,), {})
    assert _code(parent("x")) == _STATUS[parent]
    assert _code(sub("x")) == _STATUS[parent]


def test_other_exceptions_are_internal() -> None:
    assert _code(RuntimeError("boom")) == grpc.StatusCode.INTERNAL


def test_only_stat_runs_in_grpcios_serving_thread() -> None:
    # Every other handler can wait (a repository stat, a tree walk, the write lock), and
    # in the serving thread it would hold up every other call (docs/DESIGN.md#operations).
    marked = {name for name in dir(SnapshotsService)
              if getattr(getattr(SnapshotsService, name), "cvmfs_non_blocking", False)}
    assert marked == {"Stat"}
