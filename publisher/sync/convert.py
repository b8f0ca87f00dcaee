"""``convert``: keep a repository in sync with wishlist entries.

    bring the repository to this format, once (upgrade.py)
      -> expand tag globs (tag lists)  ->  HEAD every tag (in parallel)
      -> unchanged (the state has that digest published, no repair marked): nothing
      -> otherwise resolve, fetch config, publish (image.py), record in the state

A re-sync with nothing changed costs one HEAD per tag: no manifest GET, no blob
GET, no write to the repository, and no look into an image's directories (each a
nested catalog on CernVM-FS): lost content is found by ``check``, which marks the
tags it hurts for the next run (docs/DESIGN.md#format). Every tag and platform is
one item; a failing item is recorded and reported, never stops the others.
"""

from __future__ import annotations

import contextlib
import logging
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from typing import TYPE_CHECKING
from pathlib import Path

from cvmfs_common.fsutil.entries import readlink
from cvmfs_common.oci.digest import parse_digest
from cvmfs_common.repo.paths import RepositoryLayout
from cvmfs_common.oci.reference import InvalidReference, Reference
from cvmfs_common.registry.errors import NotFound, PlatformNotInIndex
from cvmfs_common.oci.platform import Platform
from cvmfs_common.registry.client import RegistryClient
from cvmfs_common.registry.manifest import ResolvedImage

from publisher.backend.base import Backend
from publisher.write.image import ImagePublisher, Published, Staged
from publisher.write.names import Placement, multiarch_name_for, podman_names, public_link_target
from publisher.core.outcome import FailureKind, Outcome, failure_kind_of
from publisher.core.progress import ItemResult, Progress, Summary
from publisher.core.runlock import exclusive, exclusive_repository, lock_path_for
from publisher.core.state import ImageRecord, State, TagRecord
from publisher.unpack.whiteouts import WhiteoutMode
from publisher.sync import upgrade
from publisher.sync.thin import ThinPublisher, ThinSettings
from publisher.sync.wishlist import Target, WishlistEntry
from publisher.write.podman_store import PodmanBatch, PodmanStore

if TYPE_CHECKING:  # pragma: no cover
    from cvmfs_common.repo.metadata import LayerMetadata

log = logging.getLogger(__name__)

# HEADs in flight at once (a re-sync is one HEAD per tag, latency-bound); the CLI's
# registry client keeps as many connections per registry open for reuse.
HEAD_JOBS = 16


@dataclass(frozen=True)
class ConvertOptions:
    jobs: int = 4
    podman_store: bool = True
    whiteouts: WhiteoutMode = WhiteoutMode.OVERLAY  # the local backend converts whiteouts (docs/DESIGN.md#whiteouts)
    # the run's podman store entries are written at its end, and at least this often meanwhile
    podman_flush_seconds: float = 60.0
    # one tag's HEAD (token and retries included) ends within this: the HEADs of a run go
    # before any image, so a registry that never answers costs the run this, once
    head_timeout: float = 30.0
    # a batching backend (cvmfs) publishes at most this many images per pair of units
    batch_images: int = 100
    # ... and all in one unit when the layers they miss are this small (compressed bytes)
    one_unit_bytes: int = 8 << 20


def _ref_key(ref: Reference) -> tuple:
    return (ref.registry, ref.repository, ref.tag, ref.digest)


@dataclass
class Converter:
    layout: RepositoryLayout
    state: State
    client: RegistryClient
    options: ConvertOptions = field(default_factory=ConvertOptions)
    progress: Progress = field(default_factory=lambda: Progress(live=False))
    backend: Backend | None = None  # None: the local backend
    # called with every item's result once its unit is published (thin images); may replace it
    post_item: Callable[[Target, ItemResult], ItemResult] | None = None

    def __post_init__(self) -> None:
        if self.backend is None:
            self.backend = Backend(self.layout.root)
        podman = None
        self.podman_batch = None
        if self.options.podman_store:
            podman = PodmanStore
            self.podman_batch = PodmanBatch()
        self._podman_names: dict[Path, dict[str, set[str]]] = {}  # store -> image id -> names
        self._podman_class = podman
        self._format_due = False  # the repository format is written in the run's first unit
        self._publisher: ImagePublisher | None = None
        self._known: "dict[str, LayerMetadata] | None" = None  # State.trusted_layers, read when first asked
        self._unfinished: list[str] = []  # why a run did not see every entry's tags (see run)
        # tags this run also publishes for a non-default Linux platform (variant public links)
        self._multi_refs: set[tuple] = set()

    @property
    def publisher(self) -> ImagePublisher:
        """Made when the first item needs publishing: a re-sync where nothing changed never
        imports the unpacker."""
        if self._publisher is None:
            from publisher.unpack.ingest import LayerIngester  # deliberately late (see above)

            assert self.backend is not None
            self.ingester = LayerIngester(self.layout, self.client, whiteouts=self.options.whiteouts,
                                          on_bytes=self.progress.add_bytes,
                                          durable=self.backend.durable_renames)
            self._publisher = ImagePublisher(self.layout, self.ingester, jobs=self.options.jobs,
                                             podman_store=self._podman_class, podman_batch=self.podman_batch,
                                             published_raw_whiteouts=self.backend.published_raw_whiteouts,
                                             grafts=self.backend.grafts,
                                             durable=self.backend.durable_renames,
                                             known_layer=self._known_layer)
        return self._publisher

    def _known_layer(self, digest: str) -> "LayerMetadata | None":
        """A layer the state records as published (State.trusted_layers): its dir is not
        opened. Read once per run, on the first image published, and kept up to date."""
        if self._known is None:
            self._known = {}
            for row in self.state.trusted_layers():
                try:
                    self._known[row[0]] = _layer_metadata(*row)
                except ValueError:
                    continue  # a row nothing valid can be made of: its dir is looked at
        return self._known.get(digest)

    def _recorded(self, record: ImageRecord) -> None:
        """The state now records ``record``: later units may trust its layers too."""
        if self._known is None:
            return
        for l in record.layers:
            self._known[l.digest] = _layer_metadata(l.digest, l.diff_id, l.diff_size, l.whiteouts, l.parent_chain)

    # -- the run ---------------------------------------------------------------------------
    def run(self, entries: Sequence[WishlistEntry], default_platform: Platform, command: str = "convert") -> Summary:
        summary = Summary()
        run_id = self.state.begin_run(command)
        unflushed: list[int] = []  # summary.results of the images the podman batch holds
        flushed = time.monotonic()
        self._unfinished: list[str] = []  # why the run did not see every entry's tags
        complete = False
        try:
            assert self.backend is not None
            self._format_due = upgrade.prepare(self.layout, self.state, self.client, self.backend, self._unit,
                                               podman_store=self.options.podman_store)
            targets = self._expand(entries, default_platform, summary)
            self._multi_refs = {_ref_key(t.reference) for t in targets
                                if not t.default and multiarch_name_for(str(t.platform)) is not None}
            heads = self._heads(targets)
            assert self.backend is not None
            batch: list[_Pending] = []  # batched backend: images waiting for their units
            for i, target in enumerate(targets, 1):
                self.progress.start_item(f"{i}/{len(targets)}", target.name)
                pending = len(self.podman_batch or ())
                head = heads[_ref_key(target.reference)]
                if self.backend.batched:
                    prepared = self._prepare_item(target, head)
                    self.progress.clear()
                    if isinstance(prepared, _Pending):
                        batch.append(prepared)
                        if len(batch) >= self.options.batch_images:
                            self._publish_batch(batch, summary, len(targets))
                            batch = []
                    else:
                        self._report(summary, target, prepared, len(targets))
                    continue
                result = self._item(target, head)
                self.progress.clear()
                if len(self.podman_batch or ()) > pending and result.outcome != Outcome.FAILED:
                    unflushed.append(len(summary.results))
                self._report(summary, target, result, len(targets), hook=False)
                if time.monotonic() - flushed >= self.options.podman_flush_seconds:
                    self._flush_podman(summary, unflushed)
                    flushed = time.monotonic()
            self._publish_batch(batch, summary, len(targets))
            complete = not self._unfinished
            if self._unfinished:
                log.warning("this run does not count as a full look at the wishlists for gc: %s",
                            "; ".join(self._unfinished[:5]) + (" ..." if len(self._unfinished) > 5 else ""))
        finally:
            self.progress.clear()
            try:
                self._flush_podman(summary, unflushed)
            finally:
                # a run that stopped part-way (or missed an entry's tags) is recorded as
                # such: gc must not take the tags it did not touch for unwanted ones
                self.state.finish_run(run_id, summary.run_counts(), complete=complete)
        return summary

    def _item(self, target: Target, head: str | Exception) -> ItemResult:
        """One target, whatever happens: an error escaping _one (or the thin-image hook)
        fails this item, never the run."""
        try:
            result = self._one(target, head)
            if self.post_item is not None:
                result = self.post_item(target, result)
            return result
        except Exception as e:  # noqa: BLE001 - one item never stops the others
            log.debug("%s failed", target.name, exc_info=True)
            self._unfinished.append(f"{target.name} could not be recorded")
            return ItemResult(target.name, Outcome.FAILED, f"{type(e).__name__}: {e}", failure=failure_kind_of(e))

    def _report(self, summary: Summary, target: Target, result: ItemResult, total: int, hook: bool = True) -> None:
        if hook and self.post_item is not None:
            try:
                result = self.post_item(target, result)
            except Exception as e:  # noqa: BLE001 - one item never stops the others
                log.debug("%s failed", target.name, exc_info=True)
                result = ItemResult(target.name, Outcome.FAILED, f"{type(e).__name__}: {e}", failure=failure_kind_of(e))
        summary.add(result)
        level = logging.ERROR if result.outcome == Outcome.FAILED else logging.INFO
        log.log(level, "[%d/%d] %s: %s%s", len(summary.results), total, result.name, result.outcome,
                f" ({result.detail})" if result.detail else "")

    def _publish_batch(self, batch: "list[_Pending]", summary: Summary, total: int) -> None:
        """A batching backend's images in two units (cvmfs: two revisions), whatever their number:

        1. every layer they miss (content-addressed: no name points at them yet);
        2. chains and flat dirs -- which graft the layers published by 1 instead of copying
           them -- names, metadata and the podman store entries of all of them.

        When the layers they miss are small (``one_unit_bytes``), 1 is part of 2: the new
        files are then hashed once more per chain and flat dir that holds them, which costs
        less than a revision. No stop point inside a unit (``progress.start_item`` is the
        loop's): a stop requested meanwhile takes effect after the batch. An image is
        recorded in the state only after 2 is published.
        One image failing fails only itself; a unit failing (e.g. its publish) fails every
        image in it."""
        if not batch:
            return
        assert self.backend is not None
        results: list[tuple[_Pending, ItemResult]] = []
        staged: list[_Pending] = []
        missing_bytes: dict[str, int] = {}
        missing: list[_Pending] = []
        for p in batch:
            layers = self._guard(p, results, lambda p: self.publisher.missing_layers(p.image, p.config,
                                                                                   trust_known=p.damage is None))
            if layers:
                missing.append(p)
                missing_bytes.update(layers)
        todo = [p for p in batch if p not in missing and all(q is not p for q, _ in results)]
        if missing and sum(missing_bytes.values()) <= self.options.one_unit_bytes:
            todo, missing = missing + todo, []  # staged in the one unit
        log.info("publishing %d image(s)%s", len(batch),
                 f": the {len(missing_bytes)} layer(s) they miss first" if missing else "")
        if missing:
            try:
                with self._unit(f"layers of {len(missing)} image(s)"):
                    self.publisher.new_unit()
                    for p in missing:
                        if self._guard(p, results, lambda p: self._stage(p)):
                            staged.append(p)
                    self.publisher.end_unit()
            except Exception as e:  # noqa: BLE001 - nothing of the unit is published
                self._fail_unit(results, missing, e)
                staged = []
        staged += todo  # staged in the next unit (their layers are there, or few)
        done: list[tuple[_Pending, Published]] = []
        if staged:
            stores: list[Path] = []
            try:
                with self._unit(f"{len(staged)} image(s)"):
                    self.publisher.new_unit()
                    for p in staged:
                        published = self._guard(p, results, lambda p: self._finish(p))
                        if published is not None:
                            done.append((p, published))
                    self.publisher.end_unit()
                    if self.podman_batch is not None and len(self.podman_batch):
                        stores = sorted({st.root for st in self.podman_batch.stores()})
                        self.podman_batch.flush()
                        self.backend.after_podman_stores(stores)
            except Exception as e:  # noqa: BLE001 - nothing of the unit is published
                self._fail_unit(results, staged, e)
                done = []
            finally:
                self._podman_names.clear()
                if self.podman_batch is not None:
                    self.podman_batch.clear()
        for p, published in done:
            try:
                self.state.record_published(p.target.key, p.placement.platform_dir, p.target.entry_id, p.head,
                                            published.record)
            except Exception as e:  # noqa: BLE001
                results.append((p, self._failed(p, e)))
                continue
            self._recorded(published.record)
            results.append((p, self._result(p, published)))
        order = {id(p): n for n, p in enumerate(batch)}
        for p, result in sorted(results, key=lambda pr: order[id(pr[0])]):
            self._report(summary, p.target, result, total)

    def _stage(self, p: "_Pending") -> bool:
        p.staged = self.publisher.stage(p.target.reference, p.image, p.config, trust_known=p.damage is None)
        assert self.backend is not None
        self.backend.after_layers(self.layout, list(p.staged.new_dirs))
        return True

    def _finish(self, p: "_Pending") -> Published:
        if p.staged is None:
            self._stage(p)
        assert self.backend is not None and p.staged is not None
        published = self.publisher.finish(p.staged, p.config_bytes, p.placement, str(p.target.platform),
                                          variant_link=self._variant(p.target, p.image.index_bytes is not None))
        self.backend.after_image(self.layout, published, p.placement)
        return published

    def _guard(self, p: "_Pending", results: "list[tuple[_Pending, ItemResult]]", step: Callable):
        """``step(p)``, or None with p's failure in ``results``."""
        try:
            return step(p)
        except Exception as e:  # noqa: BLE001 - one failing image never stops the others
            results.append((p, self._failed(p, e)))
            return None

    def _fail_unit(self, results: "list[tuple[_Pending, ItemResult]]", images: "Sequence[_Pending]",
                   e: BaseException) -> None:
        """A unit failed as a whole (e.g. its transaction could not be opened, or its publish
        failed): every image of it without a result of its own fails with that error; none
        may go unreported."""
        reported = {id(q) for q, _ in results}
        results += [(p, self._failed(p, e)) for p in images if id(p) not in reported]

    def _failed(self, p: "_Pending", e: BaseException) -> ItemResult:
        log.debug("%s failed", p.target.name, exc_info=True)
        try:
            self.state.record_failure(p.target.key, p.placement.platform_dir, p.target.entry_id, str(e))
        except Exception as record_error:  # noqa: BLE001 - the report matters more
            log.error("recording the failure of %s: %s", p.target.name, record_error)
            self._unfinished.append(f"{p.target.name} could not be recorded")
        return ItemResult(p.target.name, Outcome.FAILED, f"{type(e).__name__}: {e}",
                          seconds=time.monotonic() - p.started, failure=failure_kind_of(e))

    def _flush_podman(self, summary: Summary, unflushed: list[int]) -> None:
        """Write the podman store entries of the images published since the last flush,
        in a unit of their own (one JSON write per store, not one per image: a store of N
        images costs O(N) to write). The state already has these images: after a crash
        before this, the next run finds them missing from images.json and publishes them
        again (``_podman_current``). On failure their items become failures."""
        batch = self.podman_batch
        if batch is None or not len(batch):
            return
        stores = sorted({s.root for s in batch.stores()})
        assert self.backend is not None
        try:
            with self._unit("podman store"):
                batch.flush()
                self.backend.after_podman_stores(stores)
        except Exception as e:  # noqa: BLE001 - reported on the images it concerns
            log.error("writing the podman store entries of %d image(s) failed: %s", len(unflushed), e)
            log.debug("podman store flush failed", exc_info=True)
            for n in unflushed:
                r = summary.results[n]
                summary.results[n] = replace(r, outcome=Outcome.FAILED, failure=failure_kind_of(e),
                                             detail=f"podman store: {type(e).__name__}: {e}")
        finally:
            self._podman_names.clear()  # the stores changed: read them again when asked
            unflushed.clear()

    @contextlib.contextmanager
    def _unit(self, what: str) -> Iterator[None]:
        """One unit of the backend (cvmfs: one transaction): every write of a run goes through here."""
        assert self.backend is not None
        with self.backend.unit(what):
            if self._format_due:
                upgrade.write_format(self.layout)
            yield
        self._format_due = False

    def _pool(self, n: int) -> ThreadPoolExecutor:
        return ThreadPoolExecutor(max_workers=max(1, min(self.options.jobs, n)), thread_name_prefix="registry")

    def _expand(self, entries: Sequence[WishlistEntry], default: Platform, summary: Summary) -> list[Target]:
        """Entries -> concrete targets (globs via the tag list), deduplicated."""
        expanded: dict[int, tuple[list[Reference], list[str]] | Exception] = {}
        globs = [(i, e) for i, e in enumerate(entries) if e.reference.is_glob]
        if globs:
            with self._pool(len(globs)) as pool:
                futures = {i: pool.submit(self._glob_tags, e) for i, e in globs}
            for i, fut in futures.items():
                try:
                    expanded[i] = fut.result()
                except Exception as e:  # noqa: BLE001 - reported per entry
                    expanded[i] = e
        targets: dict[tuple, Target] = {}
        for i, entry in enumerate(entries):
            listed = expanded.get(i, ([entry.reference], []))
            if isinstance(listed, Exception):
                refs: list[Reference] | Exception = listed
                self._unfinished.append(f"the tags of {entry.reference.spelling} could not be listed")
            else:
                refs, invalid = listed
                summary.invalid_tags += len(invalid)
            for plat in entry.platforms:
                entry_id = self.state.upsert_entry(entry.reference.spelling, str(plat), entry.source)
                name = f"{entry.reference.spelling} ({plat})"
                if isinstance(refs, Exception):
                    summary.add(ItemResult(name, Outcome.FAILED, f"listing tags: {refs}", failure=FailureKind.REGISTRY))
                    log.error("%s: listing tags failed: %s", name, refs)
                    continue
                if not refs:
                    summary.add(ItemResult(name, Outcome.SKIPPED, "no tag matches"))
                    log.warning("%s (%s): no tag matches", name, entry.source)
                    continue
                for ref in refs:
                    key = _ref_key(ref) + (str(plat),)
                    if key not in targets:
                        targets[key] = Target(ref, plat, plat == default, entry_id, entry.key)
        return list(targets.values())

    def _glob_tags(self, entry: WishlistEntry) -> tuple[list[Reference], list[str]]:
        """The tags a glob entry matches, and the names in the registry's list that are no
        valid tag (glob characters included: ``*`` listed is a name, not a pattern); those
        cannot be pulled or linked and are skipped with a warning, not the whole entry."""
        refs, invalid = [], []
        for tag in self.client.match_tags(entry.reference):
            try:
                refs.append(entry.reference.with_tag(tag))
            except InvalidReference as e:
                invalid.append(tag)
                log.warning("%s (%s): skipping %r from the registry's tag list: %s", entry.reference.spelling,
                            entry.source, tag[:200], e)
        return refs, invalid

    def _heads(self, targets: Sequence[Target]) -> dict[tuple, str | Exception]:
        """What every tag points at now: one HEAD per tag (none for pinned digests)."""
        refs = {_ref_key(t.reference): t.reference for t in targets}
        out: dict[tuple, str | Exception] = {}
        todo = {k: r for k, r in refs.items() if r.digest is None}
        for k, r in refs.items():
            if r.digest is not None:
                out[k] = r.digest
        if todo:
            with ThreadPoolExecutor(max_workers=min(HEAD_JOBS, len(todo)), thread_name_prefix="registry") as pool:
                futures = {k: pool.submit(self.client.head_manifest, r, timeout=self.options.head_timeout)
                           for k, r in todo.items()}
            for k, fut in futures.items():
                try:
                    digest = fut.result()
                    out[k] = digest if digest is not None else NotFound(todo[k], "tag not found (HEAD 404)")
                except Exception as e:  # noqa: BLE001 - reported per item
                    out[k] = e
        return out

    # -- one item --------------------------------------------------------------------------
    def _placement(self, target: Target) -> Placement:
        if target.default:
            return Placement(self.layout, "")
        p = target.platform
        return Placement(self.layout.for_platform(p.os, p.architecture, p.variant), p.dir_name)

    def _one(self, target: Target, head: str | Exception) -> ItemResult:
        """One image in one unit of its own (the local backend)."""
        prepared = self._prepare(target, head)
        if not isinstance(prepared, _Pending):
            return prepared
        p = prepared
        assert self.backend is not None
        try:
            # One unit of work (cvmfs: one transaction); recorded only once it is published.
            with self._unit(target.name):
                self.publisher.new_unit()
                published = self.publisher.publish(target.reference, p.image, p.config_bytes, p.config, p.placement,
                                                   str(target.platform),
                                                   variant_link=self._variant(target, p.image.index_bytes is not None),
                                                   trust_known=p.damage is None)
                self.backend.after_image(self.layout, published, p.placement)
                self.publisher.end_unit()
            self.state.record_published(target.key, p.placement.platform_dir, target.entry_id, p.head,
                                        published.record)
            self._recorded(published.record)
        except Exception as e:  # noqa: BLE001 - one failing image never stops the others
            return self._failed(p, e)
        return self._result(p, published)

    def _prepare_item(self, target: Target, head: str | Exception) -> "ItemResult | _Pending":
        """_prepare, whatever happens (as _item: an escaping error fails this item only)."""
        try:
            return self._prepare(target, head)
        except Exception as e:  # noqa: BLE001 - one item never stops the others
            log.debug("%s failed", target.name, exc_info=True)
            self._unfinished.append(f"{target.name} could not be recorded")
            return ItemResult(target.name, Outcome.FAILED, f"{type(e).__name__}: {e}", failure=failure_kind_of(e))

    def _prepare(self, target: Target, head: str | Exception) -> "ItemResult | _Pending":
        """What a target needs: its final result (unchanged, skipped, failed) or, when it
        must be published, the resolved image with its config."""
        started = time.monotonic()
        key = target.key
        placement = self._placement(target)
        try:
            # Names the file system cannot hold fail here, before anything is fetched or written.
            placement.layout.image_metadata_dir(key.registry, key.repository, key.tag)
            if isinstance(head, Exception):
                raise head
            known = self.state.tag(key)
            damage = None
            if known is not None and known.absent_digest == head:
                self.state.touch_tag(key, placement.platform_dir, target.entry_id)
                return ItemResult(target.name, Outcome.SKIPPED, f"no image for {target.platform}; unchanged")
            # The state and one readlink in the root catalog: nothing under an image's dirs
            # (on CernVM-FS each is a nested catalog the client would load, ~30 ms a tag).
            if (known is not None and known.published and known.top_digest == head
                    and known.platform_dir == placement.platform_dir
                    and self._link_current(target, placement, known.config_digest,
                                           known.top_digest != known.manifest_digest)
                    and self._podman_current(target, placement, known.config_digest)):
                if known.repair is None:
                    self.state.touch_tag(key, placement.platform_dir, target.entry_id)
                    return ItemResult(target.name, Outcome.UNCHANGED, seconds=time.monotonic() - started)
                damage = known.repair
                log.warning("%s: %s; publishing it again", target.name, damage)
            image = self._resolve(target, head)
            if image is None:
                self.state.record_absent(key, placement.platform_dir, target.entry_id, head)
                return ItemResult(target.name, Outcome.SKIPPED, f"no image for {target.platform}")
            config_bytes, config = self.client.fetch_config(image)
            if image.platform is None and not _config_matches(config, target.platform):
                found = f"{config.get('os')}/{config.get('architecture')}"
                if not target.default:
                    self.state.record_absent(key, placement.platform_dir, target.entry_id, head)
                    return ItemResult(target.name, Outcome.SKIPPED, f"single-platform image is {found}")
                log.warning("%s: the image is %s, not %s; publishing it for the default platform",
                            target.name, found, target.platform)
        except Exception as e:  # noqa: BLE001 - one failing image never stops the others
            log.debug("%s failed", target.name, exc_info=True)
            try:
                self.state.record_failure(key, placement.platform_dir, target.entry_id, str(e))
            except Exception as record_error:  # noqa: BLE001 - the report matters more
                log.error("recording the failure of %s: %s", target.name, record_error)
                log.debug("recording the failure of %s", target.name, exc_info=True)
                self._unfinished.append(f"{target.name} could not be recorded")
            return ItemResult(target.name, Outcome.FAILED, f"{type(e).__name__}: {e}", seconds=time.monotonic() - started,
                              failure=failure_kind_of(e))
        return _Pending(target, head, image, config_bytes, config, placement, known, damage, started)

    def _result(self, p: "_Pending", published: Published) -> ItemResult:
        known, image, damage = p.known, p.image, p.damage
        if known is None or known.manifest_digest is None:
            outcome = Outcome.NEW
        elif known.manifest_digest != image.manifest_digest or damage is not None:
            outcome = Outcome.UPDATED  # or repaired: its content was incomplete
        else:
            outcome = Outcome.UNCHANGED  # e.g. an index changed but not this platform's image
        n = len(image.layers)
        detail = f"{image.manifest_digest[:19]}, {n} layer{'' if n == 1 else 's'}" + (
            f"; repaired: {damage}" if damage is not None else "")
        return ItemResult(p.target.name, outcome, detail, published.layers_fetched,
                          published.bytes_fetched + len(p.config_bytes), time.monotonic() - p.started)

    def _variant(self, target: Target, is_index: bool) -> bool:
        """Is the tag's public link a variant link (names.public_link_target)? On a backend whose
        clients expand variables, for the default platform of a tag that points at an index and
        that this run also publishes for another Linux platform: as DUCC's multi-arch mode."""
        assert self.backend is not None
        return (self.backend.variant_links and target.default and is_index
                and _ref_key(target.reference) in self._multi_refs)

    def _link_current(self, target: Target, placement: Placement, config_digest: str | None,
                      is_index: bool = False) -> bool:
        """Is the tag's public link what this run would write? It changes with the wishlist:
        a plain link where the tag became multi-platform, or the reverse (_variant)."""
        if config_digest is None:
            return False
        registry, repository, tag = target.reference.link_components
        link = placement.layout.link_path(registry, repository, tag)
        return readlink(link) == public_link_target(placement.layout, registry, repository, tag, str(target.platform),
                                                    config_digest, variant=self._variant(target, is_index))

    def _podman_current(self, target: Target, placement: Placement, config_digest: str | None) -> bool:
        """Does the podman store have the image under the tag's names (its images.json, read
        once per run)? Store entries are written after the state records the image
        (``_flush_podman``), so a run killed in between leaves tags the next run publishes
        again here."""
        if not self.options.podman_store or self.podman_batch is None:
            return True
        if config_digest is None:
            return False
        names = self._store_names(placement).get(parse_digest(config_digest).hex)
        return names is not None and names.issuperset(podman_names(target.reference))

    def _store_names(self, placement: Placement) -> dict[str, set[str]]:
        """images.json of the placement's store as image id -> names, read once per run
        (and again after a flush); an unreadable one is empty (every tag is published again,
        and writing the store reports the problem)."""
        root = placement.layout.podman_store
        if root not in self._podman_names:
            from publisher.write.podman_store import PodmanStoreError

            try:
                images = PodmanStore(placement.layout).images()
            except (PodmanStoreError, ValueError, OSError) as e:
                log.warning("podman store %s: %s", root, e)
                images = []
            self._podman_names[root] = {str(i.get("id")): set(i.get("names") or ()) for i in images}
        return self._podman_names[root]

    def _resolve(self, target: Target, head: str) -> ResolvedImage | None:
        """The image for the platform, read by the digest the HEAD returned (so a tag
        moving meanwhile cannot mix two images); None when an index lacks a
        non-default platform."""
        try:
            return self.client.resolve(target.reference.with_digest(head), target.platform)
        except PlatformNotInIndex:
            if not target.default:
                return None
            raise


@dataclass(eq=False)
class _Pending:
    """A target to publish: resolved, its config fetched; ``staged`` once its layers are."""

    target: Target
    head: str
    image: ResolvedImage
    config_bytes: bytes
    config: dict
    placement: Placement
    known: TagRecord | None
    damage: str | None
    started: float
    staged: "Staged | None" = None


def _layer_metadata(digest: str, diff_id: str, diff_size: int, whiteouts: str | None,
                    parent_chain: str | None) -> "LayerMetadata":
    """What a layer's layers.json says, as the state recorded it (a trusted layer)."""
    from cvmfs_common.repo.metadata import LayerMetadata  # (late: see Converter.publisher)

    return LayerMetadata(parse_digest(diff_id).hex, digest, diff_id, diff_size, whiteouts,  # type: ignore[arg-type]
                         parent_chain=parent_chain)


def _config_matches(config: dict, platform: Platform) -> bool:
    os_name, arch = config.get("os"), config.get("architecture")
    if not os_name or not arch:
        return True  # nothing to contradict
    return platform.matches(Platform(str(os_name), str(arch), config.get("variant") or None))


def convert(entries: Sequence[WishlistEntry], default_platform: Platform | None, *, root: Path, state_db: Path,
            client: RegistryClient, options: ConvertOptions, progress: Progress, command: str,
            backend: Backend | None = None, thin: "ThinSettings | None" = None) -> Summary:
    """Lock, recover (backend: clean ``.tmp/``, abort a transaction a crash left open),
    run, and return the summary.

    ``default_platform`` None: the one the repository already has (else the host's);
    entries without platforms get the default one. ``thin``: push thin images
    (publisher/sync/thin.py) for the default platform's images."""
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    backend = backend or Backend(root)
    layout = RepositoryLayout(root, durable=backend.durable_renames)
    options = replace(options, whiteouts=backend.whiteouts)
    with exclusive(lock_path_for(state_db)), exclusive_repository(root):
        removed = backend.start(layout)
        if removed:
            log.info("removed %d unfinished work dirs from %s (an earlier run was interrupted)", removed,
                     layout.tmp_dir)
        with State.open(state_db, root) as state:
            if default_platform is None:
                recorded = state.default_platform(None)
                default_platform = Platform.parse(recorded) if recorded else Platform.host()
            state.default_platform(str(default_platform))
            entries = [e if e.platforms else replace(e, platforms=(default_platform,)) for e in entries]
            post_item = None
            if thin is not None:
                post_item = ThinPublisher(thin, state, layout, client.insecure_registries).after_item
            return Converter(layout, state, client, options, progress, backend, post_item).run(
                entries, default_platform, command)
