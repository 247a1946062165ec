"""Models: frozen-BatchNorm ResNet18 from torchvision weights, GroupNorm ResNet18, targets."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord
from torch import nn
from torch.utils.data import TensorDataset
from torchvision.models import resnet18

from flair_fl.data.datasets import UserDataset
from flair_fl.data.hdf5 import FlairHDF5
from flair_fl.learning.local_training import LocalTraining, train_local
from flair_fl.models.params import load_trainable, trainable_state
from flair_fl.models.resnet import resnet18_groupnorm, resnet18_pretrained


@pytest.fixture(scope="module")
def torchvision_weights(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, nn.Module]:
    """A torchvision ResNet18 with random weights and non-trivial BN statistics, saved the
    way `torch.save(resnet18(weights=...).state_dict(), path)` saves ImageNet weights."""
    torch.manual_seed(0)
    reference = resnet18()
    reference.train()
    with torch.no_grad():  # give the running statistics values other than 0 / 1
        for _ in range(3):
            reference(torch.randn(8, 3, 32, 32) * 2 + 0.5)
    path = tmp_path_factory.mktemp("weights") / "resnet18.pth"
    torch.save(reference.state_dict(), path)
    return path, reference.eval()


def test_loaded_torchvision_weights_give_torchvision_outputs(torchvision_weights) -> None:  # type: ignore[no-untyped-def]
    path, reference = torchvision_weights
    ours = resnet18_pretrained(num_classes=17, pretrained=str(path))
    reference.fc, ours.fc = nn.Identity(), nn.Identity()  # compare the backbones
    x = torch.randn(4, 3, 64, 64)

    ours.train()  # frozen BN behaves like eval mode even in train mode
    with torch.no_grad():
        assert torch.allclose(ours(x), reference(x), atol=1e-5)


def test_frozen_batchnorm_statistics_never_change_or_travel(torchvision_weights) -> None:  # type: ignore[no-untyped-def]
    path, _ = torchvision_weights
    model = resnet18_pretrained(num_classes=3, pretrained=str(path))
    buffers = {
        k: v.clone()
        for k, v in model.state_dict().items()
        if "running_" in k or "num_batches_tracked" in k
    }
    data = TensorDataset(torch.randn(6, 3, 32, 32), (torch.rand(6, 3) > 0.5).float())

    train_local(
        model,
        data,
        LocalTraining(epochs=2, batch_size=3, lr=0.1),
        torch.device("cpu"),
        torch.Generator().manual_seed(0),
    )
    shipped = trainable_state(model)
    load_trainable(model, ArrayRecord(shipped).to_torch_state_dict())  # after "aggregation"

    assert buffers and not set(buffers) & set(shipped)
    after = model.state_dict()
    for key, value in buffers.items():
        assert torch.equal(after[key], value), key
    bn_weights = [k for k in shipped if k.startswith("bn1.") or ".bn" in k]
    assert bn_weights  # the affine parameters are trainable and federated, as in pfl-research


def test_missing_pretrained_weights_say_how_to_get_them(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"model\.pretrained=") as err:
        resnet18_pretrained(num_classes=17, pretrained=str(tmp_path / "nope.pth"))
    assert "IMAGENET1K_V1" in str(err.value)


def test_groupnorm_resnet_has_no_batchnorm_and_no_buffers() -> None:
    model = resnet18_groupnorm(num_classes=17)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
    assert sum(1 for _ in model.buffers()) == 0
    assert sum(isinstance(m, nn.GroupNorm) and m.num_groups == 32 for m in model.modules()) == 20


def test_fine_and_binary_targets(tiny_hdf5: Path) -> None:
    reader = FlairHDF5(tiny_hdf5)
    user = next(u for u, n in reader.population("train").items() if n >= 2)
    coarse = UserDataset.from_file(reader, "train", user, "coarse")
    fine = UserDataset.from_file(reader, "train", user, "fine")
    index = reader.label_mapping("coarse")["structure"]
    binary = UserDataset.from_file(reader, "train", user, "coarse", label_index=index)

    assert coarse.targets.shape == (len(coarse), reader.num_labels("coarse"))
    assert fine.targets.shape == (len(coarse), reader.num_labels("fine"))
    assert binary.targets.shape == (len(coarse), 1)
    assert torch.equal(binary.targets[:, 0], coarse.targets[:, index])
    names = reader.read_labels("train", user, "fine")
    fine_map = reader.label_mapping("fine")
    for row, labels in enumerate(names):
        expected = np.zeros(len(fine_map), dtype=np.float32)
        expected[[fine_map[name] for name in labels]] = 1
        assert fine.targets[row].numpy().tolist() == expected.tolist()
