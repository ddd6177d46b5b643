"""A task load that fails transiently is retried, never refused for good (issue 31, item 5).

A real ``ClassificationService`` on a real vLLM engine (tiny Llama, eager, one task row) over a
real LanceDB store whose tables are made unreadable on disk and then readable again: a table
directory moved away (the table is missing) and a table's data files moved away (Lance fails
with an IO error). A failure that outlasts the retries is a 503 that the next request retries;
only what no retry changes (a run made with another model, a run whose rows are gone) is refused.
"""

from __future__ import annotations

import gc
import logging
import threading
from collections.abc import Iterator
from pathlib import Path

import pytest
from serving_helpers import SHORT_TEXTS, TASKS, engine_args, publish_run, published_store, start_engine

from ifedicl.serving.domain_errors import RunRefused, TaskNotFound, TaskUnavailable
from ifedicl.serving.service import ClassificationService
from ifedicl.storage import schema

pytestmark = [pytest.mark.vllm, pytest.mark.usefixtures("model_worker_in_the_engine_core")]

TEXTS = SHORT_TEXTS[:2]
BACKOFF_S = 0.2  # attempts 0.2, 0.4, 0.8 s apart: 1.4 s of retrying in all
HIDDEN = 128  # the serving models' hidden size: their vectors live in context_vectors_d128


@pytest.fixture(scope="module")
def store_uri(tmp_path_factory, serving_models) -> str:
    """sst2 (resident after start), subj and agnews (loaded on use); mr made with another model."""
    uri = tmp_path_factory.mktemp("retry-store") / "store"
    store = published_store(uri, serving_models["llama"], ("sst2", "subj", "agnews"), first_seed=800)
    publish_run(store, serving_models["qwen2"], TASKS["mr"], seed=810)
    return str(uri)


@pytest.fixture(scope="module")
def service(store_uri, serving_models, loop_thread) -> Iterator[ClassificationService]:
    engine = loop_thread.run(start_engine(engine_args(serving_models["llama"], enforce_eager=True, max_slots=1)))
    svc = ClassificationService(
        engine, str(serving_models["llama"]), store_uri, max_slots=1, load_attempts=4, load_backoff_s=BACKOFF_S
    )
    loop_thread.run(svc.start())
    yield svc
    engine.shutdown()
    del svc, engine
    gc.collect()


def _moved(path: Path) -> Path:
    aside = path.with_name(path.name + ".aside")
    path.rename(aside)
    return aside


def classify(service: ClassificationService, loop_thread, task: str):
    return loop_thread.run(service.classify(task, TEXTS), timeout=300)


def evict(service: ClassificationService, task: str) -> None:
    """Take ``task``'s tables out of the engine's row, so its next request reads the store."""
    service.tasks.remove(task)


def test_a_table_missing_for_a_moment_is_ridden_out_by_the_retries(service, store_uri, loop_thread, caplog):
    evict(service, "subj")
    table = Path(store_uri) / f"{schema.vectors_table_name(HIDDEN)}.lance"
    aside = _moved(table)
    restore = threading.Timer(0.5, aside.rename, args=(table,))  # back before the third attempt
    restore.start()
    try:
        with caplog.at_level(logging.WARNING, logger="ifedicl.serving"):
            result = classify(service, loop_thread, "subj")
    finally:
        restore.join()
    assert result.run_id == service.catalog["subj"].run_id and len(result.scores) == len(TEXTS)
    assert "load attempt 1/4 failed (StoreUnavailable" in caplog.text and "is missing from store" in caplog.text
    assert [task for task, _ in service.tasks._refused] == ["mr"]  # refused at start: another model


def test_a_failure_outlasting_the_retries_is_a_503_and_not_cached_as_refused(service, store_uri, loop_thread):
    evict(service, "agnews")
    data = Path(store_uri) / f"{schema.vectors_table_name(HIDDEN)}.lance" / "data"
    aside = _moved(data)  # the table is listed, its files are gone: Lance raises an IO error on read
    try:
        with pytest.raises(TaskUnavailable) as refused:
            classify(service, loop_thread, "agnews")
    finally:
        aside.rename(data)
    run_id = service.catalog["agnews"].run_id
    assert service.tasks.refusal(service.catalog["agnews"]) is None  # before: refused until the server restarted
    assert not isinstance(refused.value, RunRefused)  # both are a 503 (serving.api.HTTP_ERRORS)
    assert "its tables are unavailable right now" in refused.value.message
    assert "not refused, retry shortly" in refused.value.message and "StoreUnavailable" in refused.value.message
    result = classify(service, loop_thread, "agnews")  # the store is back: the next request loads it
    assert result.run_id == run_id and len(result.scores) == len(TEXTS)


def test_only_permanent_errors_are_refused_with_a_clear_message(service, store_uri, loop_thread, caplog):
    with caplog.at_level(logging.WARNING, logger="ifedicl.serving"):
        report = loop_thread.run(service.reload())  # mr was refused at start and stays refused, not retried
        assert "ModelMismatchError" in report.failed["mr"] and "was made with another model" in report.failed["mr"]
        assert "mr" not in service.catalog
        with pytest.raises(TaskNotFound, match="The model `mr` does not exist"):
            classify(service, loop_thread, "mr")

        # a published run whose rows are gone: refused at once, no retries, and not asked again
        run_id = service.catalog["subj"].run_id
        evict(service, "subj")
        vectors = service.store.db.open_table(schema.vectors_table_name(HIDDEN))
        vectors.delete(f"run_id = '{run_id}'")
        with pytest.raises(RunRefused) as gone:
            classify(service, loop_thread, "subj")
        assert "its published run cannot be served" in gone.value.message and "0 vector rows" in gone.value.message
        assert "0 vector rows" in service.tasks.refusal(service.catalog["subj"])
        with pytest.raises(RunRefused, match="its published run cannot be served"):
            classify(service, loop_thread, "subj")
    assert f"run {run_id} of task subj: load attempt" not in caplog.text  # a permanent error is not retried
