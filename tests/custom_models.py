"""Models of the kind users bring (`custom:` specs): a small CIFAR CNN with its own transform (seed 004),
a tiny Robust-ResNet-style network (seed 002: patchify stem, large depth-wise kernels, few norms),
layers named like credentials (`key`, `token_mixer`), a slow CNN (runs that must still be going when a
test stops them), and a CNN whose transform runs out of memory once (a passing failure of the machine)."""

from __future__ import annotations

import os
import time
from pathlib import Path

import torch
from torch import nn
from torchvision.transforms import v2


class CifarCNN(nn.Module):
    def __init__(self, num_classes: int = 10) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 16, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(16, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
        )
        self.classifier = nn.Sequential(nn.Flatten(), nn.Linear(32 * 8 * 8, 64), nn.ReLU(), nn.Linear(64, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier(self.features(x))


def cifar_cnn():
    transform = v2.Compose([
        v2.Resize((32, 32), antialias=True), v2.PILToTensor(), v2.ToDtype(torch.float32, scale=True),
        v2.Normalize((0.4914, 0.4822, 0.4465), (0.2023, 0.1994, 0.2010)),
    ])
    return CifarCNN(), transform


class SlowCNN(CifarCNN):
    """The CIFAR CNN, a fifth of a second per forward pass: without using the CPU, a shard of 100 batches
    lasts 20 s."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        time.sleep(0.2)
        return super().forward(x)


def slow_cnn():
    return SlowCNN(), cifar_cnn()[1]


class DWBlock(nn.Module):
    """Depth-wise bottleneck with one norm and one activation (Robust ResNet's reduced design)."""

    def __init__(self, dim: int, kernel_size: int = 11) -> None:
        super().__init__()
        self.dwconv = nn.Conv2d(dim, dim, kernel_size, padding=kernel_size // 2, groups=dim)
        self.norm = nn.BatchNorm2d(dim)
        self.pwconv1 = nn.Conv2d(dim, dim * 4, 1)
        self.act = nn.ReLU(inplace=True)
        self.pwconv2 = nn.Conv2d(dim * 4, dim, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.pwconv2(self.act(self.pwconv1(self.norm(self.dwconv(x)))))


class TinyRobustResNet(nn.Module):
    def __init__(self, dims=(16, 32), depths=(1, 2), patch_size: int = 16, num_classes: int = 10) -> None:
        super().__init__()
        self.stem = nn.Conv2d(3, dims[0], kernel_size=patch_size, stride=patch_size)
        stages = []
        for i, (dim, depth) in enumerate(zip(dims, depths)):
            down = nn.Conv2d(dims[i - 1], dim, 2, stride=2) if i else nn.Identity()
            stages.append(nn.Sequential(down, *[DWBlock(dim) for _ in range(depth)]))
        self.stages = nn.Sequential(*stages)
        self.head = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(dims[-1], num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.stages(self.stem(x)))


def robust_resnet_tiny(pretrained: bool = False) -> nn.Module:
    if pretrained:
        raise ValueError("no pretrained weights for this test model")
    torch.manual_seed(0)
    return TinyRobustResNet()


class _NamedLikeCredentials(nn.Module):
    """Layers named as attention and MetaFormer blocks name theirs: `key`, `token_mixer`."""

    def __init__(self) -> None:
        super().__init__()
        self.key = nn.Conv2d(3, 4, 3, stride=4)
        self.token_mixer = nn.AdaptiveAvgPool2d(2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.token_mixer(self.key(x))


def named_like_credentials():
    torch.manual_seed(0)
    return _NamedLikeCredentials(), v2.Compose([v2.ToImage(), v2.Resize((32, 32)), v2.ToDtype(torch.float32, scale=True)])


class _OutOfMemoryOnce:
    """The CIFAR transform, raising MemoryError at the first image it meets that is not the plain grey test image;
    the file $NP_TEST_OOM_FLAG, created then, says it happened (DataLoader workers are processes)."""

    def __init__(self) -> None:
        self.inner = cifar_cnn()[1]

    def __call__(self, img):
        flag = Path(os.environ["NP_TEST_OOM_FLAG"])
        if img.getextrema() != ((128, 128),) * 3 and not flag.exists():
            flag.touch()
            raise MemoryError("host memory full for a moment")
        return self.inner(img)


def out_of_memory_once_cnn():
    return CifarCNN(), _OutOfMemoryOnce()
