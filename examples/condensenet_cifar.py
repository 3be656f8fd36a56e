"""Train a CondenseNet with lgconv, then finalize it: the paper's CIFAR recipe as a script.

    python examples/condensenet_cifar.py                   # CIFAR-10, CondenseNet-86, 300 epochs
    python examples/condensenet_cifar.py --dataset digits --model condensenet50 --epochs 6 --threads 1
    python examples/condensenet_cifar.py --dataset fashion-mnist --subset 2000 --epochs 6
    torchrun --nproc_per_node 4 examples/condensenet_cifar.py --dataset cifar100   # multi-GPU (DDP)

Only lgconv's public API is used: a preset from ``lgconv.models`` (1x1 convolutions condensified,
classifier condensed as a scheduled stage), ``CondensationScheduler`` stepped once per optimizer
step, ``finalize`` at the end, ``count_flops``, ``save``. Every epoch writes a JSON-lines log, a
checkpoint that ``--resume`` continues exactly (mid-condensation too) and the training plot.
"""

from __future__ import annotations

import copy
import json
import math
import os
import statistics
import sys
import time
import warnings
from pathlib import Path
from typing import Any

import click
import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import BatchSampler, DistributedSampler
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))  # the helper modules next to this script

from condensenet_data import DATASETS, DataUnavailable, ImageData, Split, channel_stats, load_data  # noqa: E402
from condensenet_plot import plot_history  # noqa: E402

import lgconv  # noqa: E402

# Options that define the training run: a checkpoint resumes only under the same ones.
RUN_OPTIONS = (
    "dataset",
    "subset",
    "model",
    "dense",
    "groups",
    "condense_factor",
    "drop_rate",
    "epochs",
    "batch_size",
    "lr",
    "momentum",
    "nesterov",
    "weight_decay",
    "lasso",
    "condense_end",
    "crop",
    "flip",
    "amp",
    "seed",
)


class CliError(click.ClickException):
    """A one-line error; the script exits with status 2."""

    exit_code = 2


def setup_device(choice: str) -> tuple[torch.device, int, int]:
    """The device, rank and world size; under ``torchrun`` this joins the process group."""
    world = int(os.environ.get("WORLD_SIZE", "1"))
    cuda = torch.cuda.is_available() if choice == "auto" else choice.startswith("cuda")
    if choice.startswith("cuda") and not torch.cuda.is_available():
        raise CliError(f"--device {choice}: CUDA is not available here; use --device cpu or auto")
    if world > 1:
        dist.init_process_group("nccl" if cuda else "gloo")
        local_rank = int(os.environ.get("LOCAL_RANK", "0"))
        if cuda:
            torch.cuda.set_device(local_rank)
        return torch.device(f"cuda:{local_rank}" if cuda else "cpu"), dist.get_rank(), world
    return torch.device(("cuda" if cuda else "cpu") if choice == "auto" else choice), 0, 1


def augment(images: Tensor, generator: torch.Generator, *, crop: bool, flip: bool) -> Tensor:
    """Random 4-pixel-padded crop and horizontal flip of a uint8 batch (the paper's augmentation)."""
    batch, _, height, width = images.shape
    if crop:
        padded = F.pad(images, (4, 4, 4, 4))
        dy, dx = (torch.randint(0, 9, (2, batch), generator=generator)).to(images.device)
        rows = (dy[:, None] + torch.arange(height, device=images.device))[:, None, :, None]
        cols = (dx[:, None] + torch.arange(width, device=images.device))[:, None, None, :]
        channels = torch.arange(images.shape[1], device=images.device)[None, :, None, None]
        images = padded[torch.arange(batch, device=images.device)[:, None, None, None], channels, rows, cols]
    if flip:
        mirror = (torch.rand(batch, generator=generator) < 0.5).to(images.device)
        images = torch.where(mirror[:, None, None, None], images.flip(3), images)
    return images


class Trainer:
    """Holds the model, optimizer, schedules and data of one run; owns the epoch loop."""

    def __init__(self, options: dict[str, Any], data: ImageData, device: torch.device, rank: int, world: int):
        self.options, self.data, self.device, self.rank, self.world = options, data, device, rank, world
        torch.manual_seed(options["seed"])
        kwargs: dict[str, Any] = {"num_classes": data.num_classes, "in_chans": data.image_size[0]}
        if options["dense"]:
            kwargs.update(groups=1, condense_factor=1, classifier_condense_factor=1)
        else:
            kwargs.update(
                groups=options["groups"], condense_factor=options["condense_factor"] or options["groups"]
            )
        if options["drop_rate"]:
            kwargs["drop_rate"] = options["drop_rate"]
        try:
            self.model = lgconv.models.create_model(options["model"], **kwargs).to(device)
        except ValueError as error:
            raise CliError(str(error)) from None
        self.model.default_input_size = data.image_size  # what count_flops and lgconv.save record
        if options["channels_last"]:
            self.model = self.model.to(memory_format=torch.channels_last)
        self.net: nn.Module = self.model
        if world > 1:
            self.net = DistributedDataParallel(
                self.model, device_ids=[device.index] if device.type == "cuda" else None
            )
        mean, std = channel_stats(data.train.images)
        self.mean, self.std = mean.to(device)[None, :, None, None], std.to(device)[None, :, None, None]
        self.train_images, self.train_labels = data.train.images.to(device), data.train.labels.to(device)
        self.sampler = DistributedSampler(
            range(len(data.train)), num_replicas=world, rank=rank, shuffle=True, seed=options["seed"]
        )
        self.batches = BatchSampler(self.sampler, options["batch_size"], drop_last=False)
        self.total_steps = options["epochs"] * len(self.batches)
        self.optimizer = torch.optim.SGD(
            self.model.parameters(),
            lr=options["lr"],
            momentum=options["momentum"],
            nesterov=options["nesterov"],
            weight_decay=options["weight_decay"],
        )
        total = self.total_steps
        self.lr_schedule = torch.optim.lr_scheduler.LambdaLR(
            self.optimizer, lambda step: 0.5 * (1.0 + math.cos(math.pi * min(step, total) / total))
        )
        self.condenser = None
        if any(
            isinstance(m, (lgconv.LearnedGroupConv, lgconv.LearnedGroupLinear)) for m in self.model.modules()
        ):
            self.condenser = lgconv.CondensationScheduler(
                self.net, total, lasso=options["lasso"], condense_end=options["condense_end"]
            )
        self.amp_dtype = torch.float16 if device.type == "cuda" else torch.bfloat16
        self.scaler = torch.amp.GradScaler(device.type, enabled=options["amp"] and device.type == "cuda")
        self.epoch = 0
        self.history: list[dict[str, Any]] = []
        self.drops: list[dict[str, Any]] = []

    # --- condensing state, for the bar, the log and the plot ---
    def _stages(self) -> dict[int, int]:
        """Stage reached per condensation factor (the 1x1 convs and the classifier may differ)."""
        stages: dict[int, int] = {}
        for _, layer in self.condenser.layers if self.condenser else []:
            factor = layer.condense_factor
            stages[factor] = min(stages.get(factor, factor), int(layer.stage))
        return stages

    def stage_label(self) -> str:
        if self.condenser is None:
            return "dense"
        stages = self._stages()
        done, total = sum(stages.values()), sum(f - 1 for f in stages)
        return "optimization" if done == total else f"condensing {done}/{total}"

    def inputs(self, images: Tensor) -> Tensor:
        """Normalized float batch (channels-last when asked) from uint8 images."""
        x = (images.float().div_(255) - self.mean) / self.std
        return x.contiguous(memory_format=torch.channels_last) if self.options["channels_last"] else x

    def _autocast(self) -> Any:
        return torch.autocast(self.device.type, dtype=self.amp_dtype, enabled=self.options["amp"])

    def train_epoch(self) -> dict[str, Any]:
        options, epoch = self.options, self.epoch
        self.net.train()
        self.sampler.set_epoch(epoch)
        generator = torch.Generator().manual_seed(options["seed"] * 1_000_003 + epoch * 101 + self.rank)
        loss_sum, correct, seen = 0.0, 0, 0
        start = time.perf_counter()
        bar = tqdm(
            self.batches,
            desc=f"epoch {epoch + 1}/{options['epochs']}",
            disable=self.rank != 0 or not options["progress"],
            leave=False,
            dynamic_ncols=True,
        )
        for i, batch in enumerate(bar):
            index = torch.as_tensor(batch, device=self.device)
            images = augment(self.train_images[index], generator, crop=options["crop"], flip=options["flip"])
            labels = self.train_labels[index]
            with self._autocast():
                logits = self.net(self.inputs(images))
                loss = F.cross_entropy(logits, labels)
                if self.condenser is not None:
                    loss = loss + self.condenser.lasso_loss()
            self.optimizer.zero_grad(set_to_none=True)
            self.scaler.scale(loss).backward()
            self.scaler.step(self.optimizer)
            self.scaler.update()
            self.lr_schedule.step()
            if self.condenser is not None:
                before = self._stages()
                self.condenser.step()
                after = self._stages()
                for factor, stage in after.items():
                    if stage != before[factor]:
                        where = epoch + (i + 1) / len(self.batches)
                        self.drops.append(
                            {"epoch": where, "stage": f"C={factor}: stage {stage}/{factor - 1}"}
                        )
            loss_sum += float(loss.detach()) * len(labels)
            correct += int((logits.argmax(1) == labels).sum())
            seen += len(labels)
            bar.set_postfix(
                loss=f"{loss_sum / seen:.3f}",
                acc=f"{correct / seen:.3f}",
                lr=f"{self.optimizer.param_groups[0]['lr']:.4f}",
                stage=self.stage_label(),
            )
        if self.device.type == "cuda":
            torch.cuda.synchronize()
        elapsed = time.perf_counter() - start
        return {
            "train_loss": loss_sum / seen,
            "train_acc": correct / seen,
            "epoch_time_s": elapsed,
            "train_images_per_s": seen * self.world / elapsed,
        }

    @torch.no_grad()
    def evaluate(self, model: nn.Module, split: Split) -> tuple[float, float]:
        """Loss and accuracy of ``model`` (eval mode) on ``split``."""
        model.eval()
        loss_sum, correct = 0.0, 0
        for start in range(0, len(split), 256):
            images = split.images[start : start + 256].to(self.device)
            labels = split.labels[start : start + 256].to(self.device)
            with self._autocast():
                logits = model(self.inputs(images))
            loss_sum += float(F.cross_entropy(logits.float(), labels, reduction="sum"))
            correct += int((logits.argmax(1) == labels).sum())
        return loss_sum / len(split), correct / len(split)

    def run_epoch(self) -> dict[str, Any]:
        row = {"epoch": self.epoch + 1, **self.train_epoch()}
        self.epoch += 1
        if self.rank == 0:
            row["test_loss"], row["test_acc"] = self.evaluate(self.model, self.data.test)
        row.update(
            lr=self.optimizer.param_groups[0]["lr"],
            stage=self.stage_label(),
            progress=self.condenser.progress if self.condenser else self.epoch / self.options["epochs"],
        )
        self.history.append(row)
        return row

    # --- checkpoints ---
    def state_dict(self) -> dict[str, Any]:
        return {
            "options": {k: self.options[k] for k in RUN_OPTIONS},
            "epoch": self.epoch,
            "model": self.model.state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "lr_schedule": self.lr_schedule.state_dict(),
            "condenser": self.condenser.state_dict() if self.condenser else None,
            "scaler": self.scaler.state_dict(),
            "rng": torch.get_rng_state(),
            "cuda_rng": torch.cuda.get_rng_state_all() if self.device.type == "cuda" else [],
            "history": json.dumps(self.history),
            "drops": json.dumps(self.drops),
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        saved = state["options"]
        changed = [k for k in RUN_OPTIONS if saved.get(k) != self.options[k]]
        if changed:
            details = ", ".join(
                f"--{k.replace('_', '-')} {saved.get(k)!r} (now {self.options[k]!r})" for k in changed
            )
            raise CliError(f"the checkpoint was trained with {details}; resume with the same options")
        self.model.load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_schedule.load_state_dict(state["lr_schedule"])
        if self.condenser is not None:
            self.condenser.load_state_dict(state["condenser"])
        self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"])
        if state["cuda_rng"]:
            torch.cuda.set_rng_state_all(state["cuda_rng"])
        self.epoch = int(state["epoch"])
        self.history = json.loads(state["history"])
        self.drops = json.loads(state["drops"])


def save_checkpoint(trainer: Trainer, path: Path) -> None:
    """Write atomically, so a kill during the write leaves the previous checkpoint intact."""
    temporary = path.with_suffix(".tmp")
    torch.save(trainer.state_dict(), temporary)
    os.replace(temporary, path)


@torch.no_grad()
def latency_ms(model: nn.Module, example: Tensor, repeats: int = 10) -> float:
    """Median wall time of one forward pass of ``example`` in milliseconds (after 2 warm-up runs)."""
    model.eval()
    times = []
    for i in range(repeats + 2):
        if example.is_cuda:
            torch.cuda.synchronize()
        start = time.perf_counter()
        model(example)
        if example.is_cuda:
            torch.cuda.synchronize()
        if i >= 2:
            times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def finish(trainer: Trainer, out: Path) -> dict[str, Any]:
    """Finalize, check both forms agree, print the before/after table and save the finalized model."""
    model = trainer.model.eval()
    size = model.default_input_size
    example = trainer.inputs(trainer.data.test.images[: trainer.options["batch_size"]].to(trainer.device))
    rows = []
    forms = [("masked (training form)", model)]
    if trainer.condenser is not None:
        finalized_model = lgconv.finalize(copy.deepcopy(model))
        forms.append(("finalized", finalized_model))
        # BN folded into the condensed convs, each layer's fastest exact kernel picked by timing.
        optimized = lgconv.optimize_for_inference(copy.deepcopy(finalized_model), example)
        forms.append(("finalized + optimized", optimized))
    else:
        forms[0] = ("dense baseline", model)
    for label, form in forms:
        loss, accuracy = trainer.evaluate(form, trainer.data.test)
        paper = lgconv.count_flops(form, size, convention="paper")
        with warnings.catch_warnings():  # the fvcore convention leaves pooling uncounted, as it says
            warnings.simplefilter("ignore", UserWarning)
            fvcore = lgconv.count_flops(form, size)
        finalized = label.startswith("finalized") or trainer.condenser is None
        rows.append(
            {
                "form": label,
                "test_acc": accuracy,
                "test_loss": loss,
                "params": sum(p.numel() for p in form.parameters()),
                # The masked form runs its dense convolutions: that is its cost.
                "flops_paper": paper.total if finalized else paper.dense_total,
                "flops_fvcore": fvcore.total if finalized else fvcore.dense_total,
                "latency_ms": latency_ms(form, example),
            }
        )
    header = (
        f"{'':24} {'params':>10} {'FLOPs paper':>12} {'FLOPs fvcore':>13} {'ms/batch':>9} {'test acc':>9}"
    )
    click.echo(f"\n{header}  (batch {len(example)} on {trainer.device})")
    for r in rows:
        click.echo(
            f"{r['form']:24} {r['params']:>10,} {r['flops_paper'] / 1e6:>11.2f}M "
            f"{r['flops_fvcore'] / 1e6:>12.2f}M {r['latency_ms']:>9.2f} {100 * r['test_acc']:>8.2f}%"
        )
    before = rows[0]
    for after in rows[1:]:
        click.echo(
            f"{after['form']} / masked: params x{after['params'] / before['params']:.3f}, "
            f"FLOPs x{after['flops_paper'] / before['flops_paper']:.3f}, "
            f"time x{after['latency_ms'] / before['latency_ms']:.3f}; "
            f"same accuracy: {before['test_acc'] == after['test_acc']}"
        )
    final = forms[1][1] if len(forms) > 1 else forms[0][1]
    path = lgconv.save(final, out / "model_final.safetensors")
    reloaded = lgconv.load(path).to(trainer.device).eval()
    with torch.no_grad():
        difference = float((reloaded(example) - final(example)).abs().max())
    click.echo(f"saved {path}; lgconv.load(path) gives back outputs within {difference:.1e}")
    summary = {
        "rows": rows,
        "epochs": trainer.epoch,
        "history": trainer.history[-1:],
        "model_file": str(path),
    }
    (out / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    return summary


@click.command(context_settings={"help_option_names": ["-h", "--help"], "show_default": True})
@click.option("--dataset", type=click.Choice(DATASETS), default="cifar10", help="Data set.")
@click.option(
    "--data-dir",
    default=None,
    help="Data folder (default: ./data for CIFAR, /usr/share/datasets/fashion-mnist for Fashion-MNIST).",
)
@click.option("--download/--no-download", default=True, help="Download CIFAR with torchvision if missing.")
@click.option(
    "--subset", type=click.IntRange(min=1), default=None, help="Use N random train and <= N test images."
)
@click.option("--model", default="condensenet86", help="Preset from lgconv.models.list_models().")
@click.option("--dense", is_flag=True, help="Train the dense DenseNet-style baseline (G = C = 1) instead.")
@click.option(
    "--groups", type=click.IntRange(min=1), default=4, help="G of the 1x1 learned and 3x3 group convs."
)
@click.option("--condense-factor", type=click.IntRange(min=1), default=None, help="C (default: G).")
@click.option(
    "--drop-rate", type=click.FloatRange(0, 1, max_open=True), default=0.0, help="Dropout before 1x1s."
)
@click.option("--epochs", type=click.IntRange(min=1), default=300)
@click.option("--batch-size", type=click.IntRange(min=1), default=64, help="Per process.")
@click.option(
    "--lr", type=click.FloatRange(min=0, min_open=True), default=0.1, help="Initial lr (cosine decay)."
)
@click.option("--momentum", type=click.FloatRange(min=0), default=0.9)
@click.option("--nesterov/--no-nesterov", default=True)
@click.option("--weight-decay", type=click.FloatRange(min=0), default=1e-4)
@click.option(
    "--lasso", type=click.FloatRange(min=0), default=0.0, help="Group-lasso weight (paper: 1e-5 ImageNet)."
)
@click.option("--condense-end", type=click.FloatRange(0, 1, min_open=True), default=0.5, help="Last drop at.")
@click.option("--crop/--no-crop", default=True, help="Random crop with 4-pixel padding.")
@click.option("--flip/--no-flip", default=None, help="Horizontal flips [default: on, off for digits].")
@click.option("--amp", is_flag=True, help="Mixed precision (float16 on CUDA, bfloat16 on CPU).")
@click.option("--channels-last", is_flag=True, help="Channels-last memory format.")
@click.option("--device", default="auto", help="auto (CUDA when present), cpu, cuda, cuda:N.")
@click.option("--threads", type=click.IntRange(min=1), default=None, help="CPU threads for torch.")
@click.option("--seed", type=int, default=0)
@click.option(
    "--out",
    type=click.Path(file_okay=False, path_type=Path),
    default=None,
    help="[default: runs/DATASET-MODEL]",
)
@click.option("--resume", is_flag=True, help="Continue from OUT/checkpoint.pt exactly where it stopped.")
@click.option(
    "--stop-after", type=click.IntRange(min=1), default=None, help="Stop after N epochs (resumable)."
)
@click.option("--progress/--no-progress", default=True, help="Show the tqdm progress bar.")
def main(**options: Any) -> None:
    """Train a CondenseNet (or its dense baseline) with the paper's recipe, then finalize it."""
    if options["flip"] is None:
        options["flip"] = options["dataset"] != "digits"
    if options["threads"]:
        torch.set_num_threads(options["threads"])
    if options["model"] not in lgconv.models.list_models():
        raise CliError(
            f"unknown --model {options['model']!r}; pick one of {', '.join(lgconv.models.list_models())}"
        )
    device, rank, world = setup_device(options["device"])
    out = (
        options["out"]
        or Path("runs") / f"{options['dataset']}-{options['model']}{'-dense' if options['dense'] else ''}"
    )
    if rank != 0:
        dist.barrier()  # rank 0 downloads first
    try:
        data = load_data(
            options["dataset"],
            options["data_dir"],
            download=options["download"],
            subset=options["subset"],
            seed=options["seed"],
        )
    except DataUnavailable as error:
        raise CliError(str(error)) from None
    if world > 1 and rank == 0:
        dist.barrier()
    trainer = Trainer(options, data, device, rank, world)
    checkpoint = out / "checkpoint.pt"
    if rank == 0:
        out.mkdir(parents=True, exist_ok=True)
    if options["resume"]:
        if not checkpoint.exists():
            raise CliError(f"--resume: no checkpoint at {checkpoint}; run without --resume to start")
        trainer.load_state_dict(torch.load(checkpoint, map_location=device, weights_only=True))
    if rank == 0:
        click.echo(
            f"{options['model']}{' (dense baseline)' if options['dense'] else ''} on {data.name}: "
            f"{len(data.train)} train / {len(data.test)} test images, {trainer.total_steps} steps, "
            f"{sum(p.numel() for p in trainer.model.parameters()):,} params while training, device {device}"
            f"{f' x{world}' if world > 1 else ''}"
            + (f", resumed after epoch {trainer.epoch}" if options["resume"] else "")
        )
    log = out / "log.jsonl"
    if rank == 0:
        log.write_text("".join(json.dumps(row) + "\n" for row in trainer.history))
    stop = min(options["epochs"], options["stop_after"] or options["epochs"])
    while trainer.epoch < stop:
        row = trainer.run_epoch()
        if rank == 0:
            with log.open("a") as file:
                file.write(json.dumps(row) + "\n")
            save_checkpoint(trainer, checkpoint)
            plot_history(
                trainer.history, trainer.drops, out / "training.png", f"{options['model']} on {data.name}"
            )
            click.echo(
                f"epoch {row['epoch']:>3}/{options['epochs']}  loss {row['train_loss']:.4f}  "
                f"train {100 * row['train_acc']:.2f}%  test {100 * row['test_acc']:.2f}%  "
                f"lr {row['lr']:.4f}  {row['stage']}  {row['train_images_per_s']:.0f} img/s"
            )
        if world > 1:
            dist.barrier()
    if trainer.epoch < options["epochs"]:
        if rank == 0:
            click.echo(f"stopped after epoch {trainer.epoch}; continue with the same command and --resume")
    elif rank == 0:
        finish(trainer, out)
    if world > 1:
        dist.destroy_process_group()


if __name__ == "__main__":
    main()
