"""GENIUS as a Tune Searcher against a real local OpenAI-compatible server, fed from the NAS-Bench-Macro table.

No Ray cluster: the tests call `suggest` and `on_trial_complete` themselves, as Tune would, one trial at a time.
"""

from __future__ import annotations

import json
import pickle
import re
from contextlib import contextmanager
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Iterator

import pytest
from openai_server import FreshArchitecturePolicy, OpenAIServer, RawReply, ScriptedPolicy, SlowReply

from orchestrator.genius import EXPERIMENTS_HEADER, PERSONAS, REASONED_SUFFIX, SUFFIX, GeniusError, GeniusSearcher
from trainers.nas import get_space

BENCHMARK = Path("/work/shared/data/nas-bench-macro_cifar10.json")
KEY, METRIC = "config.arch", "eval/accuracy"
FAKE_KEY = "sk-genius-test-3f9c1d2e7a-never-log-me"
SERVED_MODEL = "served-model-2024-01-01"
LIST_ONLY = SUFFIX.format(answer="operation ID list")  # NAS-Bench-Macro's answer is an operation ID list
REASONED = REASONED_SUFFIX.format(answer="operation ID list")


@pytest.fixture(scope="module")
def table() -> dict:
    if not BENCHMARK.is_file():
        pytest.skip(f"{BENCHMARK} is not here")
    return json.loads(BENCHMARK.read_text())


@pytest.fixture
def space():
    return get_space("nas_bench_macro")


@pytest.fixture(autouse=True)
def api_key(monkeypatch: pytest.MonkeyPatch) -> str:
    monkeypatch.setenv("OPENAI_API_KEY", FAKE_KEY)
    return FAKE_KEY


@contextmanager
def serving(replies: list[str], fallback=None) -> Iterator[OpenAIServer]:
    with OpenAIServer(ScriptedPolicy(replies, fallback), served_model=SERVED_MODEL) as server:
        yield server


def searcher_for(server: OpenAIServer, space, log_dir: Path, **options) -> GeniusSearcher:
    return GeniusSearcher(space, KEY, METRIC, "max", model="test-gpt", base_url=server.base_url,
                          log_dir=str(log_dir), **options)


def code_of(config: dict) -> str:
    return config[KEY].split(":", 1)[1]


def train(searcher: GeniusSearcher, table: dict, trial_id: str) -> str:
    """One GENIUS iteration as Tune runs it: suggest, "train" (look the accuracy up), complete."""
    code = code_of(searcher.suggest(trial_id))
    searcher.on_trial_complete(trial_id, {METRIC: table[code]["mean_acc"] / 100})
    return code


def digit_list(code: str) -> str:
    return str([int(char) for char in code])


def percent(table: dict, code: str) -> str:
    return str(Decimal(table[code]["mean_acc"]).quantize(Decimal("0.01"), rounding=ROUND_HALF_UP))


def user_turns(body: dict) -> list[str]:
    return [message["content"] for message in body["messages"] if message["role"] == "user"]


def candidates(log_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (log_dir / "candidates.jsonl").read_text().splitlines()]


def test_good_answer_becomes_the_trial_config_and_the_search_is_sequential(space, tmp_path: Path) -> None:
    with serving(["[2, 2, 2, 1, 2, 2, 2, 0]"]) as server:
        searcher = searcher_for(server, space, tmp_path)
        assert searcher.suggest("t0") == {KEY: "nas_bench_macro:22212220"}
        assert searcher.suggest("t1") is None  # t0 is still training
    assert len(server.requests) == 1
    body, prompt = server.requests[0], space.prompt()
    assert (body["model"], body["temperature"], body["n"]) == ("test-gpt", 0.0, 1) and "max_tokens" not in body
    assert body["messages"][0] == {"role": "system", "content": PERSONAS["expert"]}
    [user] = user_turns(body)
    assert user == prompt.text() + "\n" + LIST_ONLY  # the suffix on the line after the body, as the official
    assert server.authorizations == [f"Bearer {FAKE_KEY}"]


MACRO_ROWS = [  # GENIUS's NAS-Bench-Macro layer dictionary, spacing included
    "    layer1:  {defined: True,  operation: nn.Conv2d(in_channels=3,  out_channels=32, kernel_size=3, padding=1, "
    "bias=False)},",
    "    layer2:  {defined: False, downsample: True , in_channels: 32,  out_channels: 64 , stride: 2},",
    "    layer6:  {defined: False, downsample: False, in_channels: 128, out_channels: 128, stride: 1},",
    "    layer9:  {defined: False, downsample: False, in_channels: 256, out_channels: 256, stride: 1},",
    "    layer10: {defined: True,  operation: nn.Conv2d(in_channels=256, out_channels=1280, kernel_size=1, bias=False, "
    "stride=1)},",
    "    layer12: {defined: True,  operation: nn.Linear(in_features=1280, out_features=10)},",
]


def test_the_macro_prompt_has_the_official_parts_layout_and_names(space) -> None:
    """The catalogue with signatures and block listings (not this project's source), the aligned layer dictionary,
    the answer called an "operation ID list" in the answer format, the experiments block and the suffix."""
    import inspect

    from trainers.nas import nas_bench_macro

    prompt = space.prompt()
    text = prompt.text()
    assert "\n0: Identity(in_channels, out_channels, stride)\n" in prompt.operations
    assert "\n2: InvertedResidual(in_channels, out_channels, stride, expansion=6, kernel_size=5)\n" in prompt.operations
    assert "class Identity(nn.Module):" in text and "class InvertedResidual(nn.Module):" in text
    for cls in (nas_bench_macro.Identity, nas_bench_macro.InvertedResidual):
        assert inspect.getsource(cls) not in text and (cls.__doc__ or "") not in text
    assert all(row + "\n" in prompt.skeleton for row in MACRO_ROWS)
    assert prompt.answer_format.startswith("Your response should be an operation ID list for the undefined layers")
    order = ["Your task is", "0: Identity(", "class InvertedResidual", "layer12:", "layer2 - layer9", "[1, 2, ..., 0]"]
    assert [text.index(part) for part in order] == sorted(text.index(part) for part in order)


@pytest.mark.parametrize(("name", "request_line"), [
    ("nas_bench_macro", "Please suggest a better operation ID list that improves"),
    ("channel_bench_res", "Please suggest a channel list that improves"),
    ("channel_bench_mob", "Please suggest a better channel list that improves")])
def test_later_prompts_are_body_experiments_suffix_on_consecutive_lines(name: str, request_line: str,
                                                                         tmp_path: Path) -> None:
    space = get_space(name)
    with serving([], FreshArchitecturePolicy(space, seed=5)) as server:
        searcher = searcher_for(server, space, tmp_path)
        code = code_of(searcher.suggest("t0"))
        searcher.on_trial_complete("t0", {METRIC: 0.91234})
        searcher.suggest("t1")
    [user] = user_turns(server.requests[-1])
    suffix = SUFFIX.format(answer=space.prompt().answer_name)
    experiments = f"{EXPERIMENTS_HEADER}\n{space.answer_list(code)} gives an accuracy of 91.23%\n\n{request_line}"
    assert user.startswith(space.prompt().text() + "\n" + experiments) and user.endswith("results.\n" + suffix)


def test_prose_and_code_fences_around_the_list_are_tolerated(space, tmp_path: Path) -> None:
    reply = "Layers [0, 1] are early.\nHere is my design:\n```json\n[1, 1, 1, 1, 1, 1, 1, 1]\n```\nGood luck!"
    with serving([reply]) as server:
        assert code_of(searcher_for(server, space, tmp_path).suggest("t0")) == "11111111"
    assert len(server.requests) == 1


def test_reasoned_answers_end_with_the_list_when_asked(space, tmp_path: Path) -> None:
    """list_only false: the NB201/ImageNet chats' analysis first, the list last; re-prompts keep that suffix."""
    replies = ["Skip connections help gradients, so I keep them early.", "Wide blocks late:\n[1, 1, 1, 1, 2, 2, 2, 2]"]
    with serving(replies) as server:
        assert code_of(searcher_for(server, space, tmp_path, list_only=False).suggest("t0")) == "11112222"
    first, retry = user_turns(server.requests[0])[-1], user_turns(server.requests[1])[-1]
    assert first.endswith(REASONED) and LIST_ONLY not in first and retry.endswith(REASONED)


def test_malformed_and_invalid_replies_are_answered_in_the_same_conversation(space, tmp_path: Path) -> None:
    replies = ["I would use inverted residual blocks everywhere.", "[2, 2, 2, 1, 2, 2, 2]",
               "[2, 2, 2, 1, 2, 2, 3, 0]", "[2, 2, 2, 1, 2, 2, 0, 2]"]
    with serving(replies) as server:
        searcher = searcher_for(server, space, tmp_path)
        assert code_of(searcher.suggest("t0")) == "22212202"
    bodies = [body["messages"] for body in server.requests]
    for before, after, reply in zip(bodies, bodies[1:], replies):
        assert after[:-2] == before and after[-2] == {"role": "assistant", "content": reply}
    feedback = [messages[-1]["content"] for messages in bodies[1:]]
    assert "does not contain a list of 8 integers" in feedback[0]
    assert "has 8 positions, got 7" in feedback[1]
    assert "position 6" in feedback[2] and "allows 0..2" in feedback[2]
    assert all(text.endswith(LIST_ONLY) for text in feedback)
    assert [c["verdict"] for c in candidates(tmp_path)] == ["malformed", "invalid", "invalid", "accepted"]
    summary = searcher.summary()
    assert (summary["rejected_malformed"], summary["rejected_invalid"], summary["accepted"]) == (1, 2, 1)


def test_an_evaluated_network_or_its_canonical_twin_is_a_duplicate(space, table: dict, tmp_path: Path) -> None:
    replies = ["[2, 2, 2, 1, 2, 2, 0, 2]", "[2, 2, 2, 1, 2, 2, 2, 0]", "[1, 1, 1, 1, 1, 1, 1, 1]",
               "[1, 1, 1, 1, 1, 1, 1, 1]", "[1, 0, 0, 0, 0, 0, 0, 0]"]
    with serving(replies) as server:
        searcher = searcher_for(server, space, tmp_path)
        assert [train(searcher, table, f"t{i}") for i in range(3)] == ["22212202", "11111111", "10000000"]
    twin, same = server.requests[2]["messages"][-1]["content"], server.requests[4]["messages"][-1]["content"]
    assert "[2, 2, 2, 1, 2, 2, 2, 0] is the same network as [2, 2, 2, 1, 2, 2, 0, 2]" in twin
    assert f"experiment 1 (accuracy {percent(table, '22212202')}%)" in twin
    assert "[1, 1, 1, 1, 1, 1, 1, 1] was already evaluated in experiment 2" in same
    assert searcher.summary()["rejected_duplicate"] == 2


def test_a_candidate_outside_the_flops_window_is_sent_back(space, table: dict, tmp_path: Path) -> None:
    replies = ["[2, 2, 2, 2, 2, 2, 2, 2]", "[1, 0, 0, 0, 0, 0, 0, 0]", "[1, 1, 0, 0, 0, 0, 0, 0]"]
    with serving(replies) as server:
        searcher = searcher_for(server, space, tmp_path, flops=(0, 40))
        assert [train(searcher, table, f"t{i}") for i in range(2)] == ["10000000", "11000000"]
    assert "lie in [0, 40] MFLOPs" in user_turns(server.requests[0])[0]
    revise = server.requests[1]["messages"][-1]["content"]
    assert "fails to meet the FLOPs constraint" in revise and "105.66 MFLOPs" in revise
    assert "65.66 MFLOPs higher than the upper bound of 40" in revise
    [prompt] = user_turns(server.requests[2])
    assert f"Experiment 1: [1, 0, 0, 0, 0, 0, 0, 0], FLOPs 12.13M, accuracy {percent(table, '10000000')}%" in prompt
    rejected = candidates(tmp_path)[0]
    assert rejected["verdict"] == "over_budget" and round(rejected["flops"], 2) == 105.66


def test_exhausted_retries_raise_with_the_chat_already_on_disk(space, tmp_path: Path) -> None:
    with serving(["no idea", "still no idea", "none at all"]) as server:
        searcher = searcher_for(server, space, tmp_path, max_retries=2)
        with pytest.raises(GeniusError, match=r"after 2 re-prompts.*malformed.*'none at all'"):
            searcher.suggest("t0")
    assert len(server.requests) == 3
    assert [e["reply"] for e in json.loads((tmp_path / "chat.json").read_text())["exchanges"]] == [
        "no idea", "still no idea", "none at all"]
    assert [c["verdict"] for c in candidates(tmp_path)] == ["malformed"] * 3


def test_single_turn_prompt_lists_every_earlier_candidate(space, table: dict, tmp_path: Path) -> None:
    with serving([], FreshArchitecturePolicy(space, seed=1)) as server:
        searcher = searcher_for(server, space, tmp_path)
        codes = [train(searcher, table, f"t{i}") for i in range(2)]
        codes.append(code_of(searcher.suggest("t2")))
        searcher.on_trial_complete("t2", None, error=True)
        codes.append(train(searcher, table, "t3"))
        searcher.suggest("t4")
    last = server.requests[-1]["messages"]
    assert [m["role"] for m in last] == ["system", "user"]  # rebuilt, not continued
    expected = [f"{digit_list(code)} gives an accuracy of {percent(table, code)}%" for code in codes]
    expected[2] = f"{digit_list(codes[2])} failed to train, so it has no accuracy"
    lines = last[1]["content"].split(EXPERIMENTS_HEADER + "\n")[1]
    assert lines.splitlines()[:4] == expected
    assert all(len(decimals) == 2 for decimals in re.findall(r"accuracy of \d+\.(\d+)%", last[1]["content"]))
    assert "Please suggest a better operation ID list that improves the model's performance on CIFAR10" in \
        last[1]["content"]
    assert last[1]["content"].endswith(LIST_ONLY)
    assert [entry["accuracy"] is None for entry in searcher.history()] == [False, False, True, False]


def test_multi_turn_keeps_one_growing_conversation(space, table: dict, tmp_path: Path) -> None:
    with serving([], FreshArchitecturePolicy(space, seed=2)) as server:
        searcher = searcher_for(server, space, tmp_path, variant="multi_turn", persona="quoc_le")
        codes = [train(searcher, table, f"t{i}") for i in range(3)]
    bodies = [body["messages"] for body in server.requests]
    assert bodies[0][0] == {"role": "system", "content": PERSONAS["quoc_le"]}
    assert EXPERIMENTS_HEADER not in bodies[0][1]["content"]
    for before, after, code in zip(bodies, bodies[1:], codes):
        assert after[:-2] == before and after[-2] == {"role": "assistant", "content": digit_list(code)}
        assert after[-1]["content"].startswith(f"By using this model, we achieved an accuracy of "
                                               f"{percent(table, code)}%.")
    assert [m["role"] for m in bodies[-1]].count("system") == 1


def test_log_files_hold_the_exchanges_candidates_and_usage(space, table: dict, tmp_path: Path) -> None:
    with serving(["Let me think.", "[0, 1, 2, 0, 1, 2, 0, 1]"]) as server:
        searcher = searcher_for(server, space, tmp_path)
        train(searcher, table, "t0")
    chat = json.loads((tmp_path / "chat.json").read_text())
    assert chat["model"] == "test-gpt" and len(chat["exchanges"]) == 2
    for exchange, body, response in zip(chat["exchanges"], server.requests, server.responses):
        assert exchange["messages"] == body["messages"] and exchange["server_model"] == SERVED_MODEL
        assert exchange["reply"] == response["choices"][0]["message"]["content"]
        assert exchange["usage"] == response["usage"]
    usage = json.loads((tmp_path / "usage.json").read_text())
    for name in ("prompt_tokens", "completion_tokens", "total_tokens"):
        assert usage[name] == sum(response["usage"][name] for response in server.responses) > 0
    assert usage["requests"] == 2 and usage["server_models"] == [SERVED_MODEL]
    rejected, accepted = candidates(tmp_path)
    assert rejected["verdict"] == "malformed" and rejected["code"] is None
    assert accepted["code"] == "01201201" and accepted["trial_id"] == "t0" and accepted["status"] == "completed"
    assert accepted["accuracy"] == float(percent(table, "01201201")) and accepted["flops"] > 0 < accepted["params"]
    transcript = (tmp_path / "chat.md").read_text()
    assert "Let me think." in transcript and "## Iteration 1, attempt 2" in transcript
    assert [c["attempt"] for c in candidates(tmp_path)] == [1, 2]
    assert transcript.count(space.prompt().task) == 1  # the re-prompt shows only what is new
    summary = searcher.summary()
    assert summary["requests"] == 2 and summary["evaluated"] == 1 and summary["total_tokens"] == usage["total_tokens"]


def test_the_api_key_is_used_but_written_nowhere(space, table: dict, tmp_path: Path) -> None:
    with serving(["[3]", "[2, 2, 2, 2, 2, 2, 2, 2]"], FreshArchitecturePolicy(space, flops=(0, 60))) as server:
        searcher = searcher_for(server, space, tmp_path / "logs", flops=(0, 60))
        for i in range(2):
            train(searcher, table, f"t{i}")
        searcher.save(str(tmp_path / "logs" / "searcher.json"))
        pickled = pickle.dumps(searcher)
    assert set(server.authorizations) == {f"Bearer {FAKE_KEY}"}
    files = [path for path in (tmp_path / "logs").rglob("*") if path.is_file()]
    assert {path.name for path in files} >= {"chat.json", "chat.md", "candidates.jsonl", "usage.json"}
    assert not [path for path in files if FAKE_KEY.encode() in path.read_bytes()]
    assert FAKE_KEY.encode() not in pickled


def test_secrets_in_the_chat_are_redacted_in_its_logs(space, tmp_path: Path, monkeypatch) -> None:
    """A reply that repeats the key (of any variable name) or holds a token-shaped value is logged with ***."""
    monkeypatch.setenv("LAB_LLM", "lab-llm-plain-value")
    token = "gh" + "p_0123456789abcdefghijABCDEF"  # in two parts: no secret scanner flags this file
    reply = f"Use lab-llm-plain-value and {FAKE_KEY} or {token}.\n[2, 2, 2, 1, 2, 2, 2, 0]"
    with serving([reply]) as server:
        searcher = searcher_for(server, space, tmp_path, api_key_env="LAB_LLM")
        assert code_of(searcher.suggest("t0")) == "22212220"
    assert server.authorizations == ["Bearer lab-llm-plain-value"]
    texts = [(tmp_path / name).read_text() for name in ("chat.json", "chat.md", "candidates.jsonl", "usage.json")]
    assert all("Use *** and *** or ***." in text for text in texts[:3])
    assert not [text for text in texts if "lab-llm-plain-value" in text or FAKE_KEY in text or token in text]


def test_without_a_key_only_a_loopback_server_is_allowed(space, tmp_path: Path, monkeypatch) -> None:
    monkeypatch.delenv("OPENAI_API_KEY")
    remote = GeniusSearcher(space, KEY, METRIC, "max", model="gpt-4", base_url="https://llm.example.invalid/v1",
                            api_key_env="MY_LLM_KEY")
    with pytest.raises(GeniusError, match="MY_LLM_KEY"):
        remote.suggest("t0")
    with serving(["[0, 0, 0, 0, 0, 0, 0, 1]"]) as server:
        assert code_of(searcher_for(server, space, tmp_path).suggest("t0")) == "00000001"
    assert server.authorizations[0].startswith("Bearer ") and FAKE_KEY not in server.authorizations[0]


@pytest.mark.parametrize("variant", ["single_turn", "multi_turn"])
def test_save_and_restore_continue_the_same_search(space, table: dict, tmp_path: Path, variant: str) -> None:
    checkpoint = tmp_path / "searcher.json"
    runs = {}
    for name in ("original", "restored"):
        with serving([], FreshArchitecturePolicy(space, seed=3)) as server:
            searcher = searcher_for(server, space, tmp_path / name, variant=variant)
            if name == "original":
                for i in range(2):
                    train(searcher, table, f"t{i}")
                searcher.suggest("t2")
                searcher.save(str(checkpoint))
            else:
                searcher.restore(str(checkpoint))
            asked_before = len(server.requests)
            pending = searcher._pending["code"]
            searcher.on_trial_complete("t2", {METRIC: table[pending]["mean_acc"] / 100})
            codes = [train(searcher, table, f"t{i}") for i in range(3, 5)]
            runs[name] = (codes, [body["messages"] for body in server.requests[asked_before:]], searcher.history())
    assert runs["original"] == runs["restored"]
    assert len(runs["restored"][2]) == 5
    restored_chat = json.loads((tmp_path / "restored" / "chat.json").read_text())["exchanges"]
    assert len(restored_chat) == 5  # the restored searcher's log continues the original one


def test_a_restored_search_keeps_the_records_written_after_its_checkpoint(space, table: dict, tmp_path: Path) -> None:
    """A search that failed after its last checkpoint is resumed from that checkpoint: the requests and rejected
    replies written since stay in the logs (before the new ones), and so do the request counts."""
    checkpoint, logs = tmp_path / "searcher.json", tmp_path / "search"
    replies = ["[0, 0, 0, 0, 0, 0, 0, 1]", "no list", "still no list", "[1, 1, 1, 1, 1, 1, 1, 1]"]
    with serving(replies) as server:
        searcher = searcher_for(server, space, logs, max_retries=1)
        train(searcher, table, "t0")
        searcher.save(str(checkpoint))
        with pytest.raises(GeniusError, match="after 1 re-prompts"):
            searcher.suggest("t1")
        failed = candidates(logs)
        resumed = searcher_for(server, space, logs, max_retries=1)
        resumed.restore(str(checkpoint))
        assert code_of(resumed.suggest("t1")) == "11111111"
    assert [c["reply"] for c in candidates(logs)] == replies and candidates(logs)[:3] == failed
    assert json.loads((logs / "usage.json").read_text())["requests"] == len(server.requests) == 4
    assert len(json.loads((logs / "chat.json").read_text())["exchanges"]) == 4
    with serving(["[2, 1, 1, 1, 1, 1, 1, 1]"]) as server:  # started again without a checkpoint: its iteration 1
        assert code_of(searcher_for(server, space, logs).suggest("t0")) == "21111111"
    assert [c["reply"] for c in candidates(logs)] == replies + ["[2, 1, 1, 1, 1, 1, 1, 1]"]
    assert json.loads((logs / "usage.json").read_text())["requests"] == 5


@pytest.mark.parametrize(("fault", "message"), [
    (RawReply(200, "<html>busy</html>"), r"answered HTTP 200 with a body that is not JSON: '<html>busy</html>'"),
    (RawReply(200, '{"object": "error"}', "application/json"), r"JSON that is not a chat completion"),
    (RawReply(503, '{"error": {"message": "overloaded"}}', "application/json"), r"InternalServerError.*overloaded"),
    (RawReply(401, '{"error": {"message": "bad key"}}', "application/json"), r"AuthenticationError.*bad key"),
])
def test_endpoint_failures_are_one_line_errors_with_every_request_recorded(space, tmp_path: Path, fault,
                                                                          message: str) -> None:
    """Retried `request_retries` times (not a 4xx), each try recorded as a failed request, then one GeniusError."""
    with serving([fault] * 3) as server:
        searcher = searcher_for(server, space, tmp_path, request_retries=1)
        with pytest.raises(GeniusError, match=r"iteration 1, attempt 1: the request for model 'test-gpt' at .*"
                                              + message) as caught:
            searcher.suggest("t0")
    tries = 1 if fault.status == 401 else 2
    assert len(server.requests) == tries and "\n" not in str(caught.value)
    usage = json.loads((tmp_path / "usage.json").read_text())
    assert usage["requests"] == usage["failed_requests"] == tries and not (tmp_path / "candidates.jsonl").read_text()


def test_a_reply_slower_than_the_timeout_is_a_timeout(space, tmp_path: Path) -> None:
    with serving([SlowReply(2.0, "[1, 1, 1, 1, 1, 1, 1, 1]")]) as server:
        searcher = searcher_for(server, space, tmp_path, request_retries=0, request_timeout=0.5)
        with pytest.raises(GeniusError, match="APITimeoutError"):
            searcher.suggest("t0")
    assert json.loads((tmp_path / "chat.json").read_text())["exchanges"][0]["error"].startswith("failed: APITimeout")


def test_no_server_listening_is_a_one_line_error_after_the_retries(space, tmp_path: Path) -> None:
    with OpenAIServer(ScriptedPolicy([])) as server:
        base_url = server.base_url  # a port that was free and is closed again below
    searcher = GeniusSearcher(space, KEY, METRIC, "max", model="test-gpt", base_url=base_url, request_retries=1,
                              log_dir=str(tmp_path))
    with pytest.raises(GeniusError, match=r"failed: APIConnectionError: Connection error\. \(after 1 retries\)$"):
        searcher.suggest("t0")
    assert json.loads((tmp_path / "usage.json").read_text())["failed_requests"] == 2


def test_the_searcher_pickles_and_goes_on(space, table: dict, tmp_path: Path) -> None:
    with serving([], FreshArchitecturePolicy(space, seed=4)) as server:
        searcher = searcher_for(server, space, tmp_path)
        first = train(searcher, table, "t0")
        clone = pickle.loads(pickle.dumps(searcher))
        second = train(clone, table, "t1")
    assert first != second and [entry["code"] for entry in clone.history()] == [first, second]
    assert f"{digit_list(first)} gives an accuracy of" in user_turns(server.requests[-1])[0]


def test_search_properties(space, tmp_path: Path) -> None:
    searcher = GeniusSearcher(space, KEY, model="test-gpt", base_url="http://127.0.0.1:9/v1")
    with pytest.raises(ValueError, match="metric"):
        searcher.suggest("t0")
    assert searcher.set_search_properties(METRIC, "max", {}) is True
    assert (searcher.metric, searcher.mode) == (METRIC, "max")
    with pytest.raises(ValueError, match="mode must be 'max'"):
        searcher.set_search_properties(METRIC, "min", {})
    with pytest.raises(ValueError, match="variant"):
        GeniusSearcher(space, KEY, model="m", variant="tree_of_thought")


def test_an_api_error_names_the_model_and_the_server(space, tmp_path: Path) -> None:
    with serving([]) as server:
        searcher = GeniusSearcher(space, KEY, METRIC, "max", model="test-gpt", base_url=server.base_url + "/wrong")
        with pytest.raises(GeniusError, match=r"attempt 1: the request for model 'test-gpt' at http://127\.0\.0\.1"):
            searcher.suggest("t0")
    assert server.requests == []
