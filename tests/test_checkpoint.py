"""Checkpoints: a killed fit resumes and ends where an uninterrupted one does; foreign ones are refused."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import scipy.sparse as sp

from pnmf import PNMF, make_counts
from pnmf.natural import NaturalTrainer
from tests.conftest import BACKENDS

CHILD = """
import sys
from pnmf import PNMF, make_counts
x, _, _ = make_counts(600, 200, 6, random_state=1)
PNMF(6, mode="lower-bound", training_mode="natural", dtype="float64", backend="numpy", random_state=0,
     tol=0, max_iter=3000, checkpoint=sys.argv[1], checkpoint_every=50).fit(x)
print("finished")
"""


def test_a_killed_fit_resumes_from_its_checkpoint_and_ends_where_an_uninterrupted_fit_does(tmp_path, monkeypatch):
    path = tmp_path / "fit.npz"
    child = subprocess.Popen([sys.executable, "-c", CHILD, str(path)], stdout=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 60
    while not path.exists() and child.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    child.send_signal(signal.SIGKILL)
    child.wait()
    assert "finished" not in child.stdout.read(), "the fit ended before it could be killed"
    with np.load(path) as saved:
        done = len(saved["history"])
    assert 0 < done < 3000 and done % 50 == 0

    steps = []
    original = NaturalTrainer.step
    monkeypatch.setattr(NaturalTrainer, "step", lambda self, *a: steps.append(1) or original(self, *a))
    x, _, _ = make_counts(600, 200, 6, random_state=1)
    params = dict(mode="lower-bound", training_mode="natural", dtype="float64", backend="numpy", random_state=0, tol=0)
    resumed = PNMF(6, max_iter=3000, checkpoint=path, checkpoint_every=50, **params).fit(x)
    assert len(steps) == 3000 - done  # it went on from the checkpoint
    monkeypatch.setattr(NaturalTrainer, "step", original)
    whole = PNMF(6, max_iter=3000, **params).fit(x)
    np.testing.assert_allclose(resumed.loadings_, whole.loadings_, rtol=1e-8)
    np.testing.assert_allclose(resumed.mean_, whole.mean_, rtol=1e-8, atol=1e-12)
    np.testing.assert_allclose(resumed.elbo_history_, whole.elbo_history_, rtol=1e-12)
    assert resumed.n_iter_ == whole.n_iter_ == 3000


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize(
    "mode, training",
    [("expanded", "natural"), ("simple", "standard"), ("lower-bound", "natural"), ("expanded", "standard")],
)
def test_a_fit_continued_from_its_checkpoint_is_the_uninterrupted_fit(tmp_path, backend, mode, training):
    # The Monte Carlo noise resumes where it was: the same draws, so the same fit.
    x, _, _ = make_counts(60, 30, 3, random_state=2)
    params = dict(mode=mode, training_mode=training, backend=backend, device="cpu", random_state=0, tol=0, E=4)
    path = tmp_path / "fit.npz"
    PNMF(3, max_iter=60, checkpoint=path, checkpoint_every=20, **params).fit(x)
    resumed = PNMF(3, max_iter=130, checkpoint=path, checkpoint_every=20, **params).fit(x)
    whole = PNMF(3, max_iter=130, **params).fit(x)
    np.testing.assert_array_equal(resumed.elbo_history_, whole.elbo_history_)
    np.testing.assert_array_equal(resumed.loadings_, whole.loadings_)


def test_a_minibatch_fit_resumes_too(tmp_path):
    x, _, _ = make_counts(300, 40, 3, random_state=2)
    params = dict(mode="lower-bound", training_mode="natural", backend="numpy", random_state=0, tol=0, batch_size=64)
    path = tmp_path / "fit.npz"
    PNMF(3, max_iter=30, checkpoint=path, checkpoint_every=10, **params).fit(x)
    resumed = PNMF(3, max_iter=70, checkpoint=path, checkpoint_every=10, **params).fit(x)
    whole = PNMF(3, max_iter=70, **params).fit(x)
    np.testing.assert_array_equal(resumed.elbo_history_, whole.elbo_history_)
    np.testing.assert_allclose(resumed.loadings_, whole.loadings_, rtol=1e-12)
    # With tol > 0 the stopping rule's readings are part of the state: stopped before its
    # first possible stop (SETTLE), the fit resumes and stops where an uninterrupted one does.
    params.update(tol=1e-3)
    path.unlink()
    PNMF(3, max_iter=100, checkpoint=path, checkpoint_every=10, **params).fit(x)
    resumed = PNMF(3, max_iter=1000, checkpoint=path, checkpoint_every=10, **params).fit(x)
    whole = PNMF(3, max_iter=1000, **params).fit(x)
    assert resumed.converged_ and 150 <= resumed.n_iter_ == whole.n_iter_ < 1000
    np.testing.assert_array_equal(resumed.elbo_history_, whole.elbo_history_)
    np.testing.assert_allclose(resumed.loadings_, whole.loadings_, rtol=1e-12)


def test_a_state_written_whole_but_not_renamed_is_resumed_and_a_half_written_one_ignored(tmp_path, monkeypatch):
    x, _, _ = make_counts(60, 30, 3, random_state=2)
    params = dict(mode="lower-bound", training_mode="natural", backend="numpy", random_state=0, tol=0)
    path, partial = tmp_path / "fit.npz", tmp_path / "fit.npz.partial"
    PNMF(3, max_iter=20, checkpoint=path, checkpoint_every=10, **params).fit(x)
    at_20 = path.read_bytes()
    PNMF(3, max_iter=30, checkpoint=path, checkpoint_every=10, **params).fit(x)
    path.rename(partial)  # killed between writing its state at 30 and renaming it
    path.write_bytes(at_20)
    steps = []
    original = NaturalTrainer.step
    monkeypatch.setattr(NaturalTrainer, "step", lambda self, *a: steps.append(1) or original(self, *a))
    resumed = PNMF(3, max_iter=50, checkpoint=path, checkpoint_every=10, **params).fit(x)
    assert len(steps) == 20 and not partial.exists()
    partial.write_bytes(b"half of a state")  # killed while writing: the checkpoint at 50 stands
    again = PNMF(3, max_iter=60, checkpoint=path, checkpoint_every=10, **params).fit(x)
    assert len(steps) == 30
    monkeypatch.setattr(NaturalTrainer, "step", original)
    whole = PNMF(3, max_iter=60, **params).fit(x)
    np.testing.assert_array_equal(resumed.elbo_history_, whole.elbo_history_[:50])
    np.testing.assert_array_equal(again.loadings_, whole.loadings_)


def test_a_checkpoint_of_other_data_or_parameters_is_refused(tmp_path):
    x, _, _ = make_counts(60, 30, 3, random_state=2)
    path = tmp_path / "fit.npz"
    common = dict(mode="lower-bound", training_mode="natural", backend="numpy", random_state=0, tol=0)
    PNMF(3, max_iter=20, checkpoint=path, checkpoint_every=10, **common).fit(x)
    before = path.read_bytes()
    other = x.copy()
    other[0, 0] += 1
    with pytest.raises(ValueError, match="belongs to another fit.*data"):
        PNMF(3, max_iter=40, checkpoint=path, checkpoint_every=10, **common).fit(other)
    with pytest.raises(ValueError, match="belongs to another fit.*params"):
        PNMF(3, max_iter=40, checkpoint=path, checkpoint_every=10, prior_scale=2.0, **common).fit(x)
    assert path.read_bytes() == before  # left as it was
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(ValueError, match="not a pnmf checkpoint"):
        PNMF(3, max_iter=40, checkpoint=path, **common).fit(x)
    with open(path, "wb") as file:  # one array where the checkpoint was
        np.save(file, x)
    with pytest.raises(ValueError, match="not a pnmf checkpoint .*one array"):
        PNMF(3, max_iter=40, checkpoint=path, **common).fit(x)
    counts = tmp_path / "counts.npz"  # another program's archive (SciPy's sparse counts)
    sp.save_npz(counts, sp.csr_matrix(x))
    before = counts.read_bytes()
    with pytest.raises(ValueError, match=r"counts\.npz is not a pnmf checkpoint: an \.npz archive of .*indptr"):
        PNMF(3, max_iter=40, checkpoint=counts, **common).fit(x)
    model = PNMF(3, max_iter=5, **common).fit(x).save(tmp_path / "model.npz")  # a model, not a checkpoint
    with pytest.raises(ValueError, match="model.npz is not a pnmf checkpoint: no 'pnmf-checkpoint' metadata"):
        PNMF(3, max_iter=40, checkpoint=model, **common).fit(x)
    assert counts.read_bytes() == before


def test_checkpoint_parameters_are_checked(tmp_path):
    x, _, _ = make_counts(20, 10, 2, random_state=0)
    with pytest.raises(ValueError, match="checkpoint_every=0"):
        PNMF(2, checkpoint="a.npz", checkpoint_every=0).fit(x)
    with pytest.raises(TypeError, match="checkpoint=3"):
        PNMF(2, checkpoint=3).fit(x)
    # A folder that does not exist was found at the first checkpoint, a fit's 100 iterations in.
    with pytest.raises(ValueError, match="its folder does not exist"):
        PNMF(2, checkpoint=tmp_path / "none" / "fit.npz").fit(x)


@pytest.mark.parametrize("batch_size", [None, 64], ids=["full", "mini-batch"])
def test_a_fit_with_batches_resumes_and_refuses_other_batches(tmp_path, batch_size):
    """g is part of the saved state; other batch labels or size factors are other data."""
    x, _, _ = make_counts(300, 40, 3, random_state=2)
    labels = np.array(["a", "b", "c"])[np.arange(300) % 3]
    params = dict(mode="lower-bound", training_mode="natural", backend="numpy", random_state=0, tol=0)
    params.update(size_factors="total", batch_size=batch_size)
    path = tmp_path / "fit.npz"
    PNMF(3, max_iter=30, checkpoint=path, checkpoint_every=10, **params).fit(x, batch=labels)
    resumed = PNMF(3, max_iter=70, checkpoint=path, checkpoint_every=10, **params).fit(x, batch=labels)
    whole = PNMF(3, max_iter=70, **params).fit(x, batch=labels)
    np.testing.assert_array_equal(resumed.elbo_history_, whole.elbo_history_)
    np.testing.assert_allclose(resumed.loadings_, whole.loadings_, rtol=1e-12)
    np.testing.assert_allclose(resumed.batch_effects_, whole.batch_effects_, rtol=1e-12)
    with pytest.raises(ValueError, match="belongs to another fit.*rows"):
        PNMF(3, max_iter=90, checkpoint=path, checkpoint_every=10, **params).fit(x, batch=np.roll(labels, 1))
