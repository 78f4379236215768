"""GENIUS (Zheng et al., "Can GPT-4 Perform Neural Architecture Search?", arXiv 2304.10970) as a Ray Tune Searcher.

A chat model proposes one architecture at a time; the sweep trains it; its accuracy goes back into the next prompt
(../shared/papers/methods_nas_gen_llm.md, section 1). Each `suggest` is one GENIUS iteration:

    messages  = [system persona, user prompt]            # single_turn: rebuilt every iteration
    user      = the space's `prompt().text()`: task, operations, skeleton, answer format in the official order
                [+ the FLOPs window, when `flops` sets one the space's prompt does not state]
                [+ "Here are the results of earlier experiments ...": one line per earlier candidate, and the
                   request for a better <answer_name> (e.g. "operation ID list") that improves on them]
                + a suffix that asks for the <answer_name> only; body, experiments and suffix on consecutive lines
    reply     -> the last bracketed integer list -> space.from_answer -> code -> {key: "<space>:<code>"}

Facts of the official code this follows (mingkai-zheng/GENIUS: nas_bench_macro.py, channel_bench_res.py,
nas_bench_201.py, imagenet/chat_history):
- one candidate per iteration, greedy decoding (`temperature=0, n=1`); the search is strictly sequential, so
  `suggest` returns None while the last suggested trial is still running;
- the benchmark scripts rebuild `[system, user]` every iteration and list every earlier candidate as
  "{list} gives an accuracy of {acc:.2f}%" (variant "single_turn"; the list is the space's `answer_list`:
  digits, or channel numbers for Channel-Bench-Macro); the NAS-Bench-201 script keeps one growing chat with a user
  turn "By using this model, we achieved an accuracy of ...%" after each answer (variant "multi_turn");
- the accuracy shown is the metric in percent, rounded half-up with `decimal` to 2 decimals;
- personas: "You are an expert in the field of neural architecture search." (benchmark scripts) and the Quoc V. Le
  role-play (NAS-Bench-201 and ImageNet chats);
- with a FLOPs window (the ImageNet runs) the prompt asks to stay inside it, the experiments carry their FLOPs, and
  an answer outside the window gets a "fails to meet the FLOPs constraint ... please revise" turn in the same chat.

Deviations, all deliberate:
- Answers are validated and the model is asked again, in the same conversation (the assistant reply plus a
  corrective user turn), on a reply without a list (malformed), a list that is not an architecture of the space
  (invalid), an architecture whose canonical form was already evaluated (duplicate) and one outside the FLOPs
  window (over_budget); at most `max_retries` such turns per iteration, then GeniusError. The benchmark scripts
  `json.loads` the raw reply and crash on anything else; only the ImageNet chats had a (manual) FLOPs re-prompt.
- The endpoint's failures are GeniusErrors with a one-line message (`orchestrator search` prints it and exits 1,
  the sweep's state kept for a resume): an HTTP 4xx at once; a timeout, no connection, HTTP 429 or 5xx, or an
  HTTP 200 whose body is not a chat completion (not JSON, or JSON without `choices[0].message`) after
  `request_retries` retries. Each HTTP request, failed or not, is recorded (the client's own retries are off).
- The list is the last bracketed integer list in the reply, so prose and code fences around it are tolerated (the
  NAS-Bench-201 script had a human type the answer in). A reply that spells out several lists (e.g. one per stage)
  is therefore judged by its last list, and a wrong length is reported to the model as invalid.
- The accuracy is always rounded to 2 decimals, also in the multi_turn variant (the NAS-Bench-201 script used 3).
- Every request ends with the list-only suffix of the benchmark scripts; `list_only: false` replaces it by a request
  to end the answer with the list, so the spaces whose answer format asks for analysis first (NAS-Bench-201, the
  ImageNet space, as in the paper's chats) get their rationale.
- The prompts are this project's words, carrying the official prompt's information in its order and layout for each
  official benchmark (NAS-Bench-Macro, Channel-Bench ResNet and MobileNet, NAS-Bench-201); each space's module says
  what differs there. The experiments block and the suffix are reworded too ("Here are the results of earlier
  experiments, for your reference:", "Please reply with the operation ID list only, and nothing else."); the
  multi_turn feedback asks for the rationale (as the NB201 script does) only with `list_only: false`.
- The experiment lines with a FLOPs window are compact, "Experiment k: [..], FLOPs XM, accuracy Y%", not the
  ImageNet chats' per-stage prose; the ImageNet chats' distilled "design principles" are not reproduced.
- A trial that fails (error, no result, or no finite metric) is recorded as failed: its line says that training
  failed and gives no accuracy, it still counts as evaluated for the duplicate check, and the search goes on.

Files under `log_dir`, written again after every exchange so that a crash keeps them (the sweep uploads them):
chat.json (every request's messages with its reply or its error, the requested and the served model, usage),
chat.md (a transcript), candidates.jsonl (every reply with its verdict, the parsed code, FLOPs, params and, later,
accuracy) and usage.json (request, failed-request and token totals, counted from chat.json), with credentials in
them replaced by *** (the API key's value, token-shaped values: tracking.redact_text). They only grow: a searcher
that finds records in `log_dir` that its state lacks (a resumed search that failed after its last checkpoint, or
one started again without a checkpoint) keeps them ahead of its new ones, so every earlier request and rejected
reply stays, and the totals with them. The API key is read from the environment when the client is made and is
kept only inside the client, which is neither pickled nor saved. MFLOPs and params (the window, the records) come
from `counts` (orchestrator/nas_search.py ArchCounts: the benchmark table's where it lists them).
"""

from __future__ import annotations

import json
import logging
import math
import numbers
import os
import re
import time
from decimal import ROUND_HALF_UP, Decimal
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

import openai
from ray.tune.search import Searcher

from orchestrator.nas_search import ArchCounts, SearchError
from orchestrator.tracking import redact_text
from trainers.nas import arch_value
from trainers.nas.space import InvalidArchitecture, SearchSpace

log = logging.getLogger("orchestrator")

PERSONAS = {
    "expert": "You are an expert in the field of neural architecture search.",
    "quoc_le": ("You are Quoc V. Le, a computer scientist and artificial intelligence researcher who is widely "
                "regarded as one of the leading experts in deep learning and neural network architecture search. "
                "Your work in this area has focused on developing efficient algorithms for searching the space of "
                "possible neural network architectures, with the goal of finding architectures that perform well "
                "on a given task while minimizing the computational cost of training and inference."),
}
VARIANTS = ("single_turn", "multi_turn")
REJECTIONS = ("malformed", "invalid", "duplicate", "over_budget")
ACCURACY_QUANTUM = Decimal("0.01")
LOOPBACK_HOSTS = {"localhost", "127.0.0.1", "::1"}
LOCAL_PLACEHOLDER_KEY = "no-key-needed-for-a-local-server"
INTEGER_LIST = re.compile(r"\[\s*-?\d+(?:\s*,\s*-?\d+)*\s*\]")
SUFFIX = "Please reply with the {answer} only, and nothing else."  # {answer}: the space's answer_name
REASONED_SUFFIX = "End your response with the {answer} on its own line."  # list_only: false (NB201/ImageNet chats)
EXPERIMENTS_HEADER = "Here are the results of earlier experiments, for your reference:"
STATE_VERSION = 1
TOKEN_COUNTS = ("prompt_tokens", "completion_tokens", "total_tokens")
SHOWN_BODY = 200  # characters of a bad body quoted in the error
RETRY_DELAY_S = 0.5  # before the first retry of a failed request; doubled for each further one


class GeniusError(SearchError):
    """The endpoint failed (HTTP error, timeout, no connection, a body that is not a chat completion) or the model
    gave no acceptable architecture within the allowed re-prompts. Its message is one line."""


class BadBody(Exception):
    """An HTTP 200 whose body is not a chat completion (not JSON, or JSON without choices[0].message)."""


TRANSIENT = (BadBody, openai.APIConnectionError, openai.RateLimitError, openai.InternalServerError)  # tried again


class Rejection(Exception):
    """A reply that is not an acceptable candidate: the verdict, a short reason, and the turn that says so."""

    def __init__(self, verdict: str, reason: str, feedback: str, code: str | None = None):
        super().__init__(reason)
        self.verdict, self.reason, self.feedback, self.code = verdict, reason, feedback, code


def round_accuracy(value: float) -> float:
    """Half-up rounding to 2 decimals of the float's exact value, as the official `Decimal(...).quantize` does."""
    return float(Decimal(value).quantize(ACCURACY_QUANTUM, rounding=ROUND_HALF_UP))


def last_integer_list(reply: str) -> list[int]:
    """The last bracketed list of integers in `reply`; prose, Markdown and code fences around it are ignored."""
    matches = INTEGER_LIST.findall(reply)
    try:
        return json.loads(matches[-1])
    except (IndexError, ValueError) as exc:
        raise ValueError("the reply contains no list of integers in square brackets") from exc


class GeniusSearcher(Searcher):
    """GENIUS: one architecture per iteration from a chat model, given every earlier result (module docstring).

    Errored trials (error=True, no result, or no finite `metric` in it) are recorded as failed: the model is told
    that training failed (no accuracy), and proposing the same network again is a duplicate.
    """

    def __init__(self, space: SearchSpace, key: str, metric: str | None = None, mode: str | None = None, *,
                 model: str, base_url: str | None = None, temperature: float = 0.0, variant: str = "single_turn",
                 persona: str = "expert", max_retries: int = 5, api_key_env: str = "OPENAI_API_KEY",
                 flops: tuple[float, float] | None = None, accuracy_scale: float = 100.0, max_tokens: int | None = None,
                 request_timeout: float = 120.0, request_retries: int = 2, log_dir: str | None = None,
                 dataset_name: str = "CIFAR10", list_only: bool = True, counts: ArchCounts | None = None):
        _check_choice("variant", variant, VARIANTS)
        _check_choice("persona", persona, tuple(PERSONAS))
        _check_mode(mode)
        if max_retries < 0 or request_retries < 0:
            raise ValueError(f"max_retries and request_retries must be >= 0, got {max_retries} and {request_retries}")
        super().__init__(metric=metric, mode=mode)
        self.space, self.key, self.model, self.base_url = space, key, model, base_url
        self.temperature, self.variant, self.persona, self.max_retries = temperature, variant, persona, max_retries
        self.api_key_env, self.accuracy_scale, self.max_tokens = api_key_env, accuracy_scale, max_tokens
        self.flops_window = tuple(flops) if flops is not None else space.flops_window
        self.request_timeout, self.request_retries, self.dataset_name = request_timeout, request_retries, dataset_name
        self.list_only = list_only
        self.suffix = (SUFFIX if list_only else REASONED_SUFFIX).format(answer=space.prompt().answer_name)
        self.log_dir = Path(log_dir) if log_dir is not None else None
        self.counts = counts or ArchCounts(space)  # MFLOPs and params: the benchmark table's, else counted
        self._client: Any = None
        self._history: list[dict[str, Any]] = []  # evaluated candidates: trial_id, code, accuracy (None: failed)
        self._pending: dict[str, Any] | None = None  # the suggested trial not completed yet
        self._chat: list[dict[str, str]] = []  # the current conversation
        self._exchanges: list[dict[str, Any]] = []  # every request with its reply or error (chat.json)
        self._candidates: list[dict[str, Any]] = []  # every reply's verdict (candidates.jsonl)
        self._carried = False  # the records already in log_dir are in the lists above (_carry_logged)

    # ------------------------------------------------------------------------------------------ Tune's interface

    def set_search_properties(self, metric: str | None, mode: str | None, config: dict, **spec: Any) -> bool:
        """Take Tune's metric and mode (the space comes from `space`, so `config` is not used). Tune calls this
        only when the Tuner's param_space is not empty: otherwise pass `metric` to the constructor."""
        _check_mode(mode)
        if metric:
            self._metric = metric
        if mode:
            self._mode = mode
        return True

    def suggest(self, trial_id: str) -> dict[str, str] | None:
        """The next architecture as {key: "<space>:<code>"}, or None while the last one is still being trained."""
        if self._pending is not None:
            return None
        if not self.metric:
            raise ValueError("GeniusSearcher needs the metric to feed back; pass metric= or set_search_properties")
        self._carry_logged()  # before this searcher's first record, which would look like the log's first
        self._open_iteration()
        code, index = self._ask_until_accepted()
        self._pending = {"trial_id": trial_id, "code": code, "candidate": index}
        self._candidates[index]["trial_id"] = trial_id
        self._write_logs()
        log.info("GENIUS iteration %d: %s", self.iteration, code)
        return {self.key: arch_value(self.space, code)}

    def on_trial_complete(self, trial_id: str, result: dict | None = None, error: bool = False) -> None:
        if self._pending is None or trial_id != self._pending["trial_id"]:
            log.warning("GENIUS: trial %s completed but it is not the pending suggestion; ignored", trial_id)
            return
        value = _finite(None if error or not result else result.get(self.metric))
        accuracy = None if value is None else round_accuracy(value * self.accuracy_scale)
        self._history.append({"trial_id": trial_id, "code": self._pending["code"], "accuracy": accuracy})
        candidate = self._candidates[self._pending["candidate"]]
        candidate.update(metric_value=value, accuracy=accuracy, status="failed" if value is None else "completed")
        self._pending = None
        self._write_logs()

    def save(self, checkpoint_path: str) -> None:
        state = {"version": STATE_VERSION, "space": self.space.name, "variant": self.variant, "metric": self._metric,
                 "mode": self._mode, "history": self._history, "pending": self._pending, "chat": self._chat,
                 "exchanges": self._exchanges, "candidates": self._candidates}
        _write_text(Path(checkpoint_path), json.dumps(state))

    def restore(self, checkpoint_path: str) -> None:
        state = json.loads(Path(checkpoint_path).read_text())
        found = (state.get("version"), state.get("space"), state.get("variant"))
        if found != (STATE_VERSION, self.space.name, self.variant):
            raise ValueError(f"{checkpoint_path} holds GENIUS state (version, space, variant) {found}, not "
                             f"{(STATE_VERSION, self.space.name, self.variant)}")
        self._metric, self._mode = state["metric"] or self._metric, state["mode"] or self._mode
        self._history, self._pending, self._chat = state["history"], state["pending"], state["chat"]
        self._exchanges, self._candidates, self._carried = state["exchanges"], state["candidates"], False
        self._write_logs()

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_client"] = None  # holds the API key and open connections; made again on first use
        return state

    # ------------------------------------------------------------------------------------------ reporting

    @property
    def iteration(self) -> int:
        """The 1-based number of the iteration under way (or of the next one, between trials)."""
        return len(self._history) + 1

    def history(self) -> list[dict[str, Any]]:
        """The evaluated candidates in order: trial_id, code, accuracy (percent, rounded; None if it failed)."""
        return [dict(entry) for entry in self._history]

    def summary(self) -> dict[str, float]:
        """Numbers to log as metrics: token and request totals, verdict counts, evaluated/failed, best accuracy."""
        verdicts = [candidate["verdict"] for candidate in self._candidates]
        numbers: dict[str, float] = dict(usage_totals(self._exchanges))
        numbers["accepted"] = verdicts.count("accepted")
        numbers.update({f"rejected_{verdict}": verdicts.count(verdict) for verdict in REJECTIONS})
        numbers["evaluated"] = len(self._history)
        numbers["failed"] = sum(entry["accuracy"] is None for entry in self._history)
        accuracies = [entry["accuracy"] for entry in self._history if entry["accuracy"] is not None]
        if accuracies:
            numbers["best_accuracy"] = max(accuracies)
        return numbers

    # ------------------------------------------------------------------------------------------ the prompts

    def _open_iteration(self) -> None:
        system = {"role": "system", "content": PERSONAS[self.persona]}
        if self.variant == "single_turn" or not self._chat:
            self._chat = [system, {"role": "user", "content": self._first_prompt()}]
        else:
            self._chat.append({"role": "user", "content": self._feedback(self._history[-1])})

    def _first_prompt(self) -> str:
        """The space's body (+ the sweep's own FLOPs window), then the experiments block (single_turn, after the
        first iteration), then the suffix, each on the line after the last (the layout of the official scripts:
        `user_input + experiments_prompt(...) + suffix`)."""
        body = self.space.prompt().text()
        if self.flops_window is not None and self.flops_window != self.space.flops_window:
            low, high = self.flops_window  # a window of the sweep's own: the space's prompt states the space's
            body += (f"\n\nThe FLOPs constraint of this search: the total FLOPs of the model (all layers, defined "
                     f"and undefined) must lie in [{low:g}, {high:g}] MFLOPs.")
        experiments = [self._experiments()] if self.variant == "single_turn" and self._history else []
        return "\n".join([body, *experiments, self.suffix])

    def _experiments(self) -> str:
        """Every earlier candidate on a line of its own, then the request for a better answer."""
        prompt = self.space.prompt()
        lines = [self._experiment_line(number, entry) for number, entry in enumerate(self._history, start=1)]
        better = "a better" if prompt.ask_better else "a"
        return (EXPERIMENTS_HEADER + "\n" + "\n".join(lines) + f"\n\nPlease suggest {better} {prompt.answer_name} "
                f"that improves the model's performance on {self.dataset_name} beyond these experimental results.")

    def _experiment_line(self, number: int, entry: dict[str, Any]) -> str:
        listed, accuracy = self._listed(entry["code"]), entry["accuracy"]
        if self.flops_window is None:
            if accuracy is None:
                return f"{listed} failed to train, so it has no accuracy"
            return f"{listed} gives an accuracy of {accuracy:.2f}%"
        outcome = "training failed (no accuracy)" if accuracy is None else f"accuracy {accuracy:.2f}%"
        return f"Experiment {number}: {listed}, FLOPs {self.counts.flops(entry['code']):.2f}M, {outcome}"

    def _feedback(self, entry: dict[str, Any]) -> str:
        """The multi_turn user turn about the last candidate (the NAS-Bench-201 script's)."""
        size = "" if self.flops_window is None else f"This model has {self.counts.flops(entry['code']):.2f} MFLOPs. "
        if entry["accuracy"] is None:
            outcome = "Training this model failed, so it has no accuracy."
        else:
            outcome = f"By using this model, we achieved an accuracy of {entry['accuracy']:.2f}%."
        rationale = "" if self.list_only else (" Please also explain why the model you suggest should surpass all the "
                                               "earlier architectures.")
        return (f"{size}{outcome} Please recommend a new model that outperforms all prior architectures, based on "
                f"the experiments above.{rationale}\n\n{self.suffix}")

    # ------------------------------------------------------------------------------------------ one iteration

    def _ask_until_accepted(self) -> tuple[str, int]:
        """Ask, judge, re-prompt on a rejection; (code, candidate index) of the accepted answer."""
        last: Rejection | None = None
        for attempt in range(1, self.max_retries + 2):  # attempt 1 is the first request of the iteration
            if last is not None:
                self._chat.append({"role": "user", "content": last.feedback})
            reply = self._request(attempt)
            self._chat.append({"role": "assistant", "content": reply})
            try:
                code = self._judge(reply)
            except Rejection as rejection:
                last = rejection
                self._record(attempt, reply, rejection.verdict, rejection.code, rejection.reason)
                self._write_logs()
                continue
            return code, self._record(attempt, reply, "accepted", code, "")
        raise GeniusError(f"GENIUS iteration {self.iteration}: no acceptable architecture after {self.max_retries} "
                          f"re-prompts; the last reply was rejected as {last.verdict} ({last.reason}): {reply!r}")

    def _request(self, attempt: int) -> str:
        """The reply of one chat completion. A timeout, no connection, HTTP 429 or 5xx, or an HTTP 200 whose body is
        not a chat completion is tried again up to `request_retries` times (after 0.5, 1, 2 ... s); every HTTP
        request is recorded (chat.json) and a failure that remains (or any other HTTP error) is a GeniusError."""
        kwargs: dict[str, Any] = {"model": self.model, "messages": self._chat, "temperature": self.temperature, "n": 1}
        if self.max_tokens is not None:
            kwargs["max_tokens"] = self.max_tokens
        where = (f"GENIUS iteration {self.iteration}, attempt {attempt}: the request for model {self.model!r} at "
                 f"{self.base_url or 'the OpenAI API'}")
        for retry in range(self.request_retries + 1):
            time.sleep(0.0 if retry == 0 else RETRY_DELAY_S * 2 ** (retry - 1))
            try:
                response, choice = _completion(self._get_client().chat.completions.create, kwargs)
            except (BadBody, openai.OpenAIError) as exc:
                failure = (f"answered HTTP 200 with {exc}" if isinstance(exc, BadBody)
                           else f"failed: {type(exc).__name__}: {exc}")
                self._log_exchange(attempt, None, None, error=failure)
                if isinstance(exc, TRANSIENT):
                    continue
                raise GeniusError(_one_line(f"{where} {failure}")) from None
            reply = getattr(choice.message, "content", None) or ""
            self._log_exchange(attempt, response, choice, reply=reply)
            return reply
        raise GeniusError(_one_line(f"{where} {failure} (after {self.request_retries} retries)"))

    def _log_exchange(self, attempt: int, response: Any, choice: Any, reply: str | None = None,
                      error: str | None = None) -> None:
        """Append one request with its reply (or its error) to the exchanges."""
        usage = getattr(response, "usage", None)
        self._exchanges.append({
            "iteration": self.iteration, "attempt": attempt, "model": self.model,
            "server_model": getattr(response, "model", None), "finish_reason": getattr(choice, "finish_reason", None),
            "messages": list(self._chat), "reply": reply, "error": error,
            "usage": {name: getattr(usage, name, 0) or 0 for name in TOKEN_COUNTS}})
        if error:  # a reply is written with its verdict (_record), a failed request at once
            self._write_logs()

    def _judge(self, reply: str) -> str:
        """The code of an acceptable reply; Rejection otherwise."""
        try:
            values = last_integer_list(reply)
        except ValueError as exc:
            n = len(self.space.choices)
            raise Rejection("malformed", str(exc), f"Your reply does not contain a list of {n} integers in square "
                                                   f"brackets, [x1, x2, ..., x{n}].\n\n{self.suffix}") from None
        try:
            code = self.space.from_answer(values)
        except InvalidArchitecture as exc:
            raise Rejection("invalid", str(exc), f"The list {values} is not a valid architecture: {exc}. Please "
                                                 f"follow the required format.\n\n{self.suffix}") from None
        self._check_new(code)
        self._check_budget(code)
        return code

    def _listed(self, code: str) -> str:
        """`code` as the model writes it: "22212220" -> "[2, 2, 2, 1, 2, 2, 2, 0]" (channel lists for
        Channel-Bench-Macro: the space's `answer_list`)."""
        return str(self.space.answer_list(code))

    def _check_new(self, code: str) -> None:
        canonical = self.space.canonical(code)
        for number, entry in enumerate(self._history, start=1):
            if self.space.canonical(entry["code"]) == canonical:
                same = "" if entry["code"] == code else f" is the same network as {self._listed(entry['code'])}, which"
                outcome = "it failed to train" if entry["accuracy"] is None else f"accuracy {entry['accuracy']:.2f}%"
                reason = f"duplicates experiment {number} ({entry['code']})"
                feedback = (f"The list {self._listed(code)}{same} was already evaluated in experiment {number} "
                            f"({outcome}). Please suggest an architecture that has not been tried yet.\n\n"
                            f"{self.suffix}")
                raise Rejection("duplicate", reason, feedback, code)

    def _check_budget(self, code: str) -> None:
        if self.flops_window is None:
            return
        low, high = self.flops_window
        flops = self.counts.flops(code)
        if low <= flops <= high:
            return
        side = f"higher than the upper bound of {high:g}" if flops > high else f"lower than the lower bound of {low:g}"
        gap = flops - high if flops > high else low - flops
        raise Rejection("over_budget", f"{flops:.2f} MFLOPs outside [{low:g}, {high:g}]",
                        f"The design fails to meet the FLOPs constraint: it has {flops:.2f} MFLOPs, which is "
                        f"{gap:.2f} MFLOPs {side}. Please revise your design so that it maximizes the model's "
                        f"performance on {self.dataset_name} while meeting the FLOPs constraint "
                        f"[{low:g}, {high:g}].\n\n{self.suffix}", code)

    def _record(self, attempt: int, reply: str, verdict: str, code: str | None, reason: str) -> int:
        """Append a candidate (candidates.jsonl); its index."""
        entry = {"iteration": self.iteration, "attempt": attempt, "reply": reply, "code": code, "verdict": verdict,
                 "reason": reason, "flops": None, "params": None, "trial_id": None, "accuracy": None,
                 "status": "pending" if verdict == "accepted" else "rejected"}
        if code is not None:
            entry.update(flops=self.counts.flops(code), params=self.counts.params(code))
        self._candidates.append(entry)
        return len(self._candidates) - 1

    # ------------------------------------------------------------------------------------------ client and files

    def check_credentials(self) -> None:
        """GeniusError unless an API key is set (or the server is local): checked before the sweep starts."""
        self._api_key()

    def _get_client(self) -> Any:
        if self._client is None:
            self._client = openai.OpenAI(base_url=self.base_url, api_key=self._api_key(),
                                         timeout=self.request_timeout, max_retries=0)  # _request retries
        return self._client

    def _api_key(self) -> str:
        key = os.environ.get(self.api_key_env)
        if key:
            return key
        if self.base_url and urlparse(self.base_url).hostname in LOOPBACK_HOSTS:
            return LOCAL_PLACEHOLDER_KEY
        raise GeniusError(f"GENIUS needs an API key for {self.base_url or 'the OpenAI API'}: set the environment "
                          f"variable {self.api_key_env} (only a server on localhost/127.0.0.1 works without one)")

    def _write_logs(self) -> None:
        if self.log_dir is None:
            return
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self._carry_logged()
        chat = {"model": self.model, "variant": self.variant, "persona": self.persona, "exchanges": self._exchanges}
        served = sorted({e["server_model"] for e in self._exchanges if e.get("server_model")})
        usage = dict(usage_totals(self._exchanges), model=self.model, server_models=served)
        files = {"chat.json": json.dumps(chat, indent=1), "chat.md": self._transcript(),
                 "candidates.jsonl": "".join(json.dumps(c) + "\n" for c in self._candidates),
                 "usage.json": json.dumps(usage, indent=1)}
        key = os.environ.get(self.api_key_env, "")  # hidden whatever the variable is called
        for name, text in files.items():
            _write_text(self.log_dir / name, redact_text(text, [key]))

    def _carry_logged(self) -> None:
        """Keep the records that an earlier driver wrote to `log_dir` and this state lacks (a search that stopped
        after its last checkpoint, or started again without one): they follow this state's own, so the logs only
        ever grow. Done once per searcher (and again after `restore`)."""
        if self._carried or self.log_dir is None:
            return
        self._carried = True
        logged_chat = _read_json(self.log_dir / "chat.json") or {}
        self._exchanges = _extended(self._exchanges, logged_chat.get("exchanges", []))
        self._candidates = _extended(self._candidates, _read_jsonl(self.log_dir / "candidates.jsonl"))

    def _transcript(self) -> str:
        """chat.md: each exchange's new messages (those its conversation did not already show) and its reply or
        the error of the request."""
        lines = [f"# GENIUS chat with {self.model} ({self.variant}, persona {self.persona})", ""]
        shown: list[dict[str, str]] = []
        for exchange in self._exchanges:
            messages = exchange["messages"]
            new = messages[len(shown):] if messages[:len(shown)] == shown else messages
            served = exchange["server_model"] or "no reply"
            lines += [f"## Iteration {exchange['iteration']}, attempt {exchange['attempt']} (served by {served})", ""]
            for message in new:
                lines += [f"### {message['role']}", "", message["content"], ""]
            shown = list(messages)
            if exchange.get("error"):
                lines += ["### request failed", "", exchange["error"], ""]
                continue
            lines += ["### assistant", "", exchange["reply"], ""]
            shown.append({"role": "assistant", "content": exchange["reply"]})
        return "\n".join(lines)


def usage_totals(exchanges: list[dict[str, Any]]) -> dict[str, int]:
    """Requests sent (failed ones included, and counted apart) and the tokens of their replies."""
    totals = {"requests": len(exchanges), "failed_requests": sum(bool(e.get("error")) for e in exchanges)}
    totals.update({name: sum(e["usage"].get(name, 0) for e in exchanges) for name in TOKEN_COUNTS})
    return totals


def _completion(create: Any, kwargs: dict[str, Any]) -> tuple[Any, Any]:
    """(response, first choice) of `create(**kwargs)`; BadBody when the body is not a chat completion (the client
    returns a non-JSON body as a str and builds a JSON body of another shape without checking it)."""
    try:
        response = create(**kwargs)
    except (openai.APIResponseValidationError, ValueError) as exc:  # ValueError: a JSON content type, no JSON
        raise BadBody(f"a body that is not JSON ({type(exc).__name__}: {exc})") from None
    if isinstance(response, str):
        raise BadBody(f"a body that is not JSON: {response[:SHOWN_BODY]!r}")
    choices = getattr(response, "choices", None)
    if not isinstance(choices, list) or not choices or getattr(choices[0], "message", None) is None:
        raise BadBody(f"JSON that is not a chat completion (no choices[0].message): {str(response)[:SHOWN_BODY]}")
    return response, choices[0]


def _one_line(text: str) -> str:
    return " ".join(text.split())


def _extended(own: list[dict[str, Any]], logged: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """`own` followed by the logged records it lacks: those after its length when the log begins with the same
    (iteration, attempt, reply)s as `own` (the log of this state), else every logged record (nothing is dropped)."""
    def ids(records: list[dict[str, Any]]) -> list[tuple[Any, Any, Any]]:
        return [(r.get("iteration"), r.get("attempt"), r.get("reply")) for r in records]

    same_start = ids(logged[:len(own)]) == ids(own)
    return own + (logged[len(own):] if same_start else logged)


def _read_json(path: Path) -> Any:
    """The JSON in `path`, or None when it is missing or unreadable (a log written by nobody yet)."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _read_jsonl(path: Path) -> list[dict[str, Any]]:
    try:
        return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    except (OSError, ValueError):
        return []


def _check_choice(name: str, value: str, allowed: tuple[str, ...]) -> None:
    if value not in allowed:
        raise ValueError(f"GENIUS {name} must be one of {', '.join(allowed)}; got {value!r}")


def _check_mode(mode: str | None) -> None:
    if mode not in (None, "max"):
        raise ValueError(f"GENIUS maximizes an accuracy: mode must be 'max', got {mode!r}")


def _finite(value: Any) -> float | None:
    """The metric as a float, or None when it is missing, not a number, NaN or infinite (a failed trial)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
        return None
    return float(value)


def _write_text(path: Path, text: str) -> None:
    """Write through a temporary file, so a reader (or a crash) never sees half a file."""
    temporary = path.with_name(path.name + ".tmp")
    temporary.write_text(text)
    os.replace(temporary, path)
