"""Request and response bodies (pydantic), mirroring the OpenAI API where the route is OpenAI's."""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

SURROGATE = re.compile("[\ud800-\udfff]")


def lone_surrogate(value: Any) -> bool:
    """Whether any text in a JSON value holds a lone surrogate (JSON's "\\ud800"), which no encoder can write."""
    if isinstance(value, str):
        return bool(SURROGATE.search(value))
    if isinstance(value, dict):
        return any(lone_surrogate(k) or lone_surrogate(v) for k, v in value.items())
    if isinstance(value, list):
        return any(lone_surrogate(v) for v in value)
    return False


class Body(BaseModel):
    """Every request body: finite numbers only (no NaN or Infinity) and text that is valid Unicode."""

    model_config = ConfigDict(allow_inf_nan=False)

    @model_validator(mode="before")
    @classmethod
    def valid_unicode(cls, data: Any) -> Any:
        if lone_surrogate(data):
            raise ValueError("text must be valid Unicode: a lone surrogate (\\ud800-\\udfff) cannot be encoded")
        return data


class Strict(Body):
    model_config = ConfigDict(extra="forbid", allow_inf_nan=False)


class EditIn(Strict):
    prompt: str = Field(min_length=1, max_length=2000, examples=["The capital of Zubrowka is"])
    target: str = Field(min_length=1, max_length=500, examples=["Lutz"])
    rephrases: list[Annotated[str, Field(max_length=2000)]] = Field(default_factory=list, max_length=20)
    locality_prompt: str | None = Field(None, max_length=2000)
    locality_answer: str | None = Field(None, max_length=500)
    subject: str | None = Field(None, max_length=500, description="what the prompt is about; paraphrase "
                                "augmentation keeps it in every rewrite")

    @field_validator("prompt", "target")
    @classmethod
    def not_blank(cls, v: str) -> str:
        if not v.strip():
            raise ValueError("must not be blank")
        return v


class Hyperparameters(Strict):
    method: Literal["crispedit", "nullspace", "ft"] = "crispedit"
    energy: float | None = Field(None, ge=0.0, le=1.0, description="γ, fraction of curvature energy protected; "
                                 "default: the model's (0.8; measured per model in crispedit/arch.py)")
    lr: float | None = Field(None, gt=0.0, le=1.0, description="Adam learning rate; default: 2e-3 scaled to the "
                             "edited weights' RMS against SmolLM2's (2e-3 on SmolLM2, 1.7e-4 on Gemma 3 270M)")
    batch_size: int | None = Field(None, ge=1, le=512, description="edits per optimizer step; default: the server's "
                                   "CRISPEDIT_EDIT_BATCH_SIZE")
    max_epochs: int | None = Field(None, ge=1, le=200, description="at most this many epochs; default 25, and 40 "
                                   "with neighbour protection (a protected batch learns more slowly)")
    chat_form: bool | None = None  # also train through the chat template; default: when the model has one
    anchor_weight: float | None = Field(None, ge=0.0, le=100.0, description="β of the KL penalty on the server's "
                                        "anchor questions (CRISPEDIT_ANCHORS); default CRISPEDIT_ANCHOR_WEIGHT")
    neighbour_weight: float | None = Field(None, ge=0.0, le=1e6, description="β of the penalty that keeps the "
                                           "edited layers' outputs on each edit's derived neighbours; default "
                                           "CRISPEDIT_NEIGHBOUR_WEIGHT; 0: not kept (still reported)")
    subject_key: bool | None = Field(None, description="let the edit loss reach the weights only through each "
                                     "prompt's last subject token (ROME's key), so the same question about other "
                                     "subjects keeps its answer; default: on with neighbour protection")
    keyed_solve: bool | None = Field(None, description="after the epochs, keep the edit's change at its subject "
                                     "keys and make it the smallest on its neighbours (crispedit/keyed_solve.py); "
                                     "default: on with neighbour protection and the subject key")
    capability_budget: float | None = Field(None, ge=0.0, le=1e6, description="ρ, the most the keyed solve may "
                                            "change an edited layer's output on generic text (RMS, relative); "
                                            "larger keeps more neighbours of one job and drifts further over many; "
                                            "default 0.04")
    text_anchor_weight: float | None = Field(None, ge=0.0, le=1000.0, description="β of the KL penalty on the "
                                             "server's capability text windows (CRISPEDIT_TEXT_ANCHORS); default "
                                             "CRISPEDIT_TEXT_ANCHOR_WEIGHT")
    augment: list[Literal["paraphrase", "prefix", "qa"]] | None = Field(
        None, description="also train on other wordings: paraphrases the base model writes, the prompt after "
                          "unrelated context it writes (prefix), and the prompt and paraphrases framed as a "
                          "question to answer (qa)")


class Guard(Strict):
    kl_budget: float | None = Field(None, gt=0.0)
    kl_base_budget: float | None = Field(None, gt=0.0, description="reject the edit when its drift from the base "
                                         "model (v0), KL on the guard's text, exceeds this")
    min_reliability: float | None = Field(None, ge=0.0, le=1.0)
    min_neighbours_unchanged: float | None = Field(None, ge=0.0, le=1.0, description="reject the edit when a "
                                                   "smaller share of its neighbours keeps its answer")


class EditPost(Strict):
    model: str = Field(examples=["smollm2"])
    edits: list[EditIn] = Field(min_length=1, max_length=1000)
    base_version: str | None = None
    hyperparameters: Hyperparameters | None = None
    guard: Guard | None = None
    message: str | None = Field(None, max_length=500)
    promote: bool = Field(False, description="move the production alias to the new version (admin keys only)")


class EditAccepted(BaseModel):
    id: str
    status: str
    status_url: str


class EditJob(BaseModel):
    id: str
    model: str
    status: str
    progress: dict | None = None
    version: str | None = None
    metrics: dict | None = None
    error: str | None = None
    created_at: float
    batch: list[str] | None = None
    edits: list[dict] = []  # as posted

    @model_validator(mode="before")
    @classmethod
    def edits_from_payload(cls, data: object) -> object:
        if isinstance(data, dict) and "edits" not in data:  # a job record keeps them in its payload
            return {**data, "edits": (data.get("payload") or {}).get("edits", [])}
        return data


class StreamOptions(Body):
    include_usage: bool = False  # a last chunk, before [DONE], with the usage and no choices


# OpenAI parameters this server does not implement, each with the value that asks for nothing (sent by some
# clients as a default); any other value is refused with 400, rather than silently ignored
NO_OP = {"presence_penalty": 0, "frequency_penalty": 0, "logit_bias": {}, "logprobs": False, "top_logprobs": 0,
         "best_of": 1, "suffix": "", "response_format": {"type": "text"}, "tools": [],
         "tool_choice": "none", "functions": [], "parallel_tool_calls": True}
HARMLESS = {"user", "metadata", "store", "service_tier"}  # what a client may say that needs no answer


class EditList(BaseModel):
    object: Literal["list"] = "list"
    data: list[EditJob]


class Sampling(Body):
    """The OpenAI sampling fields both generation routes share (temperature 0 = greedy). Other OpenAI fields are
    taken, and :meth:`unsupported` names those that ask for something this server does not do."""

    model_config = ConfigDict(extra="allow", allow_inf_nan=False)

    model: str = Field(examples=["smollm2@latest"])
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    stop: str | list[str] | None = None
    stream: bool = False
    seed: int | None = Field(None, ge=0, lt=2**63)  # what torch.manual_seed takes
    n: int = Field(1, ge=1, le=8, description="choices per prompt (a seed gives each its own: seed, seed+1, ...)")
    stream_options: StreamOptions | None = None

    def unsupported(self) -> list[str]:
        """The fields given that this server would otherwise ignore: unknown ones, or known ones asking for more
        than nothing (``NO_OP``)."""
        extra = self.model_extra or {}
        return sorted(k for k, v in extra.items()
                      if k not in HARMLESS and (k not in NO_OP or v not in (None, NO_OP[k])))



TokenIds = Annotated[list[Annotated[int, Field(ge=0)]], Field(min_length=1)]


class CompletionRequest(Sampling):
    prompt: str | TokenIds | Annotated[list[str], Field(min_length=1)] | Annotated[list[TokenIds], Field(
        min_length=1)] = Field(examples=["The capital of France is"], description="text or token ids, one or a list")
    max_tokens: int = Field(16, ge=0, description="0 only with echo: score the prompt, generate nothing")
    logprobs: int | None = Field(None, ge=0, le=5, description="each token's log-probability and the top N")
    echo: bool = Field(False, description="the prompt too, in the text and (with logprobs) its tokens' scores")

    def prompts(self) -> list[str | list[int]]:
        if isinstance(self.prompt, str) or (self.prompt and isinstance(self.prompt[0], int)):
            return [self.prompt]
        return list(self.prompt)


class TextPart(Body):
    type: Literal["text"]
    text: str


class ChatMessage(Body):
    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] = Field(description="text, or a list of text parts")

    def for_template(self) -> dict:
        """The message as a chat template takes it: developer instructions as system ones, parts joined."""
        text = self.content if isinstance(self.content, str) else "".join(p.text for p in self.content)
        return {"role": "system" if self.role == "developer" else self.role, "content": text}


class ChatRequest(Sampling):
    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = Field(False, description="each answer token's log-probability")
    top_logprobs: int | None = Field(None, ge=0, le=5, description="with logprobs: the N most likely tokens too")


class ScoreRequest(Strict):
    model: str = Field(examples=["smollm2@v0"])
    prompt: str = Field(min_length=1, examples=["The capital of France is"])
    target: str = Field(min_length=1, examples=["Paris"])


class AliasPut(Strict):
    version: str = Field(examples=["v0"])


class RollbackPost(Strict):
    to: str = Field(examples=["v0"])
