from ibllm.parity import Fixture
from ibllm.parity.language import checks


def test_language_parity(parity_dir):
    results = list(checks(Fixture(parity_dir)))
    names = {r.name for r in results}
    for required in ("mix2.knn.idx", "llama.logits_steps", "gen.ragged.token_buffer",
                     "gen.single_knn.step_logits [merged]"):
        assert required in names
    failed = [f"{r.name}: {r.max_abs_diff:.2e} > {r.tol:.0e}" for r in results if not r.ok]
    assert not failed, failed
