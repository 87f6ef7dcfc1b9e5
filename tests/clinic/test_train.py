"""The training loop: determinism, what the history records, and clear errors."""
import numpy as np
import pytest

from minimoe.clinic.data import Split, make_clinic
from minimoe.clinic.models import Ensemble, Generalist, SparseMoE
from minimoe.clinic.train import History, evaluate, load_cv, specialty_routing, train


@pytest.fixture(scope="module")
def data():
    return make_clinic(n_train=512, n_val=128, n_test=256, seed=0)


def small_moe(seed=0, **kw):
    return SparseMoE(8, 4, d_model=8, d_hidden=4, n_experts=4, k=2, rng=np.random.default_rng(seed), **kw)


def assert_same_history(a, b):
    for field in History.__dataclass_fields__:
        va, vb = getattr(a, field), getattr(b, field)
        assert len(va) == len(vb), field
        for x, y in zip(va, vb):
            np.testing.assert_array_equal(x, y, err_msg=field)


def test_same_seed_same_history(data):
    runs = [train(small_moe(), data.train, data.val, epochs=2, batch_size=64, seed=7, progress=False)
            for _ in range(2)]
    assert_same_history(*runs)
    assert runs[0].train_loss[0] != 0


def test_different_seed_different_history(data):
    a = train(small_moe(), data.train, data.val, epochs=1, batch_size=64, seed=1, progress=False)
    b = train(small_moe(), data.train, data.val, epochs=1, batch_size=64, seed=2, progress=False)
    assert a.train_loss != b.train_loss


def test_history_records_what_happened(data):
    model = small_moe()
    h = train(model, data.train, data.val, epochs=2, batch_size=64, seed=0, log_every=4, progress=False)
    # 512 patients / 64 = 8 steps per epoch, 16 steps, logged every 4
    assert h.step == [4, 8, 12, 16]
    assert h.epoch == [0.5, 1.0, 1.5, 2.0]
    n = len(h.step)
    for field in ("train_loss", "train_acc", "aux_loss", "val_loss", "val_acc", "load", "dropped"):
        assert len(getattr(h, field)) == n
    assert all(0 <= a <= 1 for a in h.train_acc + h.val_acc)
    assert all(a > 0 for a in h.aux_loss)                        # the balancing loss was recorded
    # each interval covered 4 steps × 64 patients × k=2 referrals, none dropped (no capacity)
    np.testing.assert_array_equal(h.load_array().sum(axis=1), [4 * 64 * 2] * 4)
    assert h.dropped == [0, 0, 0, 0]
    # the last validation numbers are exactly an eval-mode evaluation of the final model
    ev = evaluate(model, data.val)
    assert h.val_acc[-1] == ev["acc"] and h.val_loss[-1] == pytest.approx(ev["loss"])


def test_dropped_tokens_are_counted(data):
    h = train(small_moe(capacity_factor=0.5), data.train, epochs=1, batch_size=64, seed=0, progress=False)
    # capacity C = ceil(0.5·64·2/4) = 16 per expert, 64 of the 128 referrals fit: at least 64 dropped per step
    assert sum(h.dropped) >= 8 * 64
    assert h.load_array().sum() + sum(h.dropped) == 8 * 64 * 2


def test_training_learns(data):
    model = Generalist(8, 4, d_model=16, d_hidden=32, rng=np.random.default_rng(0))
    h = train(model, data.train, data.val, epochs=15, batch_size=64, seed=0, progress=False)
    assert h.train_loss[-1] < 0.8 * h.train_loss[0]
    assert h.val_acc[-1] > 0.35                                  # chance is 0.25


def test_dense_clinics_have_empty_loads(data):
    h = train(Ensemble(8, 4, 2, 8, 8), data.train, epochs=1, batch_size=128, seed=0, progress=False)
    assert h.load_array().shape == (len(h.step), 0)
    assert "load" not in evaluate(Generalist(8, 4), data.val)


def test_specialty_labels_are_never_used_in_training(data):
    scrambled = Split(data.train.x, data.train.y, np.full_like(data.train.specialty, -99))
    a = train(small_moe(), data.train, epochs=1, batch_size=64, seed=0, progress=False)
    b = train(small_moe(), scrambled, epochs=1, batch_size=64, seed=0, progress=False)
    assert_same_history(a, b)


def test_specialty_routing_counts(data):
    model = small_moe()
    counts = specialty_routing(model, data.test)
    assert counts.shape == (4, data.n_specialties)
    assert counts.sum() == 2 * len(data.test)                    # k = 2 referrals per patient
    np.testing.assert_array_equal(counts.sum(axis=0), 2 * np.bincount(data.test.specialty, minlength=8))
    with pytest.raises(ValueError, match="needs an MoE clinic"):
        specialty_routing(Generalist(8, 4), data.test)


def test_load_cv():
    assert load_cv([5, 5, 5, 5]) == 0.0
    assert load_cv([0, 0, 0, 8]) == pytest.approx(np.sqrt(3))   # std 3.46, mean 2
    assert load_cv([0, 0]) == 0.0


def test_progress_bar_can_be_on(data, capsys):
    h = train(small_moe(), data.train, epochs=1, batch_size=128, seed=0, progress=True, desc="clinic")
    assert len(h.step) > 0
    assert "clinic" in capsys.readouterr().err


def test_sgd_optimizer_option(data):
    h = train(small_moe(), data.train, epochs=1, batch_size=128, optimizer="sgd", lr=0.05, seed=0,
              progress=False)
    assert np.all(np.isfinite(h.train_loss))


@pytest.mark.parametrize("kwargs, exc, msg", [
    (dict(epochs=0), ValueError, "epochs must be >= 1"),
    (dict(batch_size=0), ValueError, "batch_size must be >= 1"),
    (dict(lr=-1.0), ValueError, "lr must be a finite number > 0"),
    (dict(optimizer="lbfgs"), ValueError, "optimizer must be one of"),
    (dict(log_every=0), ValueError, "log_every must be >= 1"),
    (dict(seed=-3), ValueError, "seed must be >= 0"),
])
def test_bad_arguments(data, kwargs, exc, msg):
    with pytest.raises(exc, match=msg):
        train(small_moe(), data.train, **kwargs)


def test_bad_splits(data):
    with pytest.raises(TypeError, match="train_split must be a minimoe.clinic.data.Split"):
        train(small_moe(), (data.train.x, data.train.y))
    with pytest.raises(ValueError, match="val_split is empty"):
        train(small_moe(), data.train, make_clinic(n_train=5, n_val=0, n_test=0).val)


def test_divergence_is_reported(data):
    model = Generalist(8, 4, rng=np.random.default_rng(0))
    with pytest.raises(FloatingPointError, match="lower the learning rate"), np.errstate(all="ignore"):
        train(model, data.train, epochs=3, optimizer="sgd", lr=1e6, clip=None, seed=0, progress=False)


# --------------------------------------------------------------------------- issue 14: divergence stops, bad data is named
@pytest.mark.parametrize("make", [lambda: small_moe(), lambda: Generalist(8, 4, rng=np.random.default_rng(0))])
def test_a_learning_rate_of_1e3_stops_with_an_error_naming_it(data, make):
    # Today's failure: lr=1e3 "finished" with the loss at ~1e14. Now it stops, and says why.
    with pytest.raises(FloatingPointError, match=r"training diverged at step \d+: .*with lr=1000; lower the learning rate"), \
            np.errstate(all="ignore"):
        train(make(), data.train, data.val, epochs=3, lr=1e3, seed=0, progress=False)


def test_a_loss_that_grows_far_beyond_its_start_stops(data, monkeypatch):
    # A finite but runaway loss (here forced: 1e4 × the true one from step 3 on) stops the run.
    model = Generalist(8, 4, rng=np.random.default_rng(0))
    real, calls = model.forward_loss, []

    def runaway(*a, **kw):
        calls.append(1)
        return real(*a, **kw) * (1e4 if len(calls) >= 3 else 1.0)

    monkeypatch.setattr(model, "forward_loss", runaway)
    with pytest.raises(FloatingPointError, match=r"diverged at step 3: the loss grew from .* with lr=0.003"):
        train(model, data.train, epochs=1, batch_size=64, progress=False)


def test_a_sane_learning_rate_is_not_mistaken_for_divergence(data):
    hist = train(small_moe(), data.train, data.val, epochs=2, lr=3e-2, seed=0, progress=False)
    assert np.all(np.isfinite(hist.train_loss))


@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_nan_in_the_data_is_bad_data_not_a_learning_rate_problem(data, bad):
    x = data.train.x.copy()
    x[[5, 9], 2] = bad
    split = Split(x, data.train.y, data.train.specialty)
    with pytest.raises(ValueError, match=r"bad data: train_split.x contains NaN or inf \(2 patient\(s\), the first at row 5\)") as info:
        train(small_moe(), split, data.val, progress=False)
    assert "learning rate" not in str(info.value)
    with pytest.raises(ValueError, match="bad data: val_split.x contains NaN or inf"):
        train(small_moe(), data.train, split, progress=False)
    with pytest.raises(ValueError, match="bad data: split.x contains NaN or inf"):
        evaluate(small_moe(), split)


def test_specialty_routing_batch_size_is_checked(data):
    with pytest.raises(ValueError, match="batch_size must be >= 1, got 0"):
        specialty_routing(small_moe(), data.test, batch_size=0)
    with pytest.raises(TypeError, match="batch_size must be an integer"):
        specialty_routing(small_moe(), data.test, batch_size=2.5)


def test_a_layer_finding_nan_weights_mid_training_is_a_divergence_naming_lr():
    from minimoe.clinic.train import raise_if_diverged
    err = ValueError("W1 contains NaN or inf")
    with pytest.raises(FloatingPointError, match=r"diverged near step 7 .*lr=0\.5") as info:
        raise_if_diverged(err, 7, 0.5)
    assert info.value.__cause__ is err
    raise_if_diverged(ValueError("x must have shape (?, 4), got (5, 3)"), 7, 0.5)   # other errors: not ours


def test_training_steps_run_in_train_mode_and_evaluation_in_eval_mode(data):
    """Issue 26: a training loop whose forward ran in eval mode (no router noise while
    training) survived the clinic chapter's tests. Every MoE forward of a training step (the
    forward of forward_loss, before backward) must be a training forward; every forward of
    an evaluation, an eval forward."""
    model = small_moe()
    modes, in_step = [], []
    real_forward, real_loss = model.block.forward, model.forward_loss

    def block_spy(x, train=True, noise=None):
        modes.append((bool(in_step), train))
        return real_forward(x, train=train, noise=noise)

    def loss_spy(*args, **kwargs):
        in_step.append(1)
        try:
            return real_loss(*args, **kwargs)
        finally:
            in_step.pop()

    model.block.forward, model.forward_loss = block_spy, loss_spy
    train(model, data.train, data.val, epochs=1, batch_size=128, seed=0, progress=False)
    n_steps = -(-len(data.train.y) // 128)
    assert [mode for step, mode in modes if step] == [True] * n_steps
    assert [mode for step, mode in modes if not step] and not any(mode for step, mode in modes if not step)
    modes.clear()
    evaluate(model, data.val)
    assert modes and not any(mode for _, mode in modes)
