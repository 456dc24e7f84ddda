"""ONE lot-step/tick floor (issue 10): `cryptobot.risk.floor_units` is the largest multiple of the step not above the
decimal a float prints as. The numba-compiled copy in the backtest kernel, the RiskEngine's sizing floor,
`exchange.floor_step` and the emulator's `_floor_step` must all agree with a Decimal reference, at the boundaries
where the old four implementations disagreed (x = n*step, one ulp either side, runs of 9s, cash/(price*(1+fee)))."""
import math
from decimal import ROUND_CEILING, ROUND_FLOOR, Decimal, localcontext
from fractions import Fraction
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest
from hypothesis import assume, example, given, settings, strategies as st

from cryptobot.backtest import _ceil, _floor, simulate_signals
from cryptobot.emulator import _Book
from cryptobot.exchange import floor_step
from cryptobot.risk import Market, Plan, RiskEngine, _ceil_exact, _floor_exact, ceil_units, floor_units, step_units

STEPS = ["0.00000001", "0.00000025", "0.000001", "0.00001", "0.0001", "0.001", "0.01", "0.1", "0.5", "0.25", "1", "25",
         "0.05", "0.002"]


def ref(x: float, step: str, rounding=ROUND_FLOOR) -> float:
    "The reference: the decimal x prints as, floored (or ceiled) to a multiple of the decimal step, rounded once."
    with localcontext() as ctx:
        ctx.prec = 60
        s = Decimal(step)
        return float((Decimal(repr(x)) / s).to_integral_value(rounding) * s)


def all_floors(x: float, step: str) -> dict:
    "The one floor, as each of its four users runs it."
    m, k = step_units(step)
    got = {"floor_units": floor_units(x, m, k),
           "backtest (numba)": _floor(x, m, k),
           "RiskEngine sizing": float(_floor_exact(Fraction(repr(x)), m, k))}
    if x > 0:
        got["exchange.floor_step"] = floor_step(x, float(step))
        if Decimal(step) >= Decimal("1e-8"):
            f = {"step_size": Decimal(step)}
            book = SimpleNamespace(filters=f, _filters=lambda sym=None: f)     # the book's per-symbol filters
            got["emulator _floor_step"] = float(_Book._floor_step(book, Decimal(repr(x))))
    return got


def assert_all_floor(x: float, step: str):
    want = ref(x, step)
    got = all_floors(x, step)
    assert all(v == want for v in got.values()), (x, step, want, got)


def test_the_issue_example_and_its_neighbours():
    # the old backtest kernel: floor(x * 1e5 + 1e-9) / 1e5 == 0.1 here, buying a lot step more than the cash allows
    for x in (0.09999999999999, 0.099999999999999, 0.0999999999999999, math.nextafter(0.1, 0)):
        assert_all_floor(x, "0.00001")
        assert all(v == 0.09999 for v in all_floors(x, "0.00001").values()), x
    assert all(v == 0.1 for v in all_floors(0.1, "0.00001").values())
    assert all(v == 7.0 for v in all_floors(7.0, "1").values()) and _floor(0.7 / 0.1, 1, 0) == 6.0   # 6.999999999999999


def test_the_old_backtest_spent_more_than_its_cash():
    # all-cash sizing at 100 with 9.999999999999 cash: 0.09999 BTC fits, 0.1 does not (the old kernel bought 0.1)
    cd = pd.DataFrame({"open": [100.0] * 3, "high": [100.0] * 3, "low": [100.0] * 3, "close": [100.0] * 3},
                      index=pd.date_range("2024-01-01", periods=3, freq="1h", tz="UTC", name="timestamp"))
    m = Market(min_notional=1.0)
    tr = simulate_signals(cd, [True, False, False], [False] * 3, RiskEngine(), m, fee=0.0, slippage=0.0,
                          initial_cash=9.999999999999, sizing="full")
    assert list(tr.amount) == [0.09999] and tr.amount[0] * 100.0 <= 9.999999999999


@st.composite
def boundary_cases(draw):
    "(x, step): a grid point, one ulp either side, a run of 9s under a grid point, or a cash/(price*(1+fee)) quotient."
    step = draw(st.sampled_from(STEPS))
    s = Decimal(step)
    n = draw(st.integers(0, 10 ** 9))
    on = float(n * s)
    kind = draw(st.sampled_from(["on", "below", "above", "nines", "quotient", "product"]))
    if kind == "on":
        x = on
    elif kind == "below":
        x = math.nextafter(on, -math.inf)
    elif kind == "above":
        x = math.nextafter(on, math.inf)
    elif kind == "nines":                      # n*step - 10^-j: ...99999 after the grid digits
        x = float(n * s - Decimal(10) ** -draw(st.integers(-s.adjusted() + 1, 17)))
    elif kind == "quotient":                   # the cash cap: cash / (price * (1 + fee))
        price = float(Decimal(draw(st.integers(1, 10 ** 8))) / 100)
        fee = draw(st.sampled_from([0.0, 0.001, 0.00075, 0.0005]))
        cash = float(Decimal(repr(on)) * Decimal(repr(price)) * (1 + Decimal(repr(fee))))
        x = cash / (price * (1.0 + fee))
    else:                                       # the stop: entry * (1 - stop_frac)
        x = on * (1.0 - draw(st.sampled_from([0.015, 0.02, 0.005, 0.1, 0.0125])))
    sign = draw(st.sampled_from([1.0, 1.0, 1.0, -1.0]))
    return sign * x, step


@settings(max_examples=3000, deadline=None)
@given(case=boundary_cases())
@example(case=(0.09999999999999, "0.00001"))
@example(case=(0.3, "0.1"))
@example(case=(1.005, "0.01"))
def test_every_user_floors_like_the_decimal_reference(case):
    x, step = case
    assert_all_floor(x, step)
    m, k = step_units(step)                     # and the ceiling, the same way round
    want = ref(x, step, ROUND_CEILING)
    assert ceil_units(x, m, k) == _ceil(x, m, k) == float(_ceil_exact(Fraction(repr(x)), m, k)) == want, (x, step)


@settings(max_examples=500, deadline=None)
@given(num=st.integers(1, 10 ** 6), den_exp=st.integers(0, 30), step=st.sampled_from(STEPS))
def test_the_exact_rational_floor_never_rounds_up(num, den_exp, step):
    # the RiskEngine floors exact rationals: the float nearest q may sit above a grid point q is below
    q = Fraction(num, 10 ** den_exp) - Fraction(1, 10 ** (den_exp + 20))
    m, k = step_units(step)
    s = Fraction(Decimal(step))
    assert _floor_exact(q, m, k) == (q // s) * s


def _bars(price: float) -> pd.DataFrame:
    return pd.DataFrame({"open": [price] * 3, "high": [price] * 3, "low": [price] * 3, "close": [price] * 3},
                        index=pd.date_range("2024-01-01", periods=3, freq="1h", tz="UTC", name="timestamp"))


def _backtest_amount(eng: RiskEngine, m: Market, price: float, cash: float) -> float:
    tr = simulate_signals(_bars(price), [True, False, False], [False] * 3, eng, m, fee=eng.fee_pct / 100,
                          slippage=0.0, initial_cash=cash)
    return float(tr.amount[0]) if len(tr) else 0.0


@settings(max_examples=300, deadline=None)
@given(n=st.integers(20, 10 ** 6), cents=st.integers(10_000, 10 ** 7), limit=st.sampled_from(["cash", "risk"]),
       ulps=st.integers(-1, 1))
@example(n=20_000, cents=5_000_000, limit="cash", ulps=0)     # RiskEngine(0.2 %, 2 %) at 50 000, cash 10 010: 0.2 BTC
@example(n=999_999, cents=999_995, limit="cash", ulps=0)      # a 16-digit tie: cash 100099.3994005005
def test_backtest_and_risk_engine_size_alike_at_a_step_boundary(n, cents, limit, ulps):
    """Cash chosen so the cap is exactly n lot steps (or one ulp off): the backtest's kernel buys what the plan says.
    The kernel is exact where the products have at most 15 digits (and at ties up to 16), as its prose says."""
    assume(n * cents * 1001 < 10 ** 15 or ulps == 0 and n * cents * 1001 < 9 * 10 ** 15)
    eng = RiskEngine(stop_loss_pct=0.2, risk_pct=2) if limit == "cash" else RiskEngine(stop_loss_pct=5, risk_pct=1)
    m = Market(min_notional=0.0)
    price = cents / 100
    entry, amount = Fraction(cents, 100), Fraction(n, 10 ** 5)
    if limit == "cash":                          # cash = n steps * entry * (1 + fee): the cash cap is exactly n steps
        cash = amount * entry * (1 + Fraction(1, 1000))
    else:                                        # risk_pct of equity = n steps * (entry - stop)
        p = eng.plan(price, 1e12, 1e12, m)
        cash = amount * (entry - Fraction(repr(p.stop_price))) / Fraction(2, 100)
    cash = float(cash)
    for _ in range(abs(ulps)):
        cash = math.nextafter(cash, ulps * math.inf)
    plan = eng.plan(price, cash, cash, m)
    assert isinstance(plan, Plan) and (plan.limited_by == limit or ulps), plan
    assert _backtest_amount(eng, m, price, cash) == plan.amount, (price, cash, plan)
