"""The LanceDB store: bit-exact round trip, publish/rollback, model checks, missing store."""

import numpy as np
import pytest

from ifedicl.kernel.modeling import ModelFingerprint
from ifedicl.kernel.task import TaskSpec
from ifedicl.storage.store import ModelMismatchError, Store, StoreError

TASK = TaskSpec("t1", "Q: {text}\nA:", ("no", "yes"))
FP = ModelFingerprint("/models/tiny", 3, 128, "abc123")


def _complete_run(store: Store, seed: int, publish: bool = True) -> tuple[str, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    vectors = rng.normal(size=(3, 2, 128)).astype(np.float32)
    coeffs = rng.normal(size=(3, 2, 2)).astype(np.float32)
    run_id = store.start_run(TASK, FP, {"seed": seed})
    store.write_vectors(run_id, TASK.name, vectors)
    store.write_coefficients(run_id, TASK.name, 0, np.zeros_like(coeffs))
    store.write_coefficients(run_id, TASK.name, 1, coeffs)
    store.finish_run(run_id, {"accuracy": 0.5})
    if publish:
        store.publish(run_id)
    return run_id, vectors, coeffs


def test_round_trip_is_bit_exact(tmp_path):
    store = Store(tmp_path / "s", create=True)
    run_id, vectors, coeffs = _complete_run(store, 0)
    loaded = Store(tmp_path / "s").load_run("t1", expect=FP)
    assert loaded.run_id == run_id and loaded.round == 1 and loaded.task == TASK
    assert loaded.vectors.tobytes() == vectors.tobytes()
    assert loaded.coefficients.tobytes() == coeffs.tobytes()


def test_publish_and_rollback_move_the_tag(tmp_path):
    store = Store(tmp_path / "s", create=True)
    first, *_ = _complete_run(store, 0)
    second, *_ = _complete_run(store, 1)
    third, *_ = _complete_run(store, 2, publish=False)
    assert store.published_run_id("t1") == second
    assert store.rollback("t1") == first
    assert store.load_run("t1").run_id == first
    with pytest.raises(StoreError, match="no earlier published run"):
        store.rollback("t1")
    store.publish(third)
    assert store.published() == {"t1": third}
    assert store.load_run("t1", run_id=second).run_id == second  # any complete run stays loadable


def test_running_and_failed_runs_are_not_loadable_or_publishable(tmp_path):
    store = Store(tmp_path / "s", create=True)
    run_id = store.start_run(TASK, FP, {})
    with pytest.raises(StoreError, match="running"):
        store.publish(run_id)
    store.fail_run(run_id, "boom")
    with pytest.raises(StoreError, match="failed"):
        store.load_run("t1", run_id=run_id)
    with pytest.raises(StoreError, match="no published run"):
        store.load_run("t1")


@pytest.mark.parametrize(
    "other",
    [
        ModelFingerprint("/models/other", 3, 128, "abc123"),
        ModelFingerprint("/models/tiny", 4, 128, "abc123"),
        ModelFingerprint("/models/tiny", 3, 256, "abc123"),
    ],
)
def test_mismatched_model_is_refused(tmp_path, other):
    store = Store(tmp_path / "s", create=True)
    _complete_run(store, 0)
    with pytest.raises(ModelMismatchError, match="another model"):
        store.load_run("t1", expect=other)


def test_missing_store_is_a_clear_error(tmp_path):
    with pytest.raises(StoreError, match="does not exist"):
        Store(tmp_path / "nowhere")


def test_a_store_moved_away_after_opening_reads_empty_so_presence_is_checked_after_the_read(tmp_path):
    """LanceDB lists an opened store whose directory was moved away as a database with no tables: a reader
    that served that listing would unpublish every task, so readers call ``require_present`` after reading."""
    store = Store(tmp_path / "s", create=True)
    run_id, *_ = _complete_run(store, 0)
    assert set(store.published_runs()) == {"t1"}
    (tmp_path / "s").rename(tmp_path / "s.moved")
    assert store.published_runs() == {}  # the read alone cannot tell "moved" from "nothing published"
    with pytest.raises(StoreError, match="does not exist"):
        store.require_present()
    (tmp_path / "s.moved").rename(tmp_path / "s")
    store.require_present()
    assert store.published_runs()["t1"].run_id == run_id


@pytest.mark.parametrize("create", [False, True])
def test_a_store_path_that_is_a_file_is_a_clear_error(tmp_path, create):
    path = tmp_path / "store"
    path.write_bytes(b"not a store")
    for uri in (path, f"file://{path}"):
        with pytest.raises(StoreError, match="is a file, not a store directory"):
            Store(uri, create=create)
    assert path.read_bytes() == b"not a store"
