"""benchmarks/bench_trl.py (TRL as a referee): its confidence interval, the train.py and toy-world functions it calls,
and the rule that TRL stays out of sqlr1/.

The benchmark itself needs the `bench` extra and minutes; these checks need neither.
"""

import ast
import importlib.util
import math
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_trl", ROOT / "benchmarks" / "bench_trl.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_report_uses_the_labs_interval():
    pm = _bench().pm
    assert pm([1.0, 2.0, 3.0]) == f"2.000 ± {4.303 / math.sqrt(3):.3f}"  # s = 1, t_{0.975, 2} = 4.303
    assert pm([0.3]) == "0.300 (1 seed, no CI)"
    assert pm([-0.1, 0.1], sign="+").startswith("+0.000 ± ")


def test_the_functions_it_calls_on_train_and_toyworld_exist():
    """bench_trl reaches train.py and sqlr1.toyworld through module attributes (`sqlr1_train.rl_data`), which
    importing the benchmark does not resolve: each one it names must exist."""
    bench = _bench()
    tree = ast.parse((ROOT / "benchmarks" / "bench_trl.py").read_text())
    used = {(node.value.id, node.attr) for node in ast.walk(tree) if isinstance(node, ast.Attribute)
            and isinstance(node.value, ast.Name) and node.value.id in ("sqlr1_train", "toyworld")}
    assert used, "bench_trl no longer calls train.py or sqlr1.toyworld: update this test"
    for module, name in sorted(used):
        assert hasattr(getattr(bench, module), name), f"bench_trl calls {module}.{name}, which does not exist"


def test_sqlr1_never_imports_the_benchmark_only_packages():
    banned = {"trl", "transformers", "accelerate", "datasets"}
    for path in sorted((ROOT / "sqlr1").glob("*.py")) + [ROOT / "train.py", ROOT / "sample.py"]:
        for node in ast.walk(ast.parse(path.read_text())):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else (
                [node.module or ""] if isinstance(node, ast.ImportFrom) else [])
            for name in names:
                assert name.split(".")[0] not in banned, f"{path.name} imports {name}"
