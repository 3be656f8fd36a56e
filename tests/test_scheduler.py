"""CondensationScheduler: stage boundaries, jumps, lasso, resume, compile, AMP, accumulation, EMA."""

from __future__ import annotations

import copy
import io
import math
from fractions import Fraction

import numpy as np
import pytest
import torch
from helpers import TinyConvNet, assert_finalize_exact
from hypothesis import example, given
from hypothesis import strategies as st
from timm.utils import ModelEmaV2, ModelEmaV3
from torch import nn

import lgconv
from lgconv import CondensationScheduler, LearnedGroupConv, copy_masks
from lgconv.scheduler import learned_group_layers


def lgc_stack(*factors: int, width: int = 24) -> nn.Sequential:
    """1x1 LGCs (groups 2), one per condense factor, so factors can be mixed; never run forward."""
    return nn.Sequential(
        *(LearnedGroupConv(math.lcm(width, c), width, learned_groups=2, condense_factor=c) for c in factors)
    )


def make_net(seed: int = 0, groups: int = 4, factor: int = 4) -> nn.Module:
    torch.manual_seed(seed)
    return lgconv.condensify(TinyConvNet(width=8), groups=groups, condense_factor=factor)


def batches(count: int, seed: int = 1, batch: int = 8) -> list[tuple[torch.Tensor, torch.Tensor]]:
    generator = torch.Generator().manual_seed(seed)
    return [
        (
            torch.randn(batch, 1, 8, 8, generator=generator),
            torch.randint(0, 10, (batch,), generator=generator),
        )
        for _ in range(count)
    ]


def train_steps(model, optimizer, scheduler, data) -> None:
    for x, y in data:
        loss = nn.functional.cross_entropy(model(x), y) + scheduler.lasso_loss()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()


def stages(model: nn.Module) -> list[int]:
    return [int(m.stage) for _, m in learned_group_layers(model)]


@given(
    total=st.integers(1, 60),
    factor=st.integers(1, 8),
    end_percent=st.integers(1, 100),
)
@example(total=12, factor=7, end_percent=10)  # 0.1 * 12 is 1.2000000000000002 in floats
def test_stage_k_happens_at_the_first_step_with_progress_at_least_k_over_c_minus_1_of_the_end(
    total, factor, end_percent
):
    model = lgc_stack(factor)
    end = end_percent / 100
    scheduler = CondensationScheduler(model, total, condense_end=end)
    for step in range(1, total + 2):
        scheduler.step()
        progress = Fraction(step, total)
        expected = max(
            (
                k
                for k in range(factor)
                if progress >= Fraction(k, max(factor - 1, 1)) * Fraction(end_percent, 100)
            ),
            default=0,
        )
        assert stages(model) == [expected], (step, total, factor, end)
        assert scheduler.condensing == (progress < Fraction(end_percent, 100))


def test_default_schedule_is_the_papers_first_half():
    """C = 4: drops at progress 1/6, 2/6 and 3/6; the second half trains the fixed structure."""
    model = lgc_stack(4)
    scheduler = CondensationScheduler(model, 60, lasso=1e-3)
    seen = {}
    for step in range(1, 61):
        scheduler.step()
        seen.setdefault(stages(model)[0], step)
    assert seen == {0: 1, 1: 10, 2: 20, 3: 30}
    assert not scheduler.condensing and scheduler.progress == 1.0
    assert scheduler.lasso_loss().item() == 0.0


def test_condense_end_moves_the_last_drop():
    model = lgc_stack(3)
    scheduler = CondensationScheduler(model, 100, condense_end=0.8)
    for _ in range(79):
        scheduler.step()
    assert stages(model) == [1]
    scheduler.step()
    assert stages(model) == [2]


def test_jumping_several_boundaries_performs_every_missed_drop():
    model = lgc_stack(8, 4, 2)
    scheduler = CondensationScheduler(model, 2)
    scheduler.step()  # progress 0.5: all stages of every layer are due at once
    assert stages(model) == [7, 3, 1]
    assert all(m.fully_condensed for _, m in learned_group_layers(model))
    assert [int(m.kept_inputs) for _, m in learned_group_layers(model)] == [3, 6, 12]


def test_mixed_condense_factors_follow_their_own_boundaries():
    model = lgc_stack(2, 3, 5)
    scheduler = CondensationScheduler(model, 40)
    history = []
    for _ in range(40):
        scheduler.step()
        history.append(stages(model))
    assert history[4] == [0, 0, 1]  # step 5 = progress 1/8: C=5 drops at 1/8, 2/8, 3/8, 4/8
    assert history[9] == [0, 1, 2]  # step 10 = progress 1/4: C=3 drops at 1/4 and 1/2
    assert history[18] == [0, 1, 3]
    assert history[19] == [1, 2, 4]  # step 20 = progress 1/2: everything done
    assert history[-1] == [1, 2, 4]


def test_lasso_loss_is_the_weighted_group_lasso_while_condensing_and_zero_after():
    model = lgc_stack(4, 2)
    scheduler = CondensationScheduler(model, 10, lasso=0.1)
    expected = 0.1 * sum(m.group_lasso() for _, m in learned_group_layers(model))
    loss = scheduler.lasso_loss()
    torch.testing.assert_close(loss, expected)
    loss.backward()
    assert all(m.weight.grad.abs().sum() > 0 for _, m in learned_group_layers(model))
    for _ in range(5):
        scheduler.step()
    assert not scheduler.condensing
    assert scheduler.lasso_loss().item() == 0.0 and not scheduler.lasso_loss().requires_grad
    unweighted = CondensationScheduler(lgc_stack(4), 10)
    assert unweighted.lasso_loss().item() == 0.0


def test_the_scheduler_never_acts_in_forward_or_eval():
    model = make_net()
    scheduler = CondensationScheduler(model, 4)
    x = torch.randn(2, 1, 8, 8)
    for mode in (True, False):
        model.train(mode)
        for _ in range(5):
            model(x)
    assert stages(model) == [0, 0] and scheduler.step_count == 0
    model.eval()
    scheduler.step()  # stepping acts whatever the mode, forward never does
    assert stages(model) == [1, 1]


def test_resume_from_a_checkpoint_mid_condensation_is_bit_identical(tmp_path):
    total = 24
    data = batches(total)

    def fresh(seed: int):
        model = make_net(seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        return model, optimizer, CondensationScheduler(model, total, lasso=1e-3)

    model, optimizer, scheduler = fresh(0)
    train_steps(model, optimizer, scheduler, data)

    first = fresh(0)
    train_steps(*first, data[:7])  # stopped between the 1st (step 4) and 2nd (step 8) drop
    assert stages(first[0]) == [1, 1]
    path = tmp_path / "checkpoint.pt"
    torch.save({name: part.state_dict() for name, part in zip(("model", "opt", "sched"), first)}, path)

    resumed = fresh(123)  # a different initialisation, overwritten by the checkpoint
    state = torch.load(path, weights_only=True)
    resumed[0].load_state_dict(state["model"])
    resumed[1].load_state_dict(state["opt"])
    resumed[2].load_state_dict(state["sched"])
    assert resumed[2].step_count == 7 and stages(resumed[0]) == [1, 1]
    train_steps(*resumed, data[7:])

    assert stages(model) == stages(resumed[0]) == [3, 3]
    for (name, value), other in zip(model.state_dict().items(), resumed[0].state_dict().values()):
        assert torch.equal(value, other), name


def test_loading_the_scheduler_state_first_then_the_model_also_resumes():
    model = make_net()
    scheduler = CondensationScheduler(model, 8)
    for _ in range(4):
        scheduler.step()
    buffer = io.BytesIO()
    torch.save({"model": model.state_dict(), "sched": scheduler.state_dict()}, buffer)
    buffer.seek(0)
    state = torch.load(buffer, weights_only=True)
    other = make_net(seed=5)
    other_scheduler = CondensationScheduler(other, 8)
    other_scheduler.load_state_dict(state["sched"])
    other.load_state_dict(state["model"])
    for _ in range(4):
        scheduler.step()
        other_scheduler.step()
    for _, (a, b) in enumerate(zip(learned_group_layers(model), learned_group_layers(other))):
        assert torch.equal(a[1].mask, b[1].mask)


@pytest.mark.parametrize("backend", ["eager", "aot_eager"])
def test_works_on_a_torch_compile_wrapped_model(backend):
    model = make_net()
    compiled = torch.compile(model, backend=backend)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = CondensationScheduler(compiled, 6, lasso=1e-3)
    assert len(scheduler.layers) == 2
    train_steps(compiled, optimizer, scheduler, batches(6))
    assert stages(model) == [3, 3]
    model.eval()
    x = torch.randn(2, 1, 8, 8)
    with torch.no_grad():  # the compiled graph sees the new masks
        torch.testing.assert_close(compiled(x), model(x))
    with pytest.raises(TypeError, match=r"finalize\(model._orig_mod\)"):
        lgconv.finalize(compiled)
    assert_finalize_exact(model, x)


@pytest.mark.slow
def test_the_default_inductor_backend_sees_new_masks_without_recompiling():
    model = lgc_stack(2, width=8)[:1]
    compiled = torch.compile(model)
    x = torch.randn(2, 8, 4, 4)
    with torch.no_grad():
        before = compiled(x)
        CondensationScheduler(compiled, 2).step()
        after = compiled(x)
        torch.testing.assert_close(after, model(x))
    assert not torch.allclose(before, after)


def test_autocast_bfloat16_and_gradient_accumulation():
    model = make_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = CondensationScheduler(model, 6, lasso=1e-3)
    data = batches(12, batch=4)
    for step in range(6):
        for x, y in data[2 * step : 2 * step + 2]:  # two micro-batches per optimizer step
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = nn.functional.cross_entropy(model(x), y) + scheduler.lasso_loss()
            (loss / 2).backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        assert stages(model) == [min(step + 1, 3)] * 2  # one stage per optimizer step, not per micro-batch
    assert all(
        m.mask.dtype == torch.bool and m.weight.dtype == torch.float32 for _, m in learned_group_layers(model)
    )
    assert_finalize_exact(model, torch.randn(2, 1, 8, 8))


def test_copy_masks_into_a_deepcopy_ema():
    model = make_net()
    ema = copy.deepcopy(model)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = CondensationScheduler(model, 6)
    for x, y in batches(6):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        with torch.no_grad():
            for e, p in zip(ema.parameters(), model.parameters()):
                e.lerp_(p, 0.1)
        scheduler.copy_masks_to(ema)
    for (_, a), (_, b) in zip(learned_group_layers(model), learned_group_layers(ema)):
        assert torch.equal(a.mask, b.mask) and int(a.stage) == int(b.stage) == 3
        assert int(a.kept_inputs) == int(b.kept_inputs)
    copy_masks(torch.compile(model, backend="eager"), ema)  # wrappers are seen through
    assert_finalize_exact(ema, torch.randn(2, 1, 8, 8))


@pytest.mark.parametrize("exclude_buffers", [False, True])
def test_timm_model_ema_v3_keeps_masks_exact(exclude_buffers):
    model = make_net()
    ema = ModelEmaV3(model, decay=0.9, exclude_buffers=exclude_buffers)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = CondensationScheduler(model, 6)
    for x, y in batches(6):
        nn.functional.cross_entropy(model(x), y).backward()
        optimizer.step()
        optimizer.zero_grad()
        scheduler.step()
        ema.update(model)
        if exclude_buffers:  # timm leaves buffers alone then: copy the masks explicitly
            scheduler.copy_masks_to(ema.module)
    for (_, a), (_, b) in zip(learned_group_layers(model), learned_group_layers(ema.module)):
        assert b.mask.dtype == torch.bool and torch.equal(a.mask, b.mask)
        assert int(b.stage) == 3
    assert_finalize_exact(ema.module, torch.randn(2, 1, 8, 8))


def test_timm_model_ema_v2_averages_masks_so_they_must_be_copied_after_each_update():
    model = make_net()
    ema = ModelEmaV2(model, decay=0.9)
    scheduler = CondensationScheduler(model, 2)
    scheduler.step()
    ema.update(model)
    layer, ema_layer = scheduler.layers[0][1], learned_group_layers(ema.module)[0][1]
    assert not torch.equal(ema_layer.mask, layer.mask)  # 0.9 * True + 0.1 * False is still True
    scheduler.copy_masks_to(ema.module)
    assert torch.equal(ema_layer.mask, layer.mask) and int(ema_layer.stage) == 3
    assert_finalize_exact(ema.module, torch.randn(2, 1, 8, 8))


def test_copy_masks_refuses_a_different_model():
    with pytest.raises(ValueError, match="source has 2 learned group layers, target 1"):
        copy_masks(make_net(), lgc_stack(2))
    with pytest.raises(
        ValueError, match=r"layer '0' has mask \(24, 24, 1, 1\) in the source but \(12, 12, 1, 1\)"
    ):
        copy_masks(lgc_stack(2), lgc_stack(2, width=12))


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"total_steps": 0}, "total_steps must be a positive integer, got 0"),
        ({"total_steps": 10.0}, "total_steps must be a positive integer, got 10.0"),
        ({"total_steps": True}, "total_steps must be a positive integer"),
        ({"total_steps": 10, "condense_end": 0}, r"condense_end must be in \(0, 1\], got 0"),
        ({"total_steps": 10, "condense_end": 1.5}, r"condense_end must be in \(0, 1\]"),
        ({"total_steps": 10, "lasso": -1}, "lasso must be >= 0, got -1"),
    ],
)
def test_bad_arguments_have_clear_messages(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CondensationScheduler(lgc_stack(2), **kwargs)


def test_numpy_integer_step_counts_are_accepted():
    assert CondensationScheduler(lgc_stack(2), np.int64(10)).total_steps == 10


def test_a_model_without_learned_group_layers_and_a_bad_state_are_refused():
    with pytest.raises(ValueError, match=r"call lgconv.condensify\(model, ...\) before"):
        CondensationScheduler(TinyConvNet(), 10)
    scheduler = CondensationScheduler(lgc_stack(2), 10)
    with pytest.raises(KeyError, match=r"missing \['lasso', 'step_count'\]"):
        scheduler.load_state_dict({"total_steps": 10, "condense_end": 0.5})


def test_step_reports_exactly_the_steps_that_dropped_inputs():
    model = lgc_stack(4, 2)  # C = 4: drops at steps 2, 4, 6 of 12; C = 2: one drop at step 6
    scheduler = CondensationScheduler(model, total_steps=12)
    reported = [step for step in range(1, 13) if scheduler.step()]
    assert reported == [2, 4, 6]
    assert stages(model) == [3, 1]


def test_step_reports_a_jump_over_several_boundaries_once():
    model = lgc_stack(4)
    scheduler = CondensationScheduler(model, total_steps=12)
    scheduler.step_count = 5
    assert scheduler.step() is True and stages(model) == [3]
    assert scheduler.step() is False


# --- options beyond the paper: data-aware importance, gradual drops, a start --------------------
def test_activation_importance_drops_the_inputs_that_are_near_zero_despite_large_weights():
    """Inputs 0-3 carry the largest weights but tiny activations: weight importance keeps them,
    activation importance drops them first."""
    kept = {}
    for importance in ("weight", "activation"):
        layer = LearnedGroupConv(8, 4, learned_groups=1, condense_factor=2)
        with torch.no_grad():
            layer.weight.copy_(torch.tensor([4.0, 4, 4, 4, 1, 1, 1, 1]).view(1, 8, 1, 1).expand(4, 8, 1, 1))
        scheduler = CondensationScheduler(layer, 4, importance=importance)
        scale = torch.tensor([1e-3] * 4 + [1.0] * 4).view(1, 8, 1, 1)
        layer(torch.randn(16, 8, 3, 3, generator=torch.Generator().manual_seed(0)) * scale)
        layer.eval()
        layer(torch.randn(16, 8, 3, 3) * 1e3)  # eval batches are not recorded
        layer.train()
        scheduler.step()
        scheduler.step()
        kept[importance] = layer.group_mask()[0].nonzero().flatten().tolist()
    assert kept == {"weight": [0, 1, 2, 3], "activation": [4, 5, 6, 7]}


def test_input_statistics_are_a_running_mean_square_recorded_only_while_condensing():
    layer = LearnedGroupConv(4, 4, learned_groups=2, condense_factor=2)
    scheduler = CondensationScheduler(layer, 4, importance="activation")
    first, second = torch.randn(2, 4, 3, 3), torch.randn(2, 4, 3, 3)
    layer(first)
    torch.testing.assert_close(layer.input_power, first.pow(2).mean(dim=(0, 2, 3)))
    layer(second)  # batch 2 weighs 1/2, later ones STATISTICS_MOMENTUM
    torch.testing.assert_close(
        layer.input_power, (first.pow(2).mean(dim=(0, 2, 3)) + second.pow(2).mean(dim=(0, 2, 3))) / 2
    )
    scheduler.step()
    scheduler.step()  # the last drop: statistics are no longer kept
    assert not scheduler.condensing and int(layer.input_batches) == 2
    layer(torch.randn(2, 4, 3, 3))
    assert int(layer.input_batches) == 2 and not layer._forward_pre_hooks
    assert "input_power" not in layer.state_dict()  # non-persistent: model files are unchanged


def test_linear_layers_record_statistics_over_their_last_dimension():
    model = lgconv.condensify(nn.Sequential(nn.Linear(6, 8)), groups=2, condense_factor=2, linear=True)
    CondensationScheduler(model, 4, importance="activation")
    x = torch.randn(3, 5, 6)
    model(x)
    torch.testing.assert_close(model[0].input_power, x.pow(2).mean(dim=(0, 1)))


@given(
    total=st.integers(1, 80),
    factor=st.integers(2, 8),
    width=st.integers(1, 4),
    start_percent=st.integers(0, 40),
    end_percent=st.integers(41, 100),
)
def test_gradual_drops_follow_the_cubic_and_end_at_the_stepwise_structure(
    total, factor, width, start_percent, end_percent
):
    in_features = factor * width * 2
    gradual = nn.Sequential(LearnedGroupConv(in_features, 4, learned_groups=2, condense_factor=factor))
    stepwise = copy.deepcopy(gradual)
    start, end = Fraction(start_percent, 100), Fraction(end_percent, 100)
    options = {"condense_start": start_percent / 100, "condense_end": end_percent / 100}
    schedulers = [
        CondensationScheduler(gradual, total, schedule="gradual", **options),
        CondensationScheduler(stepwise, total, **options),
    ]
    removable = in_features - in_features // factor
    previous = 0
    for step in range(1, total + 2):
        for scheduler in schedulers:
            scheduler.step()
        through = min(max((Fraction(step, total) - start) / (end - start), Fraction(0)), Fraction(1))
        dropped = in_features - int(gradual[0].kept_inputs)
        assert dropped == math.floor(removable * (1 - (1 - through) ** 3)), step
        assert dropped >= previous and int(gradual[0].stage) == dropped // (in_features // factor)
        assert int(gradual[0].group_mask().sum(1).unique().numel()) == 1  # groups keep equal counts
        previous = dropped
    assert gradual[0].fully_condensed and stages(gradual) == stages(stepwise) == [factor - 1]
    assert int(gradual[0].kept_inputs) == int(stepwise[0].kept_inputs) == in_features // factor


def test_gradual_drops_in_many_small_steps_where_stepwise_cuts_three_times():
    reports = {}
    for schedule in ("stepwise", "gradual"):
        model = lgc_stack(4, width=48)
        scheduler = CondensationScheduler(model, 60, schedule=schedule)
        reports[schedule] = sum(scheduler.step() for _ in range(60))
    assert reports["stepwise"] == 3 and reports["gradual"] >= 15


def test_condense_start_delays_every_drop():
    model = lgc_stack(3)
    scheduler = CondensationScheduler(model, 100, condense_start=0.2, condense_end=0.6)
    history = [stages(model)[0] for _ in range(100) if scheduler.step() or True]
    assert history[38] == 0 and history[39] == 1  # halfway through [0.2, 0.6]
    assert history[58] == 1 and history[59] == 2


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"condense_start": 0.5}, r"condense_start must be in \[0, condense_end=0.5\), got 0.5"),
        ({"condense_start": -0.1}, r"condense_start must be in \[0"),
        ({"importance": "wanda"}, r"importance must be one of \('weight', 'activation'\), got 'wanda'"),
        ({"schedule": "cubic"}, r"schedule must be one of \('stepwise', 'gradual'\), got 'cubic'"),
    ],
)
def test_bad_new_options_have_clear_messages(kwargs, message):
    with pytest.raises(ValueError, match=message):
        CondensationScheduler(lgc_stack(2), 10, **kwargs)


@pytest.mark.parametrize("schedule", ["stepwise", "gradual"])
def test_resume_with_activation_importance_is_bit_identical_and_finalizes_exactly(tmp_path, schedule):
    total = 24
    data = batches(total)
    options = {"importance": "activation", "schedule": schedule}

    def fresh(seed: int, **kwargs):
        model = make_net(seed)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4)
        return model, optimizer, CondensationScheduler(model, total, **kwargs)

    model, optimizer, scheduler = fresh(0, **options)
    train_steps(model, optimizer, scheduler, data)
    reference = fresh(0, schedule=schedule)  # the paper's importance drops other inputs
    train_steps(*reference, data)
    assert any(
        not torch.equal(a.mask, b.mask)
        for (_, a), (_, b) in zip(learned_group_layers(model), learned_group_layers(reference[0]))
    )

    first = fresh(0, **options)
    train_steps(*first, data[:7])
    path = tmp_path / "checkpoint.pt"
    torch.save({name: part.state_dict() for name, part in zip(("model", "opt", "sched"), first)}, path)
    resumed = fresh(123)  # the paper's settings: the checkpoint's options and statistics override them
    state = torch.load(path, weights_only=True)
    resumed[0].load_state_dict(state["model"])
    resumed[1].load_state_dict(state["opt"])
    resumed[2].load_state_dict(state["sched"])
    assert (resumed[2].importance, resumed[2].schedule) == ("activation", schedule)
    train_steps(*resumed, data[7:])

    assert stages(model) == stages(resumed[0]) == [3, 3]
    for (name, value), other in zip(model.state_dict().items(), resumed[0].state_dict().values()):
        assert torch.equal(value, other), name
    assert_finalize_exact(resumed[0], torch.randn(2, 1, 8, 8))


def test_an_older_checkpoint_without_the_new_settings_still_loads():
    scheduler = CondensationScheduler(lgc_stack(4), 12, schedule="gradual")
    scheduler.load_state_dict({"step_count": 6, "total_steps": 12, "lasso": 0.0, "condense_end": 0.5})
    assert scheduler.schedule == "gradual" and scheduler.condense_start == 0.0
    assert int(scheduler.layers[0][1].stage) == 3
    with pytest.raises(ValueError, match="input statistics of 1 layers, the model has 2"):
        CondensationScheduler(make_net(), 12).load_state_dict(
            {**scheduler.state_dict(), "input_power": [torch.ones(24)], "input_batches": [1]}
        )


def test_an_ema_deepcopy_and_copy_masks_work_with_activation_statistics():
    model = make_net()
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = CondensationScheduler(model, 6, importance="activation", schedule="gradual")
    ema = copy.deepcopy(model).eval()  # carries the hooks; eval batches record nothing
    train_steps(model, optimizer, scheduler, batches(6))
    with torch.no_grad():
        ema(torch.randn(2, 1, 8, 8))
    assert all(int(m.input_batches) == 0 for _, m in learned_group_layers(ema))
    scheduler.copy_masks_to(ema)
    for (_, a), (_, b) in zip(learned_group_layers(model), learned_group_layers(ema)):
        assert torch.equal(a.mask, b.mask) and int(b.stage) == 3
    assert_finalize_exact(ema, torch.randn(2, 1, 8, 8))


def test_activation_statistics_are_recorded_through_a_torch_compile_wrapper():
    """The hooks must exist when dynamo first traces the module: torch does not guard on module
    hooks, so code compiled earlier for the same module class (another test here) would skip them."""
    torch._dynamo.reset()
    model = make_net()
    compiled = torch.compile(model, backend="eager")
    optimizer = torch.optim.SGD(model.parameters(), lr=0.05)
    scheduler = CondensationScheduler(compiled, 6, importance="activation")
    train_steps(compiled, optimizer, scheduler, batches(6))
    assert stages(model) == [3, 3]
    assert all(int(m.input_batches) == 3 and bool((m.input_power > 0).any()) for _, m in scheduler.layers)
    assert_finalize_exact(model, torch.randn(2, 1, 8, 8))
