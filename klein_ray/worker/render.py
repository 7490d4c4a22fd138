"""The render worker: keeps one variant loaded and turns work units into committed rows.

Plain Python: ``executors.ray_cluster`` runs it as a Ray actor, ``executors.inprocess`` on threads. For
each unit: fetch references, render, then per row encode and commit through the ledger. Several
units run through one worker at once (threads). Only the model is serialised, on the worker's
one model thread, which also loaded it (``worker.threads``: torch's CPU threads stay fast only
while one thread makes the torch calls); each unit's images are encoded on a pool sized to the
worker's CPUs. So fetching and decoding the next unit's references, and encoding and
uploading the last unit's images, overlap the render. Every row ends as a ``RowResult`` or a
``RowError`` naming its stage; one bad row never sinks the unit's other rows once rendering
succeeded.

A worker is built from its parts (``RenderWorker(spec, model, ...)``: a model already in memory,
as the GPU benchmark's full-size ones are); ``RenderWorker.load(spec)`` is the one that does the
I/O first (resolve and sync the model source, load it on the model thread, warm it up).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from concurrent.futures import Future
from dataclasses import replace
from typing import Any

from klein_ray.assets import adapters as adapter_files
from klein_ray.assets import modelsource
from klein_ray.assets.adapters import AdapterFile
from klein_ray.assets.compilecache import CompileCache
from klein_ray.assets.references import Reference, ReferenceError, ReferenceFetcher
from klein_ray.output.lease import newer_epoch
from klein_ray.output.ledger import Ledger
from klein_ray.output.markers import CommittedRow
from klein_ray.output.record import ModelFacts, RenderFacts, fingerprint, row_metadata, row_setup, setup_digest
from klein_ray.storage import StorageError, open_store
from klein_ray.types import CONTENT_TYPES, RowError, RowResult, RowSpec, UnitOutcome, WorkUnit
from klein_ray.worker.encode import ReferenceThumbnails, encode_image, make_thumbnail
from klein_ray.worker.spec import WorkerSpec
from klein_ray.worker.threads import ModelThread, encoder_pool

log = logging.getLogger(__name__)


class RenderWorker:
    """One variant's model and everything a unit needs around it. ``model`` is a
    ``klein_ray.model.pipeline.KleinModel``; ``thread`` the model thread it was loaded on (a new
    one if None); ``test_model``: its weights are random (every row's metadata says its image is
    noise); ``node``: the Ray node it runs on, named in every row's ``worker``."""

    def __init__(self, spec: WorkerSpec, model: Any, *, thread: ModelThread | None = None,
                 load_seconds: float = 0.0, warmup: dict | None = None, test_model: bool = False,
                 node: str = "", adapters: dict[str, AdapterFile] | None = None):
        self.spec, self.model = spec, model
        self._model_thread = thread or ModelThread(f"klein-ray-model-{spec.variant}")
        self.load_seconds, self.warmup, self.test_model = load_seconds, warmup or {}, test_model
        self.ledger = Ledger(open_store(spec.output_uri, spec.config.storage), epoch=spec.epoch)
        self.adapter_files = adapters or {}  # the variant's LoRA files, as loaded (for the records)
        self.identities = dict(spec.adapter_identities)
        # What its rows are rendered under: the variant's setup, extended by a row's adapters.
        self.setup = setup_digest(spec.config, spec.variant, spec.source, self.identities)
        self.fetcher = ReferenceFetcher(spec.config.references, spec.config.storage)
        self.name = f"{socket.gethostname()}:{os.getpid()}" + (f"@node:{node}" if node else "")
        self._encoders = encoder_pool(spec.threads, f"klein-ray-encode-{spec.variant}")
        self._reference_thumbs = ReferenceThumbnails()  # the review sheet shows what an edit was made from

    @classmethod
    def load(cls, spec: WorkerSpec, node: str = "") -> RenderWorker:
        """Resolve and sync the variant's model source, load it on the model thread, warm it
        up, and log where and how it runs."""
        _quiet_model_libraries()
        # Imported here, not at the top: the driver's process imports this module (to define
        # the Ray actor) and should not pay for torch and diffusers.
        from klein_ray.model.accel import GPUSettings
        from klein_ray.model.adapters import Adapter
        from klein_ray.model.pipeline import KleinModel

        # 1. Where the weights are: a local directory (an s3:// source synced once per node).
        vcfg = spec.config.variants[spec.variant]
        started = time.perf_counter()
        local = modelsource.resolve(spec.source, spec.config.run.cache_dir, spec.config.storage)
        transformer = vcfg.transformer and modelsource.resolve_file(
            vcfg.transformer, spec.config.run.cache_dir, spec.config.storage)
        known = dict(spec.adapter_identities)  # what the driver read: every row's setup names it
        files = {name: adapter_files.resolve(name, acfg, spec.config.run.cache_dir, spec.config.storage,
                                             known.get(name)) for name, acfg in vcfg.adapters.items()}

        # 2. Loaded on the thread that will make every render call, so that the process has one
        #    thread with torch's CPU threads behind it (set_num_threads is per thread, too).
        settings = GPUSettings(compile=_auto(vcfg.compile), channels_last=_auto(vcfg.channels_last),
                               cpu_offload=vcfg.cpu_offload, precision=vcfg.precision)
        thread = ModelThread(f"klein-ray-model-{spec.variant}")
        model = thread.run(KleinModel.from_pretrained, local, pipeline=vcfg.pipeline, dtype=vcfg.dtype,
                           threads=spec.threads, prompt_cache=vcfg.prompt_cache, settings=settings,
                           transformer_file=transformer, always=tuple(vcfg.always),
                           adapters=tuple(Adapter(f.name, f.path, f.scale) for f in files.values()))

        # 3. Compiled for the job's sizes before the first unit, then described in the log.
        warmup = thread.run(warm_up, spec, model)
        worker = cls(spec, model, thread=thread, load_seconds=time.perf_counter() - started,
                     warmup=warmup, test_model=modelsource.is_test_model(spec.source), node=node,
                     adapters=files)
        log_loaded(worker.describe())  # (on Ray, the executor logs it where the driver's log goes)
        return worker

    def describe(self) -> dict:
        info = self.model.info
        return {"worker": self.name, "variant": self.spec.variant, "distilled": info.distilled,
                "pipeline": info.pipeline_class, "device": info.device, "dtype": info.dtype,
                "load_seconds": round(self.load_seconds, 3), "settings": self.model.settings,
                "accel": self.model.accel_report, "warmup": self.warmup}

    def render_unit(self, unit: WorkUnit) -> UnitOutcome:
        from klein_ray.model.pipeline import ModelInputError, RenderRequest

        outcome = UnitOutcome(unit.unit_id)
        timings: dict[str, float] = {}

        # 0. Rows committed since the driver's checkpoint was written are done: never redo them.
        if not self.spec.output_was_empty:
            try:
                unit, outcome.results = self._drop_committed(unit)
            except StorageError as exc:  # the output cannot be read: every row's store failed
                outcome.errors = [RowError.from_exception(r, "store", exc, unit.attempt) for r in unit.rows]
                return outcome
            if not unit.rows:
                return outcome

        # 1. A run that took the output's lease since this worker's run started owns the rows
        #    now: render nothing more for the old one (its writes would be refused anyway).
        newer = self._newer_run()
        if newer:
            outcome.errors = [RowError.for_row(r, "store", "Superseded", newer, unit.attempt) for r in unit.rows]
            return outcome

        # 2. References, once for the whole unit (its rows share them).
        t0 = time.perf_counter()
        try:
            refs = [self.fetcher.fetch(uri) for uri in unit.references]
        except ReferenceError as exc:
            outcome.errors = [RowError.from_exception(r, "fetch", exc, unit.attempt) for r in unit.rows]
            return outcome
        timings["fetch"] = time.perf_counter() - t0

        # 3. Render the unit in one call, on the model thread. The other units in this worker
        #    (in_flight_per_actor calls at once) fetch, encode or upload meanwhile, and their
        #    renders queue behind this one.
        request = RenderRequest(
            prompts=[r.prompt for r in unit.rows], seeds=[r.seed for r in unit.rows],
            width=unit.width, height=unit.height, steps=unit.steps, guidance=unit.guidance,
            references=[r.image for r in refs],
            max_sequence_length=self.spec.config.variants[unit.variant].max_sequence_length,
            adapters=unit.adapters,
        )
        try:
            rendered, seconds = self._model_thread.run(self._render, request)
        except ModelInputError as exc:
            outcome.errors = [RowError.from_exception(r, "render", exc, unit.attempt) for r in unit.rows]
            return outcome
        timings["render"] = seconds / unit.size  # per image, time queued for the thread excluded

        # 4. Encode every row on the pool at once (the model thread is free for the next unit
        #    already), then commit each as its bytes are ready.
        encoded = [self._encoders.submit(self._encode, image, row.format)
                   for row, image in zip(unit.rows, rendered.images)]
        warnings = self._prompt_warnings(unit, rendered.prompt_tokens)
        sized = _size_warning(unit, refs, rendered.images[0]) if rendered.images else None
        if sized:
            log.info("unit %d: %s", unit.unit_id, sized)
            warnings = [w + [sized] for w in warnings]
        for row, image, job, warning in zip(unit.rows, rendered.images, encoded, warnings):
            result = self._commit_row(unit, row, image, job, refs, dict(timings), warning)
            if isinstance(result, RowError):
                outcome.errors.append(result)
            else:
                outcome.results.append(result)
        return outcome

    def _newer_run(self) -> str:
        """Why this worker's run no longer owns the output ('' while it does): the lease names
        a newer epoch. One small read per unit; a read that fails says nothing."""
        if not self.spec.epoch:
            return ""
        try:
            newer = newer_epoch(self.ledger.store, self.spec.epoch)
        except StorageError:
            return ""
        return f"a newer run (epoch {newer}) took the output's lease; this worker's run is over" if newer else ""

    def _render(self, request):
        """On the model thread: the model call and its duration."""
        t0 = time.perf_counter()
        rendered = self.model.render(request)
        return rendered, time.perf_counter() - t0

    def _encode(self, image, fmt: str) -> tuple[bytes, float, bytes]:
        """On the encoder pool: the row's file, the seconds it took, the report's thumbnail."""
        t0 = time.perf_counter()
        data = encode_image(image, fmt, self.spec.config.output)
        seconds = time.perf_counter() - t0
        return data, seconds, make_thumbnail(image)

    def _drop_committed(self, unit: WorkUnit) -> tuple[WorkUnit, list[RowResult]]:
        """Rows whose marker commits them (the ledger's predicate: marker AND image) with the
        values the row has now are done: never rendered again. A committed row whose values
        changed since (stale), or rendered under another setup when the job asks for it
        (outdated), is rendered again, replacing that commit at the marker's version judged."""
        todo, done = [], []
        for row in unit.rows:
            verdict = None if row.repair is not None else self.ledger.judge(row.id)
            if not isinstance(verdict, CommittedRow):
                todo.append(row)
                continue
            stale = verdict.inputs is not None and verdict.inputs != row.digest
            outdated = verdict.setup is not None and verdict.setup != self._setup_of(row.adapters)
            if stale or (outdated and self.spec.rerender_outdated):
                todo.append(replace(row, repair=verdict.marker_version))
                continue
            done.append(RowResult(
                id=row.id, variant=row.variant, image_key=verdict.image_key, meta_key=verdict.meta_key,
                sha256=verdict.sha256, bytes=verdict.bytes, width=0, height=0, seed=row.seed,
                prompt=row.prompt, timings={}, worker=self.name, already=True,
                inputs=verdict.inputs or "", setup=verdict.setup or ""))
        return replace(unit, rows=tuple(todo)), done

    def _prompt_warnings(self, unit: WorkUnit, counts: list[int]) -> list[list[str]]:
        """The pipeline cuts prompts at max_sequence_length silently; say so in the metadata."""
        limit = self.spec.config.variants[unit.variant].max_sequence_length
        return [[f"prompt is {n} tokens with the chat template; the text encoder reads the first "
                 f"{limit}, the rest was ignored"] if n > limit else [] for n in counts]

    def _commit_row(self, unit: WorkUnit, row: RowSpec, image, encoded: Future, refs: list[Reference],
                    timings: dict[str, float], warnings: list[str]) -> RowResult | RowError:
        try:
            data, timings["encode"], thumbnail = encoded.result()
        except Exception as exc:  # noqa: BLE001 - recorded as this row's error
            return RowError.from_exception(row, "encode", exc, unit.attempt)
        t0 = time.perf_counter()
        meta = row_metadata(unit, row, self._facts(), RenderFacts(
            width=image.width, height=image.height, steps=unit.steps or self.model.default_steps(),
            references=[{"uri": r.uri, "sha256": r.sha256, "bytes": r.bytes, "width": r.width,
                         "height": r.height} for r in refs],
            timings=timings, worker=self.name, warnings=warnings, adapters=self._adapter_records(unit)),
            self._setup_of(unit.adapters))
        try:
            receipt = self.ledger.commit(
                row.id, row.format, data, CONTENT_TYPES[row.format], meta,
                fingerprint=fingerprint(meta, self.spec.config), repair=row.repair,
                output_was_empty=self.spec.output_was_empty)
        except Exception as exc:  # noqa: BLE001 - any failure to store is this row's error
            return RowError.from_exception(row, "store", exc, unit.attempt)
        timings["store"] = time.perf_counter() - t0
        return RowResult(
            id=row.id, variant=row.variant, image_key=receipt.image_key, meta_key=receipt.meta_key,
            sha256=receipt.sha256, bytes=receipt.bytes, width=image.width, height=image.height,
            seed=row.seed, prompt=row.prompt, timings=timings, worker=self.name,
            thumbnail=thumbnail, already=receipt.already, inputs=row.digest,
            setup=self._setup_of(unit.adapters), reference_thumbnails=self._reference_thumbs.of(refs),
        )

    def _setup_of(self, adapters: tuple[tuple[str, float], ...]) -> str:
        return row_setup(self.setup, adapters, self.identities)

    def _adapter_records(self, unit: WorkUnit) -> list[dict]:
        """Each adapter a row was rendered with: its own (name, scale), then the variant's
        fused ``always`` ones, with the sha256 of the file loaded."""
        vcfg = self.spec.config.variants[unit.variant]
        used = [(n, s, False) for n, s in unit.adapters] + [(n, vcfg.adapters[n].scale, True) for n in vcfg.always]
        return [{"name": n, "scale": s, "always": fused,
                 "sha256": self.adapter_files[n].sha256 if n in self.adapter_files else None}
                for n, s, fused in used]

    def _facts(self) -> ModelFacts:
        info = self.model.info
        return ModelFacts(source=self.spec.source, pipeline=info.pipeline_class, distilled=info.distilled,
                          dtype=info.dtype, device=info.device, settings=self.model.settings,
                          versions=info.versions, test_model=self.test_model)


def _size_warning(unit: WorkUnit, refs: list[Reference], image) -> str | None:
    """A row that gives no size takes its first reference's; the pipeline makes it fit (sides
    floored to multiples of 16, about a megapixel at most). Say so when that changed it."""
    if unit.width is not None or unit.height is not None or not refs:
        return None
    first = refs[0]
    if (image.width, image.height) == (first.width, first.height):
        return None
    return (f"size taken from the first reference ({first.width}x{first.height}) and rendered at "
            f"{image.width}x{image.height}: sides are floored to multiples of 16 and large references "
            "scaled to about 1 megapixel; give width and height to choose the size")


def warm_up(spec: WorkerSpec, model) -> dict:
    """On the model thread, at load: seed the compile caches from run.compile_cache, compile for
    the planned sizes, and keep what was compiled anew for the next actor or job."""
    from klein_ray.model.accel import warmup_plan

    if not model.settings["compile"]:
        return {}
    cache, key = CompileCache(spec.config), model.artifact_key()
    data = cache.read(key)
    loaded = data is not None and model.load_compile_artifacts(data)
    vcfg = spec.config.variants[spec.variant]
    plan = warmup_plan(list(spec.warmup_sizes), vcfg.batch_size) if vcfg.warmup else []
    report = dict(model.warm_up(plan), artifacts_loaded=bool(loaded), artifacts_saved=False)
    if report["compiled"]:  # something new was compiled: keep it (an entry already there stays)
        artifacts = model.compile_artifacts()
        report["artifacts_saved"] = bool(artifacts) and cache.write(key, artifacts)
    return report


def log_loaded(info: dict) -> None:
    """One line (a ``worker_loaded`` event) for a worker's ``describe()``: where and how its
    model runs, and what its compile warm-up did."""
    log.info("variant %s: %s loaded its model in %.1f s on %s (%s)%s", info["variant"], info["worker"],
             info["load_seconds"], info["device"], _settings_text(info["settings"]),
             _warmup_text(info.get("warmup") or {}),
             extra={"event": "worker_loaded", "variant": info["variant"], "settings": info["settings"],
                    "warmup": info.get("warmup"), "load_seconds": info["load_seconds"]})


def _settings_text(settings: dict) -> str:
    on = [k for k in ("compile", "channels_last", "cpu_offload") if settings.get(k)]
    return ", ".join(on + (["fp8"] if settings.get("precision") == "fp8" else [])) or "eager"


def _warmup_text(report: dict) -> str:
    if not report:
        return ""
    cached = " from the compile cache" if report.get("artifacts_loaded") else ""
    return (f"; warm-up: {report['calls']} call(s) in {report['seconds']:.1f} s, {report['compiled']} "
            f"graph(s) compiled{cached}{', saved to the compile cache' if report.get('artifacts_saved') else ''}")


def _auto(value: bool | str) -> bool | None:
    """A config's ``True | False | "auto"`` as the model layer's ``True | False | None``."""
    return None if value == "auto" else bool(value)


def _quiet_model_libraries() -> None:
    """No progress bars or info chatter from the model libraries (read when they are first
    imported); a user's own setting wins."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("DIFFUSERS_VERBOSITY", "error")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
