# ViTDet-style Mask R-CNN on COCO 2017 (1x, box + mask AP): only the
# stride-16 map of the kiv student (kiv.AdapterViT level 2) feeds
# kiv.SimplePyramid (deconvs / max-pool to strides 4-32, plus P6), with
# ViTDet's heads: 2-conv RPN, 4conv1fc box head and normed mask head.
# Everything else (student, AMP, SyncBN, AdamW, data, 1x schedule) is the
# adapter-pyramid config's.
#   bash tools/dist_train.sh configs/mmdet/<this file> 8
_base_ = './mask-rcnn_kiv-adapter-vit-b14_fpn_8xb2-1x_coco.py'

norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    neck=dict(
        _delete_=True,
        type='kiv.SimplePyramid',
        in_channels=768,
        out_channels=256,
        in_index=2,  # stride 16 of the backbone's (0, 1, 2, 3) levels
        scale_factors=(4.0, 2.0, 1.0, 0.5),
        num_outs=5,
        norm_cfg=norm_cfg),
    rpn_head=dict(num_convs=2),
    roi_head=dict(
        bbox_head=dict(
            type='Shared4Conv1FCBBoxHead',
            conv_out_channels=256,
            norm_cfg=norm_cfg),
        mask_head=dict(norm_cfg=norm_cfg)))

# Besides the global token, the adapter's stride-4/8/32 output layers get
# no gradient: the neck reads level 2 only.
find_unused_parameters = True
