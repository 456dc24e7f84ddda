"""Property and example tests for cryptobot.risk (RiskEngine.plan / check, Market.from_ccxt)."""
import dataclasses
import math
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, assume, example, given, settings, strategies as st

from cryptobot.config import ConfigError, Settings
from cryptobot.risk import REJECTION_REASONS, Market, MarketError, Plan, Rejection, RiskEngine


def F(x) -> Fraction:
    return Fraction(repr(float(x)))


def steps(lo_exp, hi_exp):
    "Exchange-like steps: {1, 2, 5, 25} x 10^k, within [10^lo_exp, 10^hi_exp]."
    return st.builds(lambda m, e: float(F(m) * Fraction(10) ** e), st.sampled_from([1, 2, 5, 25]),
                     st.integers(lo_exp, hi_exp)).filter(lambda v: 10.0 ** lo_exp <= v <= 10.0 ** hi_exp * 1.0000001)


@st.composite
def markets(draw):
    step = draw(steps(-8, 0))
    tick = draw(steps(-8, 1))
    min_amount = float(F(step) * draw(st.integers(1, 100)))
    max_amount = draw(st.one_of(st.just(math.inf), st.floats(min_amount, 1e12)))
    return Market(symbol="X/USDT", amount_step=step, price_tick=tick, min_amount=min_amount,
                  min_notional=draw(st.floats(0, 100)), max_amount=max_amount,
                  max_notional=draw(st.one_of(st.just(math.inf), st.floats(10, 1e10))))


engines = st.builds(RiskEngine, stop_loss_pct=st.floats(0.2, 10), risk_pct=st.floats(0.01, 2),
                    leverage=st.floats(0.1, 1.0), stop_limit_buffer_pct=st.floats(0.05, 5), fee_pct=st.floats(0, 1))


def caps_exact(eng, plan_amount, entry, stop, E, Q, m):
    "Which exact caps a given amount violates."
    a = F(plan_amount) if not isinstance(plan_amount, Fraction) else plan_amount
    out = []
    if a * (entry - stop) > F(E) * F(eng.risk_pct) / 100: out.append("risk")
    if a * entry > F(E) * F(eng.leverage): out.append("leverage")
    if a * entry * (1 + F(eng.fee_pct) / 100) > F(Q): out.append("cash")
    if math.isfinite(m.max_amount) and a > F(m.max_amount): out.append("max_amount")
    if math.isfinite(m.max_notional) and a * entry > F(m.max_notional): out.append("max_notional")
    return out


@settings(max_examples=1500, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(eng=engines, m=markets(), price=st.floats(1e-4, 1e6), equity=st.floats(0, 1e9),
       quote_ratio=st.one_of(st.just(1.0), st.floats(0, 2)))
@example(eng=RiskEngine(), m=Market(symbol="X/USDT"), price=50_000.0, equity=10_000.0, quote_ratio=1.0)
def test_plan_properties(eng, m, price, equity, quote_ratio):
    free_quote = equity * quote_ratio
    p = eng.plan(price, equity, free_quote, m)
    if isinstance(p, Rejection):
        assert not p and p.reason in REJECTION_REASONS and p.reason != "plan_invalid"
        if equity > 0 and free_quote > 0:
            assert p.reason != "invalid_input", p
        return
    tick, step = F(m.price_tick), F(m.amount_step)
    E, lev, r, fee = equity, eng.leverage, eng.risk_pct / 100, eng.fee_pct / 100
    a, entry, stop = F(p.amount), F(p.entry_price), F(p.stop_price)
    # the bounds, exactly (the decimal values the exchange sees) ...
    assert not caps_exact(eng, a, entry, stop, E, free_quote, m), p
    assert a >= F(m.min_amount) and a * entry >= F(m.min_notional)
    # ... and in float arithmetic as a caller computes them (a relative epsilon for the order of float operations)
    eps = 1 + 1e-12
    assert p.risk_amount <= E * r * eps and p.amount * (p.entry_price - p.stop_price) <= E * r * eps
    assert p.notional <= E * lev and p.amount * p.entry_price <= E * lev * eps   # fields: strict (guarded)
    assert p.risk_amount <= E * eng.risk_pct / 100 and p.notional * (1 + eng.fee_pct / 100) <= free_quote
    assert p.notional * (1 + fee) <= free_quote * eps and p.amount * p.entry_price * (1 + fee) <= free_quote * eps
    assert m.min_amount <= p.amount <= m.max_amount and m.min_notional <= p.notional <= m.max_notional
    # exact grid membership
    assert a % step == 0, p
    for v in (p.entry_price, p.stop_price, p.stop_limit_price):
        assert F(v) % tick == 0, v
    # ordering and distances
    assert 0 < p.stop_limit_price < p.stop_price < p.entry_price
    assert entry >= F(price) and entry - F(price) < tick
    assert stop <= entry * (1 - F(eng.stop_loss_pct) / 100)                # never closer than configured
    assert (entry - stop) / entry <= Fraction(10, 100)                      # hard stop ceiling
    assert stop - F(p.stop_limit_price) >= tick
    # consistency of the derived fields
    assert math.isclose(p.notional, p.amount * p.entry_price, rel_tol=1e-12)
    assert math.isclose(p.risk_amount, p.amount * (p.entry_price - p.stop_price), rel_tol=1e-9)
    assert p.side == "buy" and p.symbol == m.symbol and p.equity == equity and p.limited_by in (
        "risk", "leverage", "cash", "max_amount", "max_notional")
    # the plan re-validates
    assert eng.check(p, m, free_quote=free_quote) is None
    # and the floor is not needlessly conservative: two more steps always break a cap (one step may not, where the
    # float guard stepped down off an exact tie), unless the amount was coarsened to stay float-exact (> 15 digits)
    if a / step < 10 ** 13:
        assert caps_exact(eng, a + 2 * step, entry, stop, E, free_quote, m), p


def test_worked_example():
    p = RiskEngine().plan(50_000, 10_000, 10_000, Market())
    assert isinstance(p, Plan)
    assert p.entry_price == 50_000 and p.stop_price == 49_250 and p.stop_limit_price == 49_003.75
    assert p.amount == 0.13333                       # 100 / 750 = 0.13333... floored to 1e-5
    assert p.notional == pytest.approx(6_666.5) and p.risk_amount == pytest.approx(99.9975)
    assert p.limited_by == "risk" and p.equity == 10_000


@pytest.mark.parametrize("equity,expected", [(45, 0.3), (105, 0.7), (75, 0.5), (195, 1.3), (15, 0.1)])
def test_floor_is_exact_where_float_division_is_not(equity, expected):
    # E*1%/(100-98.5) is exactly expected; naive float flooring gives one step less (0.7/0.1 = 6.999...)
    m = Market(symbol="X/USDT", amount_step=0.1, price_tick=0.1, min_amount=0.1, min_notional=0, max_amount=1e6)
    p = RiskEngine().plan(100.0, equity, 1e6, m)
    assert isinstance(p, Plan) and p.amount == expected and p.stop_price == 98.5 and p.limited_by == "risk", p


def test_exact_tie_is_kept_and_the_plan_fields_hold_strictly():
    # E=15: exactly 0.1 units risk exactly 0.15 = 1 % of 15. The Plan's fields are exact decimals rounded once, so
    # they compare strictly; a different float expression (0.1 * 1.5) lands one ulp over: use a tolerance there.
    m = Market(symbol="X/USDT", amount_step=0.1, price_tick=0.1, min_amount=0.1, min_notional=0, max_amount=1e6)
    p = RiskEngine().plan(100.0, 15, 1e6, m)
    assert p.amount == 0.1 and p.risk_amount == 0.15 and p.risk_amount <= 15 * 1.0 / 100
    assert p.amount * (p.entry_price - p.stop_price) > 15 * 1.0 / 100          # the float artefact
    assert p.amount * (p.entry_price - p.stop_price) <= 15 * 1.0 / 100 * (1 + 1e-12)


def test_cash_tie_never_exceeds_free_quote():
    # free quote exactly the notional plus fee of 0.2 BTC at 50,000: the amount fits, and not a step more
    p = RiskEngine(stop_loss_pct=0.2, risk_pct=2).plan(50_000, 1e6, 10_010, Market())
    assert p.limited_by == "cash" and p.amount == 0.2 and p.notional * 1.001 <= 10_010


def test_tick_rounding_directions():
    m = Market(symbol="X/USDT", amount_step=0.001, price_tick=0.1, min_amount=0.001, min_notional=1)
    p = RiskEngine().plan(100.26, 10_000, 10_000, m)
    assert p.entry_price == 100.3                     # up
    assert p.stop_price == 98.7                       # 100.3 * 0.985 = 98.7955 -> down
    assert p.stop_limit_price == 98.2                 # 98.7 * 0.995 = 98.2065 -> down


def test_caps_leverage_cash_max_amount():
    eng = RiskEngine(stop_loss_pct=0.2, risk_pct=2.0)
    p = eng.plan(50_000, 10_000, 1e9, Market())
    assert p.limited_by == "leverage" and p.notional <= 10_000 and p.amount == 0.2
    p = RiskEngine().plan(50_000, 10_000, 1_000, Market())
    assert p.limited_by == "cash" and p.notional * 1.001 <= 1_000 and p.amount == 0.01998
    p = RiskEngine().plan(50_000, 1e9, 1e9, Market(max_amount=83.5))
    assert p.limited_by == "max_amount" and p.amount == 83.5
    p = RiskEngine().plan(50_000, 1e9, 1e9, Market(max_notional=100_000))
    assert p.limited_by == "max_notional" and p.notional <= 100_000 and p.amount == 2.0


@pytest.mark.parametrize("args,reason", [
    ((float("nan"), 1e4, 1e4), "invalid_input"), ((float("inf"), 1e4, 1e4), "invalid_input"),
    ((-1.0, 1e4, 1e4), "invalid_input"), ((0, 1e4, 1e4), "invalid_input"),
    ((5e4, 0, 1e4), "invalid_input"), ((5e4, -1, 1e4), "invalid_input"), ((5e4, float("nan"), 1e4), "invalid_input"),
    ((5e4, 1e4, 0), "invalid_input"), ((5e4, 1e4, float("-inf")), "invalid_input"),
    ((True, 1e4, 1e4), "invalid_input"), (("50000", 1e4, 1e4), "invalid_input"), ((None, 1e4, 1e4), "invalid_input"),
    ((5e4, 5, 5), "below_min_notional"), ((5e4, 1e4, 0.3), "below_min_amount"), ((5e4, 0.01, 0.01), "below_min_amount"),
    ((0.001, 1e4, 1e4), "stop_rounds_to_zero"),
])
def test_rejections_are_named(args, reason):
    r = RiskEngine().plan(*args)
    assert isinstance(r, Rejection) and not r and r.reason == reason, r
    assert r.detail and "\n" not in str(r)


def test_rejections_for_coarse_ticks_and_symbol():
    coarse = Market(symbol="X/USDT", price_tick=10, amount_step=1, min_amount=1, min_notional=0)
    assert RiskEngine().plan(15.0, 1e4, 1e4, coarse).reason == "tick_too_coarse"       # stop 10 = 50% below 20
    assert RiskEngine().plan(5e4, 1e4, 1e4, symbol="ETH/USDT").reason == "invalid_input"
    assert RiskEngine().plan(5e4, 1e4, 1e4, market={"symbol": "BTC/USDT"}).reason == "invalid_input"


@pytest.mark.parametrize("kw", [dict(risk_pct=2.01), dict(risk_pct=0), dict(leverage=1.01), dict(leverage=3),
                                dict(stop_loss_pct=0.1), dict(stop_loss_pct=10.5), dict(fee_pct=-0.1), dict(fee_pct=2),
                                dict(stop_limit_buffer_pct=0), dict(stop_limit_buffer_pct=6), dict(risk_pct=float("nan")),
                                dict(leverage=float("inf")), dict(risk_pct=True), dict(risk_pct="1")])
def test_engine_refuses_parameters_beyond_ceilings(kw):
    (name, value), = kw.items()
    with pytest.raises(ConfigError) as ei:
        RiskEngine(**kw)
    msg = str(ei.value)
    assert msg.startswith(f"RiskEngine {name}=") and "allowed range" in msg and "\n" not in msg


def test_engine_accepts_the_ceilings_themselves():
    e = RiskEngine(stop_loss_pct=10, risk_pct=2, leverage=1.0, stop_limit_buffer_pct=5, fee_pct=1)
    assert isinstance(e.plan(50_000, 10_000, 10_000), Plan)
    RiskEngine(stop_loss_pct=0.2, risk_pct=0.01, leverage=0.1, stop_limit_buffer_pct=0.05, fee_pct=0)


def test_from_settings():
    e = RiskEngine.from_settings(Settings(stop_loss_pct=2.0, risk_pct=0.5, leverage=0.5, fee_pct=0.2,
                                          stop_limit_buffer_pct=1.0))
    assert (e.stop_loss_pct, e.risk_pct, e.leverage, e.fee_pct, e.stop_limit_buffer_pct) == (2.0, 0.5, 0.5, 0.2, 1.0)
    assert RiskEngine.from_settings(Settings()).plan(50_000, 10_000, 10_000) == RiskEngine().plan(50_000, 10_000, 10_000)


@pytest.mark.parametrize("mutate,fragment", [
    (lambda p: dict(amount=p.amount + 0.000005), "multiple of the step"),
    (lambda p: dict(stop_price=p.stop_price + 0.005), "multiple of the tick"),
    (lambda p: dict(stop_price=p.entry_price), "ordered"),
    (lambda p: dict(stop_limit_price=p.stop_price), "ordered"),
    (lambda p: dict(side="sell"), "side"),
    (lambda p: dict(symbol="ETH/USDT"), "does not match"),
    (lambda p: dict(amount=1.0, notional=50_000.0, risk_amount=750.0), "exceeds"),
    (lambda p: dict(risk_amount=p.risk_amount * 2), "risk_amount is not"),
    (lambda p: dict(notional=float("nan")), "positive finite"),
    (lambda p: dict(stop_price=49_500.0, risk_amount=p.amount * 500), "stop distance"),
    (lambda p: dict(amount=0.00009, notional=4.5, risk_amount=0.00009 * 750), "outside"),
])
def test_check_catches_tampered_plans(mutate, fragment):
    eng, m = RiskEngine(), Market()
    p = eng.plan(50_000, 10_000, 10_000, m)
    assert eng.check(p, m, free_quote=10_000) is None
    bad = dataclasses.replace(p, **mutate(p))
    r = eng.check(bad, m, free_quote=10_000)
    assert isinstance(r, Rejection) and r.reason == "plan_invalid" and fragment in r.detail, (bad, r)


def test_check_free_quote_and_type():
    eng, m = RiskEngine(), Market()
    p = eng.plan(50_000, 10_000, 10_000, m)
    assert eng.check(p, m, free_quote=p.notional).reason == "plan_invalid"        # the fee no longer fits
    assert eng.check(p, m, free_quote=float("nan")).reason == "plan_invalid"
    assert eng.check("plan", m).reason == "plan_invalid"
    # a stricter engine rejects a plan made by a looser one
    assert RiskEngine(risk_pct=0.5).check(p, m).reason == "plan_invalid"


def _ccxt_market(step="0.00001000", tick="0.01000000", min_qty="0.00001000", max_qty="9000.00000000",
                 market_max="83.50000000", min_notional="5.00000000", status="TRADING"):
    ccxt = pytest.importorskip("ccxt")
    ex = ccxt.binance()
    ex.options["crossMarginPairsData"] = []
    ex.options["isolatedMarginPairsData"] = []
    raw = {"symbol": "BTCUSDT", "status": status, "baseAsset": "BTC", "baseAssetPrecision": 8, "quoteAsset": "USDT",
           "quotePrecision": 8, "quoteAssetPrecision": 8, "orderTypes": ["LIMIT", "MARKET", "STOP_LOSS_LIMIT"],
           "isSpotTradingAllowed": True, "isMarginTradingAllowed": False, "permissions": ["SPOT"],
           "filters": [{"filterType": "PRICE_FILTER", "minPrice": tick, "maxPrice": "1000000.00000000", "tickSize": tick},
                       {"filterType": "LOT_SIZE", "minQty": min_qty, "maxQty": max_qty, "stepSize": step},
                       {"filterType": "MARKET_LOT_SIZE", "minQty": "0.00000000", "maxQty": market_max, "stepSize": "0.00000000"},
                       {"filterType": "NOTIONAL", "minNotional": min_notional, "applyMinToMarket": True,
                        "maxNotional": "9000000.00000000", "applyMaxToMarket": False, "avgPriceMins": 5}]}
    m = ex.parse_market(raw)
    ex.set_markets([m])
    return ex, ex.market("BTC/USDT")


def test_from_ccxt_reads_tick_size_precision_of_installed_ccxt():
    import ccxt
    ex, m = _ccxt_market()
    assert ex.precisionMode == ccxt.TICK_SIZE and m["precision"]["amount"] == 1e-05 and m["precision"]["price"] == 0.01
    mk = Market.from_ccxt(m)
    assert mk == Market(symbol="BTC/USDT", amount_step=1e-5, price_tick=0.01, min_amount=1e-5, min_notional=5.0,
                        max_amount=83.5, max_notional=9e6)


@pytest.mark.parametrize("price,equity", [(50_000, 10_000), (43_210.987, 1_234.5), (99_999.99, 1e6), (20_000.01, 250)])
def test_plans_survive_ccxt_precision_unchanged(price, equity):
    ex, m = _ccxt_market()
    p = RiskEngine().plan(price, equity, equity, Market.from_ccxt(m))
    assert isinstance(p, Plan)
    assert float(ex.amount_to_precision("BTC/USDT", p.amount)) == p.amount
    for v in (p.entry_price, p.stop_price, p.stop_limit_price):
        assert float(ex.price_to_precision("BTC/USDT", v)) == v


def test_from_ccxt_refuses_inactive_or_incomplete_markets():
    _, m = _ccxt_market(status="BREAK")
    with pytest.raises(MarketError, match="not active"):
        Market.from_ccxt(m)
    with pytest.raises(MarketError, match="no amount precision"):
        Market.from_ccxt({"symbol": "X/USDT", "precision": {"price": 0.01}, "limits": {}})
    with pytest.raises(MarketError, match="not a spot market"):
        Market.from_ccxt({"symbol": "X/USDT", "spot": False, "precision": {"amount": 1, "price": 1}})


@pytest.mark.parametrize("kw", [dict(amount_step=0), dict(price_tick=-1), dict(price_tick=float("nan")),
                                dict(min_amount=0.000015), dict(max_amount=0), dict(min_notional=float("inf")),
                                dict(amount_step=True)])
def test_market_validates_itself(kw):
    with pytest.raises(MarketError):
        Market(**kw)


def test_numpy_and_int_inputs_plan_like_floats():
    np = pytest.importorskip("numpy")
    eng = RiskEngine()
    ref = eng.plan(50_000.0, 10_000.0, 10_000.0)
    assert eng.plan(np.float64(50_000), np.float64(10_000), np.float32(10_000)) == ref
    assert eng.plan(np.int64(50_000), 10_000, 10_000) == ref
    assert eng.plan(np.float64("nan"), 10_000, 10_000).reason == "invalid_input"


@pytest.mark.exclusive          # times the code: no other test runs meanwhile (conftest.py)
def test_plan_is_fast_enough_for_backtests():
    import time
    eng, m = RiskEngine(), Market()
    t0 = time.process_time()          # the CPU the calls cost (pure Python, one thread): not the machine's load
    for i in range(2_000):
        eng.plan(30_000 + i * 7.31, 10_000 + i, 10_000 + i, m)
    per_call = (time.process_time() - t0) / 2_000
    assert per_call < 1e-3, per_call        # ~50 µs here; a 5-year backtest makes < 2,000 entries
