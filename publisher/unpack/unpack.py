"""Unpack one OCI/Docker layer blob into a fresh work directory, hardened and streaming.

    result = unpack_layer(blob, repo/".tmp/xyz", digest="sha256:...", diff_id="sha256:...",
                          whiteouts="overlay", lowers=[parent_chain_rootfs])
    os.rename(repo/".tmp/xyz", repo/".layers/xx/hex/layerfs")   # the caller, on success

The blob is read once, front to back (it may still be downloading); both digests are
checked while streaming; on ANY failure the work directory is removed before the error
propagates, so the caller never sees half a layer.
"""
from __future__ import annotations

import os
import tarfile
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import BinaryIO

from cvmfs_common.oci.digest import Digest, parse_digest
from cvmfs_common.fsutil.fdtree import remove_tree

from publisher.unpack.layererrors import DigestMismatchError, HostileLayerError, LayerError
from publisher.unpack.lowers import LowerView
from publisher.unpack.streams import (HashingReader, ReadAhead, SourceFailed, SourceReader, StreamError, StreamTooLarge,
    TarSource, drain, drain_expect_zeros, open_decompressed)
from publisher.unpack.tarsafety import HeaderTooLarge, Limits, limited_tarinfo
from publisher.unpack.treewriter import EntryCounts, SkippedEntry, TreeWriter
from publisher.unpack.whiteouts import WhiteoutMode
from publisher.unpack.writeback import EarlyWriteback

__all__ = ["unpack_layer", "UnpackResult", "Limits", "EntryCounts", "SkippedEntry",
           "LayerError", "HostileLayerError", "DigestMismatchError", "WhiteoutMode"]


@dataclass(frozen=True)
class UnpackResult:
    digest: str                          # compressed blob digest (verified)
    diff_id: str                         # sha256 of the uncompressed tar (verified if given)
    diff_size: int                       # uncompressed tar size
    compressed_size: int
    compression: str                     # gzip | zstd | none
    whiteouts: str                       # none | overlay | raw (docs/DESIGN.md#whiteouts)
    entries: int                         # tar members seen
    counts: EntryCounts
    file_bytes: int                      # sum of regular file sizes
    implicit_parents: tuple[str, ...]    # directories the layer omits, created by us
    parents_from_lower: tuple[str, ...]  # ... of which attributes came from a lower
    followed_lower_symlinks: tuple[str, ...]  # lower-chain symlinks members were written through
    skipped: tuple[SkippedEntry, ...]

    @property
    def depends_on_parent_chain(self) -> bool:
        """True when this layer dir is right only on top of the chain it was unpacked on
        (record `parent-chain` in layers.json)."""
        return bool(self.implicit_parents or self.followed_lower_symlinks)


def unpack_layer(blob: BinaryIO, workdir: os.PathLike[str] | str, *,
                 digest: str | Digest,
                 diff_id: str | Digest | None = None,
                 media_type: str | None = None,
                 whiteouts: WhiteoutMode | str = WhiteoutMode.OVERLAY,
                 lowers: Sequence[os.PathLike[str] | str] = (),
                 limits: Limits = Limits(),
                 preserve_owners: bool | None = None,
                 early_writeback: bool = True) -> UnpackResult:
    """Unpack `blob` (a readable binary stream of the compressed layer) into `workdir`,
    which must not exist yet (its parent must). `lowers`: the parent chain's root fs, or its
    layer dirs topmost first, for the attributes of directories the layer omits.
    `preserve_owners` defaults to "running as root". `early_writeback`: syncfs in the
    background while unpacking (publisher/unpack/writeback.py), for callers that sync after."""
    expected = parse_digest(digest)
    expected_diff = parse_digest(diff_id) if diff_id is not None else None
    mode = WhiteoutMode(whiteouts)
    owners = os.geteuid() == 0 if preserve_owners is None else preserve_owners
    work = Path(workdir)
    os.mkdir(work, 0o700)
    try:
        return _unpack(blob, work, str(expected), expected_diff, media_type, mode,
                       LowerView(lowers), limits, owners, early_writeback)
    except BaseException as exc:
        _discard(work, exc)
        raise


def _unpack(blob: BinaryIO, work: Path, layer: str, expected_diff: Digest | None,
            media_type: str | None, mode: WhiteoutMode, lowers: LowerView, limits: Limits,
            owners: bool, early_writeback: bool) -> UnpackResult:
    raw = HashingReader(SourceReader(blob), limit=limits.max_total_bytes)
    ahead: ReadAhead | None = None
    writeback: EarlyWriteback | None = None
    root_fd = os.open(work, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    writer = TreeWriter(root_fd, work, layer, mode, lowers, limits, owners)
    try:
        with _as_layer_errors(layer, writer, raw, lambda: ahead and ahead.close()):
            stream, compression = open_decompressed(raw, media_type)
            plain = HashingReader(stream, limit=limits.max_total_bytes)
            ahead = ReadAhead(plain)
            if early_writeback:
                writeback = EarlyWriteback(root_fd)
            source = TarSource(ahead.chunk)
            writer.source = source
            # "r:" over our forward-only TarSource: tarfile parses headers from it, file data
            # bypasses tarfile (TreeWriter writes the source's pieces), no stream buffer.
            tar = tarfile.open(fileobj=source, mode="r:",  # type: ignore[call-overload]
                               tarinfo=limited_tarinfo(limits.max_header_bytes),
                               encoding="utf-8", errors="surrogateescape")
            while (member := tar.next()) is not None:
                tar.members.clear()     # tarfile would keep every TarInfo in memory
                writer.add(tar, member)
                if member.isreg() and not member.issparse():
                    source.member_data_ends(member.offset_data + member.size)
                    if writeback is not None:
                        writeback.written(writer.file_bytes)
            writer.member = None
            writer.finish()
            # After the end-of-archive marker only zero padding may follow: anything else
            # is a member tarfile could not parse (it stops silently at a bad header).
            if drain_expect_zeros(source):
                raise LayerError(layer, "unparsable data after the last tar member")
            ahead.close()
            if drain_expect_zeros(raw):
                raise LayerError(layer, "trailing data after the compressed stream")
            if writeback is not None:
                writeback.close()
    finally:
        if writeback is not None:
            writeback.close(raise_error=False)   # an error is propagating
        if ahead is not None:
            ahead.close()
        writer.close()
        os.close(root_fd)
    got = f"sha256:{raw.hexdigest()}"
    if got != layer:
        raise DigestMismatchError(layer, f"blob digest is {got}, expected {layer}")
    diff = f"sha256:{plain.hexdigest()}"
    if expected_diff is not None and diff != str(expected_diff):
        raise DigestMismatchError(layer, f"diffID is {diff}, expected {expected_diff}")
    return UnpackResult(
        digest=layer, diff_id=diff, diff_size=plain.size, compressed_size=raw.size,
        compression=compression,
        whiteouts=mode.value if writer.saw_whiteouts else "none",
        entries=writer.entries, counts=writer.counts, file_bytes=writer.file_bytes,
        implicit_parents=writer.implicit_parents,
        parents_from_lower=writer.parents_from_lower,
        followed_lower_symlinks=tuple(writer.followed_lower_symlinks),
        skipped=tuple(writer.skipped))


@contextmanager
def _as_layer_errors(layer: str, writer: TreeWriter, raw: HashingReader,
                     stop_reader: Callable[[], object]) -> Iterator[None]:
    """One place mapping low-level failures to LayerError naming layer and member. A
    corrupt download shows up as a broken stream first: then report the digest mismatch."""
    try:
        try:
            yield
        except LayerError:
            raise
        except SourceFailed as exc:
            raise exc.original
        except (StreamTooLarge, HeaderTooLarge) as exc:
            # The stream is read ahead: name no member, say where the writer was.
            where = f" (after member {writer.member!r})" if writer.member else ""
            raise HostileLayerError(layer, f"{exc}{where}") from exc
        except (StreamError, tarfile.TarError, EOFError) as exc:
            where = f" (after member {writer.member!r})" if writer.member else ""
            raise LayerError(layer, f"malformed layer: {exc}{where}") from exc
        except (OSError, ValueError) as exc:
            raise LayerError(layer, str(exc), writer.member) from exc
    except LayerError as err:
        stop_reader()           # the read-ahead thread must let go of `raw` first
        if not isinstance(err, (DigestMismatchError, HostileLayerError)):
            _raise_if_corrupt(layer, raw, err)
        raise


def _raise_if_corrupt(layer: str, raw: HashingReader, err: LayerError) -> None:
    """The layer did not unpack: a blob whose digest is wrong is a corrupt download
    (DigestMismatchError); one that could not be downloaded whole (too slow, timed out,
    cut) was never judged: that download failure is raised, not "malformed"."""
    try:
        drain(raw)
    except SourceFailed as exc:
        raise exc.original from None
    except Exception:  # (anything else: the unpacking error says enough)
        return
    got = f"sha256:{raw.hexdigest()}"
    if got != layer:
        raise DigestMismatchError(layer, f"blob digest is {got}, expected {layer} "
                                  f"(while unpacking: {err.reason})") from err


def _discard(work: Path, exc: BaseException) -> None:
    try:
        remove_tree(work)
    except OSError as rm_err:
        exc.add_note(f"could not remove work dir {work}: {rm_err}")
