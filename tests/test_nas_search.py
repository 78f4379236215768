"""Architecture search without Ray: NAS-Bench-Macro space and lookup, the baseline searchers, the `tune:` checks."""

from __future__ import annotations

import itertools
import json
import os
import pickle
import random
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from orchestrator import preflight
from orchestrator import spec as spec_mod
from orchestrator.nas_search import (
    NSGA2,
    ExhaustiveSearch,
    RandomSearch,
    RegularizedEvolution,
    TPESearch,
    build_searcher,
    crowding_distances,
    non_dominated_fronts,
    nsga2_select,
)
from orchestrator.spec import SpecError
from trainers.nas import InvalidArchitecture, arch_value, get_space, parse_arch_value
from trainers.nas_bench import load_table, lookup

ROOT = Path(__file__).resolve().parents[1]
TABLE = ROOT.parent / "shared" / "data" / "nas-bench-macro_cifar10.json"
EXPERIMENT = ROOT / "experiments" / "nas_bench" / "macro_evolution.yaml"
MACRO = get_space("nas_bench_macro")


@pytest.fixture(scope="module")
def entries() -> dict:
    return json.loads(TABLE.read_text())


def test_codes_round_trip_and_bad_codes_say_why() -> None:
    assert MACRO.encode(MACRO.decode("01201201")) == "01201201"
    assert MACRO.from_answer([2, 2, 2, 1, 2, 2, 2, 0]) == "22212220"
    assert parse_arch_value(arch_value(MACRO, "01201201")) == (MACRO, "01201201")
    for bad, reason in (("0120120", "8 positions"), ("01201203", "position 7"), ("0120120x", "position 7")):
        with pytest.raises(InvalidArchitecture, match=reason):
            MACRO.decode(bad)
    with pytest.raises(InvalidArchitecture, match="<space>:<code>"):
        parse_arch_value("01201201")


def test_canonical_form_is_the_benchmarks(entries: dict) -> None:
    """Identity moved to the end of its stage (never the first layer): 3969 networks, each key's entry equal to
    its canonical one's."""
    assert MACRO.canonical("02012100") == "02012100"
    assert MACRO.canonical("12010201") == "12010210"  # stages 12 | 010 (first layer kept) | 201 -> 210
    assert len({MACRO.canonical(k) for k in entries}) == 3969
    assert all(entries[k]["mean_acc"] == entries[MACRO.canonical(k)]["mean_acc"] for k in entries)


def test_flops_and_params_match_the_table_and_a_hand_count(entries: dict) -> None:
    # all identity: stem 3x3 conv, three 1x1 downsampling convs, the 1x1 head conv, the classifier
    hand = 3 * 32 * 9 * 32 * 32 + 32 * 64 * 16 * 16 + 64 * 128 * 8 * 8 + 128 * 256 * 4 * 4 + 256 * 1280 * 4 * 4 + 12800
    assert MACRO.flops("00000000") * 1e6 == pytest.approx(hand) == entries["00000000"]["flops"]
    for code in random.Random(0).sample(sorted(entries), 12) + ["22212220"]:
        assert MACRO.flops(code) * 1e6 == pytest.approx(entries[code]["flops"])
        assert MACRO.params(code) * 1e6 == pytest.approx(entries[code]["params"])


def test_networks_run_on_other_inputs() -> None:
    import torch

    model = MACRO.build("12012012", num_classes=7, in_channels=1)
    assert model(torch.zeros(2, 1, 16, 16)).shape == (2, 7)
    assert model.features(torch.zeros(2, 1, 16, 16)).shape == (2, 1280)


def test_lookup_matches_the_file(entries: dict) -> None:
    table = load_table(str(TABLE), "nas_bench_macro")
    for code in ("22212220", "22212202", "00000000", "11111221"):
        metrics = lookup(table, code)
        assert metrics["eval/acc"] == pytest.approx(entries[code]["mean_acc"] / 100)
        assert metrics["eval/mflops"] == pytest.approx(entries[code]["flops"] / 1e6)
    assert lookup(table, "22212202")["eval/rank"] == lookup(table, "22212220")["eval/rank"] == 1  # tied twins
    assert lookup(table, "00000000")["eval/rank"] == 6561


def load_for_running(path: Path) -> None:
    """What `orchestrator search` checks before Ray starts: the file, then this machine's files."""
    preflight.check_inputs(preflight.load(path), path)


def _experiment(tmp_path: Path, **changes: object) -> Path:
    raw = yaml.safe_load(EXPERIMENT.read_text())
    raw["config"]["table"] = str(TABLE)
    for dotted, value in changes.items():
        spec_mod.set_dotted(raw, dotted.replace("__", "."), value, None)
    path = tmp_path / "search.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


@pytest.mark.parametrize(("changes", "key", "message"), [
    ({"config__table": "/nonexistent/table.json"}, "config.table", "No such file"),
    ({"config__arch": "nas_bench_macro:0120"}, "config.arch", "8 positions"),
    ({"tune__space": {"config.arch": {"architecture": "nas_bench_makro"}}}, "tune.space.config.arch.architecture",
     "did you mean 'nas_bench_macro'"),
    ({"tune__space": {"config.arch": {"architecture": "nas_bench_macro"}, "seed": {"choice": [0, 1]}}},
     "tune.space.seed", "only the architecture key"),
    ({"tune__searcher": {"name": "evolution", "population_sise": 5}}, "tune.searcher.population_sise",
     "did you mean 'population_size'"),
    ({"tune__searcher": {"name": "evolutoin"}}, "tune.searcher.name", "did you mean 'evolution'"),
    ({"tune__searcher": {"name": "evolution", "sample_size": 50}}, "tune.searcher", "sample_size <= population"),
])
def test_bad_search_files_fail_before_ray_starts(tmp_path: Path, changes: dict, key: str, message: str) -> None:
    with pytest.raises(SpecError) as caught:
        load_for_running(_experiment(tmp_path, **changes))
    assert caught.value.key == key and message in str(caught.value)


def test_a_missing_table_passes_check_but_not_the_run(tmp_path: Path) -> None:
    """`orchestrator check` accepts a file meant for a cluster whose nodes have the table; running it here fails
    before Ray starts."""
    path = _experiment(tmp_path, config__table="/cluster/nas-bench-macro_cifar10.json")
    spec_mod.load(path)
    with pytest.raises(SpecError, match=r"config\.table: expected the nas_bench_macro benchmark's JSON file"):
        load_for_running(path)


def test_table_of_another_benchmark_is_refused(tmp_path: Path) -> None:
    wrong = tmp_path / "channel.json"
    wrong.write_text(json.dumps({"4344424": {"acc": [93.0], "mean": 93.0, "std": 0.0}}))
    with pytest.raises(SpecError, match="entries with the field 'mean_acc'"):
        load_for_running(_experiment(tmp_path, config__table=str(wrong)))
    broken = tmp_path / "broken.json"
    broken.write_text('{"0000')
    with pytest.raises(SpecError, match="a JSON file"):
        load_for_running(_experiment(tmp_path, config__table=str(broken)))


# ---------------------------------------------------------------------------------------------- tables vs spaces


@pytest.fixture(scope="module")
def resnet_table(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Channel-Bench ResNet table in the benchmark's format (every code; mean accuracies made up from the code),
    whose FLOPs and params are the hand counts of tests/test_channel_bench_macro.py, i.e. the official file's."""
    from test_channel_bench_macro import resnet_counts

    entries = {}
    for digits in itertools.product("1234", repeat=7):
        code = "".join(digits)
        flops, params = resnet_counts(code)
        mean = 90 + sum(int(d) for d in code) / 10
        entries[code] = {"acc": [mean] * 3, "mean": mean, "std": 0.0, "flops": flops, "params": params}
    path = tmp_path_factory.mktemp("tables") / "Results_ResNet.json"
    path.write_text(json.dumps(entries))
    return path


def channel_experiment(tmp_path: Path, space: str, table: Path) -> Path:
    raw = yaml.safe_load((ROOT / "experiments" / "genius" / "channel_bench_mob.yaml").read_text())
    raw["config"] = {"arch": f"{space}:1111111", "table": str(table)}
    raw["tune"]["space"] = {"config.arch": {"architecture": space}}
    raw["tune"]["searcher"] = {"name": "evolution", "population_size": 5, "sample_size": 2}
    path = tmp_path / f"{space}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def test_a_swapped_channel_bench_table_is_refused_before_ray_naming_its_space(tmp_path: Path,
                                                                               resnet_table: Path) -> None:
    """Same fields, same size: only the counts tell the ResNet file from the MobileNet one."""
    load_for_running(channel_experiment(tmp_path, "channel_bench_res", resnet_table))
    command = [sys.executable, "-m", "orchestrator", "search",
               str(channel_experiment(tmp_path, "channel_bench_mob", resnet_table)), "--set",
               f"storage_path={tmp_path / 'runs'}"]
    done = subprocess.run(command, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    [line] = done.stderr.strip().splitlines()
    assert line.startswith("error: ") and "config.table" in line and str(resnet_table) in line
    assert "is this the channel_bench_res table?" in line and "'1111111' lists 90.097 MFLOPs" in line
    assert "Ray" not in done.stderr and not (tmp_path / "runs").exists()


def test_table_keys_of_another_form_are_refused_before_ray(tmp_path: Path, entries: dict) -> None:
    """The macro table keyed by GENIUS's answer lists: right fields and count, keys that are no codes."""
    relisted = tmp_path / "listed.json"
    relisted.write_text(json.dumps({str([int(d) for d in code]): entry for code, entry in entries.items()}))
    with pytest.raises(SpecError, match=r"config\.table: expected the nas_bench_macro benchmark: keys that are "
                                        r"nas_bench_macro architectures, e\.g\. '00000000'.*key '\[\d(, \d){7}\]': "
                                        r"nas_bench_macro has 8 positions"):
        load_for_running(_experiment(tmp_path, config__table=str(relisted)))


def test_the_official_nas_bench_201_pth_is_refused_with_the_json_expected(tmp_path: Path) -> None:
    import torch

    pth = tmp_path / "NAS-Bench-201-v1_0-e61699.pth"
    torch.save({"meta_archs": ["|nor_conv_3x3~0|+|none~0|none~1|+|none~0|none~1|none~2|"]}, pth)
    raw = yaml.safe_load((ROOT / "experiments" / "genius" / "nas_bench_201.yaml").read_text())
    raw["config"]["table"] = str(pth)
    path = tmp_path / "nb201.yaml"
    path.write_text(yaml.safe_dump(raw))
    with pytest.raises(SpecError) as caught:
        load_for_running(path)
    message = str(caught.value)
    assert caught.value.key == "config.table" and "utf-8" not in message
    assert "JSON table keyed by cell string" in message and "val_acc_200" in message and "nas_201_api" in message


def test_searchers_take_flops_and_params_from_the_table_without_building_networks(tmp_path: Path,
                                                                                  resnet_table: Path) -> None:
    from trainers.nas.space import network_counts

    spec = spec_mod.load(channel_experiment(tmp_path, "channel_bench_res", resnet_table))
    searcher = build_searcher(spec, None, None)
    searcher.window = (100.0, 400.0)
    table = load_table(str(resnet_table), "channel_bench_res")
    built = network_counts.cache_info().misses
    codes = drive(searcher, table, 30)
    assert network_counts.cache_info().misses == built  # no network was built to count it
    res = get_space("channel_bench_res")
    assert all(100.0 <= searcher.counts.flops(c) <= 400.0 for c in codes)
    assert [searcher.counts.flops(c) for c in codes[:2]] == [res.flops(c) for c in codes[:2]]


def test_the_benchmark_script_searches_any_space_and_refuses_a_swapped_table(tmp_path: Path,
                                                                            resnet_table: Path) -> None:
    env = {**os.environ, "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path / 'mlflow.db'}"}
    env.pop("GENIUS_BASE_URL", None)
    script = str(ROOT / "benchmarks" / "nas_search.py")
    command = [sys.executable, script, "--space", "channel_bench_res", "--table", str(resnet_table), "--seeds", "2",
               "--evaluations", "10", "--out", str(tmp_path / "res")]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    results = json.loads((tmp_path / "res.json").read_text())
    assert results["optimum"] == 92.8 and set(results["results"]) == {"random", "evolution", "tpe"}
    assert all(r["summary"]["10"]["runs"] == 2 for r in results["results"].values())
    swapped = subprocess.run([*command[:3], "channel_bench_mob", *command[4:]], env=env, cwd=tmp_path,
                             capture_output=True, text=True, timeout=300)
    assert swapped.returncode == 1 and "is this the channel_bench_res table?" in swapped.stderr


def drive(searcher, table, evaluations: int) -> list[str]:
    """Suggest / look up / report, as Tune would with one trial at a time."""
    codes = []
    for number in range(evaluations):
        _, code = parse_arch_value(searcher.suggest(f"t{number}")["config.arch"])
        searcher.on_trial_complete(f"t{number}", {"eval/acc": lookup(table, code)["eval/acc"]})
        codes.append(code)
    return codes


@pytest.mark.parametrize("cls", [RandomSearch, RegularizedEvolution, TPESearch, NSGA2])
def test_searchers_never_repeat_a_network_and_respect_the_flops_window(cls) -> None:
    table = load_table(str(TABLE), "nas_bench_macro")
    searcher = cls(MACRO, "config.arch", "eval/acc", "max", seed=3, flops=(30.0, 60.0))
    codes = drive(searcher, table, 40)
    assert len({MACRO.canonical(c) for c in codes}) == 40
    assert all(30.0 <= MACRO.flops(c) <= 60.0 for c in codes)


def test_evolution_mutates_one_position_of_a_population_member() -> None:
    table = load_table(str(TABLE), "nas_bench_macro")
    searcher = RegularizedEvolution(MACRO, "config.arch", "eval/acc", "max", population_size=10, sample_size=3)
    drive(searcher, table, 10)
    members = [code for code, _ in searcher.population]
    _, child = parse_arch_value(searcher.suggest("child")["config.arch"])
    assert any(sum(a != b for a, b in zip(child, m)) == 1 for m in members)
    searcher.on_trial_complete("child", {"eval/acc": 0.5})
    assert len(searcher.population) == 10 and searcher.population[-1][0] == child  # the oldest one died


@pytest.mark.parametrize("cls", [RegularizedEvolution, TPESearch, NSGA2])
def test_saved_searchers_continue_identically(cls, tmp_path: Path) -> None:
    table = load_table(str(TABLE), "nas_bench_macro")
    searcher = cls(MACRO, "config.arch", "eval/acc", "max", seed=1)
    drive(searcher, table, 25)
    searcher.save(str(tmp_path / "state.pkl"))
    restored = cls(MACRO, "config.arch", "eval/acc", "max", seed=99)
    restored.restore(str(tmp_path / "state.pkl"))
    assert drive(restored, table, 10) == drive(pickle.loads(pickle.dumps(searcher)), table, 10)


def test_searchers_improve_on_random_over_many_seeds() -> None:
    """The reason to have them: at 100 evaluations evolution and TPE find better networks than random search
    (mean over 8 seeds; benchmarks/nas_search.py measures this with 20)."""
    table = load_table(str(TABLE), "nas_bench_macro")
    best = {}
    for cls in (RandomSearch, RegularizedEvolution, TPESearch):
        found = []
        for seed in range(8):
            codes = drive(cls(MACRO, "config.arch", "eval/acc", "max", seed=seed), table, 100)
            found.append(max(lookup(table, c)["eval/acc"] for c in codes))
        best[cls.__name__] = sum(found) / len(found)
    assert best["RegularizedEvolution"] > best["RandomSearch"] and best["TPESearch"] > best["RandomSearch"], best


def test_nsga2_fronts_and_crowding_on_hand_made_points() -> None:
    points = [(3.0, 1.0), (2.0, 2.0), (1.0, 3.0), (1.0, 1.0), (2.0, 1.0), (0.0, 0.0)]  # both maximised
    assert non_dominated_fronts(points) == [[0, 1, 2], [4], [3], [5]]
    assert crowding_distances([(3.0, 1.0), (2.0, 2.0), (1.0, 3.0)]) == [float("inf"), 2.0, float("inf")]
    assert crowding_distances([(1.0, 1.0), (1.0, 2.0), (1.0, 4.0), (1.0, 5.0)])[1:3] == [0.75, 0.75]
    chosen = nsga2_select(points, 4)
    assert [(i, rank) for i, rank, _ in chosen] == [(0, 0), (2, 0), (1, 0), (4, 1)]


def _hypervolume(front: list[tuple[float, float]], reference: tuple[float, float]) -> float:
    """Area dominated by `front` (accuracy up, MFLOPs down) above `reference` (worst accuracy, most MFLOPs)."""
    area, best_acc = 0.0, reference[0]
    for acc, mflops in sorted(front, key=lambda p: p[1]):
        if acc > best_acc:
            area += (acc - best_acc) * (reference[1] - mflops)
            best_acc = acc
    return area


def test_nsga2_finds_a_better_accuracy_flops_front_than_random() -> None:
    """NSGA-II's purpose: at 100 evaluations its front of accuracy against MFLOPs dominates more than random search's
    (hypervolume, mean over 4 seeds: 46.9 vs 45.1)."""
    table = load_table(str(TABLE), "nas_bench_macro")
    volume = {}
    for cls in (RandomSearch, NSGA2):
        found = []
        for seed in range(4):
            kwargs = {"population_size": 10} if cls is NSGA2 else {}
            codes = drive(cls(MACRO, "config.arch", "eval/acc", "max", seed=seed, **kwargs), table, 100)
            found.append(_hypervolume([(lookup(table, c)["eval/acc"], MACRO.flops(c)) for c in codes], (0.4, 110.0)))
        volume[cls.__name__] = sum(found) / len(found)
    assert volume["NSGA2"] > volume["RandomSearch"], volume


def test_exhaustive_search_proposes_every_network_once_then_finishes() -> None:
    from ray.tune.search import Searcher

    for name, networks in (("macro_digits", 81), ("nas_bench_macro", 3969)):
        space = get_space(name)
        searcher = ExhaustiveSearch(space, "config.arch", "eval/acc", "max")
        codes = []
        while isinstance(suggestion := searcher.suggest(f"t{len(codes)}"), dict):
            codes.append(parse_arch_value(suggestion["config.arch"])[1])
        assert suggestion == Searcher.FINISHED
        assert len(codes) == len({space.canonical(c) for c in codes}) == networks


def test_searcher_is_built_from_the_file(tmp_path: Path) -> None:
    spec = spec_mod.load(_experiment(tmp_path))
    searcher = build_searcher(spec, None, None)
    assert isinstance(searcher, RegularizedEvolution) and searcher.population_size == 20
    assert searcher.key == "config.arch" and searcher.metric == "eval/acc"


def test_genius_without_a_key_for_a_remote_endpoint_stops_before_ray(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if k != "OPENAI_API_KEY"}
    path = ROOT / "experiments" / "genius" / "nas_bench_macro.yaml"
    command = [sys.executable, "-m", "orchestrator", "search", str(path), "--set", f"config.table={TABLE}"]
    done = subprocess.run(command, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr[-3000:]
    assert "tune.searcher.api_key_env" in done.stderr and "OPENAI_API_KEY" in done.stderr
    assert "Started a local Ray" not in done.stderr and not (tmp_path / "runs").exists()


def test_method_state_is_saved_whole_or_not_at_all(tmp_path: Path) -> None:
    """A state is written under a temporary name and renamed: a leftover partial file is never loaded."""
    from orchestrator.method_run import STATE_FILE, MethodContext
    from orchestrator.storage import RunDir

    ctx = MethodContext(RunDir(str(tmp_path), "run"), logger=None)
    assert ctx.load() is None
    ctx.save({"iteration": 3})
    (tmp_path / "run" / f"{STATE_FILE}.partial").write_bytes(b"half a pickle")
    assert ctx.load() == {"iteration": 3}
    ctx.save({"iteration": 4})
    assert ctx.load() == {"iteration": 4} and not (tmp_path / "run" / f"{STATE_FILE}.partial").exists()
