"""Trainer: the moving average of the weights (--ema) is what is validated, saved and resumed;
a step with a non-finite loss or gradient is skipped instead of turning the weights into NaN."""

import csv

import pytest
import torch

pytest.importorskip("subject_fingerprint.checkpoint", reason="model engine not installed")

from fingerprint_training.data import synthetic_dataset  # noqa: E402
from fingerprint_training.trainer import MAX_SKIPPED_IN_A_ROW, TrainConfig, Trainer  # noqa: E402

TINY = dict(depth=10, size=(16, 16), batch_subjects=3, images_per_subject=2, warmup=1,
            embedding_dim=8, val_n_way=4, val_episodes=5, progress=False, margin=1.0,
            calibrate=False, seed=5)

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _data():
    return synthetic_dataset(8, 3, (16, 16), seed=0), synthetic_dataset(5, 3, (16, 16), seed=1)


def _state(module):
    return {k: v.detach().clone() for k, v in module.state_dict().items()}


class _Recording(Trainer):
    """Keeps the trained network's state after every step."""

    def __init__(self, *a, **kw):
        super().__init__(*a, **kw)
        self.after = []

    def train_step(self, step):
        row = super().train_step(step)
        self.after.append(_state(self.model.network))
        return row


def test_the_saved_model_is_the_moving_average_of_the_trained_weights(tmp_path):
    from subject_fingerprint.checkpoint import load_checkpoint

    train, val = _data()
    decay = 0.6
    t = _Recording(TrainConfig(out=str(tmp_path), steps=4, val_every=0, ema=decay, **TINY), train, val)
    result = t.run()
    expected = dict(t.after[0])  # the average starts as a copy of the first step's weights
    for w in t.after[1:]:
        expected = {k: (v * decay + w[k] * (1 - decay)) if v.is_floating_point() else v
                    for k, v in expected.items()}
    saved = load_checkpoint(result.best_path).network.state_dict()
    trained = t.after[-1]
    floats = [k for k in expected if expected[k].is_floating_point()]
    assert any("running_mean" in k for k in floats)  # BatchNorm statistics are averaged too
    for k in floats:
        assert torch.allclose(saved[k].float(), expected[k].float(), atol=1e-6, rtol=1e-5), k
    assert not all(torch.allclose(saved[k].float(), trained[k].float()) for k in floats)
    # ... and it is the average that is validated.
    assert t.evaluated_network() is t.ema.module


def test_a_run_with_ema_resumes_exactly(tmp_path):
    from subject_fingerprint.checkpoint import load_checkpoint

    train, val = _data()
    kw = dict(steps=4, val_every=2, ema=0.7, **TINY)
    full = Trainer(TrainConfig(out=str(tmp_path / "full"), **kw), train, val)
    full.run()
    cut = Trainer(TrainConfig(out=str(tmp_path / "cut"), stop_at=3, **kw), train, val)
    assert cut.run().interrupted
    Trainer(TrainConfig(out=str(tmp_path / "cut"), resume=True, **kw), train, val).run()
    a = load_checkpoint(tmp_path / "full" / "best.pt").network.state_dict()
    b = load_checkpoint(tmp_path / "cut" / "best.pt").network.state_dict()
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    other = Trainer(TrainConfig(out=str(tmp_path / "cut"), resume=True, **{**kw, "ema": 0.9}), train, val)
    with pytest.raises(ValueError, match="ema"):
        other.run()


def test_the_average_starts_after_self_supervised_pretraining(tmp_path):
    train, val = _data()
    t = _Recording(TrainConfig(out=str(tmp_path), steps=3, pretrain_steps=2, val_every=0, ema=0.5,
                               **TINY), train, val)
    t.run()
    assert int(t.ema.n_averaged) == 1  # only the one metric-learning step
    ema = t.ema.module.state_dict()
    assert all(torch.equal(ema[k], v) for k, v in t.after[-1].items() if v.is_floating_point())


def test_ema_is_a_decay_between_0_and_1_and_not_for_a_verification_head():
    train, val = _data()
    with pytest.raises(ValueError, match="decay"):
        Trainer(TrainConfig(out="unused", write_outputs=False, ema=1.5, **TINY), train, val)
    with pytest.raises(ValueError, match="verification-head"):
        Trainer(TrainConfig(out="unused", write_outputs=False, ema=0.9, verification_head=True, **TINY),
                train, val)


def test_the_ema_option_reaches_the_trainer_from_the_command_line():
    from fingerprint_training.cli import build_parser, config_from_args

    args = build_parser().parse_args(["train", "SRC", "--out", "unused", "--ema", "0.995"])
    assert config_from_args(args).ema == 0.995


def _poison(trainer, bad_steps):
    """Make the loss NaN (and so its gradient) at the given steps."""
    class Poisoned(type(trainer.objective)):
        def __call__(self, *a, step=0, **kw):
            loss, stats = super().__call__(*a, step=step, **kw)
            return (loss * float("nan") if step in bad_steps else loss), stats
    trainer.objective.__class__ = Poisoned


def test_a_non_finite_step_is_skipped_and_the_run_goes_on(tmp_path, capsys):
    train, val = _data()
    t = _Recording(TrainConfig(out=str(tmp_path), steps=4, val_every=0, **TINY), train, val)
    _poison(t, {1})
    result = t.run()
    before, after = t.after[0], t.after[1]
    params = dict(t.model.network.named_parameters())
    # Step 2 changed nothing: no weight, and no BatchNorm statistic (its forward pass had).
    assert any("running_var" in k for k in before)
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert all(torch.isfinite(v).all() for v in t.after[-1].values() if v.is_floating_point())
    assert not torch.equal(t.after[2][next(iter(params))], after[next(iter(params))])  # step 3 trained
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert [r["skipped"] for r in rows] == ["0", "1", "0", "0"]
    assert result.last_loss == result.last_loss and result.steps_done == 4
    assert "step 2: non-finite loss or gradient" in capsys.readouterr().out


def test_a_skipped_step_leaves_the_average_and_the_memory_alone(tmp_path):
    train, val = _data()
    t = Trainer(TrainConfig(out=str(tmp_path), steps=4, val_every=0, ema=0.5, xbm=12, **TINY), train, val)
    _poison(t, {2})
    memory = {}

    class Watching(type(t)):
        def train_step(self, step):
            row = super().train_step(step)
            memory[step] = self.objective.state_dict()
            return row
    t.__class__ = Watching
    t.run()
    assert int(t.ema.n_averaged) == 3  # steps 1, 2 and 4
    assert torch.equal(memory[1]["embeddings"], memory[2]["embeddings"])
    assert memory[1]["queue_idx"] == memory[2]["queue_idx"]
    assert not torch.equal(memory[2]["embeddings"], memory[3]["embeddings"])  # the next step adds


def test_a_run_that_only_gives_non_finite_steps_stops_with_a_clear_error(tmp_path):
    train, val = _data()
    t = Trainer(TrainConfig(out=str(tmp_path), steps=MAX_SKIPPED_IN_A_ROW + 5, val_every=2, **TINY),
                train, val)
    _poison(t, set(range(2, 1000)))
    with pytest.raises(FloatingPointError, match=r"diverged: 20 steps in a row up to step 22 .*"
                                                 r"last\.pt holds the last saved state.*log\.csv"):
        t.run()
    rows = list(csv.DictReader(open(tmp_path / "log.csv")))
    assert rows[-1]["step"] == "22" and rows[-1]["skipped"] == "1"
    fresh = Trainer(TrainConfig(out=str(tmp_path / "fresh"), steps=30, val_every=0, **TINY), train, val)
    _poison(fresh, set(range(0, 1000)))
    with pytest.raises(FloatingPointError, match="no last.pt was written yet"):
        fresh.run()


def test_all_ranks_agree_on_a_skip_in_one_process():
    from fingerprint_training import distributed as ddp

    ctx = ddp.setup(torch.device("cpu"))
    assert ddp.all_true(True, ctx) is True and ddp.all_true(False, ctx) is False


def test_with_a_loss_scaler_a_skipped_step_still_lowers_the_scale(tmp_path):
    """The float16 path (CUDA) keeps a GradScaler; a CPU scaler stands in for it here."""
    train, val = _data()
    t = _Recording(TrainConfig(out=str(tmp_path), steps=3, val_every=0, **TINY), train, val)
    t.scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 10)
    _poison(t, {1})
    t.run()
    assert t.scaler.get_scale() == 2.0 ** 9  # halved once, for the one overflowing step
    assert all(torch.equal(t.after[0][k], t.after[1][k]) for k in t.after[0])
    assert not torch.equal(t.after[1]["fc.weight"], t.after[2]["fc.weight"])
