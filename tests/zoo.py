"""A small model zoo that reproduces, in a few lines each, the idioms of the model families people train
(torchvision and timm cannot be imported beside the CPU build of torch used here, so the idioms are
written out): mode-dependent children and forwards, BatchNorm subclasses with their own activation,
pre-activation dense blocks, squeeze-excitation, grouped convolutions, a forward fx cannot trace.

Each entry of ``ZOO`` is (builder, input shape, expected FusionReport (plain, activation, residual)).
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class StochasticDepth(nn.Module):
    """torchvision's idiom: drop whole residual branches per sample in training, identity in eval."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        if not self.training or self.p == 0.0:
            return x
        keep = torch.empty((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device)
        return x * keep.bernoulli_(1.0 - self.p) / (1.0 - self.p)


def drop_path(x, p: float, training: bool):
    if p == 0.0 or not training:
        return x
    mask = torch.rand((x.shape[0],) + (1,) * (x.dim() - 1), dtype=x.dtype, device=x.device) >= p
    return x * mask.to(x.dtype) / (1.0 - p)


class DropPath(nn.Module):
    """timm's idiom: a module around a function that takes the training flag."""

    def __init__(self, p: float):
        super().__init__()
        self.p = p

    def forward(self, x):
        return drop_path(x, self.p, self.training)


class BatchNormAct2d(nn.BatchNorm2d):
    """timm's idiom: a BatchNorm2d subclass that applies its own dropout then activation, with the
    batch-norm arithmetic written out in its forward (branching on ``self.training``)."""

    def __init__(self, num_features, act_layer=nn.ReLU, apply_act=True, drop_layer=None, **kwargs):
        super().__init__(num_features, **kwargs)
        self.drop = drop_layer() if drop_layer is not None else nn.Identity()
        self.act = act_layer() if (act_layer is not None and apply_act) else nn.Identity()

    def forward(self, x):
        factor = 0.0 if self.momentum is None else self.momentum
        if self.training and self.track_running_stats and self.num_batches_tracked is not None:
            self.num_batches_tracked = self.num_batches_tracked + 1
            factor = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        use_batch = self.training or (self.running_mean is None and self.running_var is None)
        track = not self.training or self.track_running_stats
        x = F.batch_norm(x, self.running_mean if track else None, self.running_var if track else None,
                         self.weight, self.bias, use_batch, factor, self.eps)
        x = self.drop(x)
        return self.act(x)


class SyncBatchNormAct(nn.SyncBatchNorm):
    """timm's SyncBatchNorm variant: torch's forward, then ``drop`` and ``act`` when present (they are
    attached after construction, ``act`` first, so registration order is not call order)."""

    def forward(self, x):
        x = super().forward(x)
        if hasattr(self, "drop"):
            x = self.drop(x)
        if hasattr(self, "act"):
            x = self.act(x)
        return x


class ScaledBatchNorm2d(nn.BatchNorm2d):
    """A subclass whose forward is not "BN then children": convert_model must leave it alone."""

    def forward(self, x):
        return super().forward(x) * 2.0


class SqueezeExcite(nn.Module):
    def __init__(self, channels, reduced, gate=nn.Sigmoid):
        super().__init__()
        self.reduce = nn.Conv2d(channels, reduced, 1)
        self.act = nn.SiLU()
        self.expand = nn.Conv2d(reduced, channels, 1)
        self.gate = gate()

    def forward(self, x):
        s = x.mean((2, 3), keepdim=True)
        return x * self.gate(self.expand(self.act(self.reduce(s))))


class MBConv(nn.Module):
    """EfficientNet: expand (BN+SiLU), depthwise (BN+SiLU), squeeze-excitation, project (BN), and a
    stochastic-depth residual."""

    def __init__(self, channels, expand=2, p=0.5):
        super().__init__()
        mid = channels * expand
        self.expand = nn.Sequential(nn.Conv2d(channels, mid, 1, bias=False), nn.BatchNorm2d(mid), nn.SiLU())
        self.depthwise = nn.Sequential(nn.Conv2d(mid, mid, 3, padding=1, groups=mid, bias=False),
                                       nn.BatchNorm2d(mid), nn.SiLU())
        self.se = SqueezeExcite(mid, 2)
        self.project = nn.Sequential(nn.Conv2d(mid, channels, 1, bias=False), nn.BatchNorm2d(channels))
        self.stochastic_depth = StochasticDepth(p)

    def forward(self, x):
        out = self.project(self.se(self.depthwise(self.expand(x))))
        return self.stochastic_depth(out) + x


class EfficientNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.SiLU())
        self.blocks = nn.Sequential(MBConv(4), MBConv(4))
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        return self.head(self.blocks(self.stem(x)).mean((2, 3)))


class TimmBasicBlock(nn.Module):
    """timm's ResNet block: BatchNormAct2d after conv1, a BatchNormAct2d without activation after conv2,
    the add, then the block's own activation; and a DropPath on the residual branch."""

    def __init__(self, channels, drop_layer=None):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = BatchNormAct2d(channels, act_layer=nn.ReLU, drop_layer=drop_layer)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = BatchNormAct2d(channels, apply_act=False)
        self.drop_path = DropPath(0.25)
        self.act = nn.ReLU(inplace=True)

    def forward(self, x):
        shortcut = x
        x = self.bn2(self.conv2(self.bn1(self.conv1(x))))
        x = self.drop_path(x) + shortcut
        return self.act(x)


class TimmLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), BatchNormAct2d(4, act_layer=nn.SiLU))
        self.block1 = TimmBasicBlock(4)
        self.block2 = TimmBasicBlock(4, drop_layer=lambda: nn.Dropout(0.3))
        self.neck = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), BatchNormAct2d(4, act_layer=nn.PReLU))
        self.odd = ScaledBatchNorm2d(4)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        return self.head(self.odd(self.neck(self.block2(self.block1(self.stem(x))))).mean((2, 3)))


class DenseLayer(nn.Module):
    """DenseNet: pre-activation BN-ReLU-conv over the concatenation of every earlier feature map."""

    def __init__(self, cin, growth):
        super().__init__()
        self.norm1 = nn.BatchNorm2d(cin)
        self.relu1 = nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, growth, 1, bias=False)
        self.norm2 = nn.BatchNorm2d(growth)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(growth, growth, 3, padding=1, bias=False)

    def forward(self, features):
        x = torch.cat(features, 1)
        x = self.conv1(self.relu1(self.norm1(x)))
        return self.conv2(self.relu2(self.norm2(x)))


class DenseNetLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.layer1 = DenseLayer(4, 2)
        self.layer2 = DenseLayer(6, 2)
        self.norm = nn.BatchNorm2d(8)
        self.head = nn.Linear(8, 5)

    def forward(self, x):
        features = [self.stem(x)]
        features.append(self.layer1(features))
        features.append(self.layer2(features))
        return self.head(F.relu(self.norm(torch.cat(features, 1))).mean((2, 3)))


class MobileNetV3Block(nn.Module):
    def __init__(self, channels):
        super().__init__()
        self.block = nn.Sequential(
            nn.Conv2d(channels, channels * 2, 1, bias=False), nn.BatchNorm2d(channels * 2), nn.Hardswish(),
            nn.Conv2d(channels * 2, channels * 2, 3, padding=1, groups=channels * 2, bias=False),
            nn.BatchNorm2d(channels * 2), nn.Hardswish(),
            SqueezeExcite(channels * 2, 2, gate=nn.Hardsigmoid),
            nn.Conv2d(channels * 2, channels, 1, bias=False), nn.BatchNorm2d(channels))

    def forward(self, x):
        return x + self.block(x)


class MobileNetV3Like(nn.Module):
    def __init__(self):
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.Hardswish(),
                                      MobileNetV3Block(4))
        self.classifier = nn.Sequential(nn.Linear(4, 6), nn.BatchNorm1d(6), nn.Hardswish(), nn.Linear(6, 5))

    def forward(self, x):
        return self.classifier(self.features(x).mean((2, 3)))


class ResNeXtBlock(nn.Module):
    """torchvision's Bottleneck with groups: one ReLU module used three times, a downsample BN."""

    def __init__(self, cin, width, cout, groups=2, stride=2):
        super().__init__()
        self.conv1 = nn.Conv2d(cin, width, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.conv2 = nn.Conv2d(width, width, 3, stride, 1, groups=groups, bias=False)
        self.bn2 = nn.BatchNorm2d(width)
        self.conv3 = nn.Conv2d(width, cout, 1, bias=False)
        self.bn3 = nn.BatchNorm2d(cout)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x):
        identity = self.downsample(x)
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        out += identity
        return self.relu(out)


class ResNeXtLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.conv1 = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(4)
        self.relu = nn.ReLU(inplace=True)
        self.layer1 = nn.Sequential(ResNeXtBlock(4, 4, 8))
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        x = self.layer1(self.relu(self.bn1(self.conv1(x))))
        return self.fc(x.mean((2, 3)))


class SamePadConvBn(nn.Module):
    """TensorFlow-style "same" padding computed from the input's size in Python: torch.fx cannot trace
    this forward (math.ceil of a traced size)."""

    def __init__(self, cin, cout, stride=2):
        super().__init__()
        self.stride = stride
        self.conv = nn.Conv2d(cin, cout, 3, stride, bias=False)
        self.bn = nn.BatchNorm2d(cout)
        self.act = nn.ReLU()

    def forward(self, x):
        ih, iw = x.shape[-2:]
        pad_h = max((math.ceil(ih / self.stride) - 1) * self.stride + 3 - ih, 0)
        pad_w = max((math.ceil(iw / self.stride) - 1) * self.stride + 3 - iw, 0)
        x = F.pad(x, [pad_w // 2, pad_w - pad_w // 2, pad_h // 2, pad_h - pad_h // 2])
        return self.act(self.bn(self.conv(x)))


class AuxInTraining(nn.Module):
    """A block whose own forward reads ``self.training`` (an auxiliary branch only while training)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, x):
        out = self.relu(self.bn(self.conv(x)))
        if self.training:
            out = out + 0.5 * x
        return out


class UntraceableLike(nn.Module):
    def __init__(self):
        super().__init__()
        self.stem = SamePadConvBn(3, 4)
        self.body = nn.Sequential(nn.Conv2d(4, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU(),
                                  AuxInTraining(4))
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        return self.head(self.body(self.stem(x)).mean((2, 3)))


class TreeBlock(nn.Module):
    """DLA's block (timm ``dla.py``): the shortcut is an optional argument, replaced by the input when None;
    ``children`` is an argument the block never reads. fx traces ``shortcut`` as a proxy, for which
    ``is None`` is False: the graph is only the branch for a given shortcut."""

    def __init__(self, channels):
        super().__init__()
        self.conv1 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn1 = nn.BatchNorm2d(channels)
        self.conv2 = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn2 = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU(inplace=True)

    def forward(self, x, shortcut=None, children=None):
        if shortcut is None:
            shortcut = x
        out = self.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        out += shortcut
        return self.relu(out)


class TreeLike(nn.Module):
    """A parent that calls one block with a projected shortcut and the other with None (and a list)."""

    def __init__(self, both_ways=True):
        super().__init__()
        self.both_ways = both_ways
        self.stem = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1, bias=False), nn.BatchNorm2d(4), nn.ReLU())
        self.project = nn.Sequential(nn.Conv2d(4, 4, 1, bias=False), nn.BatchNorm2d(4))
        self.tree1 = TreeBlock(4)
        self.tree2 = TreeBlock(4)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        x = self.stem(x)
        y = self.tree1(x, self.project(x) if self.both_ways else None)
        y = self.tree2(y, None, [x, y])
        return self.head(y.mean((2, 3)))


class OptionalScaleBlock(nn.Module):
    """Optional arguments that change the computation when given (FiLM-style conditioning)."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.act = nn.SiLU()

    def forward(self, x, scale=None, shift=None):
        out = self.act(self.bn(self.conv(x)))
        if scale is not None:
            out = out * scale
        if shift is not None:
            out = out + shift
        return out


class PairBlock(nn.Module):
    """``*args`` unpacked into two names, the second added after the BN: a residual taken from ``*args``."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)
        self.relu = nn.ReLU()

    def forward(self, *inputs):
        x, skip = inputs
        return self.relu(self.bn(self.conv(x)) + skip)


class ListBlock(nn.Module):
    """A list argument indexed in the graph, one of its elements the residual."""

    def __init__(self, channels):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 1, bias=False)
        self.bn = nn.BatchNorm2d(channels)

    def forward(self, features):
        return F.relu(self.bn(self.conv(features[0])) + features[1])


class ConcatInputLayer(nn.Module):
    """torchvision's ``_DenseLayer``: a tensor or a list of tensors, told apart by ``isinstance``."""

    def __init__(self, cin, growth):
        super().__init__()
        self.norm = nn.BatchNorm2d(cin)
        self.relu = nn.ReLU(inplace=True)
        self.conv = nn.Conv2d(cin, growth, 1, bias=False)

    def forward(self, features):
        if isinstance(features, torch.Tensor):
            features = [features]
        return self.conv(self.relu(self.norm(torch.cat(features, 1))))


class ArgumentsLike(nn.Module):
    """Each of the blocks above, called in every way its signature allows."""

    def __init__(self):
        super().__init__()
        self.stem = nn.Conv2d(3, 4, 3, padding=1, bias=False)
        self.film = OptionalScaleBlock(4)
        self.pair = PairBlock(4)
        self.listed = ListBlock(4)
        self.dense = ConcatInputLayer(4, 4)
        self.dense_list = ConcatInputLayer(8, 4)
        self.head = nn.Linear(4, 5)

    def forward(self, x):
        x = self.stem(x)
        gate = torch.sigmoid(x.mean((2, 3), keepdim=True))
        x = self.film(x) + self.film(x, gate) + self.film(x, None, gate) + self.film(x, gate, 0.5)
        x = self.pair(x, x * 0.5)
        x = self.listed([x, x.flip(-1)])
        y = self.dense(x)
        y = self.dense_list([x, y])
        return self.head(y.mean((2, 3)))


# name -> (builder, input shape, expected (plain, activation, residual))
ZOO = {
    # stem BN+SiLU; per block: expand BN+SiLU, depthwise BN+SiLU, project BN plain (stochastic depth between it
    # and the add)
    "efficientnet": (EfficientNetLike, (4, 3, 6, 6), (2, 5, 0)),
    # stem BNAct(SiLU) fused; block1: bn1 act fused, bn2 (no act) + drop_path: plain; block2: bn1 has a real
    # Dropout before its act: BN converted, act kept as a module; bn2 plain; neck: PReLU is not supported:
    # plain, act kept; the ScaledBatchNorm2d subclass is left alone (not counted)
    "timm": (TimmLike, (4, 3, 6, 6), (4, 2, 0)),
    # norm1/norm2 of each layer with ReLU modules; the final norm with a functional relu
    "densenet": (DenseNetLike, (4, 3, 6, 6), (0, 5, 0)),
    # stem BN+Hardswish; block: BN+Hardswish twice, the last BN ends the Sequential and takes the add of the
    # parent (x + block(x)) as its residual (the Sequential's graph inlined); classifier BatchNorm1d+Hardswish
    "mobilenetv3": (MobileNetV3Like, (4, 3, 6, 6), (0, 4, 1)),
    # stem BN+ReLU; block: bn1, bn2 + ReLU, bn3 + add + ReLU; the downsample BN is the add's other operand
    "resnext": (ResNeXtLike, (4, 3, 8, 8), (1, 3, 1)),
    # stem: untraceable, BN swapped only; body: BN+ReLU in the Sequential; AuxInTraining reads self.training,
    # so its BN is swapped only
    "untraceable": (UntraceableLike, (4, 3, 7, 7), (2, 1, 0)),
    # stem BN+ReLU; each tree block: bn1+ReLU, bn2+add+ReLU; the projection BN is tree1's shortcut (plain).
    # tree2 is called with shortcut=None: its fused forward never applies, every call runs its own forward
    "tree": (TreeLike, (4, 3, 6, 6), (1, 3, 2)),
    "tree-none-only": (lambda: TreeLike(both_ways=False), (4, 3, 6, 6), (1, 3, 2)),
    # film BN+SiLU (fused under "scale and shift are tensors or None as traced"), pair BN+add+ReLU (the
    # residual from *inputs), listed BN+add+relu (the residual from the list), the dense layers BN+ReLU
    "arguments": (ArgumentsLike, (4, 3, 6, 6), (0, 3, 2)),
}


class ShapeChecked(nn.Module):
    """Hugging Face's patch embeddings (LeViT's): a shape check on the argument that raises, then conv -> BN
    -> act. Here, not in a test module: pytest rewrites a test module's ``assert`` into other code."""

    def __init__(self, how="if"):
        super().__init__()
        self.how, self.channels = how, 3
        self.conv = nn.Conv2d(3, 4, 1, bias=False)
        self.bn = nn.BatchNorm2d(4)
        self.act = nn.Hardswish()

    def forward(self, x):
        if self.how == "if":
            channels = x.shape[1]
            if channels != self.channels:
                raise ValueError(f"expected {self.channels} channels, got {channels}")
        elif self.how == "assert":
            assert x.dim() == 4 and x.size(1) == self.channels, "a 4-d input with 3 channels"
        else:  # "not"
            if not x.ndim == 4:
                raise TypeError("4-d only")
        return self.act(self.bn(self.conv(x)))


class ListFedDenseLayer(nn.Module):
    """torchvision's ``_DenseLayer`` idiom: a tensor or a list of earlier feature maps (told apart by
    ``isinstance``), concatenated by a method, a checkpointing branch behind a flag, dropout behind a rate;
    torchvision's ``_DenseBlock`` calls every layer with the list."""

    def __init__(self, cin, growth, memory_efficient=False):
        super().__init__()
        self.norm1, self.relu1 = nn.BatchNorm2d(cin), nn.ReLU(inplace=True)
        self.conv1 = nn.Conv2d(cin, 2 * growth, 1, bias=False)
        self.norm2, self.relu2 = nn.BatchNorm2d(2 * growth), nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(2 * growth, growth, 3, padding=1, bias=False)
        self.drop_rate, self.memory_efficient = 0.0, memory_efficient

    def bottleneck(self, inputs):
        return self.conv1(self.relu1(self.norm1(torch.cat(inputs, 1))))

    def forward(self, input):
        features = [input] if isinstance(input, torch.Tensor) else input
        if self.memory_efficient and any(f.requires_grad for f in features):
            raise NotImplementedError("checkpointing is not modelled here")
        out = self.conv2(self.relu2(self.norm2(self.bottleneck(features))))
        if self.drop_rate > 0:
            out = F.dropout(out, p=self.drop_rate, training=self.training)
        return out


class ListFedDenseBlock(nn.ModuleDict):
    def __init__(self, layers, cin, growth):
        super().__init__()
        for i in range(layers):
            self.add_module(f"denselayer{i + 1}", ListFedDenseLayer(cin + i * growth, growth))

    def forward(self, init_features):
        features = [init_features]
        for _, layer in self.items():
            features.append(layer(features))
        return torch.cat(features, 1)
