"""nnU-Net-style 3D planning (modalseg.models.planning): topology rules, the memory budget, the planned model."""

from __future__ import annotations

import json

import pytest
import torch

from modalseg.errors import ConfigError
from modalseg.models import create_model
from modalseg.models.planning import (
    MIN_BATCH_SIZE,
    Plan,
    activation_bytes,
    plan_3d,
    plan_topology,
    target_spacing,
)

TINY = dict(base_width=2)


def test_isotropic_spacing_gives_cubic_kernels_and_pooling_at_every_level() -> None:
    plan = plan_3d((1.0, 1.0, 1.0), (96, 96, 96), 2, memory_budget_mb=10_000, model="master_assistant", **TINY)
    assert plan.depth == 4
    assert plan.kernel_sizes == ((3, 3, 3),) * 5 and plan.strides == ((2, 2, 2),) * 4
    assert plan.patch_size == (96, 96, 96) and plan.divisibility == (16, 16, 16)
    assert plan.target_spacing == (1.0, 1.0, 1.0)


def test_thick_slices_pool_in_plane_until_the_spacing_catches_up() -> None:
    kernels, strides = plan_topology((6.5, 1.0, 1.0))
    # level spacings: (6.5, 1, 1) -> (6.5, 2, 2) -> (6.5, 4, 4): z within 2x from the third level on
    assert strides == ((1, 2, 2), (1, 2, 2), (2, 2, 2), (2, 2, 2))
    assert kernels == ((1, 3, 3), (1, 3, 3), (3, 3, 3), (3, 3, 3), (3, 3, 3))
    plan = plan_3d((6.5, 1.0, 1.0), (24, 160, 160), 2, memory_budget_mb=10_000, model="master_assistant", **TINY)
    assert plan.strides[:2] == ((1, 2, 2), (1, 2, 2)) and plan.kernel_sizes[:2] == ((1, 3, 3), (1, 3, 3))
    assert plan.kernel_sizes[2] == (3, 3, 3)
    # a spacing exactly 2x coarser is not "within 2x" (nnU-Net's strict ratio): one in-plane level first
    assert plan_topology((2.0, 1.0, 1.0))[1][:2] == ((1, 2, 2), (2, 2, 2))
    # an axis stops pooling once its feature map would drop below 4 voxels
    assert plan_topology((1.0, 1.0, 1.0), (12, 64, 64))[1] == ((2, 2, 2), (1, 2, 2), (1, 2, 2), (1, 2, 2))


def test_patch_fits_the_budget_and_a_larger_budget_never_gives_a_smaller_patch() -> None:
    previous = None
    for budget in (60, 120, 250, 500, 1000, 4000):
        plan = plan_3d((3.0, 0.8, 0.8), (40, 192, 192), 1, memory_budget_mb=budget, model="unet", base_width=4)
        assert plan.memory_mb <= budget and plan.batch_size >= MIN_BATCH_SIZE
        assert all(p % d == 0 for p, d in zip(plan.patch_size, plan.divisibility, strict=True))
        assert all(p <= -(-m // d) * d for p, m, d in zip(plan.patch_size, plan.median_shape, plan.divisibility,
                                                             strict=True))
        if previous is not None:
            assert all(a >= b for a, b in zip(plan.patch_size, previous.patch_size, strict=True)), (budget, plan)
        previous = plan
    assert previous is not None and previous.patch_size == (40, 192, 192)  # enough memory: the median shape


def test_the_estimate_is_what_autograd_keeps_on_a_real_device() -> None:
    """The meta-device measurement equals the bytes of the tensors a real CPU forward saves for backward."""
    options = dict(num_modalities=2, in_channels=1, num_classes=2, spatial_dims=3, base_width=2,
                   kernel_sizes=((1, 3, 3), (3, 3, 3), (3, 3, 3)), strides=((1, 2, 2), (2, 2, 2)))
    meta, params = activation_bytes("master_assistant", options, 2, (4, 16, 16))
    torch.manual_seed(0)
    net = create_model("master_assistant", **options).train()
    storages: dict[int, int] = {}

    def pack(t: torch.Tensor) -> torch.Tensor:
        if not (t.is_leaf and t.requires_grad):
            storages[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = net(torch.randn(1, 2, 4, 16, 16))
    assert out.shape == (1, 2, 4, 16, 16)
    assert meta == sum(storages.values())
    assert params == sum(p.numel() for p in net.parameters())
    # feature maps scale with the patch volume, per-channel statistics do not
    double, _ = activation_bytes("master_assistant", options, 2, (4, 16, 32))
    quadruple, _ = activation_bytes("master_assistant", options, 2, (8, 16, 32))
    assert 1.9 * meta < double < 2 * meta and quadruple - double == 2 * (double - meta)


def test_the_planned_model_builds_and_runs_a_patch_at_tiny_width() -> None:
    plan = plan_3d((6.5, 1.0, 1.0), (10, 48, 40), 3, memory_budget_mb=200, model="master_assistant", **TINY)
    net = plan.build_model()
    assert net.config.num_modalities == 3 and net.config.strides == plan.strides
    x = torch.randn(plan.batch_size, 3, *plan.patch_size)
    logits = net(x)
    assert logits.shape == (plan.batch_size, 2, *plan.patch_size)
    logits.mean().backward()
    # the options round-trip through JSON (a config file) and rebuild the same network
    options = json.loads(json.dumps(plan.model_options()))
    again = create_model("master_assistant", num_modalities=3, in_channels=1, num_classes=2, **options)
    assert list(again.state_dict()) == list(net.state_dict())


def test_unpaired_backbone_counts_one_forward_per_modality() -> None:
    one = plan_3d((1.0, 1.0, 1.0), (32, 32, 32), 1, memory_budget_mb=4000, model="unet", **TINY)
    three = plan_3d((1.0, 1.0, 1.0), (32, 32, 32), 3, memory_budget_mb=4000, model="unet", **TINY)
    assert (one.forwards_per_step, three.forwards_per_step) == (1, 3)
    assert one.patch_size == three.patch_size
    assert three.batch_size * 3 <= one.batch_size + 2  # three modalities' activations share the budget
    net = three.build_model()
    assert net.config.num_modalities == 1  # the shared backbone sees one modality per pass


def test_batch_size_is_capped_by_five_percent_of_the_dataset() -> None:
    free = plan_3d((1.0, 1.0, 1.0), (32, 32, 32), 1, memory_budget_mb=4000, model="unet", **TINY)
    capped = plan_3d((1.0, 1.0, 1.0), (32, 32, 32), 1, memory_budget_mb=4000, model="unet", num_cases=60, **TINY)
    assert free.batch_size > 3 and capped.batch_size == 3  # 5% of 60 cases of the patch's size
    assert capped.notes and "5%" in capped.notes[0]
    assert plan_3d((1.0, 1.0, 1.0), (32, 32, 32), 1, memory_budget_mb=4000, model="unet", num_cases=2,
                   **TINY).batch_size == MIN_BATCH_SIZE


def test_plan_round_trips_through_json() -> None:
    plan = plan_3d((2.5, 0.7, 0.7), (30, 100, 90), 2, memory_budget_mb=300, model="fuse_unet", **TINY)
    again = Plan.from_dict(json.loads(json.dumps(plan.to_dict())))
    assert again == plan
    assert "fuse_unet 3D plan" in plan.summary()


def test_refusals_are_one_line_config_errors() -> None:
    cases = [
        (lambda: plan_3d((1, 1, 1), (64, 64, 64), 2, memory_budget_mb=1000, model="fusenet"), "fixed topology"),
        (lambda: plan_3d((1, 1, 1), (64, 64, 64), 1, memory_budget_mb=1000, model="dilated_fcn"), "fixed topology"),
        (lambda: plan_3d((1, 1, 1), (64, 64, 64), 2, memory_budget_mb=1, model="master_assistant"), "does not hold"),
        (lambda: plan_3d((1, 0, 1), (64, 64, 64), 2, memory_budget_mb=100), "spacing_mm"),
        (lambda: plan_3d((1, 1, 1), (4, 4, 4), 2, memory_budget_mb=100, **TINY), "too small to pool"),
        (lambda: plan_3d((1, 1, 1), (64, 64, 64), 2, memory_budget_mb=100, model_options={"depth": 2}), "decides"),
    ]
    for call, message in cases:
        with pytest.raises(ConfigError, match=message) as err:
            call()
        assert "\n" not in str(err.value)


def test_target_spacing_median_and_the_anisotropic_10th_percentile() -> None:
    iso = [(1.0, 0.8, 0.8), (1.2, 0.9, 0.9), (1.1, 1.0, 1.0)]
    assert target_spacing(iso) == pytest.approx((1.1, 0.9, 0.9))
    thick = [(5.0, 1.0, 1.0), (6.5, 1.0, 1.0), (8.0, 1.0, 1.0), (3.0, 1.0, 1.0), (10.0, 1.0, 1.0)]
    z = target_spacing(thick)[0]
    assert z < 6.5 and z == pytest.approx(3.8)  # 10th percentile instead of the median 6.5
    # with shapes whose coarse axis is not short, the median stays (nnU-Net's second condition)
    assert target_spacing(thick, [(200, 256, 256)] * 5)[0] == pytest.approx(6.5)
