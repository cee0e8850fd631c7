"""``precision: auto`` by measurement (training/precision_probe.py): the choice follows the timer, not CPU flags;
the on-disk cache; the probe leaves the caller's model and RNG alone; the accuracy guard. No test depends on
real speed: per-mode durations and the clock are faked, except one check with a mode that sleeps."""

from __future__ import annotations

import json
import random
import time

import numpy as np
import pytest
import torch
from torch import nn

import modalseg.training.precision as precision_mod
import modalseg.training.precision_probe as pp
from modalseg.models import create_model
from modalseg.training.precision import Precision, resolve_precision
from modalseg.training.precision_probe import accuracy_guard, choose_precision

CPU = torch.device("cpu")
SHAPE = (4, 1, 32, 32)


def tiny_unet() -> nn.Module:
    torch.manual_seed(0)
    return create_model("unet", num_modalities=1, in_channels=1, num_classes=2, base_width=4)


def fake_durations(monkeypatch, seconds: dict[str, float], run_calls: bool = True) -> list[str]:
    """Replace the per-mode timing by fixed durations (the call itself still runs); returns the labels timed."""
    timed: list[str] = []

    def fake(run, label, device):
        if run_calls:
            run()
        timed.append(label)
        return seconds[label]

    monkeypatch.setattr(pp, "_time_call", fake)
    return timed


SLOW_BF16 = {"fp32": 0.010, "fp32+channels_last": 0.008, "bf16+channels_last": 0.020}
FAST_BF16 = {"fp32": 0.010, "fp32+channels_last": 0.008, "bf16+channels_last": 0.004}


@pytest.fixture(autouse=True)
def _cache_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("MODALSEG_CACHE_DIR", str(tmp_path / "cache"))


# ---------------------------------------------------------------- the choice follows the measurement
@pytest.mark.parametrize("flags", [True, False])
@pytest.mark.parametrize(("seconds", "expected"), [
    (SLOW_BF16, "fp32+channels_last"),
    (FAST_BF16, "bf16+channels_last"),
    ({"fp32": 0.005, "fp32+channels_last": 0.008, "bf16+channels_last": 0.009}, "fp32"),
])
def test_auto_picks_the_fastest_measured_mode_whatever_the_cpu_flags(monkeypatch, seconds, expected, flags):
    monkeypatch.setattr(precision_mod, "cpu_has_native_bf16", lambda: flags)
    timed = fake_durations(monkeypatch, seconds)
    p, line = choose_precision(tiny_unet(), SHAPE, CPU, "train", use_cache=False)
    assert p.label == expected
    assert set(timed) == set(seconds)  # every candidate was timed
    assert "\n" not in line and line.startswith(f"precision auto: {expected} (train probe ")
    assert "fp32" in line and "fp32+CL" in line and "bf16+CL" in line and "not cached" in line


def test_a_mode_within_3_percent_of_fp32_is_not_worth_the_lower_precision(monkeypatch):
    fake_durations(monkeypatch, {"fp32": 0.0100, "fp32+channels_last": 0.0102, "bf16+channels_last": 0.0098})
    p, _ = choose_precision(tiny_unet(), SHAPE, CPU, "infer", use_cache=False)
    assert p.label == "fp32"


def test_resolve_precision_auto_without_a_model_is_fp32(monkeypatch):
    monkeypatch.setattr(precision_mod, "cpu_has_native_bf16", lambda: True)
    assert resolve_precision(CPU, "auto") == Precision(CPU, None, False)
    assert resolve_precision(CPU, "auto", True) == Precision(CPU, None, True)
    assert resolve_precision(CPU, "bf16") == Precision(CPU, torch.bfloat16, True)


def test_explicit_modes_bypass_the_probe(monkeypatch):
    timed = fake_durations(monkeypatch, SLOW_BF16)
    for mode in ("fp32", "bf16"):
        p, line = choose_precision(tiny_unet(), SHAPE, CPU, "train", requested=mode)
        assert p == resolve_precision(CPU, mode) and p.auto is None
        assert line == f"precision: {p.label} (requested)"
    assert timed == []
    assert not (pp.default_cache_path()).exists()


def test_candidates(monkeypatch):
    labels = [p.label for p in pp.candidate_precisions(CPU)]
    assert labels == ["fp32", "fp32+channels_last", "bf16+channels_last"]
    assert [p.label for p in pp.candidate_precisions(CPU, channels_last=False)] == ["fp32", "bf16"]
    monkeypatch.setattr(torch.cuda, "is_bf16_supported", lambda *a, **k: True)
    cuda = [p.label for p in pp.candidate_precisions(torch.device("cuda"))]
    assert cuda == ["fp32", "bf16+channels_last", "fp16+channels_last"]


# ---------------------------------------------------------------- the cache
def test_the_choice_is_cached_keyed_and_reused(monkeypatch, tmp_path):
    path = tmp_path / "c" / "precision.json"
    timed = fake_durations(monkeypatch, FAST_BF16)
    net = tiny_unet()
    p1, line1 = choose_precision(net, SHAPE, CPU, "train", cache_path=path, model_name="unet")
    n = len(timed)
    assert n >= 3 and f"cached in {path}" in line1
    entries = json.loads(path.read_text())["entries"]
    (key,) = entries
    for part in (pp.cpu_model_name(), torch.__version__, "unet", "size 2^10", "train", "cpu",
                 f"{torch.get_num_threads()} threads"):
        assert part in key
    assert entries[key]["choice"] == "bf16+channels_last" and entries[key]["fp32_fallback"] == "fp32+channels_last"

    p2, line2 = choose_precision(net, SHAPE, CPU, "train", cache_path=path, model_name="unet")
    assert len(timed) == n  # no probe: the cached choice
    assert p2 == p1 and p2.auto is not None and p2.auto.key == key
    assert line2.startswith("precision auto: bf16+channels_last (cached choice of ") and "\n" not in line2
    choose_precision(net, (4, 1, 33, 33), CPU, "train", cache_path=path, model_name="unet")  # same size class
    assert len(timed) == n

    choose_precision(net, SHAPE, CPU, "infer", cache_path=path, model_name="unet")  # another purpose
    choose_precision(net, (4, 1, 64, 64), CPU, "train", cache_path=path, model_name="unet")  # another size class
    assert len(json.loads(path.read_text())["entries"]) == 3 and len(timed) > n


def test_default_cache_location(monkeypatch, tmp_path):
    assert pp.default_cache_path() == tmp_path / "cache" / "precision.json"
    monkeypatch.delenv("MODALSEG_CACHE_DIR")
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert pp.default_cache_path() == tmp_path / "xdg" / "modalseg" / "precision.json"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert pp.default_cache_path() == tmp_path / "home" / ".cache" / "modalseg" / "precision.json"


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00", b"[1, 2]", b'{"version": 1, "entries": []}',
                                     b'{"version": 1, "entries": {"K": {"choice": "int8"}}}'])
def test_a_corrupt_cache_is_ignored_and_replaced(monkeypatch, tmp_path, content):
    path = tmp_path / "precision.json"
    path.write_bytes(content)
    timed = fake_durations(monkeypatch, SLOW_BF16)
    p, line = choose_precision(tiny_unet(), SHAPE, CPU, "train", cache_path=path)
    assert timed and p.label == "fp32+channels_last" and "cached in" in line
    assert len(json.loads(path.read_text())["entries"]) >= 1


def test_an_unwritable_cache_location_falls_back_to_not_caching(monkeypatch, tmp_path):
    blocker = tmp_path / "a_file"
    blocker.write_text("x")
    fake_durations(monkeypatch, FAST_BF16)
    p, line = choose_precision(tiny_unet(), SHAPE, CPU, "train", cache_path=blocker / "precision.json")
    assert p.label == "bf16+channels_last" and "not cached" in line and p.auto.cache_path is None


# ---------------------------------------------------------------- the caller's model and RNG are untouched
def _snapshot(net: nn.Module) -> tuple:
    state = {k: v.clone() for k, v in net.state_dict().items()}
    grads = {k: None if p.grad is None else p.grad.clone() for k, p in net.named_parameters()}
    return state, grads, net.training


def test_the_probe_leaves_weights_grads_and_rng_state_unchanged():
    net = tiny_unet()
    net(torch.randn(2, 1, 32, 32)).mean().backward()  # the caller's grads and BN statistics
    net.eval()
    before = _snapshot(net)
    torch.manual_seed(123)
    random.seed(4)
    np.random.seed(5)
    rng = (torch.get_rng_state(), random.getstate(), np.random.get_state()[1].copy())
    for purpose in ("train", "infer"):  # an example drawing from the global RNG, a model with dropout
        choose_precision(nn.Sequential(net, nn.Dropout(0.5)), lambda: torch.randn(*SHAPE), CPU, purpose,
                         use_cache=False, budget_s=0.3)
    after = _snapshot(net)
    assert after[2] == before[2]
    for k, v in before[0].items():
        assert torch.equal(after[0][k], v), k
    for k, g in before[1].items():
        assert g is not None and torch.equal(after[1][k], g), k
    assert torch.equal(torch.get_rng_state(), rng[0])
    assert random.getstate() == rng[1] and np.array_equal(np.random.get_state()[1], rng[2])
    assert all(p.device == CPU and p.is_contiguous() for p in net.parameters())  # memory format untouched


def _train(precision: Precision, probe: str | None, cache_path) -> list[float]:
    """Seed, build, (maybe) choose the precision, then train with inputs drawn from the global RNG."""
    torch.manual_seed(7)
    net = create_model("unet", num_modalities=1, in_channels=1, num_classes=2, base_width=4)
    if probe is not None:  # the example draws from the global RNG, as a real batch sampler would
        chosen, line = choose_precision(net, lambda: torch.randn(*SHAPE), CPU, "train", cache_path=cache_path)
        assert chosen == precision and probe in line
    net = precision.prepare_model(net).train()
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(3):
        x = torch.randn(*SHAPE)
        y = (torch.rand(4, 32, 32) > 0.5).long()
        opt.zero_grad(set_to_none=True)
        with precision.autocast():
            loss = nn.functional.cross_entropy(net(precision.to_input(x)).float(), y)
        loss.backward()
        opt.step()
        losses.append(loss.item())
    return losses


def test_same_seed_same_training_whether_the_probe_ran_or_the_cache_answered(monkeypatch, tmp_path):
    fake_durations(monkeypatch, SLOW_BF16)
    path = tmp_path / "precision.json"
    chosen = Precision(CPU, None, True)
    probed = _train(chosen, "train probe", path)
    cached = _train(chosen, "cached choice", path)
    plain = _train(chosen, None, path)
    assert probed == cached == plain


# ---------------------------------------------------------------- budget, input shrinking
def test_the_budget_is_respected_with_a_slow_mode(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(pp, "_clock", lambda: now[0])
    seconds = {"fp32": 0.10, "fp32+channels_last": 0.12, "bf16+channels_last": 1.5}
    calls: list[str] = []

    def fake(run, label, device):
        calls.append(label)
        now[0] += seconds[label]
        return seconds[label]

    monkeypatch.setattr(pp, "_time_call", fake)
    result = pp.measure_precisions(tiny_unet(), SHAPE, pp.candidate_precisions(CPU), budget_s=2.0)
    assert result.seconds <= 2.0 + 1.5  # at most one call past the budget
    assert calls.count("bf16+channels_last") <= 2
    assert result.best().label == "fp32"
    assert not result.untimed


def test_no_call_starts_after_the_budget_and_an_unfinished_probe_is_not_cached(monkeypatch, tmp_path):
    now = [0.0]
    monkeypatch.setattr(pp, "_clock", lambda: now[0])
    calls: list[str] = []

    def fake(run, label, device):  # every call takes 3 s: more than the whole budget
        calls.append(label)
        now[0] += 3.0
        return 3.0

    monkeypatch.setattr(pp, "_time_call", fake)
    path = tmp_path / "precision.json"
    p, line = choose_precision(tiny_unet(), SHAPE, CPU, "train", cache_path=path, budget_s=2.0)
    assert calls == ["fp32"] and p.label == "fp32"
    assert "budget spent before" in line and "not cached" in line and not path.exists()


SEEN: list[tuple[int, ...]] = []


class Recorder(nn.Module):
    """Records its input shapes in the module-level ``SEEN`` (the probe runs a deep copy of it)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(1, 2, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        SEEN.append(tuple(x.shape))
        return self.conv(x)


def test_the_crop_is_halved_while_one_call_is_too_slow_for_the_budget(monkeypatch):
    now = [0.0]
    monkeypatch.setattr(pp, "_clock", lambda: now[0])

    def fake(run, label, device):  # 1 s per call at 2 x 64 x 64 pixels, in proportion
        run()
        b, _, h, w = SEEN[-1]
        now[0] += b * h * w / 8192
        return b * h * w / 8192

    monkeypatch.setattr(pp, "_time_call", fake)
    SEEN.clear()
    result = pp.measure_precisions(Recorder(), (4, 1, 256, 256), pp.candidate_precisions(CPU), budget_s=3.0)
    assert SEEN[:3] == [(2, 1, 64, 64), (2, 1, 64, 64), (2, 1, 32, 32)]  # too slow, repeated, then halved
    assert result.shape == "2x1x32x32" and set(SEEN[3:]) == {(2, 1, 32, 32)}
    assert result.seconds <= 3.0 + 0.25


def test_a_mode_that_is_really_slow_is_not_chosen_and_the_probe_stops_near_its_budget():
    class SlowInBf16(nn.Module):  # a real model whose bf16 mode is slow (sleeps), not a faked timer
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.is_autocast_enabled("cpu"):
                time.sleep(0.3)
            return self.conv(x)

    t0 = time.perf_counter()
    p, line = choose_precision(SlowInBf16(), SHAPE, CPU, "train", use_cache=False, budget_s=1.0)
    assert p.dtype is None, line
    assert time.perf_counter() - t0 < 1.0 + 0.3 + 1.5  # budget + one call + slack for a busy machine


def test_the_probe_input_is_a_crop_of_the_real_one_and_labels_follow(monkeypatch):
    from modalseg.training.tasks import PairedLoss

    fake_durations(monkeypatch, SLOW_BF16)
    loss = PairedLoss(tiny_unet(), ce_weight=1.0)
    x, y = torch.randn(4, 1, 256, 256), torch.randint(0, 2, (4, 256, 256))
    result = pp.measure_precisions(loss, (x, y), pp.candidate_precisions(CPU), purpose="train")
    assert result.shape == "2x1x64x64"  # 2 images, centre crop halved to <= 2 x 64 x 64 pixels
    p, line = choose_precision(loss, lambda: (x, y), CPU, "train", use_cache=False)
    assert "train probe 2x1x64x64" in line and p.label == "fp32+channels_last"
    net = tiny_unet().eval()
    assert pp.measure_precisions(net, (4, 1, 256, 256), pp.candidate_precisions(CPU), purpose="infer").shape \
        == "2x1x128x128"
    assert pp.size_class(256, 256) == 16 and pp.size_class(200, 200) == 15


def test_a_mode_that_fails_is_skipped(monkeypatch):
    class NoBf16(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.conv = nn.Conv2d(1, 2, 3, padding=1)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            if torch.is_autocast_enabled("cpu"):
                raise RuntimeError("no bf16 kernel")
            return self.conv(x)

    fake_durations(monkeypatch, FAST_BF16)
    p, line = choose_precision(NoBf16(), SHAPE, CPU, "infer", use_cache=False)
    assert p.label == "fp32+channels_last" and "bf16+CL failed" in line


# ---------------------------------------------------------------- accuracy guard
def _auto_bf16(monkeypatch, path) -> Precision:
    fake_durations(monkeypatch, FAST_BF16)
    p, _ = choose_precision(tiny_unet(), SHAPE, CPU, "train", cache_path=path)
    assert p.label == "bf16+channels_last" and p.auto is not None
    return p


def _probs(labels: np.ndarray) -> np.ndarray:
    return np.stack([1.0 - labels, labels.astype(np.float64)], axis=1).astype(np.float32)


def test_the_accuracy_guard_keeps_a_mode_that_agrees(monkeypatch, tmp_path):
    p = _auto_bf16(monkeypatch, tmp_path / "precision.json")
    labels = (np.random.default_rng(0).random((3, 32, 32)) > 0.7).astype(np.int64)
    seen: list[str] = []

    def predict(q: Precision) -> np.ndarray:
        seen.append(q.label)
        return _probs(labels)

    kept, line = accuracy_guard(p, predict)
    assert kept is p and line.startswith("precision guard: bf16+channels_last kept (labels agree 100.00 %")
    assert seen == ["bf16+channels_last", "fp32+channels_last"]  # compared with the fastest fp32 mode


def test_the_accuracy_guard_demotes_a_mode_that_disagrees_and_marks_the_cache(monkeypatch, tmp_path):
    path = tmp_path / "precision.json"
    p = _auto_bf16(monkeypatch, path)
    rng = np.random.default_rng(0)
    ref = (rng.random((3, 32, 32)) > 0.7).astype(np.int64)
    low = ref.copy()
    low[0, :4] = 1 - low[0, :4]  # 128 of 3072 voxels flipped: 95.8 % agreement

    demoted, line = accuracy_guard(p, lambda q: torch.from_numpy(_probs(low if q.dtype else ref)))
    assert demoted.label == "fp32+channels_last" and demoted.auto is not None
    assert "demoted to fp32+channels_last" in line and "cache marked" in line and "\n" not in line
    entry = next(iter(json.loads(path.read_text())["entries"].values()))
    assert entry["choice"] == "fp32+channels_last" and entry["demoted"]["mode"] == "bf16+channels_last"

    timed = fake_durations(monkeypatch, FAST_BF16)  # the next run starts in fp32 without probing
    again, line = choose_precision(tiny_unet(), SHAPE, CPU, "train", cache_path=path)
    assert again.label == "fp32+channels_last" and not timed and "demoted by the accuracy guard" in line


def test_the_accuracy_guard_with_a_target_compares_dice(monkeypatch, tmp_path):
    p = _auto_bf16(monkeypatch, tmp_path / "precision.json")
    target = np.zeros((2, 32, 32), np.int64)
    target[:, 8:24, 8:24] = 1
    ref = target.copy()
    low = target.copy()
    low[:, 8:24, 8] = 0  # 32 of 2048 voxels: 98.4 % agreement, Dice down 0.03
    demoted, line = accuracy_guard(p, lambda q: low if q.dtype else ref, target=target, num_classes=2)
    assert demoted.dtype is None and "Dice 0.9" in line
    ok, line = accuracy_guard(p, lambda q: low if q.dtype else ref, target=target, dice_tolerance=0.05,
                              min_agreement=0.98)
    assert ok is p and "kept" in line


def test_the_accuracy_guard_leaves_fp32_and_explicit_modes_alone():
    def predict(q):
        raise AssertionError("not called")

    for p in (resolve_precision(CPU, "bf16"), Precision(CPU, None, True)):
        assert accuracy_guard(p, predict) == (p, "")


# ---------------------------------------------------------------- the benchmark script
def test_benchmark_script_quick(tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    monkeypatch.syspath_prepend(str(Path(__file__).resolve().parents[1] / "benchmarks"))
    sys.modules.pop("precision_auto", None)
    import precision_auto

    payload = precision_auto.main(["--quick", "--purposes", "infer", "--budget", "0.5", "--json",
                                   str(tmp_path / "p.json")])
    res = payload["results"]["infer"]
    assert {r["mode"] for r in res["rows"]} == {"fp32", "fp32+channels_last", "bf16+channels_last"}
    medians = {r["mode"]: r["median_s"] for r in res["rows"]}
    auto = res["auto"]
    assert auto["vs_fastest"] == pytest.approx(medians[auto["choice"]] / min(medians.values()))
    assert auto["message"].startswith(f"precision auto: {auto['choice']} (")
    assert payload["cpu_model_name"] == pp.cpu_model_name()
    assert json.loads((tmp_path / "p.json").read_text())["results"]["infer"]["auto"]["choice"] == auto["choice"]


def test_probe_reads_a_3d_batch_and_keys_its_size():
    """A 3D network's (B, C, D, H, W) batch is the probe's reference: cut to the probe batch, reported by shape, and
    its in-plane size enters the cache key (before, 5-D inputs had no reference: shape '?', no size class)."""
    net = create_model("unet", num_modalities=1, in_channels=1, num_classes=2, base_width=2, depth=2, spatial_dims=3)
    x = torch.randn(3, 1, 8, 16, 16)
    result = pp.measure_precisions(net, (x,), [resolve_precision(CPU, "fp32")], purpose="infer", budget_s=5.0)
    assert result.shape == "2x1x8x16x16"
    assert pp._reference((x,)) is x
