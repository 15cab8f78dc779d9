"""The bench-zoo architectures (make bench-zoo, docs/zoo.md). Every name in MODELS is also a
zero-argument factory in this file, which is what the benchmark hands to the export CLI:
`python -m export --model bench/zoo_models.py:resnet50 --weights W --input-shape 3,224,224`.
Random init, nothing downloaded; the weights (calibrated BN statistics) come from --weights."""

# name (the library's own constructor name) -> (library, keyword arguments, what is special about it)
MODELS = {
    "resnet50": ("torchvision", {}, "bottleneck residual"),
    "resnext50_32x4d": ("torchvision", {}, "grouped conv"),
    "wide_resnet50_2": ("torchvision", {}, "wide bottleneck"),
    "inception_v3": ("torchvision", {}, "concat branches, aux head in train mode"),
    "densenet121": ("torchvision", {}, "BN after concat -> ReLU"),
    "googlenet": ("torchvision", {}, "concat branches"),
    "shufflenet_v2_x1_0": ("torchvision", {}, "channel shuffle"),
    "mobilenet_v2": ("torchvision", {}, "depthwise"),
    "mobilenet_v3_large": ("torchvision", {}, "SE, hardswish"),
    "mnasnet1_0": ("torchvision", {}, "state-dict version check"),
    "regnet_x_400mf": ("torchvision", {}, "grouped bottleneck"),
    "efficientnet_b0": ("torchvision", {}, "SE, SiLU, stochastic depth"),
    "vgg11_bn": ("torchvision", {}, "plain conv-BN, big FC"),
    "squeezenet1_1": ("torchvision", {}, "no BN"),
    "convnext_tiny": ("torchvision", {}, "no BN: LayerNorm, layer scale"),
    "dla34": ("timm", {}, "tree aggregation"),
    "rexnet_100": ("timm", {}, "SE, partial residual"),
    "lcnet_100": ("timm", {}, "depthwise, hardswish"),
    "selecsls42b": ("timm", {}, "concat"),
    "mobilenetv2_100": ("timm", {}, "BatchNormAct2d"),
    "efficientnet_lite0": ("timm", {}, "BatchNormAct2d, no SE"),
    "mixnet_s": ("timm", {}, "mixed-kernel concat -> BN"),
    "cspdarknet53": ("timm", {}, "cross-stage partial"),
    "cspresnet50": ("timm", {}, "cross-stage partial"),
    "hrnet_w18_small": ("timm", {}, "multi-resolution fuse"),
    "resnest14d": ("timm", {}, "split attention"),
    "repvgg_a2": ("timm", {}, "train-time branches: 3x3 + 1x1 + identity BN"),
    "ghostnet_100": ("timm", {}, "ghost modules"),
    "mobileone_s0": ("timm", {}, "train-time branches: 4 convs + scale + identity BN, summed in a loop"),
    "fastvit_t8": ("timm", {}, "train-time branches: x + layer_scale(mixer(x) - norm(x)), large kernels"),
    "repvit_m0_9": ("timm", {}, "train-time branches: BN after the sum, SE"),
}
# the re-parameterizable ones: bench-zoo compares our merge with timm's reparameterize_model (bench/zoo_merge.py)
REPARAM = ("repvgg_a2", "mobileone_s0", "fastvit_t8", "repvit_m0_9")


def build(name: str):
    library, kwargs, _ = MODELS[name]
    if library == "torchvision":
        import torchvision.models

        return getattr(torchvision.models, name)(weights=None, **kwargs)
    import timm

    return timm.create_model(name, pretrained=False, **kwargs)


def _factory(name: str):
    def factory():
        return build(name)
    factory.__name__ = factory.__qualname__ = name
    return factory


globals().update({name: _factory(name) for name in MODELS})
