"""CondenseNet (Huang et al., CVPR 2018): a DenseNet whose 1x1 convolutions learn their groups.

The network itself is a plain DenseNet-style model (layer, block, network, then preset builders,
as torchvision's ``densenet.py``). The builders turn it into a CondenseNet the way a user would
turn their own model into one: ``lgconv.condensify`` makes the 1x1 convolutions learned group
convolutions (the paper's ``o % G`` layout, so finalize restores the channel order with a
permutation), and a second, opt-in Linear pass condenses the classifier to half its inputs as a
scheduled stage, so ``lgconv.finalize`` is exact for the whole network.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Sequence
from typing import Any

import torch
from torch import Tensor, fx, nn
from torch.nn.modules.module import _global_forward_hooks, _global_forward_pre_hooks

import lgconv
from lgconv import kernels
from lgconv.layers.fused_condensed_conv import DenseGroupedConv2d, Folded, FusedCondensedConv2d, is_pointwise
from lgconv.layers.native_grouped_conv import NativeGroupedConv2d, computes_grouped_conv3x3
from lgconv.layers.onnx_export import exporting_onnx
from lgconv.models.registry import register_model

CIFAR_GROWTH = (8, 16, 32)
IMAGENET_STAGES = (4, 6, 8, 10, 8)
IMAGENET_GROWTH = (8, 16, 32, 64, 128)
_BOTTLENECKS = "features.*.conv1"  # the 1x1 convolution of every dense layer
_SERVED_3X3 = (nn.Conv2d, NativeGroupedConv2d, DenseGroupedConv2d)  # convs whose forward is the plain conv


def _passes_input_on(module: nn.Module) -> bool:
    """An identity here: ``nn.Identity``, eval dropout, a ``Folded`` stand-in without ReLU."""
    if isinstance(module, Folded):
        return not module.relu
    return isinstance(module, nn.Identity) or (isinstance(module, nn.Dropout) and not module.training)


class DenseLayer(nn.Module):
    """BN-ReLU-(dropout)-1x1 conv to ``bottleneck * growth``, BN-ReLU-3x3 grouped conv to ``growth``.

    The ``growth`` new channels are concatenated to the input (dense connectivity).
    """

    def __init__(
        self, in_channels: int, growth: int, *, bottleneck: int, groups: int, drop_rate: float
    ) -> None:
        super().__init__()
        width = bottleneck * growth
        self.norm1 = nn.BatchNorm2d(in_channels)
        self.relu1 = nn.ReLU(inplace=True)
        self.drop = nn.Dropout(drop_rate) if drop_rate > 0 else nn.Identity()
        self.conv1 = nn.Conv2d(in_channels, width, kernel_size=1, bias=False)
        self.norm2 = nn.BatchNorm2d(width)
        self.relu2 = nn.ReLU(inplace=True)
        self.conv2 = nn.Conv2d(width, growth, kernel_size=3, padding=1, groups=groups, bias=False)

    def new_features(self, x: Tensor) -> Tensor:
        """The ``growth`` channels this layer adds to its input."""
        new = self.conv1(self.drop(self.relu1(self.norm1(x))))
        return self.conv2(self.relu2(self.norm2(new)))

    def forward(self, x: Tensor) -> Tensor:
        return torch.cat([x, self.new_features(x)], 1)

    __jit_ignored_attributes__ = ["_listed"]  # eager-only cache, not part of a scripted module

    def __setattr__(self, name: str, value: Any) -> None:
        self.__dict__.pop("_listed", None)  # a module was replaced (optimize_for_inference): list again
        super().__setattr__(name, value)

    def _modules_in_order(self) -> tuple[nn.Module, ...]:
        return (self.norm1, self.relu1, self.drop, self.conv1, self.norm2, self.relu2, self.conv2)

    @torch.jit.unused
    def _listing(self) -> tuple[tuple[tuple[nn.Module, bool], ...], tuple[Any, ...]]:
        """The modules in order, each with whether it passes its input on (``served_features``), and
        ``native_operands``' plan: listed once per mode, again after a module is replaced."""
        listed = self.__dict__.get("_listed")
        if listed is None or listed[0] != self.training:
            steps = tuple((m, _passes_input_on(m)) for m in self._modules_in_order())
            listed = (self.training, steps, self._served_plan(steps))
            self.__dict__["_listed"] = listed
        return listed[1], listed[2]

    @torch.jit.unused
    def _served_plan(self, steps: tuple[tuple[nn.Module, bool], ...]) -> tuple[Any, ...]:
        """What ``native_operands`` reads, if (left out what passes its input on) this layer is a 1x1
        ``FusedCondensedConv2d``, one ReLU and a plain 3x3 conv (stride 1, padding 1); else ``()``:
        the modules whose hooks it checks, the dicts that hold the tensors (read fresh every call),
        the two convs' groups and whether the 3x3 conv is the native one."""
        computing = [m for m, passes_on in steps if not passes_on]
        if self.training or len(computing) != 3:
            return ()
        conv1, relu, conv2 = computing
        relu_only = type(relu) is nn.ReLU or (type(relu) is Folded and relu.relu)
        pointwise = type(conv1) is FusedCondensedConv2d and is_pointwise(
            conv1.conv.kernel_size, conv1.conv.stride, conv1.conv.padding
        )
        window = type(conv2) in _SERVED_3X3 and computes_grouped_conv3x3(conv2)
        if not (relu_only and pointwise and window):
            return ()
        inner = conv1.conv
        watched = (self, *(m for m, _ in steps), inner)
        return (
            watched,
            conv1._modules,
            inner,
            conv1._buffers,
            inner._parameters,
            conv2._parameters,
            inner.groups,
            conv2.groups,
            type(conv2) is NativeGroupedConv2d,
        )

    @torch.jit.unused
    def native_operands(self) -> tuple[Any, ...] | None:
        """This layer's operands of ``lgconv::dense_block`` (``DenseBlock`` stacks them), or None
        where the op cannot serve it: in training, with other steps than a folded 1x1 conv, a ReLU
        and a 3x3 conv (``optimize_for_inference`` makes them), or while a hook watches a module."""
        _, plan = self._listing()
        if not plan or _global_forward_hooks or _global_forward_pre_hooks:
            return None
        watched, holder, inner, buffers, parameters, window, groups1, groups2, native2 = plan
        if holder.get("conv") is not inner:  # the 1x1's conv was replaced: plan again
            self.__dict__.pop("_listed")
            return self.native_operands()
        for module in watched:
            if module._forward_hooks or module._forward_pre_hooks:
                return None
        return (
            buffers["index"],
            parameters["weight"],
            parameters.get("bias"),
            buffers["low"],
            buffers["high"],
            buffers["order"],
            groups1,
            window["weight"],
            window.get("bias"),
            groups2,
            native2,
        )

    @torch.jit.unused
    def served_features(self, x: Tensor) -> Tensor:
        """``new_features`` without calling the modules that pass their input on unchanged (batch
        norms folded into a conv, identities, eval dropout) and with plain ReLUs as functions,
        while nothing hooks them: the same values, and for a batch-1 CondenseNet-86 about 25 us of
        Python less per layer. The preallocated path uses it."""
        steps, _ = self._listing()
        hooked = bool(_global_forward_hooks or _global_forward_pre_hooks)
        for module, passes_on in steps:
            if not (hooked or module._forward_hooks or module._forward_pre_hooks):
                if passes_on:
                    continue
                if type(module) is nn.ReLU:  # the function without the module call around it
                    x = torch.relu_(x) if module.inplace else torch.relu(x)
                    continue
            x = module(x)
        return x


class DenseBlock(nn.Sequential):
    """``num_layers`` dense layers of one growth rate: ``in + num_layers * growth`` channels out.

    Concatenating after every layer copies all earlier features again, quadratic in depth. Without
    autograd (``torch.no_grad`` / ``torch.inference_mode``) and with ``preallocate`` on, the block
    instead allocates its output once and each layer writes only its new channels into it, reading
    its input as a channel slice (same values, linear copying). Where every layer is served by the
    native kernels (``DenseLayer.native_operands``), on CPU and in eager mode, the whole block is one
    ``lgconv::dense_block`` call; compilers, tracers and hooks see the layers. Autograd keeps the
    concatenation, whose inputs stay untouched for the backward pass, and so does ONNX export:
    slice writes become ``ScatterND`` nodes, which ONNX Runtime runs far slower than ``Concat``.
    """

    def __init__(
        self,
        num_layers: int,
        in_channels: int,
        growth: int,
        *,
        bottleneck: int,
        groups: int,
        drop_rate: float,
        preallocate: bool = True,
    ) -> None:
        super().__init__()
        self.preallocate = preallocate
        for i in range(num_layers):
            layer = DenseLayer(
                in_channels + i * growth, growth, bottleneck=bottleneck, groups=groups, drop_rate=drop_rate
            )
            self.add_module(f"denselayer{i + 1}", layer)

    def forward(self, x: Tensor) -> Tensor:
        if not torch.jit.is_scripting():
            preallocating = self.preallocate and not torch.is_grad_enabled()
            if preallocating and not isinstance(x, fx.Proxy) and not exporting_onnx():
                return self._forward_preallocated(x)
        for layer in self:
            x = layer(x)
        return x

    @torch.jit.unused
    def _forward_preallocated(self, x: Tensor) -> Tensor:
        """The block's output allocated once; every layer reads a channel slice and fills the next one."""
        layers = list(self.children())
        operands = self._native_operands(x, layers)
        if operands is not None:
            return torch.ops.lgconv.dense_block(x, *operands)
        width = x.shape[1] + sum(layer.conv2.out_channels for layer in layers)
        channels_last = x.dim() == 4 and x.shape[1] > 1 and x.stride(1) == 1
        out = torch.empty(
            (x.shape[0], width, *x.shape[2:]),
            dtype=x.dtype,
            device=x.device,
            memory_format=torch.channels_last if channels_last else torch.contiguous_format,
        )
        filled = x.shape[1]
        out[:, :filled].copy_(x)
        for layer in layers:
            if layer._forward_hooks or layer._forward_pre_hooks:  # hooks see the layer's own output
                new = layer(out[:, :filled])[:, filled:]
            else:
                new = layer.served_features(out[:, :filled])
            out[:, filled : filled + new.shape[1]].copy_(new)
            filled += new.shape[1]
        return out

    def extra_repr(self) -> str:
        """Says when eager CPU inference runs the block as one ``lgconv::dense_block`` call."""
        served = kernels.native_loaded() and all(layer.native_operands() is not None for layer in self)
        return "served by lgconv::dense_block" if served else ""

    @torch.jit.unused
    def _native_operands(self, x: Tensor, layers: list[nn.Module]) -> list[list[Any]] | None:
        """``lgconv::dense_block``'s operand lists for ``x``, or None where the block is not served
        by it: off CPU, with the native kernels not loaded (this never builds them), under a compiler
        or tracer, or with a layer that is not served."""
        if x.device.type != "cpu" or torch.jit.is_tracing() or torch.compiler.is_compiling():
            return None
        if not kernels.native_loaded():
            return None
        per_layer = []
        for layer in layers:
            operands = layer.native_operands()
            if operands is None:
                return None
            per_layer.append(operands)
        return [list(column) for column in zip(*per_layer)]


class CondenseNet(nn.Module):
    """The DenseNet-style backbone of CondenseNet, before its 1x1 convolutions learn groups.

    Growth changes per block (exponentially increasing in the presets) and blocks are joined by
    2x2 average pooling only, so every block sees all earlier features. ``groups`` is the group
    count of the 3x3 convolutions; the builders condensify the 1x1 convolutions with the same G.

    Args:
        stages: dense layers per block.
        growth: growth rate per block (same length as ``stages``).
        num_classes: outputs of the linear classifier.
        groups: groups of every 3x3 convolution (1: dense).
        bottleneck: the 1x1 convolution widens to ``bottleneck * growth`` channels.
        stem_stride: stride of the 3x3 stem (1 for CIFAR, 2 for ImageNet).
        drop_rate: dropout before every 1x1 convolution.
        in_chans: input image channels.
    """

    def __init__(
        self,
        stages: Sequence[int],
        growth: Sequence[int],
        *,
        num_classes: int = 10,
        groups: int = 4,
        bottleneck: int = 4,
        stem_stride: int = 1,
        drop_rate: float = 0.0,
        in_chans: int = 3,
    ) -> None:
        super().__init__()
        if len(stages) != len(growth) or not stages:
            raise ValueError(
                f"stages {tuple(stages)} and growth {tuple(growth)} need the same, non-zero length"
            )
        for rate in growth:
            if rate % groups or (bottleneck * rate) % groups:
                raise ValueError(
                    f"groups={groups} must divide the growth rate {rate} and bottleneck width "
                    f"{bottleneck * rate} of every block; pick groups that divide {tuple(growth)}"
                )
        channels = 2 * growth[0]
        self.features = nn.Sequential()
        self.features.add_module(
            "conv0", nn.Conv2d(in_chans, channels, kernel_size=3, stride=stem_stride, padding=1, bias=False)
        )
        for i, (num_layers, rate) in enumerate(zip(stages, growth)):
            if i > 0:
                self.features.add_module(f"transition{i}", nn.AvgPool2d(kernel_size=2, stride=2))
            block = DenseBlock(
                num_layers, channels, rate, bottleneck=bottleneck, groups=groups, drop_rate=drop_rate
            )
            self.features.add_module(f"denseblock{i + 1}", block)
            channels += num_layers * rate
        self.features.add_module("norm_final", nn.BatchNorm2d(channels))
        self.features.add_module("relu_final", nn.ReLU(inplace=True))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(channels, num_classes)
        self.num_features = channels
        self._init_weights()

    def _init_weights(self) -> None:
        for module in self.modules():
            if isinstance(module, nn.Conv2d):
                nn.init.kaiming_normal_(module.weight)
            elif isinstance(module, nn.BatchNorm2d):
                nn.init.ones_(module.weight)
                nn.init.zeros_(module.bias)
            elif isinstance(module, nn.Linear):
                nn.init.zeros_(module.bias)

    def forward(self, x: Tensor) -> Tensor:
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


def condense_network(
    model: CondenseNet, *, groups: int, condense_factor: int, classifier_condense_factor: int
) -> CondenseNet:
    """Make the 1x1 convolutions learned group convolutions and the classifier a learned (G=1) linear.

    Only lgconv's public passes are used. A factor of 1 leaves those layers dense.
    """
    if condense_factor > 1:
        decisions = lgconv.plan(model, groups, condense_factor, include=_BOTTLENECKS, layout="interleaved")
        refused = [d for d in decisions.skipped if fnmatch.fnmatchcase(d.name, _BOTTLENECKS)]
        if refused:
            first = refused[0]
            raise ValueError(
                f"cannot condense {first.name} with groups={groups}, condense_factor={condense_factor}: "
                f"{first.reason}; pick groups and factor that divide every layer's channels"
            )
        lgconv.condensify(model, groups, condense_factor, include=_BOTTLENECKS, layout="interleaved")
    if classifier_condense_factor > 1:
        lgconv.condensify(
            model, groups=1, condense_factor=classifier_condense_factor, include="classifier", linear=True
        )
    return model


def _build(
    name: str,
    arch_kwargs: dict[str, Any],
    stages: Sequence[int],
    growth: Sequence[int],
    image_size: int,
    *,
    stem_stride: int,
    num_classes: int,
    groups: int = 4,
    condense_factor: int | None = None,
    classifier_condense_factor: int = 2,
    bottleneck: int = 4,
    drop_rate: float = 0.0,
    in_chans: int = 3,
) -> CondenseNet:
    """A condensified CondenseNet that records how ``lgconv.save`` / ``lgconv.load`` rebuild it."""
    model = CondenseNet(
        stages,
        growth,
        num_classes=num_classes,
        groups=groups,
        bottleneck=bottleneck,
        stem_stride=stem_stride,
        drop_rate=drop_rate,
        in_chans=in_chans,
    )
    condense_network(
        model,
        groups=groups,
        condense_factor=groups if condense_factor is None else condense_factor,
        classifier_condense_factor=classifier_condense_factor,
    )
    model.lgconv_arch = {"name": name, "kwargs": arch_kwargs}
    model.default_input_size = (in_chans, image_size, image_size)
    return model


def _cifar(
    name: str, stages: Sequence[int], growth: Sequence[int], num_classes: int, kwargs: Any
) -> CondenseNet:
    arch_kwargs = {"num_classes": num_classes, **kwargs}
    return _build(name, arch_kwargs, stages, growth, 32, stem_stride=1, num_classes=num_classes, **kwargs)


@register_model
def condensenet50(num_classes: int = 10, **kwargs: Any) -> CondenseNet:
    """CondenseNet-50 (CIFAR): 8-8-8 layers, growth 8-16-32; paper 0.22M params, 28.6M FLOPs.

    Keyword options of every preset: ``groups`` (G, default 4), ``condense_factor`` (C, default G;
    1 keeps the 1x1 convs dense), ``classifier_condense_factor`` (default 2; 1 keeps it dense),
    ``bottleneck`` (4), ``drop_rate`` (0), ``in_chans`` (3). The dense DenseNet-style baseline is
    ``groups=1, condense_factor=1, classifier_condense_factor=1``.
    """
    return _cifar("condensenet50", (8, 8, 8), CIFAR_GROWTH, num_classes, kwargs)


@register_model
def condensenet74(num_classes: int = 10, **kwargs: Any) -> CondenseNet:
    """CondenseNet-74 (CIFAR): 12-12-12 layers, growth 8-16-32; paper 0.41M params, 51.9M FLOPs."""
    return _cifar("condensenet74", (12, 12, 12), CIFAR_GROWTH, num_classes, kwargs)


@register_model
def condensenet86(num_classes: int = 10, **kwargs: Any) -> CondenseNet:
    """CondenseNet-86 (CIFAR): 14-14-14 layers, growth 8-16-32; paper 0.52M params, 65.8M FLOPs."""
    return _cifar("condensenet86", (14, 14, 14), CIFAR_GROWTH, num_classes, kwargs)


@register_model
def condensenet98(num_classes: int = 10, **kwargs: Any) -> CondenseNet:
    """CondenseNet-98 (CIFAR): 16-16-16 layers, growth 8-16-32; paper 0.65M params, 81.3M FLOPs."""
    return _cifar("condensenet98", (16, 16, 16), CIFAR_GROWTH, num_classes, kwargs)


@register_model
def condensenet110(num_classes: int = 10, **kwargs: Any) -> CondenseNet:
    """CondenseNet-110 (CIFAR): 18-18-18 layers, growth 8-16-32; paper 0.79M params, 98.2M FLOPs."""
    return _cifar("condensenet110", (18, 18, 18), CIFAR_GROWTH, num_classes, kwargs)


@register_model
def condensenet122(num_classes: int = 10, **kwargs: Any) -> CondenseNet:
    """CondenseNet-122 (CIFAR): 20-20-20 layers, growth 8-16-32; paper 0.95M params, 116.7M FLOPs."""
    return _cifar("condensenet122", (20, 20, 20), CIFAR_GROWTH, num_classes, kwargs)


@register_model
def condensenet182(num_classes: int = 10, **kwargs: Any) -> CondenseNet:
    """CondenseNet-182 (CIFAR): 30-30-30 layers, growth 12-24-48; paper 4.2M params, 513M FLOPs."""
    return _cifar("condensenet182", (30, 30, 30), (12, 24, 48), num_classes, kwargs)


@register_model
def condensenet74_imagenet(groups: int = 4, num_classes: int = 1000, **kwargs: Any) -> CondenseNet:
    """CondenseNet-74 (ImageNet, 224x224): 4-6-8-10-8 layers, growth 8-16-32-64-128, G = C = ``groups``.

    Paper: G=C=4 4.8M params, 529M FLOPs; G=C=8 2.9M params, 274M FLOPs.
    """
    arch_kwargs = {"groups": groups, "num_classes": num_classes, **kwargs}
    return _build(
        "condensenet74_imagenet",
        arch_kwargs,
        IMAGENET_STAGES,
        IMAGENET_GROWTH,
        224,
        stem_stride=2,
        num_classes=num_classes,
        groups=groups,
        **kwargs,
    )
