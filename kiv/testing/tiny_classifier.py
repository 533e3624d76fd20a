"""A tiny teacher with a real classifier head, for inherited-head tests.

The teacher is a small random CNN whose linear head is fitted in closed form
(ridge regression on one-hot labels) to the colour classes of a procedural
image set, so it is a working classifier whose predictions spread over every
class. It is saved as a checkpoint and loaded back through the ``'module'``
teacher source, like any user network.
"""
from __future__ import annotations

import os
import os.path as osp

import numpy as np
import torch
from torch import Tensor, nn

#: class colours (RGB) of :func:`make_colour_images`
COLOURS = ((220, 40, 40), (40, 180, 60), (50, 70, 220), (230, 200, 40))


class TinyConvClassifier(nn.Module):
    """Two strided convs, global average pooling, a linear head.

    Attributes follow timm / EfficientNet naming so a ``kiv.Teacher`` can
    keep the head: ``features`` (B, C, H/4, W/4), ``pool`` (summary),
    ``head`` (logits).

    Args:
        num_classes (int): classes of the head. Defaults to 4.
        width (int): channels of the last conv. Defaults to 32.
    """

    def __init__(self, num_classes: int = 4, width: int = 32) -> None:
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, width // 2, 3, 2, 1), nn.ReLU(),
            nn.Conv2d(width // 2, width, 3, 2, 1), nn.ReLU())
        self.pool = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(1))
        self.head = nn.Linear(width, num_classes)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, num_classes)`` of normalised images ``(B, 3, H, W)``.
        """
        return self.head(self.pool(self.features(x)))


def make_colour_images(out_dir: str, num: int, size: int = 56,
                       seed: int = 0) -> tuple[list[str], np.ndarray]:
    """Write ``num`` PNG scenes whose class is the colour of a blob.

    Each image has a textured grey background and one ellipse of a class
    colour (:data:`COLOURS`, jittered) at a random place and size.

    Args:
        out_dir (str): folder to write ``img_<i>.png`` into (created).
        num (int): number of images.
        size (int): image side in pixels. Defaults to 56.
        seed (int): random seed. Defaults to 0.

    Returns:
        tuple[list[str], np.ndarray]: the file paths and the ``(num,)`` int
        class labels.
    """
    import cv2
    os.makedirs(out_dir, exist_ok=True)
    rng = np.random.default_rng(seed)
    paths, labels = [], []
    yy, xx = np.mgrid[:size, :size]
    for i in range(num):
        label = int(rng.integers(len(COLOURS)))
        img = rng.normal(128, 25, (size, size, 1)).clip(0, 255)
        img = np.repeat(img, 3, axis=2)
        cy, cx = rng.uniform(0.25, 0.75, 2) * size
        ry, rx = rng.uniform(0.2, 0.4, 2) * size
        mask = ((yy - cy) / ry)**2 + ((xx - cx) / rx)**2 <= 1
        colour = np.array(COLOURS[label]) + rng.normal(0, 15, 3)
        img[mask] = colour.clip(0, 255)
        path = osp.join(out_dir, f'img_{i:04d}.png')
        cv2.imwrite(path, img.astype(np.uint8)[..., ::-1])  # RGB -> BGR
        paths.append(path)
        labels.append(label)
    return paths, np.array(labels)


@torch.no_grad()
def fit_head(model: TinyConvClassifier, images: Tensor, labels: Tensor,
             ridge: float = 1e-2) -> float:
    """Fit ``model.head`` in closed form (ridge regression on one-hot).

    Args:
        model (TinyConvClassifier): the network; only ``head`` changes.
        images (Tensor): normalised images ``(N, 3, H, W)``.
        labels (Tensor): ``(N,)`` int class labels.
        ridge (float): L2 regularisation. Defaults to 1e-2.

    Returns:
        float: training accuracy of the fitted head (0..1).
    """
    feats = model.pool(model.features(images))
    feats = torch.cat([feats, feats.new_ones(len(feats), 1)], dim=1).double()
    onehot = nn.functional.one_hot(labels, model.head.out_features).double()
    gram = feats.T @ feats + ridge * torch.eye(feats.shape[1]).double()
    weights = torch.linalg.solve(gram, feats.T @ onehot)
    model.head.weight.copy_(weights[:-1].T.float())
    model.head.bias.copy_(weights[-1].float())
    return float((model(images).argmax(1) == labels).float().mean())


#: the ImageNet normalisation the colour classifier is fitted and run with
MEAN = (123.675, 116.28, 103.53)
STD = (58.395, 57.12, 57.375)


def save_colour_classifier(root: str, seed: int = 0) -> tuple[str, str]:
    """The colour classifier with its head fitted, saved under ``root``.

    Writes 96 colour images to ``root/colour/train``, fits the head of a
    seeded :class:`TinyConvClassifier` on them (training accuracy > 0.9) and
    saves its state dict to ``root/colour_cls_<seed>.pth``; an existing file
    is reused.

    Args:
        root (str): folder of the checkpoint and the images.
        seed (int): seed of the images and of the network. Defaults to 0.

    Returns:
        tuple[str, str]: the checkpoint path and the training image folder.
    """
    path = osp.join(root, f'colour_cls_{seed}.pth')
    train_dir = osp.join(root, 'colour', 'train')
    if not osp.exists(path):
        import cv2
        files, labels = make_colour_images(train_dir, 96, seed=seed)
        imgs = np.stack([cv2.imread(f)[..., ::-1] for f in files])
        x = torch.from_numpy(imgs.copy()).permute(0, 3, 1, 2).float()
        mean = torch.tensor(MEAN).view(1, 3, 1, 1)
        std = torch.tensor(STD).view(1, 3, 1, 1)
        torch.manual_seed(seed)
        net = TinyConvClassifier(num_classes=4)
        acc = fit_head(net, (x - mean) / std, torch.from_numpy(labels))
        assert acc > 0.9, acc
        torch.save(net.state_dict(), path)
    return path, train_dir


def colour_classifier_teacher(checkpoint: str) -> dict:
    """A ``kiv.Teacher`` config of the saved colour classifier: 56 px input,
    ``features`` as the dense features, ``pool`` as the summary and the
    kept ``head`` reading the summary.

    Args:
        checkpoint (str): a file written by :func:`save_colour_classifier`.
    """
    return dict(
        type='kiv.Teacher',
        source=dict(type='module',
                    factory='kiv.testing.tiny_classifier:TinyConvClassifier',
                    kwargs=dict(num_classes=4), checkpoint=checkpoint),
        mean=list(MEAN), std=list(STD),
        input_size=56,
        features=dict(layers=['features']),
        summary=dict(type='layer', name='pool'),
        head=dict(layer='head', input='summary'))
