"""`llm_judge`: score completions by asking a model behind any OpenAI-compatible chat endpoint.

Each completion is one POST to `{base_url}/chat/completions` (vLLM, SGLang, llama.cpp, Ollama,
OpenAI, ...) with `prompt_template` filled in as the user message. The reply's score is parsed
from its text and mapped from `score_range` to [0, 1].

- Score parsing (`parse_score`): `<think>...</think>` blocks are ignored; the last number that
  follows the word "score" wins ("Score: 7", "**Score:** 7/10"), and is no score if outside
  `score_range`; without one, the last number in the text within `score_range` ("7/10" and
  "7 out of 10" count as 7). No usable number -> None (not 0) and a warning carrying the reply.
- Retries: connection errors, timeouts, 429 and 5xx are retried `max_retries` times with
  exponential backoff (`Retry-After` is honoured; 408 is retried too). 401, 403 and 404 mean a wrong key, permission,
  URL or model name: retrying cannot help, so they raise `RewardError` with the endpoint, status and
  the server's text. Other 4xx (e.g. one prompt over the judge's context) make that completion
  None; when every completion of a batch fails that way the request itself is wrong and it raises.
- Deadlines: every request has `timeout_s`, and a whole batch has `deadline_s`; whatever is not
  scored by then is None. The judge runs inline (in the trainer process), so it enforces these itself.
- The API key is read from the environment variable `api_key_env` at each call and never stored
  on the object, logged or put in an exception; a server that echoes it back has it redacted. A
  missing variable is fine for a server on this machine (localhost: a one-time note, no key sent)
  and an error for any other host. `api_key_env: null` never sends a key.
"""

from __future__ import annotations

import concurrent.futures as cf
import logging
import os
import random
import re
import string
import threading
import time
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from grpokit.errors import ConfigError, RewardError
from grpokit.rewards.builtin import completion_text

log = logging.getLogger(__name__)

DEFAULT_TEMPLATE = """You are grading a response to a task. Judge its correctness, completeness and clarity.

[Task]
{prompt}

[Reference answer]
{reference}

[Response to grade]
{completion}

Rate the response from {min_score} (useless or wrong) to {max_score} (fully correct and clear). If a reference \
answer is given, a response whose final answer disagrees with it is wrong. Reply with one short sentence of \
justification, then a last line of the form "Score: N"."""

NO_REFERENCE = "(none given)"
REFERENCE_COLUMNS = ("answer", "reference", "target", "solution", "ground_truth")
TEMPLATE_FIELDS = {"prompt", "completion", "reference", "min_score", "max_score"}
_USER_ERRORS = {401: "the API key is wrong or missing", 403: "the API key may not use this model or endpoint",
                404: "check base_url (it usually ends in /v1) and the model name the server serves"}
_LOOPBACK_HOSTS = {"127.0.0.1", "localhost", "::1"}
_TEXT_SHOWN = 300  # characters of a server reply kept in warnings and errors

_NUMBER = r"(?<![\w.])-?\d+(?:\.\d+)?"
_CANDIDATE = re.compile(rf"(score\W{{0,12}})?({_NUMBER})(?:\s*(?:/|out\s+of)\s*\d+(?:\.\d+)?)?", re.IGNORECASE)
_THINK = re.compile(r"<think>.*?(?:</think>|$)", re.IGNORECASE | re.DOTALL)


def reference_texts(columns: dict[str, Any], column: str | None = None) -> list | None:
    """The reference column a reward compares against: `column` if given, else the first of
    REFERENCE_COLUMNS present in the batch's dataset columns; None when there is none."""
    if column is not None:
        if column not in columns:
            raise RewardError(f"reference_column '{column}' is not a dataset column; columns: {sorted(columns)}")
        return columns[column]
    return next((columns[name] for name in REFERENCE_COLUMNS if columns.get(name) is not None), None)


def parse_score(text: str, low: float, high: float) -> float | None:
    """The judge's score in [low, high] from its reply text, or None (see the module docstring)."""
    text = _THINK.sub(" ", text)
    marked, unmarked = [], []
    for match in _CANDIDATE.finditer(text):
        (marked if match.group(1) else unmarked).append(float(match.group(2)))
    candidates = marked[-1:] if marked else unmarked  # an explicit "Score: N" out of range is no score
    in_range = [v for v in candidates if low <= v <= high]
    return in_range[-1] if in_range else None


def _prompt_text(prompt: Any) -> str:
    if isinstance(prompt, list):  # chat messages: keep every turn, labelled
        return "\n\n".join(f"{m.get('role', 'user')}: {m.get('content', '')}" for m in prompt)
    return str(prompt)


@dataclass(slots=True, kw_only=True)
class _Outcome:
    score: float | None
    problem: str = ""  # why score is None, for the warning
    bad_request: bool = False  # a 4xx that retrying cannot fix
    refused: bool = False  # no connection at all on any attempt (not a timeout)


class LLMJudge:
    """Reward = the score an LLM judge gives the completion, mapped from `score_range` to [0, 1]."""

    expensive = True
    isolation = "inline"

    def __init__(self, *, model: str, base_url: str = "http://127.0.0.1:8000/v1",
                 api_key_env: str | None = "OPENAI_API_KEY", prompt_template: str = DEFAULT_TEMPLATE,
                 score_range: tuple[float, float] | list[float] = (0, 10), temperature: float = 0.0,
                 max_tokens: int | None = 256, timeout_s: float = 30.0, max_retries: int = 3,
                 backoff_s: float = 1.0, deadline_s: float = 300.0, concurrency: int = 8,
                 reference_column: str | None = None, extra_body: dict | None = None):
        """`max_tokens: null` leaves the field out (OpenAI's reasoning models reject it: pass
        `extra_body: {max_completion_tokens: N}` instead). `extra_body` is merged into every request.
        `reference_column` names the reference column; default: the first of REFERENCE_COLUMNS present."""
        if not model:
            raise ConfigError("llm_judge: 'model' is required: the model name the endpoint serves")
        parts = urlsplit(base_url)
        if parts.scheme not in ("http", "https") or not parts.hostname:
            raise ConfigError(f"llm_judge: base_url '{base_url}' must be an http(s) URL such as http://127.0.0.1:8000/v1")
        if len(score_range) != 2 or not float(score_range[0]) < float(score_range[1]):
            raise ConfigError(f"llm_judge: score_range {list(score_range)} must be [low, high] with low < high")
        if (timeout_s <= 0 or deadline_s <= 0 or concurrency < 1 or max_retries < 0 or backoff_s < 0
                or (max_tokens is not None and max_tokens < 1)):
            raise ConfigError("llm_judge: timeout_s and deadline_s must be > 0, concurrency and max_tokens >= 1 "
                              "(or max_tokens: null), max_retries and backoff_s >= 0")
        fields = {name for _, name, _, _ in string.Formatter().parse(prompt_template) if name is not None}
        if "completion" not in fields or not fields <= TEMPLATE_FIELDS:
            raise ConfigError(f"llm_judge: prompt_template uses fields {sorted(fields)}; it must use {{completion}} "
                              f"and may use only {sorted(TEMPLATE_FIELDS)} (write literal braces as {{{{ }}}})")
        self.model = model
        self.url = base_url.rstrip("/") + "/chat/completions"
        self.api_key_env = api_key_env or None
        self.prompt_template = prompt_template
        self.low, self.high = float(score_range[0]), float(score_range[1])
        self.temperature = temperature
        self.max_tokens = max_tokens
        self.timeout_s = timeout_s
        self.max_retries = max_retries
        self.backoff_s = backoff_s
        self.deadline_s = deadline_s
        self.concurrency = concurrency
        self.reference_column = reference_column
        self.extra_body = dict(extra_body or {})
        self._sessions = threading.local()
        if self.api_key_env and not os.environ.get(self.api_key_env):
            if parts.hostname not in _LOOPBACK_HOSTS:
                raise RewardError(f"llm_judge: environment variable {self.api_key_env} is not set, and {self.url} "
                                  "is not on this machine; export the key, or set api_key_env: null for a server "
                                  "that needs none")
            log.info("llm_judge: %s is not set; sending no API key to the local server %s", self.api_key_env, self.url)

    def __repr__(self) -> str:
        return f"LLMJudge(model={self.model!r}, url={self.url!r}, api_key_env={self.api_key_env!r})"

    def __call__(self, prompts: list, completions: list, **kwargs) -> list[float | None]:
        references = reference_texts(kwargs, self.reference_column)
        if references is None:
            references = [None] * len(completions)
        messages = [self._render(p, c, r) for p, c, r in zip(prompts, completions, references, strict=True)]
        api_key = os.environ.get(self.api_key_env) if self.api_key_env else None
        deadline = time.monotonic() + self.deadline_s
        outcomes: list[_Outcome] = [_Outcome(score=None, problem=f"not scored within deadline_s={self.deadline_s}")
                                    for _ in messages]
        # not a `with` block: its exit would wait for requests still running past the deadline
        pool = cf.ThreadPoolExecutor(max_workers=min(self.concurrency, max(len(messages), 1)),
                                     thread_name_prefix="llm-judge")
        try:
            futures = {pool.submit(self._score_one, m, api_key, deadline): i for i, m in enumerate(messages)}
            done, _ = cf.wait(futures, timeout=max(deadline - time.monotonic(), 0), return_when=cf.FIRST_EXCEPTION)
            for future in done:
                outcomes[futures[future]] = future.result()  # re-raises a RewardError from a worker
        finally:
            pool.shutdown(wait=False, cancel_futures=True)
        if messages and all(o.refused for o in outcomes):  # a wrong base_url or a server that is down: not "missing"
            raise RewardError(f"llm_judge: could not connect to {self.url} for any of {len(messages)} completions; "
                              f"is the server running and base_url right? {_redact(outcomes[0].problem, api_key)}")
        if messages and all(o.bad_request for o in outcomes):
            raise RewardError(f"llm_judge: {self.url} rejected every request of the batch (fix the request: "
                              f"template, max_tokens, extra_body): {_redact(outcomes[0].problem, api_key)}")
        self._warn_unscored(outcomes, api_key)
        return [None if o.score is None else (o.score - self.low) / (self.high - self.low) for o in outcomes]

    def _render(self, prompt: Any, completion: Any, reference: Any) -> str:
        reference_text = NO_REFERENCE if reference is None or str(reference).strip() == "" else str(reference)
        return self.prompt_template.format(prompt=_prompt_text(prompt), completion=completion_text(completion),
                                           reference=reference_text, min_score=f"{self.low:g}",
                                           max_score=f"{self.high:g}")

    def _score_one(self, user_message: str, api_key: str | None, deadline: float) -> _Outcome:
        import requests

        session = getattr(self._sessions, "session", None)
        if session is None:  # one connection pool per worker thread; requests.Session is not thread-safe
            session = self._sessions.session = requests.Session()
        body = {"model": self.model, "messages": [{"role": "user", "content": user_message}],
                "temperature": self.temperature,
                **({"max_tokens": self.max_tokens} if self.max_tokens is not None else {}),
                **self.extra_body}
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        problem = ""
        refused = True
        for attempt in range(self.max_retries + 1):
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                break
            retry_after = None
            try:
                response = session.post(self.url, json=body, headers=headers, timeout=min(self.timeout_s, remaining))
            except requests.RequestException as exc:  # connection refused, timeout, reset: worth another try
                problem = f"{type(exc).__name__} after {attempt + 1} attempt(s): {str(exc)[:_TEXT_SHOWN]}"
                refused = (refused and isinstance(exc, requests.ConnectionError)
                           and not isinstance(exc, requests.Timeout))
            else:
                refused = False
                status, text = response.status_code, response.text
                if status == 200:
                    return self._parse_reply(response)
                shown = _redact(text, api_key)[:_TEXT_SHOWN]
                if status in _USER_ERRORS:
                    raise RewardError(f"llm_judge: {self.url} answered {status} ({_USER_ERRORS[status]}; model "
                                      f"'{self.model}', key from ${self.api_key_env}): {shown!r}")
                problem = f"status {status} after {attempt + 1} attempt(s): {shown!r}"
                if status not in (408, 429) and status < 500:  # the request itself is wrong: it would fail again
                    return _Outcome(score=None, problem=problem, bad_request=True)
                retry_after = _seconds(response.headers.get("Retry-After"))
            if attempt < self.max_retries:
                delay = max(self.backoff_s * 2 ** attempt * (1 + 0.25 * random.random()), retry_after or 0)
                time.sleep(max(min(delay, deadline - time.monotonic()), 0))
        return _Outcome(score=None, problem=problem or f"deadline_s={self.deadline_s} passed before a reply",
                        refused=refused and bool(problem))

    def _parse_reply(self, response) -> _Outcome:
        try:  # the body is the server's: anything may be there
            content = response.json()["choices"][0]["message"]["content"] or ""
        except (ValueError, KeyError, IndexError, TypeError):
            return _Outcome(score=None,
                            problem=f"status 200 but no choices[0].message.content: {response.text[:_TEXT_SHOWN]!r}")
        score = parse_score(content, self.low, self.high)
        if score is None:
            return _Outcome(score=None, problem=f"status 200, no score in [{self.low:g}, {self.high:g}] in the "
                                                f"reply: {content[:_TEXT_SHOWN]!r}")
        return _Outcome(score=score)

    def _warn_unscored(self, outcomes: list[_Outcome], api_key: str | None) -> None:
        unscored = [i for i, o in enumerate(outcomes) if o.score is None]
        if unscored:
            first = unscored[0]
            log.warning("llm_judge (%s, model %s): %d of %d completions unscored (None); completion %d: %s", self.url,
                        self.model, len(unscored), len(outcomes), first, _redact(outcomes[first].problem, api_key))


def _redact(text: str, api_key: str | None) -> str:
    return text.replace(api_key, "<redacted>") if api_key else text


def _seconds(value: str | None) -> float | None:
    try:
        return float(value) if value is not None else None
    except ValueError:  # an HTTP date: fall back to the exponential backoff
        return None
