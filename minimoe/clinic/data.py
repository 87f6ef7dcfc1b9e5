"""The clinic: a synthetic data set on which routing genuinely pays.

Every patient (a token) arrives with a vector of ``n_symptoms`` real-valued
symptoms, and we must predict one of ``n_classes`` diagnoses. The catch is that
each patient belongs to one of ``n_specialties`` hidden *specialties*
(cardiology, ophthalmology, ...) and **the right diagnosis follows a different
rule in each specialty**. How the set is built, and why:

1. **Specialties are clusters a GP can tell apart.** Specialty s has a typical
   presentation, a centre ``μ_s`` in symptom space; its patients are
   ``x = μ_s + z`` with ``z ~ N(0, I)``. The centres are orthogonal and at
   radius ``R = 5 (1 − overlap)``, so with ``overlap = 0`` the clusters sit about
   7 standard deviations apart and a *linear* router (the GP) can refer almost
   every patient correctly. Raising ``overlap`` pulls the centres together until,
   at 1, the specialty is invisible in the symptoms.

2. **Each specialty needs its own nonlinear rule.** Within specialty s the
   diagnosis is ``argmax_c  tanh(z A_s + c_s) B_s − o_s`` with ``z = x − μ_s`` the
   patient's symptoms relative to the specialty's typical presentation and
   ``A_s (n_symptoms, rule_width)``, ``c_s``, ``B_s (rule_width, n_classes)``
   a random *teacher* network drawn independently per specialty; the offsets
   ``o_s`` make the diagnoses roughly equally common. Every teacher uses the same
   ``n_classes`` labels, but with unrelated meanings: what "diagnosis 2" looks
   like in cardiology says nothing about ophthalmology.

3. **So a small generalist is stretched thin, and a GP + specialists is not.**
   One FFN of width ``h`` must share its ``h`` hidden units among all
   ``n_specialties`` rules. A sparse MoE with ``E`` experts of the same total
   active width per patient gets, after routing, a whole expert per rule: the
   same compute per patient, ``E/k`` times the parameters. (The MoE still has to
   *discover* the specialties: nothing tells it about them.)

4. **Noise puts a ceiling on accuracy.** A fraction ``noise`` of the records
   has its diagnosis replaced by a uniformly random one, so the best possible
   accuracy is ``1 − noise · (n_classes − 1) / n_classes``.

The specialty labels are kept in every split **for analysis only** — to draw
which specialty each expert ends up serving. No model ever trains on them.

Everything is drawn from one seeded ``numpy.random.Generator``: the same
arguments give the same data, bit for bit.
"""
from __future__ import annotations

import sys
from typing import NamedTuple

import numpy as np

from ..validate import check_dtype, check_int, check_positive_float

__all__ = ["Split", "Rules", "ClinicData", "make_clinic", "diagnose", "bayes_accuracy"]

# Drawing the rules costs about 12 ms per specialty (2 cores): a progress bar, when asked for,
# appears only once the draw has taken this many seconds, so the usual few specialties stay quiet.
PROGRESS_DELAY_S = 2.0


class _SplitFields(NamedTuple):
    x: np.ndarray
    y: np.ndarray
    specialty: np.ndarray


class Split(_SplitFields):
    """One split of the clinic's records.

    Attributes:
        x: (N, n_symptoms) symptoms.
        y: (N,) int diagnoses in ``[0, n_classes)``.
        specialty: (N,) int hidden specialty in ``[0, n_specialties)`` —
            for analysis only, never for training.

    ``Split(x, y, specialty)`` checks that the three have one entry per patient: a ``y``
    one shorter than ``x`` would otherwise pair every later patient with a wrong label.
    """
    __slots__ = ()

    def __new__(cls, x, y, specialty):
        n = [np.shape(a)[0] if np.ndim(a) >= 1 else None for a in (x, y, specialty)]
        if n[0] is None:
            raise ValueError(f"Split: x must be an (N, n_symptoms) array, got shape {np.shape(x)}")
        for name, m in (("y", n[1]), ("specialty", n[2])):
            if m != n[0]:
                got = "a scalar" if m is None else f"{m} entries"
                raise ValueError(f"Split: x has {n[0]} patients but {name} has {got}; x, y and specialty "
                                 f"need one entry per patient")
        return super().__new__(cls, x, y, specialty)

    @classmethod
    def _make(cls, iterable):
        # namedtuple's own _make checks len(result) == 3, but len() here counts patients.
        return cls(*iterable)

    def __len__(self):
        return self.x.shape[0]


class Rules(NamedTuple):
    """Each specialty's diagnostic rule: ``argmax_c tanh(z A[s] + c[s]) B[s] − o[s]``."""
    A: np.ndarray   # (S, n_symptoms, rule_width)
    c: np.ndarray   # (S, rule_width)
    B: np.ndarray   # (S, rule_width, n_classes)
    o: np.ndarray   # (S, n_classes) offsets that balance the diagnoses


class ClinicData(NamedTuple):
    """The clinic: three splits plus the ground truth that generated them (for analysis only)."""
    train: Split
    val: Split
    test: Split
    n_symptoms: int
    n_classes: int
    n_specialties: int
    centers: np.ndarray      # (S, n_symptoms) each specialty's typical presentation
    rules: Rules             # each specialty's diagnostic rule
    noise: float
    overlap: float


def bayes_accuracy(noise, n_classes):
    """The best accuracy any model can reach when a fraction ``noise`` of labels is random."""
    return 1.0 - noise * (n_classes - 1) / n_classes


def _centers(n_specialties, n_symptoms, radius, rng):
    """Orthogonal centres at ``radius`` (random unit vectors if there are more specialties than symptoms)."""
    if n_specialties <= n_symptoms:
        q, _ = np.linalg.qr(rng.standard_normal((n_symptoms, n_symptoms)))
        dirs = q[:, :n_specialties].T
    else:
        dirs = rng.standard_normal((n_specialties, n_symptoms))
        dirs /= np.linalg.norm(dirs, axis=1, keepdims=True)
    return radius * dirs


def _scores(z, s, teacher):
    """Teacher scores (N, C) for local symptoms ``z`` (N, n_symptoms) of specialty ``s``."""
    return np.tanh(z @ teacher.A[s] + teacher.c[s]) @ teacher.B[s] - teacher.o[s]


def _make_teacher(n_specialties, n_symptoms, n_classes, rule_width, rng, bar=None):
    """One random two-layer tanh network per specialty, classes balanced on a reference sample.

    ``bar``: a tqdm bar advanced once per specialty (the balancing below is the slow part), or None.
    """
    S, d, m, C = n_specialties, n_symptoms, rule_width, n_classes
    # Weights N(0, 2/d): pre-activations of size ~1.4, so the tanh units bend
    # (they are neither linear nor saturated) over the typical patient.
    A = rng.standard_normal((S, d, m)) * np.sqrt(2.0 / d)
    c = rng.standard_normal((S, m)) * 0.5
    B = rng.standard_normal((S, m, C))
    teacher = Rules(A, c, B, np.zeros((S, C)))
    # Balance the diagnoses: nudge each class's offset until every class is
    # about equally common in a reference sample (a few steps of a simple
    # fixed-point iteration on the log-frequencies; vectorised over patients).
    z_ref = rng.standard_normal((4096, d))
    for s in range(S):
        for _ in range(50):
            counts = np.bincount(np.argmax(_scores(z_ref, s, teacher), axis=1), minlength=C)
            freq = (counts + 1.0) / (counts.sum() + C)
            teacher.o[s] += 0.5 * np.log(freq * C)
        if bar is not None:
            bar.update(1)
    return teacher


def _progress_bar(progress, total):
    """A tqdm bar over the specialties' rules (``None``: only on a terminal), shown only after
    :data:`PROGRESS_DELAY_S` seconds; or None for no bar."""
    if progress is None:
        progress = sys.stderr.isatty()
    if not progress:
        return None
    from tqdm.auto import tqdm
    return tqdm(total=total, desc="drawing the specialties' rules", unit="specialty", leave=False,
                delay=PROGRESS_DELAY_S, file=sys.stderr)


def _sample(n, centers, teacher, noise, n_classes, rng):
    S, d = centers.shape
    specialty = rng.integers(0, S, size=n)
    z = rng.standard_normal((n, d))
    x = centers[specialty] + z
    y = np.empty(n, dtype=np.int64)
    for s in range(S):                      # a loop over specialties, not patients
        idx = np.flatnonzero(specialty == s)
        y[idx] = np.argmax(_scores(z[idx], s, teacher), axis=1)
    flip = rng.random(n) < noise
    y[flip] = rng.integers(0, n_classes, size=int(flip.sum()))
    return x, y, specialty


def make_clinic(n_train=16000, n_val=2000, n_test=4000, *, n_symptoms=8, n_specialties=8,
                n_classes=4, rule_width=6, noise=0.05, overlap=0.0, seed=0, dtype=np.float64, progress=None):
    """Draw the clinic data set.

    Args:
        n_train, n_val, n_test: patients per split (train >= 1; val, test >= 0).
        n_symptoms: width of the symptom vector (>= 1).
        n_specialties: number of hidden specialties S (>= 1).
        n_classes: number of diagnoses C (>= 2).
        rule_width: hidden units of each specialty's teacher rule; bigger means
            a more intricate rule per specialty (>= 1).
        noise: fraction of records with a random diagnosis, in [0, 1].
        overlap: how much the specialties' clusters overlap, in [0, 1]
            (0: far apart, a linear GP can refer perfectly; 1: indistinguishable).
        seed: integer seed; the same arguments give the same data.
        dtype: float dtype of the symptoms.
        progress: a tqdm progress bar over the specialties' rules if the draw takes more than
            ``PROGRESS_DELAY_S`` seconds (about 12 ms per specialty, so a few hundred):
            True, False, or None (only when stderr is a terminal). It changes no number.

    Returns:
        :class:`ClinicData` with ``train``/``val``/``test`` :class:`Split` s.

    Example:
        >>> data = make_clinic(n_train=1000, seed=0)
        >>> data.train.x.shape, data.train.y.shape
        ((1000, 8), (1000,))
    """
    n_train = check_int("n_train", n_train, low=1)
    n_val = check_int("n_val", n_val, low=0)
    n_test = check_int("n_test", n_test, low=0)
    d = check_int("n_symptoms", n_symptoms, low=1)
    S = check_int("n_specialties", n_specialties, low=1)
    C = check_int("n_classes", n_classes, low=2)
    m = check_int("rule_width", rule_width, low=1)
    noise = check_positive_float("noise", noise, allow_zero=True)
    if noise > 1:
        raise ValueError(f"noise must be a fraction in [0, 1], got {noise!r}")
    overlap = check_positive_float("overlap", overlap, allow_zero=True)
    if overlap > 1:
        raise ValueError(f"overlap must be in [0, 1] (0: separate specialties, 1: indistinguishable), "
                         f"got {overlap!r}")
    seed = check_int("seed", seed, low=0)
    dtype = check_dtype("dtype", dtype)
    if not (progress is None or isinstance(progress, (bool, np.bool_))):
        raise TypeError(f"progress must be True, False or None, got {progress!r}")

    rng = np.random.default_rng(seed)
    centers = _centers(S, d, 5.0 * (1.0 - overlap), rng)
    bar = _progress_bar(progress, S)
    try:
        teacher = _make_teacher(S, d, C, m, rng, bar)
    finally:
        if bar is not None:
            bar.close()
    splits = []
    for n in (n_train, n_val, n_test):
        x, y, s = _sample(n, centers, teacher, noise, C, rng)
        splits.append(Split(x.astype(dtype), y, s))
    return ClinicData(*splits, n_symptoms=d, n_classes=C, n_specialties=S,
                      centers=centers.astype(dtype), rules=teacher, noise=noise, overlap=overlap)


def diagnose(data, x, specialty):
    """The noise-free diagnosis of patients x (N, n_symptoms) of the given specialties (N,) int.

    This is the ground-truth rule the records were drawn from (before label
    noise) — for analysis and lessons, e.g. to ask how well a *perfect* GP with
    perfect specialists would do.
    """
    x = np.asarray(x, dtype=np.float64)
    specialty = np.asarray(specialty)
    if x.ndim != 2 or x.shape[1] != data.n_symptoms:
        raise ValueError(f"x must have shape (N, {data.n_symptoms}), got {x.shape}")
    if specialty.shape != x.shape[:1] or not np.issubdtype(specialty.dtype, np.integer):
        raise ValueError(f"specialty must be an integer array of shape ({x.shape[0]},), got "
                         f"{specialty.dtype} {specialty.shape}")
    if specialty.size and (specialty.min() < 0 or specialty.max() >= data.n_specialties):
        raise ValueError(f"specialty must be in [0, {data.n_specialties}), got values from "
                         f"{specialty.min()} to {specialty.max()}")
    y = np.empty(x.shape[0], dtype=np.int64)
    for s in range(data.n_specialties):        # a loop over specialties, not patients
        idx = np.flatnonzero(specialty == s)
        y[idx] = np.argmax(_scores(x[idx] - data.centers[s], s, data.rules), axis=1)
    return y
