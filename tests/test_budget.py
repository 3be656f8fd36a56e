"""Condensing to a budget: per-layer (groups, factor) chosen to meet FLOP / parameter / latency targets."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
from click.testing import CliRunner
from helpers import TinyConvNet, condense_all, perturb_
from torch import nn

import lgconv
import lgconv.models
from lgconv.cli import main
from lgconv.layers.learned_group import LearnedGroupMixin


def finalized_flops(model: nn.Module, input_size: tuple[int, ...]) -> lgconv.FlopReport:
    """count_flops of a copy of ``model``, fully condensed on its weights and finalized."""
    final = lgconv.finalize(condense_all(copy.deepcopy(model)))
    return lgconv.count_flops(final, input_size)


def by_name(plan: lgconv.CondensePlan) -> dict[str, lgconv.LayerDecision]:
    return {d.name: d for d in plan.decisions}


class TwoLayers(nn.Module):
    """Two 32->32 1x1 convs of equal cost; ``peaked`` concentrates the first's weight on 4 inputs."""

    def __init__(self, peaked: bool = False) -> None:
        super().__init__()
        self.a = nn.Conv2d(32, 32, 1)
        self.b = nn.Conv2d(32, 32, 1)
        if peaked:
            with torch.no_grad():
                self.a.weight.mul_(0.01)
                self.a.weight[:, :4] *= 1000

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.b(torch.relu(self.a(x)))


def pointwise_net(width: int = 16, classes: int = 10) -> nn.Sequential:
    """Mostly 1x1 convs of different widths (with batch norms), so budgets have room to move."""
    layers: list[nn.Module] = [nn.Conv2d(1, width, 3, padding=1)]
    for inputs, outputs in ((width, 4 * width), (4 * width, 2 * width), (2 * width, 4 * width)):
        layers += [nn.BatchNorm2d(inputs), nn.ReLU(), nn.Conv2d(inputs, outputs, 1)]
    layers += [nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * width, classes)]
    return nn.Sequential(*layers)


class FlopsVersusParams(nn.Module):
    """A 1x1 conv on a large image (FLOPs) and a wide linear head (parameters)."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(16, 16, 1, bias=False)
        self.head = nn.Linear(16, 512, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.conv(x).mean((2, 3)))


def test_the_plan_cost_is_what_count_flops_says_of_the_finalized_model():
    model = perturb_(pointwise_net()).eval()
    plan = lgconv.plan(model, target_flops=0.6, input_size=(1, 16, 16))
    lgconv.condensify(model, target_flops=0.6, input_size=(1, 16, 16))
    report = finalized_flops(model, (1, 16, 16))
    assert report.total == plan.flops and report.params == plan.params
    assert plan.dense_flops == report.dense_total
    assert plan.flops <= 0.6 * plan.dense_flops  # 3 layers are too coarse for 2%; real networks: below
    assert plan.targets == {"flops": pytest.approx(0.6 * plan.dense_flops)}


def test_an_absolute_count_is_a_target_too():
    model = TwoLayers()
    dense = lgconv.plan(model, input_size=(32, 8, 8), groups=1, condense_factor=1).dense_flops
    plan = lgconv.plan(model, target_flops=dense * 0.5, input_size=(32, 8, 8))
    assert 0.98 * dense * 0.5 <= plan.flops <= dense * 0.5


def test_the_budget_goes_where_the_least_importance_is_lost():
    decisions = by_name(lgconv.plan(TwoLayers(peaked=True), target_flops=0.75, input_size=(32, 8, 8)))
    assert decisions["a"].condense and decisions["a"].condense_factor >= 2
    assert not decisions["b"].condense and decisions["b"].condense_factor == 1
    assert decisions["a"].importance_lost < 0.01


def test_with_flat_importance_the_budget_is_spread_not_piled_on_one_layer():
    torch.manual_seed(0)
    decisions = by_name(lgconv.plan(TwoLayers(), target_flops=0.5, input_size=(32, 8, 8)))
    assert (decisions["a"].condense_factor, decisions["b"].condense_factor) == (2, 2)


@pytest.mark.parametrize("name", ["mobilenetv2_100"])
def test_a_timm_model_lands_within_two_percent_after_finalize(name):
    _check_targets(name, (0.5,), (3, 96, 96))


@pytest.mark.slow
@pytest.mark.parametrize("name", ["resnet50", "mobilenetv2_100", "regnety_016", "condensenet86"])
def test_zoo_targets_within_two_percent_after_finalize(name):
    _check_targets(name, (0.4, 0.6, 0.8), (3, 32, 32) if name == "condensenet86" else (3, 224, 224))


def _check_targets(name: str, targets: tuple[float, ...], size: tuple[int, ...]) -> None:
    for target in targets:
        torch.manual_seed(0)
        model = (
            lgconv.models.create_model(name) if name.startswith("condensenet") else timm.create_model(name)
        )
        model = lgconv.condensify(model.eval(), target_flops=target, input_size=size)
        report = finalized_flops(model, size)
        assert abs(report.total / report.dense_total - target) <= 0.02 * target, (name, target)


def test_overrides_pin_layers_and_round_to_keeps_multiples():
    plan = lgconv.plan(
        pointwise_net(), target_flops=0.8, input_size=(1, 8, 8), overrides={"9": None, "3": (2, 4)}
    )
    rows = by_name(plan)
    assert (rows["9"].condense, rows["9"].condense_factor) == (False, 1)
    assert (rows["3"].groups, rows["3"].condense_factor) == (2, 4)
    assert "pinned by overrides['3']" in rows["3"].reason
    rounded = lgconv.plan(pointwise_net(), target_flops=0.6, input_size=(1, 8, 8), round_to=8)
    assert rounded.eligible
    for d in rounded.eligible:
        inputs, outputs = (int(v) for v in d.shape.split()[0].split("->"))
        assert (inputs // d.condense_factor) % 8 == 0 and (outputs // d.groups) % 8 == 0


def test_allowed_groups_are_searched_and_the_least_loss_wins():
    plan = lgconv.plan(
        TwoLayers(), target_flops=0.5, input_size=(32, 8, 8), allowed_groups=(1, 4), allowed_factors=(2,)
    )
    # at equal cost more groups keep more importance (each group picks its own inputs)
    assert {(d.groups, d.condense_factor) for d in plan.eligible} == {(4, 2)}


def test_the_table_shows_each_choice_and_requested_versus_achieved():
    table = lgconv.plan(pointwise_net(), target_flops=0.7, input_size=(1, 8, 8)).table()
    lines = table.splitlines()
    assert lines[0].split() == [
        "module", "type", "shape", "decision", "G", "C", "multiply-adds", "params", "lost", "reason",
    ]  # fmt: skip
    assert "groups and condense_factor per layer" in lines[-2]
    assert lines[-1].startswith("after finalize: multiply-adds") and "requested" in lines[-1]


def test_a_uniform_plan_with_an_input_reports_its_cost():
    plan = lgconv.plan(lgconv.models.condensenet50(), input_size=(3, 32, 32))
    assert plan.flops < plan.dense_flops
    assert plan.flops == finalized_flops(lgconv.models.condensenet50(), (3, 32, 32)).total


def test_condensenet_at_the_uniform_flops_with_factors_chosen_per_layer(tmp_path):
    """The accuracy suite's lgc_budget arm: the G=C=4 preset's FLOPs, spent per layer."""
    uniform = lgconv.plan(lgconv.models.condensenet50(), input_size=(3, 32, 32)).flops
    torch.manual_seed(0)
    model = lgconv.condensify(lgconv.models.condensenet50(), target_flops=uniform, input_size=(3, 32, 32))
    layers = [m for m in model.modules() if isinstance(m, LearnedGroupMixin)]
    assert len({(m.learned_groups, m.condense_factor) for m in layers}) > 1
    assert all(m.layout == "interleaved" for m in layers if m.weight.dim() == 4)  # the preset's layout kept
    report = finalized_flops(model, (3, 32, 32))
    assert 0.98 * uniform <= report.total <= uniform
    path = tmp_path / "budget.pt"
    lgconv.save(model, path)
    loaded = lgconv.load(path)
    assert [
        (m.learned_groups, m.condense_factor) for m in loaded.modules() if isinstance(m, LearnedGroupMixin)
    ] == [(m.learned_groups, m.condense_factor) for m in layers]


def test_a_mixed_factor_model_through_the_whole_lifecycle(tmp_path):
    torch.manual_seed(0)
    model = pointwise_net()
    plan = lgconv.plan(model, target_flops=0.45, input_size=(1, 8, 8))
    model = lgconv.condensify(model, target_flops=0.45, input_size=(1, 8, 8))
    factors = sorted(m.condense_factor for m in model.modules() if isinstance(m, LearnedGroupMixin))
    assert len(set(factors)) > 1, plan.table()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.01)
    sched = lgconv.CondensationScheduler(model, total_steps=8, lasso=1e-4)
    for _ in range(8):
        x, y = torch.randn(4, 1, 8, 8), torch.randint(0, 10, (4,))
        loss = nn.functional.cross_entropy(model(x), y) + sched.lasso_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        sched.step()
    assert all(m.fully_condensed for m in model.modules() if isinstance(m, LearnedGroupMixin))
    model.eval()
    x = torch.randn(3, 1, 8, 8)
    with torch.no_grad():
        masked = model(x)
        final = lgconv.finalize(model)
        torch.testing.assert_close(final(x), masked, atol=1e-5, rtol=1e-5)
    assert lgconv.count_flops(final, (1, 8, 8)).total == plan.flops
    path = tmp_path / "mixed.pt"
    lgconv.save(final, path, arch=pointwise_net, arch_kwargs={}, input_size=(1, 8, 8))
    with torch.no_grad():
        loaded = lgconv.load(path, trust_builder=True).eval()
        torch.testing.assert_close(loaded(x), masked, atol=1e-5, rtol=1e-5)
    assert lgconv.count_flops(loaded, (1, 8, 8)).total == plan.flops


def test_a_latency_plan_reports_the_measured_optimised_model():
    """Timings are not asserted (a shared CI machine); the plan's bookkeeping is."""
    torch.manual_seed(0)
    model = perturb_(pointwise_net(width=32)).eval()
    plan = lgconv.plan(model, target_latency_ms=1e6, example_input=torch.randn(8, 1, 16, 16))
    assert plan.latency_ms == plan.dense_latency_ms  # a target nothing needs to meet keeps every layer dense
    assert not plan.eligible and plan.targets == {"latency_ms": 1e6}
    assert all(d.latency_ms is not None for d in plan.decisions if d.condense_factor == 1)
    assert "ms measured, requested 1000000.000 ms" in plan.table().splitlines()[-1]


def test_latency_search_corrects_the_table_by_whole_model_trials(monkeypatch):
    """With a fake clock: the table promises three times the real saving, so the trials must rescale."""
    from lgconv import budget

    model = pointwise_net()
    calls = []

    def fake_layers(model, candidates, example, repeats=5):
        for c in candidates:
            c.options = [
                budget.Option(o.groups, o.factor, o.flops, o.params, o.lost, o.flops / 1e4) for o in c.options
            ]

    def fake_model(model, candidates, choice, example):
        calls.append(list(choice))
        predicted = sum(c.options[i].latency_ms for c, i in zip(candidates, choice))
        dense = sum(c.options[0].latency_ms for c in candidates)
        return 10.0 + dense - (dense - predicted) / 3  # a third of the saving the table promised

    monkeypatch.setattr(budget, "measure_layers", fake_layers)
    monkeypatch.setattr(budget, "measure_model", fake_model)
    full = lgconv.plan(model, target_latency_ms=1e6, example_input=torch.randn(1, 1, 8, 8))
    wanted = 0.93 * full.dense_latency_ms
    calls.clear()
    plan = lgconv.plan(model, target_latency_ms=wanted, example_input=torch.randn(1, 1, 8, 8))
    assert len(calls) >= 3  # the base model and at least two trials
    assert 0.9 * wanted <= plan.latency_ms <= wanted and plan.eligible


def test_a_latency_target_the_trials_cannot_reach_is_refused_not_returned(monkeypatch):
    """Fake clock: the table says 80 ms is reachable (about 71 at best), the whole model always takes 100."""
    from lgconv import budget

    model = pointwise_net()

    def fake_layers(model, candidates, example, repeats=5):
        for c in candidates:
            c.options = [
                budget.Option(o.groups, o.factor, o.flops, o.params, o.lost, o.flops / 1e4) for o in c.options
            ]

    monkeypatch.setattr(budget, "measure_layers", fake_layers)
    monkeypatch.setattr(budget, "measure_model", lambda model, candidates, choice, example: 100.0)
    with pytest.raises(
        ValueError, match=r"target_latency_ms=80 was not met: the closest of \d measured trials"
    ):
        lgconv.plan(model, target_latency_ms=80, example_input=torch.randn(1, 1, 8, 8))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"target_flops": 0.01}, r"target_flops=0.01 \(.*\) is unreachable: the smallest achievable is"),
        ({"target_flops": 0.9, "target_params": 0.2, "linear": True}, "conflict: meeting the others"),
        ({"target_flops": 0.0}, r"target_flops must be a fraction in \(0, 1\] or an absolute count > 1"),
        ({"target_flops": "half"}, "target_flops must be"),
        ({"target_latency_ms": -1}, "target_latency_ms must be a positive number"),
        ({"target_latency_ms": 5}, "target_latency_ms is measured on an example input"),
        ({"target_flops": 0.5, "groups": 4}, "with a target use allowed_groups / allowed_factors"),
        ({"allowed_factors": (2, 4)}, "allowed_groups / allowed_factors are the choices of a budget"),
        (
            {"target_flops": 0.5, "allowed_factors": (0, 2)},
            "allowed_factors must be a list of positive integers",
        ),
        ({"target_flops": 0.5, "overrides": {"nothing.*": (2, 2)}}, "pattern 'nothing.*' matches no layer"),
        (
            {"target_flops": 0.5, "overrides": {"conv": (3, 2)}},
            r"overrides\['conv'\] = \(3, 2\) does not fit conv",
        ),
        ({"target_flops": 0.5, "overrides": {"conv": 4}}, r"must be \(groups, condense_factor\) or None"),
        ({"target_flops": 0.5, "round_to": 0}, "round_to must be a positive integer"),
    ],
)
def test_bad_budgets_are_one_clear_line(kwargs, message):
    kwargs.setdefault("input_size", (16, 32, 32))
    if "target_latency_ms" in kwargs and kwargs["target_latency_ms"] == 5:
        kwargs.pop("input_size")
    with pytest.raises(ValueError, match=message) as error:
        lgconv.plan(FlopsVersusParams(), **kwargs)
    assert "\n" not in str(error.value)


def test_a_target_without_an_input_size_says_how_to_give_one():
    with pytest.raises(
        ValueError, match=r"target_flops needs an input to count on: pass input_size=\(C, H, W\)"
    ):
        lgconv.condensify(FlopsVersusParams(), target_flops=0.5)
    model = timm.create_model("resnet18")
    with pytest.raises(ValueError, match=r"the model declares \(3, 224, 224\)"):
        lgconv.plan(model, target_flops=0.5)


def test_an_unreachable_target_names_what_limits_it():
    with pytest.raises(
        ValueError,
        match=r"64% of it is in layers the budget cannot change \(1x grouped convolution 147.456K, 1x other ",
    ) as error:
        lgconv.plan(TinyConvNet(width=16), target_flops=0.2, input_size=(1, 8, 8), kxk=False)
    assert "allow larger factors" in str(error.value)


def test_a_target_of_one_keeps_everything_dense():
    model = pointwise_net()
    same = lgconv.condensify(model, target_flops=1.0, input_size=(1, 8, 8))
    assert not any(isinstance(m, LearnedGroupMixin) for m in same.modules())


def run(*args: object) -> tuple[int, str, str]:
    result = CliRunner().invoke(main, [str(a) for a in args])
    return result.exit_code, result.stdout, result.stderr


def test_cli_plan_with_a_target():
    code, out, err = run(
        "plan", "--arch", "timm:resnet18", "--target-flops", "0.6", "--input-size", 3, 64, 64
    )
    assert code == 0, err
    assert "chosen by the budget" in out and "requested" in out
    code, out, _ = run(
        "plan", "--arch", "timm:resnet18", "--target-params", "0.9", "--input-size", 3, 64, 64,
        "--allowed-factors", "1,2,4", "--override", "layer4.*=dense", "--round-to", 4,
    )  # fmt: skip
    assert code == 0 and "pinned by overrides['layer4.*']" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--target-flops", "0.01"), "is unreachable: the smallest achievable is"),
        (("--target-flops", "0.5", "--override", "nothing=2,2"), "matches no layer that can be condensed"),
        (("--target-flops", "0.5", "--override", "conv1"), "is not PATTERN=G,C or PATTERN=dense"),
        (("--target-flops", "0.5", "--allowed-factors", "two"), "not a comma-separated list of integers"),
        (("--target-flops", "0.5", "--groups", "4"), "with a target use allowed_groups"),
    ],
)
def test_cli_bad_budgets_exit_2_with_one_line(args, message):
    code, out, err = run("plan", "--arch", "timm:resnet18", "--input-size", 3, 32, 32, *args)
    assert code == 2 and message in err and len(err.strip().splitlines()) == 1, err
