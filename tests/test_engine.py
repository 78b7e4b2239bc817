"""covid_ray.engine on arrays and a tiny model: class weights, early stopping, dedupe, loss, one epoch."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.data.distributed import DistributedSampler

from covid_ray.config import AugmentParams
from covid_ray.data.transforms import EvalPreset, TrainPreset
from covid_ray.engine import (
    EarlyStopping,
    autocast_context,
    class_weight_vector,
    cross_entropy_np,
    dedupe_by_index,
    predict_logits,
    train_one_epoch,
)

CLASSES = ["COVID", "Lung_Opacity", "Normal"]
COUNTS = np.array([10, 30, 60])  # N = 100, K = 3


# ------------------------------------------------------------------ class weights


def test_none_is_all_ones():
    np.testing.assert_array_equal(class_weight_vector(COUNTS, "none", CLASSES), [1.0, 1.0, 1.0])


def test_balanced_is_n_over_k_times_count():
    # 100 / (3 * 10), 100 / (3 * 30), 100 / (3 * 60)
    expected = [10 / 3, 10 / 9, 5 / 9]
    np.testing.assert_allclose(class_weight_vector(COUNTS, "balanced", CLASSES), expected, rtol=1e-12)


def test_balanced_matches_scikit_learn():
    from sklearn.utils.class_weight import compute_class_weight

    y = np.repeat(np.arange(3), COUNTS)
    ours = class_weight_vector(COUNTS, "balanced", CLASSES)
    np.testing.assert_allclose(ours, compute_class_weight("balanced", classes=np.arange(3), y=y), rtol=1e-12)


def test_sqrt_balanced_is_the_square_root():
    expected = np.sqrt([10 / 3, 10 / 9, 5 / 9])
    np.testing.assert_allclose(class_weight_vector(COUNTS, "sqrt_balanced", CLASSES), expected, rtol=1e-12)


def test_explicit_list_is_taken_as_is_and_not_mutated():
    given = [1.0, 2.5, 0.5]
    w = class_weight_vector(COUNTS, given, CLASSES, {"Normal": 2.0})
    np.testing.assert_array_equal(w, [1.0, 2.5, 1.0])
    assert given == [1.0, 2.5, 0.5]


def test_multipliers_scale_their_class_only():
    w = class_weight_vector(COUNTS, "balanced", CLASSES, {"COVID": 1.5, "Normal": 3.0})
    np.testing.assert_allclose(w, [10 / 3 * 1.5, 10 / 9, 5 / 9 * 3.0], rtol=1e-12)
    np.testing.assert_array_equal(class_weight_vector(COUNTS, "none", CLASSES, {"Lung_Opacity": 2.0}), [1, 2, 1])


def test_wrong_length_list_is_an_error_naming_the_classes():
    with pytest.raises(ValueError, match=r"2 entries, expected 3 \(\['COVID', 'Lung_Opacity', 'Normal'\]\)"):
        class_weight_vector(COUNTS, [1.0, 2.0], CLASSES)


@pytest.mark.parametrize("mode", ["balanced", "sqrt_balanced"])
def test_empty_class_is_an_error_under_balanced_modes(mode):
    with pytest.raises(ValueError, match=r"none for \['Lung_Opacity'\]"):
        class_weight_vector(np.array([5, 0, 7]), mode, CLASSES)
    # 'none' and explicit lists do not need every class
    np.testing.assert_array_equal(class_weight_vector(np.array([5, 0, 7]), "none", CLASSES), [1, 1, 1])


def test_unknown_class_multiplier_is_an_error():
    with pytest.raises(ValueError, match=r"unknown class 'Viral Pneumonia'.*\['COVID', 'Lung_Opacity', 'Normal'\]"):
        class_weight_vector(COUNTS, "none", CLASSES, {"Viral Pneumonia": 2.0})


def test_unknown_mode_is_an_error():
    with pytest.raises(ValueError, match=r"unknown class_weights mode 'inverse'"):
        class_weight_vector(COUNTS, "inverse", CLASSES)


# ---------------------------------------------------------------- early stopping


def test_early_stopping_counts_epochs_without_strict_improvement():
    es = EarlyStopping(patience=2)
    assert es.step(0.5, 1) is True and not es.should_stop
    assert es.step(0.4, 2) is False and not es.should_stop
    assert es.step(0.5, 3) is False  # equal is not better
    assert es.should_stop and es.bad_epochs == 2
    assert (es.best, es.best_epoch) == (0.5, 1)


def test_improvement_resets_the_count():
    es = EarlyStopping(patience=2)
    for value, epoch in [(0.5, 1), (0.4, 2), (0.6, 3), (0.1, 4)]:
        es.step(value, epoch)
    assert not es.should_stop and es.bad_epochs == 1 and (es.best, es.best_epoch) == (0.6, 3)


def test_patience_zero_never_stops():
    es = EarlyStopping(patience=0)
    es.step(1.0, 1)
    for epoch in range(2, 50):
        es.step(0.0, epoch)
    assert not es.should_stop and es.bad_epochs == 48


def test_state_dict_round_trip_resumes_exactly(tmp_path):
    es = EarlyStopping(patience=3)
    for value, epoch in [(0.5, 1), (0.7, 2), (0.6, 3)]:
        es.step(value, epoch)
    # Through a weights_only torch file, as inside a checkpoint's train_state.pt.
    torch.save({"early_stopping": es.state_dict()}, tmp_path / "s.pt")
    state = torch.load(tmp_path / "s.pt", weights_only=True)["early_stopping"]
    fresh = EarlyStopping(patience=99)
    fresh.load_state_dict(state)
    assert fresh == es
    for value, epoch in [(0.65, 4), (0.69, 5)]:
        assert fresh.step(value, epoch) == es.step(value, epoch)
    assert fresh.should_stop and es.should_stop


def test_initial_state_round_trips_infinite_best():
    es = EarlyStopping()
    fresh = EarlyStopping(patience=1)
    fresh.load_state_dict(es.state_dict())
    assert fresh.best == -math.inf and fresh.patience == 5 and fresh.best_epoch == -1


# ------------------------------------------------------------------- dedupe


def test_dedupe_drops_the_padding_of_a_distributed_sampler():
    n, world = 5, 2  # 5 images over 2 workers: the sampler pads to 6, repeating one image
    shards = [list(DistributedSampler(range(n), num_replicas=world, rank=r, shuffle=False)) for r in range(world)]
    index = np.concatenate(shards)
    assert len(index) == 6 and len(set(index.tolist())) == n
    labels = index % 3
    logits = np.stack([np.full(4, float(i)) for i in index]).astype(np.float32)  # row i holds i
    idx, lg, lb = dedupe_by_index(index, logits, labels)
    np.testing.assert_array_equal(idx, np.arange(n))
    np.testing.assert_array_equal(lb, np.arange(n) % 3)
    np.testing.assert_array_equal(lg[:, 0], np.arange(n))


def test_dedupe_keeps_the_first_occurrence_and_sorts():
    index = np.array([3, 1, 3, 0, 1])
    logits = np.arange(10, dtype=np.float32).reshape(5, 2)
    labels = np.array([30, 10, 31, 0, 11])
    idx, lg, lb = dedupe_by_index(index, logits, labels)
    np.testing.assert_array_equal(idx, [0, 1, 3])
    np.testing.assert_array_equal(lb, [0, 10, 30])
    np.testing.assert_array_equal(lg, [[6, 7], [2, 3], [0, 1]])


def test_dedupe_of_nothing_is_nothing():
    idx, lg, lb = dedupe_by_index(np.zeros(0, np.int64), np.zeros((0, 3), np.float32), np.zeros(0, np.int64))
    assert len(idx) == len(lg) == len(lb) == 0


# --------------------------------------------------------------------- loss


def test_cross_entropy_np_matches_torch_and_the_formula():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(50, 4)).astype(np.float32) * 3
    labels = rng.integers(0, 4, 50)
    ours = cross_entropy_np(logits, labels)
    theirs = F.cross_entropy(torch.tensor(logits), torch.tensor(labels)).item()
    shifted = logits - logits.max(axis=1, keepdims=True)
    by_hand = float(np.mean(np.log(np.exp(shifted).sum(axis=1)) - shifted[np.arange(50), labels]))
    assert isinstance(ours, float)
    assert ours == pytest.approx(theirs, rel=1e-6) and ours == pytest.approx(by_hand, rel=1e-5)


def test_cross_entropy_np_of_no_images_is_nan():
    assert math.isnan(cross_entropy_np(np.zeros((0, 4), np.float32), np.zeros(0, np.int64)))


# -------------------------------------------------------------- one epoch


def _separable_batches(n_per_class: int = 32, size: int = 8, batch: int = 16):
    """(uint8 images (B, 1, S, S), labels, indices) batches: class 0 dark, class 1 bright."""
    g = torch.Generator().manual_seed(0)
    dark = torch.randint(0, 100, (n_per_class, 1, size, size), generator=g)
    bright = torch.randint(155, 256, (n_per_class, 1, size, size), generator=g)
    images = torch.cat([dark, bright]).to(torch.uint8)
    labels = torch.cat([torch.zeros(n_per_class), torch.ones(n_per_class)]).long()
    perm = torch.randperm(len(labels), generator=g)
    images, labels = images[perm], labels[perm]
    index = torch.arange(len(labels))
    return [(images[i : i + batch], labels[i : i + batch], index[i : i + batch]) for i in range(0, len(labels), batch)]


def _tiny_model(size: int = 8) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(size * size, 2))


def test_train_one_epoch_lowers_the_loss_and_fits_a_separable_problem():
    batches = _separable_batches()
    model = _tiny_model()
    # Flip only: the input is already at the working size, so the warp is exact.
    preset = TrainPreset(image_size=8, augment=AugmentParams(rotation=0.0, hflip=0.5))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    criterion = nn.CrossEntropyLoss()
    device = torch.device("cpu")
    g = torch.Generator().manual_seed(0)
    first, seen = train_one_epoch(model, batches, preset, criterion, opt, device, generator=g)
    assert seen == 64 and math.isfinite(first)
    losses = [train_one_epoch(model, batches, preset, criterion, opt, device, generator=g)[0] for _ in range(5)]
    assert losses[-1] < 0.5 * first
    index, logits, labels = predict_logits(model, batches, EvalPreset(image_size=8), device)
    np.testing.assert_array_equal(index, np.arange(64))
    assert logits.dtype == np.float32 and logits.shape == (64, 2)
    assert (logits.argmax(1) == labels).all()
    assert not model.training  # predict_logits leaves the model in eval mode


def test_train_one_epoch_returns_the_image_weighted_mean_loss():
    batches = _separable_batches(n_per_class=10, batch=8)  # 20 images: batches of 8, 8, 4
    model = _tiny_model()
    preset = TrainPreset(image_size=8, augment=AugmentParams(rotation=0.0, hflip=0.0))
    opt = torch.optim.SGD(model.parameters(), lr=0.0)  # no update: every batch sees the same model
    mean, seen = train_one_epoch(model, batches, preset, nn.CrossEntropyLoss(), opt, torch.device("cpu"))
    _, logits, labels = predict_logits(model, batches, EvalPreset(image_size=8), torch.device("cpu"))
    assert seen == 20
    assert mean == pytest.approx(cross_entropy_np(logits, labels), rel=1e-5)


def test_bf16_autocast_on_cpu_trains():
    batches = _separable_batches()
    model = _tiny_model()
    preset = TrainPreset(image_size=8, augment=AugmentParams(rotation=0.0, hflip=0.0))
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    with autocast_context(torch.device("cpu"), "bf16"):
        assert torch.is_autocast_enabled("cpu") and torch.get_autocast_dtype("cpu") == torch.bfloat16
    losses = [
        train_one_epoch(model, batches, preset, nn.CrossEntropyLoss(), opt, torch.device("cpu"), amp="bf16")[0]
        for _ in range(4)
    ]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0]
    _, logits, _ = predict_logits(model, batches, EvalPreset(image_size=8), torch.device("cpu"), amp="bf16")
    assert logits.dtype == np.float32


def test_predict_logits_of_an_empty_loader():
    idx, logits, labels = predict_logits(_tiny_model(), [], EvalPreset(image_size=8), torch.device("cpu"))
    assert idx.shape == (0,) and labels.shape == (0,) and logits.shape[0] == 0


def _conv_model() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))


def test_grad_scaler_and_channels_last_give_the_plain_update():
    """The CUDA recipe's loss scaling and memory format, run on CPU (GradScaler("cpu")).

    Scaling by a power of two and unscaling before the step is exact in fp32, and
    channels_last changes the layout, not the math: one epoch must end at the plain
    epoch's weights.
    """
    batches = _separable_batches()
    preset = TrainPreset(image_size=8, augment=AugmentParams(rotation=0.0, hflip=0.0))
    runs = []
    for scaler, channels_last in ((None, False), (torch.amp.GradScaler("cpu", init_scale=2.0**10), True)):
        model = _conv_model()
        if channels_last:
            model = model.to(memory_format=torch.channels_last)
        opt = torch.optim.SGD(model.parameters(), lr=0.05)
        loss, _ = train_one_epoch(model, batches, preset, nn.CrossEntropyLoss(), opt, torch.device("cpu"),
                                  scaler=scaler, amp="off", channels_last=channels_last)
        runs.append((loss, [p.detach().clone() for p in model.parameters()]))
    (plain_loss, plain), (scaled_loss, scaled) = runs
    assert scaled_loss == pytest.approx(plain_loss, rel=1e-5)
    for a, b in zip(plain, scaled):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_grad_scaler_skips_a_step_whose_gradients_overflow_and_lowers_the_scale():
    batches = _separable_batches()[:1]
    preset = TrainPreset(image_size=8, augment=AugmentParams(rotation=0.0, hflip=0.0))
    model = _conv_model()
    before = [p.detach().clone() for p in model.parameters()]
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**120)
    opt = torch.optim.SGD(model.parameters(), lr=0.05)
    big = lambda out, y: 1e6 * F.cross_entropy(out, y)  # noqa: E731 - x 2^120 overflows fp32 (max ~2^128)
    train_one_epoch(model, batches, preset, big, opt, torch.device("cpu"), scaler=scaler, amp="off")
    assert scaler.get_scale() == 2.0**119  # backoff factor 0.5
    for a, b in zip(before, model.parameters()):
        torch.testing.assert_close(a, b.detach(), rtol=0, atol=0)  # the step was skipped


# --------------------------------------------------------------------------- one run


def _run_config(easy_split, tmp_path, **patch):
    from covid_ray.config import TrialConfig

    root, split = easy_split
    return TrialConfig.from_flat({"data": str(root), "split": str(split), "cache_dir": str(tmp_path / "cache"),
                                  "model": "mobilenet_v3_small", "image_size": 40, "batch_size": 16, "epochs": 3,
                                  "lr": 1e-3, **patch})


def test_a_run_trains_and_reports_what_the_loop_reports(easy_split, tmp_path):
    from covid_ray.engine import run_epoch, setup_run

    run = setup_run(_run_config(easy_split, tmp_path, bn_momentum=0.3), device=torch.device("cpu"))
    assert run.classes == ["COVID", "Normal"] and (run.train_images, run.val_images) == (112, 16)
    assert all(m.momentum == 0.3 for m in run.model.modules() if isinstance(m, nn.BatchNorm2d))
    first = run_epoch(run, 0)
    second = run_epoch(run, 1)
    m = second.metrics
    assert first.improved  # the first epoch is always a new best
    assert m["epoch"] == 2 and m["val_images"] == 16 and m["lr"] == pytest.approx(1e-3)
    assert m["best_val_macro_f1"] == max(first.metrics["val_macro_f1"], m["val_macro_f1"])
    assert second.improved == (m["val_macro_f1"] > first.metrics["val_macro_f1"])
    assert {"val_accuracy", "val_loss", "train_loss", "epoch_time_s", "early_stopped"} <= set(m)


def test_a_restored_run_continues_exactly_where_it_stopped(easy_split, tmp_path):
    """Two epochs straight equal one epoch, a checkpoint, a fresh run restored from it, one more epoch."""
    from covid_ray.artifacts.checkpoint import load_checkpoint, load_train_state, save_checkpoint
    from covid_ray.engine import run_epoch, setup_run

    cfg = _run_config(easy_split, tmp_path)
    straight = setup_run(cfg, device=torch.device("cpu"))
    run_epoch(straight, 0)
    end = run_epoch(straight, 1).metrics

    first = setup_run(cfg, device=torch.device("cpu"))
    metrics = run_epoch(first, 0).metrics
    save_checkpoint(tmp_path / "ckpt", first.model, classes=first.classes, image_size=40, metrics=metrics, epoch=1,
                    config=cfg.to_flat(), train_state=first.train_state())
    resumed = setup_run(cfg, device=torch.device("cpu"))
    assert resumed.restore(load_checkpoint(tmp_path / "ckpt"), load_train_state(tmp_path / "ckpt")) == 1
    again = run_epoch(resumed, 1).metrics
    assert again["val_macro_f1"] == end["val_macro_f1"]
    assert again["train_loss"] == pytest.approx(end["train_loss"], rel=1e-4, abs=1e-6)
    for key, value in straight.model.state_dict().items():
        assert torch.allclose(value, resumed.model.state_dict()[key], atol=1e-6), key
    assert resumed.early.state_dict() == straight.early.state_dict()
