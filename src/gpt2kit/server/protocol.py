"""The wire format of the completions API: OpenAI's request schema (plus GPT-2's sampling controls) and
OpenAI's error object. No serving logic here."""

from __future__ import annotations

from typing import Any

from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException

# ---- request schema (OpenAI's Completions API, plus GPT-2 sampling controls) -------------------------

# strict: a string for a number ("max_tokens": "3"), a number or string for a flag ("stream": "yes") or a flag
# for a number ("logprobs": true) is a wrong type (422), as OpenAI refuses it, not coerced; allow_inf_nan=False:
# JSON's 1e400 parses as an infinite temperature, which is no temperature
_STRICT = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(BaseModel):
    model_config = _STRICT
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = _STRICT
    model: str | None = None
    prompt: str | list[str] | list[int] | list[list[int]] = "<|endoftext|>"
    max_tokens: int | None = Field(16, description="tokens per completion (0 with echo: score the prompt)")
    temperature: float | None = Field(1.0, description="0 is greedy")
    top_p: float | None = 1.0
    n: int | None = 1
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    logprobs: int | None = Field(None, description="also return the top-N alternatives per token")
    echo: bool | None = False
    stop: str | list[str] | None = None
    seed: int | None = None
    presence_penalty: float | None = Field(0.0, description="in [-2, 2]; over the generated tokens")
    frequency_penalty: float | None = Field(0.0, description="in [-2, 2]; over the generated tokens")
    best_of: int | None = None
    logit_bias: dict[str, float] | None = Field(None, description='{"token id": bias in [-100, 100]}')
    suffix: str | None = None
    user: str | None = None
    # GPT-2 controls beyond OpenAI's API (the openai client sends them via extra_body)
    top_k: int | None = Field(0, description="0 disables")
    min_p: float | None = Field(0.0, description="0 disables")
    typical_p: float | None = Field(1.0, description="typical sampling mass; 1 disables")
    repetition_penalty: float | None = Field(1.0, description="1 disables")
    no_repeat_ngram_size: int | None = Field(0, description="no n-gram of this many tokens occurs twice; 0 disables")
    bad_words: list[str] | None = Field(None, description="texts never generated")
    min_tokens: int | None = Field(0, description="no <|endoftext|> or stop string ends a completion before this")
    ignore_eos: bool | None = Field(False, description="vLLM's: <|endoftext|> does not end a completion")


# ---- /tokenize and /detokenize (vLLM's shapes; lm-evaluation-harness and other clients use them) ------

class TokenizeRequest(BaseModel):
    """vLLM's TokenizeCompletionRequest (`prompt`) or TokenizeChatRequest (`messages`, refused: GPT-2 has
    no chat template)."""
    model_config = _STRICT
    model: str | None = None
    prompt: str | None = None
    messages: list[dict[str, Any]] | None = None
    add_generation_prompt: bool | None = None  # chat form only
    continue_final_message: bool | None = None  # chat form only
    chat_template: str | None = None  # chat form only
    add_special_tokens: bool = True  # GPT-2's tokenizer adds no BOS/EOS: no effect either way
    return_token_strs: bool | None = False


class DetokenizeRequest(BaseModel):
    model_config = _STRICT
    model: str | None = None
    tokens: list[int]


class APIError(HTTPException):
    """An error answered as OpenAI's error object. (An HTTPException, so FastAPI lets it through when it
    is raised while the body is being read.)"""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None, headers: dict[str, str] | None = None):
        super().__init__(status, message, headers)
        self.message, self.type, self.param, self.code = message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status_code, headers=self.headers)



def bad_request(message: str, param: str | None = None, code: str | None = None) -> APIError:
    return APIError(400, message, param=param, code=code)
