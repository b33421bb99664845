"""One module per `meshpost bench` scenario, each with `run(bench) -> ScenarioResult`.

Rule: the registry (`meshpost.bench.options.REGISTRY`) names them; a module here that is not
registered, or a registered name with no module, fails tests/unit/bench/test_options.py.
"""
