"""The ``lgconv`` command: count FLOPs, plan condensing, finalize and inspect saved models.

Thin by design: parse, call the library, print. Every error is one line on stderr naming the problem
and the fix, with exit status 2 and no traceback.
"""

from __future__ import annotations

import copy
import json
import sys
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import click
import torch
from torch import nn

from lgconv import model_file, model_formats
from lgconv.condensify import apply_plan, plan
from lgconv.finalize import finalize
from lgconv.flops import CONVENTIONS, FlopReport, count_flops, default_input_size
from lgconv.layers.learned_group import LAYOUTS, LearnedGroupMixin

DEFAULT_INPUT_SIZE = (3, 224, 224)
EXIT_ERROR = 2


def _one_line(message: str) -> str:
    return " ".join(message.split())


class _OneLineErrors(click.Group):
    """A click group that reports every failure as a single line on stderr with exit status 2."""

    def main(self, args: Sequence[str] | None = None, prog_name: str | None = None, **extra: Any) -> Any:
        extra.pop("standalone_mode", None)
        argv = list(sys.argv[1:] if args is None else args)
        name = "lgconv " + next((a for a in argv if a in self.commands), "").strip()
        try:
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")  # deprecation chatter; what matters is in the output
                code = super().main(args, prog_name or "lgconv", standalone_mode=False, **extra)
        except click.UsageError as error:
            where = error.ctx.command_path if error.ctx else "lgconv"
            click.echo(
                f"{where}: {_one_line(error.format_message()).rstrip('.')}; see {where} --help", err=True
            )
            sys.exit(EXIT_ERROR)
        except click.ClickException as error:
            click.echo(f"{name.strip()}: {_one_line(error.format_message())}", err=True)
            sys.exit(EXIT_ERROR)
        except click.Abort:
            click.echo(f"{name.strip()}: aborted", err=True)
            sys.exit(EXIT_ERROR)
        except (ValueError, TypeError, OSError) as error:
            click.echo(f"{name.strip()}: {_one_line(str(error))}", err=True)
            sys.exit(EXIT_ERROR)
        except Exception as error:  # the promise is: never a traceback
            click.echo(
                f"{name.strip()}: unexpected {type(error).__name__}: {_one_line(str(error))}", err=True
            )
            sys.exit(EXIT_ERROR)
        sys.exit(code if isinstance(code, int) else 0)


@click.group(name="lgconv", cls=_OneLineErrors, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="lgconv")
def main() -> None:
    """lgconv: learned group convolution for any PyTorch network.

    \b
    Examples:
      lgconv plan --arch timm:resnet50 --groups 4
      lgconv flops model.pt
      lgconv finalize model.pt model_final.pt
      lgconv inspect model_final.pt
      lgconv export model_final.pt model.onnx --runtime openvino
    """


def _input_shape(
    opened: model_formats.OpenedModel, input_size: tuple[int, ...] | None, batch: int | None
) -> tuple[tuple[int, ...], str]:
    """The full input shape (with batch) and where it came from."""
    if input_size:
        return (batch or 1, *input_size), "from --input-size"
    if opened.input_shape is not None:
        shape = opened.input_shape
        return ((batch, *shape[1:]) if batch else shape), f"from the {opened.format}"
    if opened.spec is not None and opened.spec.input_size is not None:
        return (batch or 1, *opened.spec.input_size), "recorded in the file"
    declared = default_input_size(opened.module)
    if declared is not None:
        return (batch or 1, *declared), "declared by the model"
    return (batch or 1, *DEFAULT_INPUT_SIZE), "default; pass --input-size C H W to change it"


def _count(module: nn.Module, shape: tuple[int, ...], convention: str) -> FlopReport:
    """count_flops with its one-line summary of uncounted operators kept in the report, not warned."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return count_flops(module, shape[1:], batch_size=shape[0], convention=convention)


def _json_object(ctx: click.Context, param: click.Parameter, value: str | None) -> dict[str, Any] | None:
    if value is None:
        return None
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError:
        parsed = None
    if not isinstance(parsed, dict):
        raise click.BadParameter(f"{value!r} is not a JSON object; write e.g. '{{\"num_classes\": 10}}'")
    return parsed


_ARCH_KWARGS = click.option(
    "--arch-kwargs",
    callback=_json_object,
    help="Builder keyword arguments as JSON, e.g. '{\"num_classes\": 10}'.",
)
_TRUST_PICKLE = click.option(
    "--trust-pickle",
    is_flag=True,
    help="Allow a whole pickled nn.Module (unpickling runs code from the file).",
)
_TRUST_BUILDER = click.option(
    "--trust-builder",
    is_flag=True,
    help="Run a file's architecture builder from outside timm.models, torchvision.models, lgconv.models.",
)


@main.command(short_help="FLOPs (multiply-adds) and parameters of a model file, dense vs effective.")
@click.argument("model_file", type=click.Path(path_type=Path))
@click.option(
    "--input-size", nargs=3, type=click.IntRange(min=1), help="Input C H W (default: from the file)."
)
@click.option("--batch", type=click.IntRange(min=1), help="Batch size (default 1).")
@click.option("--by", type=click.Choice(["module", "operator"]), default="module", show_default=True)
@click.option(
    "--depth", type=click.IntRange(min=0), default=2, show_default=True, help="Module levels shown."
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as JSON.")
@click.option("--convention", type=click.Choice(CONVENTIONS), default="fvcore", show_default=True)
@click.option(
    "--arch", help="Architecture of a plain state dict: timm:NAME, lgconv:PRESET or module:function."
)
@_ARCH_KWARGS
@_TRUST_PICKLE
@_TRUST_BUILDER
def flops(
    model_file: Path,
    input_size: tuple[int, ...] | None,
    batch: int | None,
    by: str,
    depth: int,
    as_json: bool,
    convention: str,
    arch: str | None,
    arch_kwargs: dict[str, Any] | None,
    trust_pickle: bool,
    trust_builder: bool,
) -> None:
    """Count FLOPs (multiply-adds) and parameters of MODEL_FILE; masked models show dense vs effective.

    MODEL_FILE is an lgconv file (lgconv.save), a TorchScript archive, a torch.export .pt2, a state
    dict (with --arch), or a pickled nn.Module (with --trust-pickle).

    \b
    Examples:
      lgconv flops model.pt
      lgconv flops model.pt --input-size 3 32 32 --by operator
      lgconv flops resnet18_weights.pth --arch timm:resnet18 --json
      lgconv flops weights.pth --arch torchvision.models:resnet18 --arch-kwargs '{"num_classes": 10}'
    """
    opened = model_formats.open_model(
        model_file, arch=arch, arch_kwargs=arch_kwargs, trust_pickle=trust_pickle, trust_builder=trust_builder
    )
    shape, source = _input_shape(opened, input_size, batch)
    report = _count(opened.module, shape, convention)
    if as_json:
        document = {
            "file": str(model_file),
            "format": opened.format,
            "input_source": source,
            **report.to_dict(),
        }
        click.echo(json.dumps(document, indent=2))
        return
    click.echo(f"{model_file}: {opened.format}; input {'x'.join(map(str, shape))} ({source})")
    click.echo(report.table(depth, by=by))


def _condense_fully(model: nn.Module) -> nn.Module:
    for module in model.modules():
        if isinstance(module, LearnedGroupMixin):
            while not module.fully_condensed:
                module.condense()
    return model


def _int_list(ctx: click.Context, param: click.Parameter, value: str | None) -> tuple[int, ...] | None:
    if value is None:
        return None
    try:
        return tuple(int(v) for v in value.split(","))
    except ValueError:
        raise click.BadParameter(
            f"{value!r} is not a comma-separated list of integers, e.g. 1,2,4,8"
        ) from None


def _overrides(
    ctx: click.Context, param: click.Parameter, value: tuple[str, ...]
) -> dict[str, tuple[int, int] | None] | None:
    pins: dict[str, tuple[int, int] | None] = {}
    for item in value:
        pattern, _, choice = item.rpartition("=")
        if not pattern:
            raise click.BadParameter(f"{item!r} is not PATTERN=G,C or PATTERN=dense, e.g. 'layer4.*=4,4'")
        if choice == "dense":
            pins[pattern] = None
            continue
        try:
            group, factor = (int(v) for v in choice.split(","))
        except ValueError:
            raise click.BadParameter(
                f"{item!r} is not PATTERN=G,C or PATTERN=dense, e.g. 'layer4.*=4,4'"
            ) from None
        pins[pattern] = (group, factor)
    return pins or None


@main.command("plan", short_help="Condensify dry run on an architecture, with FLOPs before and after.")
@click.option(
    "--arch", required=True, help="Architecture: timm:NAME, lgconv:PRESET or package.module:function."
)
@click.option(
    "--groups", type=click.IntRange(min=1), help="Groups of every layer (default 4; not with a target)."
)
@click.option("--condense-factor", type=click.IntRange(min=1), help="Default: the number of groups.")
@click.option("--include", multiple=True, help="Glob on module names to condense (repeatable).")
@click.option("--exclude", multiple=True, help="Glob on module names to leave dense (repeatable).")
@click.option("--layout", type=click.Choice(LAYOUTS), default="contiguous", show_default=True)
@click.option("--linear", is_flag=True, help="Condense Linear layers too.")
@click.option("--input-size", nargs=3, type=click.IntRange(min=1), help="Input C H W for the FLOP count.")
@click.option("--convention", type=click.Choice(CONVENTIONS), default="fvcore", show_default=True)
@click.option(
    "--target-flops", type=float, help="Budget: fraction (0, 1] of the dense multiply-adds, or a count."
)
@click.option(
    "--target-params", type=float, help="Budget: fraction (0, 1] of the dense parameters, or a count."
)
@click.option(
    "--target-latency-ms", type=float, help="Budget: milliseconds per batch, measured on this machine."
)
@click.option("--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Batch for latency.")
@click.option(
    "--allowed-groups", callback=_int_list, help="Budget: groups to choose from, e.g. 1,2,4,8 (default G=C)."
)
@click.option(
    "--allowed-factors", callback=_int_list, help="Budget: factors to choose from (default 1,2,4,8)."
)
@click.option(
    "--override",
    "overrides",
    multiple=True,
    callback=_overrides,
    help="Pin layers: 'PATTERN=G,C' or 'PATTERN=dense' (repeatable).",
)
@click.option(
    "--round-to",
    type=click.IntRange(min=1),
    default=1,
    show_default=True,
    help="Kept inputs and outputs per group multiples of N.",
)
@click.option(
    "--kxk/--no-kxk", default=None, help="Condense ungrouped kxk convolutions too (default: with a target)."
)
@_ARCH_KWARGS
@_TRUST_BUILDER
def plan_command(
    arch: str,
    groups: int | None,
    condense_factor: int | None,
    include: tuple[str, ...],
    exclude: tuple[str, ...],
    layout: str,
    linear: bool,
    input_size: tuple[int, ...] | None,
    convention: str,
    target_flops: float | None,
    target_params: float | None,
    target_latency_ms: float | None,
    batch: int,
    allowed_groups: tuple[int, ...] | None,
    allowed_factors: tuple[int, ...] | None,
    overrides: dict[str, tuple[int, int] | None] | None,
    round_to: int,
    kxk: bool | None,
    arch_kwargs: dict[str, Any] | None,
    trust_builder: bool,
) -> None:
    """Dry-run condensify on an architecture: what each layer becomes, FLOPs before and after.

    Layers the architecture already has as learned group layers (lgconv presets) count as condensed;
    with a target, those that have not started condensing are planned again.

    \b
    Examples:
      lgconv plan --arch timm:resnet50
      lgconv plan --arch timm:resnet50 --groups 8 --condense-factor 4 --exclude 'layer4.*'
      lgconv plan --arch lgconv:condensenet86 --convention paper
      lgconv plan --arch timm:resnet50 --target-flops 0.5
      lgconv plan --arch timm:resnet50 --target-latency-ms 40 --batch 8 --override 'layer4.*=dense'
    """
    model = model_file.build_arch(arch, arch_kwargs, trust_builder=trust_builder).eval()
    declared = default_input_size(model)
    targets = dict(
        target_flops=target_flops, target_params=target_params, target_latency_ms=target_latency_ms
    )
    has_budget = any(v is not None for v in targets.values())
    if has_budget and not (input_size or declared):
        raise ValueError(f"a target needs an input size: {arch} declares none, pass --input-size C H W")
    size = tuple(input_size or declared or DEFAULT_INPUT_SIZE)
    source = "from --input-size" if input_size else "declared by the model" if declared else "default"
    options: dict[str, Any] = dict(
        include=include or None, exclude=exclude or None, layout=layout, linear=linear
    )
    budget_options: dict[str, Any] = dict(overrides=overrides, round_to=round_to, kxk=kxk)
    if has_budget:
        budget_options.update(targets, allowed_groups=allowed_groups, allowed_factors=allowed_factors)
        if target_latency_ms is not None:
            budget_options["example_input"] = torch.randn(batch, *size)
        else:
            budget_options["input_size"] = size
    else:
        budget_options.update(allowed_groups=allowed_groups, allowed_factors=allowed_factors)
    decisions = plan(model, groups, condense_factor, **options, **budget_options)
    click.echo(decisions.table())
    condensed = copy.deepcopy(model)
    if decisions.eligible or has_budget:
        condensed = apply_plan(condensed, decisions)
    if not any(isinstance(m, LearnedGroupMixin) for m in condensed.modules()):
        return
    report = _count(_condense_fully(condensed), (1, *size), convention)
    click.echo(
        f"FLOPs (multiply-adds, input 1x{'x'.join(map(str, size))} {source}, {report.convention} convention, "
        f"{report.counter}): {report.dense_total:,} before -> {report.total:,} after full condensing "
        f"({report.reduction:.2f}x fewer)"
    )
    click.echo(f"parameters: {report.dense_params:,} before -> {report.params:,} after")


@main.command("finalize", short_help="Finalize a saved condensified model into its inference form.")
@click.argument("in_file", metavar="IN", type=click.Path(path_type=Path))
@click.argument("out_file", metavar="OUT", type=click.Path(path_type=Path))
@click.option("--allow-partial", is_flag=True, help="Finalize layers that have not finished condensing.")
@_TRUST_BUILDER
def finalize_command(in_file: Path, out_file: Path, allow_partial: bool, trust_builder: bool) -> None:
    """Finalize the condensified model in lgconv file IN into its inference form, saved to OUT.

    \b
    Examples:
      lgconv finalize model.pt model_final.pt
      lgconv finalize checkpoint.pt partial.pt --allow-partial
    """
    opened = model_formats.open_model(in_file, trust_builder=trust_builder)
    if opened.spec is None:
        raise ValueError(
            f"{in_file} is a {opened.format}; finalize reads lgconv files, save the model with lgconv.save"
        )
    layers = [(n, m) for n, m in opened.module.named_modules() if isinstance(m, LearnedGroupMixin)]
    if not layers:
        raise ValueError(f"{in_file} has no learned group layers to finalize (already finalized?)")
    unfinished = [(n, m) for n, m in layers if not m.fully_condensed]
    if unfinished and not allow_partial:
        name, layer = unfinished[0]
        raise ValueError(
            f"{len(unfinished)} of {len(layers)} layers of {in_file} have not finished condensing "
            f"(e.g. {name!r} at stage {int(layer.stage)} of {layer.max_stage}); train further, or pass "
            "--allow-partial to finalize with the inputs kept so far"
        )
    model = finalize(opened.module, allow_partial=allow_partial)
    spec = opened.spec
    model_file.save(model, out_file, arch=spec.arch, arch_kwargs=spec.arch_kwargs, input_size=spec.input_size)
    partial = f", {len(unfinished)} of them partially condensed" if unfinished else ""
    click.echo(f"finalized {len(layers)} layers{partial}: {in_file} -> {out_file}")


def _layer_rows(spec: model_file.ModelSpec) -> list[tuple[str, ...]]:
    rows = []
    for record in spec.layers:
        config, state = record.config, record.state
        inputs = config.get("in_channels", config.get("in_features"))
        outputs = config.get("out_channels", config.get("out_features"))
        size = config.get("kernel_size", [])
        kernel = "x".join(map(str, size if isinstance(size, list) else [size, size]))
        groups = config.get("learned_groups", config.get("groups", "?"))
        factor = config.get("condense_factor")
        stage = f"{state['stage']}/{state.get('max_stage', '?')}" if "stage" in state else "final"
        density = f"{state['density']:.3f}" if "density" in state else "?"
        rows.append(
            (
                ", ".join(record.names) or "(model)",
                record.type + (f"[{config['kernel']}]" if "kernel" in config else ""),
                f"{inputs}->{outputs}" + (f" {kernel}" if kernel else ""),
                str(groups),
                "-" if factor is None else str(factor),
                stage,
                density,
            )
        )
    return rows


def _table(rows: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
    lines.insert(1, "-" * max(len(line) for line in lines))
    return "\n".join(lines)


@main.command(short_help="Groups, factor, stage and density of every lgconv layer in a file.")
@click.argument("model_file", type=click.Path(path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the file's spec as JSON.")
def inspect(model_file: Path, as_json: bool) -> None:
    """Show the architecture, input size and every condensed layer of an lgconv file (weights not loaded).

    \b
    Examples:
      lgconv inspect model.pt
      lgconv inspect model.pt --json
    """
    kind = model_formats.sniff(model_file)
    spec = _lgconv_spec(model_file, kind)
    if as_json:
        click.echo(json.dumps(json.loads(spec.to_json()), indent=2))
        return
    size = "x".join(map(str, spec.input_size)) if spec.input_size else "not recorded"
    click.echo(f"{model_file}: lgconv file, format version {spec.version}")
    click.echo(f"architecture: {spec.arch} {json.dumps(spec.arch_kwargs)}")
    click.echo(f"input size: {size}; saved in {'train' if spec.training else 'eval'} mode")
    if not spec.layers:
        click.echo("no lgconv layers")
        return
    header = ("layer", "type", "shape", "groups", "factor", "stage", "density")
    click.echo(_table([header, *_layer_rows(spec)]))
    masked = sum(1 for r in spec.layers if "stage" in r.state)
    unfinished = sum(
        1 for r in spec.layers if "stage" in r.state and r.state["stage"] < r.state.get("max_stage", 0)
    )
    click.echo(
        f"{len(spec.layers)} lgconv layers: {masked} masked ({unfinished} still condensing), "
        f"{len(spec.layers) - masked} finalized"
    )


def _lgconv_spec(path: Path, kind: str) -> model_file.ModelSpec:
    """The spec of an lgconv file, or one line saying what the file is instead."""
    spec = model_file.read_spec(path) if kind == "safetensors" else None
    if spec is None:
        what = "safetensors file without an lgconv spec" if kind == "safetensors" else kind
        raise ValueError(
            f"{path} is a {what}, not an lgconv file; save the model with lgconv.save to inspect it"
        )
    return spec


@main.command(
    "export", short_help="Export a finalized model to ONNX, each layer tuned for ONNX Runtime or OpenVINO."
)
@click.argument("model_file", type=click.Path(path_type=Path))
@click.argument("out_file", metavar="OUT.onnx", type=click.Path(path_type=Path))
@click.option(
    "--runtime",
    default="onnxruntime",
    show_default=True,
    help="Runtime to tune for: onnxruntime or openvino.",
)
@click.option(
    "--batch", type=click.IntRange(min=1), default=1, show_default=True, help="Batch size to tune for."
)
@click.option(
    "--input-size", nargs=3, type=click.IntRange(min=1), help="Input C H W (default: from the file)."
)
@_TRUST_BUILDER
def export_command(
    model_file: Path,
    out_file: Path,
    runtime: str,
    batch: int,
    input_size: tuple[int, ...] | None,
    trust_builder: bool,
) -> None:
    """Export the finalized model in MODEL_FILE to OUT.onnx (dynamic batch axis) for RUNTIME.

    Each condensed layer takes the form (gather + grouped conv, dense with zeros, dense over the kept
    inputs) that times fastest in the runtime at the given batch and input size; the file is written
    only once the runtime reproduces the model's outputs.

    \b
    Examples:
      lgconv export model_final.pt model.onnx
      lgconv export model_final.pt model.onnx --runtime openvino --batch 1 --input-size 3 32 32
    """
    from lgconv.export import export_onnx, require_runtime

    try:
        require_runtime(runtime)
    except ImportError as error:
        raise click.ClickException(str(error)) from None
    if not out_file.parent.is_dir():
        raise ValueError(f"folder {out_file.parent} does not exist; create it or write elsewhere")
    opened = model_formats.open_model(model_file, trust_builder=trust_builder)
    if any(isinstance(m, LearnedGroupMixin) for m in opened.module.modules()):
        raise ValueError(
            f"{model_file} still has learned group layers; finalize it first: "
            f"lgconv finalize {model_file} FINAL_FILE"
        )
    shape, _ = _input_shape(opened, input_size, batch)
    example = torch.randn(shape, generator=torch.Generator().manual_seed(0))
    report = export_onnx(opened.module.eval(), out_file, example, runtime=runtime)
    click.echo(str(report))


if __name__ == "__main__":
    main()
