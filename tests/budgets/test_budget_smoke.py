from budget_helpers import admit

async def test_smoke(make_engine):
    e = make_engine({"name": "b", "limit_usd": 1, "window": {"calendar": "day"}})
    a = await admit(e, "r1")
    assert a.decision == "allowed", a
    assert await e.settle(a, 5) == "settled"
    assert await e.settle(a, 5) == "duplicate"
    print(await e.status({"user": "alice"}))
