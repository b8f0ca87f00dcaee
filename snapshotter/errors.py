"""Domain errors of the snapshotter; service.py maps each to one gRPC status code."""


class SnapshotterError(Exception):
    """Base class; never raised itself."""


class NotFound(SnapshotterError):
    pass


class AlreadyExists(SnapshotterError):
    pass


class FailedPrecondition(SnapshotterError):
    pass


class InvalidArgument(SnapshotterError):
    pass


class Unavailable(SnapshotterError):
    """A repository directory a snapshot depends on is gone or does not answer."""
