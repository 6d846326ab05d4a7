"""The networks whose features are cached: architectures, checkpoints and foreign weights.

- models: the architecture registry (small-resnet, the resnet50 family, and timm: / torchvision: names).
- hub: timm and torchvision models: backbones to pretrain, pretrained weights from the local caches.
- checkpoints: run folders, checkpoint files and their atomic writes; finding any member to load.
- torch_io: weights-only reads, writes that report a full disk, strict state loads.
- interop: foreign checkpoints (the paper's, AlgoPerf's, torchvision's) in and out.
"""
