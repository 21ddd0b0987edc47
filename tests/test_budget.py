"""NFE-first planning: DPM-Solver-fast order allocation, step counts, CFG accounting."""

from __future__ import annotations

import dataclasses

import pytest

from comfyui_fewstep.samplers.budget import StepPlan, effective_nfe, singlestep_orders, steps_for_nfe


def paper_orders(nfe: int, order: int) -> list[int]:
    """Lu et al. 2022 (arXiv 2206.00927) Sec. 3.4, written out case by case."""
    if order == 3:
        k = nfe // 3 + 1
        rest = {0: [2, 1], 1: [1], 2: [2]}[nfe % 3]
        return [3] * (k - len(rest)) + rest
    if order == 2:
        return [2] * (nfe // 2) + [1] * (nfe % 2)
    return [1] * nfe


@pytest.mark.parametrize("order", [1, 2, 3])
def test_singlestep_orders_follow_the_paper_and_sum_to_nfe(order):
    for nfe in range(1, 61):
        orders = singlestep_orders(nfe, order)
        assert sum(orders) == nfe
        assert orders == paper_orders(nfe, order)
        assert max(orders) <= order


def test_singlestep_orders_examples():
    assert singlestep_orders(6, 3) == [3, 2, 1]
    assert singlestep_orders(10, 3) == [3, 3, 3, 1]
    assert singlestep_orders(20, 3) == [3] * 6 + [2]
    assert singlestep_orders(3, 3) == [2, 1]  # too few calls for a third-order step
    assert singlestep_orders(7, 2) == [2, 2, 2, 1]
    assert singlestep_orders(1, 3) == [1]


def test_multistep_plan():
    plan = steps_for_nfe("multistep", 8, 3)
    assert (plan.steps, plan.nfe) == (8, 8)
    assert plan.orders == (1, 2, 3, 3, 3, 3, 3, 3)
    assert plan.notes == ""
    low = steps_for_nfe("multistep", 2, 3)
    assert low.orders == (1, 2) and "order 2" in low.notes
    stop = steps_for_nfe("multistep", 8, 2, final_step="sigma_min")
    assert (stop.steps, stop.nfe, len(stop.orders)) == (9, 8, 8) and "sigma_min" in stop.notes


@pytest.mark.parametrize("nfe", [1, 3, 5, 6, 9, 10, 17])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_singlestep_plan(nfe, order):
    plan = steps_for_nfe("singlestep", nfe, order, final_step="sigma_min")
    assert list(plan.orders) == paper_orders(nfe, order)
    assert plan.steps == len(plan.orders) + 1 and plan.nfe == sum(plan.orders) == nfe
    assert ("reach only order" in plan.notes) == (max(plan.orders) < order)


@pytest.mark.parametrize("nfe", [1, 2, 3, 5, 6, 9, 10, 17])
@pytest.mark.parametrize("order", [1, 2, 3])
def test_singlestep_plan_ending_at_zero_spends_one_call_on_the_denoise_step(nfe, order):
    plan = steps_for_nfe("singlestep", nfe, order)
    paper = paper_orders(nfe, order)
    expected = paper if paper[-1] == 1 else paper_orders(nfe - 1, order) + [1]
    if 1 in expected[1:-1]:  # a first-order step before the denoise step goes first
        expected = [1] + expected[:-2] + [1]
    assert list(plan.orders) == expected and plan.orders[-1] == 1
    assert order == 1 or 1 not in plan.orders[1:-1]
    assert plan.steps == len(plan.orders) and plan.nfe == sum(plan.orders) == nfe


@pytest.mark.parametrize(("nfe", "order", "orders"), [
    (4, 2, (1, 2, 1)), (5, 3, (1, 3, 1)), (8, 3, (1, 3, 3, 1)), (6, 3, (3, 2, 1)),
    (10, 2, (1, 2, 2, 2, 2, 1)),
])
def test_singlestep_plan_ending_at_zero_examples(nfe, order, orders):
    assert steps_for_nfe("singlestep", nfe, order).orders == orders


def test_adaptive_plan():
    plan = steps_for_nfe("adaptive", 20, 3)
    assert plan.steps == 1 and plan.orders == () and plan.nfe == 20
    with pytest.raises(ValueError, match="adaptive order"):
        steps_for_nfe("adaptive", 20, 1)


def test_plan_is_frozen_and_summarised():
    plan = steps_for_nfe("multistep", 8, 3)
    assert isinstance(plan, StepPlan)
    with pytest.raises(dataclasses.FrozenInstanceError):
        plan.steps = 3  # type: ignore[misc]
    assert plan.summary(7.0) == "8 model calls = 16 network evaluations (cfg 7.0): 8 steps of DPM-Solver++(3M)"
    assert plan.summary(1.0) == "8 model calls: 8 steps of DPM-Solver++(3M)"
    single = steps_for_nfe("singlestep", 9, 3).summary(2.5)
    assert single.startswith("9 model calls = 18 network evaluations (cfg 2.5): 4 steps of DPM-Solver++(3S)")
    assert "orders 3-3-2-1" in single


def test_effective_nfe():
    assert effective_nfe(10, 1.0) == 10
    assert effective_nfe(10, 7.5) == 20
    assert effective_nfe(10, 0.0) == 20  # cfg 0 still runs both passes
    assert effective_nfe(0, 3.0) == 0
    with pytest.raises(ValueError, match="cfg"):
        effective_nfe(4, float("inf"))


@pytest.mark.parametrize(
    "args,exc,match",
    [
        (("multistep", 0, 2), ValueError, "nfe must be >= 1"),
        (("singlestep", 4, 4), ValueError, "order must be 1, 2 or 3"),
        (("multistep", 6, 5), ValueError, "order must be 1, 2, 3 or 4"),
        (("multistep", 4, 0), ValueError, "order must be >= 1"),
        (("rk4", 4, 2), ValueError, "solver must be one of"),
        (("multistep", 4.0, 2), TypeError, "nfe must be an int"),
        (("multistep", True, 2), TypeError, "nfe must be an int"),
    ],
)
def test_plan_errors(args, exc, match):
    with pytest.raises(exc, match=match):
        steps_for_nfe(*args)
    with pytest.raises(ValueError, match="final_step"):
        steps_for_nfe("multistep", 4, 2, final_step="none")  # type: ignore[arg-type]


def test_skip_start_plans_one_step_more_than_calls():
    plan = steps_for_nfe("multistep", 5, 2, skip_start=True)
    assert (plan.steps, plan.nfe, plan.orders) == (6, 5, (1, 1, 2, 2, 2, 2))
    assert "no model call at sigma_max" in plan.notes
    assert plan.summary().startswith("5 model calls: 6 steps")
    stop = steps_for_nfe("multistep", 5, 2, final_step="sigma_min", skip_start=True)
    assert (stop.steps, stop.nfe) == (7, 5)
    for args in (("singlestep", 6, 2), ("multistep", 1, 2)):
        with pytest.raises(ValueError, match="skip_start .*multistep solver.*at least 2 model calls"):
            steps_for_nfe(*args, skip_start=True)


def test_multistep_order_four_warms_up_one_order_per_step():
    plan = steps_for_nfe("multistep", 6, 4)
    assert plan.orders == (1, 2, 3, 4, 4, 4) and plan.steps == 6 and plan.nfe == 6
    assert "order 4" in steps_for_nfe("multistep", 3, 4).notes
