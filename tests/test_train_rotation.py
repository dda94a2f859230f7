"""`jobs/train_rotation.py`'s data splits: patient-disjoint, lateral films spread over every side."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest

JOB = Path(__file__).resolve().parents[1] / "jobs" / "train_rotation.py"


@pytest.fixture(scope="module")
def job():
    spec = importlib.util.spec_from_file_location("train_rotation", JOB)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _films(n_patients: int = 60, seed: int = 3) -> tuple[np.ndarray, np.ndarray]:
    """1-3 films per patient; a fifth of the patients also have a lateral film."""
    rng = np.random.default_rng(seed)
    patients, lateral = [], []
    for p in range(n_patients):
        films = int(rng.integers(1, 4))
        patients += [f"p{p}"] * films
        lateral += [p % 5 == 0 and i == films - 1 for i in range(films)]
    return np.array(patients), np.array(lateral)


def test_validation_split_keeps_patients_whole(job):
    patients, lateral = _films()
    val = job.patient_split(patients, lateral, seed=0)
    assert not set(patients[val]) & set(patients[~val])
    assert lateral[val].any() and lateral[~val].any()
    assert 0.15 < val.mean() < 0.35
    np.testing.assert_array_equal(val, job.patient_split(patients, lateral, seed=0))  # reproducible


@pytest.mark.parametrize("k", [2, 4])
def test_cv_folds_are_patient_disjoint_and_cover_every_film(job, k):
    patients, lateral = _films()
    fold = job.patient_folds(patients, lateral, k, seed=0)
    assert set(fold) == set(range(k))
    for f in range(k):
        assert not set(patients[fold == f]) & set(patients[fold != f])
        assert lateral[fold == f].any()  # every fold validates some lateral films
    sizes = np.bincount([fold[list(patients).index(p)] for p in sorted(set(patients))], minlength=k)
    assert sizes.max() - sizes.min() <= 2  # patients dealt out evenly
