"""Sweep the timm and torchvision model zoos through lgconv and write docs/coverage.md.

The families (``benchmarks/_zoo_families.py``): timm classification models and ``features_only``
backbones, torchvision classification, quantizable, detection (trained with targets, compared in
eval), segmentation, video and optical-flow models. Every architecture is first surveyed on the
meta device (parameter count, the condensify plan), which costs no memory. Each model with an
eligible layer is then built for real, condensified, trained one step while the scheduler runs to
its end, finalized, and checked: every tensor of the finalized output (dicts, lists, tuples) equals
the masked output in eval mode, and the FLOPs drop by exactly what the plan predicts.

    python benchmarks/zoo_sweep.py --smoke                      # a few tiny models, seconds
    python benchmarks/zoo_sweep.py --cache runs/zoo.jsonl       # everything, resumable
    python benchmarks/zoo_sweep.py --shard 1/2 --cache runs/zoo.jsonl --no-report &   # in parallel
    python benchmarks/zoo_sweep.py --shard 2/2 --cache runs/zoo.jsonl --no-report
    python benchmarks/zoo_sweep.py --report-only --cache runs/zoo.jsonl

Results are appended to the cache (one JSON line per model, whole lines, so shards can share it)
and a re-run skips models already there.
"""

from __future__ import annotations

import contextlib
import fnmatch
import json
import math
import os
import re
import signal
import sys
import time
import traceback
import warnings
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _zoo_families import FAMILIES, Inputs, output_error, same_scores, tensors, training_loss  # noqa: E402

import lgconv  # noqa: E402
from lgconv.layers import CondensedLinear  # noqa: E402
from lgconv.layers.learned_group import LearnedGroupMixin  # noqa: E402

SOURCES = tuple(FAMILIES)
SMOKE_MODELS = (
    "timm:test_resnet",
    "timm:test_efficientnet",
    "timm:test_vit",
    "torchvision:squeezenet1_1",
    "timm-features:test_resnet",
    "torchvision-segmentation:lraspp_mobilenet_v3_large",
    "torchvision-video:r3d_18",
)
STATUSES = ("pass", "fail", "no eligible layer", "skipped")
SURVEYED = "surveyed"  # cache-only status: surveyed, check not done yet
DOCS = Path(__file__).resolve().parent.parent / "docs"
# Detections kept among near-tied candidates: NMS then suppresses other neighbours, so the kept
# scores may differ in the 4th digit even though the heads agree to float rounding.
TIED_SCORES_RTOL = 1e-3


@dataclass(frozen=True)
class Settings:
    """Sweep options that every model's check uses."""

    groups: int
    input_size: int
    max_params: float
    timeout: int
    rtol: float
    linear: bool = False


class Timeout(Exception):
    """The per-model time limit ran out."""


@contextlib.contextmanager
def time_limit(seconds: int) -> Iterator[None]:
    """Raise ``Timeout`` in the main thread after ``seconds`` (0 disables the limit)."""
    if seconds <= 0 or not hasattr(signal, "SIGALRM"):
        yield
        return

    def _expire(signum: int, frame: Any) -> None:
        raise Timeout(f"took longer than {seconds}s")

    previous = signal.signal(signal.SIGALRM, _expire)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


def list_models(sources: tuple[str, ...]) -> list[str]:
    """Every architecture of the chosen families as ``family:name``."""
    return [f"{source}:{n}" for source in sources for n in FAMILIES[source].names()]


def build(key: str, device: str | None = None) -> nn.Module:
    """A randomly initialised model (``pretrained=False`` / ``weights=None``), on ``device``."""
    source, name = key.split(":", 1)
    with warnings.catch_warnings(), torch.device(device or "cpu"):
        warnings.simplefilter("ignore")
        return FAMILIES[source].build(name)


# Attention products: the counter sees whichever kernel scaled_dot_product_attention picked (it may
# change with the layout of q, k, v), so batched products outside lgconv's layers (whose condensed
# Linear form is a batched product too) are kept out of the exact comparison.
ATTENTION_OPS = ("bmm", "baddbmm", "_scaled_dot_product")


def count_flops(model: nn.Module, inputs: Inputs) -> tuple[int, int]:
    """(FLOPs, of which attention products) of one eval forward, by torch.utils.flop_counter
    (grouped convs counted per group)."""
    counter = FlopCounterMode(display=False)
    # Parameters that are fed to a submodule as its input (a ViT's register tokens) make the
    # counter's module tracker look for a gradient function; without requires_grad it does not.
    trainable = [p for p in model.parameters() if p.requires_grad]
    try:
        for parameter in trainable:
            parameter.requires_grad_(False)
        with counter, torch.no_grad():
            inputs.call(model.eval(), train=False)
    finally:
        for parameter in trainable:
            parameter.requires_grad_(True)
    counts = counter.get_flop_counts()
    root = type(model).__name__
    lgconv_layers = [
        f"{root}.{name}" if name else root
        for name, m in model.named_modules()
        if isinstance(m, (LearnedGroupMixin, CondensedLinear))
    ]

    def attention(scope: str) -> int:
        ops = counts.get(scope, {})
        return sum(v for op, v in ops.items() if str(op).split(".")[-1].startswith(ATTENTION_OPS))

    outside = attention("Global") - sum(attention(scope) for scope in lgconv_layers)
    return counter.get_total_flops(), outside


def predicted_drop(model: nn.Module, inputs: Inputs) -> tuple[tuple[int, int], int]:
    """(FLOPs of the masked model, FLOPs finalizing removes): each learned group layer keeps 1/C of
    its inputs. A masked layer runs its dense conv, so its count is the dense one.

    The removed part is computed from the layers' shapes and their output sizes seen on ``inputs``
    (in every call: RAFT runs its update block once per iteration), not by a FLOP counter, so it
    checks the counted drop independently. Counting on the trained masked model, not the untrained
    dense one, keeps data-dependent work (a detector's proposals after NMS) the same on both sides.
    """
    removed = [0]

    def hook(module: nn.Module, args: Any, output: Any) -> None:
        weight = module.weight
        positions = output.numel() // weight.shape[0]
        macs = weight.numel() * positions
        removed[0] += 2 * (macs - macs // module.condense_factor)

    layers = [m for m in model.modules() if isinstance(m, LearnedGroupMixin)]
    handles = [layer.register_forward_hook(hook) for layer in layers]
    try:
        dense = count_flops(model, inputs)
    finally:
        for handle in handles:
            handle.remove()
    return dense, removed[0]


def survey(key: str, groups: int, linear: bool = False) -> dict[str, Any]:
    """Parameter count and condensify plan of ``key`` from a meta-device build (no memory used)."""
    record: dict[str, Any] = {"model": key}
    try:
        model = build(key, device="meta")
    except Exception:  # some builders refuse the meta device; the real build is tried later
        return record
    record["params"] = sum(p.numel() for p in model.parameters())
    decisions = lgconv.plan(model, groups, linear=linear)
    record["eligible"] = len(decisions.eligible)
    record["layers"] = len(decisions.decisions)
    reasons = Counter(reason_kind(d.reason) for d in decisions.skipped)
    record["skip_reasons"] = dict(reasons.most_common())
    record["blocked"] = [f"{d.name}: {d.reason}" for d in decisions.skipped if is_blocked(d)][:MAX_BLOCKED]
    return record


MAX_BLOCKED = 40


def reason_kind(reason: str) -> str:
    """A skip reason without its numbers: 'kernel 3x3', 'depthwise convolution', ..."""
    return reason.split(":")[0].split(" (")[0]


def is_blocked(decision: lgconv.LayerDecision) -> bool:
    """A pointwise, ungrouped conv that still cannot learn groups (a parent reads its weight, a
    subclass with its own forward, channels not divisible, ...): what the coverage page lists."""
    kernel = decision.shape.split(" ")[1] if " " in decision.shape else ""
    pointwise = bool(kernel) and set(kernel.split("x")) == {"1"}
    sparse = decision.reason.startswith(("depthwise", "grouped", "already"))
    return pointwise and not sparse


def _one_line(error: BaseException) -> str:
    text = str(error).strip().splitlines()
    return f"{type(error).__name__}: {text[0][:160]}" if text else type(error).__name__


def _run_dense(key: str, model: nn.Module, preferred: int) -> Inputs:
    """A batch-2 input of the smallest size the dense model runs on, else raise the last error.

    Both modes are tried: a training-only branch (Inception's auxiliary head) may need a larger input.
    """
    error: Exception | None = None
    source, name = key.split(":", 1)
    for inputs in FAMILIES[source].inputs(name, model, preferred):
        try:
            with torch.no_grad():
                inputs.call(model.eval(), train=False)
                inputs.call(model.train(), train=True)
            return inputs
        except Exception as exc:  # the model does not accept this size: try the next one
            error = exc
    raise RuntimeError(f"dense model does not run: {_one_line(error)}") from error


def verdict_from_survey(record: dict[str, Any], settings: Settings) -> dict[str, Any] | None:
    """The final record when the survey alone decides (too large, nothing eligible), else None."""
    if record.get("eligible") == 0:
        top = list(record["skip_reasons"].items())[:3]
        reasons = "; ".join(f"{n}x {r}" for r, n in top) or "no conv/linear layer"
        return {**record, "status": "no eligible layer", "reason": reasons}
    params = record.get("params")
    if params is not None and params > settings.max_params:
        return {
            **record,
            "status": "skipped",
            "reason": f"surveyed on the meta device only ({record.get('eligible')} eligible layers): "
            f"{params / 1e6:.0f}M parameters > --max-params",
        }
    return None


def check(key: str, settings: Settings, surveyed: dict[str, Any] | None = None) -> dict[str, Any]:
    """Condensify, train one step with the scheduler to its end, finalize and compare one model."""
    torch.manual_seed(0)
    record = dict(surveyed) if surveyed is not None else survey(key, settings.groups, settings.linear)
    record.pop("status", None)
    verdict = verdict_from_survey(record, settings)
    if verdict is not None:
        return verdict
    start = time.perf_counter()
    try:
        with time_limit(settings.timeout):
            record.update(_check_real(key, settings))
    except Timeout as exc:
        record.update(status="skipped", reason=str(exc))
    except Exception as exc:  # record every failure with its reason; the sweep goes on
        stage = "skipped" if str(exc).startswith("dense model") else "fail"
        record.update(status=stage, reason=_one_line(exc), where=traceback.format_exc(limit=-3)[-600:])
    record["seconds"] = round(time.perf_counter() - start, 2)
    return record


def randomize_(model: nn.Module, seed: int = 0) -> nn.Module:
    """Redraw every parameter: weights uniform in +-1/sqrt(fan-in), 1-d parameters in [0.5, 1].

    Initialisations that silence a branch (zero-init last batch norm, layer scale of 1e-6, a zero
    head) would let a wrong finalized layer pass the exactness check unseen; these values do not.
    """
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for parameter in model.parameters():
            if not parameter.is_floating_point():
                continue
            noise = torch.rand(parameter.shape, generator=generator, dtype=parameter.dtype)
            if parameter.dim() >= 2:
                parameter.copy_((noise - 0.5) * 2 / parameter[0].numel() ** 0.5)
            else:
                parameter.copy_(noise * 0.5 + 0.5)
    return model


@contextlib.contextmanager
def _captured(
    model: nn.Module, heads: Callable[[nn.Module], list[nn.Module]] | None, outputs: list[Any]
) -> Iterator[None]:
    """While active, append the outputs of ``heads(model)`` to ``outputs`` (nothing without heads)."""
    hooks = [
        h.register_forward_hook(lambda m, a, o: outputs.append(o)) for h in (heads or (lambda _: []))(model)
    ]
    try:
        yield
    finally:
        for hook in hooks:
            hook.remove()


def _check_real(key: str, settings: Settings) -> dict[str, Any]:
    family = FAMILIES[key.split(":", 1)[0]]
    model = randomize_(build(key))
    record: dict[str, Any] = {"params": sum(p.numel() for p in model.parameters())}
    if record["params"] > settings.max_params:
        return {
            **record,
            "status": "skipped",
            "reason": f"{record['params'] / 1e6:.0f}M parameters > --max-params",
        }
    inputs = _run_dense(key, model, settings.input_size)
    record["input"] = inputs.size
    decisions = lgconv.plan(model, settings.groups, linear=settings.linear)
    names = [d.name for d in decisions.eligible]
    record["eligible"] = len(names)
    if not names:
        return {**record, "status": "no eligible layer", "reason": "no eligible layer"}

    model = lgconv.condensify(model, settings.groups, linear=settings.linear)
    layers = [m for m in model.modules() if isinstance(m, LearnedGroupMixin)]
    record["condensed"] = len(layers)
    record["dims"] = sorted({m.weight.dim() - 2 for m in layers if not isinstance(m, nn.Linear)})
    scheduler = lgconv.CondensationScheduler(model, total_steps=2, lasso=1e-5)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3, momentum=0.9)
    model.train()
    loss = training_loss(inputs.call(model, train=True)) + scheduler.lasso_loss()
    if not bool(loss.isfinite()):
        raise RuntimeError(f"training loss is not finite ({float(loss)})")
    loss.backward()
    torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
    optimizer.step()
    while scheduler.step_count < scheduler.total_steps:
        scheduler.step()
    if not all(layer.fully_condensed for layer in layers):
        raise RuntimeError("scheduler ended with layers not fully condensed")

    model.eval()
    heads: list[list[Any]] = [[], []]
    with torch.no_grad(), _captured(model, family.heads, heads[0]):
        masked = inputs.call(model, train=False)
    with torch.no_grad():
        dense_flops, removed = predicted_drop(model, inputs)
        model = lgconv.finalize(model)
    with torch.no_grad(), _captured(model, family.heads, heads[1]):
        final = inputs.call(model, train=False)
    outputs = tensors(masked)
    record["outputs"] = len(outputs)
    record["output_values"] = sum(t.numel() for t in outputs)
    if not record["output_values"]:
        raise RuntimeError("the eval output holds no values to compare")
    if not all(bool(t.isfinite().all()) for t in outputs if t.is_floating_point()):
        raise RuntimeError("masked model output is not finite after one training step")
    error = output_error(masked, final)
    if error > settings.rtol and heads[0]:
        # A random detector often gives many candidates one score; float rounding then decides which
        # of the tied ones the top-k keeps. Exact when its heads agree and the kept scores are equal.
        record["head_error"] = output_error(heads[0], heads[1])
        if record["head_error"] <= settings.rtol and same_scores(masked, final, TIED_SCORES_RTOL):
            record["note"] = (
                f"outputs differ by {error:.1e} only in which equally scored detections are kept; "
                f"heads exact ({record['head_error']:.1e}), kept scores within {TIED_SCORES_RTOL:g}"
            )
            error = record["head_error"]
    record["max_error"] = error
    (dense_flops, dense_attention), (final_flops, final_attention) = dense_flops, count_flops(model, inputs)
    record.update(dense_flops=dense_flops, final_flops=final_flops, predicted_drop=removed)
    record["flop_reduction"] = dense_flops / final_flops if final_flops else math.inf
    if dense_attention != final_attention:
        record["attention_flops"] = [dense_attention, final_attention]
        record["note"] = (
            f"attention products counted as {dense_attention} then {final_attention} FLOPs (the kernel "
            "scaled_dot_product_attention picked); compared without them"
        )
    dense_flops, final_flops = dense_flops - dense_attention, final_flops - final_attention
    exact = error <= settings.rtol
    flops_as_planned = dense_flops - final_flops == removed
    if exact and flops_as_planned:
        return {**record, "status": "pass", "reason": ""}
    reasons = []
    if not exact:
        reasons.append(
            f"finalized output differs from masked by {error:.2e} of its scale (inf: in structure)"
        )
    if not flops_as_planned:
        reasons.append(f"FLOPs dropped by {dense_flops - final_flops}, the plan predicted {removed}")
    return {**record, "status": "fail", "reason": "; ".join(reasons)}


def read_cache(path: Path | None) -> dict[str, dict[str, Any]]:
    """Records already in the cache, the last one of each model winning."""
    records: dict[str, dict[str, Any]] = {}
    if path is None or not path.exists():
        return records
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):  # a line cut short by a killed run
            record = json.loads(line)
            records[record["model"]] = record
    return records


def append(path: Path | None, record: dict[str, Any]) -> None:
    """Append one record as a single write of a whole line, so parallel shards never interleave."""
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, (json.dumps(record) + "\n").encode())
    finally:
        os.close(fd)


def _version(package: str) -> str:
    from importlib.metadata import version

    return version(package)


def _cell(value: Any, fmt: str = "{}") -> str:
    return "" if value is None else fmt.format(value)


def _summary_table(records: list[dict[str, Any]], totals: dict[str, int]) -> list[str]:
    """Counts per zoo and status; 'not reached' are models the run did not get to."""
    header = ["zoo", "models", *STATUSES, "not reached", "pass rate of checked eligible"]
    lines = ["| " + " | ".join(header) + " |", "|" + " --- |" * len(header)]
    for source, total in [*totals.items(), ("all", sum(totals.values()))]:
        mine = [r for r in records if source == "all" or r["model"].startswith(source + ":")]
        counts = Counter(r["status"] for r in mine)
        checked = counts["pass"] + counts["fail"]
        rate = f"{counts['pass']}/{checked} ({counts['pass'] / checked:.1%})" if checked else ""
        cells = [source, str(total), *(str(counts[s]) for s in STATUSES), str(total - len(mine)), rate]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render(records: list[dict[str, Any]], totals: dict[str, int], settings: Settings, command: str) -> str:
    """The coverage page: summary counts, the failures, then one row per model."""
    lines = [
        "# Model zoo coverage",
        "",
        "Every timm architecture (`timm.list_models()`, `pretrained=False`), timm `features_only`",
        "backbones (one per timm module: its smallest model that passed as a classifier) and every",
        "torchvision model (classification, quantizable, detection, segmentation, video, optical flow)",
        "goes through what a user does: its parameters are redrawn at random (so that zero-initialised",
        "or layer-scaled branches cannot hide a wrong layer), it is condensified with",
        f"`groups=condense_factor={settings.groups}{', linear=True' if settings.linear else ''}` (pointwise",
        "`Conv1d` / `Conv2d` / `Conv3d`: kernel 1, 1x1, 1x1x1), trained one SGD step on a batch of 2 while",
        "the `CondensationScheduler` runs to its end, and finalized. It passes when every tensor of the",
        "finalized model's output (all entries of a dict, list or tuple: feature lists, detections,",
        "segmentation heads, every RAFT iteration) equals the masked model's in eval mode (float32, max",
        f"|difference| <= {settings.rtol:g} x max |that tensor|) and the FLOPs counted by",
        "`torch.utils.flop_counter` drop by exactly what the condensed layers' shapes predict.",
        "",
        "Inputs: images of "
        f"{settings.input_size}x{settings.input_size} (or the smallest size a model declares that it runs",
        "on); detectors get two 128x128 images, with two boxes each (plus masks or keypoints) as targets",
        "in training so the loss path runs, and keep 20 detections per image whatever their score;",
        "video models clips of 4x64x64 (else 8x112x112, 16x224x224); RAFT two 128x128 images and 2 flow",
        "updates. A random detector often scores many candidates alike: when its outputs differ only in",
        "which of those the top-k kept, it passes if its prediction heads are exact and the kept scores",
        f"agree within {TIED_SCORES_RTOL:g} (the record's note says so). Models without an eligible layer",
        "are surveyed on the meta device (no memory used); models with one above",
        f"{settings.max_params / 1e6:.0f}M parameters are surveyed on the meta device only",
        "(condensify's plan, no forward: their training step does not fit the 23 GB sweep machine).",
        "Models that ran out of their time limit are listed as skipped with it. Linear layers are opt-in",
        "(`--linear`);",
        "`tests/test_linear_models.py` checks ConvNeXt, ViT and MLP-Mixer MLPs, `docs/deploy.md` the",
        "export paths of finalized models.",
        "",
        f"Generated by `{command}` ({time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, torch "
        f"{torch.__version__}, timm {_version('timm')}, torchvision {_version('torchvision')}). To re-run:",
        "`python benchmarks/zoo_sweep.py --cache runs/zoo.jsonl` (resumable; `--shard I/N` runs in",
        "parallel on one cache, `--report-only` rewrites this page from it; every record is in",
        "`coverage.json`).",
        "",
        "## Summary",
        "",
        *_summary_table(records, totals),
        "",
    ]
    no_eligible = Counter(
        reason
        for r in records
        if r["status"] == "no eligible layer"
        for reason in (r.get("skip_reasons") or {"no conv/linear layer": 1})
    )
    if no_eligible:
        top = ", ".join(f"{reason} ({n} models)" for reason, n in no_eligible.most_common(6))
        lines.append(f"Why models have no eligible layer (reasons their layers were skipped): {top}.")
    skip_reasons = Counter(_skip_kind(r["reason"]) for r in records if r["status"] == "skipped")
    if skip_reasons:
        lines.append(
            "Skipped because: " + ", ".join(f"{r} ({n})" for r, n in skip_reasons.most_common()) + "."
        )
    failures = [r for r in records if r["status"] == "fail"]
    lines += ["", "## Failures", ""]
    if failures:
        lines += [f"- `{r['model']}`: {r['reason']}" for r in failures]
    else:
        lines.append("None.")
    lines += _blocked_section(records)
    lines += [
        "",
        "## All models",
        "",
        "| model | params | input | eligible | condensed | status | max error | FLOP reduction | reason |",
        "| --- | ---: | --- | ---: | ---: | --- | ---: | ---: | --- |",
    ]
    for r in sorted(records, key=lambda r: r["model"]):
        params = r.get("params")
        lines.append(
            "| "
            + " | ".join(
                [
                    r["model"],
                    _cell(params / 1e6 if params is not None else None, "{:.1f}M"),
                    _cell(r.get("input")),
                    _cell(r.get("eligible")),
                    _cell(r.get("condensed")),
                    r["status"],
                    _cell(r.get("max_error"), "{:.1e}"),
                    _cell(r.get("flop_reduction"), "{:.2f}x"),
                    (r.get("reason", "") or r.get("note", "")).replace("|", "/"),
                ]
            )
            + " |"
        )
    return "\n".join(lines) + "\n"


def _skip_kind(reason: str) -> str:
    if "--max-params" in reason:
        return "too large to train here (surveyed on the meta device only)"
    if "budget" in reason:
        return "not checked within the run's time budget (surveyed on the meta device only)"
    return reason.split(": ")[0]


def _blocked_section(records: list[dict[str, Any]]) -> list[str]:
    """Pointwise ungrouped convs that stay dense, by reason, then every model with such layers."""
    blocked = [(r["model"], entry) for r in records for entry in r.get("blocked") or ()]
    lines = [
        "",
        "## Pointwise convolutions that cannot be condensed",
        "",
        "Kernel-1 / 1x1 / 1x1x1 ungrouped convolutions that condensify leaves dense, with its reason",
        "(from the meta-device survey; models keep their other layers condensed). Up to "
        f"{MAX_BLOCKED} layers are recorded per model.",
        "",
    ]
    if not blocked:
        return [*lines, "None."]
    kinds = Counter(_blocked_kind(entry) for _, entry in blocked)
    models = {kind: {m for m, e in blocked if _blocked_kind(e) == kind} for kind in kinds}
    lines += ["| reason | layers | models |", "| --- | ---: | ---: |"]
    lines += [f"| {kind} | {n} | {len(models[kind])} |" for kind, n in kinds.most_common()]
    lines.append("")
    by_model: dict[str, list[str]] = {}
    for model, entry in blocked:
        by_model.setdefault(model, []).append(entry)
    for model, entries in sorted(by_model.items()):
        shown = "; ".join(f"`{e.split(': ', 1)[0]}`: {e.split(': ', 1)[1]}" for e in entries[:3])
        more = f" (+{len(entries) - 3} more)" if len(entries) > 3 else ""
        lines.append(f"- `{model}` ({len(entries)}): {shown}{more}".replace("|", "/"))
    return lines


def _blocked_kind(entry: str) -> str:
    """The reason of a blocked layer without its numbers and class names' specifics."""
    reason = entry.split(": ", 1)[1]
    if "reads self." in reason:
        return "its parent's forward reads the weight directly (the mask would be bypassed)"
    if "subclass" in reason:
        return "a conv subclass with its own forward (StdConv2d, Conv2dSame, ...)"
    return re.sub(r"\d+", "N", reason_kind(reason))


def select(names: list[str], pattern: str | None, shard: str | None, limit: int | None) -> list[str]:
    if pattern:
        names = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
    if shard:
        index, count = (int(part) for part in shard.split("/"))
        if not 1 <= index <= count:
            raise click.BadParameter(f"shard must be I/N with 1 <= I <= N, got {shard}", param_hint="--shard")
        names = names[index - 1 :: count]
    return names[:limit] if limit else names


@click.command()
@click.option("--source", type=click.Choice([*SOURCES, "all"]), default="all", show_default=True)
@click.option("--models", "pattern", help="Glob on source:name, e.g. 'timm:resnet*'.")
@click.option("--limit", type=int, help="Check at most this many models.")
@click.option("--smoke", is_flag=True, help=f"Check only {', '.join(SMOKE_MODELS)} (seconds).")
@click.option("--shard", help="I/N: check every N-th model starting at the I-th (parallel runs).")
@click.option("--groups", type=int, default=4, show_default=True, help="groups = condense_factor.")
@click.option("--input-size", type=int, default=64, show_default=True, help="Preferred square input.")
@click.option("--linear", is_flag=True, help="Condense Linear layers too (condensify(linear=True)).")
@click.option("--max-params", type=float, default=100e6, show_default=True, help="Skip larger models.")
@click.option("--timeout", type=int, default=300, show_default=True, help="Seconds per model (0: none).")
@click.option("--rtol", type=float, default=1e-4, show_default=True, help="Exactness tolerance.")
@click.option("--cache", type=click.Path(path_type=Path), help="JSON-lines results file; resumes from it.")
@click.option("--out", type=click.Path(path_type=Path), default=DOCS / "coverage.md", show_default=True)
@click.option("--report/--no-report", default=True, help="Write the coverage page and its JSON.")
@click.option("--report-only", is_flag=True, help="Only write the report from the cache.")
@click.option("--retry-failed", is_flag=True, help="Check again only the models the cache records as failed.")
@click.option(
    "--budget-minutes",
    type=float,
    help="Stop checking after this long; the models left are recorded as skipped, surveyed only.",
)
@click.option(
    "--resurvey",
    is_flag=True,
    help="Refresh the meta-device survey (reasons, blocked layers) of cached models.",
)
def main(
    source: str,
    pattern: str | None,
    limit: int | None,
    smoke: bool,
    shard: str | None,
    groups: int,
    input_size: int,
    linear: bool,
    max_params: float,
    timeout: int,
    rtol: float,
    cache: Path | None,
    out: Path,
    report: bool,
    report_only: bool,
    retry_failed: bool,
    resurvey: bool,
    budget_minutes: float | None,
) -> None:
    """Check every zoo model through condensify -> train -> finalize and write the coverage page."""
    torch.set_num_threads(1)
    settings = Settings(groups, input_size, max_params, timeout, rtol, linear)
    everything = list_models(SOURCES if source == "all" else (source,))
    names = list(SMOKE_MODELS) if smoke else select(everything, pattern, shard, limit)
    cached = read_cache(cache)
    # A survey is cached as status "surveyed" until its check lands, so a resumed run skips it.
    records = {k: r for k, r in cached.items() if r["status"] != SURVEYED}
    surveys = {k: r for k, r in cached.items() if r["status"] == SURVEYED and k in names}
    todo = [n for n in names if n not in cached]
    if retry_failed:
        todo = [n for n in names if n in records and records[n]["status"] == "fail"]
        surveys = {}
    if resurvey:
        for key in tqdm([n for n in names if n in records], desc="resurvey", unit="model", file=sys.stderr):
            fresh = survey(key, groups, linear)
            if "eligible" not in fresh:
                continue
            if records[key]["status"] == "no eligible layer" and fresh["eligible"]:
                # a layer this lgconv can condense (a pointwise Conv1d / Conv3d): check it now
                surveys[key] = {**fresh, "status": SURVEYED}
                del records[key]
                append(cache, surveys[key])
                continue
            records[key] = {**records[key], **{k: fresh[k] for k in ("skip_reasons", "blocked", "layers")}}
            if records[key]["status"] == "no eligible layer":
                records[key]["reason"] = verdict_from_survey(fresh, settings)["reason"]
            append(cache, records[key])
    if not report_only:
        for key in tqdm(todo, desc="survey", unit="model", file=sys.stderr):
            surveyed = survey(key, groups, linear)
            verdict = verdict_from_survey(surveyed, settings)
            if verdict is None:
                surveys[key] = {**surveyed, "status": SURVEYED}
                append(cache, surveys[key])
            else:
                records[key] = verdict
                append(cache, verdict)
        # Smallest first, so a run cut short has covered as many models as it could.
        checks = sorted(surveys, key=lambda k: surveys[k].get("params", 0))
        progress = tqdm(checks, desc="check", unit="model", file=sys.stderr)
        stop_at = time.monotonic() + budget_minutes * 60 if budget_minutes else math.inf
        for key in progress:
            progress.set_postfix_str(key)
            if time.monotonic() > stop_at:
                record = {
                    **surveys[key],
                    "status": "skipped",
                    "reason": f"surveyed on the meta device only ({surveys[key].get('eligible')} eligible "
                    f"layers): not checked within the run's {budget_minutes:g}-minute budget",
                }
            else:
                record = check(key, settings, surveys[key])
            records[key] = record
            append(cache, record)
            if record["status"] == "fail":
                tqdm.write(f"FAIL {key}: {record['reason']}", file=sys.stderr)
    shown = [records[n] for n in (names if smoke or limit or pattern else everything) if n in records]
    counts = Counter(r["status"] for r in shown)
    click.echo(f"{len(shown)} models: " + ", ".join(f"{counts.get(s, 0)} {s}" for s in STATUSES))
    if report:
        command = "python benchmarks/zoo_sweep.py " + " ".join(sys.argv[1:])
        listed = names if smoke or limit or pattern else everything
        totals = {s: sum(n.startswith(s + ":") for n in listed) for s in SOURCES}
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(render(shown, {s: n for s, n in totals.items() if n}, settings, command.strip()))
        out.with_suffix(".json").write_text("[\n" + ",\n".join(json.dumps(r) for r in shown) + "\n]\n")
        click.echo(f"wrote {out} and {out.with_suffix('.json')}")
    if counts.get("fail"):
        sys.exit(1)


if __name__ == "__main__":
    main()
