"""models/fold.py: folding eval-mode BN into the preceding conv keeps every model's output."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from modalseg.models import create_model
from modalseg.models.fold import fold_batch_norm
from modalseg.models.paper1 import PAPER1_MODELS
from modalseg.models.unpaired import UnpairedSegmenter


def _randomise_bn(model: nn.Module, seed: int = 0) -> None:
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            n = m.num_features
            m.running_mean.copy_(torch.rand(n, generator=g) * 2 - 1)
            m.running_var.copy_(torch.rand(n, generator=g) * 1.5 + 0.5)
            m.weight.data.copy_(torch.rand(n, generator=g) + 0.5)
            m.bias.data.copy_(torch.rand(n, generator=g) - 0.5)


@pytest.mark.parametrize("name", PAPER1_MODELS)
def test_folding_keeps_the_output_of_every_paper1_model(name):
    torch.manual_seed(0)
    m = 1 if name in ("unet", "unet_sa") else 2
    model = create_model(name, num_modalities=m, in_channels=1, num_classes=2, base_width=4).eval()
    _randomise_bn(model)
    x = torch.randn(2, m, 32, 32)
    with torch.no_grad():
        before = model(x)
    bn_before = sum(isinstance(q, nn.BatchNorm2d) for q in model.modules())
    folded = fold_batch_norm(model)
    bn_after = sum(isinstance(q, nn.BatchNorm2d) for q in model.modules())
    assert folded > 0 and bn_after == bn_before - folded
    with torch.no_grad():
        after = model(x)
    torch.testing.assert_close(after, before, rtol=1e-4, atol=1e-4)


def test_master_assistant_keeps_no_batch_norm_and_the_attention_maps():
    model = create_model("master_assistant", num_modalities=2, in_channels=1, num_classes=2, base_width=4).eval()
    _randomise_bn(model, seed=1)
    x = torch.randn(1, 2, 32, 32)
    with torch.no_grad():
        model(x)
    maps_before = [t.clone() for t in model.attention_maps["master"]]
    fold_batch_norm(model)
    assert not any(isinstance(q, nn.BatchNorm2d) for q in model.modules())  # SA gate BN(1) folded too
    with torch.no_grad():
        model(x)
    for a, b in zip(model.attention_maps["master"], maps_before, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_non_batch_norm_and_hooked_layers_are_left_alone():
    msbn = UnpairedSegmenter("unet", ["a", "b"], "msbn", num_classes=3, base_width=4)
    assert fold_batch_norm(msbn) == 0  # modality-specific BN is not a plain BatchNorm2d
    seq = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.ReLU(), nn.Conv2d(4, 4, 3), nn.BatchNorm2d(4))
    seen = []
    seq[4].register_forward_hook(lambda mod, i, o: seen.append(o))
    assert fold_batch_norm(seq) == 1
    assert isinstance(seq[1], nn.Identity) and isinstance(seq[4], nn.BatchNorm2d)
    seq(torch.randn(1, 1, 8, 8))
    assert len(seen) == 1
    inorm = create_model("fuse_unet", num_modalities=2, in_channels=1, num_classes=2, base_width=4, norm="instance")
    assert fold_batch_norm(inorm) == 0


def test_predict_loads_folded_networks_with_unchanged_probabilities(tmp_path):
    import numpy as np

    from modalseg.data.preprocess import PreprocessConfig
    from modalseg.training.checkpoint import save_checkpoint
    from modalseg.training.inference import predict_probabilities
    from modalseg.training.model_meta import ModelMeta, build_network
    from modalseg.training.precision import resolve_precision
    from modalseg.training.predict import load_models

    meta = ModelMeta(
        kind="paired", model="master_assistant", model_options={"base_width": 4}, modalities=["T1C", "T2W"],
        num_classes=2, labels={"background": 0, "mass": 1},
        preprocess=PreprocessConfig(target_size=(32, 32)).to_dict(), channel_names=["T1C", "T2W"],
    )
    torch.manual_seed(0)
    net = build_network(meta).eval()
    _randomise_bn(net, seed=2)
    save_checkpoint({"model_state": net.state_dict(), "meta": meta.to_dict()}, tmp_path / "model.pt")
    fp32 = resolve_precision(torch.device("cpu"), "fp32")
    (loaded,) = load_models([tmp_path / "model.pt"], fp32)
    assert not any(isinstance(q, nn.BatchNorm2d) for q in loaded.network.modules())
    images = np.random.default_rng(0).normal(size=(3, 2, 32, 32)).astype(np.float32)
    expected = predict_probabilities(net, images, fp32)
    got = predict_probabilities(loaded.network, images, fp32)
    np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-5)
