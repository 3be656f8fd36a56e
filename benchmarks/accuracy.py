"""Accuracy at equal FLOPs on Fashion-MNIST: learned group convolutions against the alternatives.

    python benchmarks/accuracy.py                          # every arm, 3 seeds (about 70 min, 1 thread)
    python benchmarks/accuracy.py --arms lgc,dense --seeds 1
    python benchmarks/accuracy.py --epochs 16 --arms dense,lgc   # a longer recipe, its own JSON
    python benchmarks/accuracy.py --smoke --json /tmp/accuracy.json   # seconds: tiny data and network
    python benchmarks/accuracy_report.py                   # docs/results.md and the plot from the JSON

Every arm trains one network of the same CondenseNet family with one recipe (optimizer, cosine
learning rate per step, batch, augmentation, epochs; the fine-tuning arms get half the epochs at a
lower learning rate) and is evaluated in the form it would be served in (finalized for learned
groups). Runs go seed by seed over every arm, so partial results stay comparable; each finished run
is written to the JSON at once (atomically) and skipped when the script is started again.

Adding an arm: write a function ``(context, seed) -> ArmResult`` and decorate it with ``@arm(...)``.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import statistics
import sys
import time
import warnings
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import click
import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "examples"))  # its idx reader
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # this checkout's lgconv first

import _timing  # noqa: E402
from _cli import CliError, run  # noqa: E402
from condensenet_data import DataUnavailable, read_idx  # noqa: E402

import lgconv  # noqa: E402
from lgconv.models.condensenet import CondenseNet, condense_network  # noqa: E402

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
FILES = {
    "train": ("train-images-idx3-ubyte", "train-labels-idx1-ubyte"),
    "test": ("t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"),
}
DEFAULT_JSON = Path(__file__).resolve().parent / "results" / "accuracy.json"
IMAGE_SIZE = (1, 28, 28)


@dataclass(frozen=True)
class Recipe:
    """Everything that defines the comparison; results made under another recipe are not mixed in."""

    model: str = "condensenet50 (8-8-8 layers, growth 8-16-32), 3x3 stem with stride 2 (28x28 -> 14x14)"
    stages: tuple[int, ...] = (8, 8, 8)
    growth: tuple[int, ...] = (8, 16, 32)
    stem_stride: int = 2
    bottleneck: int = 4
    groups: int = 4
    condense_factor: int = 4
    classifier_condense_factor: int = 2
    train_images: int = 4000
    test_images: int = 10000
    subset_seed: int = 0
    epochs: int = 8
    finetune_epochs: int = 4
    batch_size: int = 64
    lr: float = 0.1
    finetune_lr: float = 0.05
    momentum: float = 0.9
    nesterov: bool = True
    weight_decay: float = 1e-4
    crop_padding: int = 2
    flip: bool = True
    condense_end: float = 0.5
    finetune_condense_end: float = 0.5
    recalibration_batches: int = 8
    drop_eval_images: int = 1000
    flop_tolerance: float = 0.05
    threads: int = 1

    def key(self) -> str:
        """A short hash naming this recipe's saved weights."""
        text = json.dumps(dataclasses.asdict(self), sort_keys=True)
        return hashlib.sha256(text.encode()).hexdigest()[:10]


SMOKE = Recipe(
    model="smoke: 2-2-2 layers, growth 4-8-16, stem stride 2",
    stages=(2, 2, 2),
    growth=(4, 8, 16),
    train_images=96,
    test_images=64,
    epochs=2,
    finetune_epochs=1,
    batch_size=32,
    recalibration_batches=2,
    drop_eval_images=32,
)


# --- data ---------------------------------------------------------------------------------------
@dataclass
class Data:
    """uint8 images (N, 1, 28, 28) and int64 labels, plus the training subset's mean and std."""

    train_images: Tensor
    train_labels: Tensor
    test_images: Tensor
    test_labels: Tensor
    mean: float
    std: float

    def inputs(self, images: Tensor) -> Tensor:
        return (images.float().div(255) - self.mean) / self.std


def load_data(folder: Path, recipe: Recipe) -> Data:
    """A fixed random training subset (the same for every arm and seed) and the first test images."""
    split = {}
    try:
        for name, (images, labels) in FILES.items():
            split[name] = (
                torch.from_numpy(read_idx(folder, images).copy()).unsqueeze(1),
                torch.from_numpy(read_idx(folder, labels).astype(np.int64)),
            )
    except DataUnavailable as error:
        raise CliError(str(error)) from None
    keep = torch.randperm(len(split["train"][1]), generator=torch.Generator().manual_seed(recipe.subset_seed))
    keep = keep[: recipe.train_images]
    train_images, train_labels = split["train"][0][keep], split["train"][1][keep]
    values = train_images.float().div(255)
    return Data(
        train_images,
        train_labels,
        split["test"][0][: recipe.test_images],
        split["test"][1][: recipe.test_images],
        float(values.mean()),
        float(values.std()),
    )


def augment(images: Tensor, generator: torch.Generator, padding: int, flip: bool) -> Tensor:
    """Random crop from the zero-padded uint8 images, then random horizontal flips."""
    n, _, height, width = images.shape
    if padding:
        padded = F.pad(images[:, 0], (padding,) * 4)
        dy, dx = torch.randint(0, 2 * padding + 1, (2, n), generator=generator)
        rows = (dy[:, None] + torch.arange(height))[:, :, None]
        cols = (dx[:, None] + torch.arange(width))[:, None, :]
        images = padded[torch.arange(n)[:, None, None], rows, cols].unsqueeze(1)
    if flip:
        mirror = torch.rand(n, generator=generator) < 0.5
        images = torch.where(mirror[:, None, None, None], images.flip(3), images)
    return images


@torch.no_grad()
def accuracy(model: nn.Module, data: Data, limit: int | None = None) -> float:
    """Top-1 accuracy in eval mode on the first ``limit`` test images (all by default)."""
    was_training = model.training
    model.eval()
    images, labels = data.test_images[:limit], data.test_labels[:limit]
    correct = 0
    for start in range(0, len(labels), 500):
        logits = model(data.inputs(images[start : start + 500]))
        correct += int((logits.argmax(1) == labels[start : start + 500]).sum())
    model.train(was_training)
    return correct / len(labels)


# --- networks -----------------------------------------------------------------------------------
def backbone(recipe: Recipe, *, groups: int, growth: tuple[int, ...] | None = None) -> CondenseNet:
    """The shared DenseNet-style network (3x3 convolutions with ``groups``), before any condensing."""
    return CondenseNet(
        recipe.stages,
        growth or recipe.growth,
        num_classes=10,
        groups=groups,
        bottleneck=recipe.bottleneck,
        stem_stride=recipe.stem_stride,
        in_chans=IMAGE_SIZE[0],
    )


def learned_group_network(recipe: Recipe, learned_3x3: bool = False) -> CondenseNet:
    """CondenseNet: learned group 1x1 convolutions (G = C), grouped 3x3, condensed classifier;
    ``learned_3x3``: the 3x3 convs start dense and learn their groups too, instead of fixed groups."""
    model = condense_network(
        backbone(recipe, groups=1 if learned_3x3 else recipe.groups),
        groups=recipe.groups,
        condense_factor=recipe.condense_factor,
        classifier_condense_factor=recipe.classifier_condense_factor,
    )
    return learn_3x3_groups(model, recipe) if learned_3x3 else model


def dense_layers(model: nn.Module) -> Iterator[nn.Module]:
    return (m for m in model.modules() if type(m).__name__ == "DenseLayer")


def learn_3x3_groups(model: CondenseNet, recipe: Recipe) -> CondenseNet:
    """Make the dense 3x3 convs of ``model`` learned group convs (G = C = ``groups``): lgc's FLOPs."""
    for layer in dense_layers(model):
        layer.conv2 = lgconv.LearnedGroupConv.from_conv(
            layer.conv2, learned_groups=recipe.groups, condense_factor=recipe.condense_factor
        )
    return model


def flops(model: nn.Module) -> int:
    """fvcore multiply-adds of one 1x28x28 image through ``model`` as it is (adds and pools count 0)."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", "not counted", UserWarning)
        return lgconv.count_flops(model, IMAGE_SIZE).total


def params(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


class ChannelShuffle(nn.Module):
    """ShuffleNet's shuffle: channel ``g * n + i`` of ``groups`` blocks goes to ``i * groups + g``."""

    def __init__(self, groups: int) -> None:
        super().__init__()
        self.groups = groups

    def forward(self, x: Tensor) -> Tensor:
        n, c, h, w = x.shape
        return x.view(n, self.groups, c // self.groups, h, w).transpose(1, 2).reshape(n, c, h, w)


def fixed_group_network(recipe: Recipe, shuffle: bool) -> CondenseNet:
    """The learned-group network's shape with standard grouped 1x1 convs (optionally shuffled after)."""
    model = backbone(recipe, groups=recipe.groups)
    for layer in dense_layers(model):
        conv = layer.conv1
        grouped = nn.Conv2d(conv.in_channels, conv.out_channels, 1, groups=recipe.groups, bias=False)
        nn.init.kaiming_normal_(grouped.weight)
        layer.conv1 = nn.Sequential(grouped, ChannelShuffle(recipe.groups)) if shuffle else grouped
    return model


def finalized_flops(recipe: Recipe) -> int:
    """FLOPs of the finalized learned-group network: its structure does not depend on the weights."""
    model = learned_group_network(recipe)
    for _, layer in lgconv.scheduler.learned_group_layers(model):
        while not layer.fully_condensed:
            layer.condense()
    return flops(lgconv.finalize(model.eval()))


def narrow_growth(recipe: Recipe, target: int) -> tuple[int, ...]:
    """Growth rates of a dense network (G = C = 1) whose FLOPs are closest to ``target``."""

    def cost(growth: tuple[int, ...]) -> int:
        return flops(backbone(recipe, groups=1, growth=growth).eval())

    def scaled(scale: float) -> tuple[int, ...]:
        return tuple(max(1, round(scale * g)) for g in recipe.growth)

    low, high = 0.05, 1.0
    for _ in range(12):
        middle = (low + high) / 2
        low, high = (middle, high) if cost(scaled(middle)) < target else (low, middle)
    base = scaled(high)
    neighbours = {
        tuple(max(1, g + d) for g, d in zip(base, delta))
        for delta in np.ndindex(*(3,) * len(base))
        for delta in [tuple(d - 1 for d in delta)]
    }
    return min(neighbours, key=lambda growth: abs(cost(growth) - target))


def prune_channels(model: nn.Module, target: int) -> tuple[nn.Module, float]:
    """Torch-Pruning's L2-magnitude channel pruning (same ratio per layer) to at most ``target`` FLOPs."""
    import torch_pruning as tp

    example = torch.zeros(1, *IMAGE_SIZE)
    low, high, best = 0.0, 0.95, None
    for _ in range(10):
        ratio = (low + high) / 2
        candidate = copy.deepcopy(model)
        pruner = tp.pruner.MagnitudePruner(
            candidate,
            example,
            importance=tp.importance.MagnitudeImportance(p=2),
            pruning_ratio=ratio,
            ignored_layers=[candidate.classifier],
        )
        pruner.step()
        if flops(candidate.eval()) > target:
            low = ratio
        else:
            high, best = ratio, candidate
    if best is None:
        raise RuntimeError(f"channel pruning could not reach {target} FLOPs")
    return best.train(), high


# --- training -----------------------------------------------------------------------------------
@dataclass
class Training:
    """What one training loop reports: time, steps and, per condensing drop, the test accuracy."""

    train_s: float
    steps: int
    drops: list[dict[str, Any]] = field(default_factory=list)


def train(
    model: nn.Module,
    context: Context,
    seed: int,
    *,
    epochs: int,
    lr: float,
    condense_end: float | None = None,
    condense_start: float = 0.0,
    recalibrate: bool = False,
    lasso: float = 0.0,
    importance: str = "weight",
    schedule: str = "stepwise",
    desc: str = "",
) -> Training:
    """SGD with a per-step cosine learning rate; condensing when ``model`` has learned group layers.

    The accuracy after each drop is recorded for the stepwise schedule only (a gradual one drops a
    few inputs at most steps)."""
    recipe, data = context.recipe, context.data
    generator = torch.Generator().manual_seed(seed)
    recalibration_order = torch.Generator().manual_seed(seed + 10_000)
    batch, count = recipe.batch_size, len(data.train_labels)
    steps_per_epoch = math.ceil(count / batch)
    total = epochs * steps_per_epoch
    optimizer = torch.optim.SGD(
        model.parameters(),
        lr=lr,
        momentum=recipe.momentum,
        nesterov=recipe.nesterov,
        weight_decay=recipe.weight_decay,
    )
    lr_schedule = torch.optim.lr_scheduler.LambdaLR(
        optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
    )
    condenser = None
    if lgconv.scheduler.learned_group_layers(model):
        condenser = lgconv.CondensationScheduler(
            model,
            total,
            lasso=lasso,
            condense_end=condense_end or recipe.condense_end,
            condense_start=condense_start,
            importance=importance,
            schedule=schedule,
        )
    training = Training(0.0, total)
    model.train()
    bar = tqdm(total=total, desc=desc, leave=False, disable=not context.progress, mininterval=5)
    start = time.perf_counter()
    for _ in range(epochs):
        order = torch.randperm(count, generator=generator)
        for first in range(0, count, batch):
            index = order[first : first + batch]
            images = augment(data.train_images[index], generator, recipe.crop_padding, recipe.flip)
            loss = F.cross_entropy(model(data.inputs(images)), data.train_labels[index])
            if condenser is not None and lasso:
                loss = loss + condenser.lasso_loss()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            lr_schedule.step()
            bar.update()
            if condenser is not None and condenser.step() and schedule == "stepwise":
                training.drops.append(
                    drop_record(model, context, condenser, recalibrate, recalibration_order)
                )
    training.train_s = time.perf_counter() - start
    bar.close()
    return training


def recalibration_batches(context: Context, generator: torch.Generator) -> list[Tensor]:
    """``recalibration_batches`` random, unaugmented training batches, normalized."""
    recipe, data = context.recipe, context.data
    size = recipe.recalibration_batches * recipe.batch_size
    index = torch.randperm(len(data.train_labels), generator=generator)[:size]
    return list(data.inputs(data.train_images[index]).split(recipe.batch_size))


def drop_record(
    model: nn.Module,
    context: Context,
    condenser: lgconv.CondensationScheduler,
    recalibrate: bool,
    generator: torch.Generator,
) -> dict[str, Any]:
    """Test accuracy right after a drop (on ``drop_eval_images``), and after recalibration if asked."""
    limit = context.recipe.drop_eval_images
    record = {"step": condenser.step_count, "stale_accuracy": accuracy(model, context.data, limit)}
    if recalibrate:
        lgconv.recalibrate_batch_norm(model, recalibration_batches(context, generator))
        record["recalibrated_accuracy"] = accuracy(model, context.data, limit)
    return record


# --- arms ---------------------------------------------------------------------------------------
@dataclass
class ArmResult:
    """The trained network in the form it is evaluated in, with its training report."""

    model: nn.Module
    epochs: int
    training: Training
    extra: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class Arm:
    name: str
    summary: str
    run: Callable[[Context, int], ArmResult]
    needs: tuple[str, ...] = ()  # arms whose run of the same seed this one starts from


ARMS: dict[str, Arm] = {}


def arm(name: str, summary: str, needs: tuple[str, ...] = ()) -> Callable[[Callable], Callable]:
    """Register an arm; arms run in registration order within one seed."""

    def register(run: Callable[[Context, int], ArmResult]) -> Callable[[Context, int], ArmResult]:
        ARMS[name] = Arm(name, summary, run, needs)
        return run

    return register


@dataclass
class Context:
    """Data, recipe and the shared reference numbers of one invocation."""

    recipe: Recipe
    data: Data
    weights: Path
    progress: bool
    _cache: dict[str, Any] = field(default_factory=dict)

    @property
    def lgc_flops(self) -> int:
        """FLOPs of the finalized ``lgc`` network: the budget of the equal-FLOP arms."""
        if "lgc_flops" not in self._cache:
            self._cache["lgc_flops"] = finalized_flops(self.recipe)
        return self._cache["lgc_flops"]

    def dense_weights(self, seed: int) -> Path:
        return self.weights / f"dense-seed{seed}.pt"

    def trained_dense(self, seed: int) -> CondenseNet:
        path = self.dense_weights(seed)
        if not path.exists():
            raise CliError(f"no trained dense network for seed {seed} at {path}; run --arms dense first")
        model = backbone(self.recipe, groups=1)
        model.load_state_dict(torch.load(path, weights_only=True))
        return model


def groups_and_factors(model: nn.Module) -> dict[str, list[int]]:
    """Each learned group layer's (G, C), by name: what a FLOP budget chose, for the JSON."""
    return {
        name: [layer.learned_groups, layer.condense_factor]
        for name, layer in lgconv.scheduler.learned_group_layers(model)
    }


def _learned(
    context: Context,
    seed: int,
    recalibrate: bool,
    desc: str,
    budget: bool = False,
    full_classifier: bool = False,
    learned_3x3: bool = False,
    **schedule: Any,
) -> ArmResult:
    """The lgc network trained from scratch; ``schedule``: scheduler options changed from the paper's.

    ``budget``: its 1x1 layers' (G, C) re-chosen per layer by ``lgconv.condensify(target_flops=...)``
    at the uniform network's finalized FLOPs (3x3 convs and classifier as in ``lgc``).
    ``full_classifier``: the classifier is left dense, as in the fixed-group arms.
    ``learned_3x3``: the 3x3 convs start dense and learn their groups too, instead of fixed groups."""
    torch.manual_seed(seed)
    recipe = context.recipe
    if full_classifier:
        recipe = dataclasses.replace(recipe, classifier_condense_factor=1)
    model = learned_group_network(recipe, learned_3x3)
    factors: dict[str, list[int]] = {}
    if budget:
        model = lgconv.condensify(model, target_flops=context.lgc_flops, input_size=IMAGE_SIZE, kxk=False)
        factors = groups_and_factors(model)
    training = train(
        model,
        context,
        seed,
        epochs=context.recipe.epochs,
        lr=context.recipe.lr,
        recalibrate=recalibrate,
        desc=desc,
        **schedule,
    )
    lgconv.finalize(model)
    extra: dict[str, Any] = dict(schedule)
    if full_classifier:
        extra["classifier_condense_factor"] = 1
    if learned_3x3:
        extra["learned_3x3"] = True
    if factors:
        extra["groups_and_factors"] = factors
    if recalibrate:  # the finalized network's statistics, re-estimated once more
        extra["accuracy_before_final_recalibration"] = accuracy(model, context.data)
        lgconv.recalibrate_batch_norm(
            model, recalibration_batches(context, torch.Generator().manual_seed(seed))
        )
    return ArmResult(model, context.recipe.epochs, training, extra)


@arm("lgc", "CondenseNet: learned group 1x1 convs (G = C = 4) condensed in training, finalized")
def run_lgc(context: Context, seed: int) -> ArmResult:
    return _learned(context, seed, recalibrate=False, desc=f"lgc seed {seed}")


@arm("dense", "the same architecture with G = C = 1: dense 1x1 and 3x3 convs, full classifier")
def run_dense(context: Context, seed: int) -> ArmResult:
    torch.manual_seed(seed)
    model = backbone(context.recipe, groups=1)
    training = train(
        model, context, seed, epochs=context.recipe.epochs, lr=context.recipe.lr, desc=f"dense {seed}"
    )
    path = context.dense_weights(seed)
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path.with_suffix(".tmp"))
    os.replace(path.with_suffix(".tmp"), path)
    return ArmResult(model, context.recipe.epochs, training)


@arm("dense_equal_flops", "a dense DenseNet-style network narrowed in growth to the lgc network's FLOPs")
def run_dense_equal_flops(context: Context, seed: int) -> ArmResult:
    if "growth" not in context._cache:
        context._cache["growth"] = narrow_growth(context.recipe, context.lgc_flops)
    growth = context._cache["growth"]
    torch.manual_seed(seed)
    model = backbone(context.recipe, groups=1, growth=growth)
    training = train(
        model, context, seed, epochs=context.recipe.epochs, lr=context.recipe.lr, desc=f"narrow {seed}"
    )
    return ArmResult(model, context.recipe.epochs, training, {"growth": list(growth)})


def _fixed(context: Context, seed: int, shuffle: bool) -> ArmResult:
    torch.manual_seed(seed)
    model = fixed_group_network(context.recipe, shuffle)
    training = train(
        model, context, seed, epochs=context.recipe.epochs, lr=context.recipe.lr, desc=f"fixed {seed}"
    )
    return ArmResult(model, context.recipe.epochs, training)


@arm("fixed_groups", "the lgc network with standard grouped 1x1 convs (G = 4), no shuffle")
def run_fixed_groups(context: Context, seed: int) -> ArmResult:
    return _fixed(context, seed, shuffle=False)


@arm("fixed_groups_shuffle", "standard grouped 1x1 convs (G = 4) with a channel shuffle after each")
def run_fixed_groups_shuffle(context: Context, seed: int) -> ArmResult:
    return _fixed(context, seed, shuffle=True)


@arm(
    "channel_pruning",
    "the trained dense network pruned by channels (Torch-Pruning, L2 magnitude) to the lgc FLOPs, fine-tuned",
    needs=("dense",),
)
def run_channel_pruning(context: Context, seed: int) -> ArmResult:
    return _channel_pruning(context, seed, context.recipe.finetune_lr)


def _channel_pruning(context: Context, seed: int, lr: float) -> ArmResult:
    """The trained dense network of ``seed`` pruned by channels to lgc's FLOPs, fine-tuned at ``lr``."""
    model, ratio = prune_channels(context.trained_dense(seed), context.lgc_flops)
    epochs = context.recipe.finetune_epochs
    training = train(model, context, seed, epochs=epochs, lr=lr, desc=f"pruned {seed}")
    return ArmResult(model, epochs, training, {"pruning_ratio": round(ratio, 4), "lr": lr})


@arm(
    "lgc_finetune",
    "the trained dense network condensified (1x1 and 3x3 learned groups, G = C = 4) in a short fine-tune",
    needs=("dense",),
)
def run_lgc_finetune(context: Context, seed: int) -> ArmResult:
    recipe = context.recipe
    return _finetune(context, seed, recipe.finetune_lr, recipe.finetune_condense_end, "lgc_finetune")


def _finetune(
    context: Context,
    seed: int,
    lr: float,
    condense_end: float,
    name: str,
    full_classifier: bool = False,
    **options: str,
) -> ArmResult:
    """The trained dense network of ``seed`` condensified and fine-tuned for ``finetune_epochs``;
    ``options``: the scheduler's ``importance`` / ``schedule`` when not the paper's;
    ``full_classifier``: the classifier is left dense (as ``channel_pruning`` leaves it)."""
    recipe = context.recipe
    classifier_factor = 1 if full_classifier else recipe.classifier_condense_factor
    model = condense_network(
        context.trained_dense(seed),
        groups=recipe.groups,
        condense_factor=recipe.condense_factor,
        classifier_condense_factor=classifier_factor,
    )
    learn_3x3_groups(model, recipe)  # the dense 3x3 convs learn their groups too: lgc's FLOPs
    torch.manual_seed(seed)
    training = train(
        model,
        context,
        seed,
        epochs=recipe.finetune_epochs,
        lr=lr,
        condense_end=condense_end,
        desc=f"{name} {seed}",
        **options,
    )
    extra: dict[str, Any] = {"lr": lr, "condense_end": condense_end, **options}
    if full_classifier:
        extra["classifier_condense_factor"] = 1
    return ArmResult(lgconv.finalize(model), recipe.finetune_epochs, training, extra)


@arm("lgc_bn_recal", "lgc with batch norm re-estimated after every condensing drop and after finalize")
def run_lgc_bn_recal(context: Context, seed: int) -> ArmResult:
    return _learned(context, seed, recalibrate=True, desc=f"lgc_bn_recal seed {seed}")


@arm("lgc_budget", "lgc's FLOPs, each 1x1 layer's (G, C) chosen by lgconv's FLOP budget, not G = C = 4")
def run_lgc_budget(context: Context, seed: int) -> ArmResult:
    return _learned(context, seed, recalibrate=False, desc=f"lgc_budget seed {seed}", budget=True)


@arm("lgc_early_condense", "lgc with the last drop at 25% of training (paper: 50%): 3x more steps after it")
def run_lgc_early_condense(context: Context, seed: int) -> ArmResult:
    return _learned(context, seed, recalibrate=False, desc=f"lgc_early seed {seed}", condense_end=0.25)


@arm(
    "lgc_lasso", "lgc with the group-lasso term (weight 5e-5, 5x the paper's ImageNet value) while condensing"
)
def run_lgc_lasso(context: Context, seed: int) -> ArmResult:
    return _learned(context, seed, recalibrate=False, desc=f"lgc_lasso seed {seed}", lasso=5e-5)


@arm(
    "lgc_finetune_early",
    "lgc_finetune with its last drop at 25% of the fine-tune (not 50%): more steps to recover",
    needs=("dense",),
)
def run_lgc_finetune_early(context: Context, seed: int) -> ArmResult:
    return _finetune(context, seed, context.recipe.finetune_lr, 0.25, "lgc_finetune_early")


@arm(
    "lgc_finetune_lr01",
    "lgc_finetune at the from-scratch learning rate 0.1 (not 0.05)",
    needs=("dense",),
)
def run_lgc_finetune_lr01(context: Context, seed: int) -> ArmResult:
    return _finetune(
        context, seed, context.recipe.lr, context.recipe.finetune_condense_end, "lgc_finetune_lr01"
    )


@arm(
    "lgc_activation",
    "lgc with data-aware importance: |W| times each input's RMS over training batches (Wanda-style)",
)
def run_lgc_activation(context: Context, seed: int) -> ArmResult:
    return _learned(
        context, seed, recalibrate=False, desc=f"lgc_activation seed {seed}", importance="activation"
    )


@arm("lgc_gradual", "lgc with gradual (cubic) drops over the first 25% of training instead of 3 cuts")
def run_lgc_gradual(context: Context, seed: int) -> ArmResult:
    return _learned(
        context,
        seed,
        recalibrate=False,
        desc=f"lgc_gradual seed {seed}",
        schedule="gradual",
        condense_end=0.25,
    )


@arm("lgc_gradual_end05", "lgc with gradual (cubic) drops over the first half of training (the paper's end)")
def run_lgc_gradual_end05(context: Context, seed: int) -> ArmResult:
    return _learned(
        context, seed, recalibrate=False, desc=f"lgc_gradual_end05 seed {seed}", schedule="gradual"
    )


@arm(
    "lgc_finetune_activation",
    "lgc_finetune with data-aware importance (|W| times each input's RMS over training batches)",
    needs=("dense",),
)
def run_lgc_finetune_activation(context: Context, seed: int) -> ArmResult:
    recipe = context.recipe
    return _finetune(
        context,
        seed,
        recipe.finetune_lr,
        recipe.finetune_condense_end,
        "lgc_finetune_activation",
        importance="activation",
    )


@arm(
    "lgc_finetune_gradual",
    "lgc_finetune with gradual (cubic) drops over the first 25% of the fine-tune",
    needs=("dense",),
)
def run_lgc_finetune_gradual(context: Context, seed: int) -> ArmResult:
    return _finetune(
        context, seed, context.recipe.finetune_lr, 0.25, "lgc_finetune_gradual", schedule="gradual"
    )


@arm(
    "lgc_finetune_combined",
    "lgc_finetune with data-aware importance, the last drop at 25% and lr 0.1",
    needs=("dense",),
)
def run_lgc_finetune_combined(context: Context, seed: int) -> ArmResult:
    return _finetune(context, seed, context.recipe.lr, 0.25, "lgc_finetune_combined", importance="activation")


@arm(
    "lgc_finetune_combined_gradual",
    "lgc_finetune_combined with gradual (cubic) drops over the first 25%",
    needs=("dense",),
)
def run_lgc_finetune_combined_gradual(context: Context, seed: int) -> ArmResult:
    return _finetune(
        context,
        seed,
        context.recipe.lr,
        0.25,
        "lgc_finetune_combined_gradual",
        importance="activation",
        schedule="gradual",
    )


@arm(
    "lgc_finetune_early_lr01",
    "lgc_finetune with the last drop at 25% and lr 0.1 (both earlier changes together, weight importance)",
    needs=("dense",),
)
def run_lgc_finetune_early_lr01(context: Context, seed: int) -> ArmResult:
    return _finetune(context, seed, context.recipe.lr, 0.25, "lgc_finetune_early_lr01")


@arm(
    "lgc_finetune_gradual_lr01",
    "lgc_finetune with gradual (cubic) drops over the first 25% and lr 0.1 (weight importance)",
    needs=("dense",),
)
def run_lgc_finetune_gradual_lr01(context: Context, seed: int) -> ArmResult:
    return _finetune(context, seed, context.recipe.lr, 0.25, "lgc_finetune_gradual_lr01", schedule="gradual")


@arm(
    "lgc_finetune_gradual_lr01_end0125",
    "lgc_finetune_gradual_lr01 with its gradual drops over the first 12.5% (half an epoch), not 25%",
    needs=("dense",),
)
def run_lgc_finetune_gradual_lr01_end0125(context: Context, seed: int) -> ArmResult:
    name = "lgc_finetune_gradual_lr01_end0125"
    return _finetune(context, seed, context.recipe.lr, 0.125, name, schedule="gradual")


@arm(
    "lgc_finetune_gradual_lr01_end05",
    "lgc_finetune_gradual_lr01 with its gradual drops over the first half (the paper's end), not 25%",
    needs=("dense",),
)
def run_lgc_finetune_gradual_lr01_end05(context: Context, seed: int) -> ArmResult:
    name = "lgc_finetune_gradual_lr01_end05"
    return _finetune(context, seed, context.recipe.lr, 0.5, name, schedule="gradual")


@arm(
    "lgc_gradual_warmup",
    "lgc_gradual with half an epoch of dense training first: drops over 6.25%-25% of training, not 0-25%",
)
def run_lgc_gradual_warmup(context: Context, seed: int) -> ArmResult:
    return _learned(
        context,
        seed,
        recalibrate=False,
        desc=f"lgc_gradual_warmup seed {seed}",
        schedule="gradual",
        condense_start=0.0625,
        condense_end=0.25,
    )


@arm(
    "lgc_finetune_gradual_lr02",
    "lgc_finetune_gradual_lr01 at twice its learning rate: 0.2 (gradual drops over the first 25%)",
    needs=("dense",),
)
def run_lgc_finetune_gradual_lr02(context: Context, seed: int) -> ArmResult:
    return _finetune(context, seed, 0.2, 0.25, "lgc_finetune_gradual_lr02", schedule="gradual")


@arm(
    "lgc_finetune_budget",
    "lgc_finetune_gradual_lr01 with each conv's G = C chosen by condensify(target_flops=lgc's) "
    "on the trained weights",
    needs=("dense",),
)
def run_lgc_finetune_budget(context: Context, seed: int) -> ArmResult:
    return _finetune_budget(context, seed, context.recipe.lr, "lgc_finetune_budget")


def _finetune_budget(context: Context, seed: int, lr: float, name: str) -> ArmResult:
    """The trained dense network condensified by lgconv's FLOP budget (1x1 and 3x3 convs, factors
    1-8 per layer from the trained weights' importance), then the gradual fine-tune at ``lr``."""
    recipe = context.recipe
    model = lgconv.condensify(
        context.trained_dense(seed), target_flops=context.lgc_flops, input_size=IMAGE_SIZE, kxk=True
    )
    factors = groups_and_factors(model)
    torch.manual_seed(seed)
    training = train(
        model,
        context,
        seed,
        epochs=recipe.finetune_epochs,
        lr=lr,
        condense_end=0.25,
        schedule="gradual",
        desc=f"{name} {seed}",
    )
    extra = {"lr": lr, "condense_end": 0.25, "schedule": "gradual", "groups_and_factors": factors}
    return ArmResult(lgconv.finalize(model), recipe.finetune_epochs, training, extra)


@arm(
    "lgc_gradual_full_classifier",
    "lgc_gradual with the classifier left dense (as in fixed_groups) instead of condensed to half",
)
def run_lgc_gradual_full_classifier(context: Context, seed: int) -> ArmResult:
    return _learned(
        context,
        seed,
        recalibrate=False,
        desc=f"lgc_gradual_full_classifier seed {seed}",
        full_classifier=True,
        schedule="gradual",
        condense_end=0.25,
    )


@arm(
    "lgc_gradual_learned_3x3",
    "lgc_gradual_full_classifier with the 3x3 convs dense at first, learning their groups too (G = C = 4)",
)
def run_lgc_gradual_learned_3x3(context: Context, seed: int) -> ArmResult:
    return _learned(
        context,
        seed,
        recalibrate=False,
        desc=f"lgc_gradual_learned_3x3 seed {seed}",
        full_classifier=True,
        learned_3x3=True,
        schedule="gradual",
        condense_end=0.25,
    )


@arm(
    "lgc_finetune_gradual_lr01_full_classifier",
    "lgc_finetune_gradual_lr01 with the classifier left dense (as channel_pruning leaves it)",
    needs=("dense",),
)
def run_lgc_finetune_gradual_lr01_full_classifier(context: Context, seed: int) -> ArmResult:
    name = "lgc_finetune_gradual_lr01_full_classifier"
    return _finetune(context, seed, context.recipe.lr, 0.25, name, full_classifier=True, schedule="gradual")


@arm(
    "channel_pruning_lr01",
    "channel_pruning fine-tuned at lr 0.1, the rate the lgc fine-tune arms do best at (not 0.05)",
    needs=("dense",),
)
def run_channel_pruning_lr01(context: Context, seed: int) -> ArmResult:
    return _channel_pruning(context, seed, context.recipe.lr)


@arm(
    "lgc_finetune_budget_lr005",
    "lgc_finetune_budget at channel_pruning's learning rate 0.05 (not 0.1)",
    needs=("dense",),
)
def run_lgc_finetune_budget_lr005(context: Context, seed: int) -> ArmResult:
    return _finetune_budget(context, seed, context.recipe.finetune_lr, "lgc_finetune_budget_lr005")


# --- the suite ----------------------------------------------------------------------------------
def run_one(context: Context, name: str, seed: int) -> dict[str, Any]:
    """Train and evaluate one arm for one seed; the JSON row."""
    start = time.perf_counter()
    result = ARMS[name].run(context, seed)
    model = result.model.eval()
    row = {
        "arm": name,
        "seed": seed,
        "test_accuracy": accuracy(model, context.data),
        "flops": flops(model),
        "flops_target": context.lgc_flops,
        "params": params(model),
        "epochs": result.epochs,
        "steps": result.training.steps,
        "train_s": round(result.training.train_s, 1),
        "wall_s": round(time.perf_counter() - start, 1),
        **result.extra,
    }
    if result.training.drops:
        row["drops"] = result.training.drops
    return row


def write_results(path: Path, payload: dict[str, Any]) -> None:
    """Write the JSON atomically: a kill leaves the previous file intact."""
    path.parent.mkdir(parents=True, exist_ok=True)
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(json.dumps(payload, indent=1) + "\n")
    os.replace(temporary, path)


def load_results(path: Path, recipe: Recipe) -> dict[str, Any]:
    recipe_json = json.loads(json.dumps(dataclasses.asdict(recipe)))
    if not path.exists():
        return {
            "machine": {**_timing.machine(), "threads": recipe.threads},
            "recipe": recipe_json,
            "runs": [],
        }
    payload = json.loads(path.read_text())
    if payload.get("recipe") != recipe_json:
        changed = sorted(k for k in recipe_json if payload.get("recipe", {}).get(k) != recipe_json[k])
        raise CliError(
            f"{path} holds runs of another recipe (differs in {', '.join(changed)}); "
            "pass another --json or remove it"
        )
    return payload


def merge_results(path: Path, sources: tuple[Path, ...], recipe: Recipe) -> None:
    """Add the runs of ``sources`` (same recipe) that ``path`` lacks, then keep the file in the
    suite's order (arms as registered, then seeds), however the runs were split between processes."""
    payload = load_results(path, recipe)
    done = {(row["arm"], row["seed"]) for row in payload["runs"]}
    added = 0
    for source in sources:
        for row in load_results(source, recipe)["runs"]:
            if (row["arm"], row["seed"]) not in done:
                payload["runs"].append(row)
                done.add((row["arm"], row["seed"]))
                added += 1
    rank = {name: index for index, name in enumerate(ARMS)}
    payload["runs"].sort(key=lambda row: (rank.get(row["arm"], len(rank)), row["seed"]))
    write_results(path, payload)
    click.echo(f"merged {added} runs into {path} ({len(payload['runs'])} in all)")


def plan_runs(
    arms: list[str], seeds: int, done: set[tuple[str, int]], context: Context
) -> list[tuple[str, int]]:
    """Round robin: every arm of seed 0 (dependencies first), then seed 1, ...; finished runs skipped."""
    order = [name for name in ARMS if name in arms]
    pending = [(name, seed) for seed in range(seeds) for name in order if (name, seed) not in done]
    for name, seed in pending:
        for need in ARMS[name].needs:
            if need not in arms and not context.dense_weights(seed).exists():
                raise CliError(
                    f"{name} seed {seed} starts from the {need} run of that seed; add --arms {need}"
                )
    return pending


def default_json(smoke: bool, recipe: Recipe) -> Path:
    """Where a recipe's results go unless ``--json`` says: one file per number of epochs."""
    path = Path("runs/accuracy-smoke.json") if smoke else DEFAULT_JSON
    default = SMOKE if smoke else Recipe()
    return path if recipe.epochs == default.epochs else path.with_stem(f"{path.stem}_{recipe.epochs}_epochs")


def summary_line(row: dict[str, Any]) -> str:
    return (
        f"{row['arm']:<22} seed {row['seed']}  test {100 * row['test_accuracy']:.2f}%  "
        f"{row['flops'] / 1e6:.2f}M FLOPs ({row['flops'] / row['flops_target']:.2f}x lgc)  "
        f"{row['params']:,} params  {row['wall_s']:.0f} s"
    )


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--smoke", is_flag=True, help="Tiny network and data, seconds (CI).")
@click.option("--arms", default=None, help=f"Comma-separated arms [default: all]: {', '.join(ARMS)}.")
@click.option("--seeds", type=click.IntRange(min=1), default=3, help="Seeds 0..N-1 per arm.")
@click.option(
    "--data-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=FASHION_MNIST_DIR,
    help="Folder of the Fashion-MNIST idx(.gz) files.",
)
@click.option(
    "--json",
    "json_path",
    type=click.Path(dir_okay=False, path_type=Path),
    default=None,
    help="Results file [default: benchmarks/results/accuracy.json; smoke: runs/accuracy-smoke.json].",
)
@click.option(
    "--work-dir",
    type=click.Path(file_okay=False, path_type=Path),
    default=Path("runs/accuracy"),
    help="Where the dense runs' weights are kept for the arms that start from them.",
)
@click.option(
    "--epochs",
    type=click.IntRange(min=2),
    default=None,
    help="Train this many epochs instead of the recipe's (fine-tuning arms half as many): another "
    "recipe, so its runs go to their own JSON [default: benchmarks/results/accuracy_N_epochs.json].",
)
@click.option("--progress/--no-progress", default=True, help="tqdm progress bars.")
@click.option(
    "--merge",
    type=click.Path(dir_okay=False, exists=True, path_type=Path),
    multiple=True,
    help="Only add the runs of these result files (same recipe, run in parallel) to the JSON; repeatable.",
)
def cli(
    smoke: bool,
    arms: str | None,
    seeds: int,
    data_dir: Path,
    json_path: Path | None,
    work_dir: Path,
    epochs: int | None,
    progress: bool,
    merge: tuple[Path, ...],
) -> None:
    """Train every arm for every seed (resumable) and write the results JSON."""
    recipe = SMOKE if smoke else Recipe()
    if epochs is not None and epochs != recipe.epochs:
        recipe = dataclasses.replace(recipe, epochs=epochs, finetune_epochs=epochs // 2)
    path = json_path or default_json(smoke, recipe)
    torch.set_num_threads(recipe.threads)  # before a new file records the machine, merging too
    if merge:
        merge_results(path, merge, recipe)
        return
    chosen = list(ARMS) if arms is None else [a.strip() for a in arms.split(",") if a.strip()]
    unknown = [a for a in chosen if a not in ARMS]
    if unknown or not chosen:
        raise CliError(f"unknown arm {unknown[0] if unknown else '(none)'!r}; choose from {', '.join(ARMS)}")
    payload = load_results(path, recipe)
    context = Context(recipe, load_data(data_dir, recipe), work_dir / recipe.key(), progress)
    done = {(row["arm"], row["seed"]) for row in payload["runs"]}
    pending = plan_runs(chosen, seeds, done, context)
    click.echo(
        f"{len(pending)} runs to do ({len(done)} already in {path}); "
        f"{len(context.data.train_labels)} train / {len(context.data.test_labels)} test images; "
        f"lgc finalized: {context.lgc_flops / 1e6:.2f}M FLOPs"
    )
    for name, seed in tqdm(pending, desc="runs", disable=not progress):
        row = run_one(context, name, seed)
        payload["runs"].append(row)
        write_results(path, payload)
        tqdm.write(summary_line(row))
    for name in chosen:
        rows = [r["test_accuracy"] for r in payload["runs"] if r["arm"] == name]
        if rows:
            spread = statistics.stdev(rows) if len(rows) > 1 else 0.0
            click.echo(
                f"{name:<22} {100 * statistics.mean(rows):.2f}% +- {100 * spread:.2f} ({len(rows)} seeds)"
            )


def main(argv: list[str] | None = None) -> int:
    """Entry point for tests and ``python benchmarks/accuracy.py``: the exit status."""
    return run(cli, argv)


if __name__ == "__main__":
    raise SystemExit(main())
